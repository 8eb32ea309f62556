//! The model manifest: every file the flows need, where it lives under the models directory,
//! where to download it, and how to check it.
//!
//! The manifest is data (`models.toml`, embedded at build time). A file is found at
//! `<models dir>/<path>`; it is downloaded from `{endpoint}/{repo}/resolve/{revision}/{file}`, the
//! Hugging Face URL scheme (so `HF_ENDPOINT` mirrors work). Sizes and sha256 digests are checked
//! where the manifest knows them, and the manifest says `sha256 = "unknown"` where no source
//! publishes one rather than inventing a value.
//!
//! For those files the models directory keeps a [`Lock`] (`models.lock`), as Cargo keeps
//! `Cargo.lock`: [`fetch_locked`] records the size and sha256 of what it downloaded (trust on
//! first use), and from then on downloads and [`verify`] are checked against that record. A file
//! with neither a published nor a recorded digest is reported [`Verification::Unpinned`], after a
//! plausibility check of its size against the manifest's approximate size (a truncated download
//! or an HTML error page saved under a model's name is refused).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::download::{Downloader, Fetched, sha256_file};
use crate::error::{PipelineError, Result};
use crate::progress::{CancelToken, Observer};
use crate::user::write_atomic;

/// The default download endpoint (`HF_ENDPOINT` overrides it in the CLI).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

const EMBEDDED: &str = include_str!("../models.toml");

/// The flows a model file is needed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    Train,
    Infer,
}

/// A published sha256 digest (64 lowercase hex digits), or the explicit admission that none is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Sha256(String),
    Unknown,
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "unknown" {
            return Ok(Self::Unknown);
        }
        if is_sha256(&text) {
            return Ok(Self::Sha256(text));
        }
        Err(serde::de::Error::custom(format!("sha256 {text:?} is neither 64 lowercase hex digits nor \"unknown\"")))
    }
}

/// Bytes of a size written for people (`"2.13 GB"`, `"176 kB"`, `"1 B"`; decimal units).
fn parse_approx_size(text: &str) -> Option<f64> {
    let (number, unit) = text.trim().split_once(' ')?;
    let scale = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    number.parse::<f64>().ok().filter(|n| n.is_finite() && *n > 0.0).map(|n| n * scale)
}

/// One model file of the manifest (field meanings are documented at the top of `models.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub name: String,
    pub role: String,
    pub flows: Vec<Flow>,
    pub path: String,
    pub repo: String,
    pub file: String,
    pub revision: String,
    pub size: Option<u64>,
    pub approx_size: String,
    pub sha256: Checksum,
    pub license: String,
}

impl ModelFile {
    /// `{endpoint}/{repo}/resolve/{revision}/{file}`, percent-encoding what a URL path cannot hold.
    pub fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            encode_path(&self.repo),
            encode_path(&self.revision),
            encode_path(&self.file)
        )
    }

    /// Where the file lives under `models_dir`.
    pub fn local_path(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(&self.path)
    }

    pub fn needed_by(&self, flow: Flow) -> bool {
        self.flows.contains(&flow)
    }

    /// Whether `size` is within a factor of 2 of `approx_size`: the only size check of a file
    /// whose exact size nobody published or recorded.
    pub fn plausible_size(&self, size: u64) -> bool {
        parse_approx_size(&self.approx_size).is_none_or(|approx| (approx / 2.0..=approx * 2.0).contains(&(size as f64)))
    }
}

/// Percent-encodes every byte outside `[A-Za-z0-9-._~/]`.
fn encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A file the flows need that is not in the models directory, with where to put it and where
/// to get it: the items of [`PipelineError::ModelsMissing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingModel {
    pub name: String,
    pub role: String,
    pub path: PathBuf,
    pub url: String,
}

/// The outcome of checking one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Missing,
    /// Size and sha256 match the manifest.
    Verified {
        sha256: String,
    },
    /// Size and sha256 match what [`Lock`] recorded at the file's first download (the manifest
    /// publishes none).
    Locked {
        sha256: String,
    },
    /// Present with a plausible size, but neither the manifest nor the lock has a sha256 to
    /// compare with (a file put in place by hand).
    Unpinned {
        sha256: String,
        size: u64,
    },
    /// The size differs from the manifest's or the lock's.
    WrongSize {
        expected: u64,
        actual: u64,
    },
    /// The sha256 differs from the manifest's or the lock's.
    WrongChecksum {
        expected: String,
        actual: String,
    },
    /// No exact size is known, and the size is not within a factor of 2 of the approximate one.
    ImplausibleSize {
        approx: String,
        actual: u64,
    },
}

