//! Prompts as the AUTOMATIC1111 WebUI reads them (EasyPhoto writes its prompts for it):
//! `#` comments, `<lora:name:weight>` tags, `(emphasis:1.2)` / `[de-emphasis]`, `BREAK`, and the
//! split of long prompts into 77-token chunks with per-token multipliers.
//!
//! In A1111's order: [`strip_comments`] (positive and negative prompt), [`parse_extra_networks`]
//! (positive prompt only: A1111 leaves tags in the negative prompt as text), [`prompt_chunks`],
//! and after the text encoder [`apply_emphasis`] on each chunk. Prompt editing (`[a:b:0.5]`,
//! `[a|b]`), `AND` and textual-inversion embeddings are not supported: they stay plain text.

use candle_core::{DType, Tensor};

use crate::error::{DiffusionError, Result};
use crate::tokenizer::ClipTokenizer;

/// Prompt tokens per chunk; with `<|startoftext|>` and `<|endoftext|>` a chunk has 77 ids.
const CHUNK_TOKENS: usize = ClipTokenizer::MAX_LENGTH - 2;
/// A1111's `comma_padding_backtrack` (default 20): when a chunk is full and its last comma is
/// at most this many tokens back, the tokens after the comma move to the next chunk.
const COMMA_BACKTRACK: usize = 20;
/// A1111 marks `BREAK` as this text with weight -1 (and so treats a merged run equal to it alike).
const BREAK: &str = "BREAK";

/// A piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    /// Text and its emphasis multiplier.
    Text { text: String, weight: f64 },
    /// `BREAK`: the rest of the prompt starts a new chunk.
    Break,
}

/// A network named by a `<kind:args>` tag, with A1111's multipliers.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraNetwork {
    /// `<lora:name[:te[:unet]]>` or `<lyco:...>` (an alias), `te=` / `unet=` overriding; the
    /// text-encoder multiplier defaults to 1.0 and the UNet one to the text-encoder one.
    Lora { name: String, te_multiplier: f64, unet_multiplier: f64 },
    /// `<hypernet:name[:multiplier]>`, multiplier 1.0 by default.
    Hypernet { name: String, multiplier: f64 },
}

/// One 77-token window of a prompt as the text encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// `<|startoftext|>`, 75 tokens (padded with `<|endoftext|>`), `<|endoftext|>`; with a
    /// tokenizer whose pad token is not `<|endoftext|>`, every id after the first
    /// `<|endoftext|>` is the pad id.
    pub ids: Vec<u32>,
    /// The emphasis multiplier of each position (1.0 for the start, end and padding).
    pub multipliers: Vec<f32>,
}

impl PromptChunk {
    /// The chunk of an empty prompt.
    pub fn empty(tokenizer: &ClipTokenizer) -> Self {
        let mut ids = vec![tokenizer.pad_id(); ClipTokenizer::MAX_LENGTH];
        ids[0] = tokenizer.bos_id();
        ids[1] = tokenizer.eos_id();
        Self { ids, multipliers: vec![1.0; ClipTokenizer::MAX_LENGTH] }
    }
}

/// Removes `#` comments (A1111's "Enable comments" option, on by default): from each `#` to the
/// end of its line; a line that starts with `#` goes with the newline before it.
pub fn strip_comments(text: &str) -> String {
    // First pass: comment lines, at the start of the text or after a newline, with that newline.
    let mut first = String::with_capacity(text.len());
    let mut rest = text;
    let mut at_start = true;
    loop {
        let found = if at_start && rest.starts_with('#') { Some(0) } else { rest.find("\n#") };
        let Some(start) = found else { break };
        first.push_str(&rest[..start]);
        first.push('\n');
        rest = after_line(&rest[start + 1..]);
        at_start = false;
    }
    first.push_str(rest);
    // Second pass: what is left of any `#` to the end of its line, with the newline.
    let mut out = String::with_capacity(first.len());
    let mut rest = first.as_str();
    while let Some(start) = rest.find('#') {
        out.push_str(&rest[..start]);
        out.push('\n');
        rest = after_line(&rest[start..]);
    }
    out.push_str(rest);
    out
}

/// What follows the first newline of `s` (empty without one).
fn after_line(s: &str) -> &str {
    s.find('\n').map_or("", |i| &s[i + 1..])
}

