//! The training loop: micro-batches with gradient accumulation, AdamW with warmup and decay,
//! clipping, evaluation, early stopping, metrics, atomic checkpoints and bit-for-bit resume.
//!
//! Output folder: `metrics.jsonl`, `checkpoints/step-N/` (trainable tensors, AdamW moments,
//! `state.json` with the data cursor), `adapter/` (the final PEFT folder; `model/` for full
//! fine-tuning: a Hugging Face folder of the trained model) and `summary.json`.

use crate::batch::{Batch, BatchConfig, Batcher, Cursor, PadSide, Truncate};
use crate::checkpoint::{Checkpoints, Direction};
use crate::data::{self, Fields, Task};
use crate::error::{Result, TrainError};
use crate::fingerprint::BaseFingerprint;
use crate::limits::{check_method_size, method_virtual_tokens, min_len, resolve_max_len};
use crate::metrics::{MetricsLog, Split};
use crate::model::{Backend, Model};
use crate::progress::Progress;
use crate::run_dir::{self, OutMode};
use crate::schedule::{Decay, Schedule};
use crate::task::{TaskFile, TaskSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tuna_autograd::ops::elem::scale;
use tuna_autograd::optim::{clip_grad_norm, AdamW, AdamWParams};
use tuna_autograd::Tensor;
use tuna_models::adapt::{peft, Method};
use tuna_models::io;

/// Everything a run needs (validated by the CLI).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub method: Method,
    pub task: Task,
    pub fields: Fields,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    /// Class labels in class order (default: those of the training data, sorted).
    pub labels: Option<Vec<String>>,
    /// Verbalizer words for decoders, one per label (default: the labels).
    pub verbalizers: Option<Vec<String>>,
    /// Text of a TEXT prompt init (CLASS_LABELS uses the verbalizers or labels).
    pub prompt_init_text: Option<String>,
    pub batch_size: usize,
    /// Rows per forward/backward (gradient accumulation over `batch_size / micro_batch` passes).
    pub micro_batch: usize,
    /// Tokens per example at most; `None`: [`crate::limits::DEFAULT_MAX_LEN`] or what the model's
    /// positions leave room for. Checked against the positions before the first step.
    pub max_len: Option<usize>,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub clip: Option<f64>,
    pub eval_every: u64,
    pub save_every: u64,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<u64>,
    pub keep_last: usize,
    /// Use at most this many examples of each file (the first ones).
    pub max_train_examples: Option<usize>,
    pub max_eval_examples: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    /// A new run, replacing an old one, or resuming one (see [`OutMode`]).
    pub out_mode: OutMode,
    pub progress: bool,
}

/// The numbers a run ends with (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub method: String,
    pub model: String,
    pub task: String,
    pub trainable_params: usize,
    pub base_params: usize,
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub train_tokens: u64,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    /// Bytes of the exported adapter (or trained model) weights.
    pub checkpoint_bytes: u64,
    pub stopped_early: bool,
    pub export: String,
}

/// Evaluation results.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub perplexity: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    cursor: Cursor,
    fingerprint: u64,
    best: Option<f64>,
    evals_since_best: u64,
    train_tokens: u64,
    train_seconds: f64,
    last_loss: f64,
    /// The base model trained on (absent in checkpoints from before it was recorded).
    #[serde(default)]
    base: Option<BaseFingerprint>,
    /// The settings that shape the run's numbers, by flag (absent in older checkpoints): a
    /// resumed run keeps them, so it continues as the uninterrupted run would have.
    #[serde(default)]
    settings: Option<BTreeMap<String, String>>,
}

