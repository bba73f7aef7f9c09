//! Runs that cannot lose each other's work, through the binary: the output folder's lock, a new run
//! over an old one, exports that never overwrite a model or a folder unasked, resumes onto another
//! base model, pruning past folders that are not checkpoints, labels that read back, lengths checked
//! against the model's positions, a failed write that leaves nothing behind, flags out of range,
//! and a 10 MB line in bounded memory. (The README's error table lists each case.)

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tuna::models::io;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `tuna eval` of `adapter` (on the tiny Llama) over `data`, with `extra` flags.
fn eval_args(adapter: &str, data: &str, extra: &[&str]) -> Vec<String> {
    [s(&["eval", "--model", &fixture("llama"), "--adapter", adapter, "--data", data]), s(extra)].concat()
}

/// Every file under `dir` (relative path, bytes), sorted: a folder's exact state.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    // The lock file holds the PID of the last process that took the lock: not the run's data.
    v.retain(|(p, _)| p != Path::new(".tuna.lock"));
    v.sort();
    v
}

/// Asserts two snapshots are equal, naming the files that differ (not their bytes).
fn same(a: &[(PathBuf, Vec<u8>)], b: &[(PathBuf, Vec<u8>)], what: &str) {
    let names = |v: &[(PathBuf, Vec<u8>)]| v.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: other files");
    for ((p, x), (_, y)) in a.iter().zip(b) {
        assert!(x == y, "{what}: {} changed", p.display());
    }
}

/// A copy of fixture `name` in `dir` with its weights passed through `edit` (and its config through
/// `config`).
fn model_copy(
    dir: &Path,
    name: &str,
    edit: impl Fn(&mut std::collections::BTreeMap<String, io::HostTensor>),
    config: impl Fn(&mut serde_json::Value),
) -> String {
    let src = PathBuf::from(fixture(name));
    let dst = dir.join(format!("{name}-copy"));
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["tokenizer.json", "config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut t = io::read_tensors(&src.join("model.safetensors")).unwrap();
    edit(&mut t);
    let t: Vec<_> = t.into_iter().collect();
    std::fs::write(dst.join("model.safetensors"), io::safetensors_bytes(&t).unwrap()).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    config(&mut c);
    std::fs::write(dst.join("config.json"), c.to_string()).unwrap();
    dst.display().to_string()
}

#[test]
fn a_second_run_on_a_locked_folder_is_refused_naming_the_holder() {
    let d = tmp("lock");
    let train = data(&d, "train.jsonl", 24, false);
    let out = d.join("run");
    let mut first = Command::new(env!("CARGO_BIN_EXE_tuna")).args(train_args(&out, &train, 5000, &[])).spawn().unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |s| s.lines().count()) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "the first run logged no step");
        std::thread::sleep(Duration::from_millis(10));
    }
    let holder = format!("process {}", first.id());
    for extra in [&["--resume"][..], &["--overwrite"], &[]] {
        fails(&tuna(&train_args(&out, &train, 5000, extra)), &holder);
    }
    // An export into the training run's own adapter folder (which the run rewrites when it ends)
    // is refused naming it too, and writes nothing there.
    let adapter = d.join("adapter");
    ok(&tuna(&train_args(&adapter, &train, 1, &[])));
    let into = out.join("adapter");
    let export = |to: &Path| {
        let v = ["export", "--model", &fixture("llama"), "--adapter", &adapter.join("adapter").display().to_string()];
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.extend(["--out".to_string(), to.display().to_string(), "--overwrite".to_string()]);
        tuna(&v)
    };
    fails(&export(&into), &holder);
    assert!(!into.join("adapter_model.safetensors").exists(), "the refused export wrote into the run");
    first.kill().unwrap();
    first.wait().unwrap();
    // The kill released the lock: the run resumes (for one more step than its newest checkpoint).
    let newest = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .max()
        .expect("a checkpoint");
    let err = ok(&tuna(&train_args(&out, &train, newest + 1, &["--resume-or-start"])));
    assert!(err.contains("resuming from"), "{err}");
    // With the run over, the export may replace its adapter, and leaves no lock file there.
    ok(&export(&into));
    assert!(into.join("adapter_model.safetensors").is_file() && !into.join(".tuna.lock").exists());
}

