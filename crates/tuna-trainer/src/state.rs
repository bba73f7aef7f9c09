//! A run's resumable state in its checkpoints: `state.json` (step, data cursor, best metric,
//! totals, the base model's fingerprint and the settings a resumed run must keep), the trainable
//! tensors and the AdamW moments; saving them, and checking and restoring a run from them.

use crate::batch::Cursor;
use crate::checkpoint::{Checkpoints, FileReader, Loaded, READ_CHUNK};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::fingerprint::BaseFingerprint;
use crate::model::{Backend, RunFloat};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use tuna_autograd::optim::AdamW;
use tuna_autograd::Tensor;
use tuna_models::adapt::Method;
use tuna_models::io;

/// What `state.json` holds: where the run is and what it ran on. (`Default`: step 0, nothing
/// recorded yet.)
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) step: u64,
    pub(crate) cursor: Cursor,
    pub(crate) fingerprint: u64,
    pub(crate) best: Option<f64>,
    pub(crate) evals_since_best: u64,
    pub(crate) train_tokens: u64,
    pub(crate) train_seconds: f64,
    pub(crate) last_loss: f64,
    /// The base model trained on (absent in checkpoints from before it was recorded).
    #[serde(default)]
    pub(crate) base: Option<BaseFingerprint>,
    /// The settings that shape the run's numbers, by flag (absent in older checkpoints): a
    /// resumed run keeps them, so it continues as the uninterrupted run would have.
    #[serde(default)]
    pub(crate) settings: Option<BTreeMap<String, String>>,
    /// A multi-task run's last training loss of each task (from the last step that had its rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) task_losses: Option<BTreeMap<String, f64>>,
}

impl State {
    /// Whether this step's state is written: every `save_every` steps, at the last step, at an
    /// early stop, and at a step that evaluated (its result is part of the state).
    pub(crate) fn save_due(&self, save_every: u64, last: bool, stopped_early: bool, evaluated: bool) -> bool {
        self.step.is_multiple_of(save_every.max(1)) || last || stopped_early || evaluated
    }

    /// What the progress line says when patience runs out.
    pub(crate) fn early_stop_note(&self) -> String {
        format!("early stop at step {}: no improvement in {} evaluations", self.step, self.evals_since_best)
    }

    /// Record an evaluation's value `v` of the metric that picks the best (better: higher for
    /// `Max`); returns whether `patience` evaluations without improvement have passed.
    pub(crate) fn record_eval(&mut self, v: f64, dir: crate::checkpoint::Direction, patience: Option<u64>) -> bool {
        use crate::checkpoint::Direction;
        let better = self.best.is_none_or(|b| if dir == Direction::Max { v > b } else { v < b });
        if better {
            self.best = Some(v);
            self.evals_since_best = 0;
        } else {
            self.evals_since_best += 1;
        }
        patience.is_some_and(|p| self.evals_since_best >= p)
    }
}

/// The method's settings as a resumed run compares them: its Debug text, less a prefix's `init`
/// (the checkpoint replaces the initial table, and a run saved before prefixes had inits recorded
/// `Prefix { n: 20, projection: None }`, which must still resume).
fn method_key(m: &Method) -> String {
    match m {
        Method::Prefix { n, projection, .. } => format!("Prefix {{ n: {n:?}, projection: {projection:?} }}"),
        Method::PTuningV2 { n, .. } => format!("PTuningV2 {{ n: {n:?} }}"),
        other => format!("{other:?}"),
    }
}

/// The settings of `cfg` a resumed run must share with the run it continues (the data, seed and
/// batching are in the batcher's fingerprint; the base model in [`BaseFingerprint`]).
/// `eval_data` is the evaluation batches' fingerprint (the data and how it is cut), when there is one.
pub(crate) fn settings_of(cfg: &TrainConfig, eval_data: Option<u64>) -> BTreeMap<String, String> {
    let s = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let mut out = BTreeMap::from([
        ("--eval (its data)".to_string(), eval_data.map_or("none".into(), |f| format!("{f:016x}"))),
        ("--method and its settings".into(), method_key(&cfg.method)),
        ("--task".into(), s(&cfg.task)),
        ("--labels".into(), s(&cfg.labels)),
        ("--verbalizers".into(), s(&cfg.verbalizers)),
        ("--micro-batch".into(), s(&cfg.micro_batch)),
        ("--steps".into(), s(&cfg.steps)),
        ("--lr".into(), s(&cfg.lr)),
        ("--warmup".into(), s(&cfg.warmup)),
        ("--decay".into(), s(&cfg.decay)),
        ("--min-lr-ratio".into(), s(&cfg.min_lr_ratio)),
        ("--weight-decay".into(), s(&cfg.weight_decay)),
        ("--optimizer-state".into(), cfg.optimizer_state.to_string()),
        ("--base-precision".into(), cfg.base_precision.to_string()),
        (TF32.into(), if cfg.tf32 { "on" } else { "off" }.into()),
        (PRECISION.into(), cfg.precision.to_string()),
        ("--clip".into(), s(&cfg.clip)),
        (CHECKPOINT_ACTIVATIONS.into(), cfg.checkpoint_activations.name()),
        (UPDATE_IN_BACKWARD.into(), cfg.update_in_backward.to_string()),
        ("--eval-every".into(), s(&cfg.eval_every)),
        ("--max-eval-examples".into(), s(&cfg.max_eval_examples)),
        ("--patience".into(), s(&cfg.patience)),
    ]);
    // A prompt's init text is compared under its flag; a prefix's is not (like its init, the
    // checkpoint replaces what it started from).
    if !matches!(cfg.method, Method::Prefix { .. } | Method::PTuningV2 { .. }) {
        out.insert("--prompt-init-text".into(), s(&cfg.prompt_init_text));
    }
    if cfg.base_precision == tuna_models::model::BasePrecision::Int8 {
        out.insert(INT8_SCALES.into(), "per 64 weights".into());
    }
    if let Some(p) = base_products(cfg.base_precision) {
        out.insert(BASE_PRODUCTS.into(), p);
    }
    out
}

/// How a bf16, int8 or q4 base's products run in this process (`None` for f32): widened to f32, or
/// on dot products, which round the activations too, so a run resumes bit for bit only on the
/// products it started with. Every int8 dot-product path gives the same bits (q4 takes it, its
/// blocks requantized to int8); the bf16 ones differ in their f32 rounding, so each is named.
pub(crate) fn base_products(p: tuna_models::model::BasePrecision) -> Option<String> {
    use tuna_kernels::ops::lowp::{bf16_path, matrix_path};
    use tuna_models::model::BasePrecision;
    match p {
        BasePrecision::Int8 | BasePrecision::Q4 => {
            Some(matrix_path().dot_isa().map_or(WIDENED.to_string(), |_| "int8 dot products".to_string()))
        }
        BasePrecision::Bf16 => {
            Some(bf16_path().map_or(WIDENED.to_string(), |isa| format!("bf16 dot products ({})", isa.name())))
        }
        _ => None,
    }
}

/// A bf16, int8 or q4 base's products, recorded for such runs since the dot-product paths (before,
/// they widened to f32; q4 since it takes the int8 path).
const BASE_PRODUCTS: &str = "the base's product path";
const WIDENED: &str = "widened to f32";

