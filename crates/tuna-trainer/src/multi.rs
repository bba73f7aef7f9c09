//! Multi-task training (`tuna train --tasks`): one run over one frozen base model and several
//! tasks, each with its own adapter (any method but full fine-tuning, which would change the base
//! the others share) in the model's adapter bank, trained together on batches that mix the tasks'
//! rows.
//!
//! - Batches: every task's training examples form one pool, shuffled per epoch by the seed and cut
//!   into batches of `batch_size`: a batch holds each task's rows in proportion to its size, and an
//!   epoch sees every example once (the same rule as a single run over the concatenated files).
//! - A step: each task present runs its rows (as one sub-batch, in micro-batches) with its adapter
//!   installed, so its loss is exactly its own (its verbalizers or head, its label set, the
//!   first-token rule of soft prompts) and equals what `tuna eval` computes on its export. The
//!   step's loss is the mean of the tasks' mean losses weighted by their rows in the batch.
//!   (The bank's routed forward, `lm_loss_mixed`, returns one loss for all rows and its class
//!   scores share one verbalizer or class count across rows, so it cannot give per-task losses or
//!   classify tasks with different labels.)
//! - One optimizer update over all tasks' tensors: the gradient norm is clipped over all of them;
//!   each task's AdamW steps at its own learning rate (the method's default unless given) under
//!   the run's schedule. A task absent from a batch has no gradient and is not updated.
//! - Output: `adapters/<task>/` (a PEFT folder with its `tuna_task.json`, loadable by `tuna eval`
//!   and `tuna serve --adapters <out>/adapters`), `metrics.jsonl` (per-task losses on each line),
//!   `checkpoints/` (atomic, resumable bit for bit as single runs) and `summary.json` (per-task
//!   eval loss and accuracy).

use crate::batch::{Batcher, Cursor};
use crate::checkpoint::{Checkpoints, Direction, Fnv64};
use crate::config::TrainConfig;
use crate::data::{self, Task};
use crate::error::{Result, TrainError};
use crate::eval::{batch_config, describe, evaluate, EvalMetrics};
use crate::export::peak_rss_bytes;
use crate::fingerprint::BaseFingerprint;
use crate::limits::{check_method_size, min_len, resolve_max_len};
use crate::metrics::{MetricsLog, Split};
use crate::model::{Backend, Model};
use crate::progress::Progress;
use crate::run::{limit, non_finite, nothing_to_resume, schedule_of, weighted_parts};
use crate::run_dir::{self, OutMode};
use crate::schedule::Schedule;
use crate::state::{self, settings_of, Params, State, OPTIMIZER, TRAINABLE};
use crate::task::{TaskFile, TaskSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tuna_autograd::ops::elem::scale;
use tuna_autograd::optim::{clip_grad_norm, grad_norm, AdamW, AdamWParams};
use tuna_autograd::{no_grad, Tensor};
use tuna_kernels::rng::SplitMix64;
use tuna_models::adapt::Method;

/// A multi-task run: each task's settings as a single run of it would have them (its method,
/// task, data, labels, learning rate); the run-wide ones (model, batching, steps, schedule shape,
/// checkpoints, output) are the first task's, which the CLI makes equal in all.
#[derive(Debug, Clone)]
pub struct MultiConfig {
    /// The tasks file, for messages.
    pub tasks_file: PathBuf,
    /// Each task's name (its adapter's) and settings, in the file's order.
    pub tasks: Vec<(String, TrainConfig)>,
}

impl MultiConfig {
    /// The run-wide settings.
    fn run(&self) -> &TrainConfig {
        &self.tasks[0].1
    }
}

/// One task's numbers at the end of a multi-task run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSummary {
    pub name: String,
    pub method: String,
    pub task: String,
    pub trainable_params: usize,
    pub lr: f64,
    pub train_examples: usize,
    /// The training loss of the last step that had its rows.
    pub final_train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_perplexity: Option<f64>,
    /// Its adapter folder.
    pub export: String,
}

/// What a multi-task run ends with (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultiSummary {
    pub model: String,
    pub tasks: Vec<TaskSummary>,
    pub base_params: usize,
    pub steps: u64,
    /// The last step's loss (the tasks' losses weighted by their rows in its batch).
    pub final_train_loss: Option<f64>,
    /// The mean of the tasks' eval losses (what early stopping and the best checkpoint follow).
    pub eval_loss: Option<f64>,
    pub train_tokens: u64,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub stopped_early: bool,
}

