//! Tasks on batches: turning records into token ids and targets (`lm`, `completion`, `classify`),
//! the loss of a (micro-)batch, and evaluation metrics.

use crate::batch::{Batch, Encoded, IGNORE_INDEX};
use crate::data::{Example, LabelSet, Record, Task};
use crate::error::{Result, TrainError};
use crate::model::{Backend, Model, RunFloat};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::{Ints, Tensor};

/// What the loss needs besides the batch: the classes and their verbalizer tokens.
pub struct TaskSpec {
    pub task: Task,
    pub labels: Option<LabelSet>,
    /// Decoders' classification: one token per class, scored at the last position.
    pub verbalizer: Vec<u32>,
}

impl TaskSpec {
    /// The task's spec for `model`: classes from `labels` (or the training records), verbalizer
    /// tokens from `verbalizers` (comma-separated words, default the labels) with a leading space.
    pub fn new<E: RunFloat>(
        model: &Model<impl Backend<E>, E>,
        task: Task,
        records: &[Record],
        labels: Option<&[String]>,
        verbalizers: Option<&[String]>,
    ) -> Result<TaskSpec> {
        if task == Task::Lm && model.is_encoder_decoder() {
            return Err(TrainError::Invalid(
                "the lm task has no prompt for T5's encoder: an encoder-decoder trains --task completion (the prompt to \
                 the encoder, the completion to the decoder) or classify"
                    .into(),
            ));
        }
        if task != Task::Classify {
            return Ok(TaskSpec { task, labels: None, verbalizer: Vec::new() });
        }
        let set = match labels {
            Some(l) => LabelSet::from_list(l.to_vec())?,
            None => LabelSet::from_examples(records),
        };
        if set.len() < 2 {
            return Err(TrainError::Invalid(format!(
                "classification needs at least 2 classes; {} ({}): give --labels to list the others",
                match (labels.is_some(), set.len()) {
                    (true, 0) => "--labels lists none",
                    (true, _) => "--labels lists one",
                    (false, _) => "the data has one",
                },
                set.labels().join(", ")
            )));
        }
        // A loaded classification head (BERT) scores exactly the classes it was trained for.
        if let Some((_, w)) = model.adapt().extra.iter().find(|(n, _)| n == "classifier.weight") {
            if w.shape()[0] != set.len() {
                return Err(TrainError::Invalid(format!(
                    "the classification head (classifier.weight, {}) has {} classes, the labels are {} ({})",
                    tuna_models::adapt::peft::EXTRA,
                    w.shape()[0],
                    set.len(),
                    set.labels().join(", ")
                )));
            }
        }
        let mut verbalizer = Vec::new();
        if model.is_decoder() {
            let words: Vec<String> = verbalizers.map_or_else(|| set.labels().to_vec(), <[String]>::to_vec);
            if words.len() != set.len() {
                return Err(TrainError::Invalid(format!("{} verbalizer words for {} labels", words.len(), set.len())));
            }
            for w in &words {
                let ids = model.encode_plain(&format!(" {w}"))?;
                let first =
                    *ids.first().ok_or_else(|| TrainError::Invalid(format!("verbalizer `{w}` has no tokens")))?;
                if let Some(j) = verbalizer.iter().position(|&t| t == first) {
                    let tok = model.tokenizer.id_to_token(first).unwrap_or_default();
                    return Err(TrainError::Invalid(format!(
                        "verbalizers `{}` and `{w}` both start with token {tok:?} (id {first}): a class is scored by \
                         its word's first token, so give --verbalizers whose words start differently (e.g. \
                         `negative,positive` for labels 0,1)",
                        words[j]
                    )));
                }
                verbalizer.push(first);
            }
        }
        Ok(TaskSpec { task, labels: Some(set), verbalizer })
    }

