//! The memory plan: before the first step, what the run will hold at its peak, measured by probes
//! rather than guessed from the architecture.
//!
//! The weights, the data and the optimizer's moments are live already (the counting allocator's
//! [`memory::live`]). What a step adds is a fixed part (each trainable tensor's gradient, buffers
//! of the method) and a part proportional to the tokens of a micro-batch (saved activations, their
//! gradients, the logits): two probes, a forward and backward of the first training row cut to
//! `n/2` and `n` tokens (n up to 128), give both by a straight line, and the tape's saved bytes
//! give the activations' share of it. The step's peak is then predicted for the largest
//! micro-batch the data can make (`--micro-batch` rows of the longest example). A forward under
//! the other checkpointing policy (off, or every block) gives what changing the policy would save.
//! The probes update nothing (gradients are dropped) and draw no randomness the steps would see
//! (each step reseeds its dropout). CPU only: device memory is not the heap.

use crate::error::Result;
use crate::memory;
use crate::model::{Backend, RunFloat};
use crate::run::Setup;
use crate::TrainConfig;
use tuna_autograd::optim::{backward_discarding, zero_grad};
use tuna_autograd::{stats, Tensor};
use tuna_models::checkpointing::Checkpointing;

/// What a run is predicted to hold at its peak, and of what.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The heap live before the first step: weights, data, tokenizer, and the optimizer's moments
    /// (allocated after the plan).
    pub before: u64,
    /// Of which the moments.
    pub optimizer: u64,
    /// Every trainable tensor's gradient (f32).
    pub gradients: u64,
    /// The step's fixed part beyond the moments (gradients, the method's buffers), from the probes.
    pub step_fixed: f64,
    /// Bytes per token a step adds, all told (saved activations, their gradients, logits).
    pub per_token: f64,
    /// Of which saved activations, per token, under the run's checkpointing policy.
    pub saved_per_token: f64,
    /// Saved activations per token under the other policy (off if the run checkpoints, every
    /// block if not), and its name.
    pub other_policy: (Checkpointing, f64),
    /// Tokens of the largest micro-batch (rows x the longest example, virtual tokens included).
    pub tokens: usize,
    /// Resident bytes outside the heap (the program, its libraries) when the plan was made.
    pub outside_heap: u64,
    /// f32 bytes of the frozen block weights `--base-precision` could pack (0 when packed already,
    /// or when they train).
    pub packable: u64,
    /// Bytes `--base-precision q4` would save: the f32 bytes of the block weights the model's
    /// `.gguf` stores as Q4_0 / Q4_1, less their blocks' bytes (0 for other models).
    pub q4_saves: u64,
    /// What restoring a checkpoint holds beyond [`MemoryPlan::before`] while it runs (one host
    /// copy of the largest trainable tensor and a read buffer), for a run that may resume; 0 for
    /// one that starts fresh. It is over before the first step, so the peak counts the larger of
    /// it and a step's part.
    pub restore: u64,
}

impl MemoryPlan {
    /// The predicted peak resident set: the heap's (what is held, the step's fixed part, the
    /// tokens' part) plus what lies outside the heap.
    pub fn peak(&self) -> u64 {
        self.peak_with(self.tokens, self.per_token, 0)
    }
    /// The predicted peak with `tokens` per micro-batch at `per_token` bytes each, less `less`.
    fn peak_with(&self, tokens: usize, per_token: f64, less: u64) -> u64 {
        let step = (self.step_fixed + per_token * tokens as f64).max(0.0) as u64;
        (self.before + self.outside_heap + step.max(self.restore)).saturating_sub(less)
    }
    /// Bytes per token with `saved` saved-activation bytes per token instead of the run's.
    fn per_token_with(&self, saved: f64) -> f64 {
        self.per_token - self.saved_per_token + saved
    }

