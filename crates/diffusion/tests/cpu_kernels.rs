//! The CPU kernels (`easyphoto_diffusion::cpu`) against the plain candle compositions they
//! replace, on random inputs of awkward shapes; and the fallbacks when gradients are tracked.

use candle_core::{D, DType, Device, Module, Tensor, Var};
use easyphoto_diffusion::cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic, without depending on candle's global RNG.
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            // Sum of 4 uniforms, centred and scaled: close enough to normal for these tests.
            let mut s = 0f32;
            for _ in 0..4 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                s += (state >> 40) as f32 / (1u64 << 24) as f32;
            }
            (s - 2.0) * 1.73
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-30)
}

fn conv_case(x: &[usize], cout: usize, k: usize, stride: usize, padding: usize, bias: bool) {
    conv_case_with(x, cout, (k, stride, padding), bias, cpu::conv::Winograd::F2, 1e-5);
}

fn conv_case_with(
    x: &[usize],
    cout: usize,
    (k, stride, padding): (usize, usize, usize),
    bias: bool,
    winograd: cpu::conv::Winograd,
    tol: f32,
) {
    let (xt, w, b) = (randn(x, 1), randn(&[cout, x[1], k, k], 2), randn(&[cout], 3));
    let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
    let got = cpu::conv::conv2d_with(&xt, &w, bias.then_some(&b), &cfg, winograd).unwrap().expect("kernel applies");
    let mut want = xt.conv2d(&w, padding, stride, 1, 1).unwrap();
    if bias {
        want = want.broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
    }
    let err = rel_err(&got, &want);
    eprintln!("conv {x:?} -> {cout}, k{k} s{stride} p{padding}, {winograd:?}: rel err {err:.2e}");
    assert!(err < tol, "conv {x:?} -> {cout}, k{k} s{stride} p{padding}: rel err {err}");
}

#[test]
fn conv2d_matches_candle() {
    // Large maps: 3×3 stride 1 by Winograd F(2×2, 3×3) (odd sizes, both paddings, channels
    // spanning several blocks); stride 2 and 1×1 tiled per image.
    conv_case(&[1, 24, 70, 65], 17, 3, 1, 1, true);
    conv_case(&[2, 40, 50, 49], 33, 3, 1, 0, true);
    conv_case(&[1, 320, 64, 64], 96, 3, 1, 1, true);
    conv_case(&[2, 5, 37, 29], 7, 3, 1, 1, true);
    conv_case(&[1, 16, 45, 35], 9, 3, 1, 0, true);
    conv_case(&[2, 64, 32, 32], 80, 3, 1, 1, true);
    conv_case(&[1, 300, 33, 31], 70, 3, 1, 1, true);
    conv_case(&[1, 3, 40, 33], 16, 3, 1, 1, true);
    conv_case(&[2, 6, 41, 35], 9, 3, 2, 1, true);
    conv_case(&[1, 6, 41, 36], 9, 3, 2, 0, false);
    conv_case(&[2, 4, 33, 35], 5, 1, 1, 0, true);
    // Small maps (batch side by side, output channels split).
    conv_case(&[2, 20, 8, 8], 40, 3, 1, 1, true);
    conv_case(&[3, 20, 9, 7], 300, 3, 1, 1, true);
    conv_case(&[2, 20, 9, 7], 33, 1, 1, 0, true);
    conv_case(&[1, 20, 9, 7], 33, 1, 1, 0, false);
    conv_case(&[2, 12, 16, 16], 24, 3, 2, 1, true);
    // 1×1 with padding or stride goes through im2col.
    conv_case(&[2, 4, 10, 10], 6, 1, 2, 0, true);
    conv_case(&[1, 4, 10, 10], 6, 1, 1, 1, true);
}