impl Verification {
    pub fn is_usable(&self) -> bool {
        matches!(self, Self::Verified { .. } | Self::Locked { .. } | Self::Unpinned { .. })
    }
}

/// The lock file's name under the models directory.
pub const LOCK_FILE: &str = "models.lock";

/// What [`Lock`] knows of one file: its size and sha256 at its first download, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locked {
    pub size: u64,
    pub sha256: String,
    pub url: String,
}

/// The sizes and sha256 digests of the downloaded files whose manifest entries publish none,
/// kept in `<models dir>/models.lock` (TOML, one table per model name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    path: PathBuf,
    files: BTreeMap<String, Locked>,
}

impl Lock {
    /// The lock of `models_dir` (empty when there is no lock file yet). A lock file that does
    /// not parse is refused, naming it: delete it to re-pin.
    pub fn load(models_dir: &Path) -> Result<Self> {
        let path = models_dir.join(LOCK_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(PipelineError::Read { path, source }),
        };
        let bad = |reason: String| PipelineError::InvalidInput { path: path.clone(), reason };
        let files: BTreeMap<String, Locked> = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some((name, _)) = files.iter().find(|(_, f)| !is_sha256(&f.sha256)) {
            return Err(bad(format!("{name}: sha256 is not 64 lowercase hex digits")));
        }
        Ok(Self { path, files })
    }

    pub fn get(&self, name: &str) -> Option<&Locked> {
        self.files.get(name)
    }

    /// `model` as it is checked: the manifest's entry, with the size and sha256 recorded here
    /// where the manifest publishes no sha256.
    pub fn pin(&self, model: &ModelFile) -> ModelFile {
        let mut pinned = model.clone();
        if let (Checksum::Unknown, Some(locked)) = (&model.sha256, self.get(&model.name)) {
            pinned.sha256 = Checksum::Sha256(locked.sha256.clone());
            pinned.size = Some(locked.size);
        }
        pinned
    }

    /// Records `name` and writes the lock file (atomically).
    pub fn record(&mut self, name: &str, locked: Locked) -> Result<()> {
        self.files.insert(name.to_string(), locked);
        let body = toml::to_string(&self.files)
            .map_err(|e| PipelineError::InvalidInput { path: self.path.clone(), reason: e.to_string() })?;
        let text = format!(
            "# The size and sha256 of each model file `easyphoto models fetch` downloaded without a\n\
             # published sha256 (trust on first use); later downloads and `models verify` are checked\n\
             # against them. Delete an entry to accept a new version of its file.\n\n{body}"
        );
        write_atomic(&self.path, text.as_bytes())
    }
}

