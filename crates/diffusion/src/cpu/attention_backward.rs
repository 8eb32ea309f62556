//! Attention for training (LoRA): the forward of [`super::attention`] (no `[N, M]` score
//! matrix kept) with its own backward, which recomputes the scores a few heads at a time, as
//! FlashAttention's backward does. candle's differentiable composition (`q·kᵀ`, scale, the
//! softmax's max / subtract / exp / sum / divide, `·v`) keeps five `B·H·N·M` tensors alive per
//! attention until the backward has run; at 64×64 latents that is 0.5 GB per self-attention.
//!
//! With `O = P·V`, `P = softmax(s·Q·Kᵀ)` and the output gradient `dO`:
//! `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = s·dS·K`, `dK = s·dSᵀ·Q`.

use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};

use super::attention::AttentionOp;
use super::on_cpu;
use super::simd::has_avx512;

/// Score elements recomputed at once in the backward (a few heads at a time): 8 MiB of f32.
const CHUNK: usize = 1 << 21;

/// `softmax(q·kᵀ·scale)·v` for `q` `[B, H, N, d]` and `k`, `v` `[B, H, M, d]` (f32, CPU) when a
/// gradient flows through them, as an op with its own backward; `None` otherwise (inference
/// uses [`super::attention::attention`], other dtypes and devices the plain composition).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !tracked || !on_cpu(&[q, k, v]) || [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
        return Ok(None);
    }
    let (Ok((b, h, _, d)), Ok((kb, kh, m, kd))) = (q.dims4(), k.dims4()) else { return Ok(None) };
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() || m == 0 || d == 0 {
        return Ok(None);
    }
    let op = TrainAttentionOp { scale: scale as f32 };
    // The fallback forward reads contiguous inputs; the AVX-512 kernel reads the strided views.
    let out = if has_avx512() {
        q.apply_op3(k, v, op)?
    } else {
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?
    };
    // [B, N, H, d] memory, seen as [B, H, N, d].
    Ok(Some(out.transpose(1, 2)?))
}

/// The op on `(q [B, H, N, d], k [B, H, M, d], v [B, H, M, d])`; the result is `[B, N, H, d]`,
/// contiguous.
#[derive(Debug, Clone, Copy)]
struct TrainAttentionOp {
    scale: f32,
}

impl CustomOp3 for TrainAttentionOp {
    fn name(&self) -> &'static str {
        "easyphoto-attention-train"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if has_avx512() {
            return AttentionOp { scale: self.scale }.cpu_fwd(qs, ql, ks, kl, vs, vl);
        }
        let tensor = |s: &CpuStorage, l: &Layout| -> Result<Tensor> {
            let data = super::f32_data(s, l)?;
            Tensor::from_slice(data, l.shape(), &candle_core::Device::Cpu)
        };
        let (q, k, v) = (tensor(qs, ql)?, tensor(ks, kl)?, tensor(vs, vl)?);
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * f64::from(self.scale))?)?;
        let out = p.matmul(&v)?.transpose(1, 2)?.contiguous()?;
        let shape = out.shape().clone();
        Ok((CpuStorage::F32(out.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, h, n, _) = q.dims4()?;
        let m = k.dim(2)?;
        let scale = f64::from(self.scale);
        // [B, N, H, d] to [B, H, N, d].
        let (out, grad) = (res.detach().transpose(1, 2)?, grad.detach().transpose(1, 2)?);
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let heads = (CHUNK / (n * m).max(1)).clamp(1, h);
        let (mut dq, mut dk, mut dv) = (vec![], vec![], vec![]);
        for h0 in (0..h).step_by(heads) {
            let hc = heads.min(h - h0);
            let part = |t: &Tensor| t.narrow(1, h0, hc)?.contiguous();
            let (q, k, v, o, go) = (part(&q)?, part(&k)?, part(&v)?, part(&out)?, part(&grad)?);
            let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
            dv.push(p.t()?.contiguous()?.matmul(&go)?);
            let rowsum = (&go * &o)?.sum_keepdim(D::Minus1)?;
            let ds = (go.matmul(&v.t()?)?.broadcast_sub(&rowsum)? * &p)?;
            drop(p);
            dq.push((ds.matmul(&k)? * scale)?);
            dk.push((ds.t()?.contiguous()?.matmul(&q)? * scale)?);
        }
        Ok((Some(Tensor::cat(&dq, 1)?), Some(Tensor::cat(&dk, 1)?), Some(Tensor::cat(&dv, 1)?)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Gradients of `Σ w ⊙ attention(q, k, v)` by the op and by candle's composition.
    #[test]
    fn gradients_match_the_composition() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // The last case recomputes the scores one head at a time.
        for (n, m) in [(37, 37), (50, 9), (1100, 1000)] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, n, 8), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, m, 8), &dev)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, m, 8), &dev)?)?;
            let w = Tensor::randn(0f32, 1.0, (2, 3, n, 8), &dev)?;
            let scale = 8f64.powf(-0.5);
            let ours = super::attention(&q, &k, &v, scale)?.expect("applies to tracked f32 CPU tensors");
            let p = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, candle_core::D::Minus1)?;
            let plain = p.matmul(&v)?;
            let max_abs = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(max_abs(&ours, &plain)? < 1e-5);
            let (g1, g2) = ((ours * &w)?.sum_all()?.backward()?, (plain * &w)?.sum_all()?.backward()?);
            for var in [&q, &k, &v] {
                let (a, b) = (g1.get(var).expect("gradient"), g2.get(var).expect("gradient"));
                let err = max_abs(a, b)?;
                assert!(err < 1e-5, "n {n} m {m}: {err}");
            }
        }
        Ok(())
    }
}
