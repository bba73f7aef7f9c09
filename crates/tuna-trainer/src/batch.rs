//! Batching: token-encoded examples into padded `[batch, seq]` batches, shuffled per epoch by a seeded
//! SplitMix64 (the order is a pure function of seed and epoch), with optional length bucketing,
//! truncation, left or right padding, micro-batch splitting and a resumable cursor.

use serde::{Deserialize, Serialize};

use crate::checkpoint::Fnv64;
use crate::data::Task;

/// The target id of a position that carries no loss (padding, prompt tokens, classification text).
pub use tuna_kernels::ops::cross_entropy::IGNORE_INDEX;
use tuna_kernels::rng::SplitMix64;

/// One tokenized example. `targets` are per-token label ids aligned index for index with `ids`
/// (`IGNORE_INDEX` = no loss; what they mean — shifted next tokens or not — is the trainer's choice);
/// an empty `targets` means none. `class` is the class index for a classification head.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub targets: Vec<i32>,
    pub class: Option<u32>,
}

/// Which side of a row the padding goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadSide {
    Left,
    Right,
}

/// Which part of an over-long example survives truncation to `max_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncate {
    /// Keep the first `max_len` tokens (`lm`, `classify`: the opening carries the context).
    KeepStart,
    /// Keep the last `max_len` tokens (`completion`: the completion, which carries all the loss, is at
    /// the end; the prompt loses its beginning instead).
    KeepEnd,
}

impl Truncate {
    /// The default for a task: `KeepEnd` for `completion`, `KeepStart` otherwise.
    pub fn for_task(task: Task) -> Truncate {
        if task == Task::Completion {
            Truncate::KeepEnd
        } else {
            Truncate::KeepStart
        }
    }
}

/// How batches are made. `bucket_window` = 0 turns bucketing off; otherwise each window of
/// `bucket_window * batch_size` shuffled examples is sorted by length (longest first) before it is cut
/// into batches, and the batches are shuffled again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    pub batch_size: usize,
    pub max_len: Option<usize>,
    pub truncate: Truncate,
    pub pad_side: PadSide,
    pub pad_id: u32,
    pub shuffle: bool,
    pub bucket_window: usize,
    pub drop_last: bool,
    pub seed: u64,
}

impl BatchConfig {
    /// Shuffled, right-padded, untruncated, unbucketed batches of `batch_size`, pad id 0, seed 0.
    pub fn new(batch_size: usize) -> BatchConfig {
        BatchConfig {
            batch_size,
            max_len: None,
            truncate: Truncate::KeepStart,
            pad_side: PadSide::Right,
            pad_id: 0,
            shuffle: true,
            bucket_window: 0,
            drop_last: false,
            seed: 0,
        }
    }
}

/// Errors building batches.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// A batch or micro-batch size of 0.
    #[error("{what} must be at least 1")]
    ZeroSize { what: &'static str },
    /// No examples, or fewer than one batch with `drop_last`.
    #[error("{n} examples make no batch of {batch_size}")]
    TooFew { n: usize, batch_size: usize },
    /// An example with no tokens (index into the batcher's examples).
    #[error("example {index} has no tokens")]
    EmptyExample { index: usize },
    /// `targets` neither empty nor as long as `ids`.
    #[error("example {index} has {targets} targets for {ids} tokens")]
    TargetLen { index: usize, ids: usize, targets: usize },
    /// Some examples have a class and others not.
    #[error("example {index} has no class but example 0 has one, or the reverse")]
    MixedClasses { index: usize },
}

/// Where the next batch comes from: batch `index` of epoch `epoch`'s order. The trainer saves it in
/// checkpoints; resuming with the same examples and config continues with exactly the batches an
/// uninterrupted run would have seen. `index == batches_per_epoch()` means the epoch is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub index: usize,
}

/// A padded batch, row-major `[batch, seq]`. `mask` is 1 on real tokens; padded `targets` are
/// `IGNORE_INDEX`; `classes` has one entry per row when the examples have classes, else is empty;
/// `examples` are the rows' indices into the batcher's examples (to name their data lines in errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub targets: Vec<i32>,
    pub classes: Vec<u32>,
    pub examples: Vec<usize>,
    pub batch: usize,
    pub seq: usize,
    /// Tokens with mask 1.
    pub real_tokens: usize,
    /// Targets other than `IGNORE_INDEX`: divide a summed token loss by the whole batch's count, not a
    /// micro-batch's, so accumulated gradients equal the full batch's.
    pub target_tokens: usize,
}

