//! `tuna train`, `eval`, `export` and `compare` end to end on the committed tiny Llama fixture:
//! a SIGKILLed run resumes to the uninterrupted run's losses bit for bit, a corrupt latest
//! checkpoint falls back to the previous one, malformed data exits 2 naming file and line without
//! touching checkpoints, a non-finite loss exits 3 naming the step, and compare writes its table,
//! JSON and SVG.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn sigkill_then_resume_reproduces_the_uninterrupted_losses() {
    let d = tmp("resume");
    let train = data(&d, "train.jsonl", 24, false);
    let (a, b) = (d.join("a"), d.join("b"));
    // Enough steps (each saves a checkpoint) that the kill lands mid-run even on a fast machine.
    let steps = 150;
    ok(&tuna(&train_args(&a, &train, steps, &[])));
    let want = train_lines(&a);
    assert_eq!(want.len(), steps as usize);

    sigkill_mid_run(&train_args(&b, &train, steps, &[]), &b);
    let done = train_lines(&b).len();
    assert!(done < steps as usize, "the run finished before it was killed ({done} steps)");
    let err = ok(&tuna(&train_args(&b, &train, steps, &["--resume"])));
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(train_lines(&b), want, "resumed losses differ from the uninterrupted run");
}

#[test]
fn a_corrupt_latest_checkpoint_falls_back_with_a_warning() {
    let d = tmp("corrupt");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    ok(&tuna(&train_args(&out, &train, 6, &[])));
    let want = train_lines(&out);
    // Garble the newest checkpoint's weights; resuming must use step 5 and redo step 6.
    let newest = out.join("checkpoints/step-000006/trainable.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    let err = ok(&tuna(&train_args(&out, &train, 6, &["--resume"])));
    assert!(err.contains("warning") && err.contains("step-000006"), "{err}");
    assert!(err.contains("step 5"), "{err}");
    assert_eq!(train_lines(&out), want);
}

#[test]
fn malformed_data_exits_2_naming_file_and_line_and_keeps_checkpoints() {
    let d = tmp("malformed");
    let good = data(&d, "good.jsonl", 8, true);
    let out = d.join("run");
    let cls = |train: &str, extra: &[&str]| {
        let mut a = train_args(&out, train, 2, extra);
        let i = a.iter().position(|x| x == "lm").unwrap();
        a[i] = "classify".into();
        a
    };
    ok(&tuna(&cls(&good, &[])));
    let ck = out.join("checkpoints/step-000002/trainable.safetensors");
    let before = std::fs::read(&ck).unwrap();
    let cases = [
        ("badjson.jsonl", "{\"text\": \"ok\", \"label\": \"cat\"}\n{\"text\": \"broken\n", ":2:"),
        ("missing.jsonl", "{\"text\": \"ok\", \"label\": \"cat\"}\n{\"text\": \"no label\"}\n", "label"),
        ("empty.jsonl", "", "empty.jsonl"),
        ("unknown.jsonl", "{\"text\": \"ok\", \"label\": \"cat\"}\n{\"text\": \"x\", \"label\": \"zebra\"}\n", "zebra"),
    ];
    for (name, text, needle) in cases {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let o = tuna(&cls(&p.display().to_string(), &["--resume", "--labels", "cat,other"]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        if name != "empty.jsonl" {
            assert!(err.contains(":2"), "{name}: the line is named: {err}");
        }
    }
    assert_eq!(std::fs::read(&ck).unwrap(), before, "a checkpoint changed");
}

#[test]
fn a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let d = tmp("nan");
    let train = data(&d, "train.jsonl", 12, false);
    // With the update after the backward, and inside it (where a gradient is applied as it
    // completes, so the check is per tensor).
    for (name, inside) in [("run", false), ("inside", true)] {
        let out = d.join(name);
        // An absurd learning rate drives the weights to infinity within a few steps.
        let mut a = train_args(&out, &train, 20, &[]);
        for (f, v) in [("--lr", "1e30"), ("--warmup", "0"), ("--clip", "0"), ("--method", "full")] {
            a = set(a, f, v);
        }
        if inside {
            a = set(a, "--micro-batch", "4");
            a.push("--update-in-backward".into());
        }
        let o = tuna(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{name}: {err}");
        assert!(err.contains("step ") && err.contains("not finite"), "{name}: {err}");
        let steps = train_lines(&out).len();
        assert!(steps < 20, "{name}: {err}");
        assert!(
            out.join(format!("checkpoints/step-{steps:06}/manifest.json")).exists(),
            "{name}: last good checkpoint kept: {err}"
        );
        // The message names the checkpoint kept (only when there is one).
        assert!(err.contains(&format!("The newest checkpoint, step {steps}, is kept")), "{name}: {err}");
    }
}

#[test]
fn train_eval_export_and_compare_on_a_tiny_model() {
    let d = tmp("compare");
    let train = data(&d, "train.jsonl", 12, true);
    let out = d.join("cmp");
    let args: Vec<String> = [
        "compare",
        "--model",
        &fixture("llama"),
        "--task",
        "classify",
        "--train",
        &train,
        "--eval",
        &train,
        "--methods",
        "prompt,prefix,lora,full",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect();
    let o = tuna(&args);
    ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    for m in ["| prompt |", "| prefix |", "| lora |", "| full |", "eval accuracy", "tokens/s"] {
        assert!(table.contains(m), "{m} missing from:\n{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);
    assert!(json[0]["trainable_params"].as_u64().unwrap() > 0);
    let svg = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<circle").count() == 4, "{svg}");
    // The report: the table and the panels, with each method's learning curves from its run.
    let html = std::fs::read_to_string(out.join("compare.html")).unwrap();
    assert!(html.contains("<td>lora</td>") && html.matches("<svg ").count() == 4);
    let curves = std::fs::read_to_string(out.join("compare-curves.svg")).unwrap();
    // Three steps: a train-loss line per method (evaluated once, at the last step: points, no line).
    assert_eq!(curves.matches("<polyline").count(), 4, "{curves}");

    // Generation with the trained soft prompt and prefix in place (through the KV cache).
    for m in ["prompt", "prefix"] {
        let a = out.join(m).join("adapter").display().to_string();
        let o = tuna(
            &[
                "generate",
                "--model",
                &fixture("llama"),
                "--adapter",
                &a,
                "--prompt",
                "The cat",
                "--max-new-tokens",
                "3",
            ]
            .map(String::from),
        );
        assert!(o.status.success() && !o.stdout.is_empty(), "{m}: {}", String::from_utf8_lossy(&o.stderr));
    }
    // The LoRA run's adapter evaluates and exports (PEFT folder and merged model).
    let adapter = out.join("lora/adapter");
    let o = tuna(
        &["eval", "--model", &fixture("llama"), "--adapter", &adapter.display().to_string(), "--data", &train]
            .map(String::from),
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("accuracy"), "{}", String::from_utf8_lossy(&o.stderr));
    // The class order travels with the adapter: data holding one class still scores both.
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("tuna_task.json")).unwrap()).unwrap();
    assert_eq!(task["labels"], serde_json::json!(["cat", "other"]));
    let cats = d.join("cats.jsonl");
    std::fs::write(&cats, "{\"text\": \"The cat sat.\", \"label\": \"cat\"}\n").unwrap();
    let o = tuna(
        &[
            "eval",
            "--model",
            &fixture("llama"),
            "--adapter",
            &adapter.display().to_string(),
            "--data",
            &cats.display().to_string(),
        ]
        .map(String::from),
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("accuracy"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let merged = d.join("merged");
    ok(&tuna(
        &[
            "export",
            "--model",
            &fixture("llama"),
            "--adapter",
            &adapter.display().to_string(),
            "--merged",
            "--out",
            &merged.display().to_string(),
        ]
        .map(String::from),
    ));
    assert!(merged.join("model.safetensors").exists() && merged.join("config.json").exists());
    // The merged model evaluates like base + adapter.
    let base_plus = tuna(
        &["eval", "--model", &fixture("llama"), "--adapter", &adapter.display().to_string(), "--data", &train]
            .map(String::from),
    );
    let merged_eval = tuna(&["eval", "--model", &merged.display().to_string(), "--data", &train].map(String::from));
    let (x, y) = (String::from_utf8_lossy(&base_plus.stdout), String::from_utf8_lossy(&merged_eval.stdout));
    let loss = |s: &str| s.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()).unwrap();
    assert!((loss(&x) - loss(&y)).abs() < 1e-4, "{x} vs {y}");
}

/// P-tuning with the LSTM encoder: a run resumed from its step-3 checkpoint continues to the
/// uninterrupted run's losses (the checkpoint holds the encoder's weights, not only the prompt it
/// computes; constant rate, so the shorter first run has the same schedule), and the adapter is a
/// PEFT `P_TUNING` folder that `tuna eval` loads.
#[test]
fn ptuning_resumes_and_its_adapter_is_peft_p_tuning() {
    let d = tmp("ptuning");
    let train = data(&d, "train.jsonl", 12, false);
    let flags = ["--decay", "constant", "--virtual-tokens", "3", "--ptuning-encoder", "lstm", "--ptuning-hidden", "8"];
    let run = |out: &Path, steps: u64| set(train_args(out, &train, steps, &flags), "--method", "ptuning");
    let (a, b) = (d.join("a"), d.join("b"));
    ok(&tuna(&run(&a, 6)));
    let want = train_lines(&a);
    assert_eq!(want.len(), 6);
    ok(&tuna(&run(&b, 3)));
    let mut resume = run(&b, 6);
    resume.push("--resume".into());
    let err = ok(&tuna(&resume));
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(train_lines(&b), want, "resumed losses differ from the uninterrupted run");
    let adapter = a.join("adapter");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (&cfg["peft_type"], &cfg["encoder_reparameterization_type"], &cfg["encoder_hidden_size"]),
        (&serde_json::json!("P_TUNING"), &serde_json::json!("LSTM"), &serde_json::json!(8)),
        "{cfg}"
    );
    let o = tuna(
        &["eval", "--model", &fixture("llama"), "--adapter", &adapter.display().to_string(), "--data", &train]
            .map(String::from),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("perplexity"), "{out} {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bert_classification_head_travels_with_the_export() {
    let d = tmp("bert");
    let train = data(&d, "train.jsonl", 12, true);
    let out = d.join("full");
    let mut a = train_args(&out, &train, 3, &[]);
    for (f, v) in
        [("--model", fixture("bert").as_str()), ("--task", "classify"), ("--method", "full"), ("--lr", "1e-3")]
    {
        a = set(a, f, v);
    }
    ok(&tuna(&a));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let acc = summary["eval_accuracy"].as_f64();
    assert!(acc.is_none(), "no eval file was given");
    let model = out.join("model");
    assert!(model.join("tuna_extra.safetensors").exists(), "the classification head is exported");
    let o = tuna(&["eval", "--model", &model.display().to_string(), "--data", &train].map(String::from));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && s.contains("accuracy"), "{s} {}", String::from_utf8_lossy(&o.stderr));
}

/// The SmolLM2 Q4_1 GGUF asset, or `None` with test `name` noted as skipped (the asset comes from
/// scripts/fetch-assets.sh).
fn smollm2_gguf_or_skip(name: &str) -> Option<std::path::PathBuf> {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join(".assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        tuna_kernels::testing::note_skip(name, "asset absent (scripts/fetch-assets.sh)");
        return None;
    }
    Some(gguf)
}

/// LoRA on the real SmolLM2 GGUF (asset): a merged export is a Hugging Face folder (config and
/// tokenizer written from the GGUF) that evaluates like base + adapter.
#[test]
fn smollm2_gguf_lora_exports_a_merged_hugging_face_folder() {
    let Some(gguf) = smollm2_gguf_or_skip("cli_train::smollm2_gguf_lora_exports_a_merged_hugging_face_folder") else {
        return;
    };
    let d = tmp("smol");
    let train = data(&d, "train.jsonl", 4, false);
    let out = d.join("run");
    let mut a = train_args(&out, &train, 1, &[]);
    for (f, v) in [("--model", gguf.to_str().unwrap()), ("--batch-size", "2"), ("--lr", "1e-2"), ("--save-every", "1")]
    {
        a = set(a, f, v);
    }
    ok(&tuna(&a));
    let adapter = out.join("adapter").display().to_string();
    let merged = d.join("merged").display().to_string();
    ok(&tuna(
        &["export", "--model", gguf.to_str().unwrap(), "--adapter", &adapter, "--merged", "--out", &merged]
            .map(String::from),
    ));
    let eval = |args: &[&str]| {
        let mut v: Vec<String> = ["eval", "--task", "lm", "--data", &train].map(String::from).to_vec();
        v.extend(args.iter().map(|s| s.to_string()));
        let o = tuna(&v);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{s} {}", String::from_utf8_lossy(&o.stderr));
        s.split_whitespace().nth(1).and_then(|x| x.parse::<f64>().ok()).unwrap()
    };
    let (x, y) = (eval(&["--model", gguf.to_str().unwrap(), "--adapter", &adapter]), eval(&["--model", &merged]));
    assert!((x - y).abs() < 1e-3 * x.abs(), "base + adapter {x} vs merged {y}");
}

/// `--base-precision q4` on a Q4 GGUF, its products widened (`TUNA_CPU_MATRIX=widen`; the dot
/// path has its own test): LoRA trains on the file's own blocks with the loss curve of the f32 base
/// dequantized at load (the same weights: only the order of f32 sums differs), `summary.json` says
/// q4, and the adapter evaluates on the q4 base by default.
fn q4_trains_like_dequant_at_load(gguf: &Path, d: &Path, steps: u64, check_merged: bool) {
    let tuna = |a: &[String]| tuna_on("widen", a);
    // One line six times: every batch the same, so the loss must fall as LoRA trains.
    let train = d.join("train.jsonl");
    std::fs::write(&train, "{\"text\": \"The cat sat on the mat.\"}\n".repeat(6)).unwrap();
    let train = train.display().to_string();
    let gguf = gguf.display().to_string();
    let run = |p: &str| {
        let out = d.join(p);
        let mut a = train_args(&out, &train, steps, &[]);
        for (f, v) in [
            ("--model", gguf.as_str()),
            ("--batch-size", "2"),
            ("--micro-batch", "2"),
            ("--warmup", "0"),
            ("--base-precision", p),
        ] {
            a = set(a, f, v);
        }
        ok(&tuna(&a));
        out
    };
    let (f, q) = (run("f32"), run("q4"));
    let (a, b) = (train_losses(&f), train_losses(&q));
    assert_eq!((a.len(), b.len()), (steps as usize, steps as usize));
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * x, "step {}: f32 base {x} vs q4 base {y}\n{a:?}\n{b:?}", s + 1);
    }
    assert!(b[steps as usize - 1] < b[0], "q4 did not train: {b:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["base_precision"], "q4");
    let eval = |p: Option<&str>| {
        let adapter = q.join("adapter").display().to_string();
        let mut v: Vec<String> = ["eval", "--task", "lm", "--data", &train, "--model", &gguf, "--adapter", &adapter]
            .map(String::from)
            .to_vec();
        v.extend(p.map(|p| ["--base-precision".to_string(), p.to_string()]).into_iter().flatten());
        let o = tuna(&v);
        ok(&o);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.split_whitespace().nth(1).and_then(|x| x.parse::<f64>().ok()).unwrap_or_else(|| panic!("no loss in: {out}"))
    };
    let (ld, lq, lf) = (eval(None), eval(Some("q4")), eval(Some("f32")));
    assert_eq!(ld, lq, "eval without the flag did not score on the q4 base the adapter trained on");
    assert!((lq - lf).abs() <= 1e-4 * lf, "eval on the q4 base {lq} vs dequantized at load {lf}");
    if !check_merged {
        return;
    }
    // A merged export is a plain f32 folder: its task file no longer asks for q4, and it scores
    // as the adapter on the dequantized base did, without any flag.
    let merged = d.join("q4-merged");
    let adapter = q.join("adapter").display().to_string();
    let m = merged.display().to_string();
    ok(&tuna(&["export", "--model", &gguf, "--adapter", &adapter, "--out", &m, "--merged"].map(String::from)));
    let o = tuna(&["eval", "--task", "lm", "--data", &train, "--model", &m].map(String::from));
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lm: f64 =
        out.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("no loss in: {out}"));
    assert!((lm - lf).abs() <= 1e-3 * lf, "the merged export scores {lm}, the adapter on an f32 base {lf}");
}

/// q4 on a tiny Q4_0 GGUF written by the test (always runs).
#[test]
fn a_q4_base_trains_like_dequant_at_load_and_evaluates_on_it() {
    let d = tmp("q4-tiny");
    q4_trains_like_dequant_at_load(&tiny_q4_gguf(&d), &d, 4, true);
    std::fs::remove_dir_all(&d).unwrap();
}

/// q4 on the int8 dot path (its blocks requantized to int8 per 64 weights; the portable twin, the
/// hardware paths' numbers): the widen path's loss curve within 1% (not its bits: the activations
/// and the requantized weight round), the products recorded, and a resume on the widen path
/// refused before anything is written.
#[test]
fn a_q4_base_on_the_int8_dot_path_trains_like_the_widen_path() {
    let d = tmp("q4-dot");
    let gguf = tiny_q4_gguf(&d).display().to_string();
    let train = data(&d, "train.jsonl", 16, false);
    let args = |name: &str, steps: u64, extra: &[&str]| {
        let mut a = train_args(
            &d.join(name),
            &train,
            steps,
            &[&["--base-precision", "q4", "--decay", "constant"], extra].concat(),
        );
        a = set(a, "--model", &gguf);
        a
    };
    let widen = train_losses(&{
        ok(&tuna_on("widen", &args("widen", 8, &[])));
        d.join("widen")
    });
    ok(&tuna_on("emulated", &args("dot", 8, &[])));
    let dot = train_losses(&d.join("dot"));
    assert_eq!((widen.len(), dot.len()), (8, 8));
    for (s, (a, b)) in widen.iter().zip(&dot).enumerate() {
        assert!((a - b).abs() <= 0.01 * a, "step {}: widen {a} vs dot {b}\n{widen:?}\n{dot:?}", s + 1);
    }
    assert_ne!(widen, dot, "the dot path rounds: its losses cannot be the widen path's bits");
    assert!(dot[7] < dot[0], "q4 on the dot path did not train: {dot:?}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("dot").join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        (summary["base_precision"].as_str(), summary["base_products"].as_str()),
        (Some("q4"), Some("int8 dot products"))
    );
    // Stopped at 4, resumed to 8 on the same path: the uninterrupted losses; on the widen path:
    // refused, naming the variable, nothing written.
    ok(&tuna_on("emulated", &args("half", 4, &[])));
    ok(&tuna_on("emulated", &args("half", 8, &["--resume"])));
    assert_eq!(train_losses(&d.join("half")), dot);
    let o = tuna_on("widen", &args("half", 10, &["--resume"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("the base's product path was int8 dot products, now widened to f32")
            && e.contains("Resume with TUNA_CPU_MATRIX=emulated"),
        "{e}"
    );
    assert_eq!(train_losses(&d.join("half")), dot, "the refused resume wrote nothing");
    std::fs::remove_dir_all(&d).unwrap();
}

/// On a dot-product path the activations' rounding would turn a padded row's last-bit differences
/// into whole quantization steps; the attention gives a left-padded row the unpadded row's bits, so
/// `tuna eval`'s loss does not depend on the batch size (which changes the padding). (It prints
/// four decimals; `attention::tests_rows::a_left_padded_row_attends_to_the_bits_of_the_unpadded_row`
/// checks the bits.)
#[test]
fn eval_on_the_dot_paths_does_not_depend_on_the_batch_size() {
    let d = tmp("dot-eval-batch");
    let data = data(&d, "eval.jsonl", 6, false);
    for (var, precision) in [("TUNA_CPU_MATRIX", "int8"), ("TUNA_CPU_MATRIX_BF16", "bf16")] {
        let eval = |bs: &str| {
            let o = Command::new(env!("CARGO_BIN_EXE_tuna"))
                .env(var, "emulated")
                .args(["eval", "--model", &fixture("llama"), "--task", "lm", "--data", &data])
                .args(["--base-precision", precision, "--batch-size", bs])
                .output()
                .unwrap();
            ok(&o);
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let one = eval("1");
        assert!(one.starts_with("loss "), "{one}");
        for bs in ["2", "6"] {
            assert_eq!(eval(bs), one, "{precision} on the dot path: --batch-size {bs} vs 1");
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// q4 on the real SmolLM2 Q4_1 GGUF (asset; skipped by name when absent).
#[test]
fn smollm2_q4_base_trains_like_dequant_at_load() {
    let Some(gguf) = smollm2_gguf_or_skip("cli_train::smollm2_q4_base_trains_like_dequant_at_load") else { return };
    let d = tmp("smol-q4");
    q4_trains_like_dequant_at_load(&gguf, &d, 2, false);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn profile_prints_per_op_times() {
    let d = tmp("profile");
    let train = data(&d, "train.jsonl", 8, false);
    let args: Vec<String> =
        ["profile", "--method", "lora", "--model", &fixture("llama"), "--task", "lm", "--train", &train]
            .iter()
            .map(|s| s.to_string())
            .chain(["--batch-size", "4", "--profile-steps", "2", "--warmup-steps", "1"].map(String::from))
            .collect();
    let o = tuna(&args);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for row in [
        "| matmul |",
        "| attention |",
        "| rmsnorm |",
        "| optimizer (clip, AdamW after the backward) |",
        "2 steps measured",
        "| saved at the peak |",
        "KiB |",
    ] {
        assert!(s.contains(row), "{row} missing:\n{s}");
    }
    assert!(!s.contains("wrote"), "profile writes nothing:\n{s}");
    // Achieved GFLOP/s for the counted ops, against this CPU's measured f32 GEMM rate.
    assert!(s.contains("f32 GEMM rate"), "{s}");
    for op in ["| matmul |", "| attention |"] {
        let row = s.lines().find(|l| l.starts_with(op)).unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for cell in [cells[4], cells[7]] {
            let g: f64 = cell.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(-1.0);
            assert!(g > 0.0 && cell.ends_with("%)"), "{op}: GFLOP/s cell {cell:?} in:\n{s}");
        }
    }
    // The low-precision base's products have their own row (the head's stay `matmul`).
    let o = tuna(&set(args.clone(), "--base-precision", "int8"));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let row = s.lines().find(|l| l.starts_with("| matmul (int8 base) |")).unwrap_or_else(|| panic!("{s}"));
    assert!(row.split('|').nth(4).is_some_and(|c| c.trim().ends_with("%)")), "{row}");
    // On the int8 dot-product path (here its portable twin, chosen by TUNA_CPU_MATRIX) the
    // header names the path and the int8 row is read against that path's measured rate.
    let o = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .env("TUNA_CPU_MATRIX", "emulated")
        .args(set(args.clone(), "--base-precision", "int8"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.contains("the int8 base's products run on int8 dot products (emulated)") && s.contains("GOP/s"), "{s}");
    let row = s.lines().find(|l| l.starts_with("| matmul (int8 base) |")).unwrap_or_else(|| panic!("{s}"));
    assert!(row.split('|').nth(4).is_some_and(|c| c.trim().ends_with("%)")), "{row}");
    // A q4 base (a Q4 GGUF's blocks) takes the same path, read against its own measured rate (the
    // blocks' requantization included); widened, against the f32 GEMM rate.
    let q4 = tiny_q4_gguf(&d).display().to_string();
    let q4_args = set(set(args.clone(), "--model", &q4), "--base-precision", "q4");
    for path in ["emulated", "widen"] {
        let o = tuna_on(path, &q4_args);
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let header = if path == "emulated" {
            "the q4 base's products run on int8 dot products (emulated, its blocks requantized to int8 per product) and are read against that path's rate"
        } else {
            "the q4 base's products widen to f32 and run on it (no int8 dot-product path here, or TUNA_CPU_MATRIX=widen)"
        };
        assert!(s.contains(header), "{path}: {s}");
        let row = s.lines().find(|l| l.starts_with("| matmul (q4 base) |")).unwrap_or_else(|| panic!("{s}"));
        assert!(row.split('|').nth(4).is_some_and(|c| c.trim().ends_with("%)")), "{path}: {row}");
    }
    // On CUDA (the emulated device in the test command) the attention row names the kernels the
    // calls took: in f32, SIMT (the tensor-core kernels are bf16).
    if tuna_kernels::testing::cuda_or_skip("cli_train::profile_prints_per_op_times (cuda)").is_some() {
        let cuda = set(args, "--device", "cuda");
        let o = tuna(&set(cuda.clone(), "--precision", "f32"));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(s.contains("| attention (SIMT) |") && !s.contains("| attention |"), "{s}");
        assert!(!s.contains("mixed precision"), "an f32 profile says it is mixed:\n{s}");
        // In bf16 mixed precision, CUDA's default: the same rows, and the header says what the
        // step computed in (the fixture's head dim, 8, is below the tensor-core kernels' 32: SIMT
        // still).
        for a in [cuda.clone(), set(cuda, "--precision", "bf16")] {
            let o = tuna(&a);
            let s = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(s.contains("2 steps measured in bf16 mixed precision"), "{a:?}: {s}");
            for row in
                ["| matmul |", "| attention (SIMT) |", "| rmsnorm |", "| optimizer (clip, AdamW after the backward) |"]
            {
                assert!(s.contains(row), "{row} missing:\n{s}");
            }
        }
    }
}

/// The bf16 base on the bf16 dot-product path (its portable twin): the widen path's curve within
/// the activations' bf16 rounding, not its bits, and a resume to the same bits.
#[test]
fn bf16_dot_path_trains_like_the_widen_path() {
    let d = tmp("bf16-dot");
    let train = data(&d, "train.jsonl", 16, false);
    let run = |path: &str, name: &str, steps: u64, resume: bool| {
        let out = d.join(name);
        let mut extra = vec!["--base-precision", "bf16", "--decay", "constant"];
        if resume {
            extra.push("--resume");
        }
        let a = set(train_args(&out, &train, steps, &extra), "--method", "prefix");
        let o = Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX_BF16", path).args(a).output().unwrap();
        ok(&o);
        out
    };
    let widen = train_losses(&run("widen", "widen", 8, false));
    let dot = train_losses(&run("emulated", "dot", 8, false));
    assert_eq!((widen.len(), dot.len()), (8, 8));
    for (s, (a, b)) in widen.iter().zip(&dot).enumerate() {
        assert!((a - b).abs() <= 0.01 * a, "step {}: widen {a} vs dot {b}\n{widen:?}\n{dot:?}", s + 1);
    }
    assert_ne!(widen, dot, "the dot path rounds the activations: its losses cannot be the widen path's bits");
    let half = run("emulated", "half", 4, false);
    run("emulated", "half", 8, true);
    assert_eq!(train_losses(&half), dot);
    // The profile names the path and reads the bf16 row against its rate.
    let o = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .env("TUNA_CPU_MATRIX_BF16", "emulated")
        .args([
            "profile",
            "--method",
            "lora",
            "--model",
            &fixture("llama"),
            "--task",
            "lm",
            "--train",
            &train,
            "--batch-size",
            "4",
            "--profile-steps",
            "1",
            "--warmup-steps",
            "1",
            "--base-precision",
            "bf16",
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.contains("the bf16 base's products run on bf16 dot products (emulated)"), "{s}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The int8 base on the integer dot-product path (its portable twin, which computes the hardware
/// paths' numbers) trains like the widen path: the same curve within the activations' rounding,
/// not the same bits (the path ran), and a killed run resumes to the same bits.
#[test]
fn int8_dot_path_trains_like_the_widen_path() {
    let d = tmp("int8-dot");
    let train = data(&d, "train.jsonl", 16, false);
    let run = |path: &str, name: &str, steps: u64| {
        let out = d.join(name);
        let a = set(
            train_args(&out, &train, steps, &["--base-precision", "int8", "--decay", "constant"]),
            "--method",
            "lora",
        );
        let o = Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX", path).args(a).output().unwrap();
        ok(&o);
        out
    };
    let widen = train_losses(&run("widen", "widen", 8));
    let dot = run("emulated", "dot", 8);
    let dotl = train_losses(&dot);
    assert_eq!((widen.len(), dotl.len()), (8, 8));
    for (s, (a, b)) in widen.iter().zip(&dotl).enumerate() {
        assert!((a - b).abs() <= 0.01 * a, "step {}: widen {a} vs dot {b}\n{widen:?}\n{dotl:?}", s + 1);
    }
    assert_ne!(widen, dotl, "the dot path rounds the activations: its losses cannot be the widen path's bits");
    // Stopped at 4 and resumed to 8 (a constant rate after the warmup: the schedule does not
    // depend on --steps): the uninterrupted run's losses exactly.
    let half = run("emulated", "half", 4);
    let a = set(
        train_args(&half, &train, 8, &["--base-precision", "int8", "--decay", "constant", "--resume"]),
        "--method",
        "lora",
    );
    let o =
        Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX", "emulated").args(a.clone()).output().unwrap();
    ok(&o);
    assert_eq!(train_losses(&half), dotl);
    // The products are recorded: the summary names them, and a resume on the other path (another
    // CPU, or the variable) is refused saying how to continue, before anything is written.
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(dot.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["base_products"], "int8 dot products", "{summary}");
    let a = set(a, "--steps", "10");
    let o = Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX", "widen").args(a).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("the base's product path was int8 dot products, now widened to f32")
            && e.contains("Resume with TUNA_CPU_MATRIX=emulated"),
        "{e}"
    );
    assert_eq!(train_losses(&half), dotl, "the refused resume wrote nothing");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The training losses of the run in `dir`, by step.
fn train_losses(dir: &Path) -> Vec<f64> {
    tuna::trainer::read_log(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|l| l.get("split").and_then(|s| s.as_str()) == Some("train"))
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn bf16_optimizer_moments_follow_the_f32_loss_curve() {
    let d = tmp("bf16-moments");
    let train = data(&d, "train.jsonl", 16, false);
    let run = |name: &str, state: &str, steps: u64, extra: &[&str]| {
        let out = d.join(name);
        let a = set(set(train_args(&out, &train, steps, extra), "--method", "full"), "--lr", "3e-3");
        (tuna(&set(set(a, "--optimizer-state", state), "--warmup", "0")), out)
    };
    let (o, f32_run) = run("f32", "f32", 30, &[]);
    ok(&o);
    let (o, bf16_run) = run("bf16", "bf16", 30, &[]);
    ok(&o);
    let (a, b) = (train_losses(&f32_run), train_losses(&bf16_run));
    assert_eq!((a.len(), b.len()), (30, 30));
    // Tolerance: 1% of the loss at every step (stochastic rounding of the moments perturbs the
    // update slightly; measured 1e-4 at most on this run); and the curve must fall as f32's does.
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 0.01 * x, "step {}: f32 {x} vs bf16 {y}\n{a:?}\n{b:?}", s + 1);
    }
    assert!(b[29] < 0.8 * b[0], "bf16 moments did not train: {b:?}");
    // ... and the flag took effect: the rounded moments move the curve, if only slightly.
    assert!(a.iter().zip(&b).any(|(x, y)| x != y), "bf16 moments gave f32's curve bit for bit");
    // A resume keeps the moments' storage: switching it is refused by name; the same resumes.
    let (o, _) = run("bf16", "f32", 32, &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--optimizer-state was bf16, now f32"), "{err}");
    let (o, _) = run("bf16", "bf16", 32, &["--resume"]);
    ok(&o);
}

#[test]
fn a_hub_id_is_recorded_as_given_in_the_summary_and_the_adapter() {
    let d = tmp("hub-id");
    let cache = hub_cache(&d);
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    let run = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_tuna")).args(args).env("HF_HUB_CACHE", &cache).output().unwrap()
    };
    ok(&run(set(train_args(&out, &train, 2, &[]), "--model", "tiny-org/tiny-llama")));
    let json = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    // PEFT's configs name the hub id (what `from_pretrained` on another machine needs), not this
    // machine's snapshot folder.
    assert_eq!(json(&out.join("summary.json"))["model"], "tiny-org/tiny-llama");
    assert_eq!(json(&out.join("adapter/adapter_config.json"))["base_model_name_or_path"], "tiny-org/tiny-llama");
    let exported = d.join("exported");
    let adapter = out.join("adapter").display().to_string();
    let args = ["export", "--model", "tiny-org/tiny-llama", "--adapter", &adapter, "--out", exported.to_str().unwrap()];
    ok(&run(args.iter().map(|s| s.to_string()).collect()));
    assert_eq!(json(&exported.join("adapter_config.json"))["base_model_name_or_path"], "tiny-org/tiny-llama");
    // A revision goes into PEFT's own field (`from_pretrained` takes no `@`).
    let pinned = d.join("pinned");
    let args =
        ["export", "--model", "tiny-org/tiny-llama@c0ffee12", "--adapter", &adapter, "--out", pinned.to_str().unwrap()];
    ok(&run(args.iter().map(|s| s.to_string()).collect()));
    let cfg = json(&pinned.join("adapter_config.json"));
    assert_eq!(
        (cfg["base_model_name_or_path"].as_str(), cfg["revision"].as_str()),
        (Some("tiny-org/tiny-llama"), Some("c0ffee12"))
    );
    // A local folder is recorded as its path.
    let local = d.join("local");
    ok(&tuna(&train_args(&local, &train, 2, &[])));
    assert_eq!(json(&local.join("summary.json"))["model"], fixture("llama"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn checkpointed_activations_give_the_same_loss_curve_and_may_change_on_resume() {
    let d = tmp("ckpt-activations");
    let train = data(&d, "train.jsonl", 16, false);
    // LoRA with dropout: the recompute must draw the masks the forward drew.
    let run = |name: &str, policy: &str, extra: &[&str]| {
        let out = d.join(name);
        let a = set(train_args(&out, &train, 6, extra), "--lora-dropout", "0.1");
        (tuna(&set(a, "--checkpoint-activations", policy)), out)
    };
    let (o, off) = run("off", "off", &[]);
    ok(&o);
    let want = train_lines(&off);
    assert_eq!(want.len(), 6);
    for policy in ["every", "2"] {
        let (o, dir) = run(policy, policy, &[]);
        ok(&o);
        assert_eq!(train_lines(&dir), want, "--checkpoint-activations {policy}: the losses differ from off");
    }
    // Recorded with the run's settings, but a resume may change it (only memory and time differ):
    // without its last checkpoint, the `every` run resumes from step 5 with the policy off.
    let every = d.join("every");
    std::fs::remove_dir_all(every.join("checkpoints/step-000006")).unwrap();
    let (o, _) = run("every", "off", &["--resume"]);
    let err = ok(&o);
    assert!(err.contains("step 5"), "{err}");
    assert_eq!(train_lines(&every), want);
    let state = std::fs::read_to_string(every.join("checkpoints/step-000006/state.json")).unwrap();
    assert!(state.contains("\"--checkpoint-activations\": \"off\""), "{state}");
}

#[test]
fn updating_in_the_backward_trains_the_same_numbers_and_refuses_what_it_cannot_do() {
    let d = tmp("update-in-backward");
    let train = data(&d, "train.jsonl", 16, false);
    let run = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        let a =
            set(set(set(train_args(&out, &train, 4, extra), "--method", "full"), "--micro-batch", "4"), "--clip", "0");
        (tuna(&a), out)
    };
    let (o, plain) = run("plain", &[]);
    ok(&o);
    let (o, inside) = run("inside", &["--update-in-backward", "--checkpoint-activations", "every"]);
    ok(&o);
    assert_eq!(train_lines(&inside), train_lines(&plain), "the losses differ");
    let weights =
        |dir: &std::path::Path| std::fs::read(dir.join("checkpoints/step-000004/trainable.safetensors")).unwrap();
    assert!(weights(&inside) == weights(&plain), "the trained weights differ");
    // Clipping needs every gradient before any update; micro-batches accumulate several passes.
    let refused = |extra: &[&str], micro: &str, clip: &str, needle: &str| {
        let out = d.join("refused");
        let a = set(set(train_args(&out, &train, 1, extra), "--micro-batch", micro), "--clip", clip);
        let err = fails(&tuna(&a), needle);
        assert!(!out.exists(), "a refused run made its folder: {err}");
    };
    refused(&["--update-in-backward"], "4", "1", "add --clip 0");
    refused(&["--update-in-backward"], "2", "0", "--micro-batch 2 would accumulate 2 passes");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_memory_plan_predicts_the_peak_and_refuses_a_run_that_will_not_fit() {
    let d = tmp("memory-plan");
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    let a = set(train_args(&out, &train, 2, &[]), "--method", "full");
    ok(&tuna(&a));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (predicted, rss, heap) =
        (s["predicted_peak_bytes"].as_u64(), s["peak_rss_bytes"].as_u64().unwrap(), s["peak_heap_bytes"].as_u64());
    let (predicted, heap) = (predicted.expect("a CPU run has a plan"), heap.expect("the heap is counted"));
    assert!(heap > 0 && heap <= rss, "heap {heap}, resident {rss}");
    // The tiny model's peak is mostly the program itself: the prediction is in its range.
    assert!(predicted > rss / 2 && predicted < rss * 2, "predicted {predicted}, measured {rss}");
    // Pretending a smaller machine: refused before anything is replaced, with what would fit.
    let run = |args: &[String], avail: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tuna"));
        c.args(args).env("TUNA_MEMORY_AVAILABLE", avail).output().unwrap()
    };
    let mut over = a.clone();
    over.push("--overwrite".into());
    let err = fails(&run(&over, &(predicted * 9 / 10).to_string()), "the memory plan predicts a peak of");
    assert!(err.contains("--no-memory-check starts anyway"), "{err}");
    assert!(out.join("summary.json").exists(), "the refused run replaced the old one: {err}");
    // Nothing fits 1 KB: no flag is suggested, but a shorter --max-len is.
    fails(&run(&over, "1000"), "try a shorter --max-len");
    // An amount that is not a number is an error, not a check switched off.
    for bad in ["garbage", "1GB", "-5", ""] {
        fails(&run(&over, bad), "TUNA_MEMORY_AVAILABLE");
    }
    // A killed export's temporary file (as large as the weights) goes with the next export.
    let stale = out.join("model/.model.safetensors.tmp-99999");
    std::fs::write(&stale, b"partial").unwrap();
    let mut resume = set(a.clone(), "--steps", "3");
    resume.push("--resume".into());
    ok(&tuna(&resume));
    assert!(!stale.exists(), "the stale temporary file is still there");
    // A run killed in its first save left only a `.tmp-step-*` folder: nothing to resume, and
    // nothing --resume-or-start would lose by starting.
    let killed = d.join("killed");
    std::fs::create_dir_all(killed.join("checkpoints/.tmp-step-000002")).unwrap();
    let mut start = train_args(&killed, &train, 1, &[]);
    start.push("--resume-or-start".into());
    ok(&tuna(&start));
    over.push("--no-memory-check".into());
    ok(&run(&over, "1000"));
    std::fs::remove_dir_all(&d).unwrap();
}

/// A resume reads its checkpoint a tensor at a time into the run's own buffers: what it holds
/// beyond them (the heap's peak over what is live once the optimizer is restored, as
/// TUNA_MEM_TRACE's "optimizer" line gives it) is under the checkpoint's two tensor files
/// together, which a resume once held whole (and then a decoded copy of the moments on top). The
/// memory plan counts what a restore holds.
#[test]
fn a_resume_holds_no_whole_checkpoint() {
    let d = tmp("resume-heap");
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    let a = set(train_args(&out, &train, 3, &[]), "--method", "full");
    ok(&tuna(&a));
    let ck = out.join("checkpoints/step-000002");
    let files: u64 = ["trainable.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| std::fs::metadata(ck.join(f)).unwrap().len())
        .sum();
    std::fs::remove_dir_all(out.join("checkpoints/step-000003")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args([a, vec!["--resume".into()]].concat())
        .env("TUNA_MEM_TRACE", "1")
        .output()
        .unwrap();
    let err = ok(&o);
    assert!(err.contains("resuming from") && err.contains("step 2"), "{err}");
    // The plan's figure for it, to a tenth of its unit.
    let planned = err.split("restoring the checkpoint holds ").nth(1).and_then(|r| r.split(" more").next());
    let planned = planned.expect("the plan counts the restore");
    let (x, unit) = planned.split_once(' ').unwrap();
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        _ => panic!("{planned}"),
    };
    let planned = (x.parse::<f64>().unwrap() + 0.05) * scale;
    let line = err.lines().find(|l| l.starts_with("memory: optimizer:")).expect("the optimizer's trace");
    let bytes = line.rsplit_once('(').and_then(|(_, b)| b.strip_suffix(" bytes)")).expect(line);
    let (live, peak) =
        bytes.split_once(" / ").map(|(l, p)| (l.parse::<u64>().unwrap(), p.parse::<u64>().unwrap())).unwrap();
    let held = peak - live;
    assert!(held < files, "the restore held {held} bytes over the run's {live}: the checkpoint's files are {files}");
    assert!(held as f64 <= planned, "the restore held {held} bytes, the plan counted {planned}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_invalid_checkpoint_policy_is_an_error_naming_the_flag() {
    let d = tmp("ckpt-policy");
    let train = data(&d, "train.jsonl", 4, false);
    for bad in ["0", "-1", "sometimes", "1.5"] {
        let a = set(train_args(&d.join("run"), &train, 1, &[]), "--checkpoint-activations", bad);
        let err = fails(&tuna(&a), "--checkpoint-activations");
        assert!(err.contains("expected off, every, or a positive integer k"), "{bad}: {err}");
        for cmd in ["profile", "compare"] {
            let mut a = a.clone();
            a[0] = cmd.into();
            if cmd == "compare" {
                let i = a.iter().position(|x| x == "--method").unwrap();
                a[i] = "--methods".into();
            }
            fails(&tuna(&a), "--checkpoint-activations");
        }
    }
    assert!(!d.join("run").exists(), "nothing ran");
}

#[test]
fn a_missing_model_is_refused_before_the_output_folder_is_made() {
    let d = tmp("missing-model");
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    let missing = d.join("no-such-model").display().to_string();
    let err = fails(&tuna(&set(train_args(&out, &train, 2, &[]), "--model", &missing)), "no such file or folder");
    assert!(err.contains(&missing), "{err}");
    assert!(!out.exists(), "a refused run made {}", out.display());
    std::fs::remove_dir_all(&d).unwrap();
}

/// `--tf32` reaches the device's products: `tuna train --device cuda --tf32` (the emulated device
/// in the test command) logs other losses than the same run in f32 (on the emulated device), close
/// to them. Skips by name
/// where this binary has no CUDA device.
#[test]
fn tf32_reaches_the_cuda_products() {
    let Some(dev) = tuna_kernels::testing::cuda_or_skip("cli_train::tf32_reaches_the_cuda_products") else {
        return;
    };
    let d = tmp("tf32");
    let train = data(&d, "train.jsonl", 8, false);
    let run = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        let a = set(train_args(&out, &train, 3, extra), "--device", "cuda");
        ok(&tuna(&a));
        train_losses(&out)
    };
    let (f, t) = (run("f32", &["--precision", "f32"]), run("tf32", &["--tf32"]));
    assert_eq!((f.len(), t.len()), (3, 3));
    let precision = |name: &str| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(d.join(name).join("summary.json")).unwrap()).unwrap()
            ["precision"]
            .clone()
    };
    // --tf32 alone keeps the run in f32 (CUDA's default, bf16, has no f32 products to round).
    assert_eq!((precision("f32"), precision("tf32")), ("f32".into(), "f32".into()));
    // (A GPU's cuBLAS may keep the tiny model's shapes on f32 kernels: the change is certain only
    // where the operands are known to be rounded.)
    assert!(f != t || !dev.is_emulated(), "--tf32 changed nothing");
    for (a, b) in f.iter().zip(&t) {
        assert!((a - b).abs() <= 2e-3 * a.abs().max(1.0), "f32 {f:?} vs tf32 {t:?}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// A resumed run keeps `--tf32` as it keeps `--base-precision`: resuming with the other setting is
/// refused naming the flag (the state logic: `state::tests::a_resume_that_switches_tf32_is_refused_naming_the_flag`).
/// CUDA only (`--tf32` is refused on the CPU); skips by name where this binary has no CUDA device.
#[test]
fn a_resume_that_switches_tf32_is_refused() {
    if tuna_kernels::testing::cuda_or_skip("cli_train::a_resume_that_switches_tf32_is_refused").is_none() {
        return;
    }
    let d = tmp("tf32-resume");
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    let args = |steps: u64, extra: &[&str]| set(train_args(&out, &train, steps, extra), "--device", "cuda");
    ok(&tuna(&args(2, &["--precision", "f32"])));
    let o = tuna(&args(4, &["--resume", "--tf32"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tf32 was off, now on"), "{err}");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["tf32"], false, "{s}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A run refused after it took its output folder (data found malformed while loading) leaves
/// no folder and no lock file behind; a folder that was there stays, as empty as it was.
#[test]
fn a_run_refused_while_loading_leaves_no_output_folder() {
    let d = tmp("refused-loading");
    let bad = d.join("bad.jsonl");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": \"broken\n").unwrap();
    let out = d.join("run");
    fails(&tuna(&train_args(&out, &bad.display().to_string(), 2, &[])), "bad.jsonl:2:");
    assert!(!out.exists(), "a refused run left {}", out.display());
    std::fs::create_dir_all(&out).unwrap();
    fails(&tuna(&train_args(&out, &bad.display().to_string(), 2, &[])), "bad.jsonl:2:");
    assert!(std::fs::read_dir(&out).unwrap().next().is_none(), "a refused run wrote into {}", out.display());
    std::fs::remove_dir_all(&d).unwrap();
}

/// `--base-precision bf16|int8`: LoRA trains on a packed frozen base, its loss curve close to the
/// f32 base's; a resume keeps the precision (a switch is refused by name); full fine-tuning and a
/// CUDA device are refused before anything is written.
#[test]
fn a_low_precision_base_trains_close_to_f32_and_resumes_only_as_itself() {
    let d = tmp("base-precision");
    let train = data(&d, "train.jsonl", 16, false);
    let run = |name: &str, p: &str, steps: u64, extra: &[&str]| {
        let out = d.join(name);
        let a = set(set(train_args(&out, &train, steps, extra), "--base-precision", p), "--warmup", "0");
        (tuna(&a), out)
    };
    let (o, f32_run) = run("f32", "f32", 12, &[]);
    ok(&o);
    for p in ["bf16", "int8"] {
        let (o, out) = run(p, p, 12, &[]);
        ok(&o);
        let (a, b) = (train_losses(&f32_run), train_losses(&out));
        assert_eq!((a.len(), b.len()), (12, 12));
        // Tolerance 2% of the loss per step (measured on this run: bf16 ~1e-4, int8 ~1e-3).
        for (s, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 0.02 * x, "{p} step {}: f32 {x} vs {y}\n{a:?}\n{b:?}", s + 1);
        }
        assert!(a.iter().zip(&b).any(|(x, y)| x != y), "{p} gave f32's curve bit for bit: the flag did nothing");
        assert!(b[11] < b[0], "{p} did not train: {b:?}");
    }
    // The adapter evaluates on the base it trained on, and on the f32 base, to about the same loss.
    // The adapter's task file records the base it trained on, so eval scores there by default.
    let eval = |p: Option<&str>| {
        let adapter = d.join("bf16").join("adapter").display().to_string();
        let mut a: Vec<String> =
            ["eval", "--model", &fixture("llama"), "--adapter", &adapter, "--data", &train].map(String::from).to_vec();
        a.extend(p.map(|p| ["--base-precision".to_string(), p.to_string()]).into_iter().flatten());
        let o = tuna(&a);
        ok(&o);
        // Scoring on another base than the one trained on is allowed, and said.
        let err = String::from_utf8_lossy(&o.stderr);
        let noted = err.contains("note: --base-precision f32: the adapter was trained with --base-precision bf16");
        assert_eq!(noted, p == Some("f32"), "{p:?}: {err}");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("no loss in: {out}"))
    };
    let (lb, lf, ld) = (eval(Some("bf16")), eval(Some("f32")), eval(None));
    assert!((lb - lf).abs() <= 0.02 * lf, "eval loss on the bf16 base {lb} vs the f32 base {lf}");
    assert_ne!(lb, lf, "eval's --base-precision changed nothing");
    assert_eq!(ld, lb, "eval without the flag did not score on the base the adapter trained on");
    let (o, _) = run("bf16", "int8", 14, &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--base-precision was bf16, now int8"), "{err}");
    let (o, _) = run("bf16", "bf16", 14, &["--resume"]);
    ok(&o);
    let refused = |flag: &str, value: &str, needle: &str| {
        let out = d.join("refused");
        let a = set(set(train_args(&out, &train, 1, &[]), "--base-precision", "bf16"), flag, value);
        let err = fails(&tuna(&a), needle);
        assert!(!out.exists(), "a refused run made its folder: {err}");
    };
    refused("--method", "full", "full fine-tuning trains them");
    // On CUDA, whose default bf16 mixed precision already holds the frozen weights in bf16.
    refused("--device", "cuda", "training is bf16 mixed precision by default, which already stores the frozen weights");
    // An int8-base adapter against another model: the model is the problem, not the precision (no
    // hint about the base precision the adapter records).
    let adapter = d.join("int8").join("adapter").display().to_string();
    let a = ["eval", "--model", &fixture("gpt2"), "--adapter", &adapter, "--data", &train].map(String::from);
    let err = fails(&tuna(&a), "adapter made for a llama model, this model is gpt2");
    assert!(!err.contains("base precision") && !err.contains("--base-precision"), "{err}");
    // The summary says which base the run trained on.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("bf16").join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["base_precision"], "bf16");
    // compare refuses a method the flag cannot apply to before anything trains or is written,
    // wherever it is listed; so does the prompt-engineered baseline.
    for methods in ["lora,full", "full,lora", "prompt,prompt-engineered"] {
        let out = d.join("cmp");
        let a = [
            "compare",
            "--model",
            &fixture("llama"),
            "--task",
            "classify",
            "--train",
            &train,
            "--methods",
            methods,
            "--steps",
            "1",
            "--base-precision",
            "bf16",
            "--out",
            &out.display().to_string(),
        ];
        let needle = if methods.contains("full") { "full fine-tuning trains them" } else { "scores the f32 model" };
        let err = fails(&tuna(&a.map(String::from)), needle);
        assert!(!out.exists(), "{methods}: a refused comparison made its folder: {err}");
    }
    // q4 keeps a GGUF's Q4_0 / Q4_1 blocks: a Hugging Face folder has none, and says so by name.
    let out = d.join("refused");
    let err = fails(&tuna(&set(train_args(&out, &train, 1, &[]), "--base-precision", "q4")), "Q4_0 or Q4_1");
    assert!(err.contains(&fixture("llama")) && err.contains("bf16 and int8 work on any model"), "{err}");
    assert!(!out.exists(), "a refused q4 run made its folder: {err}");
    // compare too, before any method's folder
    let cmp = d.join("refused-compare");
    let a = [
        "compare",
        "--model",
        &fixture("llama"),
        "--task",
        "classify",
        "--train",
        &train,
        "--methods",
        "lora,prompt",
        "--steps",
        "1",
        "--base-precision",
        "q4",
        "--out",
        &cmp.display().to_string(),
    ];
    let err = fails(&tuna(&a.map(String::from)), "Q4_0 or Q4_1");
    assert!(!cmp.exists(), "a refused q4 comparison made its folder: {err}");
    fails(&tuna(&set(train_args(&out, &train, 1, &[]), "--base-precision", "fp8")), "unknown base precision");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `--precision bf16` (CUDA's mixed precision; the emulated device in the test command): losses
/// close to the same run in f32 and not equal to them; the exported adapter holds the f32 masters
/// (values off bf16's grid); a run stopped after 2 steps and resumed gives the uninterrupted run's
/// losses exactly; a resume that switches the precision is refused naming the flag; and on the
/// CPU the flag is refused by name before anything is written. Skips by name where this binary
/// has no CUDA device (the CPU refusal is checked in any case).
#[test]
fn bf16_mixed_precision_trains_exports_masters_and_resumes_on_cuda() {
    let d = tmp("bf16");
    let train = data(&d, "train.jsonl", 8, false);
    let cpu_out = d.join("cpu");
    let o = tuna(&train_args(&cpu_out, &train, 2, &["--precision", "bf16"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--precision bf16 is CUDA's mixed precision"), "{err}");
    assert!(!cpu_out.exists(), "a refused run wrote {}", cpu_out.display());
    // An unknown device is named as such, before any precision rule.
    let o = tuna(&set(train_args(&cpu_out, &train, 2, &["--precision", "bf16"]), "--device", "gpu:0"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown device `gpu:0`"), "{err}");
    if tuna_kernels::testing::cuda_or_skip("cli_train::bf16_mixed_precision_trains_exports_masters_and_resumes_on_cuda")
        .is_none()
    {
        std::fs::remove_dir_all(&d).unwrap();
        return;
    }
    let args = |out: &Path, steps: u64, extra: &[&str]| set(train_args(out, &train, steps, extra), "--device", "cuda");
    let run = |name: &str, steps: u64, extra: &[&str]| {
        let out = d.join(name);
        ok(&tuna(&args(&out, steps, extra)));
        train_losses(&out)
    };
    let f = run("f32", 4, &["--precision", "f32"]);
    let b = run("bf16", 4, &["--precision", "bf16"]);
    assert_eq!((f.len(), b.len()), (4, 4));
    // bf16 is CUDA's default, and the run says so (not where --precision asked for it).
    let o = tuna(&args(&d.join("default"), 4, &[]));
    ok(&o);
    assert_eq!(train_losses(&d.join("default")), b, "--device cuda without --precision");
    let note = "note: training in bf16 mixed precision, CUDA's default";
    assert!(String::from_utf8_lossy(&o.stderr).contains(note), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tuna(&args(&d.join("explicit"), 1, &["--precision", "bf16"]));
    ok(&o);
    assert!(!String::from_utf8_lossy(&o.stderr).contains(note), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("losses f32 {f:?}\n      bf16 {b:?}");
    assert!(f != b, "--precision bf16 changed nothing: {f:?}");
    // Measured within 0.09% of the first loss (0.3% when the logged losses were the loss tensor's
    // own bf16 element, 2^-5 apart near 5); the log holds the f32 means the loss op computed.
    for (a, c) in f.iter().zip(&b) {
        assert!((a - c).abs() <= 0.005 * f[0].abs(), "f32 {f:?} vs bf16 {b:?}");
    }
    assert!(b.iter().any(|&l| half::bf16::from_f64(l).to_f64() != l), "bf16-rounded losses logged: {b:?}");
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("bf16").join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["precision"], "bf16", "{s}");
    // The exported adapter holds the f32 masters: every tensor (LoRA's B starts at zero, so its
    // values are the trained ones) holds values bf16 cannot.
    let adapter = std::fs::read(d.join("bf16").join("adapter").join("adapter_model.safetensors")).unwrap();
    let header = u64::from_le_bytes(adapter[..8].try_into().unwrap()) as usize;
    let index: serde_json::Value = serde_json::from_slice(&adapter[8..8 + header]).unwrap();
    let data = &adapter[8 + header..];
    let mut tensors = 0;
    for (name, t) in index.as_object().unwrap().iter().filter(|(n, _)| *n != "__metadata__") {
        assert_eq!(t["dtype"], "F32", "{name}");
        let (a, b) = (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
        let off_grid = data[a..b]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .any(|x| half::bf16::from_f32(x).to_f32() != x);
        assert!(off_grid, "{name}: the exported adapter holds only bf16 values");
        tensors += 1;
    }
    assert!(tensors >= 2, "{index}");
    // Stopped after 2 steps, resumed to 4: the uninterrupted run's losses exactly.
    let r = d.join("resumed");
    ok(&tuna(&args(&r, 2, &["--precision", "bf16"])));
    ok(&tuna(&args(&r, 4, &["--precision", "bf16", "--resume"])));
    assert_eq!(train_losses(&r), b, "a resumed bf16 run");
    // And the same weights to the last bit (equal losses could still hide a master saved as bf16).
    let exported = |run: &Path| std::fs::read(run.join("adapter").join("adapter_model.safetensors")).unwrap();
    assert!(exported(&r) == exported(&d.join("bf16")), "a resumed bf16 run exports other weights");
    // Full fine-tuning of some weights only: the frozen ones would be exported rounded, refused.
    let o = tuna(&set(
        set(args(&d.join("patterns"), 2, &["--precision", "bf16"]), "--method", "full"),
        "--train-patterns",
        "layers.1",
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--precision bf16 with --train-patterns"), "{err}");
    // Not asked for, such a run is f32 (CUDA's default, bf16, does not apply to it).
    let patterns = d.join("patterns-default");
    ok(&tuna(&set(set(args(&patterns, 2, &[]), "--method", "full"), "--train-patterns", "layers.1")));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(patterns.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["precision"], "f32", "{s}");
    // A resume in f32 is refused naming the flag, and where it runs (asked for, or on the CPU,
    // which computes in f32); `--device gpu` is CUDA too.
    for (device, extra) in [("cuda", &["--precision", "f32", "--resume"][..]), ("cpu", &["--resume"])] {
        let o = tuna(&set(args(&r, 6, extra), "--device", device));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--precision was bf16, now f32"), "{extra:?}: {err}");
        assert!(err.contains("Resume with --precision bf16 (on a CUDA device)"), "{err}");
    }
    ok(&tuna(&set(args(&r, 5, &["--precision", "bf16", "--resume"]), "--device", "gpu")));
    // Without --precision a resume continues in the precision its checkpoint trained in (an f32
    // run is not switched to CUDA's default, bf16).
    let rf = d.join("resumed-f32");
    ok(&tuna(&args(&rf, 2, &["--precision", "f32"])));
    ok(&tuna(&args(&rf, 4, &["--resume"])));
    assert_eq!(train_losses(&rf), f, "an f32 run resumed without --precision");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `tuna compare --precision bf16` (CUDA) trains every method in bf16 mixed precision: each
/// method's run records `bf16` and its losses are the ones `tuna train --precision bf16` gives
/// with the same flags (compare runs `tuna train` per method); the prompt-engineered baseline
/// (which trains nothing) is refused by name before anything is written. Skips by name where
/// this binary has no CUDA device.
#[test]
fn compare_in_bf16_trains_every_method_in_bf16() {
    if tuna_kernels::testing::cuda_or_skip("cli_train::compare_in_bf16_trains_every_method_in_bf16").is_none() {
        return;
    }
    let d = tmp("bf16-compare");
    let train = data(&d, "train.jsonl", 8, false);
    let eval = data(&d, "eval.jsonl", 4, false);
    let compare = |out: &Path, methods: &str| {
        let mut a = set(
            set(set(train_args(out, &train, 3, &["--precision", "bf16"]), "--device", "cuda"), "--eval", &eval),
            "--method",
            methods,
        );
        a[0] = "compare".into();
        let i = a.iter().position(|x| x == "--method").unwrap();
        a[i] = "--methods".into();
        a
    };
    let out = d.join("cmp");
    ok(&tuna(&compare(&out, "lora,prompt")));
    let solo = d.join("solo");
    ok(&tuna(&set(
        set(set(train_args(&solo, &train, 3, &["--precision", "bf16"]), "--device", "cuda"), "--eval", &eval),
        "--method",
        "lora",
    )));
    for m in ["lora", "prompt"] {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(m).join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["precision"], "bf16", "{m}: {s}");
        assert_eq!(train_losses(&out.join(m)).len(), 3, "{m}");
    }
    assert_eq!(train_losses(&out.join("lora")), train_losses(&solo), "compare's lora run and tuna train's");
    // The baseline trains nothing: refused by name, before any method trains.
    let (model, train_c) = (fixture("bert"), data(&d, "cls.jsonl", 8, true));
    let mut a = compare(&d.join("with-baseline"), "lora,prompt-engineered");
    let set_flag = |a: &mut Vec<String>, flag: &str, v: &str| {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = v.into();
    };
    set_flag(&mut a, "--model", &model);
    set_flag(&mut a, "--task", "classify");
    set_flag(&mut a, "--train", &train_c);
    let o = tuna(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("the prompt-engineered baseline trains nothing"), "{err}");
    assert!(!d.join("with-baseline").exists(), "a refused compare wrote its folder");
    // Full fine-tuning of some weights only, in bf16: refused before LoRA (listed first) trains.
    let a = [compare(&d.join("patterns"), "lora,full"), vec!["--train-patterns".into(), "layers.1".into()]].concat();
    let o = tuna(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--precision bf16 with --train-patterns"), "{err}");
    assert!(!d.join("patterns").exists(), "a refused compare wrote its folder");
    std::fs::remove_dir_all(&d).unwrap();
}
