//! Training a face LoRA the way EasyPhoto does (kohya `train_lora.py`): per micro-batch, photos
//! resized (short side) to the resolution, cropped, flipped; latents = VAE sample × scaling
//! factor; DDPM noise at uniform timesteps; MSE against epsilon (or v); the loss divided by the
//! accumulation steps; after the accumulated micro-batches, gradient-norm clipping and AdamW.
//!
//! Beyond EasyPhoto: checkpoints are written atomically, with the optimizer moments, the f32
//! weights and the step beside them (`train_state.safetensors`), so a killed run resumes and
//! ends with the same weights as an uninterrupted one; the randomness of step `s` comes from the
//! ChaCha stream `s` of the seed (and the data order of epoch `e` from its own stream), so the RNG
//! state to save is the seed and the step. A NaN/inf loss stops training with a typed error; the
//! progress callback can cancel.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use easyphoto_diffusion::schedulers::{DdpmScheduler, PredictionType};
use easyphoto_diffusion::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel, UNetConditioning, VisitLayers,
};
use image::RgbImage;
use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::adamw::{AdamW, clip_grad_norm};
use crate::apply::Slot;
use crate::kohya_file::{deserialize, load_tensor, read, write_safetensors};
use crate::{KohyaLora, KohyaModule, LoraError, LoraNetwork, Targets, TrainConfig, detach};

/// The file beside the checkpoints that a run resumes from.
pub const STATE_FILE: &str = "train_state.safetensors";

/// One training photo with its caption's token ids.
#[derive(Debug, Clone)]
pub struct TrainImage {
    pub image: RgbImage,
    pub input_ids: Vec<u32>,
}

/// The frozen models.
pub struct TrainModels<'a> {
    pub unet: &'a mut UNet2DConditionModel,
    pub text_encoder: &'a mut CLIPTextModel,
    pub vae: &'a AutoencoderKL,
}

/// SDXL's frozen models, for [`train_sdxl`].
pub struct SdxlTrainModels<'a> {
    pub unet: &'a mut UNet2DConditionModel,
    pub text_encoder: &'a mut CLIPTextModel,
    pub text_encoder_2: &'a mut CLIPTextModelWithProjection,
    pub vae: &'a AutoencoderKL,
    /// The second tokenizer's pad id (SDXL: 0, `!`): a caption's ids after its first
    /// end-of-text token are replaced by it for the second encoder.
    pub pad_token_id_2: u32,
}

/// The frozen models of either family.
struct Frozen<'a> {
    unet: &'a mut UNet2DConditionModel,
    text_encoder: &'a mut CLIPTextModel,
    /// SDXL's second encoder and its pad id.
    text_encoder_2: Option<(&'a mut CLIPTextModelWithProjection, u32)>,
    vae: &'a AutoencoderKL,
}

/// Reported after every optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps in all.
    pub max_steps: usize,
    /// The step's loss (mean over its micro-batches).
    pub loss: f32,
}

/// Called after every optimizer step; `Break` cancels.
pub type ProgressFn<'a> = dyn FnMut(&Progress) -> ControlFlow<()> + 'a;

/// Called after every checkpoint with its path and step.
pub type CheckpointFn<'a> = dyn FnMut(&Path, usize) + 'a;

/// The optional callbacks of [`train`].
#[derive(Default)]
pub struct Callbacks<'a> {
    /// After every optimizer step; `Break` cancels (the last checkpoint stays resumable).
    pub progress: Option<&'a mut ProgressFn<'a>>,
    /// After every checkpoint, with its path and step (EasyPhoto validates there).
    pub checkpoint: Option<&'a mut CheckpointFn<'a>>,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The last checkpoint (kohya, f16).
    pub last_checkpoint: PathBuf,
    /// Every checkpoint written by this run, by step.
    pub checkpoints: Vec<(usize, PathBuf)>,
    /// The step this run resumed from (0 for a fresh run).
    pub resumed_from: usize,
    /// The loss of the last step.
    pub last_loss: f32,
}

/// The path of the checkpoint of `step`.
pub fn checkpoint_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoint-{step}.safetensors"))
}

/// Trains a LoRA on `data` into `output_dir`, resuming from its `train_state.safetensors` when
/// there is one. The models are left without adapters.
pub fn train(
    models: TrainModels,
    data: &[TrainImage],
    config: &TrainConfig,
    output_dir: &Path,
    callbacks: Callbacks,
) -> Result<Trained, LoraError> {
    let TrainModels { unet, text_encoder, vae } = models;
    run(Frozen { unet, text_encoder, text_encoder_2: None, vae }, data, config, output_dir, callbacks)
}

