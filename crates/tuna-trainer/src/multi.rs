//! Multi-task training (`tuna train --tasks`): one run over one frozen base model and several
//! tasks, each with its own adapter (any method but full fine-tuning, which would change the base
//! the others share) in the model's adapter bank, trained together on batches that mix the tasks'
//! rows.
//!
//! - Batches: every task's training examples form one pool, shuffled per epoch by the seed and cut
//!   into batches of `batch_size`: a batch holds each task's rows in proportion to its size, and an
//!   epoch sees every example once (the same rule as a single run over the concatenated files).
//! - A step: one forward of the mixed batch (in micro-batches), each row routed to its task's
//!   adapter in the bank (`AnyModel::forward_mixed`: each row's outputs are what it computes alone
//!   with its adapter installed); from the outputs each task's mean loss over its rows: the causal
//!   LM loss over its kept targets, or the cross-entropy of its class scores (its verbalizer tokens'
//!   logits at the last position on decoders, its own head on BERT: tasks may have different label
//!   sets). The step's loss is the tasks' mean losses weighted by their rows in the batch. (The
//!   bank's `lm_loss_mixed` gives one loss over all rows and `class_scores_mixed` one class count
//!   across rows, so the per-task losses are taken from `forward_mixed`'s outputs here.)
//!   Evaluation runs each task's eval data with its adapter installed: what `tuna eval` computes
//!   on its export.
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
use crate::model::{Backend, Model, RunFloat};
use crate::progress::Progress;
use crate::run::{limit, non_finite, nothing_to_resume, schedule_of, LossValue};
use crate::run_dir::{self, OutMode};
use crate::schedule::Schedule;
use crate::state::{self, settings_of, State};
use crate::task::{TaskFile, TaskSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tuna_autograd::ops::elem::{add, mean_pool, scale, slice_cols};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::optim::{clip_grad_norm, grad_norm, AdamW, AdamWParams};
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::rng::SplitMix64;
use tuna_models::adapt::mixed::gather_rows;
use tuna_models::adapt::Method;
use tuna_models::mixed_model::Route;
use tuna_models::IGNORE_INDEX;

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
    /// What the run computed in: `f32`, or `bf16` mixed precision (`--precision`).
    pub precision: String,
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
    /// How the frozen block weights were held (`--base-precision`: f32, bf16, int8, q4; absent in
    /// older summaries, which were f32).
    #[serde(default)]
    pub base_precision: Option<String>,
    /// How a bf16, int8 or q4 base's products ran on the CPU, as in a single-task run's summary
    /// (absent for other bases and in older summaries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_products: Option<String>,
}

/// One task of the run: its adapter's bank index, its spec, examples and tensors.
struct TaskRun<B: Backend<E>, E: RunFloat> {
    name: String,
    cfg: TrainConfig,
    bank: usize,
    spec: TaskSpec,
    /// Its training examples (truncated to its length); batches are cut from them by row.
    batcher: Batcher,
    eval_batcher: Option<Batcher>,
    params: Vec<(String, Tensor<B, E>)>,
    schedule: Schedule,
}

/// A batch's rows: `(task, example)`.
type Rows = Vec<(usize, usize)>;

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
/// The model and every task of a run.
type Loaded<B, E> = (Model<B, E>, Vec<TaskRun<B, E>>);

