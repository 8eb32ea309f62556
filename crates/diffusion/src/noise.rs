//! Seeded Gaussian noise that is the same on every device: drawn on the host from ChaCha8,
//! then moved to the target device.

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A reproducible stream of standard-normal tensors.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The next `shape`-sized draw, as `dtype` on `device`.
    pub fn randn(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count()).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_standard_moments() {
        let a = SeededNoise::new(7).randn((4, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let b = SeededNoise::new(7).randn((4, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let c = SeededNoise::new(8).randn((4, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let diff =
            |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 1000.0);
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let var = a.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
    }
}
