//! The prompt-engineered baseline: the untrained model scoring each class through a written
//! template, zero-shot or with `k` examples drawn from the training data, so that a comparison shows
//! what training buys over prompt engineering on the same model. Nothing trains; the run folder
//! gets `summary.json` and `tuna_prompt.json` (the template and the examples used).
//!
//! Decoders read `<k examples: template(text) + " " + word + "\n\n">template(text)` and are scored
//! by the verbalizer words' first tokens at the last position, as trained classification is; rows
//! that outgrow `max_len` keep their end (the question), losing examples first. BERT has no language
//! model head (all-MiniLM-L6-v2 carries none): each class is a vector, the mean of the normalized
//! mean-pooled embeddings of its examples through the template, or without examples the embedding
//! of its verbalizer word (else its label); an example goes to the class of highest cosine
//! similarity.

use crate::batch::{Batcher, Encoded, PadSide, Truncate};
use crate::checkpoint::write_atomic;
use crate::config::RunSummary;
use crate::data::{self, Example, Fields, LabelSet, Record, Task};
use crate::error::{Result, TrainError};
use crate::eval::{batch_config, evaluate};
use crate::export::peak_rss_bytes;
use crate::model::{Backend, Model};
use crate::run_dir::{self, OutMode};
use crate::task::TaskSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tuna_autograd::{no_grad, Tensor};
use tuna_kernels::rng::SplitMix64;

/// The baseline's file in its run folder.
pub const PROMPT_FILE: &str = "tuna_prompt.json";

/// What a prompt-engineered run needs (validated by the CLI; see `TrainConfig` for the shared fields).
#[derive(Debug, Clone)]
pub struct BaselineConfig {
    pub model: PathBuf,
    /// The model as named when that was a Hugging Face id (what the summary records).
    pub model_name: Option<String>,
    pub fields: Fields,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub labels: Option<Vec<String>>,
    pub verbalizers: Option<Vec<String>>,
    pub batch_size: usize,
    /// Tokens per row at most (default: the model's positions, at most 1,024).
    pub max_len: Option<usize>,
    pub max_eval_examples: Option<usize>,
    pub holdout: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    pub out_mode: OutMode,
    /// The template: `{text}` stands for the example's text; `\n`, `\t` and `\\` are escapes.
    pub template: String,
    /// Examples from the training data shown before each question (0: zero-shot).
    pub shots: usize,
}

/// `tuna_prompt.json`: how the baseline asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptFile {
    pub template: String,
    /// The examples drawn (decoders see them before each question; BERT averages them per class).
    pub shots: Vec<Shot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shot {
    pub text: String,
    pub label: String,
}

/// The template with its escapes resolved; it must hold `{text}`.
pub fn parse_template(t: &str) -> Result<String> {
    let mut out = String::with_capacity(t.len());
    let mut it = t.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(o) => out.extend(['\\', o]),
            None => out.push('\\'),
        }
    }
    if !out.contains("{text}") {
        return Err(TrainError::Invalid(format!(
            "--template {t:?}: it needs {{text}} where each example's text goes (e.g. \"Review: {{text}}\\nSentiment:\")"
        )));
    }
    Ok(out)
}

fn fill(template: &str, text: &str) -> String {
    template.replace("{text}", text)
}

/// `k` distinct training examples drawn with `seed`, balanced over the classes (round-robin over
/// the classes in label order, each class's examples in a seeded shuffle; a class that runs out
/// leaves its turn to the others), then put in a seeded order. Drawn at random, a few shots are
/// often all one class, and the model then answers with that class (on SmolLM2 four `fresh`
/// shots cut accuracy from 0.78 to 0.55).
fn draw(records: &[Record], k: usize, seed: u64) -> Vec<&Record> {
    let mut rng = SplitMix64::new(seed ^ 0x5407);
    let mut shuffle = |v: &mut Vec<usize>| {
        for i in (1..v.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    };
    let mut by_class: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, r) in records.iter().enumerate() {
        by_class.entry(text_label(r).1).or_default().push(i);
    }
    let mut queues: Vec<Vec<usize>> = by_class.into_values().collect();
    for q in &mut queues {
        shuffle(q);
    }
    let mut picked = Vec::with_capacity(k);
    while picked.len() < k.min(records.len()) {
        for q in &mut queues {
            if picked.len() < k {
                if let Some(i) = q.pop() {
                    picked.push(i);
                }
            }
        }
    }
    shuffle(&mut picked);
    picked.into_iter().map(|i| &records[i]).collect()
}

fn text_label(r: &Record) -> (&str, &str) {
    match &r.ex {
        Example::Labeled { text, label } => (text, label),
        // data::load with Task::Classify yields only labeled records.
        _ => ("", ""),
    }
}

