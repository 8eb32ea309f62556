//! The CLIP tokenizer against transformers' `CLIPTokenizer` (fixtures written by
//! `tools/reference/tokenizer_prompt.py`).

use std::path::{Path, PathBuf};

use easyphoto_diffusion::{ClipTokenizer, DiffusionError, PadToken};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    folders: Vec<Folder>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    ids: Vec<u32>,
    padded_eos: Vec<u32>,
    padded_exclamation: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct Folder {
    folder: String,
    bos: u32,
    eos: u32,
    pad: u32,
    texts: Vec<FolderText>,
}

#[derive(Deserialize)]
struct FolderText {
    text: String,
    ids: Vec<u32>,
    padded: Vec<u32>,
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn embedded_vocabulary_matches_transformers() {
    let eos = ClipTokenizer::embedded(PadToken::EndOfText).unwrap();
    let excl = ClipTokenizer::embedded(PadToken::Exclamation).unwrap();
    let fixture = fixture();
    assert!(fixture.cases.len() >= 25);
    for case in &fixture.cases {
        assert_eq!(eos.encode(&case.text).unwrap(), case.ids, "{}: {:?}", case.name, case.text);
        assert_eq!(eos.encode_padded(&case.text).unwrap(), case.padded_eos, "{} (pad <|endoftext|>)", case.name);
        if let Some(padded) = &case.padded_exclamation {
            assert_eq!(excl.encode(&case.text).unwrap(), case.ids, "{} (pad !)", case.name);
            assert_eq!(&excl.encode_padded(&case.text).unwrap(), padded, "{} (pad !)", case.name);
        }
    }
}

#[test]
fn special_ids_of_the_embedded_vocabulary() {
    let eos = ClipTokenizer::embedded(PadToken::EndOfText).unwrap();
    let excl = ClipTokenizer::embedded(PadToken::Exclamation).unwrap();
    assert_eq!((eos.bos_id(), eos.eos_id(), eos.pad_id()), (49406, 49407, 49407));
    assert_eq!((excl.bos_id(), excl.eos_id(), excl.pad_id()), (49406, 49407, 0));
    let padded = excl.encode_padded("a photo").unwrap();
    assert_eq!(padded[..5], [49406, 320, 1125, 49407, 0]);
}

/// transformers registers the pad token as a special token, so its SDXL `tokenizer_2` encodes a
/// literal `!` as the pad id 0; here the pad token only pads, so both SDXL tokenizers agree.
#[test]
fn exclamation_mark_in_text_is_an_ordinary_token() {
    let excl = ClipTokenizer::embedded(PadToken::Exclamation).unwrap();
    let eos = ClipTokenizer::embedded(PadToken::EndOfText).unwrap();
    assert_eq!(excl.encode("hello!").unwrap(), [3306, 256]);
    assert_eq!(excl.encode("wow!!").unwrap(), eos.encode("wow!!").unwrap());
}

#[test]
fn diffusers_folders_match_transformers() {
    let fixture = fixture();
    assert_eq!(fixture.folders.len(), 2);
    for folder in &fixture.folders {
        let tok = ClipTokenizer::from_folder(fixtures().join(&folder.folder)).unwrap();
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (folder.bos, folder.eos, folder.pad),
            "{}",
            folder.folder
        );
        for case in &folder.texts {
            assert_eq!(tok.encode(&case.text).unwrap(), case.ids, "{}: {:?}", folder.folder, case.text);
            assert_eq!(tok.encode_padded(&case.text).unwrap(), case.padded, "{}: {:?}", folder.folder, case.text);
        }
    }
}

fn copy_folder(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn missing_folder_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    match ClipTokenizer::from_folder(dir.path()) {
        Err(DiffusionError::Io { path, .. }) => assert_eq!(path, dir.path().join("vocab.json")),
        other => panic!("expected an io error, got {other:?}"),
    }
}

#[test]
fn bad_merge_line_names_the_line() {
    let dir = copy_folder("folder_vocab_merges");
    let merges = dir.path().join("merges.txt");
    let text = std::fs::read_to_string(&merges).unwrap().replacen("\n", "\nthree parts here\n", 1);
    std::fs::write(&merges, text).unwrap();
    match ClipTokenizer::from_folder(dir.path()) {
        Err(DiffusionError::Config { path, field, .. }) => {
            assert_eq!(path, merges);
            assert_eq!(field, "line 2");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn pad_token_outside_the_vocabulary_is_a_config_error() {
    let dir = copy_folder("folder_vocab_merges");
    let map = dir.path().join("special_tokens_map.json");
    let text = std::fs::read_to_string(&map).unwrap().replace("\"pad_token\": \"!\"", "\"pad_token\": \"<pad>\"");
    std::fs::write(&map, text).unwrap();
    let err = ClipTokenizer::from_folder(dir.path()).unwrap_err();
    assert!(matches!(&err, DiffusionError::Config { field, .. } if field == "pad_token"), "{err:?}");
    assert!(err.to_string().contains("<pad>"), "{err}");
}

#[test]
fn unparsable_tokenizer_json_is_a_config_error() {
    let dir = copy_folder("folder_tokenizer_json");
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"model": {"vocab": {}, "merges": [1]}}"#).unwrap();
    let err = ClipTokenizer::from_folder(dir.path()).unwrap_err();
    assert!(matches!(&err, DiffusionError::Config { field, .. } if field == "model.merges[0]"), "{err:?}");
}
