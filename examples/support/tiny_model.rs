//! The tiny random-weight SD1.5-layout model of the diffusion crate's test fixtures, shared by
//! the `txt2img` example and the `txt2img_loop` bench.

use std::path::PathBuf;

use candle_core::{DType, Device};
use easyphoto::diffusion::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use easyphoto::diffusion::{ClipTokenizer, ModelFamily, StableDiffusion, diffusers_folder};

/// The tiny random-weight SD1.5-layout model of the test fixtures.
pub fn tiny_model(device: &Device) -> anyhow::Result<StableDiffusion> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/diffusion/tests/fixtures");
    let clip = diffusers_folder::load_clip_text_model(&fixtures.join("clip_l"), None, DType::F32, device)?;
    let tokenizer = ClipTokenizer::from_folder(fixtures.join("tokenizer/folder_vocab_merges"))?;
    Ok(StableDiffusion {
        unet: diffusers_folder::load_unet(&fixtures.join("sd15"), None, DType::F32, device)?,
        vae: diffusers_folder::load_vae(&fixtures.join("vae"), None, DType::F32, device)?,
        text_encoders: TextEncoders::new(vec![PromptEncoder {
            tokenizer,
            encoder: Encoder::Plain(clip),
            layer: Layer::Normed { skip: 1 },
        }])?,
        family: ModelFamily::Sd1,
        scheduler_config: serde_json::from_str(
            r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1}"#,
        )?,
    })
}
