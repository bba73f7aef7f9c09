//! Evaluation: loss, accuracy (classification) or perplexity over a data set in order, during a
//! run and for `tuna eval`; and the batching both use.

use crate::batch::{BatchConfig, Batcher, PadSide, Truncate};
use crate::data::{self, Fields, Task};
use crate::error::{Result, TrainError};
use crate::limits::{min_len, resolve_max_len};
use crate::model::{Backend, Model, RunFloat};
use crate::task::TaskSpec;
use std::path::Path;

/// Evaluation results.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub perplexity: Option<f64>,
}

impl EvalMetrics {
    /// The values a metrics line logs: loss, and accuracy or perplexity where there is one.
    pub fn as_map(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("loss".into(), self.loss.into());
        if let Some(a) = self.accuracy {
            m.insert("accuracy".into(), a.into());
        }
        if let Some(p) = self.perplexity {
            m.insert("perplexity".into(), p.into());
        }
        m
    }
}

/// Mean loss (and accuracy, perplexity) over `eb`'s examples in order, under no_grad.
pub fn evaluate<B: Backend<E>, E: RunFloat>(model: &Model<B, E>, spec: &TaskSpec, eb: &Batcher) -> Result<EvalMetrics> {
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

/// Evaluate `model` (adapted) on `data` for `task`: what `tuna eval` prints.
#[allow(clippy::too_many_arguments)]
pub fn eval_file<E: RunFloat>(
    model: &Model<impl Backend<E>, E>,
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
pub(crate) fn batch_config<B: Backend<E>, E: RunFloat>(
    model: &Model<B, E>,
    task: Task,
    batch_size: usize,
    max_len: usize,
    shuffle: bool,
    seed: u64,
) -> BatchConfig {
    // An encoder-decoder's completion row is its encoder input then its decoder targets, each
    // already cut to `max_len` (see `TaskSpec::encode`).
    let seq2seq = model.is_encoder_decoder() && task == Task::Completion;
    BatchConfig {
        batch_size,
        max_len: Some(if seq2seq { 2 * max_len } else { max_len }),
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

pub(crate) fn describe(e: &EvalMetrics) -> String {
    let mut s = format!("loss {:.4}", e.loss);
    if let Some(a) = e.accuracy {
        s += &format!(" accuracy {:.4}", a);
    }
    if let Some(p) = e.perplexity {
        s += &format!(" perplexity {:.3}", p);
    }
    s
}