#[test]
fn conv2d_other_paths_match_candle() {
    use cpu::conv::Winograd;
    // F(4×4, 3×3) (opt-in: 1–2e-5 relative error), with partial tiles; and im2col for the
    // shapes Winograd would take.
    for (x, cout, p) in [(&[1, 24, 70, 65][..], 17, 1), (&[2, 40, 50, 49], 33, 0), (&[1, 320, 64, 64], 96, 1)] {
        conv_case_with(x, cout, (3, 1, p), true, Winograd::F4, 4e-5);
        conv_case_with(x, cout, (3, 1, p), true, Winograd::Off, 1e-5);
    }
}

#[test]
fn conv2d_layer_matches_with_kernels_off() {
    // The model wrapper: same result whichever path runs.
    let weights = [("weight".to_string(), randn(&[12, 8, 3, 3], 4)), ("bias".to_string(), randn(&[12], 5))];
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &Device::Cpu);
    let conv = easyphoto_diffusion::layers::Conv2d::new(vb, 8, 12, 3, 1, 1).unwrap();
    let x = randn(&[2, 8, 20, 20], 6);
    let fast = conv.forward(&x).unwrap();
    let plain = x.conv2d(conv.weight(), 1, 1, 1, 1).unwrap();
    let plain = plain.broadcast_add(&randn(&[12], 5).reshape((1, 12, 1, 1)).unwrap()).unwrap();
    assert!(rel_err(&fast, &plain) < 1e-5);
}

fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(v).unwrap()
}

fn attention_case(b: usize, h: usize, n: usize, m: usize, d: usize, amp: f64) {
    let q = (randn(&[b, h, n, d], 10) * amp).unwrap();
    let k = (randn(&[b, h, m, d], 11) * amp).unwrap();
    let v = randn(&[b, h, m, d], 12);
    let scale = (d as f64).powf(-0.5);
    let Some(got) = cpu::attention::attention(&q, &k, &v, scale).unwrap() else {
        eprintln!("attention kernel unavailable on this CPU (no AVX-512); skipped");
        return;
    };
    let want = attention_reference(&q, &k, &v, scale);
    let err = rel_err(&got.contiguous().unwrap(), &want);
    eprintln!("attention b{b} h{h} n{n} m{m} d{d} amp {amp}: rel err {err:.2e}");
    assert!(err < 1e-5, "attention b{b} h{h} n{n} m{m} d{d} amp {amp}: rel err {err}");
}

#[test]
fn attention_matches_composition() {
    // Self-attention, N not a multiple of any block; head dims of SD1.5/SD2/SDXL and the VAE.
    attention_case(2, 3, 100, 100, 40, 1.0);
    attention_case(1, 2, 300, 300, 64, 1.0);
    attention_case(1, 2, 257, 257, 80, 1.0);
    attention_case(1, 1, 130, 130, 160, 1.0);
    attention_case(1, 1, 70, 70, 512, 0.3);
    // Cross-attention with 77 keys; a single query; sharp softmax (large logits).
    attention_case(2, 4, 129, 77, 40, 1.0);
    attention_case(1, 2, 65, 77, 64, 3.0);
    attention_case(1, 1, 1, 77, 40, 1.0);
    attention_case(1, 1, 9, 1, 8, 1.0);
    attention_case(1, 2, 33, 45, 24, 2.0);
}

#[test]
fn attention_reads_strided_inputs() {
    // [B, N, H, d] memory seen as [B, H, N, d] (what splitting heads without a copy gives).
    let (b, h, n, d) = (2, 3, 70, 40);
    let q = randn(&[b, n, h, d], 20).transpose(1, 2).unwrap();
    let k = randn(&[b, n, h, d], 21).transpose(1, 2).unwrap();
    let v = randn(&[b, n, h, d], 22).transpose(1, 2).unwrap();
    let Some(got) = cpu::attention::attention(&q, &k, &v, 0.2).unwrap() else { return };
    let want = attention_reference(&q.contiguous().unwrap(), &k.contiguous().unwrap(), &v.contiguous().unwrap(), 0.2);
    assert!(rel_err(&got.contiguous().unwrap(), &want) < 1e-5);
}

