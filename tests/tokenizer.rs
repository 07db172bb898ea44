//! Loading HuggingFace `tokenizer.json` files and rendering prompts.

use devft::Error;
use devft::tokenizer::{ChatTurn, PromptTemplate, Role, Tokenizer};

/// A byte-level BPE tokenizer.json in the layout transformers writes (GPT-2 style), with
/// ChatML special tokens: vocabulary of the bytes used below plus two merges.
const BPE_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"<|im_start|>": 0, "<|im_end|>": 1, "h": 2, "i": 3, "Ġ": 4, "u": 5, "s": 6, "e": 7, "r": 8, "Ċ": 9, "hi": 10, "Ġhi": 11},
    "merges": ["h i", "Ġ hi"]
  }
}"#;

#[test]
fn byte_level_bpe_encodes_merges_specials_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, BPE_JSON).unwrap();
    let tokenizer = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tokenizer.vocab_size(), 12);
    // "hi hi" -> "hi" (merge h+i), "Ġhi" (space marker merged with hi).
    assert_eq!(tokenizer.encode("hi hi", false).unwrap(), vec![10, 11]);
    // Special tokens are matched before BPE; "\n" is the byte-level "Ċ".
    let text = PromptTemplate::ChatMl.render(&[ChatTurn::new(Role::User, "hi")], false);
    assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n");
    assert_eq!(
        tokenizer.encode(&text, false).unwrap(),
        vec![0, 5, 6, 7, 8, 9, 10, 1, 9]
    );
    assert_eq!(tokenizer.decode(&[10, 11], false).unwrap(), "hi hi");
    assert_eq!(tokenizer.token_id("<|im_end|>"), Some(1));
}

#[test]
fn malformed_tokenizer_json_is_a_tokenizer_error() {
    let err = Tokenizer::from_bytes(br#"{"model": {"type": "Nope"}}"#).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");
    let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}