/// Takes the `<kind:args>` tags out of a prompt (A1111's `extra_networks.parse_prompt`): returns
/// the text without them and the LoRAs and hypernetworks they name, in prompt order. Tags of other
/// kinds (kind = letters, digits, `_`) are removed and ignored, as A1111 does.
pub fn parse_extra_networks(prompt: &str) -> Result<(String, Vec<ExtraNetwork>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut networks = vec![];
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let Some((kind, args, len)) = extra_network_tag(&rest[open..]) else {
            text.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            continue;
        };
        text.push_str(&rest[..open]);
        rest = &rest[open + len..];
        let items: Vec<&str> = args.split(':').collect();
        match kind {
            "lora" | "lyco" => networks.push(lora(&items, args)?),
            "hypernet" => {
                let multiplier = items.get(1).map_or(Ok(1.0), |w| python_float(w, args))?;
                networks.push(ExtraNetwork::Hypernet { name: items.first().unwrap_or(&"").to_string(), multiplier });
            }
            _ => {}
        }
    }
    text.push_str(rest);
    Ok((text, networks))
}

/// `<kind:args>` at the start of `s`: (kind, args, length in bytes).
fn extra_network_tag(s: &str) -> Option<(&str, &str, usize)> {
    let body = &s[1..];
    let kind_len = body.find(|c: char| !is_word_char(c)).unwrap_or(body.len());
    if kind_len == 0 || !body[kind_len..].starts_with(':') {
        return None;
    }
    let args = &body[kind_len + 1..];
    let close = args.find('>').filter(|&n| n > 0)?;
    Some((&body[..kind_len], &args[..close], 1 + kind_len + 1 + close + 1))
}

/// A1111's `ExtraNetworkLora.activate` rules for one tag's `:`-separated items.
fn lora(items: &[&str], args: &str) -> Result<ExtraNetwork> {
    let mut positional = vec![];
    let (mut te, mut unet, mut dyn_dim) = (None, None, None);
    for item in items {
        // Python's `item.split('=', 2)` names the item only when it has exactly one `=`.
        match item.split_once('=') {
            Some((key, value)) if !value.contains('=') => match key {
                "te" => te = Some(value),
                "unet" => unet = Some(value),
                "dyn" => dyn_dim = Some(value),
                _ => {}
            },
            _ => positional.push(*item),
        }
    }
    let Some(name) = positional.first() else {
        return Err(DiffusionError::input("prompt", format!("<lora:{args}> has no name")));
    };
    // Evaluated in A1111's order, so the same arguments are errors.
    let mut te_multiplier = positional.get(1).map_or(Ok(1.0), |w| python_float(w, args))?;
    if let Some(w) = te {
        te_multiplier = python_float(w, args)?;
    }
    let mut unet_multiplier = positional.get(2).map_or(Ok(te_multiplier), |w| python_float(w, args))?;
    if let Some(w) = unet {
        unet_multiplier = python_float(w, args)?;
    }
    // `dyn` (LoRA rank truncation) is not supported, but must be an integer as in A1111.
    for dim in positional.get(3).into_iter().chain(&dyn_dim) {
        dim.trim_matches(is_python_space)
            .parse::<i64>()
            .map_err(|_| DiffusionError::input("prompt", format!("dyn `{dim}` in <lora:{args}> is not an integer")))?;
    }
    Ok(ExtraNetwork::Lora { name: name.to_string(), te_multiplier, unet_multiplier })
}

/// Python's `float()` on a tag argument: surrounding whitespace allowed.
fn python_float(s: &str, args: &str) -> Result<f64> {
    s.trim_matches(is_python_space)
        .parse()
        .map_err(|_| DiffusionError::input("prompt", format!("`{s}` in <...:{args}> is not a number")))
}

/// Parses emphasis (A1111's `parse_prompt_attention`): `(text)` ×1.1, `(text:w)` ×w,
/// `[text]` ÷1.1, nesting multiplies, `\(` `\)` `\[` `\]` `\\` are literal, unclosed brackets
/// apply to the end, unmatched closing ones are text, `BREAK` (a whole word) splits, and
/// neighbouring pieces of equal weight are merged. An empty prompt gives one empty piece.
pub fn parse_prompt_attention(text: &str) -> Result<Vec<PromptPart>> {
    Ok(attention(text)?.into_iter().map(|(text, weight)| to_part(text, weight)).collect())
}

fn to_part(text: String, weight: f64) -> PromptPart {
    if is_break(&text, weight) { PromptPart::Break } else { PromptPart::Text { text, weight } }
}