    /// One line for the log, before the first step.
    pub fn describe(&self) -> String {
        let h = |b: f64| crate::human_bytes(b.max(0.0) as u64);
        let step = (self.step_fixed + self.per_token * self.tokens as f64).max(0.0);
        let restore = match self.restore {
            0 => String::new(),
            r if r as f64 > step => {
                format!("; restoring the checkpoint holds {} more, in place of a step's", h(r as f64))
            }
            r => format!("; restoring the checkpoint holds {} more, under a step's", h(r as f64)),
        };
        format!(
            "memory plan: peak {} predicted = {} held now (weights, data, optimizer {}) + {} per step \
             (gradients {}) + {}/token x {} tokens (saved activations {}/token; {} with checkpointing {}) + {} outside the heap{restore}",
            crate::human_bytes(self.peak()),
            h(self.before as f64),
            h(self.optimizer as f64),
            h(self.step_fixed),
            h(self.gradients as f64),
            h(self.per_token),
            self.tokens,
            h(self.saved_per_token),
            h(self.other_policy.1),
            self.other_policy.0,
            h(self.outside_heap as f64),
        )
    }

    /// Changes of flags that would bring the predicted peak under `limit`, each with its peak.
    pub fn fits_with(&self, cfg: &TrainConfig, limit: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let rows = cfg.micro_batch.max(1);
        let per_row = self.tokens / rows;
        // What checkpointing every block would save per token, where the run does not already.
        let ckpt = (self.other_policy.0 != Checkpointing::Off).then(|| self.per_token_with(self.other_policy.1));
        // bf16 moments halve f32 ones.
        let bf16 = match cfg.optimizer_state {
            tuna_autograd::optim::MomentStorage::Master => Some(self.optimizer / 2),
            tuna_autograd::optim::MomentStorage::Bf16 => None,
        };
        // The optimizer inside the backward needs the whole batch in one pass.
        let smaller_micro = !cfg.update_in_backward;
        if let Some(per) = ckpt {
            out.push(("--checkpoint-activations every".to_string(), self.peak_with(self.tokens, per, 0)));
        }
        if let Some(less) = bf16 {
            out.push(("--optimizer-state bf16".into(), self.peak_with(self.tokens, self.per_token, less)));
        }
        // A packed base: bf16 halves the frozen block weights; int8 keeps 17/64 of them (one byte
        // a weight and an f32 scale per 64: 1.0625 of f32's 4 bytes).
        if self.packable > 0 {
            for (flag, less) in [("bf16", self.packable / 2), ("int8", self.packable / 64 * 47)] {
                out.push((format!("--base-precision {flag}"), self.peak_with(self.tokens, self.per_token, less)));
            }
        }
        if self.q4_saves > 0 {
            out.push(("--base-precision q4".into(), self.peak_with(self.tokens, self.per_token, self.q4_saves)));
        }
        for r in [rows / 2, rows / 4, 1].into_iter().filter(|_| smaller_micro) {
            if r >= 1 && r < rows && !out.iter().any(|(f, _)| f == &format!("--micro-batch {r}")) {
                out.push((format!("--micro-batch {r}"), self.peak_with(r * per_row, self.per_token, 0)));
            }
        }
        if let Some(per) = ckpt.filter(|_| smaller_micro) {
            let all = self.peak_with(per_row, per, bf16.unwrap_or(0));
            out.push(("--checkpoint-activations every --optimizer-state bf16 --micro-batch 1".into(), all));
        }
        out.retain(|(_, p)| *p <= limit);
        out
    }
}