/// Downloads `model` (unless present) checked against the manifest or `lock`, and records the
/// size and sha256 of a file downloaded with neither in `lock` (trust on first use).
pub fn fetch_locked(
    downloader: &Downloader,
    model: &ModelFile,
    models_dir: &Path,
    lock: &mut Lock,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Fetched> {
    let pinned = lock.pin(model);
    let fetched = downloader.fetch(&pinned, models_dir, observer, cancel)?;
    if let (Checksum::Unknown, Some(sha256), true) = (&pinned.sha256, &fetched.sha256, fetched.downloaded) {
        let url = model.url(downloader.endpoint());
        lock.record(&model.name, Locked { size: fetched.size, sha256: sha256.clone(), url })?;
    }
    Ok(fetched)
}

/// The list of model files.
#[derive(Debug, Clone)]
pub struct Manifest {
    models: Vec<ModelFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    model: Vec<ModelFile>,
}

impl Manifest {
    /// The manifest built into this binary.
    pub fn embedded() -> Result<Self> {
        Self::parse(EMBEDDED)
    }

    /// Parses and checks a manifest: unique names and paths, paths that stay inside the models
    /// directory, at least one flow per file.
    pub fn parse(text: &str) -> Result<Self> {
        let file: ManifestFile = toml::from_str(text).map_err(|e| PipelineError::Manifest(e.to_string()))?;
        let bad = |m: &ModelFile, what: &str| PipelineError::Manifest(format!("model {:?}: {what}", m.name));
        for (i, m) in file.model.iter().enumerate() {
            if file.model[..i].iter().any(|o| o.name == m.name) {
                return Err(bad(m, "duplicate name"));
            }
            if file.model[..i].iter().any(|o| o.path == m.path) {
                return Err(bad(m, "duplicate path"));
            }
            let path = Path::new(&m.path);
            if m.path.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(bad(m, "path must be relative, without `.` or `..`"));
            }
            if m.flows.is_empty() {
                return Err(bad(m, "needed by no flow"));
            }
            if parse_approx_size(&m.approx_size).is_none() {
                return Err(bad(m, "approx_size is not `<number> B|kB|MB|GB`"));
            }
        }
        Ok(Self { models: file.model })
    }

    pub fn models(&self) -> &[ModelFile] {
        &self.models
    }

    pub fn get(&self, name: &str) -> Result<&ModelFile> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| PipelineError::UnknownModel { name: name.to_string() })
    }

    /// The files `flow` needs, or every file when `flow` is `None`.
    pub fn for_flow(&self, flow: Option<Flow>) -> impl Iterator<Item = &ModelFile> {
        self.models.iter().filter(move |m| flow.is_none_or(|f| m.needed_by(f)))
    }

    /// The files of `flow` absent from `models_dir` (presence only; [`verify`] checks contents).
    pub fn missing(&self, models_dir: &Path, flow: Option<Flow>, endpoint: &str) -> Vec<MissingModel> {
        self.for_flow(flow)
            .filter(|m| !m.local_path(models_dir).is_file())
            .map(|m| MissingModel {
                name: m.name.clone(),
                role: m.role.clone(),
                path: m.local_path(models_dir),
                url: m.url(endpoint),
            })
            .collect()
    }

    /// The offline check: `Err(ModelsMissing)` listing every absent file of `flow`, where to put
    /// it and where to get it.
    pub fn require(&self, models_dir: &Path, flow: Option<Flow>, endpoint: &str) -> Result<()> {
        self.require_only(models_dir, flow, endpoint, |_| true)
    }

    /// [`require`](Self::require) for the missing files that `needed` keeps.
    pub fn require_only(
        &self,
        models_dir: &Path,
        flow: Option<Flow>,
        endpoint: &str,
        needed: impl Fn(&MissingModel) -> bool,
    ) -> Result<()> {
        let missing: Vec<_> = self.missing(models_dir, flow, endpoint).into_iter().filter(|m| needed(m)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(PipelineError::ModelsMissing { models_dir: models_dir.to_path_buf(), missing })
    }
}

