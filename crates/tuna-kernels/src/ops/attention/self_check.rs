//! The tensor-core attention checked on the device that runs it, once per device, before its
//! first use.
//!
//! The tensor-core kernels (`attention_tc.cu`, `attention_tc_bwd.cu`) are written in inline PTX
//! (`mma.sync`, `ldmatrix`, `cp.async`) whose fragment layouts the emulated device implements from
//! the PTX manual. A layout misread in both places would pass every emulated test and give wrong
//! numbers, silently, on hardware. So the first bf16 attention call a device would run on tensor
//! cores first runs a few small fixed cases there, forward and backward, at each tensor-core head
//! dim (32, 64, 128) where the device runs either direction on them (sm_86/89 run the d128
//! forward on tensor cores and its backward on SIMT: both are compared), against the CPU
//! attention (f32, on the same bf16 values):
//! - they agree: the tensor-core kernels take the device's calls from then on;
//! - they disagree: a warning on stderr names the case, the value and both numbers, and every
//!   later bf16 call on the device runs on the SIMT kernels (plain CUDA C), after the same cases
//!   have passed there; if those disagree too, every attention call on the device is refused
//!   with that message, since no kernel left can be trusted with it.
//!
//! Three cases per head dim cover what a layout or indexing slip would show in: causal with GQA
//! and a key mask over a full and a partial 64-row tile; causal with a KV offset (17 queries after
//! 70 keys) and per-sequence prefix ranges; bidirectional with a score bias and its gradient. They
//! take a few milliseconds of GPU time. Tolerances are twice the kernel tests' (derived in
//! `tests_tc.rs` / `tests_tc_bwd.rs` from bf16's rounding): a misread fragment moves values by
//! their own size, far outside them. Each call's path is confirmed (a case meant for the tensor
//! cores that ran elsewhere is an error, not a pass).

use super::cuda::{
    force_simt, last_bwd_path, last_fwd_path, set_last_paths, simt_forced, tc_bwd_refusal, tc_fwd_refusal, BwdPath,
    FwdPath,
};
use super::{AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use crate::cuda::CudaBuf;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::{Cpu, Cuda};
use half::bf16;
use std::cell::Cell;

/// What the check found on a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The tensor-core kernels agree with the CPU (`cases` cases forward and backward; 0 where
    /// the device runs no attention on tensor cores).
    TensorCores { cases: usize },
    /// They disagree (`why`); the SIMT kernels agree on the same cases and take bf16 calls.
    Simt { why: String },
    /// Both disagree: attention is refused on this device with `why`.
    Refused { why: String },
}

impl Verdict {
    /// One line for `tuna info` and the warning.
    pub fn describe(&self) -> String {
        match self {
            Verdict::TensorCores { cases: 0 } => {
                "no tensor-core attention on this device (it needs sm_80 or newer and the shared memory): bf16 \
                 attention runs on the SIMT kernels"
                    .into()
            }
            Verdict::TensorCores { cases } => {
                format!("tensor-core attention checked against the CPU on this device ({cases} cases, forward and backward): agrees")
            }
            Verdict::Simt { why } => format!(
                "tensor-core attention disagrees with the CPU on this device ({why}); bf16 attention runs on the SIMT \
                 kernels instead (slower, and checked the same way)"
            ),
            Verdict::Refused { why } => format!(
                "attention disagrees with the CPU on this device on the tensor-core and the SIMT kernels ({why}); \
                 attention is refused here (the CPU device runs it)"
            ),
        }
    }
}

/// A deliberate error injected into the check's device results (tests of the fallback only).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The tensor-core forward's `o` gets two halves of each head-dim row swapped, as a misread
    /// fragment layout would.
    TensorCore,
    /// The tensor-core backward's `dk` gets the same.
    TensorCoreBackward,
    /// The tensor-core and the SIMT forwards' `o`.
    Both,
}