/// [`train`] for SDXL (kohya `sdxl_train_network.py`; [`TrainConfig::sdxl`] is its recipe): the
/// text conditioning is [`sdxl_text_conditioning`], and each image's micro-conditioning
/// `time_ids` are its original size `(h, w)`, the crop's top-left corner in the resized image
/// and the target size `(resolution, resolution)`. Text-encoder LoRAs are `lora_te1_` /
/// `lora_te2_`; checkpoints say `ss_base_model_version = sdxl_base_v1-0`.
pub fn train_sdxl(
    models: SdxlTrainModels,
    data: &[TrainImage],
    config: &TrainConfig,
    output_dir: &Path,
    callbacks: Callbacks,
) -> Result<Trained, LoraError> {
    let SdxlTrainModels { unet, text_encoder, text_encoder_2, vae, pad_token_id_2 } = models;
    let frozen = Frozen { unet, text_encoder, text_encoder_2: Some((text_encoder_2, pad_token_id_2)), vae };
    run(frozen, data, config, output_dir, callbacks)
}

fn run(
    models: Frozen,
    data: &[TrainImage],
    config: &TrainConfig,
    output_dir: &Path,
    mut callbacks: Callbacks,
) -> Result<Trained, LoraError> {
    config.validate()?;
    if data.is_empty() {
        return Err(LoraError::Config { field: "data".into(), reason: "no training image".into() });
    }
    std::fs::create_dir_all(output_dir).map_err(|source| LoraError::Write { file: output_dir.into(), source })?;
    let Frozen { unet, text_encoder, mut text_encoder_2, vae } = models;
    let sdxl = text_encoder_2.is_some();
    let scheduler = DdpmScheduler::new(config.noise_scheduler.clone())?;
    let max_steps = config.steps_for(data.len());
    let state_path = output_dir.join(STATE_FILE);

    let train_te = config.train_text_encoder;
    let resumed = if state_path.exists() {
        Some(load_state(&state_path, &mut targets(unet, text_encoder, &mut text_encoder_2, train_te), config)?)
    } else {
        None
    };
    let (network, mut optimizer, start) = match resumed {
        Some(r) => r,
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            let network = LoraNetwork::new(
                &mut targets(unet, text_encoder, &mut text_encoder_2, train_te),
                config.rank,
                config.network_alpha,
                &mut rng,
            )?;
            let params: Vec<&Var> = network.modules().iter().flat_map(|m| [&m.down, &m.up]).collect();
            let optimizer = AdamW::new(config.adam, &params)?;
            (network, optimizer, 0)
        }
    };
    detach(&mut targets(unet, text_encoder, &mut text_encoder_2, train_te));
    network.attach(&mut targets(unet, text_encoder, &mut text_encoder_2, train_te), 1.0);
    let params: Vec<(&Var, f64)> = network
        .modules()
        .iter()
        .flat_map(|m| {
            let lr = if m.slot == Slot::Unet { config.unet_lr } else { config.text_encoder_lr };
            [(&m.down, lr), (&m.up, lr)]
        })
        .collect();

    let mut result =
        Trained { last_checkpoint: PathBuf::new(), checkpoints: vec![], resumed_from: start, last_loss: f32::NAN };
    let outcome = (|| -> Result<(), LoraError> {
        for step in start + 1..=max_steps {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(step as u64);
            let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
            let mut loss_sum = 0f32;
            for micro in 0..config.gradient_accumulation_steps {
                let first = ((step - 1) * config.gradient_accumulation_steps + micro) * config.train_batch_size;
                let indices: Vec<usize> =
                    (first..first + config.train_batch_size).map(|i| data_index(config.seed, data.len(), i)).collect();
                let (pixels, ids, time_ids) = batch(data, &indices, config, &mut rng, unet.device())?;
                // The frozen models' dtype (f32, or f16/bf16 for mixed precision with f32 LoRA
                // weights), read from the text encoder's output.
                let (hidden, pooled) = match &text_encoder_2 {
                    None => (text_encoder.forward(&ids)?.last_hidden_state, None),
                    Some((te2, pad)) => {
                        let (hidden, pooled) = sdxl_text_conditioning(text_encoder, te2, &ids, *pad)?;
                        (hidden, Some(pooled))
                    }
                };
                let time_ids = time_ids.to_dtype(hidden.dtype())?;
                let cond = match &pooled {
                    Some(pooled) => {
                        UNetConditioning { text_embeds: Some(pooled), time_ids: Some(&time_ids), ..Default::default() }
                    }
                    None => UNetConditioning::default(),
                };
                let latents = {
                    let dist = vae.encode(&pixels.to_dtype(hidden.dtype())?)?;
                    let noise = normal(&mut rng, dist.mean.dims(), dist.mean.device())?;
                    dist.sample_with(&noise.to_dtype(hidden.dtype())?)?
                        .affine(vae.scaling_factor(), 0.0)?
                        .to_dtype(DType::F32)?
                };
                let noise = normal(&mut rng, latents.dims(), latents.device())?;
                let timesteps: Vec<usize> = (0..indices.len())
                    .map(|_| rng.random_range(0..config.noise_scheduler.num_train_timesteps))
                    .collect();
                let loss = diffusion_loss(unet, &scheduler, &latents, &noise, &timesteps, &hidden, &cond)?;
                loss_sum += loss.to_scalar::<f32>()?;
                let scaled = loss.affine(1.0 / config.gradient_accumulation_steps as f64, 0.0)?;
                let store = scaled.backward()?;
                for ((p, _), acc) in params.iter().zip(grads.iter_mut()) {
                    if let Some(g) = store.get(p.as_tensor()) {
                        // Detached: a variable's gradient references the forward graph.
                        let g = &g.detach();
                        *acc = Some(match acc.take() {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
            let loss = loss_sum / config.gradient_accumulation_steps as f32;
            if !loss.is_finite() {
                return Err(LoraError::NonFiniteLoss { step, loss });
            }
            // Parameters the loss does not reach (SDXL's first encoder's last layer) get no update.
            let mut present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
            clip_grad_norm(&mut present, config.max_grad_norm)?;
            let mut clipped = present.iter();
            let grads: Vec<Option<&Tensor>> = grads.iter().map(|g| g.as_ref().and_then(|_| clipped.next())).collect();
            optimizer.step_partial(&params, &grads)?;
            result.last_loss = loss;
            if step % config.checkpointing_steps == 0 || step == max_steps {
                let path = save_checkpoint(&network, &optimizer, config, output_dir, step, sdxl)?;
                if let Some(cb) = callbacks.checkpoint.as_mut() {
                    cb(&path, step);
                }
                result.checkpoints.push((step, path.clone()));
                result.last_checkpoint = path;
            }
            if let Some(cb) = callbacks.progress.as_mut()
                && cb(&Progress { step, max_steps, loss }).is_break()
            {
                return Err(LoraError::Cancelled { step });
            }
        }
        Ok(())
    })();
    detach(&mut targets(unet, text_encoder, &mut text_encoder_2, train_te));
    outcome.map(|()| result)
}

/// The models a training run adapts.
fn targets<'a>(
    unet: &'a mut UNet2DConditionModel,
    text_encoder: &'a mut CLIPTextModel,
    text_encoder_2: &'a mut Option<(&mut CLIPTextModelWithProjection, u32)>,
    train_te: bool,
) -> Targets<'a> {
    let te2 = text_encoder_2.as_mut().filter(|_| train_te).map(|(te2, _)| &mut **te2 as &mut dyn VisitLayers);
    Targets { unet: Some(unet), text_encoder: if train_te { Some(text_encoder) } else { None }, text_encoder_2: te2 }
}

/// SDXL's text conditioning (diffusers' `encode_prompt`, kohya's SDXL training): the
/// penultimate hidden states of both encoders (no final norm) concatenated, `[B, N, D1 + D2]`,
/// and the second encoder's projected pooled output `text_embeds` `[B, P]`. The second encoder
/// reads `ids` with everything after the first end-of-text token replaced by `pad_token_id_2`.
pub fn sdxl_text_conditioning(
    text_encoder: &CLIPTextModel,
    text_encoder_2: &CLIPTextModelWithProjection,
    ids: &Tensor,
    pad_token_id_2: u32,
) -> Result<(Tensor, Tensor), LoraError> {
    let layers = text_encoder.config().num_hidden_layers;
    let first = text_encoder.hidden_state(ids, layers.saturating_sub(1))?;
    let eos = text_encoder_2.text_model().config().eos_token_id;
    let rows: Vec<Vec<u32>> =
        ids.to_dtype(DType::U32)?.to_vec2()?.into_iter().map(|row| pad_after_eos(row, eos, pad_token_id_2)).collect();
    let ids_2 = Tensor::new(rows, ids.device())?;
    let out = text_encoder_2.forward(&ids_2)?;
    let n = out.hidden_states.len();
    let second = out.hidden_states.get(n.wrapping_sub(2)).ok_or_else(|| LoraError::Config {
        field: "text_encoder_2".into(),
        reason: "needs at least one layer".into(),
    })?;
    Ok((Tensor::cat(&[&first, &second.to_dtype(first.dtype())?], 2)?, out.text_embeds))
}

/// `row` with the ids after its first `eos` replaced by `pad`.
fn pad_after_eos(mut row: Vec<u32>, eos: Option<u32>, pad: u32) -> Vec<u32> {
    if let Some(end) = row.iter().position(|&id| Some(id) == eos) {
        row[end + 1..].fill(pad);
    }
    row
}

/// `MSE(unet(noisy, t, hidden), target)`, averaged over every element in f32, with `noisy` the
/// DDPM forward process at `timesteps` (computed in f32, fed to the UNet in `hidden`'s dtype) and
/// the target the noise (epsilon) or the velocity (v).
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    scheduler: &DdpmScheduler,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    hidden: &Tensor,
    cond: &UNetConditioning,
) -> Result<Tensor, LoraError> {
    let noisy = scheduler.add_noise_at(latents, noise, timesteps)?;
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, timesteps.len(), latents.device())?;
    let pred = unet.forward(&noisy.to_dtype(hidden.dtype())?, &t, hidden, cond)?;
    let target = match scheduler.config().prediction_type {
        PredictionType::VPrediction => scheduler.get_velocity(latents, noise, timesteps)?,
        _ => noise.clone(),
    };
    Ok((pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
}

/// Index into the data of the `i`-th drawn image: epoch `i / n` is a permutation drawn from the
/// seed's stream `u64::MAX - epoch`.
fn data_index(seed: u64, n: usize, i: usize) -> usize {
    let epoch = i / n;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX - epoch as u64);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order[i % n]
}

/// Standard normal noise of `shape` from `rng`.
fn normal(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor, LoraError> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The augmented pixels `[B, 3, R, R]` in [-1, 1], the token ids `[B, L]` of `indices` and
/// SDXL's `time_ids` `[B, 6]` (original `(h, w)`, crop top-left, target `(R, R)`).
fn batch(
    data: &[TrainImage],
    indices: &[usize],
    config: &TrainConfig,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor), LoraError> {
    let mut pixels = vec![];
    let mut ids = vec![];
    let mut time_ids = vec![];
    for &i in indices {
        let (image, (top, left)) = augment_with_crop(&data[i].image, config, rng);
        let (w, h) = data[i].image.dimensions();
        let r = config.resolution;
        time_ids.extend([h, w, top, left, r, r].map(|v| v as f32));
        let r = config.resolution as usize;
        let v: Vec<f32> = image.pixels().flat_map(|p| p.0.map(|c| f32::from(c) / 127.5 - 1.0)).collect();
        pixels.push(Tensor::from_vec(v, (r, r, 3), device)?.permute((2, 0, 1))?);
        ids.push(Tensor::new(data[i].input_ids.as_slice(), device)?);
    }
    let ids = Tensor::stack(&ids, 0).map_err(|_| LoraError::Config {
        field: "input_ids".into(),
        reason: "captions of one batch must have the same token count".into(),
    })?;
    let time_ids = Tensor::from_vec(time_ids, (indices.len(), 6), device)?;
    Ok((Tensor::stack(&pixels, 0)?.contiguous()?, ids, time_ids))
}

/// EasyPhoto's augmentation: resize so the short side is the resolution (bilinear), crop a
/// square (random, or centred), flip horizontally with probability 1/2.
pub fn augment(image: &RgbImage, config: &TrainConfig, rng: &mut impl Rng) -> RgbImage {
    augment_with_crop(image, config, rng).0
}

/// [`augment`], also returning the crop's top-left corner `(y, x)` in the resized image.
fn augment_with_crop(image: &RgbImage, config: &TrainConfig, rng: &mut impl Rng) -> (RgbImage, (u32, u32)) {
    let r = config.resolution;
    let (w, h) = image.dimensions();
    let scale = f64::from(r) / f64::from(w.min(h));
    let (nw, nh) = (((f64::from(w) * scale).round() as u32).max(r), ((f64::from(h) * scale).round() as u32).max(r));
    let resized = image::imageops::resize(image, nw, nh, FilterType::Triangle);
    let (x, y) = if config.center_crop {
        ((nw - r) / 2, (nh - r) / 2)
    } else {
        (rng.random_range(0..=nw - r), rng.random_range(0..=nh - r))
    };
    let mut crop = image::imageops::crop_imm(&resized, x, y, r, r).to_image();
    if config.random_flip && rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut crop);
    }
    (crop, (y, x))
}

