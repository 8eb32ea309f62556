//! The models of the infer flow, loaded once and shared by every template: the SD1.5 base (single
//! file or diffusers folder, with EasyPhoto's forced VAE), the four ControlNets (canny, openpose,
//! colour, tile), the pose annotator, the face detector, parser and identity embedder, and the
//! style LoRA.
//!
//! [`ComponentPaths::from_models_dir`] resolves every file through the [`Manifest`] (refusing with
//! the offline error that lists what is missing and where to put it); tests and servers may name
//! the files directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use easyphoto_controlnet::preprocess::openpose::{BodyPoseModel, MoveNet, annotate_openpose};
use easyphoto_controlnet::preprocess::{Interpolation, resize};
use easyphoto_controlnet::{ControlNetModel, load_controlnet};
use easyphoto_diffusion::{StableDiffusion, load_vae};
use easyphoto_face::{ArcFace, FaceDetector, FaceEmbedder, FaceMesh, FaceParser, FaceRes, Scrfd, VerifiedMtcnn};
use easyphoto_lora::{KohyaLora, load_lora};
use image::RgbImage;

use crate::config::InferConfig;
use crate::error::{PipelineError, Result};
use crate::models::{Flow, Manifest};

/// The pose annotator that draws the openpose unit's control image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoseModelPath {
    /// MoveNet Lightning ONNX (the default: fast, one person).
    MoveNet(PathBuf),
    /// lllyasviel's `body_pose_model.pth` (controlnet_aux's OpenPose, body only).
    OpenposeBody(PathBuf),
}

/// The identity embedder of the display score and the user's reference face.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedderPath {
    /// insightface `w600k_r50.onnx` (or any ArcFace-layout model).
    ArcFace(PathBuf),
    /// Human's `faceres.onnx`.
    FaceRes(PathBuf),
}

/// Where each model of the infer flow is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentPaths {
    /// SD1.5 checkpoint: a single `.safetensors` / `.ckpt` or a diffusers pipeline folder.
    pub base: PathBuf,
    /// A VAE replacing the base's (EasyPhoto forces `vae-ft-mse-840000-ema-pruned`).
    pub vae: Option<PathBuf>,
    pub canny: PathBuf,
    pub openpose: PathBuf,
    pub color: PathBuf,
    pub tile: PathBuf,
    pub pose: PoseModelPath,
    /// SCRFD ONNX model; `None` uses the built-in detector (MTCNN proposals confirmed by
    /// BlazeFace, `VerifiedMtcnn`).
    pub detector: Option<PathBuf>,
    pub embedder: EmbedderPath,
    /// The style LoRA EasyPhoto adds to every prompt (`FilmVelvia3`); `None` drops its tag.
    pub style_lora: Option<PathBuf>,
}

impl ComponentPaths {
    /// The files of the infer flow under `models_dir`, as the manifest places them. The base is
    /// `config.sd_model_checkpoint` when that is an existing path, otherwise that file name in
    /// the base checkpoint's folder. MoveNet is used when
    /// `annotator/movenet/human_movenet-lightning.onnx` is present, the OpenPose body model otherwise.
    pub fn from_models_dir(
        manifest: &Manifest,
        models_dir: &Path,
        config: &InferConfig,
        endpoint: &str,
    ) -> Result<Self> {
        manifest.require(models_dir, Some(Flow::Infer), endpoint)?;
        let path = |name: &str| manifest.get(name).map(|m| m.local_path(models_dir));
        let default_base = path("chilloutmix")?;
        let named = Path::new(&config.sd_model_checkpoint);
        let base = if named.exists() {
            named.to_path_buf()
        } else {
            default_base.parent().unwrap_or(models_dir).join(&config.sd_model_checkpoint)
        };
        if !base.exists() {
            return Err(PipelineError::InvalidInput {
                path: base,
                reason: "sd_model_checkpoint: no such checkpoint file or diffusers folder".into(),
            });
        }
        let movenet = models_dir.join("annotator/movenet/human_movenet-lightning.onnx");
        let pose = if movenet.is_file() {
            PoseModelPath::MoveNet(movenet)
        } else {
            PoseModelPath::OpenposeBody(path("openpose-body")?)
        };
        let style = path("film-velvia3")?;
        Ok(Self {
            base,
            vae: Some(path("vae-ft-mse")?),
            canny: path("controlnet-canny")?,
            openpose: path("controlnet-openpose")?,
            color: path("controlnet-color")?,
            tile: path("controlnet-tile")?,
            pose,
            detector: Some(path("scrfd-10g")?),
            embedder: EmbedderPath::ArcFace(path("arcface-r50")?),
            style_lora: (config.style_lora == "FilmVelvia3").then_some(style),
        })
    }
}

