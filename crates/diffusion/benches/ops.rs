//! Criterion micro-benches of the CPU kernels (`easyphoto_diffusion::cpu`) against the candle
//! paths they replace, on SD1.5 shapes (batch 2 at 64×64 latents, the VAE at 512²).
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p easyphoto-diffusion --bench ops [-- FILTER]`
//!
//! Each group has a `candle` and a `kernel` function; see BENCHMARKS.md for the ratios.

use std::time::Duration;

use candle_core::{D, DType, Device, Module, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use easyphoto_diffusion::cpu;
use easyphoto_diffusion::layers::Activation;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn conv(c: &mut Criterion, name: &str, x: &[usize], cout: usize, k: usize, stride: usize, padding: usize) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    let (xt, w, b) = (randn(x), randn(&[cout, x[1], k, k]), randn(&[cout]));
    let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
    let candle_conv = candle_nn::Conv2d::new(w.clone(), Some(b.clone()), cfg);
    group.bench_function("candle", |bench| bench.iter(|| candle_conv.forward(&xt).unwrap()));
    group.bench_function("kernel", |bench| bench.iter(|| cpu::conv::conv2d(&xt, &w, Some(&b), &cfg).unwrap().unwrap()));
    group.finish();
}

fn convs(c: &mut Criterion) {
    conv(c, "conv3x3 [2,320,64,64]->320", &[2, 320, 64, 64], 320, 3, 1, 1);
    conv(c, "conv3x3 [2,640,32,32]->640", &[2, 640, 32, 32], 640, 3, 1, 1);
    conv(c, "conv3x3 [2,1280,16,16]->1280", &[2, 1280, 16, 16], 1280, 3, 1, 1);
    conv(c, "conv3x3 [2,1280,8,8]->1280", &[2, 1280, 8, 8], 1280, 3, 1, 1);
    conv(c, "conv3x3/s2 [2,320,64,64]->320", &[2, 320, 64, 64], 320, 3, 2, 1);
    conv(c, "conv1x1 [2,320,64,64]->320", &[2, 320, 64, 64], 320, 1, 1, 0);
    conv(c, "conv3x3 VAE [1,128,512,512]->128", &[1, 128, 512, 512], 128, 3, 1, 1);
    conv(c, "conv3x3 VAE [1,512,128,128]->512", &[1, 512, 128, 128], 512, 3, 1, 1);
}

fn attention(c: &mut Criterion, name: &str, (b, h, n, m, d): (usize, usize, usize, usize, usize)) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    let (q, k, v) = (randn(&[b, h, n, d]), randn(&[b, h, m, d]), randn(&[b, h, m, d]));
    let scale = (d as f64).powf(-0.5);
    group.bench_function("candle", |bench| {
        bench.iter(|| {
            let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
            candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&v).unwrap()
        })
    });
    group.bench_function("kernel", |bench| {
        bench.iter(|| cpu::attention::attention(&q, &k, &v, scale).unwrap().unwrap())
    });
    group.finish();
}

/// Forward and backward of the training attention (LoRA training's self-attention shapes).
fn attention_backward(c: &mut Criterion, name: &str, (b, h, n, m, d): (usize, usize, usize, usize, usize)) {
    // As in training (see `train_step`): freed outputs stay in the heap.
    cpu::keep_freed_memory();
    let mut group = c.benchmark_group(name);
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    let var = |len| candle_core::Var::from_tensor(&randn(&[b, len, h * d])).unwrap();
    let (q, k, v, w) = (var(n), var(m), var(m), randn(&[b, n, h * d]));
    let scale = (d as f64).powf(-0.5);
    group.bench_function("kernel", |bench| {
        bench.iter(|| {
            let out = cpu::attention_backward::attention(&q, &k, &v, h, scale).unwrap().unwrap();
            (out * &w).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.finish();
}

/// Forward and backward of a linear layer with a trained rank-128 LoRA (LoRA training's shapes).
fn low_rank(c: &mut Criterion, name: &str, (rows, inp, out): (usize, usize, usize)) {
    // As in training (see `train_step`): freed outputs stay in the heap.
    cpu::keep_freed_memory();
    let mut group = c.benchmark_group(name);
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let var = |shape: &[usize]| candle_core::Var::from_tensor(&(randn(shape) * 0.1).unwrap()).unwrap();
    let (x, down, up) = (var(&[1, rows, inp]), var(&[128, inp]), var(&[out, 128]));
    let (w, b, wt) = (randn(&[out, inp]), randn(&[out]), randn(&[1, rows, out]));
    group.bench_function("kernel", |bench| {
        bench.iter(|| {
            let y = cpu::low_rank::linear(&x, &w, Some(&b), &down, &up, 0.5).unwrap().unwrap();
            (y * &wt).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.finish();
}

fn attentions(c: &mut Criterion) {
    low_rank(c, "linear+lora fwd+bwd [1024,128]->128", (1024, 128, 128));
    low_rank(c, "linear+lora fwd+bwd [1024,128]->1024", (1024, 128, 1024));
    attention_backward(c, "attention fwd+bwd [1,8,1024,16]", (1, 8, 1024, 1024, 16));
    attention_backward(c, "attention fwd+bwd [1,8,4096,40]", (1, 8, 4096, 4096, 40));
    attention(c, "attention self [2,8,4096,40]", (2, 8, 4096, 4096, 40));
    attention(c, "attention self [2,8,1024,80]", (2, 8, 1024, 1024, 80));
    attention(c, "attention cross [2,8,4096,40]x77", (2, 8, 4096, 77, 40));
    attention(c, "attention VAE [1,1,4096,512]", (1, 1, 4096, 4096, 512));
}

fn norms(c: &mut Criterion) {
    let mut group = c.benchmark_group("group_norm+silu [2,320,64,64]");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (x, w, b) = (randn(&[2, 320, 64, 64]), randn(&[320]), randn(&[320]));
    let plain = candle_nn::GroupNorm::new(w.clone(), b.clone(), 320, 32, 1e-5).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(
        [("weight".to_string(), w), ("bias".to_string(), b)].into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    );
    let fused = cpu::norm::GroupNorm::new(vb, 32, 320, 1e-5).unwrap();
    group.bench_function("candle", |bench| bench.iter(|| plain.forward(&x).unwrap().silu().unwrap()));
    group.bench_function("kernel", |bench| bench.iter(|| fused.forward_act(&x, Some(Activation::Silu)).unwrap()));
    group.finish();

    let mut group = c.benchmark_group("geglu [2,4096,2560]");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let h = randn(&[2, 4096, 2560]);
    group.bench_function("candle", |bench| {
        bench.iter(|| {
            let (x, gate) = (h.narrow(D::Minus1, 0, 1280).unwrap(), h.narrow(D::Minus1, 1280, 1280).unwrap());
            (x * gate.gelu_erf().unwrap()).unwrap()
        })
    });
    group.bench_function("kernel", |bench| bench.iter(|| cpu::geglu::geglu(&h).unwrap()));
    group.finish();
}

fn linears(c: &mut Criterion) {
    for (name, rows, inp, out) in
        [("linear [2,4096,320]->320", 8192, 320, 320), ("linear [2,256,1280]->1280", 512, 1280, 1280)]
    {
        let mut group = c.benchmark_group(name);
        group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        let x = randn(&[2, rows / 2, inp]);
        let lin = candle_nn::Linear::new(randn(&[out, inp]), Some(randn(&[out])));
        group.bench_function("candle", |bench| bench.iter(|| lin.forward(&x).unwrap()));
        group.bench_function("kernel", |bench| {
            bench.iter(|| cpu::linear::linear(&x, lin.weight(), lin.bias()).unwrap().unwrap())
        });
        group.finish();
    }

    let mut group = c.benchmark_group("ff proj+geglu [2,4096,320]->1280");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    let x = randn(&[2, 4096, 320]);
    let lin = candle_nn::Linear::new(randn(&[2560, 320]), Some(randn(&[2560])));
    group.bench_function("candle", |bench| {
        bench.iter(|| {
            let h = lin.forward(&x).unwrap();
            let (a, gate) = (h.narrow(D::Minus1, 0, 1280).unwrap(), h.narrow(D::Minus1, 1280, 1280).unwrap());
            (a * gate.gelu_erf().unwrap()).unwrap()
        })
    });
    group.bench_function("kernel", |bench| {
        bench.iter(|| cpu::geglu::linear_geglu(&x, lin.weight(), lin.bias()).unwrap().unwrap())
    });
    group.finish();

    let mut group = c.benchmark_group("proj_in 1x1 to tokens [2,320,64,64]");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let (x, w, b) = (randn(&[2, 320, 64, 64]), randn(&[320, 320, 1, 1]), randn(&[320]));
    let conv = candle_nn::Conv2d::new(w.clone(), Some(b.clone()), Default::default());
    group.bench_function("candle", |bench| {
        bench.iter(|| conv.forward(&x).unwrap().permute((0, 2, 3, 1)).unwrap().reshape((2, 4096, 320)).unwrap())
    });
    group.bench_function("kernel", |bench| {
        bench.iter(|| cpu::pointwise::conv1x1_to_tokens(&x, &w, Some(&b)).unwrap().unwrap())
    });
    group.finish();
}

criterion_group!(benches, convs, attentions, norms, linears);
criterion_main!(benches);
