//! LoRA training: one step against PyTorch + peft (fixture from
//! `tools/reference/lora_train_step.py`), the loss going down over a few hundred steps,
//! cancellation and resume (in process and after SIGKILL of a child process) ending with the
//! weights of an uninterrupted run, NaN detection, EasyPhoto's defaults and the SDXL config.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, tensors};
use easyphoto_diffusion::diffusers_folder::{
    load_clip_text_model, load_clip_text_model_with_projection, load_unet, load_vae,
};
use easyphoto_diffusion::schedulers::DdpmScheduler;
use easyphoto_diffusion::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel, UNetConditioning,
};
use easyphoto_lora::adamw::{AdamW, clip_grad_norm};
use easyphoto_lora::{
    Callbacks, KohyaLora, LoraError, LoraNetwork, SdxlTrainModels, Targets, TrainConfig, TrainImage, TrainModels,
    diffusion_loss, merge, sdxl_text_conditioning, train, train_sdxl,
};
use rand::SeedableRng;

fn unet() -> UNet2DConditionModel {
    load_unet(&fixture("apply/sd15_unet"), None, DType::F32, &Device::Cpu).unwrap()
}

fn text_encoder() -> CLIPTextModel {
    load_clip_text_model(&fixture("apply/sd15_te"), None, DType::F32, &Device::Cpu).unwrap()
}

fn vae() -> AutoencoderKL {
    load_vae(&fixture("train/vae"), None, DType::F32, &Device::Cpu).unwrap()
}

fn sdxl_models() -> (UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection) {
    let dev = &Device::Cpu;
    (
        load_unet(&fixture("apply/sdxl_unet"), None, DType::F32, dev).unwrap(),
        load_clip_text_model(&fixture("apply/sdxl_te1"), None, DType::F32, dev).unwrap(),
        load_clip_text_model_with_projection(&fixture("apply/sdxl_te2"), None, DType::F32, dev).unwrap(),
    )
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().get(0).unwrap().to_scalar().unwrap()
}

#[test]
fn one_step_matches_pytorch_peft() {
    let io = tensors("train/step_io.safetensors");
    let init = KohyaLora::load(fixture("train/step_init.safetensors"), &Device::Cpu).unwrap();
    let mut unet = unet();
    let network = LoraNetwork::from_lora(&mut Targets { unet: Some(&mut unet), ..Default::default() }, &init).unwrap();
    assert_eq!(network.modules().len(), 48, "4 transformer blocks x 12 modules");
    network.attach(&mut Targets { unet: Some(&mut unet), ..Default::default() }, 1.0);

    let config = TrainConfig::default();
    let scheduler = DdpmScheduler::new(config.noise_scheduler.clone()).unwrap();
    let timesteps: Vec<usize> = io["timesteps"].to_vec1::<f32>().unwrap().iter().map(|&t| t as usize).collect();
    let loss = diffusion_loss(
        &unet,
        &scheduler,
        &io["latents"],
        &io["noise"],
        &timesteps,
        &io["encoder_hidden_states"],
        &UNetConditioning::default(),
    )
    .unwrap();
    let (got, want) = (loss.to_scalar::<f32>().unwrap(), scalar(&io["loss"]));
    println!("loss {got} vs {want}: error {:e}", (got - want).abs());
    assert!((got - want).abs() <= 1e-5);

    let store = loss.backward().unwrap();
    let params: Vec<(&Var, f64)> = network.modules().iter().flat_map(|m| [(&m.down, 1.0), (&m.up, 1.0)]).collect();
    let names: Vec<String> =
        network.modules().iter().flat_map(|m| [format!("{}.down", m.name), format!("{}.up", m.name)]).collect();
    let mut grads: Vec<Tensor> = params.iter().map(|(p, _)| store.get(p.as_tensor()).unwrap().clone()).collect();
    let mut worst = 0f32;
    for (g, name) in grads.iter().zip(&names) {
        worst = worst.max(common::max_abs(g, &io[&format!("grad.{name}")]));
    }
    println!("gradients ({} tensors): max abs error {worst:e}", grads.len());
    assert!(worst <= 1e-4);

    let norm = clip_grad_norm(&mut grads, f64::from(scalar(&io["max_norm"]))).unwrap();
    println!("grad norm {norm} vs {}", scalar(&io["grad_norm"]));
    assert!((norm as f32 - scalar(&io["grad_norm"])).abs() <= 1e-5);

    let lr = f64::from(scalar(&io["lr"]));
    let params: Vec<(&Var, f64)> = params.iter().map(|(p, _)| (*p, lr)).collect();
    let vars: Vec<&Var> = params.iter().map(|(p, _)| *p).collect();
    let mut opt = AdamW::new(config.adam, &vars).unwrap();
    opt.step(&params, &grads).unwrap();
    let mut worst = 0f32;
    for ((p, _), name) in params.iter().zip(&names) {
        worst = worst.max(common::max_abs(p.as_tensor(), &io[&format!("after.{name}")]));
    }
    println!("AdamW-updated weights: max abs error {worst:e}");
    assert!(worst <= 1e-4);
    // The step moved the weights far more than the tolerance: the comparison is meaningful.
    let mut moved = 0f32;
    for m in network.modules() {
        let start = init.get(&m.name).unwrap();
        moved = moved
            .max(common::max_abs(m.down.as_tensor(), &start.down))
            .max(common::max_abs(m.up.as_tensor(), &start.up));
    }
    println!("largest change made by the step: {moved:e}");
    assert!(moved > 5e-4);
}