fn group_norm_case(shape: &[usize], groups: usize, silu: bool) {
    let c = shape[1];
    let x = randn(shape, 30).affine(3.0, 1.5).unwrap();
    let (w, b) = (randn(&[c], 31), randn(&[c], 32));
    let weights = [("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())];
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &Device::Cpu);
    let gn = cpu::norm::GroupNorm::new(vb, groups, c, 1e-6).unwrap();
    let act = silu.then_some(easyphoto_diffusion::layers::Activation::Silu);
    let got = gn.forward_act(&x, act).unwrap();
    let mut want = candle_nn::GroupNorm::new(w, b, c, groups, 1e-6).unwrap().forward(&x).unwrap();
    if silu {
        want = want.silu().unwrap();
    }
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "group norm {shape:?} / {groups}, silu {silu}: rel err {err}");
}

#[test]
fn group_norm_matches_candle() {
    group_norm_case(&[2, 64, 9, 7], 32, false);
    group_norm_case(&[2, 64, 9, 7], 32, true);
    group_norm_case(&[1, 12, 33, 17], 4, true);
    group_norm_case(&[3, 6, 5], 3, false);
}

#[test]
fn pointwise_projections_match_conv_and_permute() {
    for (b, cin, cout, h, w) in [(2, 24, 40, 9, 7), (1, 70, 33, 16, 16), (3, 8, 130, 5, 13)] {
        let (x, wt, bias) = (randn(&[b, cin, h, w], 80), randn(&[cout, cin, 1, 1], 81), randn(&[cout], 82));
        let conv = x.conv2d(&wt, 0, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
        let want = conv.permute((0, 2, 3, 1)).unwrap().reshape((b, h * w, cout)).unwrap();
        let got = cpu::pointwise::conv1x1_to_tokens(&x, &wt, Some(&bias)).unwrap().expect("kernel applies");
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "to tokens {b} {cin}->{cout} {h}x{w}: rel err {err}");

        let tokens = randn(&[b, h * w, cin], 83);
        let map = tokens.reshape((b, h, w, cin)).unwrap().permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let want = map.conv2d(&wt, 0, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
        let got =
            cpu::pointwise::conv1x1_from_tokens(&tokens, (h, w), &wt, Some(&bias)).unwrap().expect("kernel applies");
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "from tokens {b} {cin}->{cout} {h}x{w}: rel err {err}");
    }
}

#[test]
fn linear_matches_candle() {
    for (shape, out, bias) in [(vec![2, 37, 24], 40, true), (vec![5, 24], 7, false), (vec![3, 700, 33], 65, true)] {
        let x = randn(&shape, 60);
        let inp = *shape.last().unwrap();
        let (w, b) = (randn(&[out, inp], 61), randn(&[out], 62));
        let got = cpu::linear::linear(&x, &w, bias.then_some(&b)).unwrap().expect("kernel applies");
        let want = candle_nn::Linear::new(w, bias.then_some(b)).forward(&x).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "linear {shape:?} -> {out}: rel err {err}");
    }
}

#[test]
fn linear_geglu_matches_composition() {
    // Several row bands and a last column chunk narrower than the others.
    for (shape, half) in [(vec![2, 1100, 24], 72), (vec![3, 40], 200)] {
        let x = randn(&shape, 70);
        let inp = *shape.last().unwrap();
        let (w, b) = (randn(&[2 * half, inp], 71), randn(&[2 * half], 72));
        let got = cpu::geglu::linear_geglu(&x, &w, Some(&b)).unwrap().expect("kernel applies");
        let h = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
        let (a, gate) = (h.narrow(D::Minus1, 0, half).unwrap(), h.narrow(D::Minus1, half, half).unwrap());
        let want = (a * gate.gelu_erf().unwrap()).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "linear+geglu {shape:?} -> {half}: rel err {err}");
    }
}

#[test]
fn geglu_matches_composition() {
    let h = randn(&[2, 37, 2 * 72], 40);
    let got = cpu::geglu::geglu(&h).unwrap();
    let (x, gate) = (h.narrow(D::Minus1, 0, 72).unwrap(), h.narrow(D::Minus1, 72, 72).unwrap());
    let want = (x * gate.gelu_erf().unwrap()).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "geglu rel err {err}");
}

