//! `tuna serve` end to end on the committed tiny Llama fixture with five adapters trained by
//! `tuna train` (LoRA, prompt, prefix, Houlsby for lm; LoRA for classify): a loopback load test
//! (32 concurrent clients, 320 requests over the base and the adapters, each answer checked
//! against `tuna generate --adapter` for the same prompt, streamed and not), memory flat after
//! warm-up, every kind of bad input refused with a JSON error while the server carries on, a
//! client leaving mid-stream, adapters loaded and unloaded at run time, the queue limit, metrics,
//! health, and SIGTERM finishing the request in flight before exiting 0.
//!
//! The HTTP client is a raw `TcpStream` (HTTP/1.1, `Connection: close`).

mod common;
mod serve_client;

use common::*;
use serde_json::{json, Value};
use serve_client::{request, Resp, Server};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const METHODS: [&str; 4] = ["lora", "prompt", "prefix", "houlsby"];
const PROMPTS: [&str; 3] = ["The cat", "A dog ran", "The bird sang a"];
const MAX_NEW: usize = 8;

/// The adapters folder, trained once for every test of this file.
fn adapters() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tmp("serve-adapters");
        let lm = data(&d, "lm.jsonl", 12, false);
        let cls = data(&d, "cls.jsonl", 12, true);
        let dir = d.join("adapters");
        let runs: Vec<(String, Vec<String>)> = METHODS
            .iter()
            .map(|m| {
                // Short prompts and prefixes (the flag is refused by the methods without them).
                let vt: &[&str] = if matches!(*m, "prompt" | "prefix") { &["--virtual-tokens", "4"] } else { &[] };
                let mut a = train_args(&dir.join(m), &lm, 4, vt);
                a = set(set(set(a, "--method", m), "--lr", "0.05"), "--save-every", "100");
                (m.to_string(), a)
            })
            .chain(std::iter::once({
                let a = train_args(&dir.join("cls"), &cls, 4, &[]);
                ("cls".to_string(), set(set(set(a, "--task", "classify"), "--lr", "0.05"), "--save-every", "100"))
            }))
            .collect();
        std::thread::scope(|s| {
            for (name, args) in &runs {
                s.spawn(move || {
                    let out = tuna(args);
                    assert!(out.status.success(), "training {name}: {}", String::from_utf8_lossy(&out.stderr));
                });
            }
        });
        dir
    })
}

/// `tuna generate`'s greedy text for `model` (`base` or an adapter) and `prompt`.
fn reference(dir: &Path, model: &str, prompt: &str) -> String {
    let mut a = vec!["generate".to_string(), "--model".into(), fixture("llama"), "--prompt".into(), prompt.into()];
    a.extend(["--max-new-tokens".into(), MAX_NEW.to_string()]);
    if model != "base" {
        a.extend(["--adapter".into(), dir.join(model).join("adapter").display().to_string()]);
    }
    let out = tuna(&a);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

fn completion(model: &str, prompt: &str, stream: bool) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stream": stream})
}

/// The text of a completion, streamed (the deltas joined) or not.
fn text_of(r: &Resp, stream: bool) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    if !stream {
        return r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    }
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect()
}

#[test]
fn load_test_every_answer_matches_its_adapter_and_memory_stays_flat() {
    load_test("mixed");
}

#[test]
fn load_test_with_the_swap_stepper() {
    load_test("swap");
}

