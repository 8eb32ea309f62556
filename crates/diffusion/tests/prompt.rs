//! A1111 prompt handling against the reference port of `tools/reference/tokenizer_prompt.py`
//! (checked against the A1111 sources: see tools/reference/README.md).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::prompt::{
    apply_emphasis, pad_to_same_length, parse_extra_networks, parse_prompt_attention, prompt_chunks, strip_comments,
};
use easyphoto_diffusion::{ClipTokenizer, DiffusionError, ExtraNetwork, PadToken, PromptChunk, PromptPart};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    attention: Vec<AttentionCase>,
    extra_networks: Vec<NetworkCase>,
    comments: Vec<CommentCase>,
    chunks: Vec<ChunkCase>,
    pairs: Vec<PairCase>,
    emphasis: Vec<EmphasisCase>,
}

#[derive(Deserialize)]
struct AttentionCase {
    text: String,
    parts: Option<Vec<(String, f64)>>,
}

#[derive(Deserialize)]
struct NetworkCase {
    prompt: String,
    text: Option<String>,
    networks: Option<Vec<Network>>,
}

#[derive(Deserialize)]
struct Network {
    kind: String,
    name: String,
    te: f64,
    unet: f64,
}

#[derive(Deserialize)]
struct CommentCase {
    text: String,
    stripped: String,
}

#[derive(Deserialize)]
struct Chunk {
    ids: Vec<u32>,
    multipliers: Vec<f64>,
}

#[derive(Deserialize)]
struct ChunkCase {
    name: String,
    text: String,
    pad_eos: Vec<Chunk>,
    pad_zero: Vec<Chunk>,
}

#[derive(Deserialize)]
struct PairCase {
    name: String,
    positive: String,
    negative: String,
    chunks: (usize, usize),
    positive_padded: Vec<Chunk>,
    negative_padded: Vec<Chunk>,
}

#[derive(Deserialize)]
struct EmphasisCase {
    name: String,
    shape: Vec<usize>,
    z: Vec<f32>,
    multipliers: Vec<f32>,
    expected: Vec<f32>,
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/prompt_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A1111's representation: `BREAK` is `["BREAK", -1]`.
fn as_pairs(parts: &[PromptPart]) -> Vec<(String, f64)> {
    parts
        .iter()
        .map(|p| match p {
            PromptPart::Text { text, weight } => (text.clone(), *weight),
            PromptPart::Break => ("BREAK".to_string(), -1.0),
        })
        .collect()
}

/// Exact equality: the same float operations in the same order as Python.
#[test]
fn parse_prompt_attention_matches_a1111() {
    let cases = fixture().attention;
    assert!(cases.len() >= 35);
    for case in &cases {
        match (&case.parts, parse_prompt_attention(&case.text)) {
            (Some(expected), Ok(parts)) => assert_eq!(&as_pairs(&parts), expected, "{:?}", case.text),
            (None, Err(DiffusionError::InvalidInput { name: "prompt", .. })) => {}
            (expected, got) => panic!("{:?}: expected {expected:?}, got {got:?}", case.text),
        }
    }
}

#[test]
fn parse_prompt_attention_docstring() {
    let parts = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).").unwrap();
    let text = |t: &str, w: f64| PromptPart::Text { text: t.to_string(), weight: w };
    assert_eq!(
        parts,
        [
            text("a ", 1.0),
            text("house", 1.5730000000000004),
            text(" ", 1.1),
            text("on", 1.0),
            text(" a ", 1.1),
            text("hill", 0.55),
            text(", sun, ", 1.1),
            text("sky", 1.4641000000000006),
            text(".", 1.1),
        ]
    );
    assert_eq!(parse_prompt_attention("a BREAK b").unwrap(), [text("a", 1.0), PromptPart::Break, text("b", 1.0)]);
}

#[test]
fn extra_networks_match_a1111() {
    let cases = fixture().extra_networks;
    for case in &cases {
        match (&case.text, &case.networks, parse_extra_networks(&case.prompt)) {
            (Some(text), Some(expected), Ok((ours, networks))) => {
                assert_eq!(&ours, text, "{:?}", case.prompt);
                let networks: Vec<_> = networks
                    .iter()
                    .map(|n| match n {
                        ExtraNetwork::Lora { name, te_multiplier, unet_multiplier } => {
                            ("lora", name.as_str(), *te_multiplier, *unet_multiplier)
                        }
                        ExtraNetwork::Hypernet { name, multiplier } => {
                            ("hypernet", name.as_str(), *multiplier, *multiplier)
                        }
                    })
                    .collect();
                let expected: Vec<_> =
                    expected.iter().map(|n| (n.kind.as_str(), n.name.as_str(), n.te, n.unet)).collect();
                assert_eq!(networks, expected, "{:?}", case.prompt);
            }
            (None, None, Err(DiffusionError::InvalidInput { name: "prompt", .. })) => {}
            (_, _, got) => panic!("{:?}: got {got:?}", case.prompt),
        }
    }
}

#[test]
fn easyphoto_sd1_prompt_loras() {
    let prompt = "easyphoto_face, easyphoto, 1person, <lora:USER:0.9>, <lora:FilmVelvia3:0.65>, masterpiece";
    let (text, networks) = parse_extra_networks(prompt).unwrap();
    assert_eq!(text, "easyphoto_face, easyphoto, 1person, , , masterpiece");
    let lora = |name: &str, w: f64| ExtraNetwork::Lora { name: name.to_string(), te_multiplier: w, unet_multiplier: w };
    assert_eq!(networks, [lora("USER", 0.9), lora("FilmVelvia3", 0.65)]);
    let (_, networks) = parse_extra_networks("1person, <lora:USER>").unwrap();
    assert_eq!(networks, [lora("USER", 1.0)]);
}

