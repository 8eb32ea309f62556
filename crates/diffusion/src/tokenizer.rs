//! The CLIP BPE tokenizer of every Stable Diffusion text encoder (SD1.x CLIP-L, SD2.x OpenCLIP
//! ViT-H, SDXL CLIP-L and OpenCLIP bigG), matching transformers' `CLIPTokenizer`: NFC, runs of
//! whitespace to one space, lowercase, CLIP's pre-tokenizer regex, byte-level BPE with `</w>`.
//!
//! The vocabulary is embedded (`assets/bpe_simple_vocab_16e6.txt.gz`, the merges file of OpenAI
//! CLIP as shipped by open_clip), so single-file checkpoints work offline; a diffusers
//! `tokenizer/` folder can be loaded instead.

use std::io::Read;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::diffusers_folder::read_config;
use crate::error::{DiffusionError, Result};

const EMBEDDED_VOCAB: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
const EMBEDDED_NAME: &str = "assets/bpe_simple_vocab_16e6.txt.gz";
/// CLIP uses the first 48894 merges of the file (49408 tokens in all).
const EMBEDDED_MERGES: usize = 49152 - 256 - 2;

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer: special tokens, contractions, letter runs, single digits, other runs.
const PRE_TOKENIZER_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The token that fills a sequence after its `<|endoftext|>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadToken {
    /// `<|endoftext|>` (49407): SD1.x and SDXL's first text encoder (CLIP-L).
    EndOfText,
    /// `!` (0): SD2.x and SDXL's second text encoder (OpenCLIP bigG).
    Exclamation,
}

/// A CLIP tokenizer: text to token ids, and ids wrapped and padded to the 77 positions of the model.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    comma: Option<u32>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("bos", &self.bos).field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

impl ClipTokenizer {
    /// Positions of the text encoder: `<|startoftext|>`, 75 tokens, `<|endoftext|>`.
    pub const MAX_LENGTH: usize = 77;

    /// The tokenizer of the embedded CLIP vocabulary, padding with `pad`. Building it takes about
    /// 0.1 s: build it once and keep it (it is cheap to clone).
    pub fn embedded(pad: PadToken) -> Result<Self> {
        let source = Path::new(EMBEDDED_NAME);
        let mut text = String::new();
        flate2::read::GzDecoder::new(EMBEDDED_VOCAB)
            .read_to_string(&mut text)
            .map_err(|e| DiffusionError::config(source, "merges", e.to_string()))?;
        // Line 0 is a header; the merges follow, one `left right` pair per line.
        let merges = text
            .split('\n')
            .skip(1)
            .take(EMBEDDED_MERGES)
            .enumerate()
            .map(|(i, line)| merge_pair(line).ok_or_else(|| bad_merge(source, i + 2, line)))
            .collect::<Result<Merges>>()?;
        if merges.len() != EMBEDDED_MERGES {
            return Err(DiffusionError::config(
                source,
                "merges",
                format!("{} merges, expected {EMBEDDED_MERGES}", merges.len()),
            ));
        }
        let bytes = byte_chars();
        let vocab: Vocab = bytes
            .iter()
            .map(char::to_string)
            .chain(bytes.iter().map(|c| format!("{c}</w>")))
            .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
            .chain([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()])
            .zip(0u32..)
            .collect();
        let pad = match pad {
            PadToken::EndOfText => END_OF_TEXT,
            PadToken::Exclamation => "!",
        };
        Self::build(source, vocab, merges, &SpecialTokens { pad: pad.to_string(), ..SpecialTokens::default() })
    }

    /// Loads a diffusers `tokenizer/` (or `tokenizer_2/`) folder: `tokenizer.json` when present,
    /// else `vocab.json` and `merges.txt`; the special tokens (notably the pad token) from
    /// `tokenizer_config.json` and `special_tokens_map.json`. As in transformers 5, only the
    /// vocabulary and merges of `tokenizer.json` are used; the pipeline is always CLIP's.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let special = SpecialTokens::read(dir)?;
        let json = dir.join("tokenizer.json");
        if json.exists() {
            let (vocab, merges) = read_tokenizer_json(&json)?;
            return Self::build(&json, vocab, merges, &special);
        }
        let vocab_path = dir.join("vocab.json");
        let vocab: std::collections::HashMap<String, u32> = read_config(&vocab_path)?;
        let merges_path = dir.join("merges.txt");
        let text = std::fs::read_to_string(&merges_path)
            .map_err(|source| DiffusionError::Io { path: merges_path.clone(), source })?;
        let merges = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.starts_with("#version"))
            .map(|(i, line)| merge_pair(line).ok_or_else(|| bad_merge(&merges_path, i + 1, line)))
            .collect::<Result<Merges>>()?;
        Self::build(&merges_path, vocab.into_iter().collect(), merges, &special)
    }

    fn build(source: &Path, vocab: Vocab, merges: Merges, special: &SpecialTokens) -> Result<Self> {
        let id = |field: &str, token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                DiffusionError::config(source, field, format!("token `{token}` is not in the vocabulary"))
            })
        };
        let (bos, eos, pad) =
            (id("bos_token", &special.bos)?, id("eos_token", &special.eos)?, id("pad_token", &special.pad)?);
        id("unk_token", &special.unk)?;
        let comma = vocab.get(",</w>").copied();
        let config_error = |field: &str, e: tokenizers::Error| DiffusionError::config(source, field, e.to_string());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(special.unk.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .build()
            .map_err(|e| config_error("merges", e))?;
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
                .map_err(|e| config_error("normalizer", e))?
                .into(),
            Lowercase.into(),
        ]);
        let split =
            Split::new(SplitPattern::Regex(PRE_TOKENIZER_REGEX.to_string()), SplitDelimiterBehavior::Removed, true)
                .map_err(|e| config_error("pre_tokenizer", e))?;
        let pre_tokenizer = PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(normalizer)).map_err(|e| config_error("normalizer", e))?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        // transformers' added tokens: matched in the raw text, before normalisation.
        tokenizer
            .add_special_tokens([
                AddedToken::from(special.bos.clone(), true),
                AddedToken::from(special.eos.clone(), true),
            ])
            .map_err(|e| config_error("added_tokens", e))?;
        Ok(Self { tokenizer, bos, eos, pad, comma })
    }

    /// The token ids of `text`, without `<|startoftext|>` / `<|endoftext|>`, not truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding =
            self.tokenizer.encode_fast(text, false).map_err(|e| DiffusionError::input("text", e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The 77 ids the text encoder takes: `<|startoftext|>`, the first 75 ids of `text`,
    /// `<|endoftext|>`, then the pad token (what diffusers' pipelines feed the model).
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        let mut out = Vec::with_capacity(Self::MAX_LENGTH);
        out.push(self.bos);
        out.extend(ids.iter().take(Self::MAX_LENGTH - 2));
        out.push(self.eos);
        out.resize(Self::MAX_LENGTH, self.pad);
        Ok(out)
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id that pads sequences after `<|endoftext|>`.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The id of `,</w>` (a comma ending a word), if the vocabulary has one.
    pub(crate) fn comma_id(&self) -> Option<u32> {
        self.comma
    }
}

/// Special tokens of a tokenizer folder, with `CLIPTokenizer`'s defaults.
struct SpecialTokens {
    bos: String,
    eos: String,
    pad: String,
    unk: String,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            bos: START_OF_TEXT.to_string(),
            eos: END_OF_TEXT.to_string(),
            pad: END_OF_TEXT.to_string(),
            unk: END_OF_TEXT.to_string(),
        }
    }
}

impl SpecialTokens {
    /// `tokenizer_config.json`, then `special_tokens_map.json` on top (transformers' precedence).
    fn read(dir: &Path) -> Result<Self> {
        let mut tokens = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let json: serde_json::Value = read_config(&path)?;
            for (field, slot) in [
                ("bos_token", &mut tokens.bos),
                ("eos_token", &mut tokens.eos),
                ("pad_token", &mut tokens.pad),
                ("unk_token", &mut tokens.unk),
            ] {
                match json.get(field) {
                    None | Some(serde_json::Value::Null) => {}
                    Some(value) => {
                        *slot = token_content(value).ok_or_else(|| {
                            DiffusionError::config(&path, field, "expected a string or an object with `content`")
                        })?
                    }
                }
            }
        }
        Ok(tokens)
    }
}

/// A special token as transformers writes it: `"!"` or `{"content": "!", ...}`.
fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The vocabulary and merges of a `tokenizer.json` BPE model (merges as `"a b"` or `["a", "b"]`).
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges)> {
    #[derive(serde::Deserialize)]
    struct File {
        model: Model,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        vocab: std::collections::HashMap<String, u32>,
        merges: Vec<serde_json::Value>,
    }
    let file: File = read_config(path)?;
    let merges = file
        .model
        .merges
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            let pair = match merge {
                serde_json::Value::String(s) => merge_pair(s),
                serde_json::Value::Array(pair) => match pair.as_slice() {
                    [serde_json::Value::String(a), serde_json::Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| {
                DiffusionError::config(path, &format!("model.merges[{i}]"), format!("not a pair: {merge}"))
            })
        })
        .collect::<Result<Merges>>()?;
    Ok((file.model.vocab.into_iter().collect(), merges))
}

/// `"left right"` as a pair; `None` unless there are exactly two parts.
fn merge_pair(line: &str) -> Option<(String, String)> {
    let (a, b) = line.split_once(' ')?;
    (!a.is_empty() && !b.is_empty() && !b.contains(' ')).then(|| (a.to_string(), b.to_string()))
}

fn bad_merge(path: &Path, line_number: usize, line: &str) -> DiffusionError {
    DiffusionError::config(PathBuf::from(path), &format!("line {line_number}"), format!("not a merge pair: `{line}`"))
}

/// GPT-2's byte-to-unicode table, in vocabulary order: the printable Latin-1 bytes as themselves,
/// then the other bytes as U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let shown = (0..=255u8).filter(|&b| printable(b)).map(char::from);
    let hidden = (0..=255u8).filter(|&b| !printable(b)).zip(256u32..).filter_map(|(_, c)| char::from_u32(c));
    shown.chain(hidden).collect()
}
