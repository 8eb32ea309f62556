//! EasyPhoto's infer flow (WebUI `easyphoto_infer_forward`, SD1.5 path; anatomy §2.2–§2.4),
//! composed from the crates, readable top to bottom in `infer_face`:
//!
//! 1. the template's faces (ratio-1 "safe boxes", left to right); for each user slot, the other
//!    faces painted white;
//! 2. the face box × 3 cropped, its short side resized to `short_side` (512) with Pillow's LANCZOS,
//!    both sides floored to multiples of 32; the face mapped into the crop (box × 1.1);
//! 3. the user's best face similarity-warped onto the template face (the openpose input);
//! 4. face fusion before (ratio 0.6) with the user's reference photo;
//! 5. the face mask (the face parser's skin, brows, eyes, nose and lips), closed and dilated by
//!    `face_width / 10`;
//! 6. first diffusion: inpainting with the blend loop on an ordinary UNet (50 × 0.45, DPM++ 2M SDE
//!    Karras, CFG 7), canny 0.5 + openpose 0.5 + colour 0.85 in "my prompt is more important"
//!    mode, the user's LoRA (0.9) and the style LoRA (0.65) attached, the known region kept through
//!    the WebUI's [latent mask](crate::latent_mask), then the WebUI's composite through the
//!    blurred mask;
//! 7. colour shift towards the template's face before fusion;
//! 8. face fusion after (ratio 0.6);
//! 9. second diffusion on a ring around the face plus eyes and lips, parsed again after fusion
//!    (20 × 0.30, canny 1.0 + tile 1.0);
//! 10. colour shift (lips excluded);
//! 11. the crop resized back and pasted into the template, then composited through the blurred
//!     safe-box mask (so nothing outside the face crop changes);
//! 12. multi-person templates (more than one user slot and face): the seam pass, EasyPhoto's third
//!     diffusion, over a ring around the repainted faces' boxes (`dilate64 − erode32`) in the
//!     square around all faces (+ 50 px), short side at most 768 (512 when elongated; both
//!     scaled by `short_side / 512`), 30 × 0.3,
//!     canny 1.0 + colour 1.0, the additional prompt without LoRAs;
//! 13. the display score: the identity similarity of the result's face to the user's reference.
//!
//! Substitutes, documented: the face-region masks come from [`Components::parser`] (MediaPipe
//! FaceMesh regions by default) with BiSeNet's label sets mapped onto its regions (face = oval ∪
//! brows ∪ eyes ∪ lips, BiSeNet's 1–5 and 10–13; eyes and lips = 4, 5, 12, 13); DAMO's fusion
//! model is replaced by the face crate's [`ClassicalFusion`]. The sampler blends the known region
//! back after every step as diffusers does (noised image latents) where A1111 blends its
//! prediction of the clean image; both keep the original latents after the last step.
//!
//! Deliberate departures from EasyPhoto's seam pass: its mask starts from `np.ones_like` (1, not
//! 0, so the ring is 254 and the rest of the square 1, which mixes 2/255 of the generation into
//! every pixel of the square); here it is 0 / 255. Its result is resized back and pasted over the
//! whole square, which resamples faces that were not selected; here it is laid over the square
//! through the WebUI's overlay mask at full resolution, so only the ring and its blur change.
//! Not done yet: IP-Adapter ID control, background restore, super resolution.
//!
//! Results are written atomically as `<output>/<template stem>.png` (`-<k>` appended when
//! `batch_size > 1`) with a `.json` beside it holding the seed and each face's display score.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use easyphoto_controlnet::preprocess::{Interpolation, annotate_canny, color_map, resize, tile_resample};
use easyphoto_controlnet::{ControlMode, ControlNetModel, ControlUnit, Controls};
use easyphoto_diffusion::inpaint_overlay::{apply_overlay, blur_mask};
use easyphoto_diffusion::prompt::parse_extra_networks;
use easyphoto_diffusion::sampling::{
    Flow as SamplerFlow, Inpaint, SamplingOptions, Start, decode_latents, denoise_with_residuals, normalize_image,
};
use easyphoto_diffusion::schedulers::Sampler;
use easyphoto_diffusion::{DiffusionError, ExtraNetwork, SeededNoise, VisitLayers};
use easyphoto_face::fusion::{ClassicalFusion, FaceFusion, FusionParams};
use easyphoto_face::geometry::{crop, expand_box, left_to_right};
use easyphoto_face::masks::{blend, box_mask, contour_mask, inpaint_face_mask, paste};
use easyphoto_face::morphology::{Plane, box_blur, dilate, erode};
use easyphoto_face::resample::{PilFilter, resize_pil_u8};
use easyphoto_face::{Face, FaceParser, Similarity, color::color_shift, load_rgb, warp_affine};
use easyphoto_lora::{KohyaLora, Targets, attach, detach, load_lora};
use image::{GrayImage, ImageBuffer, Luma, Pixel, RgbImage};
use serde::Serialize;
use std::sync::Arc;

use crate::components::Components;
use crate::config::InferConfig;
use crate::error::{PipelineError, Result};
use crate::jobs::InferJob;
use crate::latent_mask::latent_mask;
use crate::progress::{CancelToken, Observer, Progress};
use crate::user::{UserId, UserStore, write_atomic};

/// The progress stage of the infer flow.
pub const STAGE: &str = "infer";