/// A handful of generated 12x10 images: colour gradients with a bright square.
fn images(n: usize) -> Vec<TrainImage> {
    (0..n)
        .map(|k| {
            let image = image::RgbImage::from_fn(12, 10, |x, y| {
                let square = (x / 4 + y / 4 + k as u32).is_multiple_of(3);
                let v = |c: u32| ((c * 20 + 40 * k as u32) % 256) as u8;
                if square { image::Rgb([250, 240, 30]) } else { image::Rgb([v(x), v(y), v(x + y)]) }
            });
            TrainImage { image, input_ids: vec![49406 % 1000, 10 + k as u32, 20, 999] }
        })
        .collect()
}

fn tiny_config() -> TrainConfig {
    TrainConfig {
        rank: 4,
        network_alpha: 2.0,
        resolution: 8,
        train_batch_size: 1,
        gradient_accumulation_steps: 2,
        checkpointing_steps: 2,
        max_train_steps: Some(6),
        seed: 7,
        ..TrainConfig::default()
    }
}

fn run(dir: &Path, config: &TrainConfig, callbacks: Callbacks) -> Result<easyphoto_lora::Trained, LoraError> {
    let (mut unet, mut te, vae) = (unet(), text_encoder(), vae());
    train(TrainModels { unet: &mut unet, text_encoder: &mut te, vae: &vae }, &images(3), config, dir, callbacks)
}

fn weights(path: &Path) -> KohyaLora {
    KohyaLora::load(path, &Device::Cpu).unwrap()
}

fn assert_same_lora(a: &KohyaLora, b: &KohyaLora) {
    assert_eq!(a.len(), b.len());
    for (name, m) in a.modules() {
        let n = b.get(name).unwrap();
        assert_eq!(common::max_abs(&m.down, &n.down) + common::max_abs(&m.up, &n.up), 0.0, "{name}");
    }
}