#[test]
fn a_new_run_over_an_old_one_needs_resume_or_overwrite() {
    let d = tmp("old-run");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    ok(&tuna(&train_args(&out, &train, 6, &[])));
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&out);
    let err = fails(&tuna(&train_args(&out, &train, 2, &[])), "already holds a run");
    assert!(err.contains("--resume") && err.contains("--overwrite"), "{err}");
    same(&snapshot(&out), &before, "the refused run changed the old run");
    // --overwrite replaces the old run's outputs (its higher steps too), and only those.
    ok(&tuna(&train_args(&out, &train, 2, &["--overwrite"])));
    let steps: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(steps.iter().all(|s| s == "step-000001" || s == "step-000002"), "{steps:?}");
    assert_eq!(train_lines(&out).len(), 2);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn export_never_overwrites_the_base_model_or_a_folder_unasked() {
    let d = tmp("export");
    let base = model_copy(&d, "llama", |_| {}, |_| {});
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    let mut a = train_args(&out, &train, 2, &[]);
    a = set(a, "--model", &base);
    ok(&tuna(&a));
    let adapter = out.join("adapter").display().to_string();
    let before = snapshot(Path::new(&base));
    let export = |to: &str, extra: &[&str]| {
        let mut v = s(&["export", "--model", &base, "--adapter", &adapter, "--out", to]);
        v.extend(s(extra));
        tuna(&v)
    };
    fails(&export(&base, &["--merged"]), "the base model's folder");
    fails(&export(&base, &["--merged", "--overwrite"]), "the base model's folder");
    fails(&export(&adapter, &["--overwrite"]), "the adapter's own folder");
    same(&snapshot(Path::new(&base)), &before, "the base model");
    let dest = d.join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("keep.txt"), "x").unwrap();
    fails(&export(&dest.display().to_string(), &["--merged"]), "not empty");
    assert!(!dest.join("model.safetensors").exists());
    ok(&export(&dest.display().to_string(), &["--merged", "--overwrite"]));
    assert!(dest.join("model.safetensors").exists());
    assert_eq!(std::fs::read_to_string(dest.join("keep.txt")).unwrap(), "x");
    // An empty or missing folder needs nothing; the export carries no lock file (the folder
    // itself was locked), only what PEFT reads and the task file.
    let fresh = d.join("fresh");
    ok(&export(&fresh.display().to_string(), &[]));
    assert!(!fresh.join(".tuna.lock").exists());
    assert!(!dest.join(".tuna.lock").exists());
    // A refused export (the "adapter" is a model folder: found only once loading) leaves no
    // folder it made.
    let none = d.join("never");
    let a = s(&["export", "--model", &base, "--adapter", &base, "--out", &none.display().to_string()]);
    fails(&tuna(&a), "adapter_config.json");
    assert!(!none.exists(), "a refused export left {}", none.display());
}