/// A trained user's assets, loaded and checked before any template is touched.
pub struct UserAssets {
    pub id: UserId,
    pub lora: KohyaLora,
    /// `ref_image.jpg` (EasyPhoto's `roop_image`): the fusion source and the score reference.
    pub reference: RgbImage,
    pub reference_face: Face,
    pub reference_embedding: Vec<f32>,
    /// The best validation face (falling back to the reference): the affine paste's source.
    pub face_id: RgbImage,
    pub face_id_face: Face,
}

impl UserAssets {
    /// Loads the LoRA and the reference and best-face images of `id`, finding their faces.
    pub fn load(store: &UserStore, id: &UserId, components: &Components) -> Result<Self> {
        store.check_ready(id)?;
        let lora = load_lora(store.lora_path(id), &components.device)?;
        let reference_path = store.reference_image(id);
        let reference = load_rgb(&reference_path)?;
        let reference_face = largest_face(components, &reference, &reference_path.display().to_string())?;
        let reference_embedding = components.embedder.embed(&reference, &reference_face)?;
        let best = store.best_face_image(id);
        let face_id_path = if best.is_file() { best } else { reference_path };
        let face_id = load_rgb(&face_id_path)?;
        let face_id_face = largest_face(components, &face_id, &face_id_path.display().to_string())?;
        Ok(Self { id: id.clone(), lora, reference, reference_face, reference_embedding, face_id, face_id_face })
    }
}

/// Wall time spent per kind of work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTimes {
    /// Detection, alignment, fusion, masks, identity scores.
    pub face: Duration,
    /// Canny, pose, colour and tile control images.
    pub preprocess: Duration,
    /// LoRA attachment, text encoding, VAE, sampling.
    pub diffusion: Duration,
    /// Resizes, colour shifts, composites and paste-back.
    pub post: Duration,
}

impl StageTimes {
    fn time<T>(slot: &mut Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = f();
        *slot += start.elapsed();
        out
    }

    pub fn total(&self) -> Duration {
        self.face + self.preprocess + self.diffusion + self.post
    }

    fn add(&mut self, other: &Self) {
        self.face += other.face;
        self.preprocess += other.preprocess;
        self.diffusion += other.diffusion;
        self.post += other.post;
    }
}

/// One processed face of a template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaceResult {
    /// The face's index, left to right.
    pub face: usize,
    pub user_id: String,
    /// EasyPhoto's display score: cosine similarity of the result's face to the user's reference
    /// face (found again in the result's crop, or at the template face's landmarks when the
    /// detector finds none there).
    pub score: f32,
    /// Where the face was cropped (`[x1, y1, x2, y2]` in the template): nothing outside changes.
    pub crop_box: [i32; 4],
}

/// One template's result, in memory.
#[derive(Debug, Clone)]
pub struct TemplateResult {
    pub image: RgbImage,
    pub faces: Vec<FaceResult>,
    pub seed: u64,
    pub times: StageTimes,
}

/// One written result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Written {
    pub template: PathBuf,
    pub image: PathBuf,
    pub seed: u64,
    pub faces: Vec<FaceResult>,
}

/// What a batch produced: results, and the templates that failed (EasyPhoto logs and skips them).
#[derive(Debug, Default)]
pub struct InferReport {
    pub written: Vec<Written>,
    pub failed: Vec<(PathBuf, PipelineError)>,
    pub times: StageTimes,
}