#[test]
fn geglu_gradient_matches_composition() {
    // Gates across the erf approximation's clamp at ±4·√2 and around zero.
    let h = Var::from_tensor(&(randn(&[2, 37, 2 * 72], 41) * 3.0).unwrap()).unwrap();
    let w = randn(&[2, 37, 72], 42);
    let got = cpu::geglu::geglu(h.as_tensor()).unwrap();
    let (x, gate) = (h.narrow(D::Minus1, 0, 72).unwrap(), h.narrow(D::Minus1, 72, 72).unwrap());
    let want = (x * gate.gelu_erf().unwrap()).unwrap();
    assert!(rel_err(&got, &want) < 1e-5);
    let grad = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap().remove(h.as_tensor()).unwrap();
    let err = rel_err(&grad(got), &grad(want));
    assert!(err < 1e-5, "geglu gradient rel err {err}");
}

#[test]
fn strided_conv_input_gradient_is_the_adjoint() {
    // The downsampler (3×3, stride 2, padding 1) on even and odd maps, and a strided 2×2 without
    // padding whose last column no output reads. The input gradient `g` of `Σ wt ⊙ conv(x)` must
    // satisfy `Σ wt ⊙ conv₀(z) = Σ z ⊙ g` for any `z` (conv₀: without bias), and equal candle's
    // conv2d gradient where candle gets the shape right.
    for (x_dims, k, stride, padding) in [([2, 6, 20, 20], 3, 2, 1), ([1, 5, 21, 19], 3, 2, 1), ([1, 4, 9, 8], 2, 2, 0)]
    {
        let cout = 7;
        let (w, b) = (randn(&[cout, x_dims[1], k, k], 70), randn(&[cout], 71));
        let weights = [("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())];
        let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &Device::Cpu);
        let conv = easyphoto_diffusion::layers::Conv2d::new(vb, x_dims[1], cout, k, stride, padding).unwrap();
        let x = Var::from_tensor(&randn(&x_dims, 72)).unwrap();
        let got = conv.forward(x.as_tensor()).unwrap();
        let plain = |x: &Tensor| x.conv2d(&w, padding, stride, 1, 1).unwrap();
        let biased = plain(x.as_tensor()).broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
        assert!(rel_err(&got, &biased) < 1e-5);
        let wt = randn(got.dims(), 73);
        let grad = |y: Tensor| (y * &wt).unwrap().sum_all().unwrap().backward().unwrap().remove(x.as_tensor()).unwrap();
        let g = grad(got);
        assert_eq!(g.dims(), &x_dims);
        let z = randn(&x_dims, 74);
        let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        let (lhs, rhs) = (sum((plain(&z) * &wt).unwrap()), sum((&z * &g).unwrap()));
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{x_dims:?}: adjoint {lhs} vs {rhs}");
        if x_dims[2] % stride == 0 && x_dims[3] % stride == 0 && padding > 0 {
            let err = rel_err(&g, &grad(biased));
            assert!(err < 1e-5, "{x_dims:?} k{k} s{stride} p{padding}: rel err {err}");
        }
    }
}

#[test]
fn norm_gradients_match_composition() {
    // Group norm (alone and with SiLU) and layer norm with frozen affines, on inputs whose mean
    // is far from zero, against candle's differentiable compositions.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn(&[2, 12, 9, 7], 43).affine(2.0, 3.0).unwrap()).unwrap();
    let w = randn(&[2, 12, 9, 7], 44);
    let grad = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap().remove(x.as_tensor()).unwrap();
    let (gamma, beta) = (randn(&[12], 45), randn(&[12], 46));
    let weights = [("weight".to_string(), gamma.clone()), ("bias".to_string(), beta.clone())];
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &dev);
    let gn = cpu::norm::GroupNorm::new(vb, 3, 12, 1e-6).unwrap();
    for act in [None, Some(easyphoto_diffusion::layers::Activation::Silu)] {
        let got = gn.forward_act(x.as_tensor(), act).unwrap();
        let plain = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), 12, 3, 1e-6).unwrap();
        let mut want = plain.forward(x.as_tensor()).unwrap();
        if act.is_some() {
            want = want.silu().unwrap();
        }
        assert!(rel_err(&got, &want) < 1e-5, "group norm {act:?}");
        let err = rel_err(&grad(got), &grad(want));
        assert!(err < 1e-4, "group norm {act:?} gradient rel err {err}");
    }
    let weights = [("weight".to_string(), randn(&[7], 47)), ("bias".to_string(), randn(&[7], 48))];
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &dev);
    let ln = easyphoto_diffusion::layers::LayerNorm::new(vb, 7, 1e-5).unwrap();
    let got = ln.forward(x.as_tensor()).unwrap();
    let xs = x.as_tensor();
    let mean = xs.mean_keepdim(D::Minus1).unwrap();
    let centred = xs.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let want = centred
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(ln.weight())
        .unwrap()
        .broadcast_add(ln.bias())
        .unwrap();
    assert!(rel_err(&got, &want) < 1e-5, "layer norm");
    let err = rel_err(&grad(got), &grad(want));
    assert!(err < 1e-4, "layer norm gradient rel err {err}");
}

