//! T5 through the binary, on the tiny T5 fixtures: `tuna compare` with every method and the
//! prompt-engineered rows on a classification task (label words as the decoder's targets),
//! `tuna train --task completion` (the prompt to the encoder, the completion to the decoder) with
//! resume, `tuna eval` of the saved adapter, `tuna generate` through it, and what T5 refuses.

mod common;

use common::*;

/// `n` completion records: a sentence to its first word.
fn completions(dir: &std::path::Path, n: usize) -> String {
    let p = dir.join("completion.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let t = SENTENCES[i % SENTENCES.len()];
            let first = t.split(' ').next().unwrap();
            format!("{{\"prompt\": \"{t}\", \"completion\": \"{first}\"}}")
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p.display().to_string()
}

#[test]
fn compare_on_t5_runs_every_method_and_the_prompt_engineered_rows() {
    let d = tmp("t5-compare");
    let train = data(&d, "train.jsonl", 16, true);
    let eval = data(&d, "eval.jsonl", 8, true);
    let out = d.join("cmp");
    let mut args: Vec<String> = [
        "compare",
        "--model",
        &fixture("t5"),
        "--task",
        "classify",
        "--train",
        &train,
        "--eval",
        &eval,
        "--methods",
        "prompt-engineered,full,prompt,ptuning,prefix,houlsby,lora",
        "--shots",
        "2",
        "--template",
        "Text: {text} Label:",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--quiet",
        "--out",
    ]
    .map(String::from)
    .to_vec();
    args.push(out.display().to_string());
    let o = tuna(&args);
    ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    for row in [
        "| prompt-engineered 0-shot | 0 |",
        "| prompt-engineered 2-shot | 0 |",
        "| full |",
        "| prompt |",
        "| ptuning |",
        "| prefix |",
        "| houlsby |",
        "| lora |",
    ] {
        assert!(table.contains(row), "{row} missing from:\n{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    for row in json.as_array().unwrap() {
        let acc = row["eval_accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&acc), "{row}");
    }
    assert!(out.join("compare.html").exists());
}

#[test]
fn completion_trains_evaluates_resumes_and_generates_on_t5() {
    let d = tmp("t5-completion");
    let train = completions(&d, 12);
    let out = d.join("run");
    let args: Vec<String> = [
        "train",
        "--model",
        &fixture("t5"),
        "--task",
        "completion",
        "--train",
        &train,
        "--method",
        "lora",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--save-every",
        "1",
        "--keep-last",
        "3",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    ok(&tuna(&args));
    let losses: Vec<f64> = train_lines(&out)
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 12, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[11] < losses[0], "the completion loss fell: {losses:?}");
    // A killed run resumes to the same final loss (bit for bit).
    let again = d.join("again");
    sigkill_mid_run(&set(args.clone(), "--out", again.to_str().unwrap()), &again);
    let mut resume = set(args.clone(), "--out", again.to_str().unwrap());
    resume.push("--resume".into());
    ok(&tuna(&resume));
    assert_eq!(train_lines(&again), train_lines(&out), "resumed losses differ from the uninterrupted run");
    // The saved adapter is PEFT's seq2seq LoRA, and eval and generate load it.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
    let e = tuna(
        &[
            "eval",
            "--model",
            &fixture("t5"),
            "--adapter",
            out.join("adapter").to_str().unwrap(),
            "--task",
            "completion",
            "--data",
            &train,
        ]
        .map(String::from),
    );
    ok(&e);
    let text = String::from_utf8_lossy(&e.stdout);
    assert!(text.contains("perplexity"), "{text}");
    let g = tuna(
        &[
            "generate",
            "--model",
            &fixture("t5"),
            "--adapter",
            out.join("adapter").to_str().unwrap(),
            "--prompt",
            "The cat sat on the mat.",
            "--max-new-tokens",
            "4",
        ]
        .map(String::from),
    );
    ok(&g);
    assert!(!g.stdout.is_empty(), "generate printed nothing");
}

#[test]
fn t5_refuses_what_it_cannot_do_by_name() {
    let d = tmp("t5-refusals");
    let lm = data(&d, "lm.jsonl", 8, false);
    let out = d.join("run");
    let base: Vec<String> = [
        "train",
        "--model",
        &fixture("t5"),
        "--task",
        "lm",
        "--train",
        &lm,
        "--method",
        "lora",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    fails(&tuna(&base), "the lm task has no prompt for T5's encoder");
    assert!(!out.join("checkpoints").exists(), "refused before training");
    // PEFT's prefix cannot express T5 v1.1's shape here (3 decoder layers over 2 encoder ones,
    // heads x d_kv != d_model): refused before training.
    let cls = data(&d, "cls.jsonl", 8, true);
    let prefix = set(set(set(base, "--task", "classify"), "--train", &cls), "--method", "prefix");
    fails(&tuna(&set(prefix, "--model", &fixture("t5v11"))), "more decoder layers (3) than encoder layers (2)");
    assert!(!out.join("checkpoints").exists());
}

/// The prompt and the completion each get --max-len (the encoder's and the decoder's own): a
/// long completion no longer cuts its prompt away, and the prompt keeps its end.
#[test]
fn prompt_and_completion_have_their_own_budgets() {
    let d = tmp("t5-budgets");
    let long: Vec<&str> = std::iter::repeat_n("the cat sat on the mat", 40).collect();
    let p = d.join("long.jsonl");
    let rows = [
        format!("{{\"prompt\": \"A dog ran.\", \"completion\": \"{}\"}}", long.join(" ")),
        format!("{{\"prompt\": \"{}\", \"completion\": \"The cat.\"}}", long.join(" ")),
    ];
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    let out = d.join("run");
    let args: Vec<String> = [
        "train",
        "--model",
        &fixture("t5"),
        "--task",
        "completion",
        "--train",
        p.to_str().unwrap(),
        "--method",
        "lora",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-len",
        "8",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    ok(&tuna(&args));
    assert_eq!(train_lines(&out).len(), 2);
}

#[test]
fn serve_compare_and_generate_refuse_what_t5_cannot_take_up_front() {
    let d = tmp("t5-upfront");
    // serve: refused before it listens.
    let o = tuna(&["serve", "--model", &fixture("t5"), "--port", "0"].map(String::from));
    let err = fails(&o, "T5 is not served yet");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("listening"), "{err}");
    // compare: a prefix method PEFT cannot express on t5v11 is refused before anything trains.
    let train = data(&d, "train.jsonl", 8, true);
    let out = d.join("cmp");
    let args = [
        "compare",
        "--model",
        &fixture("t5v11"),
        "--task",
        "classify",
        "--train",
        &train,
        "--holdout",
        "2",
        "--methods",
        "lora,prefix",
        "--steps",
        "1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from);
    fails(&tuna(&args), "--methods prefix: prefix tuning on T5 with more decoder layers (3)");
    assert!(!out.join("lora").exists(), "lora trained before the refusal");
    // generate: the prompt is the encoder's and the new tokens the decoder's, each up to 512.
    let gen = |n: &str| {
        tuna(&["generate", "--model", &fixture("t5"), "--prompt", "The cat", "--max-new-tokens", n].map(String::from))
    };
    fails(&gen("513"), "513 new tokens exceed the decoder's 512 positions: use --max-new-tokens 512 or less");
}
