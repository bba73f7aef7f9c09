//! `tuna train --tasks tasks.json`: the tasks file read and checked (each error names the file and
//! the entry), and turned into the trainer's [`MultiConfig`].
//!
//! The file is a JSON list of tasks. Each names its adapter (`name`), its `method` and the method's
//! settings under the `tuna train` flags' names with underscores (`virtual_tokens`, `lora_r`,
//! `lora_targets` as a list, ...), its `task` (default classify), its `train` and optional `eval`
//! data (relative to the tasks file), and optionally `labels`, `verbalizers` (lists), `lr` and the
//! `*_field` names. The run-wide flags (`--model`, `--batch-size`, `--steps`, the schedule, `--out`,
//! ...) apply to all tasks; the per-task flags are refused beside `--tasks`.

use crate::train_cmd::{default_lr, is_decoder, MethodArgs, RunArgs, BASELINE};
use anyhow::{bail, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tuna_trainer::MultiConfig;

/// One entry of the tasks file.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    method: String,
    train: PathBuf,
    #[serde(default)]
    eval: Option<PathBuf>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    labels: Option<Vec<String>>,
    #[serde(default)]
    verbalizers: Option<Vec<String>>,
    #[serde(default)]
    lr: Option<f64>,
    #[serde(default)]
    text_field: Option<String>,
    #[serde(default)]
    prompt_field: Option<String>,
    #[serde(default)]
    completion_field: Option<String>,
    #[serde(default)]
    label_field: Option<String>,
    #[serde(default)]
    virtual_tokens: Option<usize>,
    #[serde(default)]
    prompt_init: Option<String>,
    #[serde(default)]
    prompt_init_text: Option<String>,
    #[serde(default)]
    prefix_init: Option<String>,
    #[serde(default)]
    prefix_init_text: Option<String>,
    #[serde(default)]
    prefix_hidden: Option<usize>,
    #[serde(default)]
    ptuning_encoder: Option<String>,
    #[serde(default)]
    ptuning_hidden: Option<usize>,
    #[serde(default)]
    bottleneck: Option<usize>,
    #[serde(default)]
    lora_r: Option<usize>,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    lora_dropout: Option<f64>,
    #[serde(default)]
    lora_targets: Option<Vec<String>>,
}