/// `tuna export --overwrite` into a folder leaves exactly one export there: a killed export's
/// temporary files (its own names, its process gone) are removed, and so are the files of an
/// earlier export of the other kind (merged model <-> PEFT adapter); the user's files stay.
#[test]
fn an_export_overwrite_leaves_one_export_and_no_killed_exports_temps() {
    let d = tmp("export-switch");
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("run");
    ok(&tuna(&train_args(&out, &train, 2, &[])));
    let adapter = out.join("adapter").display().to_string();
    let dest = d.join("dest");
    let export = |extra: &[&str]| {
        let mut v = s(&["export", "--model", &fixture("llama"), "--adapter", &adapter, "--out"]);
        v.push(dest.display().to_string());
        v.extend(s(extra));
        ok(&tuna(&v));
    };
    let names = || {
        let mut v: Vec<String> =
            std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    export(&["--merged"]);
    let merged = names();
    assert!(merged.contains(&"model.safetensors".to_string()) && merged.contains(&"config.json".to_string()));
    // What a killed export leaves (a PID no process has), beside the user's own files.
    let dead = 999_999_999;
    let stale = [format!(".model.safetensors.tmp-{dead}"), format!(".tmp-export-{dead}")];
    std::fs::write(dest.join(&stale[0]), "half a model").unwrap();
    std::fs::create_dir_all(dest.join(&stale[1])).unwrap();
    std::fs::write(dest.join(&stale[1]).join("adapter_config.json"), "{}").unwrap();
    let mine = ["notes.txt".to_string(), format!(".notes.txt.tmp-{dead}")];
    for f in &mine {
        std::fs::write(dest.join(f), "mine").unwrap();
    }
    // Merged -> PEFT: no model weights, config or tokenizer files left to be read as a model.
    export(&["--overwrite"]);
    let mut want = s(&["adapter_config.json", "adapter_model.safetensors", "tuna_base.json", "tuna_task.json"]);
    want.extend(mine.iter().cloned());
    want.sort();
    assert_eq!(names(), want);
    // PEFT -> merged: no adapter files left.
    export(&["--merged", "--overwrite"]);
    let mut want = [merged, mine.to_vec()].concat();
    want.sort();
    assert_eq!(names(), want);
    for f in &mine {
        assert_eq!(std::fs::read_to_string(dest.join(f)).unwrap(), "mine");
    }
}

#[test]
fn resuming_onto_another_base_model_is_refused_saying_what_differs() {
    let d = tmp("other-base");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    let base = model_copy(&d, "llama", |_| {}, |_| {});
    ok(&tuna(&set(train_args(&out, &train, 3, &[]), "--model", &base)));
    let negated = model_copy(
        &d.join("neg"),
        "llama",
        |t| t.values_mut().for_each(|(_, v)| v.iter_mut().for_each(|x| *x = -*x)),
        |_| {},
    );
    let one_layer = model_copy(
        &d.join("one"),
        "llama",
        |t| t.retain(|n, _| !n.starts_with("model.layers.1.")),
        |c| c["num_hidden_layers"] = 1.into(),
    );
    let resume = |model: &str| tuna(&set(train_args(&out, &train, 6, &["--resume"]), "--model", model));
    fails(&resume(&negated), "other weight values");
    // One tensor changed by 1% is caught too (every tensor is sampled).
    let scaled = model_copy(
        &d.join("scaled"),
        "llama",
        |t| t.get_mut("model.layers.1.mlp.down_proj.weight").unwrap().1.iter_mut().for_each(|x| *x *= 1.01),
        |_| {},
    );
    fails(&resume(&scaled), "other weight values");
    fails(&resume(&one_layer), "it had 2 layers");
    fails(&resume(&fixture("gpt2")), "it was a llama model, this one is gpt2");
    // The same base with fewer LoRA targets would drop the others' trained tensors.
    let fewer =
        [set(train_args(&out, &train, 6, &["--resume"]), "--model", &base), s(&["--lora-targets", "q_proj"])].concat();
    fails(&tuna(&fewer), "--method and its settings was");
    let err = ok(&resume(&base));
    assert!(err.contains("resuming from"), "{err}");
}

#[test]
fn pruning_and_resume_count_only_valid_checkpoints() {
    let d = tmp("prune");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    // --resume with nothing to resume is an error; --resume-or-start starts.
    fails(&tuna(&train_args(&out, &train, 2, &["--resume"])), "nothing to resume");
    ok(&tuna(&train_args(&out, &train, 2, &["--resume-or-start"])));
    std::fs::create_dir_all(out.join("checkpoints/step-000099")).unwrap();
    let err = ok(&tuna(&set(train_args(&out, &train, 4, &["--resume"]), "--keep-last", "1")));
    assert!(err.contains("step 2"), "resumed from the valid step 2: {err}");
    assert!(out.join("checkpoints/step-000004/manifest.json").exists(), "the valid newest survives pruning");
    assert!(out.join("checkpoints/step-000099").exists(), "the stray folder is left for the user");
    // Every checkpoint corrupt: --resume refuses instead of silently starting over.
    for e in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let _ = std::fs::remove_file(e.unwrap().path().join("manifest.json"));
    }
    let log = std::fs::read(out.join("metrics.jsonl")).unwrap();
    fails(&tuna(&train_args(&out, &train, 6, &["--resume"])), "nothing to resume");
    fails(&tuna(&train_args(&out, &train, 6, &["--resume-or-start"])), "--overwrite starts anew");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), log, "the log was rewritten");
}

#[test]
fn labels_with_commas_and_spaces_read_back_and_eval_refuses_another_order() {
    let d = tmp("labels");
    let train = d.join("train.jsonl");
    let rows: Vec<String> = (0..8)
        .map(|i| {
            let label = if i % 2 == 0 { "good, really" } else { " meh " };
            format!("{{\"text\": \"{}\", \"label\": \"{label}\"}}", SENTENCES[i % SENTENCES.len()])
        })
        .collect();
    std::fs::write(&train, rows.join("\n")).unwrap();
    let train = train.display().to_string();
    let out = d.join("run");
    let mut a = train_args(&out, &train, 2, &["--verbalizers", "cat,other"]);
    a = set(a, "--task", "classify");
    ok(&tuna(&a));
    let adapter = out.join("adapter").display().to_string();
    let eval = |extra: &[&str]| {
        let mut v = s(&["eval", "--model", &fixture("llama"), "--adapter", &adapter, "--data", &train]);
        v.extend(s(extra));
        tuna(&v)
    };
    ok(&eval(&[]));
    // The classes sorted are " meh " then "good, really"; a reversed --labels would swap them.
    let cls = d.join("cls.jsonl");
    std::fs::write(&cls, "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n").unwrap();
    let mut b = train_args(&d.join("run2"), &cls.display().to_string(), 1, &["--verbalizers", "cat,other"]);
    b = set(b, "--task", "classify");
    ok(&tuna(&b));
    let adapter2 = d.join("run2/adapter").display().to_string();
    let o = tuna(&eval_args(&adapter2, &cls.display().to_string(), &["--labels", "y,x"]));
    fails(&o, "--labels y,x disagrees with training's x,y");
}