thread_local! {
    /// Set while this thread runs a check: its own attention calls go straight to the kernels.
    static IN_CHECK: Cell<bool> = const { Cell::new(false) };
    static FAULT: Cell<Fault> = const { Cell::new(Fault::None) };
}

/// Inject `f` into the checks this thread runs from now on (tests of the fallback only).
#[doc(hidden)]
pub fn inject_fault(f: Fault) {
    FAULT.with(|c| c.set(f));
}

/// Whether this thread is running a check (its attention calls must not wait for one).
pub(super) fn in_check() -> bool {
    IN_CHECK.with(|c| c.get())
}

/// The calling thread's attention settings while a check runs, put back when it ends, panics
/// included: in-check on, and the caller's forced-SIMT setting and last paths.
struct Checking {
    forced: bool,
    paths: (Option<FwdPath>, Option<BwdPath>),
}

impl Checking {
    fn start() -> Checking {
        IN_CHECK.with(|c| c.set(true));
        Checking { forced: simt_forced(), paths: (last_fwd_path(), last_bwd_path()) }
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        IN_CHECK.with(|c| c.set(false));
        force_simt(self.forced);
        set_last_paths(self.paths.0, self.paths.1);
    }
}

impl Cuda {
    /// The tensor-core attention's check on this device ([`Verdict`]), run now if it has not run
    /// (the first bf16 attention call that would take the tensor cores runs it too). A device
    /// error while checking is returned, and the check runs again at the next call.
    pub fn attention_check(&self) -> Result<&Verdict> {
        self.attention_check_state().get_or_run(|| {
            let verdict = {
                let _checking = Checking::start();
                run_check(self)?
            };
            if !matches!(verdict, Verdict::TensorCores { .. }) {
                eprintln!("warning: CUDA device {} ({}): {}", self.ordinal(), self.name(), verdict.describe());
            }
            Ok(verdict)
        })
    }

    /// The verdict if the check has run (`None` before, or while the calling thread runs it).
    pub fn attention_checked(&self) -> Option<&Verdict> {
        if in_check() {
            return None;
        }
        self.attention_check_state().get()
    }
}

/// One fixed case: parameters and seeded inputs (already bf16 values).
struct Case {
    name: String,
    p: AttnParams,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pk: Vec<f32>,
    pv: Vec<f32>,
    mask: Vec<u8>,
    rows: Vec<u32>,
    bias: Vec<f32>,
    d_o: Vec<f32>,
}

/// `n` values in about [-2, 2] (a sum of two uniforms), already bf16 values.
fn values(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f64(2.0 * (rng.next_f64() + rng.next_f64()) - 2.0).to_f32()).collect()
}

/// What a case has besides its shape.
#[derive(Clone, Copy, PartialEq)]
enum Extra {
    /// A key mask dropping about one key in five (never key 0: every row sees a key).
    Mask,
    /// Per-sequence prefix ranges into the prefix table.
    PrefixRows,
    /// A score bias, its gradient wanted.
    Bias,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(d: u32, causal: bool, b: u32, h: u32, kvh: u32, t: u32, s: u32, pre: u32, extra: Extra) -> Case {
        let mut p = AttnParams::new(b as usize, h as usize, kvh as usize, s as usize, d as usize, causal);
        p.q_len = t;
        p.prefix_len = pre;
        p.has_mask = u32::from(extra == Extra::Mask);
        p.has_prefix_rows = u32::from(extra == Extra::PrefixRows);
        p.has_bias = u32::from(extra == Extra::Bias);
        let mut rng = SplitMix64::new(0x5E1F_C4EC ^ (d as u64) << 8 ^ (causal as u64) << 20 ^ t as u64);
        let mask = if p.has_mask == 1 {
            (0..b * s).map(|i| u8::from(i % s == 0 || rng.below(5) != 0)).collect()
        } else {
            Vec::new()
        };
        // Sequence i reads prefix rows i .. i + pre - i (start, len): other ranges per sequence.
        let rows = if p.has_prefix_rows == 1 {
            (0..b).flat_map(|i| [i.min(pre - 1), pre - i.min(pre - 1)]).collect()
        } else {
            Vec::new()
        };
        let what = match extra {
            Extra::Mask => "key mask",
            Extra::PrefixRows => "per-sequence prefix ranges",
            Extra::Bias => "score bias",
        };
        let name = format!(
            "head dim {d}, {}, batch {b}, heads {h}/{kvh}, {t} queries, {s} keys, prefix {pre}, {what}",
            if causal { "causal" } else { "bidirectional" },
        );
        Case {
            name,
            q: values(&mut rng, p.q_elems()),
            k: values(&mut rng, p.kv_elems()),
            v: values(&mut rng, p.kv_elems()),
            pk: values(&mut rng, p.prefix_elems()),
            pv: values(&mut rng, p.prefix_elems()),
            bias: if p.has_bias == 1 { values(&mut rng, p.bias_elems()) } else { Vec::new() },
            d_o: values(&mut rng, p.q_elems()),
            mask,
            rows,
            p,
        }
    }