/// How an int8 base is scaled, recorded for int8 runs since int8 took one scale per 64 weights;
/// an int8 checkpoint without it was trained on per-row scales.
const INT8_SCALES: &str = "int8 scales";

/// `--tf32`: recorded as `on` or `off`.
const TF32: &str = "--tf32";
/// `--precision`: recorded as `f32` or `bf16`.
const PRECISION: &str = "--precision";

/// The `--precision` the newest checkpoint of the run in `out` that looks whole and whose state
/// reads was trained in (one from before the flag was recorded: f32); `None` where there is none
/// (the resume itself then says why). `tuna train` continues a resumed run in it when
/// `--precision` is not given, so a default that depends on the device never refuses a resume.
pub fn saved_precision(out: &std::path::Path) -> Option<crate::Precision> {
    let dir = out.join("checkpoints");
    if !dir.is_dir() {
        return None; // `Checkpoints::open` would create it
    }
    let ckpts = crate::checkpoint::Checkpoints::open(&dir, 0, None).ok()?;
    // The newest whose state reads, as the resume passes over the ones that do not.
    let saved = ckpts.steps().ok()?.into_iter().rev().filter(|&s| ckpts.looks_valid(s)).find_map(|step| {
        let bytes = std::fs::read(ckpts.step_dir(step).join(STATE)).ok()?;
        serde_json::from_slice::<State>(&bytes).ok()
    })?;
    let p = saved.settings.as_ref().and_then(|s| s.get(PRECISION).cloned()).unwrap_or_else(|| "f32".into());
    p.parse().ok()
}

/// Settings recorded only from some version on, with what a checkpoint from before meant (an f32
/// base, no TF32): compared even against such a checkpoint, where a setting it lacks would
/// otherwise pass unchecked.
const LATER_SETTINGS: [(&str, &str); 4] =
    [("--base-precision", "f32"), (TF32, "off"), (PRECISION, "f32"), (BASE_PRODUCTS, WIDENED)];

/// A setting recorded like the others but free to change on resume: recomputing activations
/// changes memory and time, never the numbers (the gradients are bitwise the same on the CPU).
const CHECKPOINT_ACTIVATIONS: &str = "--checkpoint-activations";

/// Likewise: the update inside the backward gives bitwise the update after it.
const UPDATE_IN_BACKWARD: &str = "--update-in-backward";

/// The settings that differ between a checkpoint's run (`saved`) and this one, by key, each with
/// how it reads to the user (`--clip was 1.0, now 0 (off)`; a data fingerprint as the data that
/// changed). A task's data is not named beside its changed virtual tokens (they change how its
/// examples are cut, so its data's fingerprint: one change, the setting's).
fn changes(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<Change> {
    let differs = |k: &str| now.get(k).is_some_and(|v| saved.get(k).is_some_and(|s| s != v));
    let virtual_tokens_differ = |prefix: &str| {
        let k = format!("{prefix}{METHOD}");
        let n = |m: &BTreeMap<String, String>| m.get(&k).map(|v| virtual_tokens(v));
        n(saved) != n(now)
    };
    now.iter()
        .filter(|(k, _)| differs(k))
        .filter(|(k, _)| match k.strip_suffix(TRAIN_DATA).or_else(|| k.strip_suffix(EVAL_DATA)) {
            Some(prefix) => !virtual_tokens_differ(prefix),
            None => true,
        })
        .map(|(k, v)| (k.clone(), change_text(k, &saved[k], v)))
        .collect()
}

/// A changed setting: its key and how the change reads.
type Change = (String, String);

/// Key of the method's settings.
const METHOD: &str = "--method and its settings";
/// Key of the evaluation batches' fingerprint (`none` without evaluation data).
const EVAL_DATA: &str = "--eval (its data)";
/// Key of a task's training batches' fingerprint (a multi-task run's).
const TRAIN_DATA: &str = "--train (its data)";

/// A change of setting `key` from `old` to `new`, as the user reads it.
fn change_text(key: &str, old: &str, new: &str) -> String {
    // A multi-task run's per-task key is `task `<name>`: <flag>`.
    let (prefix, flag) = match key.rfind(": ") {
        Some(i) => key.split_at(i + 2),
        None => ("", key),
    };
    match (flag, old, new) {
        (EVAL_DATA, "none", _) => format!("{prefix}--eval was not given, now it is"),
        (EVAL_DATA, _, "none") => format!("{prefix}--eval was given, now it is not"),
        (EVAL_DATA, _, _) => {
            format!("{prefix}the evaluation data (--eval) changed since the run began (or how it is cut into batches)")
        }
        (TRAIN_DATA, _, _) => format!(
            "{prefix}the training data (its train file) changed since the run began (or how it is cut into batches)"
        ),
        _ => format!("{key} was {}, now {}", shown(flag, old), shown(flag, new)),
    }
}

/// The virtual tokens of a method as recorded (its debug text): the `n` of the prompt and prefix
/// methods, else 0.
fn virtual_tokens(method: &str) -> usize {
    let n = fields(method).into_iter().find(|(k, _)| *k == "n").and_then(|(_, v)| v.parse().ok());
    let variant = method.split([' ', '(', '{']).next().unwrap_or(method);
    n.filter(|_| matches!(variant, "Prompt" | "Prefix" | "PTuning" | "PTuningV2")).unwrap_or(0)
}

/// A recorded setting's value (Rust's debug text, kept as recorded so that older checkpoints still
/// compare) as the user gives it: `none` for `None`, a list as `a,b`, the method with its flags.
fn shown(flag: &str, v: &str) -> String {
    match flag {
        "--clip" if v == "None" => "0 (off)".into(),
        METHOD => method_shown(v),
        _ => plain(v),
    }
}

/// A debug value as typed: `None` is `none`, `Some(x)` is `x`, a list `["a", "b"]` is `a,b`, a
/// name (`Lm`, `Cosine`, `SampleVocab`) in lower case (`vocab` for the sampled init); numbers and
/// quoted text as they are.
fn plain(v: &str) -> String {
    if v == "None" {
        return "none".into();
    }
    if let Some(inner) = v.strip_prefix("Some(").and_then(|x| x.strip_suffix(')')) {
        return plain(inner);
    }
    if let Some(items) = v.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        let items: Vec<String> =
            split_top(items).into_iter().map(|x| x.trim_matches('"').to_string()).filter(|x| !x.is_empty()).collect();
        return if items.is_empty() { "none".into() } else { items.join(",") };
    }
    let name = v.split('(').next().unwrap_or(v);
    if name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && name.chars().all(|c| c.is_ascii_alphanumeric()) {
        return match name {
            "SampleVocab" => "vocab".into(),
            "ClassLabels" => "labels".into(),
            n => n.to_ascii_lowercase(),
        };
    }
    v.to_string()
}

/// `s` split at its top-level `, ` (not inside brackets, parentheses, braces or quotes).
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'"' if i == 0 || b[i - 1] != b'\\' => quoted = !quoted,
            b'(' | b'[' | b'{' if !quoted => depth += 1,
            b')' | b']' | b'}' if !quoted => depth -= 1,
            b',' if !quoted && depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() {
        out.push(s[start..].trim());
    }
    out
}