#[test]
fn lengths_are_checked_against_the_positions_before_the_first_step() {
    let d = tmp("lengths");
    let long: String = (0..200).map(|i| SENTENCES[i % SENTENCES.len()]).collect::<Vec<_>>().join(" ");
    let train = d.join("train.jsonl");
    std::fs::write(&train, format!("{{\"text\": \"short one\"}}\n{{\"text\": \"{long}\"}}\n")).unwrap();
    let train = train.display().to_string();
    for model in ["gpt2", "llama"] {
        let out = d.join(model);
        let a = set(set(train_args(&out, &train, 4, &[]), "--model", &fixture(model)), "--batch-size", "1");
        let a = set(a, "--micro-batch", "1");
        // The default --max-len fits the 64 positions, so the long example trains.
        ok(&tuna(&a));
        // An explicit one that does not is refused before any step (nothing logged).
        let bad =
            set(set(a.clone(), "--max-len", "128"), "--out", &d.join(format!("{model}-bad")).display().to_string());
        fails(&tuna(&bad), "--max-len 128 exceeds the model's 64 positions: use --max-len 64 or less");
        assert!(!d.join(format!("{model}-bad/metrics.jsonl")).exists());
    }
    // Prompt tuning's virtual tokens count, and absurd counts fail at once.
    let out = d.join("prompt");
    let a = set(train_args(&out, &train, 2, &["--max-len", "50"]), "--method", "prompt");
    fails(&tuna(&a), "--max-len 50 + 20 virtual tokens exceeds the model's 64 positions: use --max-len 44 or less");
    let t0 = Instant::now();
    fails(&tuna(&set(a, "--virtual-tokens", "100000")), "100000 virtual tokens leave 0 of the model's 64 positions");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// `tuna` under a file-size limit of `kib` KiB (SIGXFSZ ignored, so a write past it fails with EFBIG,
/// as on a full disk).
fn tuna_limited(kib: u64, args: &[String]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_tuna"))
        .args(args)
        .output()
        .unwrap()
}

/// Names in `dir` (recursively) that are temporary files or folders.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(".tmp") {
            v.push(p.display().to_string());
        }
        if p.is_dir() {
            v.extend(leftovers(&p));
        }
    }
    v
}

#[test]
fn a_write_that_fails_midway_leaves_no_temporary_files_and_the_last_checkpoint() {
    let d = tmp("full-disk");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    // Full fine-tuning: a checkpoint (weights + two moments) is ~230 KB, the log ~1.5 KB.
    let a = set(train_args(&out, &train, 12, &[]), "--method", "full");
    ok(&tuna(&a));
    let a = set(a, "--steps", "14");
    // The checkpoint cannot be written; the log rewrite can.
    let err = fails(&tuna_limited(64, &[a.clone(), s(&["--resume"])].concat()), "File too large");
    assert!(leftovers(&out).is_empty(), "{:?} after: {err}", leftovers(&out));
    // Not even the log's rewrite fits (1 KiB): still nothing left behind.
    assert!(std::fs::metadata(out.join("metrics.jsonl")).unwrap().len() > 1024);
    fails(&tuna_limited(1, &[a.clone(), s(&["--resume"])].concat()), "File too large");
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    // The last good checkpoint resumes.
    let err = ok(&tuna(&[a, s(&["--resume"])].concat()));
    assert!(err.contains("step 12"), "{err}");
}

