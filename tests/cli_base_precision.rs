//! The base precision an adapter trained on (its `tuna_task.json`'s `base_precision`), followed by
//! `tuna generate` and `tuna serve` as `tuna eval` follows it: generate runs on that base unless
//! `--base-precision` says otherwise (then a `note:`), and explains a failure the recorded
//! precision caused; serve holds its base in the precision every adapter of `--adapters` trained
//! on (else f32, or `--base-precision`), and notes each adapter served on another base, at startup
//! and when loaded at run time. On the tiny Llama fixture with LoRA adapters of a few steps.

mod common;
#[allow(dead_code)] // the serve tests use the rest
mod serve_client;

use common::*;
use serde_json::json;
use serve_client::Server;
use std::path::{Path, PathBuf};

const PROMPT: &str = "The cat";
const MAX_NEW: &str = "24";

/// Two LoRA runs on the tiny Llama in `d` (trained side by side): `int8` (on an int8 base) and
/// `f32`, each `d/<name>/adapter`.
fn train_runs(d: &Path) {
    let lm = data(d, "lm.jsonl", 12, false);
    std::thread::scope(|s| {
        for p in ["int8", "f32"] {
            let a = train_args(&d.join(p), &lm, 4, &["--base-precision", p]);
            let a = set(set(a, "--lr", "0.05"), "--save-every", "100");
            s.spawn(move || {
                let o = tuna(&a);
                assert!(o.status.success(), "training {p}: {}", String::from_utf8_lossy(&o.stderr));
            });
        }
    });
}