#[test]
fn easyphoto_defaults_and_overrides() {
    let c = TrainConfig::default();
    assert_eq!((c.rank, c.network_alpha, c.unet_lr, c.text_encoder_lr), (128, 64.0, 1e-4, 5e-5));
    assert_eq!(
        (c.adam.adam_beta1, c.adam.adam_beta2, c.adam.adam_weight_decay, c.adam.adam_epsilon),
        (0.9, 0.999, 1e-2, 1e-8)
    );
    assert_eq!((c.max_grad_norm, c.train_batch_size, c.gradient_accumulation_steps), (1.0, 1, 4));
    assert_eq!((c.steps_for(1), c.steps_for(3), c.steps_for(15)), (200, 600, 800));
    assert_eq!((c.resolution, c.random_flip, c.center_crop, c.train_text_encoder), (512, true, false, true));
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains("\"adam_weight_decay\":0.01") && json.contains("\"scaled_linear\""), "{json}");
    let over: TrainConfig = serde_json::from_str(
        r#"{"rank": 16, "unet_lr": 0.001, "noise_scheduler": {"prediction_type": "v_prediction"}}"#,
    )
    .unwrap();
    assert_eq!((over.rank, over.unet_lr, over.network_alpha), (16, 1e-3, 64.0));
    let bad = TrainConfig { lr_scheduler: "cosine".into(), ..TrainConfig::default() };
    assert!(matches!(bad.validate(), Err(LoraError::Config { field, .. }) if field == "lr_scheduler"));
    let x = TrainConfig::sdxl();
    assert_eq!(
        (x.rank, x.network_alpha, x.resolution, x.steps_for(2), x.train_text_encoder),
        (32, 16.0, 1024, 600, false)
    );
}

#[test]
fn targets_are_transformer_and_text_encoder_linears() {
    let (mut unet, mut te) = (unet(), text_encoder());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut targets = Targets { unet: Some(&mut unet), text_encoder: Some(&mut te), text_encoder_2: None };
    let net = LoraNetwork::new(&mut targets, 8, 4.0, &mut rng).unwrap();
    let unet_n = net.modules().iter().filter(|m| m.name.starts_with("lora_unet_")).count();
    let te_n = net.modules().iter().filter(|m| m.name.starts_with("lora_te_")).count();
    // 4 transformer blocks x (proj_in, proj_out, 8 attention linears, 2 feed-forward) and
    // 2 CLIP layers x (q, k, v, out, fc1, fc2): the per-block counts of SD1.5's 192 + 72.
    assert_eq!((unet_n, te_n), (48, 12));
    for m in net.modules() {
        assert_eq!(m.up.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let fan_in: usize = m.down.dims()[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let max: f32 = m.down.as_tensor().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(max <= bound && max > 0.5 * bound, "{}: {max} vs {bound}", m.name);
    }
    assert!(net.modules().iter().any(|m| m.name.ends_with("proj_in") && m.down.dims().len() == 4));
}

#[test]
fn loss_goes_down_over_a_few_hundred_steps() {
    let dir = common::temp_dir("train_loss");
    let config = TrainConfig {
        max_train_steps: Some(300),
        gradient_accumulation_steps: 1,
        checkpointing_steps: 1000,
        unet_lr: 2e-3,
        text_encoder_lr: 1e-3,
        ..tiny_config()
    };
    let mut losses = vec![];
    let mut progress = |p: &easyphoto_lora::Progress| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    };
    let out = run(&dir, &config, Callbacks { progress: Some(&mut progress), checkpoint: None }).unwrap();
    assert_eq!(out.checkpoints.len(), 1, "only the last step is checkpointed");
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..50]), mean(&losses[250..]));
    println!("mean loss of steps 1-50: {first}, of steps 251-300: {last}");
    assert!(last < 0.7 * first, "{first} -> {last}");
}

#[test]
fn cancelled_run_resumes_to_the_uninterrupted_weights() {
    let config = tiny_config();
    let full = common::temp_dir("train_full");
    let mut seen = vec![];
    let mut on_checkpoint = |p: &Path, step: usize| seen.push((step, p.to_path_buf()));
    let a = run(&full, &config, Callbacks { progress: None, checkpoint: Some(&mut on_checkpoint) }).unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [2, 4, 6]);
    assert!(a.last_loss.is_finite());

    let dir = common::temp_dir("train_cancelled");
    let mut stop_at_3 =
        |p: &easyphoto_lora::Progress| if p.step == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
    let err = run(&dir, &config, Callbacks { progress: Some(&mut stop_at_3), checkpoint: None }).unwrap_err();
    assert!(matches!(err, LoraError::Cancelled { step: 3 }), "{err}");
    let b = run(&dir, &config, Callbacks::default()).unwrap();
    assert_eq!(b.resumed_from, 2);
    assert_same_lora(&weights(&a.last_checkpoint), &weights(&b.last_checkpoint));
    // The checkpoint is a kohya file with EasyPhoto's metadata, in f16.
    let lora = weights(&a.last_checkpoint);
    assert_eq!(lora.metadata()["ss_network_dim"], "4");
    assert!(lora.modules().all(|(_, m)| m.down.dtype() == DType::F16 && m.alpha == Some(2.0)));
}

