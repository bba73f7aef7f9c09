//! A run's resumable state in its checkpoints: `state.json` (step, data cursor, best metric,
//! totals, the base model's fingerprint and the settings a resumed run must keep), the trainable
//! tensors and the AdamW moments; saving them, and checking and restoring a run from them.

use crate::batch::Cursor;
use crate::checkpoint::{Checkpoints, Loaded};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::fingerprint::BaseFingerprint;
use crate::model::Backend;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tuna_autograd::optim::AdamW;
use tuna_autograd::Tensor;
use tuna_models::adapt::Method;
use tuna_models::io;

/// What `state.json` holds: where the run is and what it ran on.
#[derive(Serialize, Deserialize)]
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
    out
}

/// A setting recorded like the others but free to change on resume: recomputing activations
/// changes memory and time, never the numbers (the gradients are bitwise the same on the CPU).
const CHECKPOINT_ACTIVATIONS: &str = "--checkpoint-activations";

/// Likewise: the update inside the backward gives bitwise the update after it.
const UPDATE_IN_BACKWARD: &str = "--update-in-backward";

/// The settings that differ between a checkpoint's run (`saved`) and this one, by flag.
pub(crate) fn changed_settings(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    now.iter()
        .filter(|(k, v)| saved.get(*k).is_some_and(|s| s != *v))
        .map(|(k, v)| format!("{k} was {}, now {v}", saved[k]))
        .collect()
}

/// Named trainable tensors (checkpoint names), as one optimizer's group.
pub(crate) type Params<B> = [(String, Tensor<B, f32>)];

pub(crate) const TRAINABLE: &str = "trainable.safetensors";
pub(crate) const OPTIMIZER: &str = "optimizer.safetensors";
pub(crate) const STATE: &str = "state.json";

/// The state of checkpoint `ck`, checked against this run (`now`): the same base model, a state
/// that agrees with its checkpoint's step, the same settings (a changed `--steps` only warns) and
/// the same data and batching.
pub(crate) fn resumable(ck: &Loaded, now: &State) -> Result<State> {
    let saved: State = serde_json::from_slice(ck.file(STATE)?)
        .map_err(|e| TrainError::Invalid(format!("{}: {STATE}: {e}", ck.dir.display())))?;
    // The fingerprint samples the base as held, so a switched --base-precision would read as
    // another base model: name the flag instead.
    // A checkpoint from before the flag was recorded was made on an f32 base.
    let precision =
        |st: &State| st.settings.as_ref().map(|s| s.get("--base-precision").cloned().unwrap_or_else(|| "f32".into()));
    if let (Some(old), Some(new)) = (precision(&saved), precision(now)) {
        if old != new {
            return Err(TrainError::Invalid(format!(
                "{}: a resumed run keeps the settings it started with; changed: --base-precision was {old}, now {new}. \
                 Resume with --base-precision {old}, or start a new run (--overwrite or another --out)",
                ck.dir.display()
            )));
        }
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
        let mut changed = changed_settings(old, new);
        changed
            .retain(|c| ![CHECKPOINT_ACTIVATIONS, UPDATE_IN_BACKWARD].iter().any(|f| c.starts_with(&format!("{f} "))));
        // Extending (or shortening) a run is allowed, but it is no longer the run it was; the
        // warmup follows (it is cut to the steps when longer).
        let schedule: Vec<String> =
            changed.iter().filter(|c| c.starts_with("--steps ") || c.starts_with("--warmup ")).cloned().collect();
        if schedule.iter().any(|c| c.starts_with("--steps ")) {
            changed.retain(|c| !schedule.contains(c));
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
            "{}: the checkpoint was made with other data or batching settings (fingerprint {:x} vs {:x}): resume \
             with the same data and flags",
            ck.dir.display(),
            saved.fingerprint,
            now.fingerprint
        )));
    }
    Ok(saved)
}

/// Checkpoint `st`, the trainable tensors and the AdamW moments (with `metrics` in the manifest).
pub(crate) fn save<B: Backend>(
    ckpts: &Checkpoints,
    st: &State,
    params: &[(String, Tensor<B, f32>)],
    opt: &AdamW<B, f32>,
    metrics: &Map<String, Value>,
) -> Result<()> {
    save_groups(ckpts, st, &[(params, opt)], metrics)
}