    fn cpu_inputs(&self) -> AttnInputs<'_, Cpu, f32> {
        AttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix: (self.p.prefix_len > 0).then_some((&self.pk[..], &self.pv[..])),
            key_mask: (self.p.has_mask == 1).then_some(&self.mask[..]),
            prefix_rows: (self.p.has_prefix_rows == 1).then_some(&self.rows[..]),
            bias: (self.p.has_bias == 1).then_some(&self.bias[..]),
        }
    }
}

/// The cases at every tensor-core head dim where this device runs either direction on tensor
/// cores.
fn cases(dev: &Cuda) -> Vec<Case> {
    let mut all = Vec::new();
    for d in super::cuda::TC_HEAD_DIMS {
        all.push(Case::new(d, true, 2, 4, 2, 80, 80, 0, Extra::Mask));
        all.push(Case::new(d, true, 2, 2, 1, 17, 70, 6, Extra::PrefixRows));
        all.push(Case::new(d, false, 1, 2, 2, 40, 40, 0, Extra::Bias));
    }
    all.retain(|c| tc_fwd_refusal(dev, &c.p).is_none() || tc_bwd_refusal(dev, &c.p).is_none());
    all
}

/// How many cases the check runs on `dev`.
#[cfg(test)]
pub(super) fn case_count(dev: &Cuda) -> usize {
    cases(dev).len()
}