/// The pose annotator, loaded.
pub enum PoseModel {
    MoveNet(MoveNet),
    OpenposeBody(BodyPoseModel),
}

impl PoseModel {
    /// The openpose control image of `image`, at its size.
    pub fn control_image(&self, image: &RgbImage, device: &Device) -> Result<RgbImage> {
        match self {
            Self::MoveNet(m) => Ok(m.control_image(image)?),
            Self::OpenposeBody(m) => {
                let drawn = annotate_openpose(m, image, 512, device)?;
                let (w, h) = image.dimensions();
                let interpolation = if drawn.width() > w { Interpolation::Area } else { Interpolation::Cubic };
                Ok(resize(&drawn, w, h, interpolation)?)
            }
        }
    }
}

/// Every model of the infer flow.
pub struct Components {
    pub sd: StableDiffusion,
    pub canny: Arc<ControlNetModel>,
    pub openpose: Arc<ControlNetModel>,
    pub color: Arc<ControlNetModel>,
    pub tile: Arc<ControlNetModel>,
    pub pose: PoseModel,
    pub detector: Box<dyn FaceDetector + Send + Sync>,
    /// The face parser of every face-region mask (EasyPhoto's BiSeNet; the embedded MediaPipe
    /// FaceMesh by default, any other [`FaceParser`] can replace it).
    pub parser: Box<dyn FaceParser + Send + Sync>,
    pub embedder: Box<dyn FaceEmbedder + Send + Sync>,
    /// The style LoRA and the name prompts call it by (the file stem).
    pub style_lora: Option<(String, KohyaLora)>,
    pub device: Device,
}

impl Components {
    /// Loads everything in `dtype` on `device`; ONNX models run on `threads` CPU threads.
    pub fn load(paths: &ComponentPaths, dtype: DType, device: &Device, threads: usize) -> Result<Self> {
        let mut sd = StableDiffusion::load(&paths.base, 1, dtype, device)?;
        if let Some(vae) = &paths.vae {
            sd.vae = load_vae(vae, dtype, device)?;
        }
        let controlnet =
            |p: &Path| -> Result<Arc<ControlNetModel>> { Ok(Arc::new(load_controlnet(p, None, dtype, device)?)) };
        let pose = match &paths.pose {
            // One ONNX Runtime environment per process: MoveNet runs on the face crate's.
            PoseModelPath::MoveNet(p) => PoseModel::MoveNet(MoveNet::load_in(p, &easyphoto_face::environment()?)?),
            PoseModelPath::OpenposeBody(p) => PoseModel::OpenposeBody(BodyPoseModel::load(p, device)?),
        };
        let detector: Box<dyn FaceDetector + Send + Sync> = match &paths.detector {
            Some(p) => Box::new(Scrfd::load(p, threads)?),
            None => Box::new(VerifiedMtcnn::new(threads)?),
        };
        let embedder: Box<dyn FaceEmbedder + Send + Sync> = match &paths.embedder {
            EmbedderPath::ArcFace(p) => Box::new(ArcFace::load(p, threads)?),
            EmbedderPath::FaceRes(p) => Box::new(FaceRes::load(p, threads)?),
        };
        let style_lora = match &paths.style_lora {
            Some(p) => {
                let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("style").to_string();
                Some((name, load_lora(p, device)?))
            }
            None => None,
        };
        Ok(Self {
            sd,
            canny: controlnet(&paths.canny)?,
            openpose: controlnet(&paths.openpose)?,
            color: controlnet(&paths.color)?,
            tile: controlnet(&paths.tile)?,
            pose,
            detector,
            parser: Box::new(FaceMesh::embedded(threads)?),
            embedder,
            style_lora,
            device: device.clone(),
        })
    }
}