/// One probe: heap bytes a forward and backward of `b` adds at its peak, and the tape's peak saved
/// activations in it; the gradients are dropped.
fn probe<B: Backend<E>, E: RunFloat>(s: &Setup<B, E>, cfg: &TrainConfig, b: &crate::Batch) -> Result<(f64, f64)> {
    let params: Vec<&Tensor<B, E>> = s.params.iter().map(|(_, t)| t).collect();
    let live = memory::live().unwrap_or(0);
    memory::reset_peak();
    stats::reset();
    let base_saved = stats::snapshot().saved_bytes;
    s.model.adapt().seed_dropout(0);
    let (loss, terms) = s.spec.loss(&s.model, b)?;
    if terms > 0 {
        if cfg.update_in_backward {
            backward_discarding(&loss, &params)?;
        } else {
            loss.backward()?;
        }
    }
    drop(loss);
    zero_grad(&params);
    let peak = memory::peak().unwrap_or(0).saturating_sub(live);
    let saved = stats::snapshot().peak_saved_bytes.saturating_sub(base_saved);
    Ok((peak as f64, saved as f64))
}

/// Saved activations of a forward of `b` (no backward) under `policy`.
fn saved_forward<B: Backend<E>, E: RunFloat>(
    s: &mut Setup<B, E>,
    b: &crate::Batch,
    policy: Checkpointing,
) -> Result<f64> {
    let run_policy = s.model.checkpointing();
    s.model.set_checkpointing(policy);
    stats::reset();
    let base = stats::snapshot().saved_bytes;
    s.model.adapt().seed_dropout(0);
    let r = s.spec.loss(&s.model, b);
    let saved = stats::snapshot().peak_saved_bytes.saturating_sub(base) as f64;
    s.model.set_checkpointing(run_policy);
    drop(r?);
    Ok(saved)
}

/// The plan for the run `s` is about to start (after its optimizer exists, and `restore` bytes
/// held while a checkpoint is restored, 0 for a fresh run), or `None` where the heap is not
/// counted, the first row is too short to draw a line through, or the model is an
/// encoder-decoder.
pub(crate) fn plan<B: Backend<E>, E: RunFloat>(
    s: &mut Setup<B, E>,
    cfg: &TrainConfig,
    first: &crate::Batch,
    optimizer: u64,
    restore: u64,
) -> Result<Option<MemoryPlan>> {
    let Some(live) = memory::live() else { return Ok(None) };
    // The probes cut the first row to its last tokens: an encoder-decoder's row would lose its
    // prompt (the encoder's input), so T5 runs without a plan.
    if s.model.is_encoder_decoder() {
        return Ok(None);
    }
    let row_len = (0..first.seq).filter(|&c| first.mask[c] == 1).count();
    let n2 = row_len.min(128);
    let n1 = n2 / 2;
    if n1 < 2 {
        return Ok(None);
    }
    let virt = cfg.method.virtual_tokens();
    let (a, b) = (first.row_tail(n1), first.row_tail(n2));
    // As the steps run: in training mode (dropout masks count).
    s.model.adapt().set_training(true);
    let probes = probe(s, cfg, &a).and_then(|p1| Ok((p1, probe(s, cfg, &b)?)));
    let other = match cfg.checkpoint_activations {
        Checkpointing::Off => Checkpointing::Every(1),
        _ => Checkpointing::Off,
    };
    let others = probes.and_then(|p| Ok((p, saved_forward(s, &a, other)?, saved_forward(s, &b, other)?)));
    s.model.adapt().set_training(false);
    let (((p1, s1), (p2, s2)), o1, o2) = others?;
    // The fused head and loss holds one chunk of logits, `min(targets, chunk rows)` rows: the
    // short probes see it grow with their targets, a long row holds a full chunk. Taken out of the
    // slope, and into the fixed part at the run's size.
    let (lce1, lce2, lce_run) = if cfg.task == crate::Task::Classify {
        (0.0, 0.0, 0.0)
    } else {
        let (vocab, esize) = (s.model.shape().vocab, std::mem::size_of::<f32>());
        let chunk = tuna_autograd::ops::loss::lce_chunk_rows(vocab);
        let held = |targets: usize| (targets.min(chunk) * vocab * esize) as f64;
        (held(a.target_tokens), held(b.target_tokens), held(cfg.micro_batch.max(1) * s.batcher.longest()))
    };
    let (p1, p2) = (p1 - lce1, p2 - lce2);
    let dn = (n2 - n1) as f64;
    let saved_per_token = ((s2 - s1) / dn).max(0.0);
    // The saved activations are part of what a token adds (a noisy heap line may say less).
    let per_token = ((p2 - p1) / dn).max(saved_per_token);
    let step_fixed = p1 - per_token * (n1 + virt) as f64 + lce_run;
    let gradients = s.params.iter().map(|(_, t)| t.bytes() as u64).sum();
    let tokens = cfg.micro_batch.max(1) * (s.batcher.longest() + virt);
    // Freed heap memory stays resident (tuna_kernels::heap): give it back before reading the
    // resident size, or it would count as memory outside the heap on top of the peak.
    tuna_kernels::heap::release_free_memory();
    let rss = crate::export::rss_bytes();
    let f32_base = cfg.base_precision == tuna_models::model::BasePrecision::F32;
    memory::reset_peak();
    Ok(Some(MemoryPlan {
        before: live + optimizer,
        optimizer,
        gradients,
        step_fixed,
        per_token,
        saved_per_token,
        other_policy: (other, ((o2 - o1) / dn).max(0.0)),
        tokens,
        outside_heap: rss.saturating_sub(live),
        // Suggested only from an f32 base: from q4 (whose other block weights stay f32), bf16 or
        // int8 would widen every Q4 weight too, so the peak could rise.
        packable: if f32_base { s.model.packable_bytes() as u64 } else { 0 },
        q4_saves: if f32_base {
            let (f32_bytes, q4_bytes) = s.model.q4_convertible_bytes();
            f32_bytes.saturating_sub(q4_bytes) as u64
        } else {
            0
        },
        restore,
    }))
}

