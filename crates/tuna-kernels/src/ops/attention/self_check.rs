//! The tensor-core attention checked on the device that runs it, once per device, before its
//! first use.
//!
//! The tensor-core kernels (`attention_tc.cu`, `attention_tc_bwd.cu`) are written in inline PTX
//! (`mma.sync`, `ldmatrix`, `cp.async`) whose fragment layouts the emulated device implements from
//! the PTX manual. A layout misread in both places would pass every emulated test and give wrong
//! numbers, silently, on hardware. So the first bf16 attention call a device would run on tensor
//! cores first runs a few small fixed cases there, forward and backward, at every tensor-core head
//! dim the device covers, and compares them with the CPU attention (f32, on the same bf16 values):
//! - they agree: the tensor-core kernels take the device's calls from then on;
//! - they disagree: a warning on stderr names the case, the value and both numbers, and every
//!   later bf16 call on the device runs on the SIMT kernels (plain CUDA C), after the same cases
//!   have passed there; if those disagree too, every attention call on the device is refused
//!   with that message, since no kernel left can be trusted with it.
//!
//! The cases cover what a layout or indexing slip would show in: causal and not, GQA, a key
//! padding mask, a KV offset (fewer queries than keys), prefix keys and values with their
//! batch-summed gradients, and query/key counts that are not multiples of the 64-row tiles. They
//! take well under a millisecond of GPU time. Tolerances are twice the kernel tests' (those are
//! derived in `tests_tc.rs` / `tests_tc_bwd.rs` from bf16's rounding): a misread fragment moves
//! values by their own size, far outside them.

use super::cuda::{force_simt, simt_forced, tc_bwd_refusal, tc_fwd_refusal};
use super::{AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use crate::cuda::CudaBuf;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::{Cpu, Cuda};
use half::bf16;
use std::cell::Cell;
use std::sync::{Mutex, OnceLock};

/// What the check found on a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The tensor-core kernels agree with the CPU (`cases` cases forward and backward).
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
                 attention is refused here"
            ),
        }
    }
}

/// A device's check: run once, under the mutex, by the first call that needs it.
#[derive(Default)]
pub struct CheckState {
    verdict: OnceLock<Verdict>,
    running: Mutex<()>,
}

/// A deliberate error injected into the check's device results (tests of the fallback only).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The tensor-core kernels' outputs get two halves of each head-dim row swapped, as a misread
    /// fragment layout would.
    TensorCore,
    /// The SIMT kernels' too.
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

impl CheckState {
    /// The verdict, if the check has run.
    pub fn get(&self) -> Option<&Verdict> {
        self.verdict.get()
    }
}

impl Cuda {
    /// The tensor-core attention's check on this device ([`Verdict`]), run now if it has not run
    /// (the first bf16 attention call that would take the tensor cores runs it too). A device
    /// error while checking is returned, and the check runs again at the next call.
    pub fn attention_check(&self) -> Result<&Verdict> {
        let state = self.attention_check_state();
        if let Some(v) = state.get() {
            return Ok(v);
        }
        let _running = state.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = state.get() {
            return Ok(v);
        }
        IN_CHECK.with(|c| c.set(true));
        let found = run_check(self);
        IN_CHECK.with(|c| c.set(false));
        let verdict = found?;
        if !matches!(verdict, Verdict::TensorCores { .. }) {
            eprintln!("warning: CUDA device {} ({}): {}", self.ordinal(), self.name(), verdict.describe());
        }
        Ok(state.verdict.get_or_init(|| verdict))
    }

    /// The verdict if the check has run (`None` before, or while the calling thread runs it).
    pub fn attention_checked(&self) -> Option<&Verdict> {
        if in_check() {
            return None;
        }
        self.attention_check_state().get()
    }
}

/// One fixed case: parameters and seeded inputs.
struct Case {
    name: String,
    p: AttnParams,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pk: Vec<f32>,
    pv: Vec<f32>,
    mask: Vec<u8>,
    d_o: Vec<f32>,
}