/// One task of the run: its adapter's bank index, its spec, examples and tensors.
struct TaskRun<B: Backend> {
    name: String,
    cfg: TrainConfig,
    bank: usize,
    spec: TaskSpec,
    /// Its training examples (truncated to its length); batches are cut from them by row.
    batcher: Batcher,
    eval_batcher: Option<Batcher>,
    params: Vec<(String, Tensor<B, f32>)>,
    schedule: Schedule,
}

/// A batch's rows: `(task, example)`.
type Rows = Vec<(usize, usize)>;

/// Micro-batch losses (still on the device) and their weights.
type Pending<B> = Vec<(Tensor<B, f32>, f64)>;

/// The pool of every task's training examples, `(task, example)`, shuffled per epoch by the seed
/// and cut into batches: a pure function of the seed and epoch, so a cursor resumes it.
struct Mixer {
    pool: Vec<(usize, usize)>,
    batch_size: usize,
    seed: u64,
    plan: Option<(u64, Vec<Rows>)>,
}

impl Mixer {
    fn batches_per_epoch(&self) -> usize {
        self.pool.len().div_ceil(self.batch_size.max(1))
    }

    fn plan(&self, epoch: u64) -> Vec<Rows> {
        let mut order = self.pool.clone();
        SplitMix64::for_epoch(self.seed, epoch).shuffle(&mut order);
        order.chunks(self.batch_size.max(1)).map(<[(usize, usize)]>::to_vec).collect()
    }

    /// The rows at `cursor`, advancing it (a finished epoch rolls over first).
    fn next_rows(&mut self, cursor: &mut Cursor) -> Rows {
        if cursor.index >= self.batches_per_epoch() {
            *cursor = Cursor { epoch: cursor.epoch.saturating_add(1), index: 0 };
        }
        if self.plan.as_ref().is_none_or(|(e, _)| *e != cursor.epoch) {
            self.plan = Some((cursor.epoch, self.plan(cursor.epoch)));
        }
        let rows = self.plan.as_ref().map(|(_, p)| p[cursor.index].clone()).unwrap_or_default();
        cursor.index += 1;
        rows
    }
}

/// Attribute an error to task `name` of the tasks file `file`.
fn in_task<'a>(file: &'a Path, name: &'a str) -> impl Fn(TrainError) -> TrainError + 'a {
    move |e| TrainError::InTask { file: file.to_path_buf(), name: name.to_string(), source: Box::new(e) }
}

/// Load the model, install every task's adapter into its bank and load each task's data.
fn setup<B: Backend>(dev: &Arc<B>, cfg: &MultiConfig) -> Result<(Model<B>, Vec<TaskRun<B>>)> {
    let run = cfg.run();
    let mut model = Model::open(dev, &run.model, |_| false)?;
    let mut tasks = Vec::with_capacity(cfg.tasks.len());
    for (k, (name, t)) in cfg.tasks.iter().enumerate() {
        let task = (|| -> Result<TaskRun<B>> {
            if let Method::Full { .. } = t.method {
                return Err(TrainError::Invalid(
                    "full fine-tuning changes the base model the other tasks share, so it cannot be one task of \
                     several: train it alone (tuna train --method full)"
                        .into(),
                ));
            }
            let records = limit(data::load(&t.train, t.task, &t.fields)?, t.max_train_examples);
            let words = match (&t.prompt_init_text, &t.verbalizers, &t.labels) {
                (Some(w), _, _) => w.clone(),
                (None, Some(v), _) | (None, None, Some(v)) => v.join(" "),
                _ => data::LabelSet::from_examples(&records).labels().join(" "),
            };
            let max_len =
                resolve_max_len(t.max_len, model.max_positions(), t.method.virtual_tokens(), min_len(t.task))?;
            check_method_size(&t.method, model.shape().hidden)?;
            // Each task's new tensors seeded apart (two tasks of one method do not start equal).
            let seed = t.seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let bank = model.install_bank_adapter(name, &t.method, seed, Some(&words))?;
            let spec = model.with_bank_adapter(bank, |m| -> Result<TaskSpec> {
                let spec = TaskSpec::new(m, t.task, &records, t.labels.as_deref(), t.verbalizers.as_deref())?;
                if t.task == Task::Classify && !m.is_decoder() {
                    m.add_head(spec.labels.as_ref().map_or(2, |l| l.len()), seed)?;
                }
                Ok(spec)
            })?;
            let enc = spec.encode(&model, &records, &t.train, max_len)?;
            let batcher = Batcher::new(enc, batch_config(&model, t.task, t.batch_size, max_len, false, t.seed))?;
            let eval_batcher = match &t.eval {
                Some(p) => {
                    let r = limit(data::load(p, t.task, &t.fields)?, t.max_eval_examples);
                    let enc = spec.encode(&model, &r, p, max_len)?;
                    Some(Batcher::new(enc, batch_config(&model, t.task, t.batch_size, max_len, false, 0))?)
                }
                None => None,
            };
            let params: Vec<(String, Tensor<B, f32>)> =
                model.adapt().bank[bank].1.params().into_iter().map(|(p, t)| (format!("{name}/{p}"), t)).collect();
            if params.is_empty() {
                return Err(TrainError::Invalid("nothing to train: the method selects no tensor".into()));
            }
            Ok(TaskRun {
                name: name.clone(),
                cfg: t.clone(),
                bank,
                spec,
                batcher,
                eval_batcher,
                params,
                schedule: schedule_of(t)?,
            })
        })()
        .map_err(in_task(&cfg.tasks_file, name))?;
        tasks.push(task);
    }
    Ok((model, tasks))
}

