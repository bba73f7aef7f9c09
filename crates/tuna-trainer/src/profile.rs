//! `tuna profile`: a few training steps with per-op timing, and where the step's time went.

use crate::batch::Cursor;
use crate::config::TrainConfig;
use crate::error::Result;
use crate::model::Backend;
use crate::run::{optimizer, setup, training_step, Setup};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// One op kind's share of a profiled step.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileRow {
    pub kind: String,
    pub forward_calls: u64,
    pub forward_ms: f64,
    pub backward_calls: u64,
    pub backward_ms: f64,
    /// Bytes this kind's backwards held when the step's saved activations peaked.
    pub saved_at_peak: usize,
}

/// Where a training step's time goes, per op kind, averaged over the measured steps.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub steps: u64,
    pub step_ms: f64,
    /// The step after its forward and backward: clipping and AdamW (on CUDA also the wait for
    /// the queued forward and backward, which the host only launches).
    pub optimizer_ms: f64,
    pub tokens_per_s: f64,
    /// The most bytes the tape held for backwards at once over the measured steps (activations and
    /// statistics saved by the forward; what activation checkpointing cuts), beyond what was held
    /// before them.
    pub peak_saved_bytes: usize,
    /// Sorted by total time, largest first; times per step.
    pub rows: Vec<ProfileRow>,
}

/// Run `warmup` then `steps` training steps of `cfg` (no checkpoints, nothing written) with
/// per-op timing on (see [`tuna_autograd::stats::set_profiling`]) and report where the time went.
pub fn profile<B: Backend>(dev: &Arc<B>, cfg: &TrainConfig, warmup: u64, steps: u64) -> Result<Profile> {
    use tuna_autograd::stats;
    let mut s: Setup<B> = setup(dev, cfg)?;
    let mut opt = optimizer(cfg, &s.params)?;
    let mut cursor = Cursor::default();
    s.model.adapt().set_training(true);
    let (mut total, mut optimizer_s, mut tokens) = (0.0f64, 0.0f64, 0usize);
    let mut held_before = 0;
    for i in 0..warmup + steps {
        if i == warmup {
            stats::reset();
            held_before = stats::snapshot().saved_bytes;
            stats::set_profiling(true);
        }
        let batch = s.batcher.next_batch(&mut cursor);
        let t0 = Instant::now();
        let out = training_step(&s, &mut opt, cfg, &batch, cfg.seed ^ (i << 8), cfg.lr)?;
        let _ = s.params[0].1.to_vec()?; // a device finishes the step before the clock stops
        if i >= warmup {
            let step_s = t0.elapsed().as_secs_f64();
            total += step_s;
            optimizer_s += step_s - out.forward_backward_s;
            tokens += batch.real_tokens;
        }
    }
    stats::set_profiling(false);
    let snap = stats::snapshot();
    let n = steps.max(1) as f64;
    let mut kinds: Vec<&'static str> =
        snap.forward_time.keys().chain(snap.backward_time.keys()).chain(snap.saved_at_peak.keys()).copied().collect();
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
            saved_at_peak: snap.saved_at_peak.get(k).copied().unwrap_or(0),
        })
        .collect();
    rows.sort_by(|a, b| (b.forward_ms + b.backward_ms).total_cmp(&(a.forward_ms + a.backward_ms)));
    Ok(Profile {
        steps,
        step_ms: 1e3 * total / n,
        optimizer_ms: 1e3 * optimizer_s / n,
        tokens_per_s: tokens as f64 / total.max(1e-9),
        peak_saved_bytes: snap.peak_saved_bytes.saturating_sub(held_before),
        rows,
    })
}