/// The outputs compared: the forward's and the backward's gradients (the prefix ones and dbias
/// empty where the case has none).
const NAMES: [&str; 8] = ["o", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias"];
type Outputs = [Vec<f32>; 8];

/// `(atol, rtol)` per output: twice `tests_tc.rs`'s forward and `tests_tc_bwd.rs`'s backward
/// tolerances (dbias: its f32 one).
const TOLS: [(f32, f32); 8] = [
    (2e-2, 2e-2),
    (8e-3, 2e-3),
    (3e-2, 1.6e-2),
    (3e-2, 1.6e-2),
    (3e-2, 1.6e-2),
    (3e-2, 1.6e-2),
    (3e-2, 1.6e-2),
    (1e-4, 2e-4),
];

/// The device's forward and backward of a case, as f32 host vectors, with the paths they took.
fn on_device(dev: &Cuda, c: &Case) -> Result<(Outputs, FwdPath, BwdPath)> {
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>());
    let down = |b: &CudaBuf<bf16>| -> Result<Vec<f32>> { Ok(dev.download(b)?.into_iter().map(f32::from).collect()) };
    let p = c.p;
    let (q, k, v, d_o) = (up(&c.q)?, up(&c.k)?, up(&c.v)?, up(&c.d_o)?);
    let prefix = if p.prefix_len > 0 { Some((up(&c.pk)?, up(&c.pv)?)) } else { None };
    let mask = if p.has_mask == 1 { Some(dev.upload(&c.mask)?) } else { None };
    let rows = if p.has_prefix_rows == 1 { Some(dev.upload(&c.rows)?) } else { None };
    let bias = if p.has_bias == 1 { Some(up(&c.bias)?) } else { None };
    let x = AttnInputs::<Cuda, bf16> {
        q: &q,
        k: &k,
        v: &v,
        prefix: prefix.as_ref().map(|(a, b)| (a, b)),
        key_mask: mask.as_ref(),
        prefix_rows: rows.as_ref(),
        bias: bias.as_ref(),
    };
    let mut o = dev.unfilled::<bf16>(p.q_elems())?;
    let mut lse = dev.unfilled::<f32>(p.lse_elems())?;
    <Cuda as AttentionKernel<bf16>>::attn_fwd(dev, &p, x, &mut o, &mut lse)?;
    let (mut dq, mut dk, mut dv) = (dev.zeros(p.q_elems())?, dev.zeros(p.kv_elems())?, dev.zeros(p.kv_elems())?);
    let mut dprefix =
        if p.prefix_len > 0 { Some((dev.zeros(p.prefix_elems())?, dev.zeros(p.prefix_elems())?)) } else { None };
    let mut dbias = if p.has_bias == 1 { Some(dev.zeros::<f32>(p.bias_elems())?) } else { None };
    let g = AttnGrads::<Cuda, bf16> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: dprefix.as_mut().map(|(a, b)| (a, b)),
        dbias: dbias.as_mut(),
    };
    <Cuda as AttentionKernel<bf16>>::attn_bwd(dev, &p, x, &o, &d_o, &lse, g)?;
    let unset = || Error::Invalid { op: "attention check", msg: "a call recorded no path".into() };
    let (fwd, bwd) = (last_fwd_path().ok_or_else(unset)?, last_bwd_path().ok_or_else(unset)?);
    let (dpk, dpv) = match &dprefix {
        Some((a, b)) => (dev.download(a)?, dev.download(b)?),
        None => (Vec::new(), Vec::new()),
    };
    let db = match &dbias {
        Some(b) => dev.download(b)?,
        None => Vec::new(),
    };
    let out = [down(&o)?, dev.download(&lse)?, down(&dq)?, down(&dk)?, down(&dv)?, dpk, dpv, db];
    Ok((out, fwd, bwd))
}

/// The CPU's forward of a case, and its backward from the device's `o` and `lse` (as a caller
/// passes them: the same delta = rowsum(dO * O) on both sides).
fn on_cpu(c: &Case, dev_o: &[f32], dev_lse: &[f32]) -> Result<Outputs> {
    let p = c.p;
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    <Cpu as AttentionKernel<f32>>::attn_fwd(&Cpu, &p, c.cpu_inputs(), &mut o, &mut lse)?;
    let (mut dq, mut dk, mut dv) = (vec![0.0; p.q_elems()], vec![0.0; p.kv_elems()], vec![0.0; p.kv_elems()]);
    let (mut dpk, mut dpv) = (vec![0.0; p.prefix_elems()], vec![0.0; p.prefix_elems()]);
    let mut db = vec![0.0; if p.has_bias == 1 { p.bias_elems() } else { 0 }];
    let g = AttnGrads::<Cpu, f32> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: (p.prefix_len > 0).then_some((&mut dpk[..], &mut dpv[..])),
        dbias: (p.has_bias == 1).then_some(&mut db[..]),
    };
    <Cpu as AttentionKernel<f32>>::attn_bwd(&Cpu, &p, c.cpu_inputs(), dev_o, &c.d_o, dev_lse, g)?;
    Ok([o, lse, dq, dk, dv, dpk, dpv, db])
}

