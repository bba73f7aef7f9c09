//! `tuna profile`: a few training steps with per-op timing, and where the step's time went.

use crate::batch::Cursor;
use crate::config::TrainConfig;
use crate::error::Result;
use crate::model::{Backend, RunFloat};
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
    /// Achieved GFLOP/s of the forward and of the backward, for the kinds whose work is counted
    /// (matrix products and attention).
    pub forward_gflops: Option<f64>,
    pub backward_gflops: Option<f64>,
}

/// Where a training step's time goes, per op kind, averaged over the measured steps.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// What the step computed in: `f32`, or `bf16` (mixed precision: bf16 activations and frozen
    /// weights, f32 masters, gradients and moments).
    pub precision: String,
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
    /// On the CPU: the f32 matrix-product rate this machine reaches (a 1024^3 product through the
    /// same GEMM, best of three, measured before the steps), the ceiling the rows are read against.
    pub peak_gflops: Option<f64>,
    /// On the CPU with a bf16, int8 or q4 base: the path its products take (`TUNA_CPU_MATRIX`'s or
    /// `TUNA_CPU_MATRIX_BF16`'s names: `amx`, `avx512-vnni`, `avx-vnni`, `avx512-bf16`,
    /// `emulated`, `widen`).
    pub base_path: Option<String>,
    /// On a dot-product path: that path's rate on a 1024^3 product (GOP/s, 2 per multiply-add,
    /// quantizing or rounding the activations included), the ceiling the base's `matmul (int8
    /// base)` / `matmul (q4 base)` / `matmul (bf16 base)` row is read against (the widen path's is the f32 GEMM rate).
    pub base_peak_gops: Option<f64>,
}

/// The f32 GEMM rate of this CPU with the threads the run has: `C = A B` at 1024^3, best of three.
pub fn cpu_gemm_gflops() -> f64 {
    use tuna_kernels::ops::matmul::{MatmulKernel, MatmulParams};
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0).collect();
    let mut c = vec![0f32; n * n];
    let p = MatmulParams::new(n, n, n);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        if MatmulKernel::<f32>::matmul_fwd(&tuna_kernels::Cpu, &p, &a, &a, &mut c).is_err() {
            return f64::NAN;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    p.flops() / best / 1e9
}

/// A low-precision base's dot-product path: `x W^T` at 1024^3 through it (activations quantized
/// or rounded included), best of three, in GOP/s.
pub fn cpu_lowp_gops(p: tuna_kernels::ops::lowp::BasePrecision) -> Option<f64> {
    use tuna_kernels::ops::lowp::{bf16_path, dot, dot_bf16, matrix_path, BasePrecision, PackedWeight};
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0).collect();
    let w = match p {
        // Q4_0 blocks of every code at a scale of 1/64: the rate includes their requantization.
        BasePrecision::Q4 => {
            let fmt = tuna_kernels::ops::lowp::Q4Format::Q4_0;
            // f16 1/64 = 2^-6: biased exponent 9, no mantissa bits, little-endian.
            let block: Vec<u8> = [0x00, 0x24].into_iter().chain((0..16u8).map(|j| j * 17)).collect();
            let blocks = block.repeat(n * n / tuna_kernels::ops::lowp::Q4_BLOCK);
            PackedWeight::from_q4("peak", fmt, blocks, n, n).ok()?
        }
        _ => PackedWeight::pack("peak", &a, n, n, false, p).ok()?,
    };
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        match p {
            BasePrecision::Int8 | BasePrecision::Q4 => dot::linear_fwd(matrix_path().dot_isa()?, &w, n, &a, &mut c),
            BasePrecision::Bf16 => dot_bf16::linear_fwd(bf16_path()?, &w, n, &a, &mut c),
            _ => return None,
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// Run `warmup` then `steps` training steps of `cfg` (no checkpoints, nothing written) with
/// per-op timing on (see [`tuna_autograd::stats::set_profiling`]) and report where the time went.
pub fn profile<B: Backend>(dev: &Arc<B>, cfg: &TrainConfig, warmup: u64, steps: u64) -> Result<Profile> {
    profile_as::<B, f32>(dev, cfg, warmup, steps)
}

/// [`profile`] in element type `E` (bf16 mixed precision on CUDA: `cfg.precision` must name `E`).
pub fn profile_as<B: Backend<E>, E: RunFloat>(
    dev: &Arc<B>,
    cfg: &TrainConfig,
    warmup: u64,
    steps: u64,
) -> Result<Profile> {
    use tuna_autograd::stats;
    crate::run::check_precision::<E>(cfg)?;
    let mut s: Setup<B, E> = setup(dev, cfg)?;
    let on_cpu = dev.device_name().starts_with("cpu");
    let peak_gflops = on_cpu.then(cpu_gemm_gflops);
    let base_path = tuna_kernels::ops::lowp::base_path_name(cfg.base_precision).filter(|_| on_cpu);
    let base_peak_gops = base_path.and_then(|_| cpu_lowp_gops(cfg.base_precision));
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
    let rate = |f: Option<&u64>, t: Option<&stats::OpTime>| match (f, t) {
        (Some(&f), Some(t)) if t.nanos > 0 && f > 0 => Some(f as f64 / t.nanos as f64),
        _ => None,
    };
    let mut rows: Vec<ProfileRow> = kinds
        .into_iter()
        .map(|k| ProfileRow {
            kind: k.to_string(),
            forward_calls: calls(snap.forward_time.get(k)),
            forward_ms: ms(snap.forward_time.get(k)),
            backward_calls: calls(snap.backward_time.get(k)),
            backward_ms: ms(snap.backward_time.get(k)),
            saved_at_peak: snap.saved_at_peak.get(k).copied().unwrap_or(0),
            forward_gflops: rate(snap.forward_flops.get(k), snap.forward_time.get(k)),
            backward_gflops: rate(snap.backward_flops.get(k), snap.backward_time.get(k)),
        })
        .collect();
    rows.sort_by(|a, b| (b.forward_ms + b.backward_ms).total_cmp(&(a.forward_ms + a.backward_ms)));
    Ok(Profile {
        precision: E::NAME.to_string(),
        steps,
        step_ms: 1e3 * total / n,
        optimizer_ms: 1e3 * optimizer_s / n,
        tokens_per_s: tokens as f64 / total.max(1e-9),
        peak_saved_bytes: snap.peak_saved_bytes.saturating_sub(held_before),
        rows,
        peak_gflops,
        base_path: base_path.map(str::to_string),
        base_peak_gops,
    })
}