/// The settings of `cfg` a resumed run must share with the run it continues (the data, seed and
/// batching are in the batcher's fingerprint; the base model in [`BaseFingerprint`]).
fn settings_of(cfg: &TrainConfig) -> BTreeMap<String, String> {
    let s = |v: &dyn std::fmt::Debug| format!("{v:?}");
    BTreeMap::from([
        ("--method and its settings".to_string(), s(&cfg.method)),
        ("--task".into(), s(&cfg.task)),
        ("--labels".into(), s(&cfg.labels)),
        ("--verbalizers".into(), s(&cfg.verbalizers)),
        ("--prompt-init-text".into(), s(&cfg.prompt_init_text)),
        ("--micro-batch".into(), s(&cfg.micro_batch)),
        ("--steps".into(), s(&cfg.steps)),
        ("--lr".into(), s(&cfg.lr)),
        ("--warmup".into(), s(&cfg.warmup)),
        ("--decay".into(), s(&cfg.decay)),
        ("--min-lr-ratio".into(), s(&cfg.min_lr_ratio)),
        ("--weight-decay".into(), s(&cfg.weight_decay)),
        ("--clip".into(), s(&cfg.clip)),
        ("--eval (given or not)".into(), s(&cfg.eval.is_some())),
        ("--eval-every".into(), s(&cfg.eval_every)),
        ("--max-eval-examples".into(), s(&cfg.max_eval_examples)),
        ("--patience".into(), s(&cfg.patience)),
    ])
}

/// The settings that differ between a checkpoint's run (`saved`) and this one, by flag.
fn changed_settings(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    now.iter()
        .filter(|(k, v)| saved.get(*k).is_some_and(|s| s != *v))
        .map(|(k, v)| format!("{k} was {}, now {v}", saved[k]))
        .collect()
}

const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// The metric early stopping and "best" follow: accuracy (higher) for classification, else loss.
fn best_metric(task: Task) -> (&'static str, Direction) {
    if task == Task::Classify {
        ("eval_accuracy", Direction::Max)
    } else {
        ("eval_loss", Direction::Min)
    }
}

/// What a run works on: the model with its method installed, the task, the batches.
struct Setup<B: Backend> {
    model: Model<B>,
    spec: TaskSpec,
    batcher: Batcher,
    eval_batcher: Option<Batcher>,
    params: Vec<(String, Tensor<B, f32>)>,
}

/// Load the data, the model (installing the method) and the task; check the schedule.
fn setup<B: Backend>(dev: &Arc<B>, cfg: &TrainConfig) -> Result<Setup<B>> {
    let train_records = limit(data::load(&cfg.train, cfg.task, &cfg.fields)?, cfg.max_train_examples);
    // A TEXT init has its text (checked by the CLI); CLASS_LABELS takes the label words.
    let words = match (&cfg.prompt_init_text, &cfg.verbalizers, &cfg.labels) {
        (Some(t), _, _) => t.clone(),
        (None, Some(v), _) | (None, None, Some(v)) => v.join(" "),
        _ => crate::data::LabelSet::from_examples(&train_records).labels().join(" "),
    };
    let mut model = Model::open_for(dev, &cfg.model, &cfg.method)?;
    // Lengths against the model's positions before anything is allocated for the method.
    let max_len =
        resolve_max_len(cfg.max_len, model.max_positions(), method_virtual_tokens(&cfg.method), min_len(cfg.task))?;
    check_method_size(&cfg.method, model.shape().hidden)?;
    model.install(&cfg.method, cfg.seed, Some(&words))?;
    let spec = TaskSpec::new(&model, cfg.task, &train_records, cfg.labels.as_deref(), cfg.verbalizers.as_deref())?;
    let eval_set = match &cfg.eval {
        Some(p) => Some((p.clone(), limit(data::load(p, cfg.task, &cfg.fields)?, cfg.max_eval_examples))),
        None => None,
    };
    if cfg.task == Task::Classify && !model.is_decoder() {
        model.add_head(spec.labels.as_ref().map_or(2, |l| l.len()), cfg.seed)?;
    }
    let train_enc = spec.encode(&model, &train_records, &cfg.train, max_len)?;
    let eval_enc = match &eval_set {
        Some((p, r)) => Some(spec.encode(&model, r, p, max_len)?),
        None => None,
    };
    let batch_cfg = |shuffle: bool| batch_config(&model, cfg.task, cfg.batch_size, max_len, shuffle, cfg.seed);
    let batcher = Batcher::new(train_enc, batch_cfg(true))?;
    let eval_batcher = match eval_enc {
        Some(e) => Some(Batcher::new(e, batch_cfg(false))?),
        None => None,
    };
    let params = model.trainable();
    if params.is_empty() {
        return Err(TrainError::Invalid("nothing to train: the method and patterns select no tensor".into()));
    }
    Ok(Setup { model, spec, batcher, eval_batcher, params })
}