#[test]
fn tracked_inputs_fall_back_and_keep_their_gradients() {
    // With a tracked input every dispatcher must use the differentiable composition.
    let x = Var::from_tensor(&randn(&[1, 4, 6, 6], 50)).unwrap();
    let w = randn(&[4, 4, 3, 3], 51);
    let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
    assert!(cpu::conv::conv2d(x.as_tensor(), &w, None, &cfg).unwrap().is_none());
    let q = Var::from_tensor(&randn(&[1, 1, 5, 8], 52)).unwrap();
    assert!(cpu::attention::attention(q.as_tensor(), &q, &q, 0.3).unwrap().is_none());

    let weights = [("weight".to_string(), randn(&[4], 53)), ("bias".to_string(), randn(&[4], 54))];
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &Device::Cpu);
    let gn = cpu::norm::GroupNorm::new(vb, 2, 4, 1e-6).unwrap();
    let y = gn.forward_act(x.as_tensor(), Some(easyphoto_diffusion::layers::Activation::Silu)).unwrap();
    let h = Var::from_tensor(&randn(&[3, 8], 55)).unwrap();
    let loss = (y.sum_all().unwrap() + cpu::geglu::geglu(h.as_tensor()).unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(h.as_tensor()).is_some());
}

/// `t` rounded to `dtype` and back to f32: the values a half-precision weight holds.
fn rounded(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn half_weights_match_their_f32_values() {
    // f16 / bf16 weights are converted to f32 as the kernels read them: the result equals the
    // f32 kernel on the rounded weights, whichever path (per-task rows or whole weight) runs.
    for dtype in [DType::F16, DType::BF16] {
        let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
        // Winograd, im2col tiled (stride 2), small maps batched, 1×1 in place.
        for (x, cout, k, stride) in [
            (&[2, 40, 50, 49][..], 33, 3, 1),
            (&[2, 6, 41, 35], 9, 3, 2),
            (&[3, 20, 9, 7], 300, 3, 1),
            (&[2, 4, 33, 35], 5, 1, 1),
        ] {
            let cfg = candle_nn::Conv2dConfig { stride, padding: if k == 3 { 1 } else { 0 }, ..cfg };
            let (xt, w, b) = (randn(x, 1), randn(&[cout, x[1], k, k], 2), randn(&[cout], 3));
            let got = cpu::conv::conv2d(&xt, &w.to_dtype(dtype).unwrap(), Some(&b), &cfg).unwrap().expect("applies");
            let want = cpu::conv::conv2d(&xt, &rounded(&w, dtype), Some(&b), &cfg).unwrap().unwrap();
            assert_eq!(got.dtype(), DType::F32);
            let err = rel_err(&got, &want);
            assert!(err < 1e-6, "{dtype:?} conv {x:?} -> {cout} k{k} s{stride}: rel err {err}");
        }
        let x = randn(&[3, 700, 33], 60);
        let (w, b) = (randn(&[130, 33], 61), randn(&[130], 62));
        let got = cpu::linear::linear(&x, &w.to_dtype(dtype).unwrap(), Some(&b)).unwrap().expect("applies");
        let want = candle_nn::Linear::new(rounded(&w, dtype), Some(b.clone())).forward(&x).unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "{dtype:?} linear");
        let got = cpu::geglu::linear_geglu(&x, &w.to_dtype(dtype).unwrap(), Some(&b)).unwrap().expect("applies");
        let want = cpu::geglu::linear_geglu(&x, &rounded(&w, dtype), Some(&b)).unwrap().unwrap();
        assert!(rel_err(&got, &want) < 1e-6, "{dtype:?} linear+geglu");
        let (map, wt) = (randn(&[2, 24, 9, 7], 80), randn(&[40, 24, 1, 1], 81));
        let got =
            cpu::pointwise::conv1x1_to_tokens(&map, &wt.to_dtype(dtype).unwrap(), Some(&b.narrow(0, 0, 40).unwrap()))
                .unwrap()
                .expect("applies");
        let want = cpu::pointwise::conv1x1_to_tokens(&map, &rounded(&wt, dtype), Some(&b.narrow(0, 0, 40).unwrap()))
            .unwrap()
            .unwrap();
        assert!(rel_err(&got, &want) < 1e-6, "{dtype:?} proj_in");
    }
}

