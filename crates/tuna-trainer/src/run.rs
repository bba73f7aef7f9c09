//! The training loop: micro-batches with gradient accumulation, AdamW with warmup and decay,
//! clipping, evaluation, early stopping, metrics, atomic checkpoints and bit-for-bit resume.
//!
//! Output folder: `metrics.jsonl`, `checkpoints/step-N/` (trainable tensors, AdamW moments,
//! `state.json` with the data cursor), `adapter/` (the final PEFT folder; `model/` for full
//! fine-tuning: a Hugging Face folder of the trained model) and `summary.json`.

use crate::batch::{Batch, Batcher, Cursor};
use crate::checkpoint::{Checkpoints, Direction};
use crate::config::{Hurting, RunSummary, TrainConfig};
use crate::data::{self, Task};
use crate::error::{Result, TrainError};
use crate::eval::{batch_config, describe, evaluate, EvalMetrics};
use crate::export::{export, peak_rss_bytes};
use crate::fingerprint::BaseFingerprint;
use crate::limits::{check_method_size, min_len, resolve_max_len};
use crate::metrics::{MetricsLog, Split};
use crate::model::{Backend, Model, RunFloat};
use crate::progress::Progress;
use crate::run_dir::{self, OutMode};
use crate::schedule::Schedule;
use crate::state::{self, settings_of, State};
use crate::task::{TaskFile, TaskSpec};
use serde_json::{json, Map};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tuna_autograd::ops::elem::scale;
use tuna_autograd::optim::{clip_grad_norm, grad_norm, AdamW, AdamWParams};
use tuna_autograd::{no_grad, Tensor};

/// The metric early stopping and "best" follow: accuracy (higher) for classification, else loss.
fn best_metric(task: Task) -> (&'static str, Direction) {
    if task == Task::Classify {
        ("eval_accuracy", Direction::Max)
    } else {
        ("eval_loss", Direction::Min)
    }
}

/// What a run works on: the model with its method installed, the task, the batches.
pub(crate) struct Setup<B: Backend<E>, E: RunFloat> {
    pub(crate) model: Model<B, E>,
    pub(crate) spec: TaskSpec,
    pub(crate) batcher: Batcher,
    pub(crate) eval_batcher: Option<Batcher>,
    pub(crate) params: Vec<(String, Tensor<B, E>)>,
    /// The base weights' fingerprint, taken as loaded (a weight packed by `--base-precision` is
    /// read as its packed values; a resume checks the precision by name first).
    pub(crate) base: BaseFingerprint,
}