/// `n` values in about [-2, 2] (a sum of two uniforms), already bf16 values.
fn values(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f64(2.0 * (rng.next_f64() + rng.next_f64()) - 2.0).to_f32()).collect()
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(d: u32, causal: bool, b: u32, h: u32, kvh: u32, t: u32, s: u32, pre: u32, masked: bool) -> Case {
        let mut p = AttnParams::new(b as usize, h as usize, kvh as usize, s as usize, d as usize, causal);
        p.q_len = t;
        p.prefix_len = pre;
        p.has_mask = masked as u32;
        let mut rng = SplitMix64::new(0x5E1F_C4EC ^ (d as u64) << 8 ^ (causal as u64) << 20 ^ t as u64);
        // The mask drops a few keys of each sequence, never all (no row without a key).
        let mask =
            if masked { (0..b * s).map(|i| u8::from(i % s == 0 || rng.below(5) != 0)).collect() } else { Vec::new() };
        let name = format!(
            "head dim {d}, {}, batch {b}, heads {h}/{kvh}, {t} queries, {s} keys, prefix {pre}{}",
            if causal { "causal" } else { "bidirectional" },
            if masked { ", key mask" } else { "" }
        );
        Case {
            name,
            q: values(&mut rng, p.q_elems()),
            k: values(&mut rng, p.kv_elems()),
            v: values(&mut rng, p.kv_elems()),
            pk: values(&mut rng, p.prefix_elems()),
            pv: values(&mut rng, p.prefix_elems()),
            d_o: values(&mut rng, p.q_elems()),
            mask,
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
            prefix_rows: None,
            bias: None,
        }
    }
}

/// The cases at every tensor-core head dim this device covers.
fn cases(dev: &Cuda) -> Vec<Case> {
    let mut all = Vec::new();
    for d in super::cuda::TC_HEAD_DIMS {
        // causal, GQA 4/2, a mask, 80 tokens (a 64-row tile and a partial one)
        all.push(Case::new(d, true, 2, 4, 2, 80, 80, 0, true));
        // bidirectional, 17 queries after 70 keys, 6 prefix positions, GQA 2/1
        all.push(Case::new(d, false, 2, 2, 1, 17, 70, 6, false));
    }
    all.retain(|c| tc_fwd_refusal(dev, &c.p).is_none() && tc_bwd_refusal(dev, &c.p).is_none());
    all
}

/// The device's forward and backward of a case, as f32 host vectors: o, lse, dq, dk, dv, and the
/// prefix gradients (empty without a prefix).
fn on_device(dev: &Cuda, c: &Case) -> Result<[Vec<f32>; 7]> {
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>());
    let down = |b: &CudaBuf<bf16>| -> Result<Vec<f32>> { Ok(dev.download(b)?.into_iter().map(f32::from).collect()) };
    let p = c.p;
    let (q, k, v, d_o) = (up(&c.q)?, up(&c.k)?, up(&c.v)?, up(&c.d_o)?);
    let prefix = if p.prefix_len > 0 { Some((up(&c.pk)?, up(&c.pv)?)) } else { None };
    let mask = if p.has_mask == 1 { Some(dev.upload(&c.mask)?) } else { None };
    let x = AttnInputs::<Cuda, bf16> {
        q: &q,
        k: &k,
        v: &v,
        prefix: prefix.as_ref().map(|(a, b)| (a, b)),
        key_mask: mask.as_ref(),
        prefix_rows: None,
        bias: None,
    };
    let mut o = dev.unfilled::<bf16>(p.q_elems())?;
    let mut lse = dev.unfilled::<f32>(p.lse_elems())?;
    <Cuda as AttentionKernel<bf16>>::attn_fwd(dev, &p, x, &mut o, &mut lse)?;
    let (mut dq, mut dk, mut dv) = (dev.zeros(p.q_elems())?, dev.zeros(p.kv_elems())?, dev.zeros(p.kv_elems())?);
    let mut dprefix =
        if p.prefix_len > 0 { Some((dev.zeros(p.prefix_elems())?, dev.zeros(p.prefix_elems())?)) } else { None };
    let g = AttnGrads::<Cuda, bf16> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: dprefix.as_mut().map(|(a, b)| (a, b)),
        dbias: None,
    };
    <Cuda as AttentionKernel<bf16>>::attn_bwd(dev, &p, x, &o, &d_o, &lse, g)?;
    let (dpk, dpv) = match &dprefix {
        Some((a, b)) => (dev.download(a)?, dev.download(b)?),
        None => (Vec::new(), Vec::new()),
    };
    Ok([down(&o)?, dev.download(&lse)?, down(&dq)?, down(&dk)?, down(&dv)?, dpk, dpv])
}