fn setup<B: Backend<E>, E: RunFloat>(dev: &Arc<B>, cfg: &MultiConfig) -> Result<Loaded<B, E>> {
    // A step frees and reallocates the same buffers: keep freed pages for the next step.
    tuna_kernels::heap::keep_freed_memory();
    let run = cfg.run();
    let mut model = Model::open_with(dev, &run.model, |_| false, run.base_precision)?;
    if model.is_encoder_decoder() {
        return Err(TrainError::Invalid(
            "multi-task training (--tasks) runs mixed-adapter batches, built for GPT-2, Llama and BERT, not yet for \
             T5: train each task alone"
                .into(),
        ));
    }
    let mut tasks = Vec::with_capacity(cfg.tasks.len());
    for (k, (name, t)) in cfg.tasks.iter().enumerate() {
        let task = (|| -> Result<TaskRun<B, E>> {
            if let Method::Full { .. } = t.method {
                return Err(TrainError::Invalid(
                    "full fine-tuning changes the base model the other tasks share, so it cannot be one task of \
                     several: train it alone (tuna train --method full)"
                        .into(),
                ));
            }
            if t.task != Task::Classify && !model.is_decoder() {
                return Err(TrainError::Invalid(format!(
                    "the {} task needs a decoder (GPT-2, Llama); BERT classifies",
                    t.task.name()
                )));
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
            let params: Vec<(String, Tensor<B, E>)> =
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
/// `task `<name>`: ` (its training data's fingerprint too, so that changed data is named by task
/// before the run's fingerprint refuses it), and the task names (a task added, removed or renamed
/// is a change).
fn multi_settings<B: Backend<E>, E: RunFloat>(tasks: &[TaskRun<B, E>]) -> BTreeMap<String, String> {
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
        out.insert(format!("task `{}`: --train (its data)", t.name), format!("{:016x}", t.batcher.fingerprint()));
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
fn fingerprint<B: Backend<E>, E: RunFloat>(tasks: &[TaskRun<B, E>], batch_size: usize, seed: u64) -> u64 {
    let mut h = Fnv64::new();
    h.write(&(batch_size as u64).to_le_bytes());
    h.write(&seed.to_le_bytes());
    for t in tasks {
        h.write(t.name.as_bytes());
        h.write(&t.batcher.fingerprint().to_le_bytes());
    }
    h.finish()
}

/// Train the tasks of `cfg` together in f32; returns the summary (also `out/summary.json`).
pub fn train_multi<B: Backend>(dev: &Arc<B>, cfg: &MultiConfig) -> Result<MultiSummary> {
    train_multi_as::<B, f32>(dev, cfg)
}

/// [`train_multi`] in element type `E` (bf16 mixed precision on CUDA: the run-wide
/// `precision` must name `E`).
pub fn train_multi_as<B: Backend<E>, E: RunFloat>(dev: &Arc<B>, cfg: &MultiConfig) -> Result<MultiSummary> {
    if cfg.tasks.is_empty() {
        return Err(TrainError::Invalid(format!("{}: no task", cfg.tasks_file.display())));
    }
    let run = cfg.run().clone();
    crate::run::check_precision::<E>(&run)?;
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
    let base = BaseFingerprint::of(&model)?;
    if run.out_mode == OutMode::Overwrite {
        run_dir::clear(&run.out)?;
    }
    let mut opts: Vec<AdamW<B, E>> = tasks
        .iter()
        .map(|t| {
            let refs: Vec<&Tensor<B, E>> = t.params.iter().map(|(_, p)| p).collect();
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
        fingerprint: fingerprint(&tasks, run.batch_size, run.seed),
        last_loss: f64::NAN,
        base: Some(base),
        settings: Some(multi_settings(&tasks)),
        task_losses: Some(BTreeMap::new()),
        ..State::default()
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
                let data = format!("the tasks' training data (the train files of {})", cfg.tasks_file.display());
                let saved = state::resumable(&ck, &st, &data)?;
                let mut groups: Vec<state::GroupMut<'_, B, E>> =
                    tasks.iter().map(|t| &t.params[..]).zip(opts.iter_mut()).collect();
                state::restore_groups(&ck, &mut groups, saved.step)?;
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
        // Dropout is seeded per step and micro-batch, so a resumed run draws the same masks.
        let seed = run.seed ^ (st.step << 8);
        // Each task's loss terms in the batch, and its rows: its share of the step's loss.
        let terms: Vec<usize> = rows.iter().map(|&(k, i)| row_terms(&model, &tasks[k], i)).collect();
        let (mut task_terms, mut task_rows) = (vec![0usize; tasks.len()], vec![0usize; tasks.len()]);
        for (&(k, _), &n) in rows.iter().zip(&terms) {
            task_terms[k] += n;
            task_rows[k] += 1;
        }
        let tokens: usize = rows.iter().map(|&(k, i)| tasks[k].batcher.examples()[i].ids.len()).sum();
        // Micro-batches of the mixed rows, each one routed forward; a task's loss in a micro-batch
        // weighs its share of the task's terms in the batch (so the sum is the full batch's).
        let micro = run.micro_batch.max(1);
        // (task, its loss: known, or on the device; its weight)
        let mut pending: Vec<(usize, LossValue<B, E>, f64)> = Vec::new();
        for (j, (part, part_terms)) in rows.chunks(micro).zip(terms.chunks(micro)).enumerate() {
            model.adapt().seed_dropout(seed ^ j as u64);
            let mut sum: Option<Tensor<B, E>> = None;
            for (k, loss) in mixed_losses(&model, &tasks, part, &cfg.tasks_file)? {
                let n: usize = part.iter().zip(part_terms).filter(|((t, _), _)| *t == k).map(|(_, n)| n).sum();
                if n == 0 {
                    continue;
                }
                let w = n as f64 / task_terms[k] as f64;
                let share = task_rows[k] as f64 / rows.len() as f64;
                pending.push((k, LossValue::of(&loss)?, w));
                let weighted = scale(&loss, w * share)?;
                sum = Some(match sum {
                    None => weighted,
                    Some(a) => add(&a, &weighted)?,
                });
            }
            if let Some(total) = sum {
                total.backward()?;
            }
        }
        let refs: Vec<&Tensor<B, E>> = tasks.iter().flat_map(|t| t.params.iter().map(|(_, p)| p)).collect();
        let norm = match run.clip {
            Some(c) => clip_grad_norm(&refs, c)?,
            None => grad_norm(&refs)?,
        };
        let mut per: BTreeMap<usize, f64> = BTreeMap::new();
        for (k, l, w) in pending {
            *per.entry(k).or_default() += l.read()? * w;
        }
        let mut loss = 0.0;
        let mut task_losses = Map::new();
        for (&k, &l) in &per {
            loss += l * task_rows[k] as f64 / rows.len() as f64;
            task_losses.insert(tasks[k].name.clone(), json!({ "loss": l, "rows": task_rows[k] }));
        }
        if !(loss.is_finite() && norm.is_finite()) {
            let bad = if loss.is_finite() { ("gradient norm", norm) } else { ("training loss", loss) };
            return Err(non_finite(st.step + 1, bad, &ckpts, false));
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
        if st.save_due(run.save_every, last, stopped_early, !metrics.is_empty()) {
            let groups: Vec<state::Group<'_, B, E>> = tasks.iter().map(|t| &t.params[..]).zip(opts.iter()).collect();
            state::save_groups(&ckpts, &st, &groups, &metrics)?;
        }
        if stopped_early {
            progress.println(&st.early_stop_note());
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

/// Row `i` of task `t`'s unshifted labels: its targets, the first one ignored unless its adapter
/// has a soft prompt (nothing would precede it: the rule of [`TaskSpec::loss`] for a run of the
/// task alone).
fn row_labels<B: Backend<E>, E: RunFloat>(model: &Model<B, E>, t: &TaskRun<B, E>, i: usize) -> Vec<i32> {
    let mut labels = t.batcher.examples()[i].targets.clone();
    if model.adapt().bank[t.bank].1.prompt_len() == 0 {
        if let Some(first) = labels.first_mut() {
            *first = IGNORE_INDEX;
        }
    }
    labels
}

/// The loss terms of row `i` of task `t` (what its mean loss divides by): its kept next-token
/// targets, or 1 for classification.
fn row_terms<B: Backend<E>, E: RunFloat>(model: &Model<B, E>, t: &TaskRun<B, E>, i: usize) -> usize {
    if t.cfg.task == Task::Classify {
        1
    } else {
        row_labels(model, t, i).iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// One forward of the mixed batch `rows` (`(task, example)`), each row routed to its task's
/// adapter in the bank, and each task's mean loss over its rows, in task order: the causal LM loss
/// over its kept targets (lm, completion), or the cross-entropy of its class scores (decoders: the
/// logits of its verbalizer tokens at the last position; BERT: its own head over the mean-pooled
/// states). Row `r`'s outputs are what it computes alone with its adapter installed (see
/// `tuna_models::adapt::mixed`), so each task's loss is the one a batch of its rows alone has.
fn mixed_losses<B: Backend<E>, E: RunFloat>(
    model: &Model<B, E>,
    tasks: &[TaskRun<B, E>],
    rows: &[(usize, usize)],
    file: &Path,
) -> Result<Vec<(usize, Tensor<B, E>)>> {
    let batch = rows.len();
    let decoder = model.is_decoder();
    let example = |&(k, i): &(usize, usize)| &tasks[k].batcher.examples()[i];
    let seq = rows.iter().map(|r| example(r).ids.len()).max().unwrap_or(0);
    // Padded as a run of one task pads: left for decoders, right for BERT.
    let (mut ids, mut mask) = (vec![model.pad_id(); batch * seq], vec![0u8; batch * seq]);
    for (r, row) in rows.iter().enumerate() {
        let e = example(row);
        let at = r * seq + if decoder { seq - e.ids.len() } else { 0 };
        ids[at..at + e.ids.len()].copy_from_slice(&e.ids);
        mask[at..at + e.ids.len()].fill(1);
    }
    let routes: Vec<Route> = rows.iter().map(|&(k, _)| Some(tasks[k].bank)).collect();
    // Hidden states: the head runs only on the rows whose loss needs every position's logits.
    let (out, out_mask) = model.hidden_mixed(&ids, &mask, batch, &routes)?;
    let width = out_mask.len() / batch.max(1);
    let pooled = match decoder {
        true => None,
        false => Some(mean_pool(&out, &Ints::new(&model.dev, &[batch, width], &out_mask)?)?),
    };
    let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
    for (r, &(k, _)) in rows.iter().enumerate() {
        match groups.iter_mut().find(|(j, _)| *j == k) {
            Some((_, v)) => v.push(r as u32),
            None => groups.push((k, vec![r as u32])),
        }
    }
    groups.sort_by_key(|(k, _)| *k);
    let mut losses = Vec::with_capacity(groups.len());
    for (k, rs) in &groups {
        let t = &tasks[*k];
        let n = rs.len();
        let classes = |model: &Model<B, E>| -> Result<Ints<B, i32>> {
            let c: Vec<i32> = rs.iter().map(|&r| example(&rows[r as usize]).class.unwrap_or(0) as i32).collect();
            Ok(Ints::new(&model.dev, &[n], &c)?)
        };
        let loss = (|| -> Result<Tensor<B, E>> {
            Ok(match (t.cfg.task, &pooled) {
                (Task::Classify, Some(pooled)) => {
                    let extra = &model.adapt().bank[t.bank].1.extra;
                    let find = |name: &str| extra.iter().find(|(x, _)| x == name).map(|(_, w)| w.clone());
                    let (Some(w), Some(b)) = (find("classifier.weight"), find("classifier.bias")) else {
                        return Err(TrainError::Invalid("no classification head".into()));
                    };
                    let scores = linear(&gather_rows(pooled, rs, batch)?, &w, WeightLayout::OutIn, Some(&b))?;
                    cross_entropy(scores, &classes(model)?, IGNORE_INDEX)?
                }
                (Task::Classify, None) => {
                    // The verbalizer tokens' logits at the last position, as a run of the task
                    // alone scores its classes.
                    let hidden = out.shape()[2];
                    let g = reshape(&gather_rows(&out, rs, batch)?, &[n, width * hidden])?;
                    let last = slice_cols(&g, (width - 1) * hidden, hidden)?;
                    let scores = model.verbalizer_scores(&last, &t.spec.verbalizer)?;
                    cross_entropy(scores, &classes(model)?, IGNORE_INDEX)?
                }
                (_, None) => {
                    // Each row's labels at its content's columns (the last ones: rows are
                    // left-padded, the soft prompt right before the content), then shifted.
                    let mut labels = vec![IGNORE_INDEX; n * width];
                    for (j, &r) in rs.iter().enumerate() {
                        let l = row_labels(model, t, rows[r as usize].1);
                        labels[(j + 1) * width - l.len()..(j + 1) * width].copy_from_slice(&l);
                    }
                    let targets = tuna_models::positions::next_token_targets(&labels, n, width);
                    // No other handle on the logits may live: the cross-entropy then writes its
                    // gradient over them.
                    let vocab = model.shape().vocab;
                    let logits = reshape(&model.lm_head(&gather_rows(&out, rs, batch)?)?, &[n * width, vocab])?;
                    cross_entropy(logits, &Ints::new(&model.dev, &[n * width], &targets)?, IGNORE_INDEX)?
                }
                (_, Some(_)) => {
                    return Err(TrainError::Invalid(
                        "the lm and completion tasks need a decoder (GPT-2, Llama), not BERT".into(),
                    ))
                }
            })
        })()
        .map_err(in_task(file, &t.name))?;
        losses.push((*k, loss));
    }
    Ok(losses)
}

/// Each task's evaluation (`None`: the task has no eval data), its adapter installed.
fn evaluate_all<B: Backend<E>, E: RunFloat>(
    model: &mut Model<B, E>,
    tasks: &[TaskRun<B, E>],
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
fn finish<B: Backend<E>, E: RunFloat>(
    cfg: &MultiConfig,
    model: &mut Model<B, E>,
    tasks: &[TaskRun<B, E>],
    st: &State,
    stopped_early: bool,
    evals: &[Option<EvalMetrics>],
) -> Result<MultiSummary> {
    let run = cfg.run();
    // A hub id as given (see `TrainConfig::model_name`), else the model's path.
    let base_name = run.model_name.clone().unwrap_or_else(|| model.source.display().to_string());
    let mut summaries = Vec::new();
    for (t, e) in tasks.iter().zip(evals) {
        let dir = run.out.join("adapters").join(&t.name);
        model.save_bank_adapter(&t.name, &dir, &base_name).map_err(|e| in_task(&cfg.tasks_file, &t.name)(e.into()))?;
        // The task travels with the export, so that `tuna eval` scores classes in training's order.
        TaskFile {
            task: t.cfg.task.name().to_string(),
            labels: t.spec.labels.as_ref().map(|l| l.labels().to_vec()),
            verbalizers: t.cfg.verbalizers.clone(),
            base_precision: (run.base_precision != Default::default()).then(|| run.base_precision.to_string()),
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
        model: run.model_name.clone().unwrap_or_else(|| run.model.display().to_string()),
        precision: E::NAME.to_string(),
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
        base_precision: Some(run.base_precision.to_string()),
        base_products: crate::state::base_products(run.base_precision),
    };
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    crate::checkpoint::write_atomic(&run.out.join("summary.json"), text.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Fields;
    use crate::schedule::Decay;
    use tuna_autograd::no_grad;
    use tuna_kernels::{Alloc, Cpu};
    use tuna_models::adapt::{LoraConfig, PromptInit};

    /// A task of `method` on `model` (a fixture) over `lines` written to `dir/<name>.jsonl`.
    fn task(
        dir: &Path,
        model: &str,
        name: &str,
        method: Method,
        task: Task,
        lines: &[String],
    ) -> (String, TrainConfig) {
        let train = dir.join(format!("{name}.jsonl"));
        std::fs::write(&train, lines.join("\n")).unwrap();
        let cfg = TrainConfig {
            model_name: None,
            checkpoint_activations: Default::default(),
            update_in_backward: false,
            base_precision: Default::default(),
            tf32: false,
            precision: crate::Precision::F32,
            memory_check: true,
            model: Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuna-models/tests/fixtures").join(model),
            method,
            task,
            fields: Fields::default(),
            train,
            eval: None,
            labels: None,
            verbalizers: None,
            prompt_init_text: None,
            batch_size: 8,
            micro_batch: 8,
            max_len: Some(32),
            steps: 1,
            lr: 1e-2,
            warmup: 0,
            decay: Decay::Constant,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            optimizer_state: Default::default(),
            clip: None,
            eval_every: 1,
            save_every: 1,
            patience: None,
            keep_last: 1,
            max_train_examples: None,
            max_eval_examples: None,
            holdout: None,
            seed: 5,
            out: dir.join("run"),
            out_mode: OutMode::New,
            progress: false,
        };
        (name.to_string(), cfg)
    }

    fn texts(labels: &[&str]) -> Vec<String> {
        let t =
            ["The cat sat on the mat and the dog ran.", "A dog ran.", "The bird sang a song in the park.", "Hi there."];
        (0..6).map(|i| format!("{{\"text\": \"{}\", \"label\": \"{}\"}}", t[i % 4], labels[i % labels.len()])).collect()
    }

    /// The routed forward of a batch mixing every task's rows gives each task the loss of its rows
    /// run alone with its adapter installed (`TaskSpec::loss`, what a single run computes): soft
    /// prompts (the first-token rule), prefixes, LoRA; decoders' verbalizers and BERT's heads of
    /// different class counts.
    #[test]
    fn each_tasks_loss_in_a_mixed_batch_is_its_rows_alone() {
        let dir = std::env::temp_dir().join(format!("tuna-multi-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lora = || Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec![] });
        let llama = vec![
            task(
                &dir,
                "llama",
                "p",
                Method::Prompt { n: 2, init: PromptInit::Random },
                Task::Classify,
                &texts(&["cat", "dog"]),
            ),
            task(&dir, "llama", "l", lora(), Task::Lm, &texts(&["x"])),
            task(
                &dir,
                "llama",
                "x",
                Method::Prefix { n: 3, projection: None, init: PromptInit::Random },
                Task::Lm,
                &texts(&["x"]),
            ),
        ];
        let bert = vec![
            task(&dir, "bert", "two", lora(), Task::Classify, &texts(&["cat", "dog"])),
            task(&dir, "bert", "three", Method::Houlsby { bottleneck: 4 }, Task::Classify, &texts(&["a", "b", "c"])),
        ];
        for tasks in [llama, bert] {
            let cfg = MultiConfig { tasks_file: dir.join("tasks.json"), tasks };
            let (mut model, runs) = setup(&Arc::new(Cpu), &cfg).unwrap();
            // LoRA's B starts at zero: move it, so every adapter changes the outputs.
            for r in &runs {
                for (_, t) in &r.params {
                    let v: Vec<f32> =
                        t.to_vec().unwrap().iter().enumerate().map(|(i, x)| x + 0.01 * (i % 7) as f32).collect();
                    *t.data_mut() = t.device().from_host(&v).unwrap();
                }
            }
            // Rows interleaved across the tasks.
            let mut rows: Vec<(usize, usize)> = Vec::new();
            for i in 0..6 {
                rows.extend((0..runs.len()).map(|k| (k, (i * 5 + k) % 6)));
            }
            let mixed: Vec<(usize, f64)> = no_grad(|| mixed_losses(&model, &runs, &rows, &cfg.tasks_file))
                .unwrap()
                .into_iter()
                .map(|(k, l)| (k, l.to_vec().unwrap()[0] as f64))
                .collect();
            assert_eq!(mixed.len(), runs.len());
            for (k, got) in mixed {
                let t = &runs[k];
                let mine: Vec<usize> = rows.iter().filter(|(j, _)| *j == k).map(|&(_, i)| i).collect();
                let b = t.batcher.make_batch(&mine);
                let want = model.with_bank_adapter(t.bank, |m| no_grad(|| t.spec.loss(m, &b))).unwrap().0;
                let want = want.to_vec().unwrap()[0] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "task {}: mixed {got} vs alone {want}",
                    t.name
                );
            }
        }
    }

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