/// Load the data, the model (installing the method) and the task; check the schedule.
pub(crate) fn setup<B: Backend<E>, E: RunFloat>(dev: &Arc<B>, cfg: &TrainConfig) -> Result<Setup<B, E>> {
    // A step frees and reallocates the same buffers: keep freed pages for the next step.
    tuna_kernels::heap::keep_freed_memory();
    let mut train_records = data::load(&cfg.train, cfg.task, &cfg.fields)?;
    // With a held-out slice, the classes come from the whole training file (as a run without one
    // takes them), so a label only in the slice is one of them, not a data error.
    let labels = match (&cfg.labels, cfg.holdout, cfg.task) {
        (None, Some(_), Task::Classify) => Some(data::LabelSet::from_examples(&train_records).labels().to_vec()),
        _ => cfg.labels.clone(),
    };
    let held_out = match cfg.holdout {
        Some(k) if k == 0 || k >= train_records.len() => {
            return Err(TrainError::Invalid(format!(
                "--holdout {k}: expected 1 to {} (the training examples of {} but one)",
                train_records.len().saturating_sub(1),
                cfg.train.display()
            )))
        }
        Some(k) => Some(train_records.split_off(train_records.len() - k)),
        None => None,
    };
    let train_records = limit(train_records, cfg.max_train_examples);
    // A TEXT init has its text (checked by the CLI); CLASS_LABELS takes the label words.
    let words = match (&cfg.prompt_init_text, &cfg.verbalizers, &labels) {
        (Some(t), _, _) => t.clone(),
        (None, Some(v), _) | (None, None, Some(v)) => v.join(" "),
        _ => crate::data::LabelSet::from_examples(&train_records).labels().join(" "),
    };
    // With --base-precision the frozen block weights are packed as they load.
    let mut model = Model::open_for_with(dev, &cfg.model, &cfg.method, cfg.base_precision)?;
    model.name = cfg.model_name.clone();
    // Lengths against the model's positions before anything is allocated for the method.
    let max_len = resolve_max_len(cfg.max_len, model.max_positions(), cfg.method.virtual_tokens(), min_len(cfg.task))?;
    check_method_size(&cfg.method, model.shape().hidden)?;
    model.install(&cfg.method, cfg.seed, Some(&words))?;
    model.set_checkpointing(cfg.checkpoint_activations);
    let spec = TaskSpec::new(&model, cfg.task, &train_records, labels.as_deref(), cfg.verbalizers.as_deref())?;
    let eval_set = match (held_out, &cfg.eval) {
        (Some(h), _) => Some((cfg.train.clone(), h)),
        (None, Some(p)) => Some((p.clone(), limit(data::load(p, cfg.task, &cfg.fields)?, cfg.max_eval_examples))),
        (None, None) => None,
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
    let base = BaseFingerprint::of(&model)?;
    Ok(Setup { model, spec, batcher, eval_batcher, params, base })
}

/// The learning-rate schedule `cfg` asks for, checked.
pub(crate) fn schedule_of(cfg: &TrainConfig) -> Result<Schedule> {
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

/// `cfg.precision` names `E`, the element type the caller started the run in.
pub(crate) fn check_precision<E: RunFloat>(cfg: &TrainConfig) -> Result<()> {
    if E::NAME != cfg.precision.to_string() {
        return Err(TrainError::Invalid(format!(
            "the run is configured for --precision {} but was started in {} (the caller picks the type)",
            cfg.precision,
            E::NAME
        )));
    }
    Ok(())
}

/// Train as `cfg` says, in f32; returns the summary (also written to `out/summary.json`).
pub fn train<B: Backend>(dev: &Arc<B>, cfg: &TrainConfig) -> Result<RunSummary> {
    train_as::<B, f32>(dev, cfg)
}

/// [`train`] in element type `E`: f32, or bf16 mixed precision on CUDA (bf16 activations and
/// frozen weights, f32 masters, gradients and moments).
pub fn train_as<B: Backend<E>, E: RunFloat>(dev: &Arc<B>, cfg: &TrainConfig) -> Result<RunSummary> {
    check_precision::<E>(cfg)?;
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
    let mut s = setup(dev, cfg)?;
    crate::memory::trace("model and data loaded");
    let schedule = schedule_of(cfg)?;
    // Before any checkpoint is restored: the base weights are still the untrained ones.
    let baseline = untrained_losses(&mut s, cfg)?;
    crate::memory::trace("untrained losses");
    // Before anything is replaced or allocated for the optimizer: a run that will not fit says so.
    let plan = memory_plan(&mut s, cfg, dev)?;
    let mut window: Vec<(u64, f64)> = Vec::new();
    if cfg.out_mode == OutMode::Overwrite {
        // Only now that the new run's model and data have loaded does the old run go.
        run_dir::clear(&cfg.out)?;
    }
    let mut opt = optimizer(cfg, &s.params)?;
    let (metric_name, dir) = best_metric(cfg.task);
    let ckpts = Checkpoints::open(&cfg.out.join("checkpoints"), cfg.keep_last, Some((metric_name, dir)))?;
    let (mut st, resumed_from) = start_or_resume(cfg, &s, &mut opt, &ckpts)?;
    crate::memory::trace("optimizer");
    let mut log = MetricsLog::open(&cfg.out.join("metrics.jsonl"), resumed_from)?;
    let mut progress = Progress::new(cfg.steps, cfg.progress);
    let mut stopped_early = false;
    // The evaluation of the last step, reused by the summary (not computed twice).
    let mut last_eval: Option<EvalMetrics> = None;
    s.model.adapt().set_training(true);
    while st.step < cfg.steps {
        let t0 = Instant::now();
        let batch = s.batcher.next_batch(&mut st.cursor);
        let lr = schedule.lr(st.step);
        let out = training_step(&s, &mut opt, cfg, &batch, cfg.seed ^ (st.step << 8), lr)?;
        if !out.applied() {
            let bad = if out.loss.is_finite() { ("gradient norm", out.grad_norm) } else { ("training loss", out.loss) };
            // Inside the backward, a non-finite loss stops before any update; a non-finite gradient norm
            // is found after some tensors were updated.
            let updated = cfg.update_in_backward && bad.0 == "gradient norm";
            return Err(non_finite(st.step + 1, bad, &ckpts, updated));
        }
        st.step += 1;
        crate::memory::trace(&format!("step {}", st.step));
        // Only an evaluation after the last update describes the weights the run ends with.
        last_eval = None;
        st.train_tokens += batch.real_tokens as u64;
        st.train_seconds += t0.elapsed().as_secs_f64();
        st.last_loss = out.loss;
        if baseline.iter().any(|(step, _)| *step == st.step) {
            window.push((st.step, out.loss));
        }
        let mut m = Map::new();
        m.insert("loss".into(), json!(out.loss));
        m.insert("lr".into(), json!(lr));
        m.insert("tokens".into(), json!(batch.real_tokens));
        if cfg.clip.is_some() {
            m.insert("grad_norm".into(), json!(out.grad_norm));
        }
        log.log(st.step, Split::Train, &m)?;
        progress.update(st.step, out.loss, st.train_tokens as f64 / st.train_seconds.max(1e-9));

        let last = st.step == cfg.steps;
        let mut metrics = Map::new();
        if let Some(eb) = &s.eval_batcher {
            if st.step.is_multiple_of(cfg.eval_every.max(1)) || last {
                // Evaluation without dropout (as `tuna eval` and the summary see the model).
                s.model.adapt().set_training(false);
                let e = evaluate(&s.model, &s.spec, eb);
                s.model.adapt().set_training(true);
                let e = e?;
                last_eval = Some(e);
                log.log(st.step, Split::Eval, &e.as_map())?;
                progress.println(&format!("step {}: eval {}", st.step, describe(&e)));
                let v = if dir == Direction::Max { e.accuracy.unwrap_or(0.0) } else { e.loss };
                metrics.insert(metric_name.into(), json!(v));
                stopped_early = st.record_eval(v, dir, cfg.patience);
            }
        }
        if st.save_due(cfg.save_every, last, stopped_early, !metrics.is_empty()) {
            state::save(&ckpts, &st, &s.params, &opt, &metrics)?;
            crate::memory::trace("checkpoint saved");
        }
        if stopped_early {
            progress.println(&st.early_stop_note());
            break;
        }
    }
    progress.finish();
    s.model.adapt().set_training(false);
    // A resumed run that trained none of the window's steps (it had finished them) keeps the
    // verdict its earlier process wrote.
    let verdict = match (resumed_from, window.is_empty()) {
        (Some(_), true) => earlier_verdict(&cfg.out),
        _ => hurting(&baseline, &window),
    };
    finish(cfg, &s, &st, stopped_early, verdict, last_eval, plan.as_ref())
}

/// The memory plan of a CPU run (printed), checked against the memory available: a run predicted
/// not to fit is refused with the flags that would make it fit (unless `--no-memory-check`).
fn memory_plan<B: Backend<E>, E: RunFloat>(
    s: &mut Setup<B, E>,
    cfg: &TrainConfig,
    dev: &Arc<B>,
) -> Result<Option<crate::plan::MemoryPlan>> {
    if !dev.device_name().starts_with("cpu") {
        return Ok(None);
    }
    let numel: usize = s.params.iter().map(|(_, t)| t.numel()).sum();
    let per = cfg.optimizer_state.bytes_per_param();
    let first = s.batcher.next_batch(&mut crate::batch::Cursor::default());
    // A run that may resume counts what restoring its checkpoint holds (the plan is made before).
    let restore = match cfg.out_mode {
        OutMode::Resume | OutMode::ResumeOrStart => {
            let bf16 = cfg.optimizer_state == tuna_autograd::optim::MomentStorage::Bf16;
            state::restore_transient(s.params.iter().map(|(_, t)| t.numel()), bf16)
        }
        _ => 0,
    };
    // The plan advises: a probe that fails (the run itself will say why, if it fails too) skips it.
    let plan = match crate::plan::plan(s, cfg, &first, (numel * per) as u64, restore) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        Err(e) => {
            eprintln!("warning: no memory plan (its probe failed: {e})");
            tuna_autograd::optim::zero_grad(&s.params.iter().map(|(_, t)| t).collect::<Vec<_>>());
            return Ok(None);
        }
    };
    if cfg.progress || std::env::var_os("TUNA_MEM_TRACE").is_some() {
        eprintln!("{}", plan.describe());
    }
    let avail = crate::plan::available_bytes().map_err(TrainError::Invalid)?;
    if let (true, Some(avail)) = (cfg.memory_check, avail) {
        if plan.peak() > avail {
            let fixes = plan.fits_with(cfg, avail);
            let fixes = if fixes.is_empty() {
                "no change of --checkpoint-activations, --optimizer-state, --base-precision or --micro-batch alone fits; try a shorter --max-len".to_string()
            } else {
                fixes
                    .iter()
                    .map(|(f, p)| format!("{f} (peak {})", crate::human_bytes(*p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(TrainError::Invalid(format!(
                "the memory plan predicts a peak of {} but {} is available: {fixes}; --no-memory-check starts anyway\n{}",
                crate::human_bytes(plan.peak()),
                crate::human_bytes(avail),
                plan.describe()
            )));
        }
    }
    Ok(Some(plan))
}

/// Training steps at the end of a run whose loss is compared with the untrained model's on the
/// same batches (those after warmup among them).
pub const HURT_WINDOW: u64 = 10;

/// The untrained model's loss (the method set aside; a task head at its init) on each batch of the
/// last [`HURT_WINDOW`] steps after warmup, by step: the batches are a pure function of the data,
/// seed and step, so they are replayed here before training.
fn untrained_losses<B: Backend<E>, E: RunFloat>(s: &mut Setup<B, E>, cfg: &TrainConfig) -> Result<Vec<(u64, f64)>> {
    let first = cfg.warmup.max(cfg.steps.saturating_sub(HURT_WINDOW)) + 1;
    if first > cfg.steps {
        return Ok(Vec::new());
    }
    // Step k draws its batch with the cursor after k - 1 batches: epoch (k-1) / per-epoch, index
    // (k-1) % per-epoch (next_batch rolls over at the end of an epoch), so the replay starts there
    // instead of drawing every batch before the window.
    let per_epoch = s.batcher.batches_per_epoch().max(1) as u64;
    let mut cursor = Cursor { epoch: (first - 1) / per_epoch, index: ((first - 1) % per_epoch) as usize };
    let batches: Vec<(u64, Batch)> =
        (first..=cfg.steps).map(|step| (step, s.batcher.next_batch(&mut cursor))).collect();
    let (spec, micro) = (&s.spec, cfg.micro_batch);
    s.model.without_adaptation(|m| {
        tuna_autograd::no_grad(|| {
            batches
                .iter()
                .map(|(step, b)| {
                    let mut sum = 0.0;
                    for (p, w) in weighted_parts(m, spec, b, micro)? {
                        sum += spec.loss(m, &p)?.0.value()? * w;
                    }
                    Ok((*step, sum))
                })
                .collect()
        })
    })
}

/// The hurting verdict of the summary a finished run left in `out` (none: no summary, or not hurting).
fn earlier_verdict(out: &Path) -> Option<Hurting> {
    let text = std::fs::read_to_string(out.join("summary.json")).ok()?;
    serde_json::from_str::<RunSummary>(&text).ok()?.hurting
}

/// The mean training and untrained losses over the window's steps this process trained (by step
/// number: a resumed run trained only the window's last steps, an early stop only its first),
/// when the training loss is the higher: the adaptation is hurting.
fn hurting(baseline: &[(u64, f64)], window: &[(u64, f64)]) -> Option<Hurting> {
    let pairs: Vec<(f64, f64)> =
        window.iter().filter_map(|(step, l)| baseline.iter().find(|(b, _)| b == step).map(|(_, u)| (*l, *u))).collect();
    let k = pairs.len();
    if k == 0 {
        return None;
    }
    let train = pairs.iter().map(|(l, _)| l).sum::<f64>() / k as f64;
    let untrained = pairs.iter().map(|(_, u)| u).sum::<f64>() / k as f64;
    (train > untrained).then_some(Hurting { steps: k as u64, train_loss: train, untrained_loss: untrained })
}

/// The state a run starts from: fresh, or (resuming) a checkpoint's, checked and restored into the
/// parameters and the optimizer; with the step resumed from.
fn start_or_resume<B: Backend<E>, E: RunFloat>(
    cfg: &TrainConfig,
    s: &Setup<B, E>,
    opt: &mut AdamW<B, E>,
    ckpts: &Checkpoints,
) -> Result<(State, Option<u64>)> {
    let st = State {
        fingerprint: s.batcher.fingerprint(),
        last_loss: f64::NAN,
        base: Some(s.base.clone()),
        settings: Some(settings_of(cfg, s.eval_batcher.as_ref().map(Batcher::fingerprint))),
        ..State::default()
    };
    if !matches!(cfg.out_mode, OutMode::Resume | OutMode::ResumeOrStart) {
        return Ok((st, None));
    }
    let latest = ckpts.latest_valid()?;
    for w in &latest.warnings {
        eprintln!("warning: {w}");
    }
    let Some(ck) = latest.checkpoint else {
        nothing_to_resume(cfg, &latest.warnings)?;
        return Ok((st, None));
    };
    let data = format!("the training data ({})", cfg.train.display());
    let saved = state::resumable(&ck, &st, &data)?;
    state::restore(&ck, &s.params, opt, saved.step)?;
    eprintln!("resuming from {} (step {})", ck.dir.display(), saved.step);
    let step = saved.step;
    Ok((State { base: st.base, settings: st.settings, ..saved }, Some(step)))
}

/// The end of a run: the final evaluation, the export with its task file, and `summary.json`.
fn finish<B: Backend<E>, E: RunFloat>(
    cfg: &TrainConfig,
    s: &Setup<B, E>,
    st: &State,
    stopped_early: bool,
    hurting: Option<Hurting>,
    last_eval: Option<EvalMetrics>,
    plan: Option<&crate::plan::MemoryPlan>,
) -> Result<RunSummary> {
    let final_eval: Option<EvalMetrics> = match (&s.eval_batcher, last_eval) {
        (Some(_), Some(e)) => Some(e),
        (Some(eb), None) => Some(evaluate(&s.model, &s.spec, eb)?),
        (None, _) => None,
    };
    let (export, bytes) = export(&s.model, &cfg.out)?;
    // The task travels with the export, so that `tuna eval` scores classes in training's order.
    TaskFile {
        task: cfg.task.name().to_string(),
        labels: s.spec.labels.as_ref().map(|l| l.labels().to_vec()),
        verbalizers: cfg.verbalizers.clone(),
        base_precision: (cfg.base_precision != Default::default()).then(|| cfg.base_precision.to_string()),
    }
    .write(&export)?;
    let summary = RunSummary {
        base_products: crate::state::base_products(cfg.base_precision),
        predicted_peak_bytes: plan.map(|p| p.peak()),
        peak_heap_bytes: crate::memory::max(),
        base_precision: Some(cfg.base_precision.to_string()),
        tf32: Some(cfg.tf32),
        precision: Some(cfg.precision.to_string()),
        method: cfg.method.name().into(),
        model: cfg.model_name.clone().unwrap_or_else(|| cfg.model.display().to_string()),
        task: cfg.task.name().to_string(),
        trainable_params: s.params.iter().map(|(_, t)| t.numel()).sum(),
        base_params: s.model.base_param_count(),
        steps: st.step,
        final_train_loss: Some(st.last_loss),
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
        lr: Some(cfg.lr),
        warmup: Some(cfg.warmup),
        hurting,
    };
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    crate::checkpoint::write_atomic(&cfg.out.join("summary.json"), text.as_bytes())?;
    Ok(summary)
}

/// Forward and backward of `batch` in micro-batches of `micro` rows, each loss weighted by its
/// share of the batch's loss terms (so the accumulated gradients are the full batch's). The losses
/// stay on the device until [`PendingLoss::read`], so a step waits for the device once, not once
/// per micro-batch. Dropout is seeded per micro-batch from `seed`.
pub(crate) fn accumulate_grads<B: Backend<E>, E: RunFloat>(
    model: &Model<B, E>,
    spec: &TaskSpec,
    batch: &Batch,
    micro: usize,
    seed: u64,
) -> Result<PendingLoss<B, E>> {
    let parts = weighted_parts(model, spec, batch, micro)?;
    let mut losses = Vec::with_capacity(parts.len());
    for (k, (mb, w)) in parts.iter().enumerate() {
        model.adapt().seed_dropout(seed ^ k as u64);
        let (loss, terms) = spec.loss(model, mb)?;
        // The loss's value: the one the loss op computed (in f32 on a bf16 tape, whose element is
        // coarser), else the tensor without its graph (x * 1 is exact), read with the others at
        // the end of the step; taken before the backward, so a profile charges that copy, not the
        // backward, to the forward ops.
        losses.push((LossValue::of(&loss)?, *w));
        if terms > 0 {
            scale(&loss, *w)?.backward()?;
        }
        // The micro-batch's activations are freed here.
        drop(loss);
        // Profiling: the next forward op is timed from here, not from before this backward.
        tuna_autograd::stats::mark();
    }
    Ok(PendingLoss { losses })
}

/// `batch` in micro-batches of `micro` rows, each with its share of the batch's loss terms, so
/// the weighted micro-batch losses sum to the full batch's mean (training and the untrained
/// baseline weigh them alike).
pub(crate) fn weighted_parts<B: Backend<E>, E: RunFloat>(
    model: &Model<B, E>,
    spec: &TaskSpec,
    batch: &Batch,
    micro: usize,
) -> Result<Vec<(Batch, f64)>> {
    let parts = batch.split(micro.max(1))?;
    let terms: Vec<usize> = parts.iter().map(|p| spec.terms(model, p)).collect();
    let total = terms.iter().sum::<usize>().max(1) as f64;
    Ok(parts.into_iter().zip(terms).map(|(p, t)| (p, t as f64 / total)).collect())
}

/// One micro-batch's loss: known on the host already, or still on the device.
pub(crate) enum LossValue<B: Backend<E>, E: RunFloat> {
    Known(f64),
    OnDevice(Tensor<B, E>),
}

impl<B: Backend<E>, E: RunFloat> LossValue<B, E> {
    /// The value `loss`'s op computed (in f32 on a bf16 tape, whose element is coarser), else the
    /// tensor without its graph (x * 1 is exact), to read later.
    pub(crate) fn of(loss: &Tensor<B, E>) -> Result<Self> {
        Ok(match loss.computed_value() {
            Some(v) => LossValue::Known(v),
            None => LossValue::OnDevice(no_grad(|| scale(loss, 1.0))?),
        })
    }

    /// The value (waiting for the device where it is still there).
    pub(crate) fn read(self) -> Result<f64> {
        Ok(match self {
            LossValue::Known(v) => v,
            LossValue::OnDevice(t) => t.value()?,
        })
    }
}

/// A step's micro-batch losses and weights (each known, or still on the device).
pub(crate) struct PendingLoss<B: Backend<E>, E: RunFloat> {
    losses: Vec<(LossValue<B, E>, f64)>,
}

impl<B: Backend<E>, E: RunFloat> PendingLoss<B, E> {
    /// The batch's mean loss (the weighted sum, in f64, in micro-batch order), or the first
    /// non-finite micro-batch loss. The first read waits for the device; the others are ready.
    pub(crate) fn read(self) -> Result<f64> {
        let mut sum = 0.0f64;
        for (loss, w) in self.losses {
            let l = loss.read()?;
            if !l.is_finite() {
                return Ok(l);
            }
            sum += l * w;
        }
        Ok(sum)
    }
}

/// AdamW over `params` with `cfg`'s learning rate and weight decay.
pub(crate) fn optimizer<B: Backend<E>, E: RunFloat>(
    cfg: &TrainConfig,
    params: &[(String, Tensor<B, E>)],
) -> Result<AdamW<B, E>> {
    let refs: Vec<&Tensor<B, E>> = params.iter().map(|(_, t)| t).collect();
    let hp = AdamWParams { weight_decay: cfg.weight_decay as f32, ..AdamWParams::new(cfg.lr as f32) };
    Ok(AdamW::with_storage(&refs, hp, cfg.optimizer_state)?)
}

/// What one training step did.
pub(crate) struct StepOutcome {
    /// The batch's mean loss (non-finite: the step stopped before any update).
    pub loss: f64,
    /// The gradient norm before any clipping (non-finite: no update).
    pub grad_norm: f64,
    /// Seconds in the forward and backward passes (the rest of the step is the optimizer's). On
    /// the CPU the work itself; on CUDA the time to queue it (the device's compute lands in the
    /// rest of the step, which waits for it).
    pub forward_backward_s: f64,
}

impl StepOutcome {
    /// Whether the weights were updated: a finite loss and a finite gradient norm (computed
    /// with or without clipping, so a NaN gradient is never applied).
    pub fn applied(&self) -> bool {
        self.loss.is_finite() && self.grad_norm.is_finite()
    }
}

/// One training step, the same for `train` and `profile`: forward and backward of `batch` in
/// micro-batches (see [`accumulate_grads`]), then clipping and the AdamW update at `lr`, unless
/// the loss or the clipped norm is not finite (then nothing is updated).
pub(crate) fn training_step<B: Backend<E>, E: RunFloat>(
    s: &Setup<B, E>,
    opt: &mut AdamW<B, E>,
    cfg: &TrainConfig,
    batch: &Batch,
    seed: u64,
    lr: f64,
) -> Result<StepOutcome> {
    if cfg.update_in_backward {
        return step_in_backward(s, opt, cfg, batch, seed, lr);
    }
    let t0 = Instant::now();
    // Profiling: the first forward op is timed from here.
    tuna_autograd::stats::mark();
    let pending = accumulate_grads(&s.model, &s.spec, batch, cfg.micro_batch, seed)?;
    let forward_backward_s = t0.elapsed().as_secs_f64();
    let refs: Vec<&Tensor<B, E>> = s.params.iter().map(|(_, t)| t).collect();
    // The step's one wait for the device: the clip's norm read (or, without clipping, the loss's).
    // A non-finite loss is never applied (`StepOutcome::applied`), whatever the norm.
    let grad_norm = match cfg.clip {
        Some(c) => clip_grad_norm(&refs, c)?,
        None => grad_norm(&refs)?,
    };
    let loss = pending.read()?;
    let grad_norm = if loss.is_finite() { grad_norm } else { f64::NAN };
    let out = StepOutcome { loss, grad_norm, forward_backward_s };
    if out.applied() {
        opt.hp.lr = lr as f32;
        opt.step()?;
    }
    Ok(out)
}

/// [`training_step`] with AdamW inside the backward (`--update-in-backward`): one forward and
/// backward of the whole batch (the CLI refuses micro-batches and clipping with it), each
/// trainable tensor updated as soon as its gradient is complete. The loss is read before the
/// backward (a non-finite loss updates nothing); a non-finite gradient stops the updates where it
/// shows (the run then stops, as after any non-finite gradient).
fn step_in_backward<B: Backend<E>, E: RunFloat>(
    s: &Setup<B, E>,
    opt: &mut AdamW<B, E>,
    cfg: &TrainConfig,
    batch: &Batch,
    seed: u64,
    lr: f64,
) -> Result<StepOutcome> {
    let t0 = Instant::now();
    tuna_autograd::stats::mark();
    let mut parts = weighted_parts(&s.model, &s.spec, batch, cfg.micro_batch)?;
    if parts.len() != 1 {
        return Err(TrainError::Invalid(format!(
            "--update-in-backward needs one pass per step: --micro-batch {} splits the batch of {} into {}",
            cfg.micro_batch,
            batch.batch,
            parts.len()
        )));
    }
    let (mb, w) = parts.pop().expect("one part");
    s.model.adapt().seed_dropout(seed);
    let (loss, terms) = s.spec.loss(&s.model, &mb)?;
    let value = loss.value()?;
    opt.hp.lr = lr as f32;
    if !value.is_finite() || terms == 0 {
        let out = StepOutcome { loss: value, grad_norm: 0.0, forward_backward_s: t0.elapsed().as_secs_f64() };
        if out.applied() {
            // Nothing to differentiate: the step still counts (as `training_step`'s would).
            opt.step()?;
        }
        return Ok(out);
    }
    let done = opt.backward_and_step(&scale(&loss, w)?)?;
    drop(loss);
    tuna_autograd::stats::mark();
    let grad_norm = if done.non_finite.is_some() { f64::NAN } else { done.grad_sq_norm.sqrt() };
    Ok(StepOutcome { loss: value, grad_norm, forward_backward_s: t0.elapsed().as_secs_f64() })
}

/// `--resume` found no valid checkpoint: an error, unless `--resume-or-start` and the folder holds
/// no run (starting anew there would overwrite the old run's log).
pub(crate) fn nothing_to_resume(cfg: &TrainConfig, skipped: &[String]) -> Result<()> {
    // A run killed before its first checkpoint left only its log: starting anew loses nothing.
    let found: Vec<&str> = run_dir::existing_run(&cfg.out).into_iter().filter(|&n| n != "metrics.jsonl").collect();
    let why = if skipped.is_empty() {
        "no checkpoint was saved".to_string()
    } else {
        let n = skipped.len();
        if n == 1 {
            "its one checkpoint is corrupt; see the warning above".into()
        } else {
            format!("all {n} checkpoints are corrupt; see the warnings above")
        }
    };
    match cfg.out_mode {
        OutMode::ResumeOrStart if found.is_empty() => Ok(()),
        OutMode::ResumeOrStart => Err(TrainError::Invalid(format!(
            "{}: nothing to resume ({why}), but the folder holds a run ({}): --overwrite starts anew",
            cfg.out.display(),
            found.join(", ")
        ))),
        // The advice that can be followed: --resume-or-start refuses a folder that holds more than a log.
        _ if found.is_empty() => Err(TrainError::Invalid(format!(
            "{}: nothing to resume ({why}): --overwrite (or --resume-or-start) starts a new run there",
            cfg.out.display()
        ))),
        _ => Err(TrainError::Invalid(format!(
            "{}: nothing to resume ({why}): --overwrite starts a new run there (replacing the folder's run: {})",
            cfg.out.display(),
            found.join(", ")
        ))),
    }
}

pub(crate) fn limit<T>(mut v: Vec<T>, n: Option<usize>) -> Vec<T> {
    if let Some(n) = n {
        v.truncate(n);
    }
    v
}

pub(crate) fn non_finite(
    step: u64,
    (what, value): (&'static str, f64),
    ckpts: &Checkpoints,
    in_backward: bool,
) -> TrainError {
    let kept = match ckpts.steps().ok().and_then(|s| s.last().copied()) {
        Some(s) => format!("The newest checkpoint, step {s}, is kept ({})", ckpts.step_dir(s).display()),
        None => format!(
            "No checkpoint has been saved yet ({} holds none): there is nothing to resume",
            ckpts.dir().display()
        ),
    };
    TrainError::NonFinite { step, what, value, kept, in_backward }
}

#[cfg(test)]
#[path = "run_tests.rs"]
pub(crate) mod tests;