/// Checks the file of `model` under `models_dir` against the manifest, else against `lock`:
/// the exact size where known (else its plausibility), then the sha256.
pub fn verify(
    model: &ModelFile,
    models_dir: &Path,
    lock: &Lock,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Verification> {
    let path = model.local_path(models_dir);
    let size = match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => return Ok(Verification::Missing),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verification::Missing),
        Err(source) => return Err(PipelineError::Read { path, source }),
    };
    let pinned = lock.pin(model);
    match pinned.size {
        Some(expected) if expected != size => return Ok(Verification::WrongSize { expected, actual: size }),
        None if !model.plausible_size(size) => {
            return Ok(Verification::ImplausibleSize { approx: model.approx_size.clone(), actual: size });
        }
        _ => {}
    }
    let actual = sha256_file(&path, &model.name, observer, cancel)?;
    let by_lock = model.sha256 == Checksum::Unknown;
    Ok(match &pinned.sha256 {
        Checksum::Sha256(expected) if *expected == actual && by_lock => Verification::Locked { sha256: actual },
        Checksum::Sha256(expected) if *expected == actual => Verification::Verified { sha256: actual },
        Checksum::Sha256(expected) => Verification::WrongChecksum { expected: expected.clone(), actual },
        Checksum::Unknown => Verification::Unpinned { sha256: actual, size },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_manifest_lists_what_the_flows_need() {
        let manifest = Manifest::embedded().unwrap();
        let names: Vec<_> = manifest.models().iter().map(|m| m.name.as_str()).collect();
        for needed in [
            "chilloutmix",
            "vae-ft-mse",
            "controlnet-canny",
            "controlnet-openpose",
            "controlnet-tile",
            "controlnet-color",
            "film-velvia3",
            "openpose-body",
            "scrfd-10g",
            "arcface-r50",
            "template-1",
        ] {
            assert!(names.contains(&needed), "{needed} missing from {names:?}");
        }
        for m in manifest.models() {
            assert!(!m.license.is_empty() && !m.role.is_empty(), "{}", m.name);
            // A pinned digest comes with its exact size.
            assert_eq!(matches!(m.sha256, Checksum::Sha256(_)), m.size.is_some(), "{}", m.name);
        }
        let train: Vec<_> = manifest.for_flow(Some(Flow::Train)).map(|m| m.name.as_str()).collect();
        assert!(train.contains(&"chilloutmix") && train.contains(&"template-4") && !train.contains(&"controlnet-tile"));
        let scrfd = manifest.get("scrfd-10g").unwrap();
        assert_eq!(
            scrfd.url("https://hf-mirror.com/"),
            "https://hf-mirror.com/public-data/insightface/resolve/main/models/buffalo_l/det_10g.onnx"
        );
        assert!(matches!(manifest.get("nope"), Err(PipelineError::UnknownModel { .. })));
    }

    #[test]
    fn urls_are_percent_encoded() {
        let text = r#"
            [[model]]
            name = "lz"
            role = "t2i checkpoint"
            flows = ["infer"]
            path = "Stable-diffusion/LZ-16K+Optics.safetensors"
            repo = "org/repo"
            file = "LZ-16K+Optics v2.safetensors"
            revision = "main"
            approx_size = "2 GB"
            sha256 = "unknown"
            license = "x"
        "#;
        let m = Manifest::parse(text).unwrap();
        assert_eq!(
            m.models()[0].url("http://127.0.0.1:1"),
            "http://127.0.0.1:1/org/repo/resolve/main/LZ-16K%2BOptics%20v2.safetensors"
        );
    }

    #[test]
    fn bad_manifests_are_refused_with_the_model_named() {
        let entry = |name: &str, path: &str, sha: &str| {
            format!(
                "[[model]]\nname = \"{name}\"\nrole = \"r\"\nflows = [\"train\"]\npath = \"{path}\"\nrepo = \"o/r\"\n\
                 file = \"f\"\nrevision = \"main\"\napprox_size = \"1 B\"\nsha256 = \"{sha}\"\nlicense = \"l\"\n"
            )
        };
        for (text, needle) in [
            (entry("a", "../etc/passwd", "unknown"), "relative"),
            (entry("a", "/etc/passwd", "unknown"), "relative"),
            (entry("a", "x", "unknown") + &entry("a", "y", "unknown"), "duplicate name"),
            (entry("a", "x", "unknown") + &entry("b", "x", "unknown"), "duplicate path"),
            (entry("a", "x", "ABC"), "neither 64 lowercase hex"),
            (entry("a", "x", "unknown").replace("license", "licence"), "unknown field `licence`"),
        ] {
            let err = Manifest::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn offline_check_lists_exactly_the_missing_files() {
        let manifest = Manifest::embedded().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let train: Vec<_> = manifest.for_flow(Some(Flow::Train)).collect();
        for m in &train[1..] {
            let path = m.local_path(dir.path());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        match manifest.require(dir.path(), Some(Flow::Train), DEFAULT_ENDPOINT) {
            Err(PipelineError::ModelsMissing { missing, .. }) => {
                assert_eq!(missing.len(), 1);
                assert_eq!(missing[0].name, train[0].name);
                assert_eq!(missing[0].path, dir.path().join(&train[0].path));
            }
            other => panic!("{other:?}"),
        }
        let err = manifest.require(dir.path(), Some(Flow::Infer), DEFAULT_ENDPOINT).unwrap_err().to_string();
        assert!(err.contains("ControlNet/control_v11f1e_sd15_tile.pth"), "{err}");
        assert!(
            err.contains("https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth"),
            "{err}"
        );
        assert!(!err.contains("det_10g"), "{err}");
    }
}