fn is_break(text: &str, weight: f64) -> bool {
    text == BREAK && weight == -1.0
}

/// The pieces as A1111 keeps them: `BREAK` is `("BREAK", -1.0)` and brackets around it scale it.
fn attention(text: &str) -> Result<Vec<(String, f64)>> {
    let mut parts: Vec<(String, f64)> = vec![];
    let mut round: Vec<usize> = vec![];
    let mut square: Vec<usize> = vec![];
    let scale = |parts: &mut Vec<(String, f64)>, start: usize, factor: f64| {
        parts[start..].iter_mut().for_each(|p| p.1 *= factor);
    };
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let len = match c {
            '\\' => match rest[1..].chars().next() {
                Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                    parts.push((e.to_string(), 1.0));
                    2
                }
                _ => {
                    parts.push((String::new(), 1.0));
                    1
                }
            },
            '(' => {
                round.push(parts.len());
                1
            }
            '[' => {
                square.push(parts.len());
                1
            }
            ':' => match weight_close(rest) {
                Some((number, len)) => {
                    match round.pop() {
                        Some(start) => {
                            let weight = number.parse().map_err(|_| {
                                DiffusionError::input("prompt", format!("emphasis weight `{number}` is not a number"))
                            })?;
                            scale(&mut parts, start, weight);
                        }
                        None => push_text(&mut parts, &rest[..len]),
                    }
                    len
                }
                None => {
                    push_text(&mut parts, ":");
                    1
                }
            },
            ')' | ']' => {
                let (open, factor) = if c == ')' { (&mut round, 1.1) } else { (&mut square, 1.0 / 1.1) };
                match open.pop() {
                    Some(start) => scale(&mut parts, start, factor),
                    None => push_text(&mut parts, &rest[..1]),
                }
                1
            }
            _ => {
                let len = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
                push_text(&mut parts, &rest[..len]);
                len
            }
        };
        rest = &rest[len..];
    }
    for start in round {
        scale(&mut parts, start, 1.1);
    }
    for start in square {
        scale(&mut parts, start, 1.0 / 1.1);
    }
    if parts.is_empty() {
        parts.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(parts.len());
    for (text, weight) in parts {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    Ok(merged)
}

/// `:` + spaces + `[+-]?[.0-9]+` + spaces + `)` at the start of `s`: (the number, length).
fn weight_close(s: &str) -> Option<(&str, usize)> {
    let number = s[1..].trim_start_matches(is_python_space);
    let sign = usize::from(number.starts_with(['+', '-']));
    let digits = number[sign..].bytes().take_while(|b| *b == b'.' || b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let after = number[sign + digits..].trim_start_matches(is_python_space);
    after.starts_with(')').then(|| (&number[..sign + digits], s.len() - after.len() + 1))
}

/// Plain text, split at whole-word `BREAK`s (with the whitespace around them) into pieces
/// separated by `("BREAK", -1.0)`.
fn push_text(parts: &mut Vec<(String, f64)>, text: &str) {
    let mut piece_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find(BREAK) {
        let at = search + found;
        let end = at + BREAK.len();
        let word_start = text[..at].chars().next_back().is_none_or(|c| !is_word_char(c));
        let word_end = text[end..].chars().next().is_none_or(|c| !is_word_char(c));
        if !(word_start && word_end) {
            search = at + 1;
            continue;
        }
        let before = piece_start + text[piece_start..at].trim_end_matches(is_python_space).len();
        parts.push((text[piece_start..before].to_string(), 1.0));
        parts.push((BREAK.to_string(), -1.0));
        piece_start = text.len() - text[end..].trim_start_matches(is_python_space).len();
        search = piece_start;
    }
    parts.push((text[piece_start..].to_string(), 1.0));
}

/// Python's `\s` (`str.isspace`): Unicode White_Space plus the separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w`: letters, digits and `_`.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits a prompt (without its `<lora:...>` tags) into chunks as A1111's
/// `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` does: each emphasis piece is tokenized on
/// its own, 75 tokens per chunk, `BREAK` closes the chunk, and when a chunk fills up with its last
/// comma at most 20 tokens back, the tokens after that comma start the next chunk. An empty prompt
/// gives one chunk.
pub fn prompt_chunks(tokenizer: &ClipTokenizer, prompt: &str) -> Result<Vec<PromptChunk>> {
    let comma = tokenizer.comma_id();
    let mut chunks = Chunks { tokenizer, done: vec![], ids: vec![], multipliers: vec![], last_comma: None };
    for (text, weight) in attention(prompt)? {
        if is_break(&text, weight) {
            chunks.close();
            continue;
        }
        for id in tokenizer.encode(&text)? {
            if Some(id) == comma {
                chunks.last_comma = Some(chunks.ids.len());
            } else if let Some(last_comma) =
                chunks.last_comma.filter(|&c| chunks.ids.len() == CHUNK_TOKENS && c + COMMA_BACKTRACK >= CHUNK_TOKENS)
            {
                let moved_ids = chunks.ids.split_off(last_comma + 1);
                let moved_multipliers = chunks.multipliers.split_off(last_comma + 1);
                chunks.close();
                chunks.ids = moved_ids;
                chunks.multipliers = moved_multipliers;
            }
            if chunks.ids.len() == CHUNK_TOKENS {
                chunks.close();
            }
            chunks.ids.push(id);
            chunks.multipliers.push(weight as f32);
        }
    }
    if !chunks.ids.is_empty() || chunks.done.is_empty() {
        chunks.close();
    }
    Ok(chunks.done)
}

/// The chunks of `prompt_chunks` under construction.
struct Chunks<'a> {
    tokenizer: &'a ClipTokenizer,
    done: Vec<PromptChunk>,
    ids: Vec<u32>,
    multipliers: Vec<f32>,
    last_comma: Option<usize>,
}

impl Chunks<'_> {
    /// Wraps the current tokens in `<|startoftext|>` ... `<|endoftext|>`, pads them to 77 and
    /// starts a new chunk. Padding is `<|endoftext|>`; with another pad token, everything after
    /// the first `<|endoftext|>` becomes the pad id (A1111's `process_tokens`).
    fn close(&mut self) {
        let (bos, eos, pad) = (self.tokenizer.bos_id(), self.tokenizer.eos_id(), self.tokenizer.pad_id());
        let mut ids = Vec::with_capacity(ClipTokenizer::MAX_LENGTH);
        ids.push(bos);
        ids.append(&mut self.ids);
        ids.resize(ClipTokenizer::MAX_LENGTH, eos);
        if pad != eos
            && let Some(first) = ids.iter().position(|&id| id == eos)
        {
            ids[first + 1..].fill(pad);
        }
        let mut multipliers = Vec::with_capacity(ClipTokenizer::MAX_LENGTH);
        multipliers.push(1.0);
        multipliers.append(&mut self.multipliers);
        multipliers.resize(ClipTokenizer::MAX_LENGTH, 1.0);
        self.done.push(PromptChunk { ids, multipliers });
        self.last_comma = None;
    }
}