/// The first output of `got` outside its tolerance of `want`, described; a NaN counts as outside,
/// an infinity unless the CPU's is the same.
fn compare(case: &str, got: &Outputs, want: &Outputs) -> Option<String> {
    for (((name, g), w), (atol, rtol)) in NAMES.iter().zip(got).zip(want).zip(TOLS) {
        if g.len() != w.len() {
            return Some(format!("{case}: {name} has {} values, the CPU's {}", g.len(), w.len()));
        }
        let close = |g: f32, w: f32| g == w || (g - w).abs() <= atol + rtol * w.abs();
        let bad = g.iter().zip(w).position(|(&g, &w)| !close(g, w));
        if let Some(i) = bad {
            let (g, w) = (g[i], w[i]);
            return Some(format!("{case}: {name}[{i}] = {g}, the CPU's {w}, allowed {atol} + {rtol} * |{w}|"));
        }
    }
    None
}

/// Swap the halves of each head-dim row of `v` (a fault for the tests).
fn swap_halves(v: &mut [f32], d: usize) {
    for row in v.chunks_mut(d) {
        let (a, b) = row.split_at_mut(d / 2);
        a.swap_with_slice(b);
    }
}

/// Which kernels a pass runs the cases on.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    TensorCores,
    Simt,
}

/// Every case on `pass`'s kernels: the first disagreement, or `None`. A call that did not take
/// the path the pass is for is an error (the check could not vouch for the kernels it names).
fn run_cases(dev: &Cuda, cases: &[Case], pass: Pass) -> Result<Option<String>> {
    force_simt(pass == Pass::Simt);
    let fault = FAULT.with(|c| c.get());
    for c in cases {
        let in_case = |e: Error| match e {
            Error::Cuda { context, msg } => {
                Error::Cuda { context: format!("the attention check ({}): {context}", c.name), msg }
            }
            other => other,
        };
        let (mut got, fwd, bwd) = on_device(dev, c).map_err(in_case)?;
        let tc = |refusal: Option<&str>| pass == Pass::TensorCores && refusal.is_none();
        let (want_fwd, want_bwd) = (tc(tc_fwd_refusal(dev, &c.p)), tc(tc_bwd_refusal(dev, &c.p)));
        if (fwd == FwdPath::TensorCore) != want_fwd || (bwd == BwdPath::TensorCore) != want_bwd {
            let msg = format!("{}: the calls ran on {fwd} / {bwd}, not the kernels the check is for", c.name);
            return Err(Error::Invalid { op: "attention check", msg });
        }
        let d = c.p.head_dim as usize;
        match (fault, pass) {
            (Fault::TensorCore | Fault::Both, Pass::TensorCores) | (Fault::Both, Pass::Simt) => {
                swap_halves(&mut got[0], d)
            }
            (Fault::TensorCoreBackward, Pass::TensorCores) => swap_halves(&mut got[3], d),
            _ => {}
        }
        let want = on_cpu(c, &got[0], &got[1])?;
        if let Some(why) = compare(&c.name, &got, &want) {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

/// The check itself (on the calling thread, in a [`Checking`] scope: its attention calls go
/// straight to the kernels).
fn run_check(dev: &Cuda) -> Result<Verdict> {
    let cases = cases(dev);
    let Some(why) = run_cases(dev, &cases, Pass::TensorCores)? else {
        return Ok(Verdict::TensorCores { cases: cases.len() });
    };
    Ok(match run_cases(dev, &cases, Pass::Simt)? {
        None => Verdict::Simt { why },
        Some(simt_why) => Verdict::Refused { why: format!("tensor cores: {why}; SIMT: {simt_why}") },
    })
}

/// The error every attention call on a device whose check refused it returns.
pub(super) fn refused(dev: &Cuda, why: &str) -> Error {
    Error::Unsupported {
        op: "attention",
        device: crate::backend::Backend::device_name(dev),
        msg: format!("the device's attention check failed: {why}; attention cannot run here (the CPU device runs it)"),
    }
}