/// Writes `checkpoint-<step>.safetensors` (kohya, f16) and then the resumable state, both
/// atomically.
fn save_checkpoint(
    network: &LoraNetwork,
    optimizer: &AdamW,
    config: &TrainConfig,
    dir: &Path,
    step: usize,
    sdxl: bool,
) -> Result<PathBuf, LoraError> {
    let base = if sdxl { "sdxl_base_v1-0" } else { "sd_v1" };
    let metadata = BTreeMap::from([
        ("ss_network_dim".to_string(), config.rank.to_string()),
        ("ss_network_alpha".to_string(), config.network_alpha.to_string()),
        ("ss_base_model_version".to_string(), base.to_string()),
        ("ss_steps".to_string(), step.to_string()),
    ]);
    let path = checkpoint_path(dir, step);
    network.to_lora(metadata).save(&path, DType::F16)?;
    let mut tensors = vec![];
    for (m, pair) in network.modules().iter().zip(optimizer.moments().chunks(2)) {
        tensors.push((format!("lora.{}.down", m.name), m.down.as_tensor().clone()));
        tensors.push((format!("lora.{}.up", m.name), m.up.as_tensor().clone()));
        for (part, (avg, avg_sq)) in ["down", "up"].iter().zip(pair) {
            tensors.push((format!("adam.{}.{part}.m", m.name), avg.clone()));
            tensors.push((format!("adam.{}.{part}.v", m.name), avg_sq.clone()));
        }
    }
    let metadata = BTreeMap::from([
        ("step".to_string(), step.to_string()),
        ("seed".to_string(), config.seed.to_string()),
        ("alpha".to_string(), config.network_alpha.to_string()),
    ]);
    write_safetensors(&dir.join(STATE_FILE), tensors, &metadata)?;
    Ok(path)
}