/// Pads the shorter of a positive and a negative prompt's chunks with empty-prompt chunks so
/// both have as many: A1111's "Pad prompt/negative prompt to be same length" option, which lets
/// them share a UNet batch (A1111's default instead runs them in separate UNet calls when their
/// lengths differ).
pub fn pad_to_same_length(positive: &mut Vec<PromptChunk>, negative: &mut Vec<PromptChunk>, tokenizer: &ClipTokenizer) {
    let n = positive.len().max(negative.len());
    for chunks in [positive, negative] {
        chunks.resize(n, PromptChunk::empty(tokenizer));
    }
}

/// A1111's "Original" emphasis on one encoded chunk: `z * multipliers`, rescaled so the mean of
/// the whole tensor is unchanged. `z` is `[.., 77, D]` (the text encoder output of one chunk, for
/// one prompt or a batch: the mean is over everything passed) and `multipliers` has `z`'s shape
/// without `D`. Computed in f32, returned in `z`'s dtype.
pub fn apply_emphasis(z: &Tensor, multipliers: &Tensor) -> Result<Tensor> {
    let dims = z.dims();
    if dims.is_empty() || multipliers.dims()[..] != dims[..dims.len() - 1] {
        return Err(DiffusionError::input(
            "multipliers",
            format!(
                "shape {:?} does not match the encoder output {:?} without its last dimension",
                multipliers.dims(),
                dims
            ),
        ));
    }
    let z32 = z.to_dtype(DType::F32)?;
    let original_mean = z32.mean_all()?;
    let weighted = z32.broadcast_mul(&multipliers.to_dtype(DType::F32)?.unsqueeze(multipliers.rank())?)?;
    let ratio = (original_mean / weighted.mean_all()?)?;
    Ok(weighted.broadcast_mul(&ratio)?.to_dtype(z.dtype())?)
}