#[test]
fn half_models_compute_in_f32() {
    // An f16 input with f16 weights (a model loaded in f16): computed in f32, returned in f16.
    let (x, w, b) = (randn(&[2, 37, 24], 90), randn(&[40, 24], 91), randn(&[40], 92));
    let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let got = cpu::linear::linear(&half(&x), &half(&w), Some(&half(&b))).unwrap().expect("applies");
    assert_eq!(got.dtype(), DType::F16);
    let want = candle_nn::Linear::new(rounded(&w, DType::F16), Some(rounded(&b, DType::F16)))
        .forward(&rounded(&x, DType::F16))
        .unwrap();
    // Only the final rounding to f16 differs (2^-11 relative).
    assert!(rel_err(&got.to_dtype(DType::F32).unwrap(), &want) < 1e-3);
}

#[test]
fn layers_keep_half_weights_and_fall_back_with_tracked_inputs() {
    // Layers of an f32 model with f16 weights (`set_weight_dtype`): the kernels run for plain
    // inputs; with a tracked input (LoRA training) the frozen-layer op runs and its gradient
    // equals that of the candle composition on the rounded weights.
    let weights = [("weight".to_string(), randn(&[12, 8, 3, 3], 4)), ("bias".to_string(), randn(&[12], 5))];
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &Device::Cpu);
    let mut conv = easyphoto_diffusion::layers::Conv2d::new(vb, 8, 12, 3, 1, 1).unwrap();
    conv.set_weight(conv.weight().to_dtype(DType::F16).unwrap()).unwrap();
    let x = randn(&[2, 8, 20, 20], 6);
    let w32 = rounded(&randn(&[12, 8, 3, 3], 4), DType::F16);
    let plain = |x: &Tensor| {
        x.conv2d(&w32, 1, 1, 1, 1).unwrap().broadcast_add(&randn(&[12], 5).reshape((1, 12, 1, 1)).unwrap()).unwrap()
    };
    assert!(rel_err(&conv.forward(&x).unwrap(), &plain(&x)) < 1e-5);
    let xv = Var::from_tensor(&x).unwrap();
    let got = conv.forward(xv.as_tensor()).unwrap();
    assert!(rel_err(&got, &plain(&x)) < 1e-5);
    let grad = got.sqr().unwrap().sum_all().unwrap().backward().unwrap().remove(xv.as_tensor()).unwrap();
    let xw = Var::from_tensor(&x).unwrap();
    let want =
        plain(xw.as_tensor()).sqr().unwrap().sum_all().unwrap().backward().unwrap().remove(xw.as_tensor()).unwrap();
    assert!(rel_err(&grad, &want) < 1e-5);
}