    /// Token ids and targets of each record (`path` for errors naming a record's line). Rows are
    /// cut to `max_len` later by the batcher (the start kept, or the end for `completion`); only
    /// the part of a long text that can survive that cut is tokenized.
    pub fn encode<E: RunFloat>(
        &self,
        model: &Model<impl Backend<E>, E>,
        records: &[Record],
        path: &Path,
        max_len: usize,
    ) -> Result<Vec<Encoded>> {
        records
            .iter()
            .map(|r| {
                let empty = |what: &str| TrainError::Invalid(format!("{}:{}: the {what}", path.display(), r.line));
                Ok(match (&r.ex, self.task) {
                    (Example::Text(t), Task::Lm) => {
                        let ids = model.encode_window(t, max_len, false)?;
                        if ids.len() < 2 {
                            return Err(empty(&format!("text has {} token(s); lm needs at least 2", ids.len())));
                        }
                        Encoded { targets: ids.iter().map(|&i| i as i32).collect(), ids, class: None }
                    }
                    (Example::Completion { prompt, completion }, Task::Completion) if model.is_encoder_decoder() => {
                        // The prompt goes to the encoder and the completion to the decoder: each
                        // gets `max_len` (the prompt keeps its end, the completion its start), and
                        // the batcher leaves the row whole (see `eval::batch_config`).
                        let mut p = model.encode_window(prompt, max_len, true)?;
                        p.drain(..p.len().saturating_sub(max_len));
                        let mut c = model.encode_window(completion, max_len, false)?;
                        // Cut at its end, keeping the closing `</s>` the tokenizer added (as a
                        // truncating Hugging Face tokenizer does).
                        if c.len() > max_len {
                            let last = c[c.len() - 1];
                            c.truncate(max_len);
                            if model.eos_id() == Some(last) {
                                c[max_len - 1] = last;
                            }
                        }
                        if p.is_empty() || c.is_empty() {
                            return Err(empty(if p.is_empty() {
                                "prompt has no tokens"
                            } else {
                                "completion has no tokens"
                            }));
                        }
                        let mut targets = vec![IGNORE_INDEX; p.len()];
                        targets.extend(c.iter().map(|&i| i as i32));
                        Encoded { ids: [p, c].concat(), targets, class: None }
                    }
                    (Example::Completion { prompt, completion }, Task::Completion) => {
                        let p = model.encode_window(prompt, max_len, true)?;
                        let c = model.encode_window(completion, max_len, true)?;
                        if c.is_empty() {
                            return Err(empty("completion has no tokens"));
                        }
                        let mut targets = vec![IGNORE_INDEX; p.len()];
                        targets.extend(c.iter().map(|&i| i as i32));
                        Encoded { ids: [p, c].concat(), targets, class: None }
                    }
                    (Example::Labeled { text, label }, Task::Classify) => {
                        let set = self.labels.as_ref().expect("classify has labels");
                        let class = set.index(label, path, r.line)?;
                        let ids = model.encode_window(text, max_len, false)?;
                        if ids.is_empty() {
                            return Err(empty("text has no tokens"));
                        }
                        Encoded { ids, targets: Vec::new(), class: Some(class) }
                    }
                    _ => {
                        return Err(TrainError::Invalid(format!(
                            "{}:{}: record does not fit the task",
                            path.display(),
                            r.line
                        )))
                    }
                })
            })
            .collect()
    }

    /// The loss of `b` (a mean over its targets or rows) and its weight in the full batch's
    /// mean: `(loss, terms)`.
    pub fn loss<B: Backend<E>, E: RunFloat>(&self, model: &Model<B, E>, b: &Batch) -> Result<(Tensor<B, E>, usize)> {
        match self.task {
            Task::Classify => {
                let scores = model.class_scores(&b.ids, &b.mask, b.batch, &self.verbalizer)?;
                Ok((class_loss(model, b, scores)?, b.batch))
            }
            _ => {
                let labels = lm_labels(model, b);
                let terms = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
                Ok((model.lm_loss(&b.ids, &b.mask, &labels, b.batch)?, terms))
            }
        }
    }

    /// Loss terms of a batch (what [`TaskSpec::loss`] returns as the weight), without running it.
    pub fn terms<E: RunFloat>(&self, model: &Model<impl Backend<E>, E>, b: &Batch) -> usize {
        match self.task {
            Task::Classify => b.batch,
            _ => lm_labels(model, b).iter().filter(|&&l| l != IGNORE_INDEX).count(),
        }
    }

    /// `(summed loss, terms, correct)` of a batch under no_grad (correct: classification only).
    pub fn eval_batch<B: Backend<E>, E: RunFloat>(
        &self,
        model: &Model<B, E>,
        b: &Batch,
    ) -> Result<(f64, usize, usize)> {
        tuna_autograd::no_grad(|| {
            if self.task == Task::Classify {
                let scores = model.class_scores(&b.ids, &b.mask, b.batch, &self.verbalizer)?;
                let s: Vec<f32> = scores.to_vec()?.into_iter().map(|x| x.to_f32()).collect();
                let c = s.len() / b.batch.max(1);
                let correct = s.chunks(c.max(1)).zip(&b.classes).filter(|(row, &k)| argmax(row) == k as usize).count();
                // The loss from the same scores: one forward per batch.
                let loss = class_loss(model, b, scores)?;
                Ok((loss.value()? * b.batch as f64, b.batch, correct))
            } else {
                let (loss, n) = self.loss(model, b)?;
                Ok((loss.value()? * n as f64, n, 0))
            }
        })
    }
}

