//! Paths the flow tests share: the sibling crates' fixtures and assets, and fresh temp dirs.

#![allow(dead_code)]

use std::path::PathBuf;

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
