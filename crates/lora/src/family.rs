//! Which base model family a LoRA was built for, and which one a model is: a LoRA for SD1.x
//! (cross-attention dim 768) does not fit SD2.x (1024) or SDXL (2048).

use crate::{KohyaLora, KohyaPrefix};

/// A Stable Diffusion base model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BaseFamily {
    /// SD1.x: CLIP-L text encoder, cross-attention dim 768.
    Sd1,
    /// SD2.x: OpenCLIP-H text encoder, cross-attention dim 1024.
    Sd2,
    /// SDXL: CLIP-L + OpenCLIP-bigG, cross-attention dim 2048.
    Sdxl,
}

impl std::fmt::Display for BaseFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sd1 => "SD1.x",
            Self::Sd2 => "SD2.x",
            Self::Sdxl => "SDXL",
        })
    }
}

impl BaseFamily {
    /// The family of a UNet with this cross-attention (text embedding) width, if a known one.
    pub fn from_cross_attention_dim(dim: usize) -> Option<Self> {
        match dim {
            768 => Some(Self::Sd1),
            1024 => Some(Self::Sd2),
            2048 => Some(Self::Sdxl),
            _ => None,
        }
    }

    /// The family named by kohya's `ss_base_model_version` (`sd_v1`, `sd_v2`, `sd_v2_768_v`,
    /// `sdxl_base_v1-0`, EasyPhoto's `sdxl_`).
    pub fn from_base_model_version(version: &str) -> Option<Self> {
        if version.starts_with("sdxl") {
            Some(Self::Sdxl)
        } else if version.starts_with("sd_v2") {
            Some(Self::Sd2)
        } else if version.starts_with("sd_v1") {
            Some(Self::Sd1)
        } else {
            None
        }
    }

    /// What kohya writes as `ss_base_model_version` for this family.
    pub fn base_model_version(self) -> &'static str {
        match self {
            Self::Sd1 => "sd_v1",
            Self::Sd2 => "sd_v2",
            Self::Sdxl => "sdxl_base_v1-0",
        }
    }
}

/// The family a LoRA was built for and what told it: first the input width of a UNet
/// cross-attention key/value projection (`attn2.to_k` / `to_v`), then `ss_base_model_version`,
/// then the SDXL text-encoder prefixes `lora_te1_` / `lora_te2_`. `None` when nothing tells.
pub fn lora_family(lora: &KohyaLora) -> Option<(BaseFamily, String)> {
    let by_shape = lora.modules().find_map(|(name, m)| {
        let cross = name.starts_with("lora_unet_") && (name.ends_with("attn2_to_k") || name.ends_with("attn2_to_v"));
        let dim = *m.down.dims().get(1)?;
        let family = BaseFamily::from_cross_attention_dim(dim).filter(|_| cross)?;
        Some((family, format!("`{name}` takes {dim}-wide text embeddings")))
    });
    let by_metadata = || {
        let version = lora.metadata().get("ss_base_model_version")?;
        let family = BaseFamily::from_base_model_version(version)?;
        Some((family, format!("ss_base_model_version is `{version}`")))
    };
    let by_prefix = || {
        let name = lora.modules().map(|(n, _)| n).find(|n| {
            matches!(KohyaPrefix::split(n), Some((KohyaPrefix::TextEncoder1 | KohyaPrefix::TextEncoder2, _)))
        })?;
        Some((BaseFamily::Sdxl, format!("it adapts two text encoders (`{name}`)")))
    };
    by_shape.or_else(by_metadata).or_else(by_prefix)
}
