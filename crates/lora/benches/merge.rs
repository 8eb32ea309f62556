//! Merge time of a rank-128 LoRA (EasyPhoto's: 192 UNet + 72 text-encoder modules) into the
//! full-size SD1.5 UNet and CLIP-L (random weights, f32), and of the exact un-merge. Prints one
//! JSON line (median of the runs).
//!
//! `cargo bench -p easyphoto-lora --bench merge`   (env: RUNS=5, RAYON_NUM_THREADS)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::diffusers_folder::read_config;
use easyphoto_diffusion::weights::random_var_builder;
use easyphoto_diffusion::{CLIPTextModel, UNet2DConditionModel};
use easyphoto_lora::network::is_target;
use easyphoto_lora::{KohyaLora, KohyaModule, KohyaPrefix, Slot, Targets, kohya_name, merge};

fn main() {
    // Freed weights stay in the heap for the next merge (the diffusion crate's cpu::alloc).
    easyphoto_diffusion::cpu::keep_freed_memory();
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/configs");
    let device = Device::Cpu;
    let mut unet = UNet2DConditionModel::new(
        random_var_builder(DType::F32, &device),
        &read_config(&configs.join("sd15_unet.json")).unwrap(),
    )
    .unwrap();
    let mut te = CLIPTextModel::new(
        random_var_builder(DType::F32, &device),
        &read_config(&configs.join("clip_l.json")).unwrap(),
    )
    .unwrap();
    let runs: usize = std::env::var("RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);

    // A random rank-128 LoRA on EasyPhoto's targets, stored in f16 as EasyPhoto's files are.
    let rank = 128;
    let mut modules = BTreeMap::new();
    let mut add = |slot: Slot, prefix: KohyaPrefix, path: &str, weight: &[usize]| {
        if !is_target(slot, path) {
            return;
        }
        let mut down_shape = vec![rank];
        down_shape.extend_from_slice(&weight[1..]);
        let up_shape = if weight.len() == 4 { vec![weight[0], rank, 1, 1] } else { vec![weight[0], rank] };
        let down = Tensor::randn(0f32, 0.01, down_shape, &device).unwrap().to_dtype(DType::F16).unwrap();
        let up = Tensor::randn(0f32, 0.01, up_shape, &device).unwrap().to_dtype(DType::F16).unwrap();
        modules.insert(kohya_name(prefix, path), KohyaModule { down, up, alpha: Some(64.0) });
    };
    use easyphoto_diffusion::{LayerMut, VisitLayers};
    for (slot, prefix, model) in [
        (Slot::Unet, KohyaPrefix::Unet, &mut unet as &mut dyn VisitLayers),
        (Slot::TextEncoder, KohyaPrefix::TextEncoder, &mut te as &mut dyn VisitLayers),
    ] {
        model.visit_layers(&mut |layer| match layer {
            LayerMut::Linear(l) => add(slot, prefix, l.path(), l.weight().dims()),
            LayerMut::Conv2d(c) => add(slot, prefix, c.path(), c.weight().dims()),
        });
    }
    let lora = KohyaLora::new("random rank-128", modules, BTreeMap::new());
    assert_eq!(lora.len(), 192 + 72);

    let (mut merge_times, mut merge_cpu, mut unmerge_times) = (vec![], vec![], vec![]);
    for _ in 0..=runs {
        let mut targets = Targets { unet: Some(&mut unet), text_encoder: Some(&mut te), text_encoder_2: None };
        let (start, cpu) = (Instant::now(), easyphoto_diffusion::cpu::profile::process_cpu_time().as_secs_f64());
        let (merged, reports) = merge(&mut targets, &[(&lora, 0.9)]).unwrap();
        merge_times.push(start.elapsed().as_secs_f64());
        merge_cpu.push(easyphoto_diffusion::cpu::profile::process_cpu_time().as_secs_f64() - cpu);
        assert_eq!(reports[0].applied, 264);
        let start = Instant::now();
        merged.unmerge(&mut targets).unwrap();
        unmerge_times.push(start.elapsed().as_secs_f64());
    }
    // The first run is the warm-up.
    let median = |v: &mut Vec<f64>| {
        v.remove(0);
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"bench\": \"merge_rank128_sd15\", \"modules\": {}, \"merge_median_s\": {:.4}, \"merge_cpu_median_s\": {:.2}, \"unmerge_median_s\": {:.4}, \"runs\": {runs}, \"threads\": {}}}",
        lora.len(),
        median(&mut merge_times),
        median(&mut merge_cpu),
        median(&mut unmerge_times),
        rayon_threads()
    );
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