/// Env var that turns [`child_training_process`] into the training child of
/// [`killed_run_resumes_to_the_uninterrupted_weights`].
const CHILD_DIR: &str = "EASYPHOTO_LORA_TRAIN_CHILD_DIR";

/// The child process: trains slowly (a pause after each step) until its parent kills it.
/// Without the env var (a normal test run) it only checks that the pause is harmless: one step.
#[test]
fn child_training_process() {
    let (dir, steps) = match std::env::var(CHILD_DIR) {
        Ok(dir) => (std::path::PathBuf::from(dir), tiny_config().max_train_steps),
        Err(_) => (common::temp_dir("train_child_alone"), Some(1)),
    };
    let config = TrainConfig { max_train_steps: steps, ..tiny_config() };
    let mut slow = |_: &easyphoto_lora::Progress| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        ControlFlow::Continue(())
    };
    let out = run(&dir, &config, Callbacks { progress: Some(&mut slow), checkpoint: None }).unwrap();
    assert!(out.last_checkpoint.exists());
}

#[test]
fn killed_run_resumes_to_the_uninterrupted_weights() {
    let config = tiny_config();
    let full = common::temp_dir("train_full_for_kill");
    let a = run(&full, &config, Callbacks::default()).unwrap();

    let dir = common::temp_dir("train_killed");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_training_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the step-2 checkpoint, then kill (SIGKILL) the child in the middle of step 3 or 4.
    let state = dir.join(easyphoto_lora::trainer::STATE_FILE);
    let start = std::time::Instant::now();
    while !state.exists() {
        assert!(start.elapsed().as_secs() < 120, "the child wrote no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    let done: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    println!("after the kill: {done:?}");
    assert!(!done.iter().any(|n| n == "checkpoint-6.safetensors"), "killed too late: {done:?}");
    // Every file left is complete (atomic writes): each parses.
    for name in done.iter().filter(|n| n.starts_with("checkpoint-")) {
        weights(&dir.join(name));
    }

    let b = run(&dir, &config, Callbacks::default()).unwrap();
    assert!(b.resumed_from >= 2, "resumed from {}", b.resumed_from);
    assert_same_lora(&weights(&a.last_checkpoint), &weights(&b.last_checkpoint));
}

#[test]
fn non_finite_loss_is_a_typed_error() {
    let dir = common::temp_dir("train_nan");
    let mut config = tiny_config();
    // betas above 1 make alphas_cumprod negative: sqrt gives NaN noisy latents.
    config.noise_scheduler.beta_start = 1.5;
    config.noise_scheduler.beta_end = 2.0;
    config.noise_scheduler.beta_schedule = easyphoto_diffusion::schedulers::BetaSchedule::Linear;
    // (Odd timesteps give a positive product: the first NaN comes at a random step.)
    let step = match run(&dir, &config, Callbacks::default()) {
        Err(LoraError::NonFiniteLoss { step, loss }) => {
            assert!(!loss.is_finite());
            step
        }
        other => panic!("expected NonFiniteLoss, got {other:?}"),
    };
    // Nothing was checkpointed at or after the bad step.
    for s in step..=6 {
        assert!(!easyphoto_lora::trainer::checkpoint_path(&dir, s).exists(), "checkpoint {s}");
    }
}

#[test]
fn sdxl_config_trains_one_step_on_a_tiny_sdxl_unet() {
    let io = tensors("apply/io.safetensors");
    let mut unet = load_unet(&fixture("apply/sdxl_unet"), None, DType::F32, &Device::Cpu).unwrap();
    let config = TrainConfig::sdxl();
    config.validate().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
    let mut targets = Targets { unet: Some(&mut unet), ..Default::default() };
    let net = LoraNetwork::new(&mut targets, config.rank, config.network_alpha, &mut rng).unwrap();
    net.attach(&mut targets, 1.0);
    let scheduler = DdpmScheduler::new(config.noise_scheduler.clone()).unwrap();
    let cond = UNetConditioning {
        text_embeds: Some(&io["text_embeds"]),
        time_ids: Some(&io["time_ids"]),
        ..Default::default()
    };
    let noise = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let loss =
        diffusion_loss(&unet, &scheduler, &io["sample"], &noise, &[10, 900], &io["sdxl_encoder_hidden_states"], &cond)
            .unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let store = loss.backward().unwrap();
    let params: Vec<(&Var, f64)> =
        net.modules().iter().flat_map(|m| [(&m.down, config.unet_lr), (&m.up, config.unet_lr)]).collect();
    let mut grads: Vec<Tensor> = params.iter().map(|(p, _)| store.get(p.as_tensor()).unwrap().clone()).collect();
    clip_grad_norm(&mut grads, config.max_grad_norm).unwrap();
    let vars: Vec<&Var> = params.iter().map(|(p, _)| *p).collect();
    AdamW::new(config.adam, &vars).unwrap().step(&params, &grads).unwrap();
    // The zero-initialised ups moved by about lr (Adam's first step is lr · sign(g)).
    let up = &net.modules()[0].up;
    let max: f32 = up.as_tensor().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!((max - 1e-4).abs() < 1e-5, "{max}");
    assert_eq!(net.modules()[0].down.dims()[0], 32);
}

#[test]
fn truncated_train_state_is_a_typed_error_naming_the_file() {
    let config = TrainConfig { max_train_steps: Some(2), ..tiny_config() };
    let dir = common::temp_dir("train_truncated_state");
    run(&dir, &config, Callbacks::default()).unwrap();
    let state = dir.join(easyphoto_lora::trainer::STATE_FILE);
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let config = TrainConfig { max_train_steps: Some(4), ..config };
    let err = run(&dir, &config, Callbacks::default()).unwrap_err();
    assert!(matches!(err, LoraError::NotSafetensors { .. }), "{err}");
    assert!(err.to_string().contains("train_state.safetensors"), "{err}");
    // A state saved with another seed is refused rather than silently mixed.
    let dir = common::temp_dir("train_other_seed");
    run(&dir, &config, Callbacks::default()).unwrap();
    let err =
        run(&dir, &TrainConfig { seed: 8, max_train_steps: Some(6), ..config }, Callbacks::default()).unwrap_err();
    assert!(matches!(err, LoraError::TrainState { .. }), "{err}");
}

#[test]
fn mixed_precision_trains_f32_lora_on_an_f16_model() {
    let dev = Device::Cpu;
    // (candle has no bf16 matmul on the CPU; f16 it has.)
    let dtype = DType::F16;
    let mut unet = load_unet(&fixture("apply/sd15_unet"), None, dtype, &dev).unwrap();
    let mut te = load_clip_text_model(&fixture("apply/sd15_te"), None, dtype, &dev).unwrap();
    let vae = load_vae(&fixture("train/vae"), None, dtype, &dev).unwrap();
    let dir = common::temp_dir("train_f16");
    let config = TrainConfig { max_train_steps: Some(2), ..tiny_config() };
    let mut losses = vec![];
    let mut progress = |p: &easyphoto_lora::Progress| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    };
    let out = train(
        TrainModels { unet: &mut unet, text_encoder: &mut te, vae: &vae },
        &images(3),
        &config,
        &dir,
        Callbacks { progress: Some(&mut progress), checkpoint: None },
    )
    .unwrap();
    println!("f16 base, f32 LoRA: losses {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    let lora = weights(&out.last_checkpoint);
    // The ups moved away from zero: gradients reached the f32 LoRA through the f16 model.
    let moved = lora
        .modules()
        .map(|(_, m)| m.up.abs().unwrap().to_dtype(DType::F32).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap());
    assert!(moved.fold(0f32, f32::max) > 0.0);
}

#[test]
fn sdxl_one_step_matches_pytorch_peft() {
    // Fixture: tools/reference/lora_train_step_sdxl.py (UNet and both text encoders adapted).
    let io = tensors("train/sdxl_step_io.safetensors");
    let init = KohyaLora::load(fixture("train/sdxl_step_init.safetensors"), &Device::Cpu).unwrap();
    let (mut unet, mut te1, mut te2) = sdxl_models();
    let mut targets = Targets { unet: Some(&mut unet), text_encoder: Some(&mut te1), text_encoder_2: Some(&mut te2) };
    let network = LoraNetwork::from_lora(&mut targets, &init).unwrap();
    network.attach(&mut targets, 1.0);
    let names: Vec<String> =
        network.modules().iter().flat_map(|m| [format!("{}.down", m.name), format!("{}.up", m.name)]).collect();
    let count = |prefix: &str| network.modules().iter().filter(|m| m.name.starts_with(prefix)).count();
    assert_eq!((count("lora_unet_"), count("lora_te1_"), count("lora_te2_")), (88, 12, 12));

    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let (hidden, pooled) = sdxl_text_conditioning(&te1, &te2, &ids, 0).unwrap();
    let cond = UNetConditioning { text_embeds: Some(&pooled), time_ids: Some(&io["time_ids"]), ..Default::default() };
    let config = TrainConfig::sdxl();
    let scheduler = DdpmScheduler::new(config.noise_scheduler.clone()).unwrap();
    let timesteps: Vec<usize> = io["timesteps"].to_vec1::<f32>().unwrap().iter().map(|&t| t as usize).collect();
    let loss = diffusion_loss(&unet, &scheduler, &io["latents"], &io["noise"], &timesteps, &hidden, &cond).unwrap();
    let (got, want) = (loss.to_scalar::<f32>().unwrap(), scalar(&io["loss"]));
    println!("loss {got} vs {want}: error {:e}", (got - want).abs());
    assert!((got - want).abs() <= 1e-5);

    let store = loss.backward().unwrap();
    let lr = f64::from(scalar(&io["lr"]));
    let params: Vec<(&Var, f64)> = network.modules().iter().flat_map(|m| [(&m.down, lr), (&m.up, lr)]).collect();
    let grads: Vec<Option<Tensor>> = params.iter().map(|(p, _)| store.get(p.as_tensor()).cloned()).collect();
    let (mut worst, mut missing) = (0f32, 0);
    for (g, name) in grads.iter().zip(&names) {
        let want = &io[&format!("grad.{name}")];
        match g {
            Some(g) => worst = worst.max(common::max_abs(g, want)),
            // Only the first encoder's last layer is out of reach (PyTorch: no grad, stored as 0).
            None => {
                assert!(name.starts_with("lora_te1_text_model_encoder_layers_1_"), "{name}");
                assert_eq!(common::max_abs(want, &want.zeros_like().unwrap()), 0.0, "{name}");
                missing += 1;
            }
        }
    }
    println!("gradients ({} tensors, {missing} without gradient): max abs error {worst:e}", grads.len());
    assert!(worst <= 1e-4);
    assert_eq!(missing, 12);

    let mut present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
    let norm = clip_grad_norm(&mut present, f64::from(scalar(&io["max_norm"]))).unwrap();
    assert!((norm as f32 - scalar(&io["grad_norm"])).abs() <= 1e-5, "{norm}");
    let mut clipped = present.iter();
    let grads: Vec<Option<&Tensor>> = grads.iter().map(|g| g.as_ref().and_then(|_| clipped.next())).collect();
    let vars: Vec<&Var> = params.iter().map(|(p, _)| *p).collect();
    AdamW::new(config.adam, &vars).unwrap().step_partial(&params, &grads).unwrap();
    let mut worst = 0f32;
    for ((p, _), name) in params.iter().zip(&names) {
        worst = worst.max(common::max_abs(p.as_tensor(), &io[&format!("after.{name}")]));
    }
    println!("AdamW-updated weights: max abs error {worst:e}");
    assert!(worst <= 1e-4);
}

#[test]
fn sdxl_training_writes_kohya_checkpoints_with_both_text_encoders() {
    let dir = common::temp_dir("train_sdxl");
    let (mut unet, mut te1, mut te2) = sdxl_models();
    let vae = vae();
    let config = TrainConfig {
        rank: 4,
        network_alpha: 2.0,
        resolution: 8,
        max_train_steps: Some(3),
        checkpointing_steps: 2,
        train_text_encoder: true,
        seed: 11,
        ..TrainConfig::sdxl()
    };
    let models = SdxlTrainModels {
        unet: &mut unet,
        text_encoder: &mut te1,
        text_encoder_2: &mut te2,
        vae: &vae,
        pad_token_id_2: 0,
    };
    let trained = train_sdxl(models, &images(3), &config, &dir, Callbacks::default()).unwrap();
    assert!(trained.last_loss.is_finite());
    assert_eq!(trained.checkpoints.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 3]);
    let lora = weights(&trained.last_checkpoint);
    assert_eq!(lora.metadata().get("ss_base_model_version").map(String::as_str), Some("sdxl_base_v1-0"));
    let count = |prefix: &str| lora.modules().filter(|(name, _)| name.starts_with(prefix)).count();
    assert_eq!((count("lora_unet_"), count("lora_te1_"), count("lora_te2_")), (88, 12, 12));
    // Every trained module moved its zero-initialised up, except the first encoder's last layer,
    // which the penultimate-layer conditioning does not reach, and the second encoder's last
    // `q_proj` / `k_proj`: these captions have no end-of-text token, so the pooled output is
    // token 0's, whose causal softmax has a single key (no gradient to queries or keys).
    for (name, m) in lora.modules() {
        let moved = common::max_abs(&m.up, &m.up.zeros_like().unwrap()) > 0.0;
        let unreachable = name.starts_with("lora_te1_text_model_encoder_layers_1_")
            || name == "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"
            || name == "lora_te2_text_model_encoder_layers_1_self_attn_k_proj";
        assert_eq!(moved, !unreachable, "{name}");
    }

    // Our outputs with the written file merged, for the one-off check in diffusers
    // (`tools/reference/lora_check_written.py`).
    let io = tensors("apply/io.safetensors");
    let mut targets = Targets { unet: Some(&mut unet), text_encoder: Some(&mut te1), text_encoder_2: Some(&mut te2) };
    let (_, reports) = merge(&mut targets, &[(&lora, 1.0)]).unwrap();
    assert_eq!(reports[0].applied, 112);
    let cond = UNetConditioning {
        text_embeds: Some(&io["text_embeds"]),
        time_ids: Some(&io["time_ids"]),
        ..Default::default()
    };
    let u = unet.forward(&io["sample"], &io["timestep"], &io["sdxl_encoder_hidden_states"], &cond).unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let t1 = te1.forward(&ids).unwrap().last_hidden_state;
    let o2 = te2.forward(&ids).unwrap();
    let written = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lora_written");
    std::fs::create_dir_all(&written).unwrap();
    std::fs::copy(&trained.last_checkpoint, written.join("sdxl_trained_kohya.safetensors")).unwrap();
    let map = std::collections::HashMap::from([
        ("unet".to_string(), u),
        ("te1".to_string(), t1),
        ("te2".to_string(), o2.last_hidden_state),
        ("te2_embeds".to_string(), o2.text_embeds),
    ]);
    candle_core::safetensors::save(&map, written.join("sdxl_trained_kohya_outputs.safetensors")).unwrap();
}