/// The network, optimizer and step saved in `path`.
fn load_state(
    path: &Path,
    targets: &mut Targets,
    config: &TrainConfig,
) -> Result<(LoraNetwork, AdamW, usize), LoraError> {
    let file = path.display().to_string();
    let bad = |reason: String| LoraError::TrainState { file: path.to_path_buf(), reason };
    let bytes = read(path)?;
    let (st, metadata) = deserialize(&bytes, &file)?;
    let field = |key: &str| metadata.get(key).ok_or_else(|| bad(format!("metadata `{key}` is missing")));
    let step: usize = field("step")?.parse().map_err(|e| bad(format!("step: {e}")))?;
    let seed: u64 = field("seed")?.parse().map_err(|e| bad(format!("seed: {e}")))?;
    if seed != config.seed {
        return Err(bad(format!("saved with seed {seed}, the config has {}", config.seed)));
    }
    let alpha: f32 = field("alpha")?.parse().map_err(|e| bad(format!("alpha: {e}")))?;
    let device = Device::Cpu;
    let mut tensors = BTreeMap::new();
    for (key, view) in st.iter() {
        tensors.insert(key.to_string(), load_tensor(&view, &file, key, &device)?);
    }
    let mut take = |key: String| tensors.remove(&key).ok_or_else(|| bad(format!("tensor `{key}` is missing")));
    let names: Vec<String> =
        st.names().iter().filter_map(|k| k.strip_prefix("lora.")?.strip_suffix(".down")).map(String::from).collect();
    let mut modules = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for name in &names {
        let down = take(format!("lora.{name}.down"))?;
        let up = take(format!("lora.{name}.up"))?;
        modules.insert(name.clone(), KohyaModule { down, up, alpha: Some(alpha) });
        let mut pair = vec![];
        for part in ["down", "up"] {
            pair.push((take(format!("adam.{name}.{part}.m"))?, take(format!("adam.{name}.{part}.v"))?));
        }
        moments.insert(name.clone(), pair);
    }
    let network = LoraNetwork::from_lora(targets, &KohyaLora::new(file.clone(), modules, BTreeMap::new()))?;
    let mut ordered = vec![];
    for m in network.modules() {
        ordered.extend(moments.remove(&m.name).ok_or_else(|| bad(format!("no optimizer state for `{}`", m.name)))?);
    }
    Ok((network, AdamW::from_state(config.adam, step, ordered), step))
}

#[cfg(test)]
mod tests {
    #[test]
    fn second_encoder_ids_are_padded_after_the_first_end_of_text() {
        assert_eq!(super::pad_after_eos(vec![406, 5, 407, 407, 407], Some(407), 0), [406, 5, 407, 0, 0]);
        assert_eq!(super::pad_after_eos(vec![406, 5, 6], Some(407), 0), [406, 5, 6]);
        assert_eq!(super::pad_after_eos(vec![406, 407], None, 0), [406, 407]);
    }
}
