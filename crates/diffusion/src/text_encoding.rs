//! Prompt text to UNet conditioning, as the AUTOMATIC1111 WebUI (which EasyPhoto drives) does it:
//! comments and `<lora:…>` tags removed, 77-token chunks each encoded on its own, emphasis applied
//! per chunk, chunks concatenated, the negative prompt padded to as many chunks; SD1 clip-skip,
//! and SDXL's two encoders (penultimate states concatenated, pooled output of the first chunk).

use candle_core::Tensor;

use crate::clip::{CLIPTextModel, CLIPTextModelWithProjection};
use crate::error::{DiffusionError, Result};
use crate::prompt::{
    ExtraNetwork, PromptChunk, apply_emphasis, pad_to_same_length, parse_extra_networks, prompt_chunks, strip_comments,
};
use crate::sampling::TextConditioning;
use crate::tokenizer::ClipTokenizer;

/// Which hidden states of an encoder condition the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The states `skip` layers from the end (1: the last), passed through the final layer norm
    /// (SD1.x with A1111's "clip skip"; SD2.x's encoders already end at the penultimate layer).
    Normed { skip: usize },
    /// The penultimate layer's states without the final norm (SDXL).
    Penultimate,
}

/// A text encoder, with or without the projection that gives SDXL's pooled embedding.
#[derive(Debug, Clone)]
pub enum Encoder {
    Plain(CLIPTextModel),
    Projected(CLIPTextModelWithProjection),
}

impl crate::layers::VisitLayers for Encoder {
    fn visit_layers(&mut self, f: &mut dyn FnMut(crate::layers::LayerMut<'_>)) {
        match self {
            Self::Plain(m) => m.visit_layers(f),
            Self::Projected(m) => m.visit_layers(f),
        }
    }
}

impl Encoder {
    fn text_model(&self) -> &CLIPTextModel {
        match self {
            Self::Plain(m) => m,
            Self::Projected(m) => m.text_model(),
        }
    }
}

/// One encoder with its tokenizer and the layer it contributes.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    pub tokenizer: ClipTokenizer,
    pub encoder: Encoder,
    pub layer: Layer,
}

/// The encoders of one model family: one for SD1.x/SD2.x, CLIP-L then bigG (projected) for SDXL.
#[derive(Debug, Clone)]
pub struct TextEncoders {
    encoders: Vec<PromptEncoder>,
}

/// A prompt's encoder states `[1, 77·chunks, D]` and, for SDXL, the pooled embedding `[1, P]`.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    pub states: Tensor,
    pub pooled: Option<Tensor>,
}

impl TextEncoders {
    /// Encoders in the order their states are concatenated.
    pub fn new(encoders: Vec<PromptEncoder>) -> Result<Self> {
        if encoders.is_empty() {
            return Err(DiffusionError::input("encoders", "at least one text encoder is needed".to_string()));
        }
        Ok(Self { encoders })
    }

    /// The conditioning of `prompt` against `negative_prompt`, and the extra networks
    /// (`<lora:name:weight>` …) the prompt names.
    pub fn conditioning(&self, prompt: &str, negative_prompt: &str) -> Result<(TextConditioning, Vec<ExtraNetwork>)> {
        let (prompt, networks) = parse_extra_networks(&strip_comments(prompt))?;
        let negative = strip_comments(negative_prompt);
        let (mut pos, mut neg) = (vec![], vec![]);
        for e in &self.encoders {
            let mut p = prompt_chunks(&e.tokenizer, &prompt)?;
            let mut n = prompt_chunks(&e.tokenizer, &negative)?;
            pad_to_same_length(&mut p, &mut n, &e.tokenizer);
            pos.push(p);
            neg.push(n);
        }
        // Chunk boundaries depend on token ids only; encoders differ only in padding, so their
        // chunk counts agree, but guard against tokenizers that disagree.
        let count = pos[0].len();
        if pos.iter().chain(&neg).any(|c| c.len() != count) {
            return Err(DiffusionError::input("prompt", "the tokenizers split the prompt differently".to_string()));
        }
        let positive = self.encode_chunks(&pos)?;
        let negative = self.encode_chunks(&neg)?;
        let pooled = positive.pooled.clone().zip(negative.pooled.clone());
        let text = TextConditioning {
            prompt_embeds: positive.states,
            negative_prompt_embeds: negative.states,
            pooled,
            micro: None,
        };
        Ok((text, networks))
    }