#[test]
fn comments_match_a1111() {
    for case in fixture().comments {
        assert_eq!(strip_comments(&case.text), case.stripped, "{:?}", case.text);
    }
}

fn assert_chunks(name: &str, ours: &[PromptChunk], expected: &[Chunk]) {
    assert_eq!(ours.len(), expected.len(), "{name}: number of chunks");
    for (i, (ours, expected)) in ours.iter().zip(expected).enumerate() {
        assert_eq!(ours.ids, expected.ids, "{name}: ids of chunk {i}");
        // A1111 turns the Python floats into a float32 tensor.
        let multipliers: Vec<f32> = expected.multipliers.iter().map(|&m| m as f32).collect();
        assert_eq!(ours.multipliers, multipliers, "{name}: multipliers of chunk {i}");
    }
}

/// EasyPhoto's prompts, BREAK, comma backtracking at the 75-token boundary, 200 words, empty.
#[test]
fn prompt_chunks_match_a1111() {
    let sd1 = ClipTokenizer::embedded(PadToken::EndOfText).unwrap();
    let sd2 = ClipTokenizer::embedded(PadToken::Exclamation).unwrap();
    let cases = fixture().chunks;
    assert!(cases.len() >= 15);
    for case in &cases {
        assert_chunks(&case.name, &prompt_chunks(&sd1, &case.text).unwrap(), &case.pad_eos);
        assert_chunks(&format!("{} (pad 0)", case.name), &prompt_chunks(&sd2, &case.text).unwrap(), &case.pad_zero);
    }
}

#[test]
fn comma_backtrack_moves_the_tail_to_the_next_chunk() {
    let tok = ClipTokenizer::embedded(PadToken::EndOfText).unwrap();
    let comma = 267;
    // the comma is token 60 of the prompt: chunk 0 ends with it, the 14 words after it move on
    let prompt = format!("{}, {}", vec!["photo"; 60].join(" "), vec!["portrait"; 30].join(" "));
    let chunks = prompt_chunks(&tok, &prompt).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].ids[61], comma);
    assert!(chunks[0].ids[62..].iter().all(|&id| id == tok.eos_id()));
    assert_eq!(chunks[1].ids[1..31], [chunks[1].ids[1]; 30]);
}

#[test]
fn empty_prompt_is_one_empty_chunk() {
    for pad in [PadToken::EndOfText, PadToken::Exclamation] {
        let tok = ClipTokenizer::embedded(pad).unwrap();
        let chunks = prompt_chunks(&tok, "").unwrap();
        assert_eq!(chunks, [PromptChunk::empty(&tok)]);
        assert_eq!(chunks[0].ids[..3], [49406, 49407, tok.pad_id()]);
        assert_eq!(chunks[0].multipliers, [1.0; 77]);
    }
}

#[test]
fn positive_and_negative_are_padded_to_the_same_chunks() {
    let tok = ClipTokenizer::embedded(PadToken::EndOfText).unwrap();
    for case in fixture().pairs {
        let mut positive = prompt_chunks(&tok, &case.positive).unwrap();
        let mut negative = prompt_chunks(&tok, &case.negative).unwrap();
        assert_eq!((positive.len(), negative.len()), case.chunks, "{}", case.name);
        pad_to_same_length(&mut positive, &mut negative, &tok);
        assert_chunks(&case.name, &positive, &case.positive_padded);
        assert_chunks(&case.name, &negative, &case.negative_padded);
    }
}

#[test]
fn emphasis_matches_a1111() {
    for case in fixture().emphasis {
        let z = Tensor::from_vec(case.z, case.shape.as_slice(), &Device::Cpu).unwrap();
        let multipliers = Tensor::from_vec(case.multipliers, &case.shape[..2], &Device::Cpu).unwrap();
        let ours = apply_emphasis(&z, &multipliers).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = ours.iter().zip(&case.expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "{}: max abs error {err:e}", case.name);
        // half precision in, half precision out
        let half = apply_emphasis(&z.to_dtype(DType::F16).unwrap(), &multipliers).unwrap();
        assert_eq!(half.dtype(), DType::F16);
    }
}

#[test]
fn emphasis_rejects_mismatched_multipliers() {
    let z = Tensor::zeros((1, 77, 8), DType::F32, &Device::Cpu).unwrap();
    let multipliers = Tensor::ones((1, 76), DType::F32, &Device::Cpu).unwrap();
    let err = apply_emphasis(&z, &multipliers).unwrap_err();
    assert!(matches!(err, DiffusionError::InvalidInput { name: "multipliers", .. }), "{err:?}");
}

#[test]
fn bad_weights_are_errors_not_panics() {
    for prompt in ["(a:1.2.3)", "(a:.)"] {
        assert!(parse_prompt_attention(prompt).is_err(), "{prompt}");
    }
    for prompt in ["<lora:x:abc>", "<lora:te=1>", "<lora:x:1:2:3.5>", "<hypernet:h:x>"] {
        assert!(parse_extra_networks(prompt).is_err(), "{prompt}");
    }
    // an unmatched weight is text, as in A1111
    assert_eq!(as_pairs(&parse_prompt_attention("a:1.2.3) b").unwrap()), [("a:1.2.3) b".to_string(), 1.0)]);
}