#[test]
fn flags_out_of_range_are_refused_by_name_before_anything_is_written() {
    let d = tmp("flags");
    let train = data(&d, "train.jsonl", 8, true);
    let out = d.join("run");
    let cls = set(train_args(&out, &train, 2, &[]), "--task", "classify");
    let cases: [(&[(&str, &str)], &str); 28] = [
        (&[("--lora-dropout", "2")], "--lora-dropout 2"),
        // 1 as the f32 dropout runs in: refused, echoed as written (not as `1`).
        (&[("--lora-dropout", "0.99999999999")], "--lora-dropout 0.99999999999: expected 0 <= p < 1"),
        (&[("--clip", "NaN")], "--clip NaN"),
        (&[("--clip", "-1")], "--clip -1"),
        (&[("--weight-decay", "-5")], "--weight-decay -5"),
        (&[("--micro-batch", "0")], "--micro-batch 0"),
        (&[("--micro-batch", "5")], "--micro-batch 5: expected 1 to --batch-size (4)"),
        (&[("--verbalizers", "The,")], "--verbalizers \"The,\": entry 2 is empty"),
        (&[("--method", "prompt"), ("--prompt-init", "text")], "--prompt-init text needs --prompt-init-text"),
        (&[("--eval-every", "0")], "--eval-every 0"),
        (&[("--save-every", "0")], "--save-every 0"),
        (&[("--method", "prefix-mlp"), ("--prefix-hidden", "0")], "--prefix-hidden 0: expected at least 1"),
        (&[("--method", "ptuning"), ("--ptuning-hidden", "0")], "--ptuning-hidden 0: expected at least 1"),
        (&[("--method", "ptuning"), ("--ptuning-encoder", "gru")], "--ptuning-encoder gru: expected mlp or lstm"),
        (&[("--ptuning-encoder", "lstm")], "--ptuning-encoder applies to ptuning only; --method lora would ignore it"),
        (&[("--lr", "-1")], "--lr -1: expected"),
        (&[("--lr", "0")], "--lr 0: expected a positive number"),
        (&[("--tf32", "")], "--tf32 applies to CUDA's matrix products; --device cpu has no TF32"),
        (&[("--clip", "1e-300")], "--clip 1e-300: expected 0 (off) or a positive norm"),
        (&[("--lora-alpha", "1e-300")], "--lora-alpha 1e-300: expected 0 < alpha <= 1e6"),
        (&[("--weight-decay", "-1e-300")], "--weight-decay -1e-300: expected 0 or more"),
        (&[("--min-lr-ratio", "2")], "--min-lr-ratio 2"),
        (&[("--lr", "1e-300")], "--lr 1e-300: expected a positive number from 1.4e-45"),
        (&[("--holdout", "2"), ("--max-eval-examples", "3")], "--holdout 2 evaluates on the last 2 training examples"),
        // A method flag the method does not use would do nothing.
        (&[("--bottleneck", "8")], "--bottleneck applies to houlsby only; --method lora would ignore it"),
        (&[("--prefix-init", "labels")], "--prefix-init applies to prefix, prefix-mlp, ptuning-v2 only"),
        // Settings that a run would refuse only after loading the model are refused up front.
        (
            &[("--method", "prefix-mlp"), ("--prefix-hidden", "4"), ("--virtual-tokens", "8")],
            "--prefix-hidden 4 must be at least the 8 virtual tokens",
        ),
        (&[("--method", "prompt"), ("--prompt-init", "labels"), ("--task", "lm")], "it needs --task classify (not lm)"),
    ];
    for (flags, needle) in cases {
        // A negative value is given as `--flag=-1` (clap reads a separate `-1` as a flag); an
        // empty one is a switch given alone.
        let a = flags.iter().fold(cls.clone(), |a, (f, v)| {
            if v.is_empty() {
                [a, vec![f.to_string()]].concat()
            } else if v.starts_with('-') {
                let mut a = a;
                if let Some(i) = a.iter().position(|x| x == f) {
                    a.drain(i..i + 2);
                }
                [a, vec![format!("{f}={v}")]].concat()
            } else {
                set(a, f, v)
            }
        });
        fails(&tuna(&a), needle);
        assert!(!out.exists(), "{needle}: the refused run wrote {}", out.display());
    }
    // One class is no classification task.
    let one = d.join("one.jsonl");
    std::fs::write(&one, "{\"text\": \"a cat\", \"label\": \"cat\"}\n{\"text\": \"the cat\", \"label\": \"cat\"}\n")
        .unwrap();
    fails(&tuna(&set(cls.clone(), "--train", &one.display().to_string())), "at least 2 classes");
    // Numeric labels whose words share a first token name both words and the token.
    let nums = d.join("nums.jsonl");
    std::fs::write(&nums, "{\"text\": \"a cat\", \"label\": \"10\"}\n{\"text\": \"a dog\", \"label\": \"11\"}\n")
        .unwrap();
    let o = tuna(&set(cls.clone(), "--train", &nums.display().to_string()));
    fails(&o, "verbalizers `10` and `11` both start with token");
    // An OS error says its reason once.
    let err = fails(&tuna(&set(cls.clone(), "--train", "/no/such/file.jsonl")), "/no/such/file.jsonl");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // Sampling flags.
    let g = |f: &str, v: &str| {
        let base = s(&["generate", "--model", &fixture("llama"), "--prompt", "The cat", "--max-new-tokens", "2"]);
        tuna(&set(base, f, v))
    };
    fails(&g("--top-p", "1.5"), "top_p must be in (0, 1], got 1.5");
    fails(&g("--temperature", "0"), "temperature must be positive");
    fails(&g("--top-k", "0"), "top_k must be at least 1");
    // Sizes that would overflow or exhaust memory are refused, not panics or aborts.
    let huge = u64::MAX.to_string();
    fails(&tuna(&set(cls.clone(), "--batch-size", &huge)), "--batch-size");
    fails(&tuna(&set(cls.clone(), "--lora-r", "1000000000")), "--lora-r 1000000000: at most");
    fails(&g("--max-new-tokens", &huge), "exceeds the model's 64 positions");
    // `tuna profile` takes train's flags: the same command line with its own verb.
    let prof = [s(&["profile"]), cls[1..].to_vec(), s(&["--warmup-steps", &huge])].concat();
    fails(&tuna(&prof), "--warmup-steps");
    // A loss needs two tokens: lm with one is refused, not trained at loss 0.
    let lm = set(cls.clone(), "--task", "lm");
    fails(&tuna(&set(lm.clone(), "--max-len", "1")), "--max-len 1: the task needs at least 2 tokens");
    let p = set(set(lm, "--method", "prefix"), "--virtual-tokens", "63");
    fails(&tuna(&p), "63 virtual tokens leave 1 of the model's 64 positions");
}

