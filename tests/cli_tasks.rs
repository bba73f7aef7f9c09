//! `tuna train --tasks` end to end on the committed tiny fixtures: three tasks (a soft prompt for
//! classification, LoRA for lm, a prefix for completion) trained together on the Llama fixture,
//! each task's eval loss falling, each exported adapter scored by `tuna eval` as the summary says
//! and served by `tuna serve --adapters`; two classification tasks with different label sets on
//! BERT; a SIGKILLed run resuming to the uninterrupted one bit for bit; a changed tasks file
//! refused on resume by name; micro-batches equal to the full batch; `--overwrite` replacing the
//! task adapters and nothing else; and bad tasks files refused naming the file and the entry.

mod common;
#[allow(dead_code)] // the serve tests use the rest
mod serve_client;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Classification, lm and completion data (12 records each) in `dir`, and a tasks file over them.
fn three_tasks(dir: &Path) -> PathBuf {
    data(dir, "cls.jsonl", 12, true);
    data(dir, "lm.jsonl", 12, false);
    let lines: Vec<String> = (0..12)
        .map(|i| {
            let (p, c) = SENTENCES[i % SENTENCES.len()].split_at(10);
            json!({"prompt": p, "completion": c}).to_string()
        })
        .collect();
    std::fs::write(dir.join("comp.jsonl"), lines.join("\n") + "\n").unwrap();
    let tasks = json!([
        {"name": "sentiment", "method": "prompt", "virtual_tokens": 4, "train": "cls.jsonl", "eval": "cls.jsonl"},
        {"name": "story", "method": "lora", "lora_r": 4, "task": "lm", "lr": 1e-2, "train": "lm.jsonl", "eval": "lm.jsonl"},
        {"name": "finish", "method": "prefix", "virtual_tokens": 3, "task": "completion", "lr": 3e-2,
         "train": "comp.jsonl", "eval": "comp.jsonl"},
    ]);
    write_tasks(dir, "tasks.json", &tasks)
}

fn write_tasks(dir: &Path, name: &str, tasks: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(tasks).unwrap()).unwrap();
    p
}

fn tasks_args(model: &str, tasks: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--tasks",
        &tasks.display().to_string(),
        "--model",
        &fixture(model),
        "--batch-size",
        "6",
        "--steps",
        &steps.to_string(),
        "--warmup",
        "2",
        "--eval-every",
        "5",
        "--save-every",
        "1",
        "--keep-last",
        "3",
        "--seed",
        "3",
        "--quiet",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// The metrics log's lines of `split`.
fn lines(out: &Path, split: &str) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["split"] == split)
        .collect()
}

/// `tuna eval` of task `name`'s exported adapter on `data`: its printed loss.
fn eval_loss(model: &str, out: &Path, name: &str, data: &Path) -> String {
    let adapter = out.join("adapters").join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args(["eval", "--model", &fixture(model), "--adapter"])
        .arg(&adapter)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.split_whitespace().nth(1).unwrap_or_else(|| panic!("{text}")).to_string()
}

