//! The OpenPose body network (CMU's VGG-19 front and six two-branch stages) that the WebUI
//! annotator runs, loaded from the original `body_pose_model.pth`.
//!
//! The checkpoint's keys are the layer names without a module prefix (`conv1_1.weight`,
//! `conv5_5_CPM_L2.bias`, `Mconv7_stage6_L1.weight`); controlnet_aux strips its `model0.` /
//! `model1_1.` … prefixes to load it the same way. Branch `L1` gives the 38 part-affinity-field
//! channels, branch `L2` the 19 heat maps (18 parts and background).
//!
//! One quirk of the reference is kept: its list of layers without ReLU names `Mconv7_stage6_L1` twice
//! and omits `Mconv7_stage6_L2`, so the final heat maps pass through a ReLU.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::preprocess::PreprocessError;

/// One layer of a branch: a convolution (with or without ReLU) or a 2×2 max-pool.
#[derive(Debug)]
enum Layer {
    Conv { conv: Conv2d, relu: bool },
    Pool,
}

/// (name, in, out, kernel) of the VGG front; `None` is a 2×2 max-pool.
const FRONT: [Option<(&str, usize, usize, usize)>; 15] = [
    Some(("conv1_1", 3, 64, 3)),
    Some(("conv1_2", 64, 64, 3)),
    None,
    Some(("conv2_1", 64, 128, 3)),
    Some(("conv2_2", 128, 128, 3)),
    None,
    Some(("conv3_1", 128, 256, 3)),
    Some(("conv3_2", 256, 256, 3)),
    Some(("conv3_3", 256, 256, 3)),
    Some(("conv3_4", 256, 256, 3)),
    None,
    Some(("conv4_1", 256, 512, 3)),
    Some(("conv4_2", 512, 512, 3)),
    Some(("conv4_3_CPM", 512, 256, 3)),
    Some(("conv4_4_CPM", 256, 128, 3)),
];

/// Output channels of branch L1 (part affinity fields) and L2 (heat maps).
const BRANCH_OUT: [usize; 2] = [38, 19];
/// Channels entering stages 2–6: both branch outputs and the front's 128 features.
const STAGE_IN: usize = 38 + 19 + 128;

/// (name, in, out, kernel) of every convolution of stage `stage` (1–6), branch `branch` (1 or 2).
fn stage_layers(stage: usize, branch: usize) -> Vec<(String, usize, usize, usize)> {
    let out = BRANCH_OUT[branch - 1];
    if stage == 1 {
        let shapes = [(128, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out, 1)];
        return shapes
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, k))| (format!("conv5_{}_CPM_L{branch}", i + 1), cin, cout, k))
            .collect();
    }
    let shapes =
        [(STAGE_IN, 128, 7), (128, 128, 7), (128, 128, 7), (128, 128, 7), (128, 128, 7), (128, 128, 1), (128, out, 1)];
    shapes
        .iter()
        .enumerate()
        .map(|(i, &(cin, cout, k))| (format!("Mconv{}_stage{stage}_L{branch}", i + 1), cin, cout, k))
        .collect()
}

/// Every weight key of the original checkpoint, in network order.
pub fn checkpoint_keys() -> Vec<String> {
    let mut names: Vec<String> = FRONT.iter().flatten().map(|(name, ..)| name.to_string()).collect();
    for stage in 1..=6 {
        for branch in 1..=2 {
            names.extend(stage_layers(stage, branch).into_iter().map(|(name, ..)| name));
        }
    }
    names.into_iter().flat_map(|n| [format!("{n}.weight"), format!("{n}.bias")]).collect()
}

fn conv(vb: &VarBuilder, name: &str, cin: usize, cout: usize, k: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig { padding: k / 2, ..Default::default() };
    candle_nn::conv2d(cin, cout, k, cfg, vb.pp(name))
}

/// The body network: `forward` maps a `[N, 3, H, W]` image (BGR, `x / 256 − 0.5`, H and W multiples of
/// 8) to part affinity fields `[N, 38, H/8, W/8]` and heat maps `[N, 19, H/8, W/8]`.
#[derive(Debug)]
pub struct BodyPoseModel {
    front: Vec<Layer>,
    /// Stages 1–6, each with branch L1 and branch L2.
    stages: Vec<[Vec<Layer>; 2]>,
}

impl BodyPoseModel {
    /// Builds the network from weights under the original checkpoint's keys.
    pub fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let front = FRONT
            .iter()
            .map(|layer| match layer {
                Some((name, cin, cout, k)) => Ok(Layer::Conv { conv: conv(&vb, name, *cin, *cout, *k)?, relu: true }),
                None => Ok(Layer::Pool),
            })
            .collect::<candle_core::Result<_>>()?;
        let stages = (1..=6)
            .map(|stage| {
                let branch = |b: usize| -> candle_core::Result<Vec<Layer>> {
                    let layers = stage_layers(stage, b);
                    let last = layers.len() - 1;
                    layers
                        .iter()
                        .enumerate()
                        .map(|(i, (name, cin, cout, k))| {
                            // The reference forgets to exempt Mconv7_stage6_L2 from its ReLU.
                            let relu = i != last || (stage == 6 && b == 2);
                            Ok(Layer::Conv { conv: conv(&vb, name, *cin, *cout, *k)?, relu })
                        })
                        .collect()
                };
                Ok([branch(1)?, branch(2)?])
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { front, stages })
    }

    /// Loads `body_pose_model.pth` (a PyTorch zip checkpoint) or a `.safetensors` file with the same
    /// keys, checking that every weight is present first.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, PreprocessError> {
        let path = path.as_ref();
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let tensors: Vec<(String, Tensor)> = if is_safetensors {
            candle_core::safetensors::load(path, device)
                .map_err(|source| PreprocessError::Checkpoint { path: path.to_path_buf(), source })?
                .into_iter()
                .collect()
        } else {
            candle_core::pickle::read_all(path)
                .map_err(|source| PreprocessError::Checkpoint { path: path.to_path_buf(), source })?
        };
        let tensors: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        if let Some(key) = checkpoint_keys().into_iter().find(|k| !tensors.contains_key(k)) {
            return Err(PreprocessError::MissingWeight { path: path.to_path_buf(), key });
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(vb).map_err(|source| PreprocessError::Checkpoint { path: path.to_path_buf(), source })
    }

    /// Part affinity fields (38 channels) and heat maps (19 channels) of the last stage.
    pub fn forward(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let features = run(&self.front, image)?;
        let mut input = features.clone();
        let mut outputs = None;
        for [l1, l2] in &self.stages {
            let (paf, heat) = (run(l1, &input)?, run(l2, &input)?);
            input = Tensor::cat(&[&paf, &heat, &features], 1)?;
            outputs = Some((paf, heat));
        }
        Ok(outputs.expect("six stages"))
    }
}

fn run(layers: &[Layer], x: &Tensor) -> candle_core::Result<Tensor> {
    layers.iter().try_fold(x.clone(), |x, layer| match layer {
        Layer::Conv { conv, relu: true } => conv.forward(&x)?.relu(),
        Layer::Conv { conv, relu: false } => conv.forward(&x),
        Layer::Pool => x.max_pool2d(2),
    })
}
