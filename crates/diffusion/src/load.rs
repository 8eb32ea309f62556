//! One entry point per model that accepts any layout a user may have downloaded.

use std::path::Path;

use candle_core::{DType, Device};

use crate::diffusers_folder;
use crate::error::Result;
use crate::single_file::SingleFile;
use crate::unet_2d_condition::UNet2DConditionModel;
use crate::vae::AutoencoderKL;

/// Loads a UNet from a single-file checkpoint, a diffusers pipeline folder (`<dir>/unet`) or a
/// diffusers model folder (`<dir>/config.json`).
pub fn load_unet(path: &Path, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
    if path.is_dir() {
        let dir = if path.join("unet").is_dir() { path.join("unet") } else { path.to_path_buf() };
        return diffusers_folder::load_unet(&dir, None, dtype, device);
    }
    let file = SingleFile::open(path)?;
    file.load_unet(&file.unet_config()?, dtype, device)
}

/// Loads a VAE from a single-file checkpoint (full model or standalone VAE), a diffusers pipeline
/// folder (`<dir>/vae`) or a diffusers model folder.
pub fn load_vae(path: &Path, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
    if path.is_dir() {
        let dir = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
        return diffusers_folder::load_vae(&dir, None, dtype, device);
    }
    let file = SingleFile::open(path)?;
    file.load_vae(&file.vae_config()?, dtype, device)
}