    /// The encoders' models in order (CLIP-L, then bigG for SDXL), for attaching LoRAs.
    pub fn encoders_mut(&mut self) -> impl Iterator<Item = &mut Encoder> {
        self.encoders.iter_mut().map(|e| &mut e.encoder)
    }

    /// Encodes one prompt (already free of comments and tags).
    pub fn encode(&self, prompt: &str) -> Result<EncodedPrompt> {
        let chunks = self.encoders.iter().map(|e| prompt_chunks(&e.tokenizer, prompt)).collect::<Result<Vec<_>>>()?;
        self.encode_chunks(&chunks)
    }

    /// `chunks[e]` are encoder `e`'s chunks of one prompt. The chunks are independent, so each
    /// encoder runs them as one batch; emphasis then applies chunk by chunk, as in the WebUI.
    fn encode_chunks(&self, chunks: &[Vec<PromptChunk>]) -> Result<EncodedPrompt> {
        let count = chunks[0].len();
        let mut per_encoder = vec![];
        let mut pooled = None;
        for (e, encoder_chunks) in self.encoders.iter().zip(chunks) {
            let device = e.encoder.text_model().device().clone();
            let ids: Vec<u32> = encoder_chunks.iter().flat_map(|c| c.ids.iter().copied()).collect();
            let length = ids.len() / count.max(1);
            let (states, batch_pooled) = e.states(&Tensor::from_vec(ids, (count, length), &device)?)?;
            if let Some(p) = batch_pooled {
                pooled = Some(p.narrow(0, 0, 1)?);
            }
            let parts = encoder_chunks
                .iter()
                .enumerate()
                .map(|(c, chunk)| {
                    let multipliers = Tensor::new(chunk.multipliers.as_slice(), &device)?.unsqueeze(0)?;
                    apply_emphasis(&states.narrow(0, c, 1)?, &multipliers)
                })
                .collect::<Result<Vec<_>>>()?;
            per_encoder.push(parts);
        }
        let per_chunk = (0..count)
            .map(|c| Tensor::cat(&per_encoder.iter().map(|parts| &parts[c]).collect::<Vec<_>>(), 2))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(EncodedPrompt { states: Tensor::cat(&per_chunk, 1)?, pooled })
    }
}

impl PromptEncoder {
    /// The conditioning states of a batch of chunks `[C, 77]`, and the pooled embeddings for projected
    /// encoders.
    fn states(&self, ids: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let model = self.encoder.text_model();
        let layers = model.config().num_hidden_layers;
        // The number of layers to run, and whether the final norm follows.
        let (depth, normed) = match self.layer {
            Layer::Normed { skip: 0 } => {
                return Err(DiffusionError::input("clip_skip", "must be at least 1".to_string()));
            }
            Layer::Normed { skip } if skip > layers => {
                return Err(DiffusionError::input("clip_skip", format!("{skip} > {layers} layers")));
            }
            Layer::Normed { skip } => (layers + 1 - skip, true),
            Layer::Penultimate => (layers.saturating_sub(1), false),
        };
        let (states, pooled) = match &self.encoder {
            // The projection needs every layer: take the states from the same forward.
            Encoder::Projected(m) => {
                let out = m.forward(ids)?;
                (out.hidden_states[depth].clone(), Some(out.text_embeds))
            }
            Encoder::Plain(_) => (model.hidden_state(ids, depth)?, None),
        };
        let states = if normed { model.final_layer_norm(&states)? } else { states };
        Ok((states, pooled))
    }
}