/// [`save`] for a run with several optimizers (a multi-task run: one per task, each at its own
/// learning rate), each over its own tensors; names are unique across the groups.
pub(crate) fn save_groups<B: Backend>(
    ckpts: &Checkpoints,
    st: &State,
    groups: &[(&Params<B>, &AdamW<B, f32>)],
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
    let tensors: Vec<Slot<B>> = groups
        .iter()
        .flat_map(|(params, opt)| params.iter().enumerate().map(move |(i, (_, t))| (t, *opt, i)))
        .collect();
    let w = Streamed { tensors: &names, data: &|k: usize| Ok(tensors[k].0.to_vec()?) };
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
type Slot<'a, B> = (&'a Tensor<B, f32>, &'a AdamW<B, f32>, usize);

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

/// The trainable tensors and AdamW moments of a checkpoint (its files `w` and `o`) into `params`
/// and `opt`; a tensor the checkpoint trains that `params` lacks is an error.
pub(crate) fn restore<B: Backend>(
    dir: &Path,
    w: &[u8],
    o: &[u8],
    params: &[(String, Tensor<B, f32>)],
    opt: &mut AdamW<B, f32>,
    step: u64,
) -> Result<()> {
    restore_groups(dir, w, o, &mut [(params, opt)], step)
}

/// [`restore`] for a run with several optimizers (see [`save_groups`]).
pub(crate) fn restore_groups<B: Backend>(
    dir: &Path,
    w: &[u8],
    o: &[u8],
    groups: &mut [(&Params<B>, &mut AdamW<B, f32>)],
    step: u64,
) -> Result<()> {
    // The files are parsed in place (views into their bytes) and each tensor is decoded only as
    // it is restored: a full fine-tuning checkpoint is the model three times over (weights and
    // two moments), and a decoded copy of all of it on top of the bytes tripled a resume's peak.
    fn read<'a>(dir: &Path, bytes: &'a [u8], what: &str) -> Result<safetensors::SafeTensors<'a>> {
        let bad = |e: String| TrainError::Invalid(format!("{}: {e}", dir.join(what).display()));
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        for (n, v) in st.tensors() {
            if v.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("tensor `{n}` is {:?}, not F32", v.dtype())));
            }
        }
        Ok(st)
    }
    let weights = read(dir, w, TRAINABLE)?;
    let moments = read(dir, o, OPTIMIZER)?;
    let decode = |v: safetensors::tensor::TensorView<'_>| -> Vec<f32> {
        v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    // Every tensor the checkpoint trained must train now: none is dropped silently.
    let trains = |k: &str| groups.iter().any(|(params, _)| params.iter().any(|(n, _)| n == k));
    let mut trained = weights.names();
    trained.sort();
    if let Some(extra) = trained.into_iter().find(|k| !trains(k)) {
        return Err(TrainError::Invalid(format!(
            "{}: the checkpoint trains `{extra}`, which this run does not: it is from another method or model",
            dir.join(TRAINABLE).display()
        )));
    }
    for (params, opt) in groups.iter_mut() {
        let mut mom = Vec::new();
        for (n, t) in params.iter() {
            let get = |k: &str| {
                weights
                    .tensor(k)
                    .or_else(|_| moments.tensor(k))
                    .ok()
                    .filter(|v| v.shape() == t.shape())
                    .map(decode)
                    .ok_or_else(|| {
                        TrainError::Invalid(format!(
                            "{}: no tensor `{k}` of shape {:?}: the checkpoint is from another method or model",
                            dir.display(),
                            t.shape()
                        ))
                    })
            };
            *t.data_mut() = t.device().from_host(&get(n)?)?;
            mom.push((get(&format!("{n}.m"))?, get(&format!("{n}.v"))?));
        }
        opt.load_moments(&mom, step as u32)?;
    }
    Ok(())
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

    #[test]
    fn changed_settings_name_the_flag_and_both_values() {
        let a = BTreeMap::from([("--lr".to_string(), "0.01".to_string()), ("--clip".into(), "Some(1.0)".into())]);
        let mut b = a.clone();
        assert!(changed_settings(&a, &b).is_empty());
        b.insert("--lr".into(), "0.5".into());
        b.insert("--new-flag".into(), "x".into()); // unknown to an older checkpoint: not a change
        assert_eq!(changed_settings(&a, &b), ["--lr was 0.01, now 0.5"]);
    }

    #[test]
    fn evaluations_track_the_best_and_the_patience() {
        let mut st = State {
            step: 0,
            cursor: Cursor::default(),
            fingerprint: 0,
            best: None,
            evals_since_best: 0,
            train_tokens: 0,
            train_seconds: 0.0,
            last_loss: 0.0,
            base: None,
            settings: None,
            task_losses: None,
        };
        assert!(!st.record_eval(0.5, Direction::Max, Some(2)));
        assert!(!st.record_eval(0.4, Direction::Max, Some(2)));
        assert!(st.record_eval(0.5, Direction::Max, Some(2)), "two evaluations without improvement");
        assert!(!st.record_eval(0.6, Direction::Max, Some(2)));
        assert_eq!((st.best, st.evals_since_best), (Some(0.6), 0));
        assert!(!st.record_eval(0.1, Direction::Min, None));
    }
}
