//! AutoencoderKL against diffusers 0.42.1 on tiny seeded models: encode (mean, log-variance,
//! sample), decode, and tiled encode/decode; from diffusers folders and LDM single files.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, io, ldm_tensors, write_checkpoint};
use easyphoto_diffusion::diffusers_folder::{self, read_config};
use easyphoto_diffusion::{AutoencoderKL, AutoencoderKLConfig, SingleFile, Tiling, load_vae};

const TOL: f32 = 1e-4;

/// The tile sizes diffusers used for the fixture (`enable_tiling()` defaults for its config).
fn fixture_tiling(name: &str) -> Tiling {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("tiling.json")).unwrap()).unwrap();
    Tiling {
        sample_size: json["tile_sample_min_size"].as_u64().unwrap() as usize,
        latent_size: json["tile_latent_min_size"].as_u64().unwrap() as usize,
        overlap: json["tile_overlap_factor"].as_f64().unwrap(),
    }
}

fn check_vae(name: &str, vae: &mut AutoencoderKL) {
    let io = io(&format!("{name}/io.safetensors"));
    let posterior = vae.encode(&io["image"]).unwrap();
    assert_close(&format!("{name} mean"), &posterior.mean, &io["mean"], TOL);
    assert_close(&format!("{name} logvar"), &posterior.logvar, &io["logvar"], TOL);
    assert_close(&format!("{name} sample"), &posterior.sample_with(&io["noise"]).unwrap(), &io["sample"], TOL);
    assert_close(&format!("{name} decoded"), &vae.decode(&io["latent"]).unwrap(), &io["decoded"], TOL);

    vae.set_tiling(Some(fixture_tiling(name)));
    let tiled = vae.decode(&io["tiled_latent"]).unwrap();
    assert_close(&format!("{name} tiled_decoded"), &tiled, &io["tiled_decoded"], TOL);
    let tiled = vae.encode(&io["tiled_image"]).unwrap();
    assert_close(&format!("{name} tiled_mean"), &tiled.mean, &io["tiled_mean"], TOL);
    vae.set_tiling(None);
}

#[test]
fn vae_folder_matches_diffusers() {
    let mut vae = diffusers_folder::load_vae(&fixtures().join("vae"), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    assert_eq!(vae.default_tiling(), fixture_tiling("vae"));
    check_vae("vae", &mut vae);
}

#[test]
fn vae3_folder_matches_diffusers() {
    let mut vae = diffusers_folder::load_vae(&fixtures().join("vae3"), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.scaling_factor(), 0.13025);
    assert_eq!(vae.default_tiling(), fixture_tiling("vae3"));
    check_vae("vae3", &mut vae);
}

fn check_standalone_ldm(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_checkpoint(dir.path(), &format!("{name}.safetensors"), &ldm_tensors(name));
    let reference: AutoencoderKLConfig = read_config(&fixtures().join(name).join("config.json")).unwrap();
    let inferred = SingleFile::open(&path).unwrap().vae_config().unwrap();
    assert_eq!(inferred.block_out_channels, reference.block_out_channels);
    assert_eq!(inferred.layers_per_block, reference.layers_per_block);
    assert_eq!(inferred.latent_channels, reference.latent_channels);
    let mut vae = load_vae(&path, DType::F32, &Device::Cpu).unwrap();
    check_vae(name, &mut vae);
}

#[test]
fn standalone_ldm_vae_files_match() {
    check_standalone_ldm("vae");
    check_standalone_ldm("vae3");
}

#[test]
fn vae_inside_sd15_checkpoint_matches() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_checkpoint(dir.path(), "sd15.safetensors", &ldm_tensors("sd15"));
    let mut vae = load_vae(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    check_vae("vae", &mut vae);
}
