//! What the flow tests share: the sibling crates' fixtures and assets, the tiny SDXL folder,
//! the astronaut photo seen five ways, and fresh temp dirs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::{RgbImage, imageops};

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn diffusion_fixture(name: &str) -> PathBuf {
    crate_dir().join("../diffusion/tests/fixtures").join(name)
}

pub fn lora_fixture(name: &str) -> PathBuf {
    crate_dir().join("../lora/tests/fixtures/apply").join(name)
}

pub fn face_asset(name: &str) -> PathBuf {
    crate_dir().join("../face/tests/assets").join(name)
}

/// A fresh `<group>-<pid>/<name>` dir under the cargo temp dir: private to this test process, as
/// two runs of the same tests at once must not share it.
pub fn temp_dir(group: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{group}-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A diffusers pipeline folder of links to fixture parts.
pub fn pipeline_folder(dir: &Path, parts: &[(&str, PathBuf)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (name, target) in parts {
        std::os::unix::fs::symlink(target.canonicalize().unwrap(), dir.join(name)).unwrap();
    }
    dir.to_path_buf()
}

/// Tiny SDXL as `dir/tiny-sdxl`: UNet 32/32 with text-time conditioning, CLIP-L and bigG-layout
/// encoders (32-d).
pub fn tiny_sdxl(dir: &Path) -> PathBuf {
    let tokenizer = diffusion_fixture("tokenizer/folder_vocab_merges");
    pipeline_folder(
        &dir.join("tiny-sdxl"),
        &[
            ("unet", lora_fixture("sdxl_unet")),
            ("vae", diffusion_fixture("vae")),
            ("text_encoder", lora_fixture("sdxl_te1")),
            ("text_encoder_2", lora_fixture("sdxl_te2")),
            ("tokenizer", tokenizer.clone()),
            ("tokenizer_2", tokenizer),
        ],
    )
}

pub fn astronaut() -> RgbImage {
    easyphoto_face::load_rgb(face_asset("astronaut.png")).unwrap()
}

/// The astronaut photo as five uploads: itself, mirrored, brighter, rotated 8° and re-framed.
pub fn astronaut_photos() -> Vec<RgbImage> {
    let base = astronaut();
    let (w, h) = base.dimensions();
    let brighter = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb(base.get_pixel(x, y).0.map(|v| (f32::from(v) * 1.2).min(255.0) as u8))
    });
    let (a, cx, cy) = (8f64.to_radians(), f64::from(w) / 2.0, f64::from(h) / 2.0);
    let (c, s) = (a.cos(), a.sin());
    let m = [[c, s, (1.0 - c) * cx - s * cy], [-s, c, s * cx + (1.0 - c) * cy]];
    let rotated = easyphoto_face::warp_affine(&base, &m, w, h);
    let inner = imageops::crop_imm(&base, 40, 0, 400, 400).to_image();
    let reframed = imageops::resize(&inner, 360, 360, imageops::FilterType::Triangle);
    vec![base.clone(), imageops::flip_horizontal(&base), brighter, rotated, reframed]
}

/// `photos` saved as `dir/00.png`, `dir/01.png`, …
pub fn write_photos(dir: &Path, photos: &[RgbImage]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    photos
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let path = dir.join(format!("{i:02}.png"));
            p.save(&path).unwrap();
            path
        })
        .collect()
}