#[test]
fn a_10_mb_single_line_trains_in_bounded_memory() {
    let d = tmp("long-line");
    let line: String = SENTENCES.iter().cycle().take(500_000).copied().collect::<Vec<_>>().join(" ");
    assert!(line.len() > 10_000_000);
    let train = d.join("train.jsonl");
    std::fs::write(&train, format!("{{\"text\": \"{line}\"}}\n{{\"text\": \"{}\"}}\n", SENTENCES[0])).unwrap();
    let out = d.join("run");
    let a = set(set(train_args(&out, &train.display().to_string(), 1, &[]), "--max-len", "32"), "--batch-size", "2");
    ok(&tuna(&set(a, "--micro-batch", "2")));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let peak = summary["peak_rss_bytes"].as_u64().unwrap();
    // Tokenizing the whole line took ~1.5 GiB; the window keeps the process near the data's size.
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);
}

#[test]
fn overwrite_deletes_only_what_tuna_wrote_and_only_after_the_new_inputs_load() {
    let d = tmp("overwrite");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    ok(&tuna(&train_args(&out, &train, 3, &[])));
    std::fs::write(out.join("adapter/README.md"), "my notes").unwrap();
    std::fs::create_dir_all(out.join("checkpoints/my-best")).unwrap();
    std::fs::write(out.join("checkpoints/my-best/keep"), "k").unwrap();
    let before = snapshot(&out);
    // A new run whose data fails to load deletes nothing.
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{not json\n").unwrap();
    fails(&tuna(&train_args(&out, &bad.display().to_string(), 3, &["--overwrite"])), "bad.jsonl");
    same(&snapshot(&out), &before, "a failed --overwrite");
    // A model inside what the run writes is refused, not deleted.
    let inside = out.join("model");
    std::fs::create_dir_all(&inside).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(Path::new(&fixture("llama")).join(f), inside.join(f)).unwrap();
    }
    let a = set(train_args(&out, &train, 3, &["--overwrite"]), "--model", &inside.display().to_string());
    fails(&tuna(&a), "which this run writes");
    assert!(inside.join("model.safetensors").exists());
    std::fs::remove_dir_all(&inside).unwrap();
    ok(&tuna(&train_args(&out, &train, 2, &["--overwrite"])));
    assert_eq!(std::fs::read_to_string(out.join("adapter/README.md")).unwrap(), "my notes");
    assert_eq!(std::fs::read_to_string(out.join("checkpoints/my-best/keep")).unwrap(), "k");
    assert!(!out.join("checkpoints/step-000003").exists(), "the old run's checkpoints went");
}

#[test]
fn unsafe_output_folders_and_lock_links_are_refused() {
    let d = tmp("unsafe-out");
    let train = data(&d, "train.jsonl", 8, false);
    let file = d.join("afile");
    std::fs::write(&file, "x").unwrap();
    fails(&tuna(&train_args(&file, &train, 2, &[])), "not a folder");
    let model = model_copy(&d, "llama", |_| {}, |_| {});
    fails(&tuna(&train_args(Path::new(&model), &train, 2, &[])), "a model's folder");
    let victim = d.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let out = d.join("linked");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join(".tuna.lock")).unwrap();
    fails(&tuna(&train_args(&out, &train, 2, &[])), "not a plain file");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let run = d.join("run");
    ok(&tuna(&train_args(&run, &train, 2, &[])));
    fails(&tuna(&train_args(&run.join("checkpoints/mine"), &train, 2, &[])), "inside another run's checkpoints/");
}

#[test]
fn a_resume_keeps_the_settings_it_started_with_and_its_own_step() {
    let d = tmp("settings");
    let train = data(&d, "train.jsonl", 12, false);
    let out = d.join("run");
    ok(&tuna(&train_args(&out, &train, 3, &[])));
    let resume = |extra: &[&str]| train_args(&out, &train, 6, &[&["--resume"][..], extra].concat());
    fails(&tuna(&resume(&["--lora-alpha", "64"])), "--method and its settings was");
    fails(&tuna(&set(resume(&[]), "--lr", "0.5")), "--lr was 0.01, now 0.5");
    // A state.json edited to another step (checksums recomputed) is caught by its folder's step.
    let ck = out.join("checkpoints/step-000003");
    let state = std::fs::read_to_string(ck.join("state.json")).unwrap().replacen("\"step\": 3", "\"step\": 2", 1);
    std::fs::write(ck.join("state.json"), &state).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("manifest.json")).unwrap()).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["name"] == "state.json" {
            f["size"] = state.len().into();
            f["fnv1a64"] = format!("{:016x}", tuna::trainer::fnv1a64(state.as_bytes())).into();
        }
    }
    std::fs::write(ck.join("manifest.json"), m.to_string()).unwrap();
    fails(&tuna(&resume(&[])), "state.json says step 2 but the checkpoint is step 3");
}

