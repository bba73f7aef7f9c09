//! The windowed tokenization of long texts keeps exactly the tokens the whole text's tokenization
//! keeps (the first `keep`, or the last), on the three fixture tokenizers (GPT-2's byte-level BPE,
//! Llama's SentencePiece-style BPE, BERT's WordPiece), for texts with spaces, runs of whitespace,
//! digit runs and tokens the vocabulary lacks.

use std::path::Path;
use std::sync::Arc;
use tuna_kernels::Cpu;
use tuna_trainer::Model;

fn texts() -> Vec<String> {
    let words = ["The cat sat on the mat.", "A dog ran  in the park,", "bird\tsang 12345 67890", "ünïcödé wörds ok"];
    let plain: String = words.iter().cycle().take(400).copied().collect::<Vec<_>>().join(" ");
    let spaced: String = (0..300).map(|i| format!("w{i}{}", " ".repeat(1 + i % 4))).collect();
    let digits: String = (0..200).map(|i| format!("{} ", 10_000_000 + i * 7919)).collect();
    let unknown = format!("{} The cat sat. {}", "x".repeat(3000), "y".repeat(3000));
    vec![plain, spaced, digits, unknown]
}

#[test]
fn windows_keep_the_whole_texts_tokens() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuna-models/tests/fixtures");
    for arch in ["gpt2", "llama", "bert"] {
        let m = Model::<Cpu>::open(&Arc::new(Cpu), &root.join(arch), |_| false).unwrap();
        for (i, t) in texts().iter().enumerate() {
            let full = m.encode(t).unwrap();
            for keep in [4, 16, 40] {
                let head = m.encode_window(t, keep, false).unwrap();
                let n = keep.min(full.len());
                assert_eq!(head[..n.min(head.len())], full[..n], "{arch} text {i} keep {keep}: first tokens");
                assert!(head.len() >= n, "{arch} text {i} keep {keep}: too few tokens");
                let tail = m.encode_window(t, keep, true).unwrap();
                assert!(tail.len() >= n, "{arch} text {i} keep {keep}: too few tokens at the end");
                assert_eq!(tail[tail.len() - n..], full[full.len() - n..], "{arch} text {i} keep {keep}: last tokens");
            }
        }
    }
}
