//! Tokenizer parity with Hugging Face: each fixture's tokenizer.json, through tuna's wrapper,
//! gives the ids (with and without special tokens) and the decoded text that `tokenizers` in
//! Python gave when the fixtures were made.

use serde_json::Value;
use std::path::PathBuf;
use tuna_models::tokenizer::Tokenizer;

#[test]
fn fixture_tokenizers_match_hugging_face() {
    let mut checked = 0;
    for arch in ["gpt2", "llama", "bert"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(arch);
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap().without_padding_and_truncation();
        let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
        for c in cases["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let ids =
                |k: &str| -> Vec<u32> { c[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
            assert_eq!(tok.encode(text, true).unwrap(), ids("ids"), "{arch}: {text:?} with special tokens");
            assert_eq!(tok.encode(text, false).unwrap(), ids("ids_no_special"), "{arch}: {text:?}");
            assert_eq!(
                tok.decode(&ids("ids"), true).unwrap(),
                c["decoded"].as_str().unwrap(),
                "{arch}: decode {text:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} cases");
}