#[test]
fn eval_takes_the_task_and_verbalizers_training_used() {
    let d = tmp("eval-task");
    let lm = data(&d, "lm.jsonl", 8, false);
    let cls = data(&d, "cls.jsonl", 8, true);
    let out = d.join("lm");
    ok(&tuna(&train_args(&out, &lm, 2, &[])));
    let adapter = out.join("adapter").display().to_string();
    let eval = |data: &str, extra: &[&str]| {
        tuna(&[s(&["eval", "--model", &fixture("llama"), "--adapter", &adapter, "--data", data]), s(extra)].concat())
    };
    let o = eval(&lm, &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"), "{}", String::from_utf8_lossy(&o.stderr));
    fails(&eval(&cls, &["--task", "classify"]), "--task classify: the adapter was trained for lm");
    // Trained without --verbalizers: the verbalizers were the labels, in their order.
    let out = d.join("cls");
    ok(&tuna(&set(train_args(&out, &cls, 2, &["--verbalizers", "cat,other"]), "--task", "classify")));
    let adapter2 = out.join("adapter").display().to_string();
    let o = tuna(&eval_args(&adapter2, &cls, &["--verbalizers", "other,cat"]));
    fails(&o, "--verbalizers other,cat disagrees with training's cat,other");
}

#[test]
fn compare_replaces_an_earlier_comparison_only_when_told() {
    let d = tmp("compare");
    let train = data(&d, "train.jsonl", 8, false);
    let out = d.join("cmp").display().to_string();
    let args = |extra: &[&str]| {
        let base = s(&[
            "compare",
            "--model",
            &fixture("llama"),
            "--task",
            "lm",
            "--train",
            &train,
            "--methods",
            "lora,prompt",
        ]);
        [base, s(&["--steps", "2", "--batch-size", "4", "--quiet", "--out", &out]), s(extra)].concat()
    };
    ok(&tuna(&args(&[])));
    let before = std::fs::read(Path::new(&out).join("lora/metrics.jsonl")).unwrap();
    fails(&tuna(&args(&[])), "already holds a comparison");
    assert_eq!(std::fs::read(Path::new(&out).join("lora/metrics.jsonl")).unwrap(), before);
    ok(&tuna(&args(&["--overwrite"])));
    fails(&tuna(&set(args(&["--overwrite"]), "--methods", "lora,lora")), "`lora` is listed twice");
}

#[test]
fn links_runs_and_checkpoints_are_never_written_through() {
    let d = tmp("links");
    let train = data(&d, "train.jsonl", 12, false);
    let (a, b) = (d.join("a"), d.join("b"));
    ok(&tuna(&train_args(&a, &train, 2, &[])));
    std::fs::create_dir_all(&b).unwrap();
    std::os::unix::fs::symlink(a.join("checkpoints"), b.join("checkpoints")).unwrap();
    let before = snapshot(&a);
    fails(&tuna(&train_args(&b, &train, 2, &["--overwrite"])), "a link; a run writes only into its own folder");
    same(&snapshot(&a), &before, "the linked run");
    // An export never goes into a run's folder or its checkpoints.
    let adapter = a.join("adapter").display().to_string();
    let export = |to: &Path| {
        tuna(&s(&[
            "export",
            "--model",
            &fixture("llama"),
            "--adapter",
            &adapter,
            "--out",
            &to.display().to_string(),
            "--overwrite",
        ]))
    };
    fails(&export(&a.join("checkpoints/step-000002")), "inside a run's checkpoints/");
    fails(&export(&a), "it holds a training run");
    same(&snapshot(&a), &before, "the run after refused exports");
}

#[test]
fn a_resume_may_extend_the_steps_but_not_change_its_evaluation_data() {
    let d = tmp("resume-steps");
    let train = data(&d, "train.jsonl", 12, false);
    let other = data(&d, "other.jsonl", 6, false);
    let out = d.join("run");
    // --warmup defaults to 10 and is cut to the 4 steps: extending to 8 changes both, with a warning.
    let base = |steps: &str| {
        let a = train_args(&out, &train, 4, &[]);
        let i = a.iter().position(|x| x == "--warmup").unwrap();
        let mut a = [&a[..i], &a[i + 2..]].concat();
        a = set(a, "--steps", steps);
        set(a, "--eval", &train)
    };
    ok(&tuna(&base("4")));
    let err = ok(&tuna(&[base("8"), s(&["--resume"])].concat()));
    assert!(err.contains("--steps was 4, now 8") && err.contains("resuming from"), "{err}");
    fails(&tuna(&[base("2"), s(&["--resume"])].concat()), "already at step 8, past --steps 2");
    let err = fails(
        &tuna(&[set(base("8"), "--eval", &other), s(&["--resume"])].concat()),
        "the evaluation data (--eval) changed since the run began",
    );
    assert!(!err.contains("its data) was"), "a hash, not the data: {err}");
    // Other training data: named by its file, not by two hashes.
    let err = fails(
        &tuna(&[set(base("8"), "--train", &other), s(&["--resume"])].concat()),
        &format!("the training data ({other}) changed since the run began"),
    );
    assert!(!err.contains("fingerprint"), "{err}");
    // Absurd counts are refused by name, never an arithmetic panic.
    let huge = set(set(base("8"), "--method", "prompt"), "--virtual-tokens", &u64::MAX.to_string());
    fails(&tuna(&set(huge, "--out", &d.join("huge").display().to_string())), "virtual tokens leave");
}

#[test]
fn compare_checks_every_method_before_the_first_trains_and_gives_each_only_its_flags() {
    let d = tmp("compare-upfront");
    let train = data(&d, "train.jsonl", 8, true);
    let out = d.join("cmp");
    let args = |methods: &str, extra: &[&str]| {
        let base = s(&["compare", "--model", &fixture("llama"), "--task", "classify", "--train", &train]);
        let run = s(&["--methods", methods, "--steps", "2", "--batch-size", "4", "--quiet", "--overwrite", "--out"]);
        [base, run, vec![out.display().to_string()], s(extra)].concat()
    };
    // The second method's settings are refused before the first (lora) trains.
    let cases: [(&str, &[&str], &str); 5] = [
        ("lora,prefix-mlp", &["--prefix-hidden", "4", "--virtual-tokens", "8"], "--prefix-hidden 4 must be at least"),
        ("lora,prompt", &["--task", "lm", "--prompt-init", "labels"], "it needs --task classify"),
        ("lora,prompt", &["--bottleneck", "8"], "--bottleneck applies to houlsby only; --methods lora,prompt"),
        ("lora", &["--sweep-lr", "--sweep-holdout", "8"], "--sweep-holdout 8: "),
        ("lora", &["--sweep-lr", "--sweep-factors", "1,1.005"], "1 and 1.005 are less than 1% apart"),
    ];
    for (methods, extra, needle) in cases {
        let a = extra.chunks(2).fold(args(methods, &[]), |a, kv| match kv {
            [f, v] if !v.starts_with("--") => set(a, f, v),
            _ => [a, kv.iter().map(|x| x.to_string()).collect()].concat(),
        });
        fails(&tuna(&a), needle);
        assert!(!out.join("lora").exists(), "{needle}: lora trained before the refusal");
    }
    // Each method's run gets only the method flags it uses: houlsby's bottleneck, lora's rank.
    ok(&tuna(&args("lora,houlsby", &["--bottleneck", "4", "--lora-r", "2"])));
    let cfg = |m: &str| std::fs::read_to_string(out.join(m).join("adapter/adapter_config.json")).unwrap();
    assert!(cfg("houlsby").contains("\"bottleneck_size\": 4"), "{}", cfg("houlsby"));
    assert!(cfg("lora").contains("\"r\": 2"), "{}", cfg("lora"));
}

#[cfg(target_os = "linux")]
#[test]
fn killing_compare_ends_its_running_method() {
    let d = tmp("compare-kill");
    let train = data(&d, "train.jsonl", 8, true);
    let out = d.join("cmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args(s(&["compare", "--model", &fixture("llama"), "--task", "classify", "--train", &train]))
        .args(s(&["--methods", "lora", "--steps", "100000000", "--batch-size", "4", "--quiet", "--out"]))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the method's run to hold its folder's lock (it is training).
    let lock = out.join("lora").join(".tuna.lock");
    let t0 = std::time::Instant::now();
    while !lock.exists() && t0.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(lock.exists(), "the method's run never started");
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    // The run died with compare: its folder can be taken over at once (a live run would hold the lock).
    let t0 = std::time::Instant::now();
    let again = loop {
        let o = tuna(&train_args(&out.join("lora"), &train, 1, &["--overwrite"]));
        if o.status.success() || t0.elapsed() > std::time::Duration::from_secs(20) {
            break o;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    ok(&again);
}

#[test]
fn a_resume_compares_a_prompts_init_text_but_not_a_prefixs() {
    let d = tmp("init-text");
    let train = data(&d, "train.jsonl", 8, false);
    for (method, flag, resumes) in [("prefix", "--prefix-init", true), ("prompt", "--prompt-init", false)] {
        let out = d.join(method);
        let text = format!("{flag}-text");
        let a = |steps: u64, words: &str, extra: &[&str]| {
            let a = train_args(&out, &train, steps, extra);
            set(set(set(a, "--method", method), flag, "text"), &text, words)
        };
        ok(&tuna(&a(2, "the cat", &[])));
        let o = tuna(&a(3, "a dog", &["--resume"]));
        if resumes {
            // The checkpoint replaces the prefix the text started: nothing to compare.
            ok(&o);
        } else {
            fails(&o, "--prompt-init-text was \"the cat\", now \"a dog\"");
        }
    }
}