/// The CPU's forward of a case, and its backward from the device's `o` and `lse` (as a caller
/// passes them: the same delta = rowsum(dO * O) on both sides).
fn on_cpu(c: &Case, dev_o: &[f32], dev_lse: &[f32]) -> Result<[Vec<f32>; 7]> {
    let p = c.p;
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    <Cpu as AttentionKernel<f32>>::attn_fwd(&Cpu, &p, c.cpu_inputs(), &mut o, &mut lse)?;
    let (mut dq, mut dk, mut dv) = (vec![0.0; p.q_elems()], vec![0.0; p.kv_elems()], vec![0.0; p.kv_elems()]);
    let (mut dpk, mut dpv) = (vec![0.0; p.prefix_elems()], vec![0.0; p.prefix_elems()]);
    let g = AttnGrads::<Cpu, f32> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: (p.prefix_len > 0).then_some((&mut dpk[..], &mut dpv[..])),
        dbias: None,
    };
    <Cpu as AttentionKernel<f32>>::attn_bwd(&Cpu, &p, c.cpu_inputs(), dev_o, &c.d_o, dev_lse, g)?;
    Ok([o, lse, dq, dk, dv, dpk, dpv])
}

const NAMES: [&str; 7] = ["o", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"];
/// `(atol, rtol)` per output: twice `tests_tc.rs`'s forward and `tests_tc_bwd.rs`'s backward
/// tolerances.
const TOLS: [(f32, f32); 7] =
    [(2e-2, 2e-2), (8e-3, 2e-3), (3e-2, 1.6e-2), (3e-2, 1.6e-2), (3e-2, 1.6e-2), (3e-2, 1.6e-2), (3e-2, 1.6e-2)];

/// The first output of `got` outside its tolerance of `want`, described; a NaN counts as outside,
/// an infinity unless the CPU's is the same.
fn compare(case: &str, got: &[Vec<f32>; 7], want: &[Vec<f32>; 7]) -> Option<String> {
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

/// Every case on the current kernels: the first disagreement, or `None`.
fn run_cases(dev: &Cuda, cases: &[Case], fault: bool) -> Result<Option<String>> {
    for c in cases {
        let mut got = on_device(dev, c)?;
        if fault {
            swap_halves(&mut got[0], c.p.head_dim as usize);
        }
        let want = on_cpu(c, &got[0], &got[1])?;
        if let Some(why) = compare(&c.name, &got, &want) {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

/// The check itself (on the calling thread, its attention calls going straight to the kernels).
fn run_check(dev: &Cuda) -> Result<Verdict> {
    let cases = cases(dev);
    let fault = FAULT.with(|c| c.get());
    let tc = run_cases(dev, &cases, fault != Fault::None);
    let Some(why) = tc? else {
        return Ok(Verdict::TensorCores { cases: cases.len() });
    };
    let before = simt_forced();
    force_simt(true);
    let simt = run_cases(dev, &cases, fault == Fault::Both);
    force_simt(before);
    Ok(match simt? {
        None => Verdict::Simt { why },
        Some(simt_why) => Verdict::Refused { why: format!("tensor cores: {why}; SIMT: {simt_why}") },
    })
}

/// The error every attention call on a device whose check refused it returns.
pub(super) fn refused(dev: &Cuda, why: &str) -> Error {
    Error::Unsupported {
        op: "attention",
        device: crate::backend::Backend::device_name(dev),
        msg: format!("the device's attention check failed: {why}"),
    }
}