/// The `name: value` fields of a debug struct text (`Name { a: 1, b: [] }`, or one wrapped in a
/// variant: `Lora(LoraConfig { .. })`).
fn fields(v: &str) -> Vec<(&str, &str)> {
    let body = match (v.find('{'), v.rfind('}')) {
        (Some(a), Some(b)) if a < b => &v[a + 1..b],
        _ => return Vec::new(),
    };
    split_top(body).into_iter().filter_map(|f| f.split_once(": ")).collect()
}

/// The method's recorded text as its `--method` and flags: `lora (--lora-r 8, --lora-alpha 16.0,
/// --lora-dropout 0.0)`; a setting left at none is left out. Text of another form is kept.
fn method_shown(v: &str) -> String {
    let f = fields(v);
    let get = |k: &str| f.iter().find(|(n, _)| *n == k).map(|(_, v)| plain(v)).filter(|v| v != "none");
    let variant = v.split([' ', '(', '{']).next().unwrap_or(v);
    let (name, flags): (&str, &[(&str, &str)]) = match variant {
        "Full" => ("full", &[("patterns", "--train-patterns")]),
        "Prompt" => ("prompt", &[("n", "--virtual-tokens"), ("init", "--prompt-init")]),
        "Prefix" if get("projection").is_some() => {
            ("prefix-mlp", &[("n", "--virtual-tokens"), ("projection", "--prefix-hidden")])
        }
        "Prefix" => ("prefix", &[("n", "--virtual-tokens")]),
        "PTuning" => {
            ("ptuning", &[("n", "--virtual-tokens"), ("encoder", "--ptuning-encoder"), ("hidden", "--ptuning-hidden")])
        }
        "PTuningV2" => ("ptuning-v2", &[("n", "--virtual-tokens")]),
        "Houlsby" => ("houlsby", &[("bottleneck", "--bottleneck")]),
        "Lora" => (
            "lora",
            &[
                ("r", "--lora-r"),
                ("alpha", "--lora-alpha"),
                ("dropout", "--lora-dropout"),
                ("targets", "--lora-targets"),
            ],
        ),
        _ => return v.to_string(),
    };
    let set: Vec<String> = flags.iter().filter_map(|(k, flag)| get(k).map(|v| format!("{flag} {v}"))).collect();
    if set.is_empty() {
        name.to_string()
    } else {
        format!("{name} ({})", set.join(", "))
    }
}

/// Named trainable tensors (checkpoint names), as one optimizer's group.
pub(crate) type Params<B, E = f32> = [(String, Tensor<B, E>)];
/// One group of a checkpoint: parameters and their optimizer (a multi-task run saves several).
pub(crate) type Group<'a, B, E> = (&'a Params<B, E>, &'a AdamW<B, E>);
/// [`Group`] with its optimizer to restore into.
pub(crate) type GroupMut<'a, B, E> = (&'a Params<B, E>, &'a mut AdamW<B, E>);

pub(crate) const TRAINABLE: &str = "trainable.safetensors";
pub(crate) const OPTIMIZER: &str = "optimizer.safetensors";
pub(crate) const STATE: &str = "state.json";