/// The memory this process may still use: the system's available memory (or a cgroup's limit,
/// where lower) plus what it holds now; `TUNA_MEMORY_AVAILABLE` (bytes) pretends another amount
/// (to see what the plan would refuse on a smaller machine).
pub fn available_bytes() -> std::result::Result<Option<u64>, String> {
    if let Some(v) = std::env::var_os("TUNA_MEMORY_AVAILABLE") {
        return v
            .to_str()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| format!("TUNA_MEMORY_AVAILABLE={v:?}: expected a whole number of bytes"));
    }
    Ok(system_available())
}

fn system_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| {
        meminfo.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    };
    let mut avail = kb("MemAvailable:")? * 1024 + crate::export::rss_bytes();
    if let Ok(m) = std::fs::read_to_string("/sys/fs/cgroup/memory.max") {
        if let Ok(limit) = m.trim().parse::<u64>() {
            avail = avail.min(limit);
        }
    }
    Some(avail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn plan() -> MemoryPlan {
        MemoryPlan {
            before: 1000 * MB,
            optimizer: 400 * MB,
            gradients: 200 * MB,
            step_fixed: (200 * MB) as f64,
            per_token: 100_000.0,
            saved_per_token: 80_000.0,
            other_policy: (Checkpointing::Every(1), 10_000.0),
            tokens: 8 * 1024,
            outside_heap: 50 * MB,
            packable: 0,
            q4_saves: 0,
            restore: 0,
        }
    }

    #[test]
    fn the_peak_adds_the_parts_and_the_fixes_are_those_that_fit() {
        let p = plan();
        assert_eq!(p.peak(), 1250 * MB + 819_200_000);
        let dir = std::env::temp_dir().join(format!("tuna-plan-{}", std::process::id()));
        let mut cfg = crate::run::tests::config(crate::Task::Classify, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        cfg.micro_batch = 8;
        // Checkpointing saves 70 KB of 100 KB per token (573 MB), bf16 moments 200 MB, two rows of
        // eight 3/4 of the tokens (614 MB), four rows half (410 MB).
        let at = |limit: u64| p.fits_with(&cfg, limit).into_iter().map(|(f, _)| f).collect::<Vec<_>>();
        let all = at(u64::MAX);
        assert_eq!(all.len(), 6, "{all:?}");
        let tight = at(p.peak() - 500 * MB);
        assert!(tight.contains(&"--checkpoint-activations every".to_string()), "{tight:?}");
        assert!(!tight.contains(&"--optimizer-state bf16".to_string()), "{tight:?}");
        assert!(tight.contains(&"--micro-batch 2".to_string()), "{tight:?}");
        assert!(!tight.contains(&"--micro-batch 4".to_string()), "{tight:?}");
        assert!(at(p.before).is_empty(), "nothing fits below what is held already");
        for (f, peak) in p.fits_with(&cfg, u64::MAX) {
            assert!(peak < p.peak(), "{f}: {peak} is no saving");
        }
        // With 400 MB of frozen block weights, bf16 saves 200 MB and int8 293.75 MB (47/64).
        let q = MemoryPlan { packable: 400 * MB, ..plan() };
        let fixes = q.fits_with(&cfg, u64::MAX);
        let peak = |f: &str| fixes.iter().find(|(g, _)| g == f).map(|(_, p)| *p);
        assert_eq!(peak("--base-precision bf16"), Some(q.peak() - 200 * MB));
        assert_eq!(peak("--base-precision int8"), Some(q.peak() - 400 * MB / 64 * 47));
        assert_eq!(peak("--base-precision q4"), None, "no Q4 weights in the file: no q4");
        // A .gguf storing 400 MB (f32) of them as Q4_1 (20 bytes per 32 weights): q4 saves 27/32.
        let g = MemoryPlan { packable: 400 * MB, q4_saves: 400 * MB / 32 * 27, ..plan() };
        let fixes = g.fits_with(&cfg, u64::MAX);
        let peak = |f: &str| fixes.iter().find(|(g, _)| g == f).map(|(_, p)| *p);
        assert_eq!(peak("--base-precision q4"), Some(g.peak() - 400 * MB / 32 * 27));
    }

    /// A resume's restore is over before the first step: the peak counts the larger of it and a
    /// step's part, so a resume whose restore will not fit is refused like a step that will not.
    #[test]
    fn a_resume_counts_its_restore_where_it_exceeds_a_step() {
        let p = plan();
        let step = p.peak() - p.before - p.outside_heap;
        let under = MemoryPlan { restore: step - MB, ..plan() };
        assert_eq!(under.peak(), p.peak(), "a restore under a step's part is not on top of it");
        assert!(under.describe().contains("under a step's"), "{}", under.describe());
        let r = MemoryPlan { restore: step + 300 * MB, ..plan() };
        assert_eq!(r.peak(), p.peak() + 300 * MB);
        assert!(r.describe().contains("in place of a step's"), "{}", r.describe());
        assert!(!p.describe().contains("restoring"), "a fresh run has no restore: {}", p.describe());
        let dir = std::env::temp_dir().join(format!("tuna-plan-restore-{}", std::process::id()));
        let mut cfg = crate::run::tests::config(crate::Task::Classify, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        cfg.micro_batch = 8;
        // Just under the restore's peak: shrinking a step (checkpointing, fewer rows) does not
        // help; bf16 moments (200 MB less held throughout) do, alone or with the others.
        let fixes: Vec<String> = r.fits_with(&cfg, r.peak() - MB).into_iter().map(|(f, _)| f).collect();
        assert!(fixes.contains(&"--optimizer-state bf16".to_string()), "{fixes:?}");
        assert!(fixes.iter().all(|f| f.contains("--optimizer-state bf16")), "{fixes:?}");
        for (f, peak) in r.fits_with(&cfg, u64::MAX) {
            assert!(peak >= r.before + r.outside_heap + r.restore - 200 * MB, "{f}: {peak} is under the restore's");
        }
    }
}