/// The learning-rate schedule `cfg` asks for, checked.
fn schedule_of(cfg: &TrainConfig) -> Result<Schedule> {
    let schedule = Schedule {
        peak_lr: cfg.lr,
        warmup_steps: cfg.warmup,
        total_steps: cfg.steps,
        decay: cfg.decay,
        min_lr_ratio: cfg.min_lr_ratio,
    };
    schedule.validate().map_err(TrainError::Invalid)?;
    Ok(schedule)
}

/// Train as `cfg` says; returns the summary (also written to `out/summary.json`).
pub fn train<B: Backend>(dev: &Arc<B>, cfg: &TrainConfig) -> Result<RunSummary> {
    // The folder first: a second run on it, or a new run over an old one, fails before any work.
    if cfg.out_mode == OutMode::Resume && !cfg.out.is_dir() {
        return Err(TrainError::Invalid(format!(
            "--resume: {}: no such folder (nothing to resume)",
            cfg.out.display()
        )));
    }
    run_dir::refuse_unsafe_out(&cfg.out)?;
    let _lock = run_dir::lock(&cfg.out)?;
    let inputs: Vec<&Path> =
        [Some(cfg.model.as_path()), Some(cfg.train.as_path()), cfg.eval.as_deref()].into_iter().flatten().collect();
    run_dir::check(&cfg.out, cfg.out_mode, &inputs)?;
    let Setup { model, spec, mut batcher, eval_batcher, params } = setup(dev, cfg)?;
    let schedule = schedule_of(cfg)?;
    if cfg.out_mode == OutMode::Overwrite {
        // Only now that the new run's model and data have loaded does the old run go.
        run_dir::clear(&cfg.out)?;
    }
    let base = BaseFingerprint::of(&model)?;
    let refs: Vec<&Tensor<B, f32>> = params.iter().map(|(_, t)| t).collect();
    let hp = AdamWParams { weight_decay: cfg.weight_decay as f32, ..AdamWParams::new(cfg.lr as f32) };
    let mut opt = AdamW::new(&refs, hp)?;
    let (metric_name, dir) = best_metric(cfg.task);
    let ckpts = Checkpoints::open(&cfg.out.join("checkpoints"), cfg.keep_last, Some((metric_name, dir)))?;

    let mut st = State {
        step: 0,
        cursor: Cursor::default(),
        fingerprint: batcher.fingerprint(),
        best: None,
        evals_since_best: 0,
        train_tokens: 0,
        train_seconds: 0.0,
        last_loss: f64::NAN,
        base: Some(base.clone()),
        settings: Some(settings_of(cfg)),
    };
    let mut resumed_from = None;
    if matches!(cfg.out_mode, OutMode::Resume | OutMode::ResumeOrStart) {
        let latest = ckpts.latest_valid()?;
        for w in &latest.warnings {
            eprintln!("warning: {w}");
        }
        if latest.checkpoint.is_none() {
            nothing_to_resume(cfg, &latest.warnings)?;
        }
        if let Some(ck) = latest.checkpoint {
            let saved: State = serde_json::from_slice(ck.file(STATE)?)
                .map_err(|e| TrainError::Invalid(format!("{}: {STATE}: {e}", ck.dir.display())))?;
            match saved.base.as_ref().map(|b| b.difference(&base)) {
                Some(Some(what)) => return Err(TrainError::OtherBase { dir: ck.dir.clone(), what }),
                Some(None) => {}
                None => eprintln!(
                    "warning: {}: made before checkpoints recorded their base model; not checked",
                    ck.dir.display()
                ),
            }
            if saved.step != ck.step() {
                return Err(TrainError::Invalid(format!(
                    "{}: {STATE} says step {} but the checkpoint is step {}: it was edited; resume from another",
                    ck.dir.display(),
                    saved.step,
                    ck.step()
                )));
            }
            if let Some(old) = &saved.settings {
                let mut changed = changed_settings(old, st.settings.as_ref().unwrap_or(old));
                // Extending (or shortening) a run is allowed, but it is no longer the run it was.
                if let Some(i) = changed.iter().position(|c| c.starts_with("--steps ")) {
                    eprintln!(
                        "warning: {}: the learning-rate schedule changes from here on, so the run no longer \
                         matches an uninterrupted one",
                        changed.remove(i)
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
            if saved.fingerprint != st.fingerprint {
                return Err(TrainError::Invalid(format!(
                    "{}: the checkpoint was made with other data or batching settings (fingerprint {:x} vs {:x}): resume with the same data and flags",
                    ck.dir.display(),
                    saved.fingerprint,
                    st.fingerprint
                )));
            }
            restore(&ck.dir, ck.file(TRAINABLE)?, ck.file(OPTIMIZER)?, &params, &mut opt, saved.step)?;
            eprintln!("resuming from {} (step {})", ck.dir.display(), saved.step);
            resumed_from = Some(saved.step);
            st = State { base: Some(base), settings: st.settings, ..saved };
        }
    }
    let mut log = MetricsLog::open(&cfg.out.join("metrics.jsonl"), resumed_from)?;
    let mut progress = Progress::new(cfg.steps, cfg.progress);
    let mut stopped_early = false;
    model.adapt().set_training(true);
    while st.step < cfg.steps {
        let t0 = Instant::now();
        let batch = batcher.next_batch(&mut st.cursor);
        let loss_sum = accumulate_grads(&model, &spec, &batch, cfg.micro_batch, cfg.seed ^ (st.step << 8))?;
        if !loss_sum.is_finite() {
            return Err(non_finite(st.step + 1, loss_sum, &ckpts));
        }
        let grad_norm = match cfg.clip {
            Some(c) => clip_grad_norm(&refs, c)?,
            None => f64::NAN,
        };
        if grad_norm.is_nan() && cfg.clip.is_some() || grad_norm.is_infinite() {
            return Err(non_finite(st.step + 1, grad_norm, &ckpts));
        }
        let lr = schedule.lr(st.step);
        opt.hp.lr = lr as f32;
        opt.step()?;
        st.step += 1;
        st.train_tokens += batch.real_tokens as u64;
        st.train_seconds += t0.elapsed().as_secs_f64();
        st.last_loss = loss_sum;
        let tps = st.train_tokens as f64 / st.train_seconds.max(1e-9);
        let mut m = Map::new();
        m.insert("loss".into(), json!(loss_sum));
        m.insert("lr".into(), json!(lr));
        m.insert("tokens".into(), json!(batch.real_tokens));
        if cfg.clip.is_some() {
            m.insert("grad_norm".into(), json!(grad_norm));
        }
        log.log(st.step, Split::Train, &m)?;
        progress.update(st.step, loss_sum, tps);

        let last = st.step == cfg.steps;
        let mut metrics = Map::new();
        if let Some(eb) = &eval_batcher {
            if st.step.is_multiple_of(cfg.eval_every.max(1)) || last {
                let e = evaluate(&model, &spec, eb)?;
                let mut em = Map::new();
                em.insert("loss".into(), json!(e.loss));
                if let Some(a) = e.accuracy {
                    em.insert("accuracy".into(), json!(a));
                }
                if let Some(p) = e.perplexity {
                    em.insert("perplexity".into(), json!(p));
                }
                log.log(st.step, Split::Eval, &em)?;
                progress.println(&format!("step {}: eval {}", st.step, describe(&e)));
                let v = if dir == Direction::Max { e.accuracy.unwrap_or(0.0) } else { e.loss };
                metrics.insert(metric_name.into(), json!(v));
                let better = st.best.is_none_or(|b| if dir == Direction::Max { v > b } else { v < b });
                if better {
                    st.best = Some(v);
                    st.evals_since_best = 0;
                } else {
                    st.evals_since_best += 1;
                }
                if cfg.patience.is_some_and(|p| st.evals_since_best >= p) {
                    stopped_early = true;
                }
            }
        }
        if st.step.is_multiple_of(cfg.save_every.max(1)) || last || stopped_early || !metrics.is_empty() {
            save(&ckpts, &st, &params, &opt, &metrics)?;
        }
        if stopped_early {
            progress.println(&format!(
                "early stop at step {}: no improvement in {} evaluations",
                st.step, st.evals_since_best
            ));
            break;
        }
    }
    progress.finish();
    model.adapt().set_training(false);
    let final_eval = match &eval_batcher {
        Some(eb) => Some(evaluate(&model, &spec, eb)?),
        None => None,
    };
    let (export, bytes) = export(&model, &cfg.out)?;
    // The task travels with the export, so that `tuna eval` scores classes in training's order.
    TaskFile {
        task: cfg.task.name().to_string(),
        labels: spec.labels.as_ref().map(|l| l.labels().to_vec()),
        verbalizers: cfg.verbalizers.clone(),
    }
    .write(&export)?;
    let summary = RunSummary {
        method: cfg.method.name().into(),
        model: cfg.model.display().to_string(),
        task: cfg.task.name().to_string(),
        trainable_params: params.iter().map(|(_, t)| t.numel()).sum(),
        base_params: model.base_param_count(),
        steps: st.step,
        final_train_loss: st.last_loss,
        eval_loss: final_eval.map(|e| e.loss),
        eval_accuracy: final_eval.and_then(|e| e.accuracy),
        eval_perplexity: final_eval.and_then(|e| e.perplexity),
        train_tokens: st.train_tokens,
        train_seconds: st.train_seconds,
        tokens_per_s: st.train_tokens as f64 / st.train_seconds.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        checkpoint_bytes: bytes,
        stopped_early,
        export: export.display().to_string(),
    };
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    crate::checkpoint::write_atomic(&cfg.out.join("summary.json"), text.as_bytes())?;
    Ok(summary)
}

/// Forward and backward of `batch` in micro-batches of `micro` rows, each loss weighted by its
/// share of the batch's loss terms (so the accumulated gradients are the full batch's). Returns the
/// batch's mean loss; at the first non-finite micro-batch loss it stops and returns that loss,
/// before its backward. Dropout is seeded per micro-batch from `seed`.
fn accumulate_grads<B: Backend>(
    model: &Model<B>,
    spec: &TaskSpec,
    batch: &Batch,
    micro: usize,
    seed: u64,
) -> Result<f64> {
    let micro = batch.split(micro.max(1))?;
    let total_terms: usize = micro.iter().map(|m| spec.terms(model, m)).sum();
    let mut loss_sum = 0.0f64;
    for (k, mb) in micro.iter().enumerate() {
        model.adapt().seed_dropout(seed ^ k as u64);
        let (loss, terms) = spec.loss(model, mb)?;
        let w = terms as f64 / total_terms.max(1) as f64;
        let l = loss.to_vec()?[0] as f64;
        if !l.is_finite() {
            return Ok(l);
        }
        loss_sum += l * w;
        if terms > 0 {
            scale(&loss, w)?.backward()?;
        }
        // Profiling: the next forward op is timed from here, not from before this backward.
        tuna_autograd::stats::mark();
    }
    Ok(loss_sum)
}

/// `--resume` found no valid checkpoint: an error, unless `--resume-or-start` and the folder holds
/// no run (starting anew there would overwrite the old run's log).
fn nothing_to_resume(cfg: &TrainConfig, skipped: &[String]) -> Result<()> {
    // A run killed before its first checkpoint left only its log: starting anew loses nothing.
    let found: Vec<&str> = run_dir::existing_run(&cfg.out).into_iter().filter(|&n| n != "metrics.jsonl").collect();
    let why = if skipped.is_empty() { "no checkpoint".to_string() } else { format!("{} corrupt", skipped.len()) };
    match cfg.out_mode {
        OutMode::ResumeOrStart if found.is_empty() => Ok(()),
        OutMode::ResumeOrStart => Err(TrainError::Invalid(format!(
            "{}: nothing to resume ({why}), but the folder holds a run ({}): --overwrite starts anew",
            cfg.out.display(),
            found.join(", ")
        ))),
        _ => Err(TrainError::Invalid(format!(
            "{}: nothing to resume ({why}; see the warnings above): --resume-or-start starts a new run where \
             there is none, --overwrite replaces the folder's run",
            cfg.out.display()
        ))),
    }
}

fn limit<T>(mut v: Vec<T>, n: Option<usize>) -> Vec<T> {
    if let Some(n) = n {
        v.truncate(n);
    }
    v
}

fn describe(e: &EvalMetrics) -> String {
    let mut s = format!("loss {:.4}", e.loss);
    if let Some(a) = e.accuracy {
        s += &format!(" accuracy {:.4}", a);
    }
    if let Some(p) = e.perplexity {
        s += &format!(" perplexity {:.3}", p);
    }
    s
}

fn non_finite(step: u64, loss: f64, ckpts: &Checkpoints) -> TrainError {
    let where_ = match ckpts.steps().ok().and_then(|s| s.last().copied()) {
        Some(s) => format!(" ({})", ckpts.step_dir(s).display()),
        None => " (none was written yet)".into(),
    };
    TrainError::NonFinite { step, loss, where_ }
}

/// Mean loss (and accuracy, perplexity) over `eb`'s examples in order, under no_grad.
pub fn evaluate<B: Backend>(model: &Model<B>, spec: &TaskSpec, eb: &Batcher) -> Result<EvalMetrics> {
    let (mut sum, mut n, mut correct, mut rows) = (0.0, 0usize, 0usize, 0usize);
    for rows_idx in eb.plan(0) {
        let b = eb.make_batch(&rows_idx);
        let (s, k, c) = spec.eval_batch(model, &b)?;
        sum += s;
        n += k;
        correct += c;
        rows += b.batch;
    }
    if n == 0 {
        return Err(TrainError::Invalid("evaluation: no token or example to score (each was cut to nothing)".into()));
    }
    let loss = sum / n as f64;
    if !loss.is_finite() {
        return Err(TrainError::Invalid(format!(
            "evaluation: the loss is {loss}: the model or adapter computes non-finite values"
        )));
    }
    Ok(if spec.task == Task::Classify {
        EvalMetrics { loss, accuracy: Some(correct as f64 / rows.max(1) as f64), perplexity: None }
    } else {
        EvalMetrics { loss, accuracy: None, perplexity: Some(loss.exp()) }
    })
}

fn save<B: Backend>(
    ckpts: &Checkpoints,
    st: &State,
    params: &[(String, Tensor<B, f32>)],
    opt: &AdamW<B, f32>,
    metrics: &Map<String, Value>,
) -> Result<()> {
    let weights: Vec<_> =
        params.iter().map(|(n, t)| Ok((n.clone(), (t.shape().to_vec(), t.to_vec()?)))).collect::<Result<_>>()?;
    let mut moments = Vec::new();
    for ((n, t), (m, v)) in params.iter().zip(opt.moments()?) {
        moments.push((format!("{n}.m"), (t.shape().to_vec(), m)));
        moments.push((format!("{n}.v"), (t.shape().to_vec(), v)));
    }
    let w = io::safetensors_bytes(&weights)?;
    let o = io::safetensors_bytes(&moments)?;
    let s = serde_json::to_vec_pretty(st).unwrap_or_default();
    ckpts.save(st.step, &[(TRAINABLE, &w), (OPTIMIZER, &o), (STATE, &s)], metrics)?;
    Ok(())
}

fn restore<B: Backend>(
    dir: &Path,
    w: &[u8],
    o: &[u8],
    params: &[(String, Tensor<B, f32>)],
    opt: &mut AdamW<B, f32>,
    step: u64,
) -> Result<()> {
    let read = |bytes: &[u8], what: &str| -> Result<std::collections::BTreeMap<String, io::HostTensor>> {
        let bad = |e: String| TrainError::Invalid(format!("{}: {e}", dir.join(what).display()));
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        st.tensors()
            .into_iter()
            .map(|(n, v)| {
                if v.dtype() != safetensors::Dtype::F32 {
                    return Err(bad(format!("tensor `{n}` is {:?}, not F32", v.dtype())));
                }
                let f = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Ok((n, (v.shape().to_vec(), f)))
            })
            .collect()
    };
    let weights = read(w, TRAINABLE)?;
    let moments = read(o, OPTIMIZER)?;
    // Every tensor the checkpoint trained must train now: none is dropped silently.
    if let Some(extra) = weights.keys().find(|k| !params.iter().any(|(n, _)| n == *k)) {
        return Err(TrainError::Invalid(format!(
            "{}: the checkpoint trains `{extra}`, which this run does not: it is from another method or model",
            dir.join(TRAINABLE).display()
        )));
    }
    let mut mom = Vec::new();
    for (n, t) in params {
        let get = |k: &str| {
            weights
                .get(k)
                .or_else(|| moments.get(k))
                .filter(|(s, _)| s == t.shape())
                .map(|(_, v)| v.clone())
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
    Ok(())
}

/// Write the final export: a PEFT adapter folder, or for full fine-tuning a Hugging Face folder of
/// the trained model. Returns its path and the bytes of its weights file.
pub fn export<B: Backend>(model: &Model<B>, out: &Path) -> Result<(PathBuf, u64)> {
    // Full fine-tuning: nothing but (perhaps) a task head in the adaptation.
    let (dir, file) = if model.adapt().is_empty() {
        let d = out.join("model");
        model.save_merged(&d)?;
        (d.clone(), d.join("model.safetensors"))
    } else {
        let d = out.join("adapter");
        model.save_adapter(&d, &model.source.display().to_string())?;
        (d.clone(), d.join(peft::WEIGHTS))
    };
    let extra = std::fs::metadata(dir.join(peft::EXTRA)).map(|m| m.len()).unwrap_or(0);
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) + extra;
    Ok((dir, bytes))
}

/// This process's peak resident set (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A base model with the adapter in `adapter` (a PEFT or tuna folder) installed, nothing trainable
/// (see [`tuna_models::model::AnyModel::open_adapted`]).
pub fn load_adapted<B: Backend>(dev: &Arc<B>, model: &Path, adapter: Option<&Path>) -> Result<Model<B>> {
    Ok(Model::open_adapted(dev, model, adapter)?)
}

/// Evaluate `model` (adapted) on `data` for `task`: what `tuna eval` prints.
#[allow(clippy::too_many_arguments)]
pub fn eval_file(
    model: &Model<impl Backend>,
    task: Task,
    data_path: &Path,
    fields: &Fields,
    labels: Option<&[String]>,
    verbalizers: Option<&[String]>,
    batch_size: usize,
    max_len: Option<usize>,
) -> Result<EvalMetrics> {
    let max_len = resolve_max_len(max_len, model.max_positions(), model.virtual_tokens(), min_len(task))?;
    let records = data::load(data_path, task, fields)?;
    let spec = TaskSpec::new(model, task, &records, labels, verbalizers)?;
    let enc = spec.encode(model, &records, data_path, max_len)?;
    evaluate(model, &spec, &Batcher::new(enc, batch_config(model, task, batch_size, max_len, false, 0))?)
}

/// How a run's batches are made: shuffled and bucketed by length for training, in order for
/// evaluation; padded on the side the architecture expects.
fn batch_config<B: Backend>(
    model: &Model<B>,
    task: Task,
    batch_size: usize,
    max_len: usize,
    shuffle: bool,
    seed: u64,
) -> BatchConfig {
    BatchConfig {
        batch_size,
        max_len: Some(max_len),
        truncate: Truncate::for_task(task),
        pad_side: if model.is_decoder() { PadSide::Left } else { PadSide::Right },
        pad_id: model.pad_id(),
        shuffle,
        bucket_window: if shuffle { 50 } else { 0 },
        drop_last: false,
        seed,
    }
}

/// A one-line description of evaluation results.
pub fn describe_eval(e: &EvalMetrics) -> String {
    describe(e)
}

/// One op kind's share of a profiled step.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileRow {
    pub kind: String,
    pub forward_calls: u64,
    pub forward_ms: f64,
    pub backward_calls: u64,
    pub backward_ms: f64,
}

/// Where a training step's time goes, per op kind, averaged over the measured steps.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub steps: u64,
    pub step_ms: f64,
    pub optimizer_ms: f64,
    pub tokens_per_s: f64,
    /// Sorted by total time, largest first; times per step.
    pub rows: Vec<ProfileRow>,
}

/// Run `warmup` then `steps` training steps of `cfg` (no checkpoints, nothing written) with
/// per-op timing on (see [`tuna_autograd::stats::set_profiling`]) and report where the time went.
pub fn profile<B: Backend>(dev: &Arc<B>, cfg: &TrainConfig, warmup: u64, steps: u64) -> Result<Profile> {
    use tuna_autograd::stats;
    let Setup { model, spec, mut batcher, params, .. } = setup(dev, cfg)?;
    let refs: Vec<&Tensor<B, f32>> = params.iter().map(|(_, t)| t).collect();
    let hp = AdamWParams { weight_decay: cfg.weight_decay as f32, ..AdamWParams::new(cfg.lr as f32) };
    let mut opt = AdamW::new(&refs, hp)?;
    let mut cursor = Cursor::default();
    model.adapt().set_training(true);
    let (mut total, mut optimizer, mut tokens) = (0.0f64, 0.0f64, 0usize);
    for i in 0..warmup + steps {
        if i == warmup {
            stats::reset();
            stats::set_profiling(true);
        }
        let batch = batcher.next_batch(&mut cursor);
        let t0 = Instant::now();
        stats::mark();
        accumulate_grads(&model, &spec, &batch, cfg.micro_batch, cfg.seed ^ (i << 8))?;
        let t1 = Instant::now();
        if let Some(c) = cfg.clip {
            clip_grad_norm(&refs, c)?;
        }
        opt.step()?;
        let _ = params[0].1.to_vec()?; // a device finishes the step before the clock stops
        if i >= warmup {
            total += t0.elapsed().as_secs_f64();
            optimizer += t1.elapsed().as_secs_f64();
            tokens += batch.real_tokens;
        }
    }
    stats::set_profiling(false);
    let snap = stats::snapshot();
    let n = steps.max(1) as f64;
    let mut kinds: Vec<&'static str> = snap.forward_time.keys().chain(snap.backward_time.keys()).copied().collect();
    kinds.sort();
    kinds.dedup();
    let ms = |t: Option<&stats::OpTime>| t.map_or(0.0, |t| t.nanos as f64 / 1e6 / n);
    let calls = |t: Option<&stats::OpTime>| t.map_or(0, |t| t.calls / steps.max(1));
    let mut rows: Vec<ProfileRow> = kinds
        .into_iter()
        .map(|k| ProfileRow {
            kind: k.to_string(),
            forward_calls: calls(snap.forward_time.get(k)),
            forward_ms: ms(snap.forward_time.get(k)),
            backward_calls: calls(snap.backward_time.get(k)),
            backward_ms: ms(snap.backward_time.get(k)),
        })
        .collect();
    rows.sort_by(|a, b| (b.forward_ms + b.backward_ms).total_cmp(&(a.forward_ms + a.backward_ms)));
    Ok(Profile {
        steps,
        step_ms: 1e3 * total / n,
        optimizer_ms: 1e3 * optimizer / n,
        tokens_per_s: tokens as f64 / total.max(1e-9),
        rows,
    })
}