/// 32 clients, 320 requests over the base and every adapter, through `--stepper` `stepper`.
fn load_test(stepper: &str) {
    let dir = adapters();
    let models: Vec<&str> = std::iter::once("base").chain(METHODS).collect();
    // The single-adapter results, from `tuna generate`.
    let want: HashMap<(String, String), String> = std::thread::scope(|s| {
        let hs: Vec<_> = models
            .iter()
            .flat_map(|m| PROMPTS.iter().map(move |p| (m, p)))
            .map(|(m, p)| s.spawn(move || ((m.to_string(), p.to_string()), reference(dir, m, p))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The adapters change the answers (else mix-ups could not show).
    for p in PROMPTS {
        let distinct: std::collections::HashSet<&String> =
            models.iter().map(|m| &want[&(m.to_string(), p.to_string())]).collect();
        assert!(distinct.len() >= 3, "{p}: adapters barely change the output: {distinct:?}");
    }
    let srv = Server::start(Some(dir), &["--max-batch", "8", "--max-queue", "64", "--stepper", stepper]);
    let run = |rounds: usize| {
        std::thread::scope(|s| {
            for c in 0..32 {
                let (srv, want, models) = (&srv, &want, &models);
                s.spawn(move || {
                    for r in 0..rounds {
                        let i = c * rounds + r;
                        let (m, p, stream) =
                            (models[i % models.len()], PROMPTS[(i / 5) % PROMPTS.len()], i.is_multiple_of(3));
                        let got = text_of(&srv.post("/v1/completions", &completion(m, p, stream)), stream);
                        assert_eq!(got, want[&(m.to_string(), p.to_string())], "{m} / {p} (stream {stream})");
                    }
                });
            }
        })
    };
    let t0 = Instant::now();
    run(2); // warm-up: 64 requests
    let rss0 = srv.rss_kib();
    run(8); // 256 more
    let rss1 = srv.rss_kib();
    let secs = t0.elapsed().as_secs_f64();
    assert!(secs < 60.0, "320 requests took {secs:.1} s");
    assert_eq!(srv.metric("tuna_requests_completed_total"), 320.0);
    assert_eq!(srv.metric("tuna_queue_depth"), 0.0);
    // The mixed stepper decoded most token steps in shared forwards (any mix of adapters); the
    // swap stepper none.
    let (batched, generated) = (srv.metric("tuna_batched_rows_total"), srv.metric("tuna_generated_tokens_total"));
    let restacked = srv.metric("tuna_restacked_rows_total");
    match stepper {
        "mixed" => assert!(batched > 0.5 * generated, "{batched} of {generated} token steps batched"),
        _ => assert_eq!(batched, 0.0),
    }
    // A step stacks each of its rows at most once. How often the set of rows changes here depends
    // on arrival timing: with 8 new tokens a request and 8 rows, a saturated server can see a
    // sequence join or leave nearly every step (from 1 row in 6 to 1 in 2 restacked, run to run),
    // so the load test bounds only the count; that the batch cache is kept while its sequences stay
    // is checked where they stay together (`bad_input_gets_a_json_error_and_the_server_carries_on`).
    assert!(restacked <= batched, "{restacked} rows restacked for {batched} batched");
    // Flat: 4x more requests after warm-up add under 8 MiB (allocator slack), no per-request growth.
    assert!(rss1 < rss0 + 8 * 1024, "RSS grew from {rss0} KiB to {rss1} KiB over 256 requests");
    eprintln!("load test ({stepper}): 320 requests in {secs:.2} s, {batched} of {generated} token steps batched, {restacked} rows restacked; RSS {rss0} -> {rss1} KiB");
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_input_gets_a_json_error_and_the_server_carries_on() {
    let dir = adapters();
    // A 10 ms pause per step keeps the streams below in flight when their clients leave.
    let srv =
        Server::start(Some(dir), &["--max-new-tokens", "40", "--max-prompt-tokens", "48", "--step-delay-ms", "10"]);
    let good = || {
        let r = srv.post("/v1/completions", &completion("lora", "The cat", false));
        assert_eq!(r.status, 200, "{}", r.body);
    };
    good();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{\"model\": \"lora\", \"prompt\": ".into(), 400, "invalid_json"),
        ("/v1/completions", "[1, 2]".into(), 400, "invalid_json"),
        ("/v1/completions", json!({"model": "nope", "prompt": "x"}).to_string(), 404, "model_not_found"),
        ("/v1/completions", json!({"prompt": "x"}).to_string(), 400, "missing_field"),
        ("/v1/completions", json!({"model": "lora", "prompt": 5}).to_string(), 400, "invalid_type"),
        (
            "/v1/completions",
            json!({"model": "lora", "prompt": "x", "temperature": 1e9}).to_string(),
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            json!({"model": "lora", "prompt": "x", "temperature": -1}).to_string(),
            400,
            "invalid_value",
        ),
        ("/v1/completions", json!({"model": "lora", "prompt": "x", "top_p": 7}).to_string(), 400, "invalid_value"),
        ("/v1/completions", json!({"model": "lora", "prompt": "x", "top_k": 0}).to_string(), 400, "invalid_value"),
        ("/v1/completions", json!({"model": "lora", "prompt": "x", "max_tokens": 0}).to_string(), 400, "invalid_value"),
        (
            "/v1/completions",
            json!({"model": "lora", "prompt": "x", "max_tokens": 1e12}).to_string(),
            400,
            "invalid_type",
        ),
        (
            "/v1/completions",
            json!({"model": "lora", "prompt": "x", "max_tokens": 41}).to_string(),
            400,
            "max_tokens_exceeded",
        ),
        ("/v1/completions", json!({"model": "lora", "prompt": "x", "n": 3}).to_string(), 400, "unsupported"),
        ("/v1/completions", json!({"model": "lora", "prompt": "x", "stop": ["."]}).to_string(), 400, "unsupported"),
        ("/v1/completions", json!({"model": "lora", "prompt": "cat ".repeat(50)}).to_string(), 400, "prompt_too_long"),
        // 4 virtual tokens + 26 prompt tokens + 40 new tokens > 64 positions.
        (
            "/v1/completions",
            json!({"model": "prompt", "prompt": "cat ".repeat(12), "max_tokens": 40}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "lora", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            400,
            "no_chat_template",
        ),
        ("/v1/chat/completions", json!({"model": "lora", "messages": "hi"}).to_string(), 400, "invalid_type"),
        ("/v1/classify", json!({"model": "lora", "input": "The cat"}).to_string(), 400, "not_a_classifier"),
        ("/v1/classify", json!({"model": "ghost", "input": "The cat"}).to_string(), 404, "model_not_found"),
        ("/v1/classify", json!({"model": "cls", "input": 3}).to_string(), 400, "invalid_value"),
        ("/v1/nowhere", "{}".into(), 404, "unknown_route"),
    ];
    for (path, body, status, code) in &cases {
        let r = srv.req("POST", path, Some(body));
        assert_eq!(r.status, *status, "{path} {body}: {}", r.body);
        assert_eq!(r.error_code(), *code, "{path} {body}");
    }
    let r = srv.req("GET", "/v1/completions", None);
    assert_eq!((r.status, r.error_code().as_str()), (405, "method_not_allowed"));
    // Garbage bytes and a lying Content-Length do not take it down either.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    drop(s);
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"mo").unwrap();
    drop(s);
    good();

    // Sampling with a seed draws what `tuna generate` draws with the same settings.
    let mut a: Vec<String> = ["generate", "--model", &fixture("llama"), "--prompt", "The cat", "--max-new-tokens", "8"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "5"].map(String::from));
    let out = tuna(&a);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = String::from_utf8(out.stdout).unwrap().trim_end_matches('\n').to_string();
    let body = |stream: bool| {
        json!({"model": "base", "prompt": "The cat", "max_tokens": 8, "temperature": 0.8, "top_k": 20, "top_p": 0.9,
               "seed": 5, "stream": stream})
    };
    for stream in [false, true] {
        assert_eq!(text_of(&srv.post("/v1/completions", &body(stream)), stream), want, "sampled, stream {stream}");
    }
    // The same draws when the sampled sequences share decoding steps with each other and with
    // greedy ones for other adapters (the mixed stepper batches them).
    let greedy: Vec<(&str, String)> = ["lora", "prefix"].iter().map(|&m| (m, reference(dir, m, "The cat"))).collect();
    let (batched0, restacked0) = (srv.metric("tuna_batched_rows_total"), srv.metric("tuna_restacked_rows_total"));
    std::thread::scope(|s| {
        for stream in [false, true, false] {
            let (srv, want, body) = (&srv, &want, &body);
            s.spawn(move || assert_eq!(text_of(&srv.post("/v1/completions", &body(stream)), stream), *want));
        }
        for (m, want) in &greedy {
            let srv = &srv;
            s.spawn(move || {
                assert_eq!(text_of(&srv.post("/v1/completions", &completion(m, "The cat", true)), true), *want)
            });
        }
    });
    let batched = srv.metric("tuna_batched_rows_total") - batched0;
    assert!(batched > 0.0, "the concurrent requests never shared a step");
    // The batch cache is kept while the same sequences decode together: restacked only when one
    // joins or leaves, so fewer rows are copied than decoded.
    let restacked = srv.metric("tuna_restacked_rows_total") - restacked0;
    assert!(restacked < batched, "{restacked} rows restacked for {batched} batched");
    // Classification: each label's probability, summing to one.
    let r = srv.post("/v1/classify", &json!({"model": "cls", "input": ["The cat sat.", "A dog ran."]}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
    let scores = v["data"][0]["scores"].as_array().unwrap();
    let labels: Vec<&str> = scores.iter().map(|s| s["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["cat", "other"]);
    let sum: f64 = scores.iter().map(|s| s["score"].as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-6, "{v}");

    // Adapters at run time: a corrupt folder and another base's adapter are refused (400, named),
    // a good one loads under a new name and answers as its folder does, then unloads (404 after).
    let bad = tmp("serve-corrupt");
    let corrupt = bad.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir.join("lora/adapter").join(f), corrupt.join(f)).unwrap();
    }
    std::fs::write(corrupt.join("adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
        .unwrap();
    let gpt2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/tuna-models/tests/fixtures/peft/gpt2_lora");
    // A pipe where the weights should be: refused at once (reading it would block the engine).
    let fifo = bad.join("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    std::fs::copy(dir.join("lora/adapter/adapter_config.json"), fifo.join("adapter_config.json")).unwrap();
    let made = std::process::Command::new("mkfifo").arg(fifo.join("adapter_model.safetensors")).status().unwrap();
    assert!(made.success());
    for (name, path) in [("c", corrupt.clone()), ("g", gpt2), ("m", bad.join("missing")), ("f", fifo)] {
        let r = srv.post("/v1/adapters", &json!({"name": name, "path": path}));
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(&path.display().to_string()), "{}", r.body);
    }
    let r = srv.post("/v1/adapters", &json!({"name": "lora", "path": dir.join("prefix")}));
    assert_eq!((r.status, r.error_code().as_str()), (409, "adapter_exists"));
    let r = srv.post("/v1/adapters", &json!({"name": "bad name!", "path": dir.join("prefix")}));
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_name"));
    let r = srv.post("/v1/adapters", &json!({"name": "prefix2", "path": dir.join("prefix")}));
    assert_eq!(r.status, 201, "{}", r.body);
    let models = srv.req("GET", "/v1/models", None).json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "cls", "houlsby", "lora", "prefix", "prefix2", "prompt"]);
    // One model, as the openai client's models.retrieve asks for it.
    let one = srv.req("GET", "/v1/models/prefix2", None);
    assert_eq!(
        (one.status, one.json()["id"].as_str(), one.json()["method"].as_str()),
        (200, Some("prefix2"), Some("prefix"))
    );
    assert_eq!(srv.req("GET", "/v1/models/base", None).json()["id"].as_str(), Some("base"));
    let r = srv.req("GET", "/v1/models/nope", None);
    assert_eq!((r.status, r.error_code().as_str()), (404, "model_not_found"));
    let a = text_of(&srv.post("/v1/completions", &completion("prefix2", "The cat", false)), false);
    let b = text_of(&srv.post("/v1/completions", &completion("prefix", "The cat", false)), false);
    assert_eq!(a, b);
    assert_eq!(srv.req("DELETE", "/v1/adapters/prefix2", None).status, 200);
    let r = srv.post("/v1/completions", &completion("prefix2", "The cat", false));
    assert_eq!((r.status, r.error_code().as_str()), (404, "model_not_found"));
    assert_eq!(srv.req("DELETE", "/v1/adapters/prefix2", None).status, 404);
    assert_eq!(srv.req("DELETE", "/v1/adapters/base", None).status, 400);

    // Clients leaving mid-stream: their sequences leave the batch; the others carry on.
    let body =
        json!({"model": "houlsby", "prompt": "The", "max_tokens": 40, "temperature": 0.7, "stream": true}).to_string();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&srv.addr).unwrap();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut first = [0u8; 64];
        let _ = s.read(&mut first).unwrap();
        drop(s);
    }
    good();
    let t0 = Instant::now();
    while srv.metric("tuna_requests_cancelled_total") < 4.0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the streams left behind were not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }

    let h = srv.req("GET", "/health", None);
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
    assert_eq!(srv.metric("tuna_adapters_loaded"), 5.0);
    assert!(srv.metric("tuna_requests_refused_total") >= cases.len() as f64);
    assert!(srv.metric("tuna_generated_tokens_total") > 0.0);
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_full_queue_is_refused_with_429() {
    let srv = Server::start(None, &["--max-batch", "1", "--max-queue", "1", "--step-delay-ms", "5"]);
    let body = json!({"model": "base", "prompt": "The cat", "max_tokens": 40, "temperature": 0}).to_string();
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                let (addr, body) = (&srv.addr, &body);
                s.spawn(move || {
                    let r = request(addr, "POST", "/v1/completions", Some(body));
                    (r.status, r.body)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|s| s.0 == 200).count();
    let full: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert!(ok >= 1 && !full.is_empty() && ok + full.len() == 12, "{statuses:?}");
    assert!(full[0].1.contains("queue_full"), "{}", full[0].1);
}

/// A long stream (60 tokens at 30 ms a step) started on `srv`, read up to its first bytes.
fn stream_in_flight(srv: &Server) -> TcpStream {
    let b = json!({"model": "base", "prompt": "The", "max_tokens": 60, "temperature": 1.0, "seed": 1, "stream": true})
        .to_string();
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut first = [0u8; 16];
    s.read_exact(&mut first).unwrap();
    s
}

#[test]
fn sigterm_finishes_the_stream_in_flight_then_exits_0() {
    let srv = Server::start(None, &["--shutdown-grace", "20", "--step-delay-ms", "30"]);
    let addr = srv.addr.clone();
    let mut s = stream_in_flight(&srv);
    let (code, err) = srv.terminate();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert_eq!(code, 0, "{err}");
    // In the batch or, just admitted, still counted in the queue: either way in flight, and done.
    let in_flight =
        err.contains("shutting down: 1 active and 0 queued") || err.contains("shutting down: 0 active and 1 queued");
    assert!(in_flight && err.contains("1 completed, 0 cancelled"), "{err}");
    assert!(text.contains("[DONE]") && text.contains("\"finish_reason\":\"length\""), "the stream was cut: {text}");
    assert!(TcpStream::connect(&addr).is_err(), "still listening after exit");
}

#[test]
fn sigterm_past_the_grace_period_ends_the_stream_with_an_error_and_exits_0() {
    let srv = Server::start(None, &["--shutdown-grace", "0.2", "--step-delay-ms", "30"]);
    let mut s = stream_in_flight(&srv);
    let t0 = Instant::now();
    let (code, err) = srv.terminate();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert_eq!(code, 0, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(text.contains("shut down before this request finished") && !text.contains("[DONE]"), "{text}");
}

/// The llama fixture with a tokenizer that has ChatML's tokens (`;` and `?` give up their ids 8
/// and 9 to `<|im_start|>` and `<|im_end|>`): the weights are the fixture's, so its adapters load.
fn chatml_fixture() -> PathBuf {
    let d = tmp("serve-chatml").join("llama");
    std::fs::create_dir_all(&d).unwrap();
    let src = PathBuf::from(fixture("llama"));
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    assert_eq!((vocab.remove(";"), vocab.remove("?")), (Some(json!(8)), Some(json!(9))));
    for (id, content) in [(8, "<|im_start|>"), (9, "<|im_end|>")] {
        t["added_tokens"].as_array_mut().unwrap().push(json!({"id": id, "content": content, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    std::fs::write(d.join("tokenizer.json"), t.to_string()).unwrap();
    d
}

#[test]
fn chat_in_chatml_answers_as_tuna_generate_chat_streamed_or_not() {
    let dir = adapters();
    let model = chatml_fixture();
    let mut srv_args = vec!["serve".to_string(), "--model".into(), model.display().to_string(), "--port".into()];
    srv_args.extend(["0".into(), "--adapters".into(), dir.display().to_string()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tuna")).args(&srv_args).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on http://").unwrap().to_string();
    for m in ["base", "lora", "prefix"] {
        let mut a = vec!["generate".to_string(), "--model".into(), model.display().to_string(), "--chat".into()];
        a.extend(["--prompt".into(), "The cat sat".into(), "--max-new-tokens".into(), "12".into()]);
        if m != "base" {
            a.extend(["--adapter".into(), dir.join(m).join("adapter").display().to_string()]);
        }
        let out = tuna(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want = String::from_utf8(out.stdout).unwrap().trim_end_matches('\n').to_string();
        let body = |stream: bool| {
            json!({"model": m, "messages": [{"role": "user", "content": "The cat sat"}], "max_tokens": 12,
                   "temperature": 0, "stream": stream})
            .to_string()
        };
        let r = request(&addr, "POST", "/v1/chat/completions", Some(&body(false)));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(want.as_str()), "{m}: {v}");
        let r = request(&addr, "POST", "/v1/chat/completions", Some(&body(true)));
        let ev = r.events();
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
        let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, want, "{m} streamed");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A queued request keeps the adapter it was checked against: when its name is unloaded and taken
/// by another adapter (here one with virtual tokens, which would push it past the context) before
/// the request leaves the queue, it is refused, not answered by the newcomer.
#[test]
fn a_queued_request_is_refused_when_its_adapter_is_replaced_under_its_name() {
    let dir = adapters();
    let srv = Server::start(None, &["--max-batch", "1", "--step-delay-ms", "40"]);
    assert_eq!(srv.post("/v1/adapters", &json!({"name": "x", "path": dir.join("lora")})).status, 201);
    std::thread::scope(|s| {
        // Holds the only place in the batch for about a second.
        let (srv, long) = (&srv, json!({"model": "base", "prompt": "The cat", "max_tokens": 30, "temperature": 0}));
        let hold = s.spawn(move || srv.post("/v1/completions", &long));
        let t0 = Instant::now();
        while srv.metric("tuna_batch_active") < 1.0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "the first request never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let queued = s.spawn(|| srv.post("/v1/completions", &completion("x", "The cat", false)));
        while srv.metric("tuna_queue_depth") < 1.0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "the second request never queued");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(srv.req("DELETE", "/v1/adapters/x", None).status, 200);
        assert_eq!(srv.post("/v1/adapters", &json!({"name": "x", "path": dir.join("prompt")})).status, 201);
        let r = queued.join().unwrap();
        assert_eq!(r.status, 404, "{}", r.body);
        assert!(r.body.contains("was unloaded and replaced while this request waited"), "{}", r.body);
        assert_eq!(hold.join().unwrap().status, 200);
    });
    let (code, err) = srv.terminate();
    assert_eq!(code, 0, "{err}");
}