/// The run's settings a resumed run must keep: the run-wide ones by flag, each task's own under
/// `task `<name>`: `, and the task names (a task added, removed or renamed is a change).
fn multi_settings<B: Backend>(tasks: &[TaskRun<B>]) -> BTreeMap<String, String> {
    const PER_TASK: [&str; 7] = [
        "--eval (its data)",
        "--method and its settings",
        "--task",
        "--labels",
        "--verbalizers",
        "--lr",
        "--prompt-init-text",
    ];
    let mut out = BTreeMap::new();
    out.insert("tasks".to_string(), tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "));
    for (k, t) in tasks.iter().enumerate() {
        for (key, v) in settings_of(&t.cfg, t.eval_batcher.as_ref().map(Batcher::fingerprint)) {
            if PER_TASK.contains(&key.as_str()) {
                out.insert(format!("task `{}`: {key}", t.name), v);
            } else if k == 0 {
                out.insert(key, v);
            }
        }
    }
    out
}

/// The fingerprint of the run's batches: each task's examples (after truncation), names, and the
/// batch size and seed.
fn fingerprint<B: Backend>(tasks: &[TaskRun<B>], batch_size: usize, seed: u64) -> u64 {
    let mut h = Fnv64::new();
    h.write(&(batch_size as u64).to_le_bytes());
    h.write(&seed.to_le_bytes());
    for t in tasks {
        h.write(t.name.as_bytes());
        h.write(&t.batcher.fingerprint().to_le_bytes());
    }
    h.finish()
}

/// Train the tasks of `cfg` together; returns the summary (also `out/summary.json`).
pub fn train_multi<B: Backend>(dev: &Arc<B>, cfg: &MultiConfig) -> Result<MultiSummary> {
    if cfg.tasks.is_empty() {
        return Err(TrainError::Invalid(format!("{}: no task", cfg.tasks_file.display())));
    }
    let run = cfg.run().clone();
    if run.out_mode == OutMode::Resume && !run.out.is_dir() {
        return Err(TrainError::Invalid(format!(
            "--resume: {}: no such folder (nothing to resume)",
            run.out.display()
        )));
    }
    run_dir::refuse_unsafe_out(&run.out)?;
    let _lock = run_dir::lock(&run.out)?;
    let mut inputs: Vec<&Path> = vec![run.model.as_path(), cfg.tasks_file.as_path()];
    for (_, t) in &cfg.tasks {
        inputs.push(&t.train);
        inputs.extend(t.eval.as_deref());
    }
    run_dir::check(&run.out, run.out_mode, &inputs)?;
    let (mut model, tasks) = setup(dev, cfg)?;
    if run.out_mode == OutMode::Overwrite {
        run_dir::clear(&run.out)?;
    }
    let mut opts: Vec<AdamW<B, f32>> = tasks
        .iter()
        .map(|t| {
            let refs: Vec<&Tensor<B, f32>> = t.params.iter().map(|(_, p)| p).collect();
            let hp = AdamWParams { weight_decay: run.weight_decay as f32, ..AdamWParams::new(t.cfg.lr as f32) };
            Ok(AdamW::with_storage(&refs, hp, run.optimizer_state)?)
        })
        .collect::<Result<_>>()?;
    let ckpts = Checkpoints::open(&run.out.join("checkpoints"), run.keep_last, Some(("eval_loss", Direction::Min)))?;
    let mut mixer = Mixer {
        pool: tasks
            .iter()
            .enumerate()
            .flat_map(|(k, t)| (0..t.batcher.examples().len()).map(move |i| (k, i)))
            .collect(),
        batch_size: run.batch_size,
        seed: run.seed,
        plan: None,
    };
    let mut st = State {
        step: 0,
        cursor: Cursor::default(),
        fingerprint: fingerprint(&tasks, run.batch_size, run.seed),
        best: None,
        evals_since_best: 0,
        train_tokens: 0,
        train_seconds: 0.0,
        last_loss: f64::NAN,
        base: Some(BaseFingerprint::of(&model)?),
        settings: Some(multi_settings(&tasks)),
        task_losses: Some(BTreeMap::new()),
    };
    let mut resumed_from = None;
    if matches!(run.out_mode, OutMode::Resume | OutMode::ResumeOrStart) {
        let latest = ckpts.latest_valid()?;
        for w in &latest.warnings {
            eprintln!("warning: {w}");
        }
        match latest.checkpoint {
            None => nothing_to_resume(&run, &latest.warnings)?,
            Some(ck) => {
                let saved = state::resumable(&ck, &st)?;
                let mut groups: Vec<(&Params<B>, &mut AdamW<B, f32>)> =
                    tasks.iter().map(|t| &t.params[..]).zip(opts.iter_mut()).collect();
                state::restore_groups(&ck.dir, ck.file(TRAINABLE)?, ck.file(OPTIMIZER)?, &mut groups, saved.step)?;
                eprintln!("resuming from {} (step {})", ck.dir.display(), saved.step);
                resumed_from = Some(saved.step);
                st = State { base: st.base, settings: st.settings, ..saved };
            }
        }
    }
    let mut log = MetricsLog::open(&run.out.join("metrics.jsonl"), resumed_from)?;
    let mut progress = Progress::new(run.steps, run.progress);
    let mut stopped_early = false;
    let mut last_eval: Option<Vec<Option<EvalMetrics>>> = None;
    model.adapt().set_training(true);
    while st.step < run.steps {
        let t0 = Instant::now();
        let rows = mixer.next_rows(&mut st.cursor);
        // Each task's rows, in task order (a pure function of the batch: resumes draw the same).
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &(k, i) in &rows {
            match groups.iter_mut().find(|(j, _)| *j == k) {
                Some((_, v)) => v.push(i),
                None => groups.push((k, vec![i])),
            }
        }
        groups.sort_by_key(|(k, _)| *k);
        let seed = run.seed ^ (st.step << 8);
        let mut pending: Vec<(usize, f64, Pending<B>)> = Vec::new();
        let mut tokens = 0;
        for (k, examples) in &groups {
            let t = &tasks[*k];
            let b = t.batcher.make_batch(examples);
            tokens += b.real_tokens;
            // The task's share of the step's loss: its rows in the batch.
            let share = examples.len() as f64 / rows.len().max(1) as f64;
            let losses = model
                .with_bank_adapter(t.bank, |m| -> Result<Pending<B>> {
                    let mut losses = Vec::new();
                    for (j, (mb, w)) in weighted_parts(m, &t.spec, &b, run.micro_batch)?.iter().enumerate() {
                        m.adapt().seed_dropout(seed ^ ((*k as u64) << 32) ^ j as u64);
                        let (loss, terms) = t.spec.loss(m, mb)?;
                        losses.push((no_grad(|| scale(&loss, 1.0))?, *w));
                        if terms > 0 {
                            scale(&loss, w * share)?.backward()?;
                        }
                    }
                    Ok(losses)
                })
                .map_err(in_task(&cfg.tasks_file, &t.name))?;
            pending.push((*k, share, losses));
        }
        let refs: Vec<&Tensor<B, f32>> = tasks.iter().flat_map(|t| t.params.iter().map(|(_, p)| p)).collect();
        let norm = match run.clip {
            Some(c) => clip_grad_norm(&refs, c)?,
            None => grad_norm(&refs)?,
        };
        let mut loss = 0.0;
        let mut task_losses = Map::new();
        for (k, share, losses) in pending {
            let mut l = 0.0;
            for (t, w) in losses {
                l += t.to_vec()?[0] as f64 * w;
            }
            loss += l * share;
            let rows = groups.iter().find(|(j, _)| *j == k).map_or(0, |(_, v)| v.len());
            task_losses.insert(tasks[k].name.clone(), json!({ "loss": l, "rows": rows }));
        }
        if !(loss.is_finite() && norm.is_finite()) {
            let bad = if loss.is_finite() { ("gradient norm", norm) } else { ("training loss", loss) };
            return Err(non_finite(st.step + 1, bad, &ckpts));
        }
        let mut lrs = Map::new();
        for (t, opt) in tasks.iter().zip(opts.iter_mut()) {
            let lr = t.schedule.lr(st.step);
            opt.hp.lr = lr as f32;
            opt.step()?;
            lrs.insert(t.name.clone(), json!(lr));
        }
        st.step += 1;
        last_eval = None;
        st.train_tokens += tokens as u64;
        st.train_seconds += t0.elapsed().as_secs_f64();
        st.last_loss = loss;
        let per_task = st.task_losses.get_or_insert_with(BTreeMap::new);
        for (name, v) in &task_losses {
            per_task.insert(name.clone(), v["loss"].as_f64().unwrap_or(f64::NAN));
        }
        let mut m = Map::new();
        m.insert("loss".into(), json!(loss));
        m.insert("lr".into(), Value::Object(lrs));
        m.insert("tokens".into(), json!(tokens));
        if run.clip.is_some() {
            m.insert("grad_norm".into(), json!(norm));
        }
        m.insert("tasks".into(), Value::Object(task_losses));
        log.log(st.step, Split::Train, &m)?;
        progress.update(st.step, loss, st.train_tokens as f64 / st.train_seconds.max(1e-9));

        let last = st.step == run.steps;
        let mut metrics = Map::new();
        let has_eval = tasks.iter().any(|t| t.eval_batcher.is_some());
        if has_eval && (st.step.is_multiple_of(run.eval_every.max(1)) || last) {
            model.adapt().set_training(false);
            let e = evaluate_all(&mut model, &tasks, &cfg.tasks_file);
            model.adapt().set_training(true);
            let e = e?;
            let mean = mean_loss(&e);
            let mut line = Map::new();
            line.insert("loss".into(), json!(mean));
            let mut per = Map::new();
            for (t, m) in tasks.iter().zip(&e) {
                if let Some(m) = m {
                    per.insert(t.name.clone(), Value::Object(m.as_map()));
                    progress.println(&format!("step {}: eval {}: {}", st.step, t.name, describe(m)));
                }
            }
            line.insert("tasks".into(), Value::Object(per));
            log.log(st.step, Split::Eval, &line)?;
            metrics.insert("eval_loss".into(), json!(mean));
            stopped_early = st.record_eval(mean, Direction::Min, run.patience);
            last_eval = Some(e);
        }
        if st.step.is_multiple_of(run.save_every.max(1)) || last || stopped_early || !metrics.is_empty() {
            let groups: Vec<(&Params<B>, &AdamW<B, f32>)> =
                tasks.iter().map(|t| &t.params[..]).zip(opts.iter()).collect();
            state::save_groups(&ckpts, &st, &groups, &metrics)?;
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
    let final_eval = match last_eval {
        Some(e) => e,
        None => evaluate_all(&mut model, &tasks, &cfg.tasks_file)?,
    };
    finish(cfg, &mut model, &tasks, &st, stopped_early, &final_eval)
}

/// Each task's evaluation (`None`: the task has no eval data), its adapter installed.
fn evaluate_all<B: Backend>(
    model: &mut Model<B>,
    tasks: &[TaskRun<B>],
    file: &Path,
) -> Result<Vec<Option<EvalMetrics>>> {
    tasks
        .iter()
        .map(|t| match &t.eval_batcher {
            Some(eb) => {
                model.with_bank_adapter(t.bank, |m| evaluate(m, &t.spec, eb)).map(Some).map_err(in_task(file, &t.name))
            }
            None => Ok(None),
        })
        .collect()
}

/// The mean eval loss over the tasks that have eval data.
fn mean_loss(e: &[Option<EvalMetrics>]) -> f64 {
    let losses: Vec<f64> = e.iter().flatten().map(|m| m.loss).collect();
    losses.iter().sum::<f64>() / losses.len().max(1) as f64
}

/// The end of a run: each task's adapter with its task file under `adapters/<name>/`, and
/// `summary.json`.
fn finish<B: Backend>(
    cfg: &MultiConfig,
    model: &mut Model<B>,
    tasks: &[TaskRun<B>],
    st: &State,
    stopped_early: bool,
    evals: &[Option<EvalMetrics>],
) -> Result<MultiSummary> {
    let run = cfg.run();
    let base_name = model.source.display().to_string();
    let mut summaries = Vec::new();
    for (t, e) in tasks.iter().zip(evals) {
        let dir = run.out.join("adapters").join(&t.name);
        model.save_bank_adapter(&t.name, &dir, &base_name).map_err(|e| in_task(&cfg.tasks_file, &t.name)(e.into()))?;
        // The task travels with the export, so that `tuna eval` scores classes in training's order.
        TaskFile {
            task: t.cfg.task.name().to_string(),
            labels: t.spec.labels.as_ref().map(|l| l.labels().to_vec()),
            verbalizers: t.cfg.verbalizers.clone(),
        }
        .write(&dir)?;
        summaries.push(TaskSummary {
            name: t.name.clone(),
            method: t.cfg.method.name().into(),
            task: t.cfg.task.name().into(),
            trainable_params: t.params.iter().map(|(_, p)| p.numel()).sum(),
            lr: t.cfg.lr,
            train_examples: t.batcher.examples().len(),
            final_train_loss: st.task_losses.as_ref().and_then(|l| l.get(&t.name).copied()),
            eval_loss: e.map(|e| e.loss),
            eval_accuracy: e.and_then(|e| e.accuracy),
            eval_perplexity: e.and_then(|e| e.perplexity),
            export: dir.display().to_string(),
        });
    }
    let summary = MultiSummary {
        model: run.model.display().to_string(),
        tasks: summaries,
        base_params: model.base_param_count(),
        steps: st.step,
        final_train_loss: st.last_loss.is_finite().then_some(st.last_loss),
        eval_loss: evals.iter().any(Option::is_some).then(|| mean_loss(evals)),
        train_tokens: st.train_tokens,
        train_seconds: st.train_seconds,
        tokens_per_s: st.train_tokens as f64 / st.train_seconds.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        stopped_early,
    };
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    crate::checkpoint::write_atomic(&run.out.join("summary.json"), text.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example of every task once per epoch, tasks mixed in the batches, the order a pure
    /// function of the seed and epoch (a resumed cursor draws the same rows).
    #[test]
    fn the_pool_mixes_tasks_and_sees_each_example_once_per_epoch() {
        let pool: Vec<(usize, usize)> = (0..3).map(|i| (0, i)).chain((0..9).map(|i| (1, i))).collect();
        let mut m = Mixer { pool: pool.clone(), batch_size: 4, seed: 5, plan: None };
        assert_eq!(m.batches_per_epoch(), 3);
        let mut cursor = Cursor::default();
        let epoch: Vec<Vec<(usize, usize)>> = (0..3).map(|_| m.next_rows(&mut cursor)).collect();
        let mut seen: Vec<(usize, usize)> = epoch.concat();
        seen.sort();
        assert_eq!(seen, pool);
        assert!(epoch.iter().any(|b| b.iter().any(|r| r.0 == 0) && b.iter().any(|r| r.0 == 1)), "{epoch:?}");
        let next = m.next_rows(&mut cursor);
        assert_eq!(cursor, Cursor { epoch: 1, index: 1 });
        let mut again = Mixer { pool, batch_size: 4, seed: 5, plan: None };
        assert_eq!(again.next_rows(&mut Cursor { epoch: 1, index: 0 }), next);
        assert_ne!(again.plan(1), again.plan(0));
    }
}
