//! Fusing checkpoints: EasyPhoto's element-wise average and the delta average by SVD, on
//! tensors whose results are known in closed form.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use easyphoto_lora::{KohyaLora, KohyaModule, LoraError, average_deltas, average_elementwise, delta_weight};

const NAME: &str = "lora_unet_mid_block_attentions_0_proj_in";

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

fn lora(file: &str, down: Tensor, up: Tensor, alpha: Option<f32>) -> KohyaLora {
    KohyaLora::new(file, BTreeMap::from([(NAME.to_string(), KohyaModule { down, up, alpha })]), BTreeMap::new())
}

fn values(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1().unwrap()
}

fn delta(l: &KohyaLora) -> Tensor {
    let m = l.get(NAME).unwrap();
    delta_weight(&m.down, &m.up, m.alpha, 1.0).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn elementwise_average_counts_duplicates_and_averages_alpha() {
    // rank 1, Linear 2 -> 2.
    let a = lora("a", t(&[1., 2.], &[1, 2]), t(&[3., 4.], &[2, 1]), Some(1.0));
    let b = lora("b", t(&[5., 6.], &[1, 2]), t(&[7., 8.], &[2, 1]), Some(4.0));
    // [a, a, b]: the checkpoint listed twice counts twice.
    let fused = average_elementwise(&[&a, &a, &b]).unwrap();
    let m = fused.get(NAME).unwrap();
    // Accumulated as EasyPhoto does, `Σ tensor · (1/n)` in f32.
    let r = 1f32 / 3.;
    assert_eq!(values(&m.down), [1. * r + 1. * r + 5. * r, 2. * r + 2. * r + 6. * r]);
    assert_eq!(values(&m.up), [3. * r + 3. * r + 7. * r, 4. * r + 4. * r + 8. * r]);
    assert_eq!(m.alpha, Some(r + r + 4. * r));
    // It is not the average of the deltas: mean(up)·mean(down) has cross terms.
    let mean_delta = ((delta(&a) * 2.).unwrap() + delta(&b)).unwrap().affine(1. / 3., 0.).unwrap();
    let err = max_abs(&delta(&fused), &mean_delta);
    println!("element-wise fusion vs mean delta: {err}");
    assert!(err > 1.0);
}

#[test]
fn elementwise_average_of_partial_modules_and_missing_alpha() {
    let dev = Device::Cpu;
    let a = lora("a", t(&[2., 4.], &[1, 2]), t(&[6., 8.], &[2, 1]), None);
    let other = KohyaLora::new(
        "other",
        BTreeMap::from([(
            "lora_te_text_model_encoder_layers_0_mlp_fc1".to_string(),
            KohyaModule {
                down: Tensor::ones((1, 2), DType::F32, &dev).unwrap(),
                up: Tensor::ones((2, 1), DType::F32, &dev).unwrap(),
                alpha: Some(1.0),
            },
        )]),
        BTreeMap::new(),
    );
    let fused = average_elementwise(&[&a, &other]).unwrap();
    assert_eq!(fused.len(), 2);
    let m = fused.get(NAME).unwrap();
    // Missing in `other`: contributes zero; missing alpha counts as the rank (1).
    assert_eq!(values(&m.down), [1., 2.]);
    assert_eq!(values(&m.up), [3., 4.]);
    assert_eq!(m.alpha, Some(0.5));
    let bad = lora(
        "bad",
        Tensor::ones((2, 2), DType::F32, &dev).unwrap(),
        Tensor::ones((2, 2), DType::F32, &dev).unwrap(),
        None,
    );
    assert!(matches!(average_elementwise(&[&a, &bad]), Err(LoraError::Fuse { .. })));
    assert!(matches!(average_elementwise(&[]), Err(LoraError::Fuse { .. })));
}

#[test]
fn delta_average_is_exact_at_full_rank_and_optimal_when_truncated() {
    // Two rank-1 LoRAs on a Linear 3 -> 3 with orthogonal deltas: Δa = (alpha 2 / rank 1)·e0·e0ᵀ
    // and Δb = e1·e1ᵀ (no alpha: scale 1); the mean is diag(1, 0.5, 0).
    let a = lora("a", t(&[1., 0., 0.], &[1, 3]), t(&[1., 0., 0.], &[3, 1]), Some(2.0));
    let b = lora("b", t(&[0., 1., 0.], &[1, 3]), t(&[0., 1., 0.], &[3, 1]), None);
    let mean = t(&[1., 0., 0., 0., 0.5, 0., 0., 0., 0.], &[3, 3]);
    let full = average_deltas(&[&a, &b], 2).unwrap();
    assert_eq!(full.get(NAME).unwrap().rank(), 2);
    let err = max_abs(&delta(&full), &mean);
    println!("rank-2 delta average: max abs error {err:e}");
    assert!(err < 1e-6);
    // Rank 1 keeps the largest singular value: error = the dropped one (Eckart-Young).
    let one = average_deltas(&[&a, &b], 1).unwrap();
    let err = max_abs(&delta(&one), &mean);
    assert!((err - 0.5).abs() < 1e-6, "{err}");
    assert_eq!(one.metadata()["ss_network_dim"], "1");
}

#[test]
fn delta_average_of_random_conv_loras_matches_the_mean_delta() {
    // Three rank-2 3x3 conv LoRAs (8 -> 6), the first listed twice: the mean of 4 deltas has
    // rank <= 6 (its output count), so a rank-6 refactorisation is exact.
    let dev = Device::Cpu;
    let make = |seed: u64| {
        let down = Tensor::randn(0f32, 1.0, (2, 8, 3, 3), &dev).unwrap().affine(1.0, seed as f64 * 0.01).unwrap();
        let up = Tensor::randn(0f32, 1.0, (6, 2, 1, 1), &dev).unwrap();
        lora(&format!("l{seed}"), down, up, Some(seed as f32))
    };
    let (a, b, c) = (make(1), make(2), make(3));
    let list = [&a, &a, &b, &c];
    let mean = list.iter().map(|l| delta(l)).reduce(|x, y| (x + y).unwrap()).unwrap().affine(0.25, 0.).unwrap();
    let fused = average_deltas(&list, 6).unwrap();
    let m = fused.get(NAME).unwrap();
    assert_eq!(m.down.dims(), &[6, 8, 3, 3]);
    assert_eq!(m.up.dims(), &[6, 6, 1, 1]);
    let err = max_abs(&delta(&fused), &mean);
    println!("rank-6 conv delta average: max abs error {err:e}");
    assert!(err < 1e-5);
}