/// A JSON value, read for the first key that one of its objects (at any depth) gives twice.
struct Unique(Option<String>);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Unique;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Unique, E> {
                Ok(Unique(None))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Unique, E> {
                Ok(Unique(None))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Unique, E> {
                Ok(Unique(None))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Unique, E> {
                Ok(Unique(None))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Unique, E> {
                Ok(Unique(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<Unique, E> {
                Ok(Unique(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Unique, A::Error> {
                let mut first = None;
                while let Some(Unique(k)) = a.next_element()? {
                    first = first.or(k);
                }
                Ok(Unique(first))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> std::result::Result<Unique, A::Error> {
                let (mut keys, mut first) = (std::collections::HashSet::new(), None);
                while let Some(k) = a.next_key::<String>()? {
                    let Unique(inner) = a.next_value()?;
                    if first.is_none() && keys.contains(&k) {
                        first = Some(k);
                    } else {
                        first = first.or(inner);
                        keys.insert(k);
                    }
                }
                Ok(Unique(first))
            }
        }
        d.deserialize_any(V)
    }
}

/// The flags that are per task in a tasks file (refused beside `--tasks`: they would be ignored).
pub const PER_TASK_FLAGS: &[&str] = &[
    "--method",
    "--task",
    "--train",
    "--eval",
    "--labels",
    "--verbalizers",
    "--lr",
    "--text-field",
    "--prompt-field",
    "--completion-field",
    "--label-field",
    "--holdout",
];

/// A per-task flag among `args` (the command line after `train`), refused beside `--tasks`. Method
/// flags (`--lora-r`, ...) are caught by [`MethodArgs::check_used`] with no method.
pub fn check_no_task_flags(args: &[String]) -> Result<()> {
    for a in args {
        let flag = a.split('=').next().unwrap_or(a);
        if PER_TASK_FLAGS.contains(&flag) {
            bail!("{flag} is set per task in the tasks file; with --tasks, give it there (drop it here)");
        }
    }
    Ok(())
}

/// A task name: an adapter's and a folder's (`adapters/<name>/`), so 1 to 64 of
/// `[A-Za-z0-9._-]`, not starting with a dot, and not `base` (the server's name for no adapter).
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name != crate::serve::adapters::BASE
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        bail!("name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot, and not `base`)");
    }
    Ok(())
}

/// Read and check `file`; the run-wide settings from `run` (its per-task flags unset).
pub fn multi_config(file: &Path, run: &RunArgs) -> Result<MultiConfig> {
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("--tasks {}: {e}", file.display()))?;
    // A byte-order mark (some editors write one) is not JSON: skipped, as in the data files.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let list: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!("{}: not a JSON list of tasks ({e}); see the README, \"Multi-task training\"", file.display())
    })?;
    // A key given twice in a task would keep only its last value, silently: found here (the
    // parsed list has lost it), task by task.
    let repeated: Vec<Unique> = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if list.is_empty() {
        bail!("{}: the list of tasks is empty", file.display());
    }
    let model = run.model.clone().ok_or_else(|| anyhow::anyhow!("--model is required"))?;
    if run.checkpoint_activations != tuna_models::checkpointing::Checkpointing::Off {
        // Mixed-adapter forwards keep every activation: refused rather than silently ignored.
        bail!(
            "--checkpoint-activations is not supported with --tasks yet (mixed-adapter batches keep every activation)"
        );
    }
    if run.update_in_backward {
        bail!("--update-in-backward is not supported with --tasks (one optimizer per task steps after the backward)");
    }
    // The run-wide flags first, so that their errors name the flag, not the first task.
    run.check_ranges(run.lr.unwrap_or(1e-3))?;
    let decoder = is_decoder(&model);
    let base = file.parent().unwrap_or(Path::new("."));
    let mut tasks: Vec<(String, tuna_trainer::TrainConfig)> = Vec::new();
    for (i, v) in list.into_iter().enumerate() {
        let label = v
            .get("name")
            .and_then(|n| n.as_str())
            .map_or(format!("task {}", i + 1), |n| format!("task {} (`{n}`)", i + 1));
        let at = |e: anyhow::Error| anyhow::anyhow!("{}: {label}: {}", file.display(), crate::cli::error_chain(&e));
        if let Some(k) = repeated.get(i).and_then(|u| u.0.as_ref()) {
            return Err(at(anyhow::anyhow!("the key `{k}` is given twice (only one value can count): give it once")));
        }
        let e: Entry = serde_json::from_value(v).map_err(|e| at(e.into()))?;
        check_name(&e.name).map_err(at)?;
        if let Some(j) = tasks.iter().position(|(n, _)| *n == e.name) {
            bail!(
                "{}: tasks {} and {} are both named `{}`: each task needs its own name",
                file.display(),
                j + 1,
                i + 1,
                e.name
            );
        }
        let cfg = task_config(&e, base, run, decoder).map_err(at)?;
        // Its export folder must be creatable: found now, not after the training.
        let dest = run.out.join("adapters").join(&e.name);
        if dest.exists() && !dest.is_dir() {
            return Err(at(anyhow::anyhow!(
                "{} exists and is not a folder: the task's adapter is written there (move it away)",
                dest.display()
            )));
        }
        tasks.push((e.name, cfg));
    }
    Ok(MultiConfig { tasks_file: file.to_path_buf(), tasks })
}

/// One entry's settings: the method checked as `tuna train` checks its flags, the data paths
/// made relative to the tasks file and checked to exist.
fn task_config(e: &Entry, base: &Path, run: &RunArgs, decoder: bool) -> Result<tuna_trainer::TrainConfig> {
    match e.method.as_str() {
        "full" => bail!(
            "method full: full fine-tuning changes the base model the other tasks share, so it cannot be one task \
             of several; train it alone (tuna train --method full)"
        ),
        BASELINE => bail!("method {BASELINE} trains nothing; run it alone (tuna train --method {BASELINE})"),
        _ => {}
    }
    let m = MethodArgs {
        virtual_tokens: e.virtual_tokens,
        prompt_init: e.prompt_init.clone(),
        prompt_init_text: e.prompt_init_text.clone(),
        prefix_init: e.prefix_init.clone(),
        prefix_init_text: e.prefix_init_text.clone(),
        prefix_hidden: e.prefix_hidden,
        ptuning_encoder: e.ptuning_encoder.clone(),
        ptuning_hidden: e.ptuning_hidden,
        bottleneck: e.bottleneck,
        lora_r: e.lora_r,
        lora_alpha: e.lora_alpha,
        lora_dropout: e.lora_dropout,
        lora_targets: e.lora_targets.as_ref().map(|t| t.join(",")),
        train_patterns: None,
        template: None,
        shots: None,
    };
    let task = e.task.clone().unwrap_or_else(|| "classify".into());
    m.check_used("method", std::slice::from_ref(&e.method))?;
    let method = m.method(&e.method)?;
    m.check_for_task(&e.method, &task)?;
    if task != "classify" && (e.labels.is_some() || e.verbalizers.is_some()) {
        bail!("labels and verbalizers are for classify tasks (this one is {task})");
    }
    let data = |p: &Path, what: &str| -> Result<PathBuf> {
        let p = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        if p.is_dir() {
            bail!("{what} file {}: a directory; give the data file (.jsonl or .csv), not its folder", p.display());
        }
        if !p.is_file() {
            bail!("{what} file {}: no such file", p.display());
        }
        Ok(p)
    };
    // (Checked here, where the message can name the key: classification needs two classes.)
    if let Some(l) = e.labels.as_ref().filter(|l| l.len() < 2) {
        match l.first() {
            None => {
                bail!("labels is an empty list: list at least 2 labels, or leave labels out to take them from the data")
            }
            Some(one) => {
                bail!("labels lists one label ({one}): list at least 2, or leave labels out to take them from the data")
            }
        }
    }
    let mut args = run.clone();
    args.task = task;
    args.train = Some(data(&e.train, "train")?);
    args.eval = e.eval.as_deref().map(|p| data(p, "eval")).transpose()?;
    args.lr = Some(e.lr.unwrap_or_else(|| default_lr(&method, decoder)));
    for (field, value) in [
        (&mut args.text_field, &e.text_field),
        (&mut args.prompt_field, &e.prompt_field),
        (&mut args.completion_field, &e.completion_field),
        (&mut args.label_field, &e.label_field),
    ] {
        if let Some(v) = value {
            *field = v.clone();
        }
    }
    let mut cfg = args.config(method, m.init_text(&e.method))?;
    cfg.labels = e.labels.clone();
    cfg.verbalizers = e.verbalizers.clone();
    Ok(cfg)
}