/// `tuna_task.json`, written beside an export: the task, the classes in training's order and the
/// verbalizer words, so `tuna eval` scores classes as training did. Labels and words are JSON lists
/// (a label may hold commas or spaces); files from before kept them as one comma-separated string,
/// which still reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFile {
    pub task: String,
    #[serde(default, deserialize_with = "list_or_csv")]
    pub labels: Option<Vec<String>>,
    #[serde(default, deserialize_with = "list_or_csv")]
    pub verbalizers: Option<Vec<String>>,
    /// The precision the base's frozen block weights were held in while training (absent: f32):
    /// `tuna eval` scores on that base unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_precision: Option<String>,
}

/// The task file's name.
pub const TASK_FILE: &str = "tuna_task.json";

impl TaskFile {
    /// The task file in `dir`, `None` when there is none; a malformed one is an error naming it.
    pub fn read(dir: &Path) -> Result<Option<TaskFile>> {
        // A model given as a file (a `.gguf`) has no folder of its own to hold one.
        if dir.is_file() {
            return Ok(None);
        }
        let path = dir.join(TASK_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TrainError::Io { path, source }),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Write it into `dir` (atomically; keys sorted).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let v = serde_json::to_value(self).map_err(|e| TrainError::Invalid(format!("{TASK_FILE}: {e}")))?;
        let text = tuna_models::io::pretty_sorted(&v);
        Ok(crate::checkpoint::write_atomic(&dir.join(TASK_FILE), text.as_bytes())?)
    }
}

fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(Option::<ListOrCsv>::deserialize(d)?.map(|v| match v {
        ListOrCsv::List(l) => l,
        ListOrCsv::Csv(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
    }))
}

/// Mean cross-entropy of class `scores` (`[batch, classes]`) against the batch's classes.
fn class_loss<B: Backend<E>, E: RunFloat>(
    model: &Model<B, E>,
    b: &Batch,
    scores: Tensor<B, E>,
) -> Result<Tensor<B, E>> {
    let classes: Vec<i32> = b.classes.iter().map(|&c| c as i32).collect();
    let t = Ints::new(&model.dev, &[b.batch], &classes)?;
    Ok(cross_entropy(scores, &t, IGNORE_INDEX)?)
}

/// Unshifted causal-LM labels of a batch: the targets, with each left-padded row's first real
/// token ignored when nothing precedes it (no soft prompt): it would be predicted from padding.
fn lm_labels<E: RunFloat>(model: &Model<impl Backend<E>, E>, b: &Batch) -> Vec<i32> {
    let mut labels = b.targets.clone();
    // A decoder's first real token is predicted from padding: no loss there. An encoder-decoder's
    // targets are the decoder's own (its first one predicted from the start token).
    if model.adapt().prompt_len() == 0 && !model.is_encoder_decoder() {
        for (row, m) in labels.chunks_mut(b.seq.max(1)).zip(b.mask.chunks(b.seq.max(1))) {
            if let Some(first) = m.iter().position(|&x| x != 0) {
                row[first] = IGNORE_INDEX;
            }
        }
    }
    labels
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_files_keep_labels_with_commas_and_spaces_and_read_the_old_string_form() {
        let d = std::env::temp_dir().join(format!("tuna-taskfile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = TaskFile {
            task: "classify".into(),
            labels: Some(vec!["a, b".into(), " padded ".into()]),
            verbalizers: Some(vec!["yes".into(), "no".into()]),
            base_precision: Some("int8".into()),
        };
        f.write(&d).unwrap();
        assert_eq!(TaskFile::read(&d).unwrap(), Some(f));
        std::fs::write(d.join(TASK_FILE), r#"{"labels": "cat,other", "task": "classify", "verbalizers": null}"#)
            .unwrap();
        let old = TaskFile::read(&d).unwrap().unwrap();
        assert_eq!(old.labels, Some(vec!["cat".to_string(), "other".to_string()]));
        assert_eq!(old.verbalizers, None);
        std::fs::write(d.join(TASK_FILE), "{not json").unwrap();
        let e = TaskFile::read(&d).unwrap_err().to_string();
        assert!(e.contains(TASK_FILE), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(TaskFile::read(&d).unwrap(), None);
    }
}
