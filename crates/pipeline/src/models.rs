//! The model manifest: every file the flows need, where it lives under the models directory,
//! where to download it, and how to check it.
//!
//! The manifest is data (`models.toml`, embedded at build time). A file is found at
//! `<models dir>/<path>`; it is downloaded from `{endpoint}/{repo}/resolve/{revision}/{file}`, the
//! Hugging Face URL scheme (so `HF_ENDPOINT` mirrors work). Sizes and sha256 digests are checked
//! where the manifest knows them, and the manifest says `sha256 = "unknown"` where no source
//! publishes one rather than inventing a value.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::download::sha256_file;
use crate::error::{PipelineError, Result};
use crate::progress::{CancelToken, Observer};

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

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "unknown" {
            return Ok(Self::Unknown);
        }
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Ok(Self::Sha256(text));
        }
        Err(serde::de::Error::custom(format!("sha256 {text:?} is neither 64 lowercase hex digits nor \"unknown\"")))
    }
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
    /// Present, size matches where known, but the manifest has no sha256 to compare with.
    Unpinned {
        sha256: String,
        size: u64,
    },
    WrongSize {
        expected: u64,
        actual: u64,
    },
    WrongChecksum {
        expected: String,
        actual: String,
    },
}

impl Verification {
    pub fn is_usable(&self) -> bool {
        matches!(self, Self::Verified { .. } | Self::Unpinned { .. })
    }
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
        let missing = self.missing(models_dir, flow, endpoint);
        if missing.is_empty() {
            return Ok(());
        }
        Err(PipelineError::ModelsMissing { models_dir: models_dir.to_path_buf(), missing })
    }
}

/// Checks the file of `model` under `models_dir`: size where the manifest knows it, then sha256.
pub fn verify(
    model: &ModelFile,
    models_dir: &Path,
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
    if let Some(expected) = model.size.filter(|&s| s != size) {
        return Ok(Verification::WrongSize { expected, actual: size });
    }
    let actual = sha256_file(&path, &model.name, observer, cancel)?;
    Ok(match &model.sha256 {
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
