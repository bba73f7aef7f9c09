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
