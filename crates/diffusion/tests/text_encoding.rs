//! Prompt text to conditioning on the tiny CLIP fixtures: chunking, emphasis, clip-skip, SDXL's
//! two encoders, and `<lora:…>` extraction, checked against the encoders run directly.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, max_abs_diff};
use easyphoto_diffusion::prompt::ExtraNetwork;
use easyphoto_diffusion::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use easyphoto_diffusion::{ClipTokenizer, diffusers_folder};

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_folder(fixtures().join("tokenizer/folder_vocab_merges")).unwrap()
}

fn clip_l(layer: Layer) -> PromptEncoder {
    let model =
        diffusers_folder::load_clip_text_model(&fixtures().join("clip_l"), None, DType::F32, &Device::Cpu).unwrap();
    PromptEncoder { tokenizer: tokenizer(), encoder: Encoder::Plain(model), layer }
}

fn clip_g() -> PromptEncoder {
    let model = diffusers_folder::load_clip_text_model_with_projection(
        &fixtures().join("clip_g"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    PromptEncoder { tokenizer: tokenizer(), encoder: Encoder::Projected(model), layer: Layer::Penultimate }
}

fn ids(text: &str) -> Tensor {
    Tensor::new(tokenizer().encode_padded(text).unwrap().as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn plain_prompt_is_the_last_hidden_state() {
    let encoders = TextEncoders::new(vec![clip_l(Layer::Normed { skip: 1 })]).unwrap();
    let out = encoders.encode("a photo of the person").unwrap();
    let Encoder::Plain(model) = &clip_l(Layer::Penultimate).encoder else { unreachable!() };
    let reference = model.forward(&ids("a photo of the person")).unwrap().last_hidden_state;
    assert_eq!(out.states.dims(), &[1, 77, 32]);
    assert!(out.pooled.is_none());
    assert!(max_abs_diff(&out.states, &reference) < 1e-6);
}

#[test]
fn clip_skip_two_is_the_normed_penultimate_layer() {
    let encoders = TextEncoders::new(vec![clip_l(Layer::Normed { skip: 2 })]).unwrap();
    let out = encoders.encode("a photo").unwrap();
    let Encoder::Plain(model) = &clip_l(Layer::Penultimate).encoder else { unreachable!() };
    let all = model.forward(&ids("a photo")).unwrap();
    let reference = model.final_layer_norm(&all.hidden_states[all.hidden_states.len() - 2]).unwrap();
    assert!(max_abs_diff(&out.states, &reference) < 1e-6);
    assert!(max_abs_diff(&out.states, &all.last_hidden_state) > 1e-2, "skip 2 must differ from skip 1");
}

#[test]
fn emphasis_scales_tokens_and_keeps_the_mean() {
    let encoders = TextEncoders::new(vec![clip_l(Layer::Normed { skip: 1 })]).unwrap();
    let plain = encoders.encode("a photo of the person").unwrap().states;
    let weighted = encoders.encode("a photo of (the person:1.5)").unwrap().states;
    let same = encoders.encode("a photo of (the person:1.0)").unwrap().states;
    assert!(max_abs_diff(&plain, &same) < 1e-6);
    let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((mean(&plain) - mean(&weighted)).abs() < 1e-5, "A1111 emphasis restores the mean");
    // Position 1 ("a") is not emphasised: only the global rescale touches it.
    let ratio = (weighted.get(0).unwrap().get(1).unwrap() / plain.get(0).unwrap().get(1).unwrap()).unwrap();
    let ratio = ratio.to_vec1::<f32>().unwrap();
    assert!(ratio.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-4), "unemphasised token scaled uniformly");
    assert!(max_abs_diff(&plain, &weighted) > 1e-3);
}

#[test]
fn long_prompts_make_chunks_and_negative_is_padded() {
    let encoders = TextEncoders::new(vec![clip_l(Layer::Normed { skip: 1 })]).unwrap();
    let long = vec!["the photo"; 60].join(", ");
    let (text, networks) = encoders.conditioning(&format!("{long} <lora:anna:0.8>"), "bad").unwrap();
    let chunks = text.prompt_embeds.dim(1).unwrap() / 77;
    assert!(chunks >= 2, "a prompt of ~180 tokens needs several chunks");
    assert_eq!(text.prompt_embeds.dims(), text.negative_prompt_embeds.dims());
    assert_eq!(networks.len(), 1);
    assert!(
        matches!(&networks[0], ExtraNetwork::Lora { name, te_multiplier, .. } if name == "anna" && *te_multiplier == 0.8)
    );
    // The negative prompt's first chunk is the plain encoding of "bad"; the rest are empty prompts.
    let bad = encoders.encode("bad").unwrap().states;
    assert_close("negative chunk 0", &text.negative_prompt_embeds.narrow(1, 0, 77).unwrap(), &bad, 1e-5);
    let empty = encoders.encode("").unwrap().states;
    assert_close("negative chunk 1", &text.negative_prompt_embeds.narrow(1, 77, 77).unwrap(), &empty, 1e-5);
}

#[test]
fn sdxl_concatenates_penultimate_states_and_pools_the_first_chunk() {
    let encoders = TextEncoders::new(vec![clip_l(Layer::Penultimate), clip_g()]).unwrap();
    let out = encoders.encode("a photo of the person").unwrap();
    assert_eq!(out.states.dims(), &[1, 77, 32 + 48]);
    let Encoder::Projected(g) = &clip_g().encoder else { unreachable!() };
    let reference = g.forward(&ids("a photo of the person")).unwrap();
    let g_states = &reference.hidden_states[reference.hidden_states.len() - 2];
    assert!(max_abs_diff(&out.states.narrow(2, 32, 48).unwrap(), g_states) < 1e-6);
    assert!(max_abs_diff(out.pooled.as_ref().unwrap(), &reference.text_embeds) < 1e-6);
}

#[test]
fn clip_skip_beyond_the_model_is_an_error() {
    let encoders = TextEncoders::new(vec![clip_l(Layer::Normed { skip: 9 })]).unwrap();
    let err = encoders.encode("a").unwrap_err();
    assert!(err.to_string().contains("clip_skip"), "{err}");
}