/// `tuna generate` (greedy) with `adapter` and `extra`: its stdout and stderr.
fn generate(adapter: &Path, extra: &[&str]) -> (String, String) {
    let mut a: Vec<String> =
        ["generate", "--model", &fixture("llama"), "--prompt", PROMPT, "--max-new-tokens", MAX_NEW]
            .map(String::from)
            .to_vec();
    a.extend(["--adapter".to_string(), adapter.display().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    let o = tuna(&a);
    let err = ok(&o);
    (String::from_utf8(o.stdout).unwrap(), err)
}

#[test]
fn generate_runs_an_adapter_on_the_base_it_trained_on_unless_told_otherwise() {
    let d = tmp("base-precision-generate");
    train_runs(&d);
    let adapter = |run: &str| d.join(run).join("adapter");
    let int8 = adapter("int8");
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(int8.join("tuna_task.json")).unwrap()).unwrap();
    assert_eq!(task["base_precision"], "int8", "{task}");
    let (default, err) = generate(&int8, &[]);
    assert!(!err.contains("note:"), "no flag: nothing to note: {err}");
    let (on_int8, err) = generate(&int8, &["--base-precision", "int8"]);
    assert!(!err.contains("note:"), "the adapter's own precision: nothing to note: {err}");
    let (on_f32, err) = generate(&int8, &["--base-precision", "f32"]);
    let note = format!(
        "note: --base-precision f32: the adapter was trained with --base-precision int8 ({})",
        int8.join("tuna_task.json").display()
    );
    assert!(err.contains(&note), "{err}");
    // The fixture tells the two bases apart (a near-tie in its logits goes the other way), so the
    // default is seen to be the int8 base, not the f32 one.
    println!("int8 base: {on_int8:?}\nf32 base: {on_f32:?}");
    assert_ne!(on_int8, on_f32, "the int8 and f32 bases generated the same text: the test cannot tell them apart");
    assert_eq!(default, on_int8, "without the flag, generate did not run on the base the adapter trained on");
    // An f32 adapter (its task file records none) and no adapter: f32, nothing noted.
    let (f32_default, err) = generate(&adapter("f32"), &[]);
    assert!(!err.contains("note:"), "{err}");
    assert_eq!(f32_default, generate(&adapter("f32"), &["--base-precision", "f32"]).0);
    // A base the recorded precision cannot hold: the failure says where the precision came from
    // and how to run on an f32 base instead; given as a flag, the flag is the reason and no hint.
    let q4 = d.join("q4").join("adapter");
    std::fs::create_dir_all(&q4).unwrap();
    for e in std::fs::read_dir(&int8).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), q4.join(e.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(q4.join("tuna_task.json")).unwrap().replace("\"int8\"", "\"q4\"");
    std::fs::write(q4.join("tuna_task.json"), text).unwrap();
    let gen = |extra: &[&str]| {
        let mut a: Vec<String> =
            ["generate", "--model", &fixture("llama"), "--prompt", PROMPT, "--adapter"].map(String::from).to_vec();
        a.push(q4.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        tuna(&a)
    };
    let err = fails(&gen(&[]), "Q4_0 or Q4_1");
    let hint = format!(
        "(the base precision q4 is the one {} records as trained on; --base-precision f32 generates on an f32 base)",
        q4.join("tuna_task.json").display()
    );
    assert!(err.contains(&hint), "{err}");
    let err = fails(&gen(&["--base-precision", "q4"]), "Q4_0 or Q4_1");
    assert!(!err.contains("records as trained on"), "{err}");
    // An unknown recorded precision is refused naming the file.
    std::fs::write(q4.join("tuna_task.json"), r#"{"task": "lm", "base_precision": "fp8"}"#).unwrap();
    let err = fails(&gen(&[]), "unknown base precision `fp8`");
    assert!(err.contains(&q4.join("tuna_task.json").display().to_string()), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `d/adapters`, holding copies of the runs of `d` named (`<name>/adapter`).
fn adapters_of(d: &Path, names: &[&str]) -> PathBuf {
    let dir = d.join("adapters");
    for n in names {
        let to = dir.join(n).join("adapter");
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(d.join(n).join("adapter")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    dir
}

/// A greedy completion's text from `srv` for `model`.
fn complete(srv: &Server, model: &str) -> String {
    let r = srv.post(
        "/v1/completions",
        &json!({"model": model, "prompt": PROMPT, "max_tokens": MAX_NEW.parse::<u32>().unwrap(), "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Each listed model's id and precision: the base's `base_precision` (served), an adapter's
/// `trained_base_precision` (and no `base_precision`, which would read as the served one).
fn precisions(listed: &serde_json::Value) -> Vec<(String, String)> {
    let data = listed["data"].as_array().unwrap_or_else(|| panic!("{listed}"));
    data.iter()
        .map(|m| {
            let key = if m["id"] == "base" { "base_precision" } else { "trained_base_precision" };
            assert!(m["id"] == "base" || m.get("base_precision").is_none(), "{m}");
            (m["id"].as_str().unwrap().into(), m[key].as_str().unwrap_or_else(|| panic!("{m}")).into())
        })
        .collect()
}

/// `tuna generate`'s text as `tuna serve` answers it (no trailing newline).
fn generated(adapter: &Path, extra: &[&str]) -> String {
    let (out, _) = generate(adapter, extra);
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

#[test]
fn serve_holds_the_base_its_adapters_trained_on_and_notes_any_adapter_on_another() {
    let d = tmp("base-precision-serve");
    train_runs(&d);
    let adapter = |run: &str| d.join(run).join("adapter");
    let note = |name: &str, trained: &str, served: &str| {
        format!(
            "note: adapter `{name}` was trained with --base-precision {trained} ({}) and is served on the {served} base",
            d.join("adapters").join(name).join("adapter").join("tuna_task.json").display()
        )
    };
    // Only int8 adapters: the base is int8, said once, no note; the answers are generate's.
    let dir = adapters_of(&d, &["int8"]);
    let srv = Server::start(Some(&dir), &[]);
    assert_eq!(complete(&srv, "int8"), generated(&adapter("int8"), &[]));
    let listed = srv.req("GET", "/v1/adapters", None).json();
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("base precision int8: the one every adapter of {} was trained with", dir.display())),
        "{err}"
    );
    assert!(!err.contains("note:"), "{err}");
    assert_eq!(precisions(&listed), [("base".into(), "int8".into()), ("int8".into(), "int8".into())]);
    // The same folder on an f32 base, as told: served, noted, and generate's f32-base answers.
    let srv = Server::start(Some(&dir), &["--base-precision", "f32"]);
    assert_eq!(complete(&srv, "int8"), generated(&adapter("int8"), &["--base-precision", "f32"]));
    let listed = srv.req("GET", "/v1/models", None).json();
    assert_eq!(precisions(&listed), [("base".into(), "f32".into()), ("int8".into(), "int8".into())]);
    // Loaded at run time on this f32 base: noted too (an f32 adapter is not).
    let r = srv.post("/v1/adapters", &json!({"name": "late", "path": dir.join("int8")}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["adapter"]["trained_base_precision"], "int8", "{}", r.body);
    let r = srv.post("/v1/adapters", &json!({"name": "plain", "path": adapter("f32")}));
    assert_eq!(r.status, 201, "{}", r.body);
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&note("int8", "int8", "f32")), "{err}");
    assert!(err.contains("note: adapter `late` was trained with --base-precision int8"), "{err}");
    assert!(!err.contains("adapter `plain` was trained"), "{err}");
    assert!(!err.contains("base precision int8: the one every adapter"), "{err}");
    // A mix: the base is f32 (the adapters disagree) and only the int8 adapter is noted.
    let dir = adapters_of(&d, &["f32"]);
    let srv = Server::start(Some(&dir), &[]);
    assert_eq!(complete(&srv, "f32"), generated(&adapter("f32"), &[]));
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&note("int8", "int8", "f32")), "{err}");
    assert!(!err.contains("adapter `f32` was trained"), "{err}");
    assert!(!err.contains("base precision int8: the one every adapter"), "{err}");
    // Told int8 over the mix: the f32 adapter is the one noted.
    let srv = Server::start(Some(&dir), &["--base-precision", "int8"]);
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&note("f32", "f32", "int8")), "{err}");
    assert!(!err.contains("adapter `int8` was trained"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}