/// Runs a checked job: every user's assets are loaded first (an unknown user or a corrupt LoRA
/// stops the job before anything is written), then each template (× `batch_size`) in turn. A
/// template that fails is reported and skipped; if every template fails, the first error is returned.
pub fn run_job(
    job: &InferJob,
    store: &UserStore,
    components: &mut Components,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<InferReport> {
    let users = job
        .user_ids
        .iter()
        .map(|slot| slot.as_ref().map(|id| UserAssets::load(store, id, components)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let mut report = InferReport::default();
    for template_path in &job.templates {
        for k in 0..job.config.batch_size {
            cancel.check(STAGE)?;
            let seed = resolve_seed(job.config.seed, k);
            let outcome = load_rgb(template_path).map_err(PipelineError::from).and_then(|template| {
                let name = template_path.display().to_string();
                infer_template(&template, &name, &users, components, &job.config, seed, observer, cancel)
            });
            match outcome {
                Ok(result) => {
                    report.times.add(&result.times);
                    report.written.push(write_result(&job.output_dir, template_path, k, &job.config, result)?);
                }
                Err(e @ PipelineError::Cancelled { .. }) => return Err(e),
                Err(e) => report.failed.push((template_path.clone(), e)),
            }
        }
    }
    if report.written.is_empty()
        && let Some((_, e)) = report.failed.drain(..).next()
    {
        return Err(e);
    }
    Ok(report)
}

/// `seed` itself (plus the repeat index) when set; EasyPhoto's `randint(0, 65536)` for -1.
fn resolve_seed(seed: i64, k: u32) -> u64 {
    if seed >= 0 {
        return seed as u64 + u64::from(k);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(k);
    h.finish() % 65536
}

fn write_result(
    output_dir: &Path,
    template: &Path,
    k: u32,
    config: &InferConfig,
    result: TemplateResult,
) -> Result<Written> {
    let stem = template.file_stem().and_then(|s| s.to_str()).unwrap_or("result");
    let stem = if config.batch_size > 1 { format!("{stem}-{k}") } else { stem.to_string() };
    let image_path = output_dir.join(format!("{stem}.png"));
    let mut png = Vec::new();
    result
        .image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| PipelineError::InvalidInput { path: image_path.clone(), reason: e.to_string() })?;
    write_atomic(&image_path, &png)?;
    let written =
        Written { template: template.to_path_buf(), image: image_path, seed: result.seed, faces: result.faces };
    let json_path = output_dir.join(format!("{stem}.json"));
    let json = serde_json::to_vec_pretty(&written)
        .map_err(|source| PipelineError::Json { path: json_path.clone(), source })?;
    write_atomic(&json_path, &json)?;
    Ok(written)
}

/// One template with one user slot per face (left to right; `None` skips a face, faces beyond
/// the slots stay untouched): each selected face in turn, composited into the running result
/// through its blurred safe-box mask.
#[allow(clippy::too_many_arguments)]
pub fn infer_template(
    template: &RgbImage,
    name: &str,
    users: &[Option<UserAssets>],
    components: &mut Components,
    config: &InferConfig,
    seed: u64,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<TemplateResult> {
    let mut times = StageTimes::default();
    let (w, h) = template.dimensions();
    let faces = StageTimes::time(&mut times.face, || Ok(components.detector.detect(template)?))?;
    if faces.is_empty() {
        return Err(PipelineError::NoTemplateFace { template: name.to_string() });
    }
    let safe_boxes: Vec<[i32; 4]> = faces.iter().map(|f| expand_box(bbox(f), 1.0, w, h)).collect();
    let order = left_to_right(&safe_boxes);
    let mut output = template.clone();
    let mut results = Vec::new();
    let mut scored = Vec::new();
    for (index, (slot, &fi)) in users.iter().zip(&order).enumerate() {
        let Some(user) = slot else { continue };
        cancel.check(STAGE)?;
        // The single-person flow sees one face: the others are painted white.
        let mut alone = template.clone();
        for (_, b) in safe_boxes.iter().enumerate().filter(|(j, _)| *j != fi) {
            let white = RgbImage::from_pixel((b[2] - b[0]) as u32, (b[3] - b[1]) as u32, [255; 3].into());
            paste(&mut alone, &white, b[0].into(), b[1].into());
        }
        let face = infer_face(&alone, &faces[fi], user, components, config, seed, observer, cancel, &mut times)?;
        StageTimes::time(&mut times.post, || {
            let weights = blurred_weights(&box_mask(w, h, safe_boxes[fi]), 32)?;
            output = blend(&face.image, &output, &weights)?;
            Ok(())
        })?;
        results.push(FaceResult { face: index, user_id: user.id.to_string(), score: 0.0, crop_box: face.crop_box });
        scored.push(fi);
    }
    // EasyPhoto's condition: more than one face and more than one user slot (trailing `none`s
    // dropped), even when some of those slots are `none`.
    let slots = users.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
    if faces.len().min(slots) > 1 && !scored.is_empty() {
        cancel.check(STAGE)?;
        let repainted: Vec<[i32; 4]> = scored.iter().map(|&fi| safe_boxes[fi]).collect();
        output = seam_pass(&output, &safe_boxes, &repainted, components, config, seed, observer, cancel, &mut times)?;
    }
    // Display scores on the final image, each face's crop against its user's reference.
    for (r, &fi) in results.iter_mut().zip(&scored) {
        let Some(user) = users[r.face].as_ref() else { continue };
        r.score =
            StageTimes::time(&mut times.face, || display_score(components, &output, r.crop_box, &faces[fi], user))?;
    }
    Ok(TemplateResult { image: output, faces: results, seed, times })
}

/// The result of the single-person flow: the template with the new face pasted in its crop box.
struct FaceOutput {
    image: RgbImage,
    crop_box: [i32; 4],
}

/// EasyPhoto's single-person flow on one template face (steps 2–11 of the module docs).
#[allow(clippy::too_many_arguments)]
fn infer_face(
    template: &RgbImage,
    template_face: &Face,
    user: &UserAssets,
    c: &mut Components,
    config: &InferConfig,
    seed: u64,
    observer: &dyn Observer,
    cancel: &CancelToken,
    times: &mut StageTimes,
) -> Result<FaceOutput> {
    let report = |step: u64, message: &str| {
        observer.progress(Progress { stage: STAGE, step, total: Some(12), message });
        cancel.check(STAGE)
    };
    let (tw, th) = template.dimensions();

    // 2. Crop the face × 3, short side to 512 at multiples of 32, find the face again.
    report(1, "crop face")?;
    let crop_box = expand_box(bbox(template_face), 3.0, tw, th);
    let (input, original) = StageTimes::time(&mut times.post, || {
        let cropped = crop(template, crop_box);
        let (w, h) = crop_size(cropped.dimensions(), config.short_side);
        let original = resize_pil(&cropped, w, h, PilFilter::Lanczos);
        Ok((original.clone(), original))
    })?;
    let (w, h) = input.dimensions();
    let face = face_in_crop(template_face, crop_box, (w, h));
    let input_box = expand_box(bbox(&face), 1.1, w, h);
    let face_width = (input_box[2] - input_box[0]).max(1) as u32;

    // 3. The user's best face warped onto the template face: the openpose input.
    report(2, "affine paste")?;
    let replaced = StageTimes::time(&mut times.face, || replaced_image(&input, &face, user))?;

    // 4. Face fusion before.
    report(3, "face fusion before")?;
    let input = if config.apply_face_fusion_before {
        StageTimes::time(&mut times.face, || fuse(&input, &face, user, config.before_face_fusion_ratio))?
    } else {
        input
    };

    // 5. The first inpainting mask, from the parsed face of the fused crop.
    report(4, "face mask")?;
    let first_mask = StageTimes::time(&mut times.face, || {
        Ok(FaceParts::parse(c.parser.as_ref(), &input, &face)?.first_mask(face_width))
    })?;

    // 6. First diffusion.
    report(5, "control images (first diffusion)")?;
    let first_controls = StageTimes::time(&mut times.preprocess, || {
        Ok(vec![
            (c.canny.clone(), canny_image(&input)?, config.first_canny_weight),
            (c.openpose.clone(), c.pose.control_image(&replaced, &c.device)?, config.first_openpose_weight),
            (c.color.clone(), color_map(&input, 1.0)?, config.first_color_weight),
        ])
    })?;
    report(6, "first diffusion")?;
    let diffusion = Diffusion {
        prompt: prompt(config, user, c),
        negative: config.negative_prompt(),
        steps: config.first_diffusion_steps,
        strength: config.first_denoising_strength,
        seed,
        message: "first diffusion",
    };
    let mut out = StageTimes::time(&mut times.diffusion, || {
        inpaint(c, Some(user), config, &diffusion, &input, &first_mask, first_controls, observer, cancel)
    })?;

    // 7. Colour shift towards the template's face before fusion.
    report(7, "colour shift (middle)")?;
    if config.color_shift_middle {
        out = StageTimes::time(&mut times.post, || {
            shift_colour(c.parser.as_ref(), &out, &original, input_box, &face, false)
        })?;
    }

    // 8. Face fusion after.
    report(8, "face fusion after")?;
    if config.apply_face_fusion_after {
        out = StageTimes::time(&mut times.face, || fuse(&out, &face, user, config.after_face_fusion_ratio))?;
    }

    // 9. Second diffusion on the face outline, eyes and mouth.
    if config.enable_second_diffusion {
        report(9, "control images (second diffusion)")?;
        let controls = StageTimes::time(&mut times.preprocess, || {
            Ok(vec![
                (c.canny.clone(), canny_image(&out)?, config.second_canny_weight),
                (c.tile.clone(), tile_resample(&out, 1.0)?, config.second_tile_weight),
            ])
        })?;
        let second_mask =
            StageTimes::time(&mut times.face, || FaceParts::parse(c.parser.as_ref(), &out, &face)?.second_mask())?;
        report(10, "second diffusion")?;
        let diffusion = Diffusion {
            steps: config.second_diffusion_steps,
            strength: config.second_denoising_strength,
            message: "second diffusion",
            ..diffusion
        };
        out = StageTimes::time(&mut times.diffusion, || {
            inpaint(c, Some(user), config, &diffusion, &out, &second_mask, controls, observer, cancel)
        })?;
    }

    // 10. Colour shift, lips excluded.
    report(11, "colour shift (last)")?;
    if config.color_shift_last {
        out = StageTimes::time(&mut times.post, || {
            shift_colour(c.parser.as_ref(), &out, &original, input_box, &face, true)
        })?;
    }

    // 11. Paste back: the crop resized to its box in the template.
    report(12, "paste back")?;
    let image = StageTimes::time(&mut times.post, || {
        let (bw, bh) = ((crop_box[2] - crop_box[0]) as u32, (crop_box[3] - crop_box[1]) as u32);
        let mut image = template.clone();
        paste(&mut image, &resize_pil(&out, bw, bh, PilFilter::Lanczos), crop_box[0].into(), crop_box[1].into());
        Ok(image)
    })?;
    Ok(FaceOutput { image, crop_box })
}

/// EasyPhoto's face-parsing label sets (anatomy §2.2) as 0/255 masks, from any [`FaceParser`].
#[derive(Debug, Clone)]
pub struct FaceParts {
    /// `FACE` (BiSeNet's skin, brows, eyes, nose, mouth and lips: labels 1–5, 10–13).
    pub face: GrayImage,
    /// The eyes and lips (labels 4, 5, 12, 13).
    pub eyes_lips: GrayImage,
    /// The lips (labels 11–13), which the last colour shift leaves out.
    pub lips: GrayImage,
}

impl FaceParts {
    /// The parts of `face` in `image`.
    pub fn parse(parser: &dyn FaceParser, image: &RgbImage, face: &Face) -> Result<Self> {
        let r = parser.parse(image, face)?;
        let union = |masks: &[&GrayImage]| {
            GrayImage::from_fn(image.width(), image.height(), |x, y| {
                Luma([masks.iter().map(|m| m[(x, y)][0]).max().unwrap_or(0)])
            })
        };
        Ok(Self {
            face: union(&[&r.face_oval, &r.brows, &r.eyes, &r.lips]),
            eyes_lips: union(&[&r.eyes, &r.lips]),
            lips: r.lips,
        })
    }

    /// The first diffusion's mask: the face closed and dilated by `face_width / 10` (the width of
    /// the face's × 1.1 box).
    pub fn first_mask(&self, face_width: u32) -> GrayImage {
        inpaint_face_mask(&self.face, face_width)
    }

    /// The second diffusion's mask: `dilate32(face) − erode16(face)` plus the eyes and lips.
    pub fn second_mask(&self) -> Result<GrayImage> {
        Ok(contour_mask(&self.face, &self.eyes_lips)?)
    }

    /// The last colour shift's region: the face without the lips.
    fn without_lips(&self) -> GrayImage {
        GrayImage::from_fn(self.face.width(), self.face.height(), |x, y| {
            Luma([if self.lips[(x, y)][0] > 0 { 0 } else { self.face[(x, y)][0] }])
        })
    }
}

/// The prompt of one user, as EasyPhoto builds it; the style LoRA's tag only when it is loaded.
fn prompt(config: &InferConfig, user: &UserAssets, c: &Components) -> String {
    let prompt = config.prompt(user.id.as_str());
    if c.style_lora.is_some() {
        prompt
    } else {
        prompt.replace(&format!("<lora:{}:{}>, ", config.style_lora, config.style_lora_weight), "")
    }
}

/// The settings of one diffusion pass.
#[derive(Clone)]
struct Diffusion {
    prompt: String,
    negative: String,
    steps: u32,
    strength: f64,
    seed: u64,
    message: &'static str,
}

/// A1111's img2img inpainting ("original" fill, whole picture) with the blend loop on an
/// ordinary UNet: `mask` (255 = repaint, at the image's size) blurred by `mask_blur`, then
/// [`inpaint_blurred`].
#[allow(clippy::too_many_arguments)]
fn inpaint(
    c: &mut Components,
    user: Option<&UserAssets>,
    config: &InferConfig,
    d: &Diffusion,
    image: &RgbImage,
    mask: &GrayImage,
    controls: Vec<(Arc<ControlNetModel>, RgbImage, f64)>,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<RgbImage> {
    let blurred = blur_mask(mask, f64::from(config.mask_blur));
    inpaint_blurred(c, user, config, d, image, &blurred, controls, observer, cancel)
}

/// The WebUI's inpainting from its blurred mask: the LoRAs the prompt names (the user's and the
/// style LoRA) attached, the control units in "my prompt is more important" mode, the known
/// latents kept through the latent mask, then the original laid back through the overlay mask
/// (the blurred mask doubled).
#[allow(clippy::too_many_arguments)]
fn inpaint_blurred(
    c: &mut Components,
    user: Option<&UserAssets>,
    config: &InferConfig,
    d: &Diffusion,
    image: &RgbImage,
    blurred: &GrayImage,
    controls: Vec<(Arc<ControlNetModel>, RgbImage, f64)>,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<RgbImage> {
    let (_, networks) = parse_extra_networks(&d.prompt)?;
    let mut loras: Vec<(&KohyaLora, f64)> = Vec::new();
    for network in &networks {
        if let ExtraNetwork::Lora { name, unet_multiplier, .. } = network {
            if let Some(user) = user.filter(|u| name == u.id.as_str()) {
                loras.push((&user.lora, *unet_multiplier));
            } else if let Some((style, lora)) = &c.style_lora
                && style == name
            {
                loras.push((lora, *unet_multiplier));
            }
        }
    }
    {
        let mut te = c.sd.text_encoders.encoders_mut().next();
        let mut targets = Targets {
            unet: Some(&mut c.sd.unet),
            text_encoder: te.as_mut().map(|e| &mut **e as &mut dyn VisitLayers),
            text_encoder_2: None,
        };
        attach(&mut targets, &loras)?;
    }
    let generated = sample(c, config, d, image, blurred, controls, observer, cancel);
    let mut te = c.sd.text_encoders.encoders_mut().next();
    detach(&mut Targets {
        unet: Some(&mut c.sd.unet),
        text_encoder: te.as_mut().map(|e| &mut **e as &mut dyn VisitLayers),
        text_encoder_2: None,
    });
    Ok(apply_overlay(&generated?, image, &overlay(blurred))?)
}

/// The WebUI's `mask_for_overlay`: the blurred mask doubled, clipped to 255.
fn overlay(blurred: &GrayImage) -> GrayImage {
    let mut out = blurred.clone();
    out.iter_mut().for_each(|v| *v = v.saturating_mul(2));
    out
}

/// The sampling part of [`inpaint_blurred`]: the generated image before the composite.
#[allow(clippy::too_many_arguments)]
fn sample(
    c: &Components,
    config: &InferConfig,
    d: &Diffusion,
    image: &RgbImage,
    blurred: &GrayImage,
    controls: Vec<(Arc<ControlNetModel>, RgbImage, f64)>,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<RgbImage> {
    let sd = &c.sd;
    let device = &c.device;
    let tensor_err = |stage: &str| {
        let stage = stage.to_string();
        move |source| PipelineError::Tensor { stage: stage.clone(), source: Box::new(source) }
    };
    let (w, h) = image.dimensions();
    let (text, _) = sd.text_encoders.conditioning(&d.prompt, &d.negative)?;
    let sampler: Sampler = config.sampler_name.parse()?;
    let mut scheduler = sampler.config(&sd.scheduler_config)?.build()?;
    let mut noise = SeededNoise::new(d.seed);

    let pixels = rgb_tensor(image, device).map_err(tensor_err(d.message))?;
    let posterior = sd.vae.encode(&normalize_image(&pixels)?)?;
    let factor = sd.vae.config().downscale_factor();
    let latent_shape = (1, sd.vae.config().latent_channels, h as usize / factor, w as usize / factor);
    let draw = noise.randn(latent_shape, DType::F32, device).map_err(tensor_err(d.message))?;
    let latents = (posterior.sample_with(&draw).map_err(tensor_err(d.message))? * sd.vae.scaling_factor())
        .map_err(tensor_err(d.message))?;
    let latent_mask = latent_mask(blurred, factor as u32, device)?;

    let units = controls
        .into_iter()
        .map(|(model, control, weight)| {
            let control = if control.dimensions() == (w, h) {
                control
            } else {
                let shrink = control.width() > w;
                resize(&control, w, h, if shrink { Interpolation::Area } else { Interpolation::Cubic })?
            };
            let image = rgb_tensor(&control, device).map_err(tensor_err("control image"))?;
            Ok(ControlUnit { weight, mode: ControlMode::PromptMoreImportant, ..ControlUnit::new(model, image) })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut controls = Controls::new(units);

    let options = SamplingOptions { num_inference_steps: d.steps as usize, guidance_scale: config.cfg_scale };
    let mut progress = |p: &easyphoto_diffusion::sampling::Progress| {
        observer.progress(Progress {
            stage: STAGE,
            step: p.step as u64,
            total: Some(p.total as u64),
            message: d.message,
        });
        if cancel.is_cancelled() { SamplerFlow::Cancel } else { SamplerFlow::Continue }
    };
    let start = Start::Image { latents: latents.clone(), strength: d.strength };
    let inpaint = Inpaint::Blend { mask: latent_mask, image_latents: latents };
    let result = denoise_with_residuals(
        &sd.unet,
        scheduler.as_mut(),
        &text,
        start,
        Some(&inpaint),
        &options,
        &mut noise,
        &mut progress,
        Some(&mut controls),
    );
    let latents = match result {
        Err(DiffusionError::Cancelled { .. }) => return Err(PipelineError::Cancelled { stage: d.message.into() }),
        other => other?,
    };
    let decoded = decode_latents(&sd.vae, &latents)?;
    tensor_rgb(&decoded).map_err(tensor_err(d.message))
}

/// EasyPhoto's seam pass (its third diffusion) over the faces `repainted` in `image`: the ring
/// `dilate64(boxes) − erode32(boxes)` around their safe boxes, inpainted in the square around all
/// the template's faces (`all_boxes`, + 50 px), at most 768 on its short side (512 when one side
/// is over 1.5 times the other; both scaled by `short_side / 512`), sides floored to multiples of 32; canny 1.0 + colour 1.0,
/// the additional prompt without LoRAs. The result is resized back (Pillow's BICUBIC) and laid over
/// the square through the overlay mask at full resolution, so nothing outside the ring's blur changes.
#[allow(clippy::too_many_arguments)]
fn seam_pass(
    image: &RgbImage,
    all_boxes: &[[i32; 4]],
    repainted: &[[i32; 4]],
    c: &mut Components,
    config: &InferConfig,
    seed: u64,
    observer: &dyn Observer,
    cancel: &CancelToken,
    times: &mut StageTimes,
) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    let square = seam_square(all_boxes, w, h);
    let (sub, ring, small, small_mask) = StageTimes::time(&mut times.post, || {
        let mut boxes = GrayImage::new(w, h);
        for b in repainted {
            for y in b[1].max(0)..b[3].min(h as i32) {
                for x in b[0].max(0)..b[2].min(w as i32) {
                    boxes.put_pixel(x as u32, y as u32, Luma([255]));
                }
            }
        }
        let (outer, inner) = (dilate(&boxes, 64, 64), erode(&boxes, 32, 32));
        let ring = GrayImage::from_fn(w, h, |x, y| Luma([outer[(x, y)][0] - inner[(x, y)][0]]));
        let sub = crop(image, square);
        let ring = blur_mask(&crop(&ring, square), f64::from(config.mask_blur));
        let (sw, sh) = sub.dimensions();
        let (nw, nh) = seam_size(sw, sh, config.short_side);
        let small = resize_pil(&sub, nw, nh, PilFilter::Lanczos);
        let small_mask = resize_pil(&ring, nw, nh, PilFilter::Lanczos);
        Ok((sub, ring, small, small_mask))
    })?;
    let controls = StageTimes::time(&mut times.preprocess, || {
        // EasyPhoto's fixed weights: canny 1.0, colour 1.0.
        Ok(vec![(c.canny.clone(), canny_image(&small)?, 1.0), (c.color.clone(), color_map(&small, 1.0)?, 1.0)])
    })?;
    let diffusion = Diffusion {
        prompt: format!("{}, {}", config.additional_prompt, config.default_positive_prompt),
        negative: config.negative_prompt(),
        steps: config.seam_diffusion_steps,
        strength: config.seam_denoising_strength,
        seed,
        message: "seam diffusion",
    };
    let generated = StageTimes::time(&mut times.diffusion, || {
        inpaint_blurred(c, None, config, &diffusion, &small, &small_mask, controls, observer, cancel)
    })?;
    StageTimes::time(&mut times.post, || {
        let back = resize_pil(&generated, sub.width(), sub.height(), PilFilter::Bicubic);
        let laid = apply_overlay(&back, &sub, &overlay(&ring))?;
        let mut out = image.clone();
        paste(&mut out, &laid, square[0].into(), square[1].into());
        Ok(out)
    })
}

/// The seam pass's square: the union of `boxes` padded by 50 px, centred, its long side on both
/// axes, clipped to `[0, size − 1]` (EasyPhoto's `np.clip(…, 0, w − 1)`).
fn seam_square(boxes: &[[i32; 4]], w: u32, h: u32) -> [i32; 4] {
    const PADDING: i32 = 50;
    let left = boxes.iter().map(|b| b[0]).min().unwrap_or(0) - PADDING;
    let top = boxes.iter().map(|b| b[1]).min().unwrap_or(0) - PADDING;
    let right = boxes.iter().map(|b| b[2]).max().unwrap_or(w as i32) + PADDING;
    let bottom = boxes.iter().map(|b| b[3]).max().unwrap_or(h as i32) + PADDING;
    let long = (right - left).max(bottom - top);
    let (cx, cy) = (f64::from(left + right) / 2.0, f64::from(top + bottom) / 2.0);
    let (wm, hm) = (w.saturating_sub(1) as i32, h.saturating_sub(1) as i32);
    let x1 = (cx - f64::from(long / 2)).clamp(0.0, f64::from(wm)) as i32;
    let y1 = (cy - f64::from(long / 2)).clamp(0.0, f64::from(hm)) as i32;
    [x1, y1, (x1 + long).clamp(0, wm), (y1 + long).clamp(0, hm)]
}

/// The seam pass's diffusion size for a `w × h` square: short side 768 at most (512 when one side
/// is over 1.5 times the other), both scaled by `short_side / 512` like the face crops, both sides
/// floored to multiples of 32 (at least 32).
fn seam_size(w: u32, h: u32, short_side: u32) -> (u32, u32) {
    let (fw, fh) = (f64::from(w), f64::from(h));
    let target = if fw / fh > 1.5 || fh / fw > 1.5 { short_side } else { short_side * 3 / 2 };
    let short = w.min(h);
    let scale = if short > target { f64::from(short) / f64::from(target) } else { 1.0 };
    let side = |s: u32| ((py_floor_div(py_floor_div(f64::from(s), scale), 32.0) * 32.0) as u32).max(32);
    (side(w), side(h))
}

/// EasyPhoto's "replaced image": the user's best face (its × 1.5 crop) warped by the similarity
/// of its five landmarks onto the template face's, pasted where the warped crop lands.
fn replaced_image(template: &RgbImage, face: &Face, user: &UserAssets) -> Result<RgbImage> {
    let (uw, uh) = user.face_id.dimensions();
    let ub = expand_box(bbox(&user.face_id_face), 1.5, uw, uh);
    let user_crop = crop(&user.face_id, ub);
    let src = user.face_id_face.landmarks.map(|[x, y]| [x - ub[0] as f32, y - ub[1] as f32]);
    let m = Similarity::estimate(&src, &face.landmarks)?.matrix();
    let (w, h) = template.dimensions();
    let warped = warp_affine(&user_crop, &m, w, h);
    let coverage = warp_affine(&GrayImage::from_pixel(user_crop.width(), user_crop.height(), Luma([255])), &m, w, h);
    let mut out = template.clone();
    for ((o, p), m) in out.pixels_mut().zip(warped.pixels()).zip(coverage.pixels()) {
        if m[0] != 0 {
            *o = *p;
        }
    }
    Ok(out)
}

/// Face fusion of the user's reference face into `image` at `face`, with EasyPhoto's ratio.
fn fuse(image: &RgbImage, face: &Face, user: &UserAssets, ratio: f64) -> Result<RgbImage> {
    let fusion = ClassicalFusion { params: FusionParams { ratio: ratio as f32, ..FusionParams::default() } };
    Ok(fusion.fuse(image, face, &user.reference, &user.reference_face)?)
}

/// EasyPhoto's colour shift of the `input_box` region of `image` towards the same region of
/// `original` (the crop before fusion), through `box_blur32(face) / 255` of the face parsed in
/// `image`, lips excluded on the last pass.
fn shift_colour(
    parser: &dyn FaceParser,
    image: &RgbImage,
    original: &RgbImage,
    bx: [i32; 4],
    face: &Face,
    no_lips: bool,
) -> Result<RgbImage> {
    let region = crop(image, bx);
    let reference = crop(original, bx);
    let parts = FaceParts::parse(parser, image, face)?;
    let mask = crop(&if no_lips { parts.without_lips() } else { parts.face }, bx);
    let shifted = color_shift(&region, &reference, &blurred_weights(&mask, 32)?)?;
    let mut out = image.clone();
    paste(&mut out, &shifted, bx[0].into(), bx[1].into());
    Ok(out)
}

/// `box_blur(mask, k) / 255` in f32: EasyPhoto's feathered composite weights.
fn blurred_weights(mask: &GrayImage, k: u32) -> Result<Plane<f32>> {
    let plane = Plane::<f32>::from_fn(mask.width(), mask.height(), |x, y| Luma([f32::from(mask[(x, y)][0])]));
    let blurred = box_blur(&plane, k, k)?;
    Ok(Plane::from_fn(mask.width(), mask.height(), |x, y| Luma([blurred[(x, y)][0] / 255.0])))
}

/// The canny unit's control image: controlnet_aux's canny (100 / 200 at resolution 512).
fn canny_image(image: &RgbImage) -> Result<RgbImage> {
    let edges = annotate_canny(image, 100.0, 200.0, 512)?;
    Ok(RgbImage::from_fn(edges.width(), edges.height(), |x, y| {
        let v = edges[(x, y)][0];
        [v, v, v].into()
    }))
}

/// The display score of the face in `crop_box` of `image` (the template's face `face`) against
/// the user's reference.
fn display_score(c: &Components, image: &RgbImage, crop_box: [i32; 4], face: &Face, user: &UserAssets) -> Result<f32> {
    let region = crop(image, crop_box);
    let found = c.detector.detect(&region)?.into_iter().max_by(|a, b| area(a).total_cmp(&area(b)));
    let (w, h) = region.dimensions();
    let face = found.unwrap_or_else(|| face_in_crop(face, crop_box, (w, h)));
    let embedding = c.embedder.embed(&region, &face)?;
    Ok(easyphoto_face::cosine_similarity(&embedding, &user.reference_embedding))
}

/// `face` in the coordinates of its crop `crop_box` resized to `size` (EasyPhoto detects it again
/// in the resized crop; mapping the template's detection is the same face without a second run).
fn face_in_crop(face: &Face, crop_box: [i32; 4], (w, h): (u32, u32)) -> Face {
    let sx = w as f32 / (crop_box[2] - crop_box[0]).max(1) as f32;
    let sy = h as f32 / (crop_box[3] - crop_box[1]).max(1) as f32;
    let map = |[x, y]: [f32; 2]| [(x - crop_box[0] as f32) * sx, (y - crop_box[1] as f32) * sy];
    let [x1, y1] = map([face.bbox[0], face.bbox[1]]);
    let [x2, y2] = map([face.bbox[2], face.bbox[3]]);
    Face { bbox: [x1, y1, x2, y2], score: face.score, landmarks: face.landmarks.map(map) }
}

/// The largest face of `image` (EasyPhoto takes the first; crops hold one face, photos may not).
fn largest_face(c: &Components, image: &RgbImage, what: &str) -> Result<Face> {
    let faces = c.detector.detect_some(image, what)?;
    Ok(*faces.iter().max_by(|a, b| area(a).total_cmp(&area(b))).expect("detect_some returns a face"))
}

fn area(f: &Face) -> f32 {
    f.width() * f.height()
}

fn bbox(f: &Face) -> [f64; 4] {
    f.bbox.map(f64::from)
}

/// EasyPhoto's crop size: `side // (short / 512)` (float floor division), floored to multiples of 32.
pub fn crop_size((w, h): (u32, u32), short_side: u32) -> (u32, u32) {
    let scale = f64::from(w.min(h)) / f64::from(short_side);
    let side = |s: u32| ((py_floor_div(f64::from(s), scale) as u32) / 32 * 32).max(32);
    (side(w), side(h))
}

/// Python's `a // b` on positive floats (CPython's `float_floor_div`: through `fmod`, so that
/// `700 // (700 / 512)` is 512, not the 511 of `floor(a / b)`).
fn py_floor_div(a: f64, b: f64) -> f64 {
    let div = (a - a % b) / b;
    let floor = div.floor();
    if div - floor > 0.5 { floor + 1.0 } else { floor }
}

/// Pillow's `Image.resize((w, h), filter)` of an 8-bit RGB or grey image.
fn resize_pil<P>(image: &ImageBuffer<P, Vec<u8>>, w: u32, h: u32, filter: PilFilter) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    if image.dimensions() == (w, h) {
        return image.clone();
    }
    let (sw, sh) = image.dimensions();
    let channels = usize::from(P::CHANNEL_COUNT);
    let data = resize_pil_u8(image.as_raw(), (sw as usize, sh as usize), channels, (w as usize, h as usize), filter);
    ImageBuffer::from_raw(w, h, data).expect("resize returns w * h * channels values")
}

/// An RGB image as a `[1, 3, H, W]` tensor in [0, 1].
fn rgb_tensor(image: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)
}

/// `[1, 3, H, W]` in [0, 1] to 8-bit RGB as A1111 does (`(255 · x).astype(uint8)`, truncating).
fn tensor_rgb(t: &Tensor) -> candle_core::Result<RgbImage> {
    let (_, _, h, w) = t.dims4()?;
    let data: Vec<u8> = (t.squeeze(0)?.permute((1, 2, 0))? * 255.0)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v.clamp(0.0, 255.0) as u8)
        .collect();
    Ok(RgbImage::from_raw(w as u32, h as u32, data).expect("tensor of w * h * 3 values"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seam_square_and_size_follow_easyphotos_rules() {
        // Values from EasyPhoto's third-diffusion code run in Python (numpy clip, `//` on floats).
        assert_eq!(seam_square(&[[130, 100, 200, 190], [495, 60, 565, 150]], 640, 427), [80, 0, 615, 426]);
        assert_eq!(seam_square(&[[300, 300, 371, 390]], 1000, 1200), [240, 250, 430, 440]);
        assert_eq!(seam_square(&[[10, 20, 81, 95], [900, 700, 990, 800]], 1000, 1200), [0, 0, 999, 1080]);
        for ((w, h), expected) in [
            ((523, 426), (512, 416)),
            ((1000, 1000), (768, 768)),
            ((1300, 800), (832, 512)),
            ((900, 500), (896, 480)),
            ((95, 95), (64, 64)),
        ] {
            assert_eq!(seam_size(w, h, 512), expected, "{w}×{h}");
        }
        // Scaled with the face crops' short side for small runs: 64 → at most 96 (64 when elongated).
        assert_eq!(seam_size(523, 426, 64), (96, 96));
    }

    #[test]
    fn crop_size_follows_easyphotos_integer_rule() {
        // Values from Python: `[int(s // (min(w, h) / 512)) // 32 * 32 for s in (w, h)]`.
        assert_eq!(crop_size((300, 450), 512), (512, 768));
        assert_eq!(crop_size((333, 500), 512), (512, 768));
        assert_eq!(crop_size((1000, 700), 512), (704, 512));
        assert_eq!(crop_size((700, 700), 512), (512, 512));
        assert_eq!(crop_size((913, 1371), 512), (512, 768));
    }
}
