//! Helpers the binary's end-to-end tests share: fixture paths, scratch folders, tiny data files,
//! a `tuna train` command line on the tiny Llama fixture, and running the binary.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/tuna-models/tests/fixtures").join(name).display().to_string()
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub const SENTENCES: [&str; 6] = [
    "The cat sat on the mat.",
    "A dog ran in the park.",
    "The bird sang a song.",
    "The cat ran to the dog.",
    "A bird sat on the park bench.",
    "The dog sang on the mat.",
];

/// A JSONL file of `n` lm or classify records.
pub fn data(dir: &Path, name: &str, n: usize, classify: bool) -> String {
    let p = dir.join(name);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let t = SENTENCES[i % SENTENCES.len()];
            if classify {
                let label = if t.contains("cat") { "cat" } else { "other" };
                format!("{{\"text\": \"{t}\", \"label\": \"{label}\"}}")
            } else {
                format!("{{\"text\": \"{t}\"}}")
            }
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p.display().to_string()
}

pub fn train_args(out: &Path, train: &str, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        &fixture("llama"),
        "--task",
        "lm",
        "--train",
        train,
        "--method",
        "lora",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--steps",
        &steps.to_string(),
        "--warmup",
        "2",
        "--save-every",
        "1",
        "--keep-last",
        "3",
        "--lr",
        "1e-2",
        "--seed",
        "7",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(out.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `args` with `flag`'s value replaced (or appended).
pub fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

pub fn tuna(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tuna")).args(args).output().expect("run tuna")
}

/// [`tuna`] with `TUNA_CPU_MATRIX=path` (the int8 and q4 bases' product path).
pub fn tuna_on(path: &str, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX", path).args(args).output().expect("run tuna")
}

pub fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status.code());
    err.into_owned()
}

/// The training lines of a metrics log, as written (exact float text).
pub fn train_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"split\":\"train\""))
        .map(String::from)
        .collect()
}

/// Asserts `out` failed with `needle` in its stderr; returns the stderr.
pub fn fails(out: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure mentioning {needle:?}, got success: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A Hugging Face hub cache under `dir` (`dir/hub`) holding the tiny Llama fixture as
/// `tiny-org/tiny-llama` at revision `c0ffee12`, laid out as the hub does (`refs/main`, the
/// snapshot's files linked into `blobs/`). Returns the cache folder (for `HF_HUB_CACHE`).
pub fn hub_cache(dir: &Path) -> PathBuf {
    let cache = dir.join("hub");
    let repo = cache.join("models--tiny-org--tiny-llama");
    let snap = repo.join("snapshots/c0ffee12");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee12").unwrap();
    for e in std::fs::read_dir(fixture("llama")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        let blob = repo.join("blobs").join(format!("blob-{}", name.to_string_lossy()));
        std::fs::copy(&p, &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(&name)).unwrap();
    }
    cache
}

/// `tuna` with `args`, SIGKILLed once its run folder `out` has logged a few metric lines
/// (checkpoints are pruned to the last few; the log is not), so that the kill lands mid-run.
pub fn sigkill_mid_run(args: &[String], out: &Path) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tuna")).args(args).spawn().unwrap();
    let start = std::time::Instant::now();
    let logged = || std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |s| s.lines().count());
    while logged() < 5 {
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "no step was logged");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// The GGUF reader's test writer (`crates/tuna-models/src/gguf/tests/writer.rs`), shared.
#[path = "../../crates/tuna-models/src/gguf/tests/writer.rs"]
pub mod gguf_writer;
pub use tuna_models::gguf::MetaValue;

/// A tiny Llama GGUF in `dir` whose block linear weights are random Q4_0 blocks (everything else
/// F32), with a byte-level BPE vocabulary of the 256 byte symbols and two specials: a model
/// `--base-precision q4` can train on, in a fraction of a second per step.
pub fn tiny_q4_gguf(dir: &Path) -> PathBuf {
    use gguf_writer::{f16_bytes, s, strs, Writer};
    let (hidden, heads, kv_heads, ffn, layers) = (64usize, 4usize, 2usize, 128usize, 2usize);
    let kv = kv_heads * hidden / heads;
    let mut alphabet: Vec<String> =
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().map(String::from).collect();
    alphabet.sort();
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
    tokens.extend(alphabet);
    let vocab = tokens.len();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut w = Writer::new();
    w.kv("general.architecture", s("llama"))
        .kv("llama.embedding_length", MetaValue::U32(hidden as u32))
        .kv("llama.block_count", MetaValue::U32(layers as u32))
        .kv("llama.feed_forward_length", MetaValue::U32(ffn as u32))
        .kv("llama.attention.head_count", MetaValue::U32(heads as u32))
        .kv("llama.attention.head_count_kv", MetaValue::U32(kv_heads as u32))
        .kv("llama.rope.freq_base", MetaValue::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
        .kv("llama.context_length", MetaValue::U32(256))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv("tokenizer.ggml.tokens", strs(&token_refs))
        .kv("tokenizer.ggml.merges", strs(&[]))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(0))
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array([3, 3].into_iter().chain(std::iter::repeat_n(1, vocab - 2)).map(MetaValue::I32).collect()),
        );
    // A fixed xorshift: the same file every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut uniform = move || (next() >> 40) as f32 / (1u64 << 24) as f32;
    let emb: Vec<f32> = (0..vocab * hidden).map(|_| uniform() * 0.2 - 0.1).collect();
    w.f32("token_embd.weight", &[vocab, hidden], &emb);
    let mut q4_0 = |rows: usize, cols: usize| -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..rows * cols / 32 {
            b.extend(f16_bytes(0.01 + uniform() * 0.02));
            b.extend((0..16).map(|_| (uniform() * 256.0) as u8));
        }
        b
    };
    for l in 0..layers {
        for (part, rows, cols) in [
            ("attn_q", hidden, hidden),
            ("attn_k", kv, hidden),
            ("attn_v", kv, hidden),
            ("attn_output", hidden, hidden),
            ("ffn_gate", ffn, hidden),
            ("ffn_up", ffn, hidden),
            ("ffn_down", hidden, ffn),
        ] {
            // ggml type 2: Q4_0; dims innermost first.
            w.tensor(&format!("blk.{l}.{part}.weight"), &[cols as u64, rows as u64], 2, q4_0(rows, cols));
        }
        w.f32(&format!("blk.{l}.attn_norm.weight"), &[hidden], &vec![1.0; hidden]);
        w.f32(&format!("blk.{l}.ffn_norm.weight"), &[hidden], &vec![1.0; hidden]);
    }
    w.f32("output_norm.weight", &[hidden], &vec![1.0; hidden]);
    let p = dir.join("tiny-q4_0.gguf");
    std::fs::write(&p, w.bytes()).unwrap();
    p
}