#[test]
fn three_tasks_train_together_and_each_adapter_evaluates_and_serves_as_the_summary_says() {
    let d = tmp("tasks-three");
    let tasks = three_tasks(&d);
    let out = d.join("run");
    ok(&tuna(&tasks_args("llama", &tasks, &out, 30, &[])));
    // Batches mix the tasks: some step has rows of all three.
    let train = lines(&out, "train");
    assert_eq!(train.len(), 30);
    assert!(train.iter().any(|l| l["tasks"].as_object().unwrap().len() == 3), "no batch mixed all three tasks");
    let s = summary(&out);
    let evals = lines(&out, "eval");
    let data = [("sentiment", "cls.jsonl"), ("story", "lm.jsonl"), ("finish", "comp.jsonl")];
    for (k, (name, file)) in data.iter().enumerate() {
        let t = &s["tasks"][k];
        assert_eq!(t["name"], *name);
        // Each task's eval loss falls from the first evaluation (step 5) to the last.
        let first = evals[0]["tasks"][name]["loss"].as_f64().unwrap();
        let last = t["eval_loss"].as_f64().unwrap();
        println!("{name}: eval loss {first:.4} at step 5 -> {last:.4}");
        assert!(last < first, "{name}: eval loss {first} -> {last}");
        // `tuna eval` on the exported adapter (its task file says the task) gives the summary's loss.
        assert_eq!(eval_loss("llama", &out, name, &d.join(file)), format!("{last:.4}"), "{name}");
        assert_eq!(t["export"], out.join("adapters").join(name).display().to_string());
    }
    assert_eq!(s["tasks"][0]["eval_accuracy"], 1.0, "{s}");
    // The adapters folder serves as is: one adapter per task.
    let srv = serve_client::Server::start(Some(&out.join("adapters")), &[]);
    let listed = srv.req("GET", "/v1/adapters", None).json();
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().filter_map(|a| a["id"].as_str()).collect();
    for (name, _) in data {
        assert!(ids.contains(&name), "{name} not served: {listed}");
    }
    let r = srv.post("/v1/completions", &json!({"model": "story", "prompt": "The cat", "max_tokens": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A multi-task run on an int8 base records it as a single-task run does: `summary.json`'s
/// `base_precision` and `base_products` (none for an f32 base), the printed summary, and each
/// task's `tuna_task.json` (which `tuna eval`, `generate` and `serve` follow).
#[test]
fn a_multi_task_run_on_a_low_precision_base_records_it_and_its_products() {
    let d = tmp("tasks-int8");
    let tasks = three_tasks(&d);
    for (p, products) in [("int8", Some("int8 dot products")), ("f32", None)] {
        let out = d.join(p);
        // The emulated dot path: the same products on every CPU.
        let o = Command::new(env!("CARGO_BIN_EXE_tuna"))
            .env("TUNA_CPU_MATRIX", "emulated")
            .args(tasks_args("llama", &tasks, &out, 2, &["--base-precision", p]))
            .output()
            .unwrap();
        ok(&o);
        let s = summary(&out);
        assert_eq!(s["base_precision"], p, "{s}");
        assert_eq!(s.get("base_products").and_then(Value::as_str), products, "{s}");
        let printed = String::from_utf8_lossy(&o.stdout);
        assert_eq!(printed.contains("base precision"), p != "f32", "{printed}");
        for name in ["sentiment", "story", "finish"] {
            let file = out.join("adapters").join(name).join("tuna_task.json");
            let t: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            assert_eq!(t.get("base_precision").and_then(Value::as_str), (p != "f32").then_some(p), "{t}");
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn classification_tasks_with_different_label_sets_train_together_on_bert() {
    let d = tmp("tasks-bert");
    data(&d, "two.jsonl", 12, true);
    let three: Vec<String> = (0..12)
        .map(|i| {
            let t = SENTENCES[i % SENTENCES.len()];
            let label = ["cat", "dog", "bird"].into_iter().find(|w| t.contains(w)).unwrap_or("bird");
            json!({"text": t, "label": label}).to_string()
        })
        .collect();
    std::fs::write(d.join("three.jsonl"), three.join("\n") + "\n").unwrap();
    let tasks = write_tasks(
        &d,
        "tasks.json",
        &json!([
            {"name": "two", "method": "lora", "lora_r": 2, "train": "two.jsonl", "eval": "two.jsonl"},
            {"name": "three", "method": "houlsby", "bottleneck": 4, "lr": 1e-2, "train": "three.jsonl", "eval": "three.jsonl"},
        ]),
    );
    let out = d.join("run");
    ok(&tuna(&tasks_args("bert", &tasks, &out, 10, &[])));
    let s = summary(&out);
    for (k, (name, file)) in [("two", "two.jsonl"), ("three", "three.jsonl")].iter().enumerate() {
        let want = format!("{:.4}", s["tasks"][k]["eval_loss"].as_f64().unwrap());
        assert_eq!(eval_loss("bert", &out, name, &d.join(file)), want, "{name}");
    }
    let task_file: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapters/three/tuna_task.json")).unwrap()).unwrap();
    assert_eq!(task_file["labels"], json!(["bird", "cat", "dog"]));
}

#[test]
fn a_killed_multi_task_run_resumes_to_the_uninterrupted_run() {
    let d = tmp("tasks-resume");
    let tasks = three_tasks(&d);
    let (a, b) = (d.join("a"), d.join("b"));
    let steps = 120;
    ok(&tuna(&tasks_args("llama", &tasks, &a, steps, &[])));
    let want = train_lines(&a);
    sigkill_mid_run(&tasks_args("llama", &tasks, &b, steps, &[]), &b);
    let done = train_lines(&b).len();
    assert!(done < steps as usize, "the run finished before it was killed ({done} steps)");
    let err = ok(&tuna(&tasks_args("llama", &tasks, &b, steps, &["--resume"])));
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(train_lines(&b), want, "resumed losses differ from the uninterrupted run");
    for name in ["sentiment", "story", "finish"] {
        let f = |o: &Path| std::fs::read(o.join("adapters").join(name).join("adapter_model.safetensors")).unwrap();
        assert!(f(&a) == f(&b), "{name}: the resumed run's adapter differs");
    }
}

#[test]
fn a_changed_tasks_file_is_refused_on_resume_naming_the_task() {
    let d = tmp("tasks-changed");
    let tasks = three_tasks(&d);
    let out = d.join("run");
    ok(&tuna(&tasks_args("llama", &tasks, &out, 3, &[])));
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&tasks).unwrap()).unwrap();
    v[1]["lora_r"] = json!(2);
    let changed = write_tasks(&d, "changed.json", &v);
    let err = fails(&tuna(&tasks_args("llama", &changed, &out, 3, &["--resume"])), "task `story`: --method");
    assert!(err.contains("was lora (--lora-r 4, --lora-alpha 16.0") && err.contains("now lora (--lora-r 2,"), "{err}");
    v[1]["lora_r"] = json!(4);
    // Other virtual tokens cut the task's examples otherwise: one change, the setting, not also its data.
    v[0]["virtual_tokens"] = json!(5);
    let vt = write_tasks(&d, "tokens.json", &v);
    let err = fails(
        &tuna(&tasks_args("llama", &vt, &out, 3, &["--resume"])),
        "task `sentiment`: --method and its settings was prompt (--virtual-tokens 4, --prompt-init vocab), now \
         prompt (--virtual-tokens 5,",
    );
    assert!(!err.contains("data"), "{err}");
    v[0]["virtual_tokens"] = json!(4);
    v[2]["name"] = json!("ending");
    let renamed = write_tasks(&d, "renamed.json", &v);
    fails(&tuna(&tasks_args("llama", &renamed, &out, 3, &["--resume"])), "tasks was sentiment, story, finish, now");
    // Another task's data changed: named by task.
    std::fs::write(d.join("lm.jsonl"), "{\"text\": \"Another story altogether.\"}\n").unwrap();
    let err = fails(
        &tuna(&tasks_args("llama", &tasks, &out, 3, &["--resume"])),
        "task `story`: the training data (its train file) changed since the run began",
    );
    assert!(!err.contains("(its data) was"), "{err}");
    data(&d, "lm.jsonl", 12, false);
    // Unchanged, it resumes (nothing left to train) and leaves the same adapters.
    ok(&tuna(&tasks_args("llama", &tasks, &out, 3, &["--resume"])));
}

#[test]
fn bad_tasks_files_are_refused_naming_the_file_and_the_entry() {
    let d = tmp("tasks-bad");
    three_tasks(&d);
    let out = d.join("run");
    let lm = |name: &str, method: &str| json!({"name": name, "method": method, "task": "lm", "train": "lm.jsonl"});
    let cases: Vec<(&str, String, &str)> = vec![
        ("syntax.json", "[{\"name\": ".into(), "not a JSON list of tasks"),
        ("object.json", "{}".into(), "not a JSON list of tasks"),
        ("empty.json", "[]".into(), "the list of tasks is empty"),
        ("dup.json", json!([lm("a", "lora"), lm("a", "prompt")]).to_string(), "tasks 1 and 2 are both named `a`"),
        ("unknown.json", json!([lm("a", "lora"), lm("b", "lorax")]).to_string(), "task 2 (`b`): unknown method `lorax`"),
        ("full.json", json!([lm("a", "full")]).to_string(), "task 1 (`a`): method full: full fine-tuning changes the base"),
        (
            "missing.json",
            json!([{"name": "a", "method": "lora", "task": "lm", "train": "nope.jsonl"}]).to_string(),
            "task 1 (`a`): train file",
        ),
        (
            "typo.json",
            json!([{"name": "a", "method": "lora", "lora_rank": 2, "task": "lm", "train": "lm.jsonl"}]).to_string(),
            "task 1 (`a`): unknown field `lora_rank`",
        ),
        (
            "unused.json",
            json!([{"name": "a", "method": "prompt", "lora_r": 2, "task": "lm", "train": "lm.jsonl"}]).to_string(),
            "task 1 (`a`): --lora-r applies to lora only",
        ),
        ("name.json", json!([lm("../x", "lora")]).to_string(), "name \"../x\""),
        (
            "folder.json",
            json!([{"name": "a", "method": "lora", "task": "lm", "train": "."}]).to_string(),
            "task 1 (`a`): train file ",
        ),
        (
            "nolabels.json",
            json!([{"name": "a", "method": "prompt", "train": "cls.jsonl", "labels": []}]).to_string(),
            "task 1 (`a`): labels is an empty list: list at least 2 labels",
        ),
        (
            "onelabel.json",
            json!([{"name": "a", "method": "prompt", "train": "cls.jsonl", "labels": ["cat"]}]).to_string(),
            "task 1 (`a`): labels lists one label (cat): list at least 2",
        ),
        (
            "twice.json",
            r#"[{"name": "a", "method": "lora", "task": "lm", "train": "lm.jsonl", "lr": 0.1, "lr": 0.2}]"#.into(),
            "task 1 (`a`): the key `lr` is given twice",
        ),
        // A byte-order mark is skipped: the file reads as JSON (and fails on its second task).
        ("bom.json", format!("\u{feff}{}", json!([lm("a", "lora"), lm("b", "lorax")])), "task 2 (`b`): unknown method"),
        (
            "labels.json",
            json!([{"name": "a", "method": "prompt", "train": "cls.jsonl", "labels": ["cat", "other"], "verbalizers": ["x"]}])
                .to_string(),
            "task `a`: 1 verbalizer words for 2 labels",
        ),
        (
            "notinlabels.json",
            json!([{"name": "a", "method": "prompt", "train": "cls.jsonl", "labels": ["cat", "dog"]}]).to_string(),
            "task `a`:",
        ),
    ];
    for (file, text, needle) in &cases {
        let p = d.join(file);
        std::fs::write(&p, text).unwrap();
        let o = tuna(&tasks_args("llama", &p, &out, 2, &[]));
        let err = fails(&o, needle);
        assert!(err.contains(file), "{file}: the error does not name the file: {err}");
        if *file == "folder.json" {
            assert!(err.contains("a directory; give the data file") && !err.contains("no such file"), "{err}");
        }
        // Bad data keeps its exit code inside a task (2), as in a single run.
        let want = if *file == "notinlabels.json" { 2 } else { 1 };
        assert_eq!(o.status.code(), Some(want), "{file}: {err}");
    }
    let good = d.join("tasks.json");
    fails(&tuna(&tasks_args("llama", &good, &out, 2, &["--train", "lm.jsonl"])), "--train is set per task");
    fails(&tuna(&tasks_args("llama", &good, &out, 2, &["--lora-r", "3"])), "--lora-r applies to lora only");
    // Run-wide flags are named as such, not blamed on the first task.
    let err = fails(&tuna(&set(tasks_args("llama", &good, &out, 2, &[]), "--eval-every", "0")), "--eval-every 0");
    assert!(!err.contains("task 1"), "{err}");
    // A file where a task's adapter goes is refused before training, not after.
    std::fs::create_dir_all(out.join("adapters")).unwrap();
    std::fs::write(out.join("adapters/story"), "x").unwrap();
    fails(&tuna(&tasks_args("llama", &good, &out, 2, &[])), "exists and is not a folder");
    std::fs::remove_dir_all(out.join("adapters")).unwrap();
    let ckpt = ["--checkpoint-activations", "every"];
    fails(&tuna(&tasks_args("llama", &good, &out, 2, &ckpt)), "--checkpoint-activations is not supported with --tasks");
    fails(&tuna(&tasks_args("llama", &d.join("none.json"), &out, 2, &[])), "none.json");
    assert!(existing_run(&out).is_empty(), "a refused run wrote {:?}", existing_run(&out));
}

fn existing_run(out: &Path) -> Vec<&'static str> {
    tuna::trainer::existing_run(out)
}

#[test]
fn micro_batches_train_as_the_full_batch() {
    let d = tmp("tasks-micro");
    let tasks = three_tasks(&d);
    let (a, b) = (d.join("a"), d.join("b"));
    ok(&tuna(&tasks_args("llama", &tasks, &a, 4, &[])));
    ok(&tuna(&tasks_args("llama", &tasks, &b, 4, &["--micro-batch", "2"])));
    let (sa, sb) = (summary(&a), summary(&b));
    for k in 0..3 {
        for key in ["final_train_loss", "eval_loss"] {
            let (x, y) = (sa["tasks"][k][key].as_f64().unwrap(), sb["tasks"][k][key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "task {k} {key}: {x} vs {y} with micro-batches");
        }
    }
}

#[test]
fn overwrite_replaces_the_task_adapters_and_keeps_other_files() {
    let d = tmp("tasks-overwrite");
    let tasks = three_tasks(&d);
    let out = d.join("run");
    ok(&tuna(&tasks_args("llama", &tasks, &out, 2, &[])));
    std::fs::write(out.join("adapters/notes.txt"), "mine").unwrap();
    std::fs::write(out.join("adapters/story/mine.txt"), "mine").unwrap();
    fails(&tuna(&tasks_args("llama", &tasks, &out, 2, &[])), "already holds a run");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&tasks).unwrap()).unwrap();
    v.as_array_mut().unwrap().truncate(2);
    let two = write_tasks(&d, "two.json", &v);
    ok(&tuna(&tasks_args("llama", &two, &out, 2, &["--overwrite"])));
    assert!(!out.join("adapters/finish").exists(), "the dropped task's adapter stayed");
    assert!(out.join("adapters/sentiment/adapter_config.json").is_file());
    assert_eq!(std::fs::read_to_string(out.join("adapters/notes.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(out.join("adapters/story/mine.txt")).unwrap(), "mine");
}

/// The f32 values of every tensor in a safetensors file (all F32).
fn f32_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let index: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, t) in index.as_object().unwrap().iter().filter(|(n, _)| *n != "__metadata__") {
        assert_eq!(t["dtype"], "F32", "{}: {name}", path.display());
        let (a, b) = (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
        out.push((
            name.clone(),
            data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        ));
    }
    out
}

/// `tuna train --tasks --precision bf16` (CUDA): the three tasks train together in bf16 mixed
/// precision, each task's losses near the f32 run's; the summary says bf16; every task's exported
/// adapter holds its f32 masters (values bf16 cannot hold); a run stopped at step 3 and resumed
/// gives the uninterrupted losses and adapters exactly; an f32 resume is refused naming the flag.
/// Skips by name without a CUDA device.
#[test]
fn multi_task_training_in_bf16_follows_f32_and_exports_masters() {
    if tuna_kernels::testing::cuda_or_skip("cli_tasks::multi_task_training_in_bf16_follows_f32_and_exports_masters")
        .is_none()
    {
        return;
    }
    let d = tmp("tasks-bf16");
    let tasks = three_tasks(&d);
    let cuda = ["--device", "cuda", "--precision", "f32"];
    let bf16 = ["--device", "cuda", "--precision", "bf16"];
    let (f, b, r) = (d.join("f32"), d.join("bf16"), d.join("resumed"));
    ok(&tuna(&tasks_args("llama", &tasks, &f, 6, &cuda)));
    ok(&tuna(&tasks_args("llama", &tasks, &b, 6, &bf16)));
    assert_eq!(summary(&b)["precision"], "bf16");
    assert_eq!(summary(&f)["precision"], "f32");
    let (lf, lb) = (lines(&f, "train"), lines(&b, "train"));
    assert_eq!((lf.len(), lb.len()), (6, 6));
    // Each task's difference against its largest f32 loss (a classification loss near 0 makes a
    // per-step relative error meaningless): measured 1.4% (the sentiment task's near-zero losses,
    // bf16 logits), 0.16% for the two generation tasks.
    let mut worst = 0f64;
    for name in ["sentiment", "story", "finish"] {
        let of = |l: &Vec<Value>| -> Vec<Option<f64>> { l.iter().map(|x| x["tasks"][name]["loss"].as_f64()).collect() };
        let (a, c) = (of(&lf), of(&lb));
        let scale = a.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(x.is_some(), y.is_some(), "{name}: the two runs' batches differ");
            if let (Some(x), Some(y)) = (x, y) {
                let e = (x - y).abs() / scale;
                eprintln!("{name}: f32 {x:.4} bf16 {y:.4} ({:.2}% of {scale:.3})", 100.0 * e);
                worst = worst.max(e);
            }
        }
    }
    assert!(worst < 0.04, "bf16 per-task losses {:.2}% from f32's", 100.0 * worst);
    assert!(lf != lb, "--precision bf16 changed nothing");
    for name in ["sentiment", "story", "finish"] {
        let file = b.join("adapters").join(name).join("adapter_model.safetensors");
        let off_grid = f32_tensors(&file).iter().any(|(_, v)| v.iter().any(|&x| half::bf16::from_f32(x).to_f32() != x));
        assert!(off_grid, "{name}: the exported adapter holds only bf16 values");
    }
    ok(&tuna(&tasks_args("llama", &tasks, &r, 3, &bf16)));
    ok(&tuna(&tasks_args("llama", &tasks, &r, 6, &[&bf16[..], &["--resume"]].concat())));
    assert_eq!(train_lines(&r), train_lines(&b), "a resumed bf16 multi-task run");
    for name in ["sentiment", "story", "finish"] {
        let file = |o: &Path| std::fs::read(o.join("adapters").join(name).join("adapter_model.safetensors")).unwrap();
        assert!(file(&r) == file(&b), "{name}: the resumed bf16 run's adapter differs");
    }
    let o = tuna(&tasks_args("llama", &tasks, &r, 8, &["--device", "cuda", "--precision", "f32", "--resume"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--precision was bf16, now f32"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}