/// The recorded settings that changed between `old` and `new` and refuse a resume, and the
/// schedule changes a resume allows with a warning: extending (or shortening) a run is allowed,
/// but it is no longer the run it was, and the warmup follows (cut to the steps when longer), so
/// `--steps` and, with it, `--warmup`. Recomputing activations and the update inside the backward
/// change nothing of the numbers and are free; [`LATER_SETTINGS`] are checked apart, first.
fn resume_changes(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> (Vec<Change>, Vec<Change>) {
    let free: Vec<&str> =
        LATER_SETTINGS.iter().map(|(f, _)| *f).chain([CHECKPOINT_ACTIVATIONS, UPDATE_IN_BACKWARD]).collect();
    let changed: Vec<Change> = changes(old, new).into_iter().filter(|(k, _)| !free.contains(&k.as_str())).collect();
    if changed.iter().any(|(k, _)| k == "--steps") {
        changed.into_iter().partition(|(k, _)| !(k == "--steps" || k == "--warmup"))
    } else {
        (changed, Vec::new())
    }
}

/// What a resume with the same `key` as before takes: the flag (a data fingerprint's, the data).
fn same(key: &str) -> String {
    match key.strip_suffix(EVAL_DATA).or_else(|| key.strip_suffix(TRAIN_DATA)) {
        Some(prefix) if key.ends_with(EVAL_DATA) => format!("{prefix}the same evaluation data"),
        Some(prefix) => format!("{prefix}the same training data"),
        None => format!("the same {key}"),
    }
}

/// The state of checkpoint `ck`, checked against this run (`now`): the same base model, a state
/// that agrees with its checkpoint's step, the same settings (a changed `--steps` only warns) and
/// the same data and batching (`data`: what the training data is, to name it when it changed).
pub(crate) fn resumable(ck: &Loaded, now: &State, data: &str) -> Result<State> {
    let saved: State = serde_json::from_slice(&ck.file(STATE)?)
        .map_err(|e| TrainError::Invalid(format!("{}: {STATE}: {e}", ck.dir.display())))?;
    // An int8 run from before the group scales trained on weights this build cannot hold: say so
    // (the base's fingerprint would call it another model).
    let int8 =
        |st: &State| st.settings.as_ref().is_some_and(|s| s.get("--base-precision").is_some_and(|p| p == "int8"));
    if int8(&saved) && int8(now) && saved.settings.as_ref().is_some_and(|s| !s.contains_key(INT8_SCALES)) {
        return Err(TrainError::Invalid(format!(
            "{}: trained on an int8 base with one scale per weight row, by a tuna from before int8 took one \
             scale per 64 weights; this one cannot hold those weights, so the run cannot resume: start a new run \
             (--overwrite or another --out), or finish it with the tuna that started it",
            ck.dir.display()
        )));
    }
    // The fingerprint samples the base as held, so a switched --base-precision would read as
    // another base model: name the flag instead (first). A checkpoint from before a flag was
    // recorded was made with its old default (an f32 base, TF32 off). Every such flag that changed
    // is named at once (following the advice for one must not meet the refusal of the next).
    let (mut changed, mut with) = (Vec::new(), Vec::new());
    let precision =
        |st: &State| st.settings.as_ref().map(|s| s.get("--base-precision").cloned().unwrap_or_else(|| "f32".into()));
    for (flag, before) in LATER_SETTINGS {
        let value = |st: &State| st.settings.as_ref().map(|s| s.get(flag).cloned().unwrap_or_else(|| before.into()));
        // The products are those of one base precision: with --base-precision switched, the saved
        // products are compared with what the saved precision would take in this process (going
        // back to it must not meet a second refusal), and the new precision's are not named.
        let now_value = if flag == BASE_PRODUCTS && precision(&saved) != precision(now) {
            match precision(&saved).and_then(|p| p.parse::<tuna_models::model::BasePrecision>().ok()) {
                Some(p) => base_products(p),
                None => continue,
            }
        } else {
            value(now)
        };
        if let (Some(old), Some(new)) = (value(&saved), now_value) {
            if old != new {
                with.push(match (flag, old.as_str()) {
                    (TF32, "on") => format!("with {TF32}"),
                    (TF32, _) => format!("without {TF32}"),
                    // Where each can run, so the advice can be followed as given.
                    (PRECISION, "bf16") => format!("with {flag} {old} (on a CUDA device)"),
                    ("--base-precision", p) if p != "f32" => format!("with {flag} {old} (on the CPU)"),
                    // The products follow the CPU, or the variable that picks them.
                    (BASE_PRODUCTS, p) if p.starts_with("int8 dot") => {
                        "with TUNA_CPU_MATRIX=emulated (or on a CPU with AMX, AVX-512 VNNI or AVX-VNNI: the same numbers)".into()
                    }
                    (BASE_PRODUCTS, p) if p.starts_with("bf16 dot") => {
                        let path = p.trim_start_matches("bf16 dot products (").trim_end_matches(')');
                        let on = if path == "emulated" { "" } else { " (on a CPU that runs it)" };
                        format!("with TUNA_CPU_MATRIX_BF16={path}{on}")
                    }
                    (BASE_PRODUCTS, _) => {
                        let var = match precision(&saved).as_deref() {
                            Some("bf16") => "TUNA_CPU_MATRIX_BF16",
                            _ => "TUNA_CPU_MATRIX",
                        };
                        format!("with {var}=widen")
                    }
                    _ => format!("with {flag} {old}"),
                });
                changed.push(format!("{flag} was {old}, now {new}"));
            }
        }
    }
    if !changed.is_empty() {
        // The other recorded settings that changed too (checked after the base below otherwise),
        // by the same rules.
        if let (Some(old), Some(new)) = (&saved.settings, &now.settings) {
            for (k, c) in resume_changes(old, new).0 {
                with.push(format!("with {}", same(&k)));
                changed.push(c);
            }
            if let Some(steps) = new.get("--steps").and_then(|s| s.parse::<u64>().ok()).filter(|&n| n < saved.step) {
                changed.push(format!("--steps {steps} is below the step the run reached, {}", saved.step));
                with.push(format!("with --steps {} or more", saved.step));
            }
        }
        return Err(TrainError::Invalid(format!(
            "{}: a resumed run keeps the settings it started with; changed: {}. Resume {}, or start a new run \
             (--overwrite or another --out)",
            ck.dir.display(),
            changed.join("; "),
            with.join(" and ")
        )));
    }
    match (&saved.base, &now.base) {
        (Some(b), Some(base)) => {
            if let Some(what) = b.difference(base) {
                return Err(TrainError::OtherBase { dir: ck.dir.clone(), what });
            }
        }
        _ => eprintln!("warning: {}: made before checkpoints recorded their base model; not checked", ck.dir.display()),
    }
    if saved.step != ck.step() {
        return Err(TrainError::Invalid(format!(
            "{}: {STATE} says step {} but the checkpoint is step {}: it was edited; resume from another",
            ck.dir.display(),
            saved.step,
            ck.step()
        )));
    }
    if let (Some(old), Some(new)) = (&saved.settings, &now.settings) {
        let (changed, schedule) = resume_changes(old, new);
        let text = |v: Vec<Change>| v.into_iter().map(|(_, c)| c).collect::<Vec<_>>();
        let (changed, schedule) = (text(changed), text(schedule));
        if !schedule.is_empty() {
            eprintln!(
                "warning: {}: the learning-rate schedule changes from here on, so the run no longer matches an \
                 uninterrupted one",
                schedule.join("; ")
            );
        }
        if !changed.is_empty() {
            return Err(TrainError::Invalid(format!(
                "{}: a resumed run keeps the settings it started with, so it continues as it would have run; \
                 changed: {}. Resume with the same flags, or start a new run (--overwrite or another --out)",
                ck.dir.display(),
                changed.join("; ")
            )));
        }
    }
    if let Some(steps) = now.settings.as_ref().and_then(|s| s.get("--steps")).and_then(|s| s.parse::<u64>().ok()) {
        if saved.step > steps {
            return Err(TrainError::Invalid(format!(
                "{}: the run is already at step {}, past --steps {steps}: resume with --steps {} or more",
                ck.dir.display(),
                saved.step,
                saved.step
            )));
        }
    }
    if saved.fingerprint != now.fingerprint {
        return Err(TrainError::Invalid(format!(
            "{}: {data} changed since the run began, or how it is read and cut into batches (--batch-size, \
             --seed, --max-len, --max-train-examples, --holdout, the field names): resume with the same data and flags",
            ck.dir.display(),
        )));
    }
    Ok(saved)
}

/// Checkpoint `st`, the trainable tensors and the AdamW moments (with `metrics` in the manifest).
pub(crate) fn save<B: Backend<E>, E: RunFloat>(
    ckpts: &Checkpoints,
    st: &State,
    params: &[(String, Tensor<B, E>)],
    opt: &AdamW<B, E>,
    metrics: &Map<String, Value>,
) -> Result<()> {
    save_groups(ckpts, st, &[(params, opt)], metrics)
}

/// [`save`] for a run with several optimizers (a multi-task run: one per task, each at its own
/// learning rate), each over its own tensors; names are unique across the groups.
pub(crate) fn save_groups<B: Backend<E>, E: RunFloat>(
    ckpts: &Checkpoints,
    st: &State,
    groups: &[Group<'_, B, E>],
    metrics: &Map<String, Value>,
) -> Result<()> {
    // Streamed one tensor at a time: a full fine-tuning checkpoint (weights and both moments,
    // 12 bytes per parameter) never exists whole in memory.
    let mut names = Vec::new();
    let mut moment_names = Vec::new();
    for (params, _) in groups {
        for (n, t) in params.iter() {
            names.push((n.clone(), t.shape().to_vec()));
            moment_names.push((format!("{n}.m"), t.shape().to_vec()));
            moment_names.push((format!("{n}.v"), t.shape().to_vec()));
        }
    }
    let tensors: Vec<Slot<B, E>> = groups
        .iter()
        .flat_map(|(params, opt)| params.iter().enumerate().map(move |(i, (_, t))| (t, *opt, i)))
        .collect();
    let w = Streamed { tensors: &names, data: &|k: usize| Ok(tensors[k].0.master_to_vec()?) };
    let o = Streamed {
        tensors: &moment_names,
        data: &|k: usize| {
            let (_, opt, i) = tensors[k / 2];
            Ok(opt.moment(i, k % 2 == 1)?)
        },
    };
    let s = serde_json::to_vec_pretty(st).unwrap_or_default();
    ckpts.save_streamed(st.step, &[(TRAINABLE, &w), (OPTIMIZER, &o), (STATE, &s)], metrics)?;
    Ok(())
}

/// A trainable tensor, its optimizer and its index there.
type Slot<'a, B, E> = (&'a Tensor<B, E>, &'a AdamW<B, E>, usize);

/// A safetensors file of f32 tensors written one tensor at a time (see
/// [`io::write_safetensors_f32`]).
struct Streamed<'a> {
    tensors: &'a [(String, Vec<usize>)],
    data: &'a dyn Fn(usize) -> Result<Vec<f32>>,
}

impl crate::checkpoint::Payload for Streamed<'_> {
    fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        io::write_safetensors_f32(w, self.tensors, |k| {
            (self.data)(k).map_err(|e| tuna_models::Error::InvalidArgument(e.to_string()))
        })
        .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The trainable tensors and AdamW moments of checkpoint `ck` into `params` and `opt`; a tensor
/// the checkpoint trains that `params` lacks is an error.
pub(crate) fn restore<B: Backend<E>, E: RunFloat>(
    ck: &Loaded,
    params: &[(String, Tensor<B, E>)],
    opt: &mut AdamW<B, E>,
    step: u64,
) -> Result<()> {
    restore_groups(ck, &mut [(params, opt)], step)
}

/// [`restore`] for a run with several optimizers (see [`save_groups`]).
///
/// A full fine-tuning checkpoint is the model three times over (weights and two moments), so
/// nothing of it is held whole: each file is read front to back in the order its tensors lie
/// (their headers first, checked before anything is replaced), each tensor decoded into one host
/// buffer and copied over the tensor or moment it restores. What a restore holds beyond the run
/// is the largest trainable tensor once and a read buffer ([`restore_transient`]). The bytes are
/// checked against the manifest's checksum as they are read, so a file changed since the
/// checkpoint verified is an error naming it (the run stops; nothing trains on what it read).
pub(crate) fn restore_groups<B: Backend<E>, E: RunFloat>(
    ck: &Loaded,
    groups: &mut [GroupMut<'_, B, E>],
    step: u64,
) -> Result<()> {
    let mut weights = TensorFile::open(ck, TRAINABLE)?;
    let mut moments = TensorFile::open(ck, OPTIMIZER)?;
    // Each trainable tensor by name: its group and its index there (and in the group's optimizer).
    let mut at: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (g, (params, _)) in groups.iter().enumerate() {
        for (i, (n, _)) in params.iter().enumerate() {
            if at.insert(n, (g, i)).is_some() {
                return Err(weights.invalid(format!("this run trains two tensors named `{n}`")));
            }
        }
    }
    // Every tensor the checkpoint trained must train now: none is dropped silently.
    let mut trained = weights.names.clone();
    trained.sort();
    if let Some(extra) = trained.into_iter().find(|k| !at.contains_key(k.as_str())) {
        return Err(weights.invalid(format!(
            "the checkpoint trains `{extra}`, which this run does not: it is from another method or model"
        )));
    }
    // Everything checked before anything is replaced.
    for (params, _) in groups.iter() {
        for (n, t) in params.iter() {
            weights.expect(n, t.shape())?;
            moments.expect(&format!("{n}.m"), t.shape())?;
            moments.expect(&format!("{n}.v"), t.shape())?;
        }
    }
    for k in 0..weights.names.len() {
        let (g, i) = at[weights.names[k].as_str()];
        let v = weights.read(k)?;
        let t = &groups[g].0[i].1;
        if v.len() != t.numel() {
            // (the header's shape was checked above; the bytes must agree with it)
            return Err(weights.invalid(format!(
                "`{}`: {} values read, its shape holds {}",
                weights.names[k],
                v.len(),
                t.numel()
            )));
        }
        // In place; a bf16 parameter's master takes the f32 values and its data their rounding.
        t.load_master(&v)?;
    }
    weights.finish()?;
    for k in 0..moments.names.len() {
        let name = moments.names[k].as_str();
        let moment = [(".m", false), (".v", true)]
            .into_iter()
            .find_map(|(suffix, second)| Some((*at.get(name.strip_suffix(suffix)?)?, second)));
        match moment {
            Some(((g, i), second)) => {
                let v = moments.read(k)?;
                groups[g].1.load_moment(i, second, &v)?;
            }
            // Moments of a tensor this run does not train (its weights were not saved): read
            // past, for the checksum.
            None => moments.skip(k)?,
        }
    }
    moments.finish()?;
    for (_, opt) in groups.iter_mut() {
        opt.hp.step = step as u32;
    }
    Ok(())
}

/// Heap bytes a resume holds beyond the run's own while it finds and restores its checkpoint (what
/// the memory plan adds for a run that may resume), for trainable tensors of `numel` values each:
/// the larger of verifying the files (a read buffer of up to [`READ_CHUNK`] bytes) and restoring
/// them (one host copy of the largest tensor, its read buffer and, with bf16 moments, a moment
/// narrowed to bf16), plus the files' parsed headers (three entries a tensor: it and its two
/// moments; 512 bytes each is generous: a MiniLM full fine-tune's come to ~270).
pub(crate) fn restore_transient(numel: impl Iterator<Item = usize>, bf16_moments: bool) -> u64 {
    let (mut largest, mut total, mut tensors) = (0u64, 0u64, 0u64);
    for n in numel {
        largest = largest.max(n as u64);
        total += n as u64;
        tensors += 1;
    }
    let chunk = READ_CHUNK as u64;
    // The optimizer's file is the larger: two moments of each tensor.
    let verify = (total * 8).min(chunk);
    let restore = largest * 4 + (largest * 4).min(chunk) + if bf16_moments { largest * 2 } else { 0 };
    verify.max(restore) + tensors * 3 * 512
}

/// A checkpoint's safetensors file of f32 tensors, read front to back: its header parsed and
/// checked when opened, then each tensor's bytes in the order they lie.
struct TensorFile {
    r: FileReader,
    meta: safetensors::tensor::Metadata,
    /// The tensors' names in file order.
    names: Vec<String>,
    /// Where the tensors' data starts (the header's end).
    data_start: u64,
}

impl TensorFile {
    fn open(ck: &Loaded, file: &str) -> Result<TensorFile> {
        let mut r = ck.reader(file)?;
        let invalid = |r: &FileReader, msg: String| TrainError::Invalid(format!("{}: {msg}", r.path().display()));
        let mut len = [0u8; 8];
        r.read_exact(&mut len)?;
        let n = u64::from_le_bytes(len);
        // The safetensors crate's own limit on a header (100 MB).
        if n > 100_000_000 || n > r.size() - 8 {
            return Err(invalid(&r, format!("a safetensors header of {n} bytes in a file of {}", r.size())));
        }
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header)?;
        // Parsing checks the offsets: the tensors lie one after another from the header's end,
        // each of the size its dtype and shape give.
        let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| invalid(&r, format!("not a safetensors file: its header: {e}")))?;
        drop(header);
        let data_start = 8 + n;
        if data_start + meta.data_len() as u64 != r.size() {
            return Err(invalid(
                &r,
                format!(
                    "its header lists {} bytes of tensors, the file holds {}",
                    meta.data_len(),
                    r.size() - data_start
                ),
            ));
        }
        let names = meta.offset_keys();
        for k in &names {
            let dtype = meta.info(k).map(|i| i.dtype);
            if dtype != Some(safetensors::Dtype::F32) {
                return Err(invalid(&r, format!("tensor `{k}` is {dtype:?}, not F32")));
            }
        }
        Ok(TensorFile { r, meta, names, data_start })
    }

    fn invalid(&self, msg: String) -> TrainError {
        TrainError::Invalid(format!("{}: {msg}", self.r.path().display()))
    }

    /// Checks that the file holds tensor `name` of `shape`.
    fn expect(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.meta.info(name) {
            Some(i) if i.shape == shape => Ok(()),
            Some(i) => Err(self.invalid(format!(
                "tensor `{name}` has shape {:?}, this run's {shape:?}: the checkpoint is from another method or model",
                i.shape
            ))),
            None => Err(self.invalid(format!(
                "no tensor `{name}` of shape {shape:?}: the checkpoint is from another method or model"
            ))),
        }
    }

    /// Where tensor `k`'s data lies in the file, checked to be where the reading is.
    fn span(&self, k: usize) -> Result<u64> {
        let info =
            self.meta.info(&self.names[k]).ok_or_else(|| self.invalid(format!("no tensor `{}`", self.names[k])))?;
        let (start, end) = info.data_offsets;
        if self.data_start + start as u64 != self.r.position() {
            return Err(self.invalid(format!("tensor `{}` does not follow the one before it", self.names[k])));
        }
        Ok((end - start) as u64)
    }

    /// Tensor `k` (in file order; the next one), decoded.
    fn read(&mut self, k: usize) -> Result<Vec<f32>> {
        let len = self.span(k)?;
        let mut v = Vec::with_capacity(len as usize / 4);
        self.r.read_chunks(len, |c| {
            v.extend(c.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        })?;
        Ok(v)
    }

    /// Reads past tensor `k` (the next one).
    fn skip(&mut self, k: usize) -> Result<()> {
        let len = self.span(k)?;
        Ok(self.r.read_chunks(len, |_| ())?)
    }

    /// Checks that the whole file was read and is the one that verified.
    fn finish(self) -> Result<()> {
        Ok(self.r.finish()?)
    }
}

#[cfg(test)]
mod tests {

    /// Runs saved before prefixes had an init recorded their method as below; they must still
    /// resume (the init does not matter to a resumed run: the checkpoint replaces the table).
    #[test]
    fn a_prefix_runs_settings_leave_out_its_init() {
        use tuna_models::adapt::{Method, PromptInit};
        let p = Method::Prefix { n: 20, projection: None, init: PromptInit::SampleVocab };
        assert_eq!(super::method_key(&p), "Prefix { n: 20, projection: None }");
        let p = Method::Prefix { n: 8, projection: Some(64), init: PromptInit::Random };
        assert_eq!(super::method_key(&p), "Prefix { n: 8, projection: Some(64) }");
        assert_eq!(super::method_key(&Method::PTuningV2 { n: 5, init: PromptInit::Random }), "PTuningV2 { n: 5 }");
        let prompt = Method::Prompt { n: 3, init: PromptInit::SampleVocab };
        assert_eq!(super::method_key(&prompt), format!("{prompt:?}"), "prompt tuning keeps its init, as before");
    }
    use super::*;
    use crate::checkpoint::Direction;

    fn changed_settings(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
        changes(saved, now).into_iter().map(|(_, text)| text).collect()
    }

    #[test]
    fn changed_settings_name_the_flag_and_both_values() {
        let a = BTreeMap::from([("--lr".to_string(), "0.01".to_string()), ("--clip".into(), "Some(1.0)".into())]);
        let mut b = a.clone();
        assert!(changed_settings(&a, &b).is_empty());
        b.insert("--lr".into(), "0.5".into());
        b.insert("--new-flag".into(), "x".into()); // unknown to an older checkpoint: not a change
        assert_eq!(changed_settings(&a, &b), ["--lr was 0.01, now 0.5"]);
    }

    /// Recorded values (Rust's debug text) read as the user types them: no `Some(..)`, no struct
    /// dumps, no hashes.
    #[test]
    fn changed_settings_read_as_typed() {
        let map = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let lora = |r: u32, targets: &str| {
            format!("Lora(LoraConfig {{ r: {r}, alpha: 16.0, dropout: 0.1, targets: [{targets}] }})")
        };
        let a: BTreeMap<String, String> = map(&[
            ("--clip", "Some(1.0)"),
            ("--max-eval-examples", "None"),
            ("--task", "Lm"),
            ("--decay", "Cosine"),
            ("--labels", "Some([\"cat\", \"other\"])"),
            ("--prompt-init-text", "Some(\"the cat\")"),
            (METHOD, &lora(8, "")),
            (EVAL_DATA, "none"),
        ]);
        let b: BTreeMap<String, String> = map(&[
            ("--clip", "None"),
            ("--max-eval-examples", "Some(3)"),
            ("--task", "Classify"),
            ("--decay", "Linear"),
            ("--labels", "None"),
            ("--prompt-init-text", "Some(\"a dog\")"),
            (METHOD, &lora(4, "\"q_proj\", \"v_proj\"")),
            (EVAL_DATA, "039344c01409fc2b"),
        ]);
        let got = changed_settings(&a, &b).join("; ");
        assert_eq!(
            got,
            "--clip was 1.0, now 0 (off); \
             --decay was cosine, now linear; \
             --eval was not given, now it is; \
             --labels was cat,other, now none; \
             --max-eval-examples was none, now 3; \
             --method and its settings was lora (--lora-r 8, --lora-alpha 16.0, --lora-dropout 0.1), \
             now lora (--lora-r 4, --lora-alpha 16.0, --lora-dropout 0.1, --lora-targets q_proj,v_proj); \
             --prompt-init-text was \"the cat\", now \"a dog\"; \
             --task was lm, now classify"
        );
        assert!(!got.contains("Some(") && !got.contains("LoraConfig") && !got.contains("0393"), "{got}");
        let c: BTreeMap<String, String> = map(&[(EVAL_DATA, "1111111111111111")]);
        let d: BTreeMap<String, String> = map(&[(EVAL_DATA, "2222222222222222")]);
        assert_eq!(
            changed_settings(&c, &d),
            ["the evaluation data (--eval) changed since the run began (or how it is cut into batches)"]
        );
        // Each method as its flags.
        for (debug, typed) in [
            ("Prompt { n: 20, init: SampleVocab }", "prompt (--virtual-tokens 20, --prompt-init vocab)"),
            ("Prompt { n: 4, init: Text([5, 6]) }", "prompt (--virtual-tokens 4, --prompt-init text)"),
            ("Prefix { n: 20, projection: None }", "prefix (--virtual-tokens 20)"),
            ("Prefix { n: 8, projection: Some(64) }", "prefix-mlp (--virtual-tokens 8, --prefix-hidden 64)"),
            ("PTuning { n: 3, encoder: Lstm, hidden: None }", "ptuning (--virtual-tokens 3, --ptuning-encoder lstm)"),
            ("PTuningV2 { n: 5 }", "ptuning-v2 (--virtual-tokens 5)"),
            ("Houlsby { bottleneck: 32 }", "houlsby (--bottleneck 32)"),
            ("Full { patterns: [] }", "full"),
            ("Full { patterns: [\"*.q_proj.*\"] }", "full (--train-patterns *.q_proj.*)"),
        ] {
            assert_eq!(method_shown(debug), typed);
        }
    }

    /// A task's changed virtual tokens change how its examples are cut, so its data's fingerprint:
    /// named once, as the setting; a task's data that changed alone is named as its data.
    #[test]
    fn a_tasks_changed_virtual_tokens_are_not_also_changed_data() {
        assert_eq!(virtual_tokens("PTuningV2 { n: 5 }"), 5);
        assert_eq!(virtual_tokens("PTuning { n: 3, encoder: Mlp, hidden: None }"), 3);
        assert_eq!(virtual_tokens("Lora(LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, targets: [] })"), 0);
        assert_eq!(virtual_tokens("Houlsby { bottleneck: 32 }"), 0);
        let t = |n: u32, data: &str| -> BTreeMap<String, String> {
            BTreeMap::from([
                ("task `a`: --method and its settings".into(), format!("Prompt {{ n: {n}, init: SampleVocab }}")),
                ("task `a`: --train (its data)".into(), data.into()),
                ("task `a`: --eval (its data)".into(), data.into()),
            ])
        };
        assert_eq!(
            changed_settings(&t(4, "aaaa"), &t(6, "bbbb")),
            ["task `a`: --method and its settings was prompt (--virtual-tokens 4, --prompt-init vocab), \
              now prompt (--virtual-tokens 6, --prompt-init vocab)"]
        );
        assert_eq!(
            changed_settings(&t(4, "aaaa"), &t(4, "bbbb")),
            [
                "task `a`: the evaluation data (--eval) changed since the run began (or how it is cut into batches)",
                "task `a`: the training data (its train file) changed since the run began (or how it is cut into \
                 batches)"
            ]
        );
    }

    /// A restore puts back the tensors and both moments a checkpoint saved. A file changed after
    /// the checkpoint verified (altered in place, cut short, grown, its header garbled) and a
    /// tensor of another shape are errors naming the file, never a panic or a resumed run.
    #[test]
    fn a_restore_reads_back_what_was_saved_and_refuses_files_changed_after_they_verified() {
        use crate::run::{optimizer, setup};
        use std::sync::Arc;
        use tuna_kernels::Cpu;
        let dir = std::env::temp_dir().join(format!("tuna-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = crate::run::tests::config(crate::Task::Lm, &dir);
        let dev = Arc::new(Cpu);
        let s = setup(&dev, &cfg).unwrap();
        let mut opt = optimizer(&cfg, &s.params).unwrap();
        for (i, (_, t)) in s.params.iter().enumerate() {
            let n = t.numel();
            *t.data_mut() = (0..n).map(|j| (i * 1000 + j) as f32 * 1e-3).collect();
            opt.load_moment(i, false, &vec![i as f32 + 0.5; n]).unwrap();
            opt.load_moment(i, true, &(0..n).map(|j| j as f32).collect::<Vec<_>>()).unwrap();
        }
        let ckpts = Checkpoints::open(&dir.join("ck"), 0, None).unwrap();
        let st = State { step: 3, ..State::default() };
        save(&ckpts, &st, &s.params, &opt, &Map::new()).unwrap();
        let weights = |p: &Params<Cpu>| p.iter().map(|(_, t)| t.to_vec().unwrap()).collect::<Vec<_>>();
        let ck = ckpts.latest_valid().unwrap().checkpoint.expect("the checkpoint");
        let restored = || {
            let fresh = setup(&dev, &cfg).unwrap();
            let mut o = optimizer(&cfg, &fresh.params).unwrap();
            restore(&ck, &fresh.params, &mut o, 3).map(|()| (weights(&fresh.params), o.moments().unwrap(), o.hp.step))
        };
        let (w, m, step) = restored().unwrap();
        assert_eq!(w, weights(&s.params));
        assert_eq!(m, opt.moments().unwrap());
        assert_eq!(step, 3);

        let (wf, of) = (ck.dir.join(TRAINABLE), ck.dir.join(OPTIMIZER));
        type Change = fn(&mut Vec<u8>);
        let cases: [(&std::path::Path, Change, &str); 6] = [
            (&wf, |b| *b.last_mut().unwrap() ^= 1, "checksum"),
            (&of, |b| b.truncate(b.len() - 100), "ends before byte"),
            (&of, |b| b.push(0), "longer than"),
            (&wf, |b| b.truncate(4), "ends before byte 8"),
            (&wf, |b| b[8] = b'x', "not a safetensors file"),
            (&of, |b| b[0..8].copy_from_slice(&u64::MAX.to_le_bytes()), "header of"),
        ];
        for (file, change, needle) in cases {
            let before = std::fs::read(file).unwrap();
            let mut bytes = before.clone();
            change(&mut bytes);
            std::fs::write(file, &bytes).unwrap();
            let err = restored().expect_err("an error").to_string();
            assert!(err.contains(&file.display().to_string()) && err.contains(needle), "{needle}: {err}");
            std::fs::write(file, &before).unwrap();
        }
        assert!(restored().is_ok(), "the files as saved restore again");

        // Another LoRA rank: the same tensors, other shapes.
        let mut other = cfg.clone();
        if let tuna_models::adapt::Method::Lora(l) = &mut other.method {
            l.r = 4;
        }
        let fresh = setup::<_, f32>(&dev, &other).unwrap();
        let mut o = optimizer(&other, &fresh.params).unwrap();
        let err = restore(&ck, &fresh.params, &mut o, 3).unwrap_err().to_string();
        let first = &fresh.params[0].0;
        assert!(err.contains(&wf.display().to_string()) && err.contains(&format!("`{first}` has shape")), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--tf32` is kept by a resumed run like `--base-precision`: switching it either way is an
    /// error naming the flag, and a checkpoint from before it was recorded counts as TF32 off.
    #[test]
    fn a_resume_that_switches_tf32_is_refused_naming_the_flag() {
        let dir = std::env::temp_dir().join(format!("tuna-tf32-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = crate::run::tests::config(crate::Task::Lm, &dir);
        cfg.steps = 10;
        let ckpts = Checkpoints::open(&dir.join("ck"), 0, None).unwrap();
        // A state at step 2 with `--tf32` on or off, or (`None`) from before it was recorded.
        let state = |tf32: Option<bool>| {
            let mut c = cfg.clone();
            c.tf32 = tf32.unwrap_or(false);
            let mut s = settings_of(&c, None);
            if tf32.is_none() {
                s.remove(TF32);
            }
            State { step: 2, settings: Some(s), ..State::default() }
        };
        let resume = |saved: Option<bool>, now: bool| {
            ckpts.save(2, &[(STATE, &serde_json::to_vec(&state(saved)).unwrap())], &Map::new()).unwrap();
            let ck = ckpts.latest_valid().unwrap().checkpoint.expect("the checkpoint");
            resumable(&ck, &state(Some(now)), "the training data").map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(settings_of(&cfg, None)[TF32], "off");
        for same in [false, true] {
            resume(Some(same), same).unwrap();
        }
        let e = resume(Some(false), true).unwrap_err();
        assert!(e.contains("changed: --tf32 was off, now on. Resume without --tf32"), "{e}");
        let e = resume(Some(true), false).unwrap_err();
        assert!(e.contains("changed: --tf32 was on, now off. Resume with --tf32,"), "{e}");
        // A checkpoint from before the flag was recorded: TF32 was off.
        resume(None, false).unwrap();
        let e = resume(None, true).unwrap_err();
        assert!(e.contains("--tf32 was off, now on"), "{e}");
        // Two recorded flags switched at once: both named in one refusal, with what to resume with.
        let mut both = cfg.clone();
        both.tf32 = true;
        both.precision = crate::Precision::Bf16;
        both.lr *= 2.0;
        both.warmup += 1; // --warmup may change only with --steps: named too
        let now = State { step: 2, settings: Some(settings_of(&both, None)), ..State::default() };
        ckpts.save(2, &[(STATE, &serde_json::to_vec(&state(Some(false))).unwrap())], &Map::new()).unwrap();
        let ck = ckpts.latest_valid().unwrap().checkpoint.expect("the checkpoint");
        let e = resumable(&ck, &now, "the training data").map(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains("--tf32 was off, now on; --precision was f32, now bf16; --lr was")
                && e.contains("--warmup was")
                && e.contains(
                    "Resume without --tf32 and with --precision f32 and with the same --lr and with the same --warmup,"
                ),
            "{e}"
        );
        // An int8 checkpoint from before the group scales (no record of them) cannot resume.
        let mut int8 = cfg.clone();
        int8.base_precision = tuna_models::model::BasePrecision::Int8;
        let new_int8 = settings_of(&int8, None);
        assert_eq!(new_int8[INT8_SCALES], "per 64 weights");
        let mut old_int8 = new_int8.clone();
        old_int8.remove(INT8_SCALES);
        let at = |settings: BTreeMap<String, String>| State { step: 2, settings: Some(settings), ..State::default() };
        ckpts.save(2, &[(STATE, &serde_json::to_vec(&at(old_int8)).unwrap())], &Map::new()).unwrap();
        let ck = ckpts.latest_valid().unwrap().checkpoint.expect("the checkpoint");
        let e = resumable(&ck, &at(new_int8.clone()), "the training data").map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("one scale per weight row") && e.contains("cannot resume"), "{e}");
        ckpts.save(2, &[(STATE, &serde_json::to_vec(&at(new_int8.clone())).unwrap())], &Map::new()).unwrap();
        let ck = ckpts.latest_valid().unwrap().checkpoint.expect("the checkpoint");
        resumable(&ck, &at(new_int8), "the training data").expect("a group-scaled int8 checkpoint resumes");
        // The base's product path: compared within one base precision only, and the advice names
        // the variable of the saved run's precision.
        let with = |precision: &str, products: Option<&str>| {
            let mut s = settings_of(&cfg, None);
            s.insert("--base-precision".into(), precision.into());
            if precision == "int8" {
                s.insert(INT8_SCALES.into(), "per 64 weights".into());
            }
            s.remove(BASE_PRODUCTS);
            if let Some(p) = products {
                s.insert(BASE_PRODUCTS.into(), p.into());
            }
            at(s)
        };
        let refusal = |saved: State, now: State| {
            ckpts.save(2, &[(STATE, &serde_json::to_vec(&saved).unwrap())], &Map::new()).unwrap();
            let ck = ckpts.latest_valid().unwrap().checkpoint.expect("the checkpoint");
            resumable(&ck, &now, "the training data").map(|_| ()).err().map(|e| e.to_string())
        };
        assert_eq!(refusal(with("f32", None), with("f32", None)), None, "f32 runs record no product path");
        let e = refusal(with("f32", None), with("bf16", Some("bf16 dot products (amx)"))).unwrap();
        assert!(e.contains("--base-precision was f32, now bf16") && !e.contains("product path"), "{e}");
        // Switched precision and a saved path this process would not take for the saved precision:
        // both named at once (following the first advice must not meet the second refusal).
        let here = base_products(tuna_models::model::BasePrecision::Int8).unwrap();
        let other = if here == WIDENED { "int8 dot products" } else { WIDENED };
        let e = refusal(with("int8", Some(other)), with("bf16", Some(WIDENED))).unwrap();
        assert!(
            e.contains("--base-precision was int8, now bf16")
                && e.contains(&format!("the base's product path was {other}, now {here}"))
                && e.contains("Resume with --base-precision int8 (on the CPU)")
                && e.contains("TUNA_CPU_MATRIX="),
            "{e}"
        );
        let e = refusal(with("int8", Some(&here)), with("bf16", Some(WIDENED))).unwrap();
        assert!(!e.contains("product path"), "the saved path is the one int8 takes here: {e}");
        let e = refusal(with("bf16", None), with("bf16", Some("bf16 dot products (amx)"))).unwrap();
        assert!(
            e.contains("the base's product path was widened to f32, now bf16 dot products (amx)")
                && e.contains("Resume with TUNA_CPU_MATRIX_BF16=widen,"),
            "an older bf16 checkpoint widened: {e}"
        );
        let e = refusal(
            with("bf16", Some("bf16 dot products (amx)")),
            with("bf16", Some("bf16 dot products (avx512-bf16)")),
        )
        .unwrap();
        assert!(e.contains("Resume with TUNA_CPU_MATRIX_BF16=amx (on a CPU that runs it),"), "{e}");
        // A widened bf16 run switched to int8: the bf16 path is named only where bf16 would take
        // a dot path here (AVX512_BF16 / AMX-BF16, or the variable); int8's never.
        let e = refusal(with("bf16", Some(WIDENED)), with("int8", Some("int8 dot products"))).unwrap();
        let bf16_here = base_products(tuna_models::model::BasePrecision::Bf16).unwrap();
        assert!(e.contains("--base-precision was bf16, now int8") && !e.contains("TUNA_CPU_MATRIX="), "{e}");
        assert_eq!(e.contains("TUNA_CPU_MATRIX_BF16=widen"), bf16_here != WIDENED, "{e}");
        let e = refusal(with("int8", Some("int8 dot products")), with("int8", Some(WIDENED))).unwrap();
        assert!(e.contains("Resume with TUNA_CPU_MATRIX=emulated (or on a CPU with AMX"), "{e}");
        // A q4 checkpoint from before q4 took the dot path (no key: widened), on a CPU with one.
        let e = refusal(with("q4", None), with("q4", Some("int8 dot products"))).unwrap();
        assert!(
            e.contains("the base's product path was widened to f32, now int8 dot products")
                && e.contains("Resume with TUNA_CPU_MATRIX=widen,"),
            "{e}"
        );
        let e = refusal(with("q4", Some("int8 dot products")), with("q4", Some(WIDENED))).unwrap();
        assert!(e.contains("Resume with TUNA_CPU_MATRIX=emulated (or on a CPU with AMX"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn evaluations_track_the_best_and_the_patience() {
        let mut st = State::default();
        assert!(!st.record_eval(0.5, Direction::Max, Some(2)));
        assert!(!st.record_eval(0.4, Direction::Max, Some(2)));
        assert!(st.record_eval(0.5, Direction::Max, Some(2)), "two evaluations without improvement");
        assert!(!st.record_eval(0.6, Direction::Max, Some(2)));
        assert_eq!((st.best, st.evals_since_best), (Some(0.6), 0));
        assert!(!st.record_eval(0.1, Direction::Min, None));
    }
}
