//! `tuna generate` end to end on the committed tiny fixtures: a GPT-2 and a Llama Hugging Face
//! folder each produce text; a missing model path fails with a message naming it, no backtrace.

mod common;

use common::hub_cache;
use std::path::Path;
use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/tuna-models/tests/fixtures").join(name).display().to_string()
}

fn tuna_generate(model: &str, max_new_tokens: usize, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args(["generate", "--model", model, "--prompt", "hello world"])
        .args(["--max-new-tokens", &max_new_tokens.to_string()])
        .args(extra)
        // A backtrace must not appear even when one is asked for.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run tuna generate")
}

fn assert_generates(name: &str, extra: &[&str]) -> String {
    let out = tuna_generate(&fixture(name), 5, extra);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} {extra:?}: exit {:?}, stderr: {stderr}", out.status.code());
    assert!(!stdout.trim().is_empty(), "{name} {extra:?}: no text generated (stderr: {stderr})");
    stdout.into_owned()
}

#[test]
fn gpt2_folder_generates() {
    let greedy = assert_generates("gpt2", &[]);
    // Greedy decoding is deterministic.
    assert_eq!(greedy, assert_generates("gpt2", &[]));
    assert_generates("gpt2", &["--temperature", "0.8", "--top-k", "20", "--seed", "3"]);
}

#[test]
fn llama_folder_generates() {
    assert_generates("llama", &[]);
}

#[test]
fn missing_model_path_is_a_named_error_without_backtrace() {
    let missing = std::env::temp_dir().join("tuna-no-such-model-dir").display().to_string();
    let out = tuna_generate(&missing, 5, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing model must fail");
    assert!(stderr.contains(&missing) && stderr.contains("no such"), "the message must name the path: {stderr}");
    assert!(!stderr.contains("backtrace") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gpt2_beyond_its_positions_is_refused_up_front() {
    // The fixture has 64 learned positions.
    let out = tuna_generate(&fixture("gpt2"), 100, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("64 positions") && stderr.contains("--max-new-tokens 60 or less"), "{stderr}");
}

#[test]
fn every_decoder_is_bounded_by_its_context_before_generating() {
    // Llama's RoPE has no table to run off, but its context (64 in the fixture) bounds it all the same:
    // a million new tokens is refused at once instead of running on with nothing printed.
    let t0 = std::time::Instant::now();
    let out = tuna_generate(&fixture("llama"), 1_000_000, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("1000000 new tokens exceeds the model's 64 positions"), "{stderr}");
    assert!(t0.elapsed().as_secs() < 30, "refused up front");
}

#[test]
fn a_model_id_loads_from_a_hugging_face_cache_layout() {
    let d = std::env::temp_dir().join(format!("tuna-cli-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let cache = hub_cache(&d);
    // Offline: these come from the cache or fail (the download is tested against a loopback hub in
    // tuna-models' hub_download tests, and its unreachable case below).
    let gen = |model: &str, cache: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_tuna"))
            .args(["generate", "--model", model, "--prompt", "The cat", "--max-new-tokens", "4"])
            .env("HF_HUB_CACHE", cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let by_path = gen(&fixture("llama"), &cache);
    let by_id = gen("tiny-org/tiny-llama", &cache);
    assert!(by_id.status.success(), "{}", String::from_utf8_lossy(&by_id.stderr));
    assert_eq!(by_id.stdout, by_path.stdout);
    assert_eq!(gen("tiny-org/tiny-llama@c0ffee12", &cache).stdout, by_path.stdout);
    // Not cached: the error says where it looked.
    let missing = gen("tiny-org/other", &cache);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("models--tiny-org--other does not exist"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
    let missing = gen("tiny-org/tiny-llama@v9", &cache);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("refs/v9 does not exist"));
    // Online, with a hub that does not answer (a port nothing listens on): the error names the
    // cache folder looked in and the endpoint tried ($HF_ENDPOINT read by the CLI).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args(["generate", "--model", "tiny-org/other", "--prompt", "The cat", "--max-new-tokens", "4"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_ENDPOINT", &endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let looked = cache.join("models--tiny-org--other");
    assert!(!out.status.success() && err.contains(&format!("{} does not exist", looked.display())), "{err}");
    assert!(err.contains(&format!("the hub at {endpoint} could not be reached")), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}