impl Batch {
    /// The first row's last `n` real tokens (fewer if it has fewer) as a batch of one row: the
    /// end of a row, where a classification's or completion's loss terms are.
    pub fn row_tail(&self, n: usize) -> Batch {
        let row = |v: usize| v..v + self.seq;
        let used: Vec<usize> = (0..self.seq).filter(|&c| self.mask[c] == 1).collect();
        let hi = used.last().map_or(0, |c| c + 1);
        let lo = hi.saturating_sub(n).max(used.first().copied().unwrap_or(0));
        let span = row(0).start + lo..row(0).start + hi;
        let (ids, mask, targets) =
            (self.ids[span.clone()].to_vec(), self.mask[span.clone()].to_vec(), self.targets[span].to_vec());
        Batch {
            real_tokens: mask.iter().filter(|&&m| m == 1).count(),
            target_tokens: targets.iter().filter(|&&t| t != IGNORE_INDEX).count(),
            ids,
            mask,
            targets,
            classes: self.classes.first().map(|&c| vec![c]).unwrap_or_default(),
            examples: self.examples.first().map(|&e| vec![e]).unwrap_or_default(),
            batch: 1,
            seq: hi - lo,
        }
    }

    /// Splits into micro-batches of at most `micro` rows, each trimmed to its own longest row (the
    /// padding side is kept).
    pub fn split(&self, micro: usize) -> Result<Vec<Batch>, BatchError> {
        if micro == 0 {
            return Err(BatchError::ZeroSize { what: "micro-batch size" });
        }
        let mut out = Vec::new();
        for r0 in (0..self.batch).step_by(micro) {
            let rows = r0..(r0 + micro).min(self.batch);
            let used = |c: usize| rows.clone().any(|r| self.mask[r * self.seq + c] == 1);
            let lo = (0..self.seq).find(|&c| used(c)).unwrap_or(0);
            let hi = (0..self.seq).rev().find(|&c| used(c)).map_or(lo, |c| c + 1);
            let mut b = Batch {
                ids: Vec::new(),
                mask: Vec::new(),
                targets: Vec::new(),
                classes: if self.classes.is_empty() { Vec::new() } else { self.classes[rows.clone()].to_vec() },
                examples: self.examples[rows.clone()].to_vec(),
                batch: rows.len(),
                seq: hi - lo,
                real_tokens: 0,
                target_tokens: 0,
            };
            for r in rows {
                let span = r * self.seq + lo..r * self.seq + hi;
                b.ids.extend_from_slice(&self.ids[span.clone()]);
                b.mask.extend_from_slice(&self.mask[span.clone()]);
                b.targets.extend_from_slice(&self.targets[span]);
            }
            b.real_tokens = b.mask.iter().filter(|&&m| m == 1).count();
            b.target_tokens = b.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
            out.push(b);
        }
        Ok(out)
    }
}

/// Makes the batches of each epoch from a fixed list of examples.
#[derive(Clone, Debug)]
pub struct Batcher {
    examples: Vec<Encoded>,
    cfg: BatchConfig,
    truncated: usize,
    plan: Option<(u64, Vec<Vec<usize>>)>,
}