/// Score the untrained model as `cfg` says; returns the summary (also `summary.json`).
pub fn prompt_engineered<B: Backend>(dev: &Arc<B>, cfg: &BaselineConfig) -> Result<RunSummary> {
    if matches!(cfg.out_mode, OutMode::Resume | OutMode::ResumeOrStart) {
        return Err(TrainError::Invalid("prompt-engineered trains nothing: there is nothing to resume".into()));
    }
    run_dir::refuse_unsafe_out(&cfg.out)?;
    let _lock = run_dir::lock(&cfg.out)?;
    let inputs: Vec<&Path> =
        [Some(cfg.model.as_path()), Some(cfg.train.as_path()), cfg.eval.as_deref()].into_iter().flatten().collect();
    run_dir::check(&cfg.out, cfg.out_mode, &inputs)?;
    let t0 = std::time::Instant::now();
    let template = parse_template(&cfg.template)?;
    let mut train = data::load(&cfg.train, Task::Classify, &cfg.fields)?;
    // Classes from the whole training file (as a trained run takes them).
    let labels = match &cfg.labels {
        Some(l) => l.clone(),
        None => LabelSet::from_examples(&train).labels().to_vec(),
    };
    let (eval_path, eval) = match (cfg.holdout, &cfg.eval) {
        (Some(k), _) if k == 0 || k >= train.len() => {
            return Err(TrainError::Invalid(format!(
                "--holdout {k}: expected 1 to {} (the training examples of {} but one)",
                train.len().saturating_sub(1),
                cfg.train.display()
            )))
        }
        (Some(k), _) => (cfg.train.clone(), train.split_off(train.len() - k)),
        (None, Some(p)) => {
            let mut e = data::load(p, Task::Classify, &cfg.fields)?;
            e.truncate(cfg.max_eval_examples.unwrap_or(usize::MAX));
            (p.clone(), e)
        }
        (None, None) => {
            return Err(TrainError::Invalid(
                "prompt-engineered scores the untrained model on --eval (or --holdout): give one".into(),
            ))
        }
    };
    if cfg.shots > train.len() {
        return Err(TrainError::Invalid(format!(
            "--shots {}: {} has {} training examples to draw from",
            cfg.shots,
            cfg.train.display(),
            train.len()
        )));
    }
    let shots = draw(&train, cfg.shots, cfg.seed);
    let mut model = Model::open(dev, &cfg.model, |_| false)?;
    let spec = TaskSpec::new(&model, Task::Classify, &train, Some(&labels), cfg.verbalizers.as_deref())?;
    let set = spec.labels.as_ref().expect("classify has labels");
    let max_len = cfg.max_len.unwrap_or(model.max_positions().min(1024));
    let decoder = model.is_decoder();
    let before: String = if decoder {
        let words = cfg.verbalizers.clone().unwrap_or_else(|| labels.clone());
        let mut s = String::new();
        for r in &shots {
            let (text, label) = text_label(r);
            let c = set.index(label, &cfg.train, r.line)? as usize;
            s += &format!("{} {}\n\n", fill(&template, text), words[c]);
        }
        s
    } else {
        let words = cfg.verbalizers.clone().unwrap_or_else(|| labels.clone());
        let head = class_vectors(&model, &template, &shots, set, &words, &cfg.train, max_len)?;
        let (classes, hidden) = (set.len(), model.shape().hidden);
        let extra = &mut model.adapt_mut().extra;
        extra.retain(|(n, _)| !n.starts_with("classifier."));
        extra.push(("classifier.weight".into(), Tensor::constant(dev, &[classes, hidden], &head)?));
        extra.push(("classifier.bias".into(), Tensor::constant(dev, &[classes], &vec![0.0f32; classes])?));
        String::new()
    };
    // Decoders keep each row's end (the question); BERT its start, as trained runs do.
    let from_end = decoder;
    let enc = eval
        .iter()
        .map(|r| {
            let (text, label) = text_label(r);
            let ids = model.encode_window(&format!("{before}{}", fill(&template, text)), max_len, from_end)?;
            Ok(Encoded { ids, targets: Vec::new(), class: Some(set.index(label, &eval_path, r.line)?) })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut bc = batch_config(&model, Task::Classify, cfg.batch_size, max_len, false, cfg.seed);
    bc.truncate = if from_end { Truncate::KeepEnd } else { Truncate::KeepStart };
    debug_assert!(bc.pad_side == if decoder { PadSide::Left } else { PadSide::Right });
    let e = evaluate(&model, &spec, &Batcher::new(enc, bc)?)?;
    if cfg.out_mode == OutMode::Overwrite {
        run_dir::clear(&cfg.out)?;
    }
    let prompt = PromptFile {
        template: template.clone(),
        shots: shots
            .iter()
            .map(|r| {
                let (text, label) = text_label(r);
                Shot { text: text.into(), label: label.into() }
            })
            .collect(),
    };
    let text = serde_json::to_string_pretty(&prompt).unwrap_or_default();
    let prompt_path = cfg.out.join(PROMPT_FILE);
    write_atomic(&prompt_path, text.as_bytes())?;
    let summary = RunSummary {
        base_products: None,
        method: format!("prompt-engineered {}-shot", cfg.shots),
        model: cfg.model_name.clone().unwrap_or_else(|| cfg.model.display().to_string()),
        task: Task::Classify.name().to_string(),
        trainable_params: 0,
        base_params: model.base_param_count(),
        steps: 0,
        final_train_loss: None,
        // BERT's scores are cosines scaled by each embedding's norm: its loss means nothing.
        eval_loss: decoder.then_some(e.loss),
        eval_accuracy: e.accuracy,
        eval_perplexity: None,
        train_tokens: 0,
        train_seconds: t0.elapsed().as_secs_f64(),
        tokens_per_s: 0.0,
        peak_rss_bytes: peak_rss_bytes(),
        checkpoint_bytes: text.len() as u64,
        stopped_early: false,
        export: prompt_path.display().to_string(),
        lr: None,
        warmup: None,
        hurting: None,
        predicted_peak_bytes: None,
        peak_heap_bytes: crate::memory::max(),
        base_precision: Some("f32".into()),
        tf32: None,
        precision: None,
    };
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    write_atomic(&cfg.out.join("summary.json"), text.as_bytes())?;
    Ok(summary)
}

/// BERT's class vectors `[classes, hidden]`, unit length: the mean of each class's normalized
/// example embeddings (through the template), or the embedding of its word (`words`: the
/// verbalizers, else the labels) where no example has that class.
fn class_vectors<B: Backend>(
    model: &Model<B>,
    template: &str,
    shots: &[&Record],
    set: &LabelSet,
    words: &[String],
    train: &Path,
    max_len: usize,
) -> Result<Vec<f32>> {
    let hidden = model.shape().hidden;
    let embed = |text: &str| -> Result<Vec<f64>> {
        let mut ids = model.encode_window(text, max_len, false)?;
        ids.truncate(max_len);
        let mask = vec![1u8; ids.len()];
        let v = no_grad(|| model.mean_pooled(&ids, &mask, 1))?.to_vec()?;
        let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        Ok(v.iter().map(|x| x / n).collect())
    };
    let mut sums = vec![vec![0.0f64; hidden]; set.len()];
    let mut counts = vec![0usize; set.len()];
    for r in shots {
        let (text, label) = text_label(r);
        let c = set.index(label, train, r.line)? as usize;
        for (s, x) in sums[c].iter_mut().zip(embed(&fill(template, text))?) {
            *s += x;
        }
        counts[c] += 1;
    }
    let mut out = Vec::with_capacity(set.len() * hidden);
    if words.len() != set.len() {
        return Err(TrainError::Invalid(format!("{} verbalizer words for {} labels", words.len(), set.len())));
    }
    for (c, word) in words.iter().enumerate() {
        let v = if counts[c] == 0 { embed(word)? } else { sums[c].clone() };
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(v.iter().map(|x| (x / n) as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_resolve_escapes_and_need_the_text() {
        assert_eq!(parse_template("Review: {text}\\nSentiment:").unwrap(), "Review: {text}\nSentiment:");
        assert_eq!(parse_template("a\\\\n{text}\\t\\q").unwrap(), "a\\n{text}\t\\q");
        let e = parse_template("Review:\\nSentiment:").unwrap_err().to_string();
        assert!(e.contains("it needs {text}"), "{e}");
    }

    #[test]
    fn shots_are_distinct_reproducible_bounded_and_balanced() {
        // Labels a (7 examples), b (2), c (1).
        let label = |i: usize| {
            if i < 7 {
                "a"
            } else if i < 9 {
                "b"
            } else {
                "c"
            }
        };
        let recs: Vec<Record> = (0..10)
            .map(|i| Record { line: i + 1, ex: Example::Labeled { text: format!("t{i}"), label: label(i).into() } })
            .collect();
        let classes = |k: usize, seed: u64| {
            let mut c: Vec<&str> = draw(&recs, k, seed).iter().map(|r| text_label(r).1).collect();
            c.sort();
            c
        };
        assert_eq!(classes(3, 5), ["a", "b", "c"]);
        // Round robin: a b c, a b, then only a is left.
        assert_eq!(classes(6, 5), ["a", "a", "a", "b", "b", "c"]);
        assert_eq!(classes(5, 9), ["a", "a", "b", "b", "c"]);
        let a: Vec<usize> = draw(&recs, 4, 7).iter().map(|r| r.line).collect();
        let b: Vec<usize> = draw(&recs, 4, 7).iter().map(|r| r.line).collect();
        let c: Vec<usize> = draw(&recs, 4, 8).iter().map(|r| r.line).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 4);
        assert_eq!(draw(&recs, 10, 1).len(), 10);
    }
}
