//! Times the CPU kernels (`easyphoto_diffusion::cpu`) and the candle paths they replace on SD1.5
//! shapes, reporting both the best wall time and the CPU time per call. On a machine shared with
//! other jobs the CPU time (summed over this process's threads, from `/proc/self/task/*/schedstat`)
//! is the steadier number: divided by the thread count it estimates the wall time on an idle
//! machine (rayon's brief spinning makes it a slight overestimate with several threads).
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p easyphoto-diffusion --example kernel_timing -- [FILTER]
//! ```

use std::time::{Duration, Instant};

use candle_core::{D, DType, Device, Module, Tensor};
use easyphoto_diffusion::cpu;
use easyphoto_diffusion::layers::Activation;

/// CPU time of all threads of this process (Linux; zero elsewhere).
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

fn time(name: &str, mut f: impl FnMut() -> Tensor) {
    f();
    let mut walls = vec![];
    let (cpu0, start) = (cpu_ns(), Instant::now());
    while walls.len() < 3 || start.elapsed() < Duration::from_secs(2) && walls.len() < 50 {
        let t = Instant::now();
        f();
        walls.push(t.elapsed().as_secs_f64());
    }
    let cpu = (cpu_ns() - cpu0) as f64 / 1e9 / walls.len() as f64;
    walls.sort_by(f64::total_cmp);
    println!(
        "{name:<44} wall min {:>8.2} ms  median {:>8.2} ms  cpu {:>8.2} ms/call  ({} calls)",
        walls[0] * 1e3,
        walls[walls.len() / 2] * 1e3,
        cpu * 1e3,
        walls.len()
    );
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    let want = |name: &str| name.contains(&filter);
    // (name, input shape, output channels, kernel, stride, padding)
    type ConvCase = (&'static str, [usize; 4], usize, usize, usize, usize);
    let convs: [ConvCase; 8] = [
        ("conv3x3 [2,320,64,64]->320", [2, 320, 64, 64], 320, 3, 1, 1),
        ("conv3x3 [2,640,32,32]->640", [2, 640, 32, 32], 640, 3, 1, 1),
        ("conv3x3 [2,1280,16,16]->1280", [2, 1280, 16, 16], 1280, 3, 1, 1),
        ("conv3x3 [2,1280,8,8]->1280", [2, 1280, 8, 8], 1280, 3, 1, 1),
        ("conv3x3/s2 [2,320,64,64]->320", [2, 320, 64, 64], 320, 3, 2, 1),
        ("conv1x1 [2,320,64,64]->320", [2, 320, 64, 64], 320, 1, 1, 0),
        ("conv3x3 VAE [1,128,512,512]->128", [1, 128, 512, 512], 128, 3, 1, 1),
        ("conv3x3 VAE [1,512,128,128]->512", [1, 512, 128, 128], 512, 3, 1, 1),
    ];
    for (name, x, cout, k, stride, padding) in convs {
        if !want(name) {
            continue;
        }
        let (xt, w, b) = (randn(&x), randn(&[cout, x[1], k, k]), randn(&[cout]));
        let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
        let plain = candle_nn::Conv2d::new(w.clone(), Some(b.clone()), cfg);
        if std::env::var_os("SKIP_CANDLE").is_none() {
            time(&format!("{name} candle"), || plain.forward(&xt).unwrap());
        }
        time(&format!("{name} kernel"), || cpu::conv::conv2d(&xt, &w, Some(&b), &cfg).unwrap().unwrap());
    }
    let attns = [
        ("attention self [2,8,4096,40]", (2, 8, 4096, 4096, 40)),
        ("attention self [2,8,1024,80]", (2, 8, 1024, 1024, 80)),
        ("attention cross [2,8,4096,40]x77", (2, 8, 4096, 77, 40)),
        ("attention VAE [1,1,4096,512]", (1, 1, 4096, 4096, 512)),
    ];
    for (name, (b, h, n, m, d)) in attns {
        if !want(name) {
            continue;
        }
        let (q, k, v) = (randn(&[b, h, n, d]), randn(&[b, h, m, d]), randn(&[b, h, m, d]));
        let scale = (d as f64).powf(-0.5);
        if std::env::var_os("SKIP_CANDLE").is_none() {
            time(&format!("{name} candle"), || {
                let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
                candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&v).unwrap()
            });
        }
        time(&format!("{name} kernel"), || cpu::attention::attention(&q, &k, &v, scale).unwrap().unwrap());
    }
    let linears = [
        ("linear [2,4096,320]->320", (8192, 320, 320)),
        ("linear [2,4096,320]->2560", (8192, 320, 2560)),
        ("linear [2,4096,1280]->320", (8192, 1280, 320)),
        ("linear [2,256,1280]->1280", (512, 1280, 1280)),
    ];
    for (name, (rows, i, o)) in linears {
        if !want(name) {
            continue;
        }
        let x = randn(&[2, rows / 2, i]);
        let lin = candle_nn::Linear::new(randn(&[o, i]), Some(randn(&[o])));
        if std::env::var_os("SKIP_CANDLE").is_none() {
            time(&format!("{name} candle"), || lin.forward(&x).unwrap());
        }
        time(&format!("{name} kernel"), || cpu::linear::linear(&x, lin.weight(), lin.bias()).unwrap().unwrap());
    }
    for (name, shape) in [
        ("group_norm+silu [2,320,64,64]", [2, 320, 64, 64]),
        ("group_norm+silu VAE [1,128,512,512]", [1, 128, 512, 512]),
    ] {
        if !want(name) {
            continue;
        }
        let c = shape[1];
        let (x, w, b) = (randn(&shape), randn(&[c]), randn(&[c]));
        let plain = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, 32, 1e-5).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(
            [("weight".to_string(), w), ("bias".to_string(), b)].into_iter().collect(),
            DType::F32,
            &Device::Cpu,
        );
        let fused = cpu::norm::GroupNorm::new(vb, 32, c, 1e-5).unwrap();
        time(&format!("{name} candle"), || plain.forward(&x).unwrap().silu().unwrap());
        time(&format!("{name} kernel"), || fused.forward_act(&x, Some(Activation::Silu)).unwrap());
    }
    if want("copies") {
        let x = randn(&[2, 320, 64, 64]);
        let y = randn(&[2, 320, 64, 64]);
        let t = randn(&[2, 4096, 320]);
        time("copies: NCHW->tokens [2,320,64,64]", || {
            x.permute((0, 2, 3, 1)).unwrap().reshape((2, 4096, 320)).unwrap()
        });
        time("copies: split heads [2,4096,320]", || {
            t.reshape((2, 4096, 8, 40)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        });
        time("copies: add [2,320,64,64]", || (&x + &y).unwrap());
        time("copies: upsample2x [2,320,32,32]", || {
            let z = x.narrow(2, 0, 32).unwrap().narrow(3, 0, 32).unwrap().contiguous().unwrap();
            z.unsqueeze(3)
                .unwrap()
                .unsqueeze(5)
                .unwrap()
                .broadcast_as((2, 320, 32, 2, 32, 2))
                .unwrap()
                .reshape((2, 320, 64, 64))
                .unwrap()
        });
        time("copies: cat [2,320,64,64]x2 dim1", || Tensor::cat(&[&x, &y], 1).unwrap());
    }
    if want("ff") {
        let x = randn(&[2, 4096, 320]);
        let lin = candle_nn::Linear::new((randn(&[2560, 320]) * 0.05).unwrap(), Some(randn(&[2560])));
        time("ff proj+geglu [2,4096,320]->1280 separate", || {
            cpu::geglu::geglu(&cpu::linear::linear(&x, lin.weight(), lin.bias()).unwrap().unwrap()).unwrap()
        });
        time("ff proj+geglu [2,4096,320]->1280 fused", || {
            cpu::geglu::linear_geglu(&x, lin.weight(), lin.bias()).unwrap().unwrap()
        });
    }
    if want("geglu") {
        let h = randn(&[2, 4096, 2560]);
        time("geglu [2,4096,2560] candle", || {
            let (x, gate) = (h.narrow(D::Minus1, 0, 1280).unwrap(), h.narrow(D::Minus1, 1280, 1280).unwrap());
            (x * gate.gelu_erf().unwrap()).unwrap()
        });
        time("geglu [2,4096,2560] kernel", || cpu::geglu::geglu(&h).unwrap());
    }
}