impl Batcher {
    /// Checks and truncates the examples (to `cfg.max_len`, keeping the side `cfg.truncate` says).
    pub fn new(mut examples: Vec<Encoded>, cfg: BatchConfig) -> Result<Batcher, BatchError> {
        if cfg.batch_size == 0 {
            return Err(BatchError::ZeroSize { what: "batch size" });
        }
        if cfg.max_len == Some(0) {
            return Err(BatchError::ZeroSize { what: "max sequence length" });
        }
        let n = examples.len();
        if n == 0 || (cfg.drop_last && n < cfg.batch_size) {
            return Err(BatchError::TooFew { n, batch_size: cfg.batch_size });
        }
        let has_class = examples[0].class.is_some();
        let mut truncated = 0;
        for (index, e) in examples.iter_mut().enumerate() {
            if e.ids.is_empty() {
                return Err(BatchError::EmptyExample { index });
            }
            if !e.targets.is_empty() && e.targets.len() != e.ids.len() {
                return Err(BatchError::TargetLen { index, ids: e.ids.len(), targets: e.targets.len() });
            }
            if e.class.is_some() != has_class {
                return Err(BatchError::MixedClasses { index });
            }
            if let Some(m) = cfg.max_len.filter(|&m| e.ids.len() > m) {
                truncated += 1;
                let cut = e.ids.len() - m;
                match cfg.truncate {
                    Truncate::KeepStart => {
                        e.ids.truncate(m);
                        e.targets.truncate(m);
                    }
                    Truncate::KeepEnd => {
                        e.ids.drain(..cut);
                        if !e.targets.is_empty() {
                            e.targets.drain(..cut);
                        }
                    }
                }
            }
        }
        Ok(Batcher { examples, cfg, truncated, plan: None })
    }

    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }
    pub fn examples(&self) -> &[Encoded] {
        &self.examples
    }
    /// How many examples were truncated to `max_len` (for a warning).
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// The longest row a batch can have (tokens, after any truncation).
    pub fn longest(&self) -> usize {
        let n = self.examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        self.cfg.max_len.map_or(n, |m| n.min(m))
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.examples.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The batches of `epoch` as example indices: a pure function of the examples, config and epoch.
    pub fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let bs = self.cfg.batch_size;
        let mut rng = SplitMix64::for_epoch(self.cfg.seed, epoch);
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        if self.cfg.shuffle {
            rng.shuffle(&mut order);
        }
        if self.cfg.bucket_window > 0 {
            for window in order.chunks_mut(self.cfg.bucket_window * bs) {
                window.sort_by_key(|&i| std::cmp::Reverse(self.examples[i].ids.len()));
            }
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
        if self.cfg.drop_last && batches.last().is_some_and(|b| b.len() < bs) {
            batches.pop();
        }
        if self.cfg.shuffle && self.cfg.bucket_window > 0 {
            rng.shuffle(&mut batches);
        }
        batches
    }

    /// The batch at `cursor`, advancing it; a finished epoch rolls over to the next one first.
    pub fn next_batch(&mut self, cursor: &mut Cursor) -> Batch {
        if cursor.index >= self.batches_per_epoch() {
            *cursor = Cursor { epoch: cursor.epoch.saturating_add(1), index: 0 };
        }
        if self.plan.as_ref().is_none_or(|(e, _)| *e != cursor.epoch) {
            self.plan = Some((cursor.epoch, self.plan(cursor.epoch)));
        }
        let rows = self.plan.as_ref().map(|(_, p)| p[cursor.index].clone()).unwrap_or_default();
        cursor.index += 1;
        self.make_batch(&rows)
    }

    /// Pads the given examples into one batch (eval uses it on `0..n` in order).
    pub fn make_batch(&self, rows: &[usize]) -> Batch {
        let seq = rows.iter().map(|&r| self.examples[r].ids.len()).max().unwrap_or(0);
        let size = rows.len() * seq;
        let mut b = Batch {
            ids: vec![self.cfg.pad_id; size],
            mask: vec![0; size],
            targets: vec![IGNORE_INDEX; size],
            classes: Vec::new(),
            examples: rows.to_vec(),
            batch: rows.len(),
            seq,
            real_tokens: 0,
            target_tokens: 0,
        };
        for (row, &r) in rows.iter().enumerate() {
            let e = &self.examples[r];
            let start = row * seq + if self.cfg.pad_side == PadSide::Left { seq - e.ids.len() } else { 0 };
            let span = start..start + e.ids.len();
            b.ids[span.clone()].copy_from_slice(&e.ids);
            b.mask[span.clone()].fill(1);
            if !e.targets.is_empty() {
                b.targets[span].copy_from_slice(&e.targets);
            }
            b.classes.extend(e.class);
            b.real_tokens += e.ids.len();
            b.target_tokens += e.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        }
        b
    }

    /// A hash of the examples (after truncation) and the config: store it beside the cursor and refuse
    /// to resume when it differs, since the cursor then points into other batches.
    pub fn fingerprint(&self) -> u64 {
        let c = &self.cfg;
        let mut h = Fnv64::new();
        for v in [c.batch_size as u64, c.max_len.map_or(0, |m| m as u64 + 1), c.bucket_window as u64, c.seed] {
            h.write(&v.to_le_bytes());
        }
        h.write(&[c.truncate as u8, c.pad_side as u8, c.shuffle as u8, c.drop_last as u8]);
        h.write(&c.pad_id.to_le_bytes());
        for e in &self.examples {
            h.write(&(e.ids.len() as u64).to_le_bytes());
            e.ids.iter().for_each(|t| h.write(&t.to_le_bytes()));
            e.targets.iter().for_each(|t| h.write(&t.to_le_bytes()));
            h.write(&e.class.map_or(u64::MAX, u64::from).to_le_bytes());
        }
        h.finish()
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
