//! The tensor-core attention backward (`kernels/attention_tc_bwd.cu`) against the CPU attention
//! backward on f32 copies of the same bf16 inputs, for every head dim it has (32, 64, 128), causal
//! and not, query/key lengths that are not multiples of its 64-row tiles (1, 17, 80, 130), a key
//! padding mask with fully masked rows, GQA, a KV offset (q_len < kv_len), prefix keys/values (whole
//! table and per-sequence ranges, their gradients summed over the batch) and a score bias (with its
//! gradient, and without); each case asserts that the backward's main kernel ran on tensor cores.
//! Calls it does not cover (head dim 48, f32) run on the SIMT kernel, say so, and match too.
//!
//! Both backwards read the same forward outputs: the device's bf16 forward `o` and `lse` (as a
//! caller passes them), so delta = rowsum(dO * O) is the same and only the backward is compared.
//! The inputs and the bf16 gradients' starting values are bf16-rounded before the CPU sees them.
//!
//! Tolerance (`TC_BWD`: atol 1.5e-2, rtol 8e-3 on dq, dk, dv, the prefix gradients and dbias).
//! bf16 keeps 8 significant bits, so one rounding moves a value by at most u = 2^-8 ~ 3.9e-3 of
//! itself. Scores and dP = dO V^T are exact bf16 products summed in f32 (errors ~1e-6), and every
//! product accumulates in f32, but P is rounded to bf16 before dV += P^T dO, and dS = P (dP - delta)
//! before dK += dS^T Q and dQ += dS K, so with the sums over the rows i or keys j:
//!   |err dV[j]| <= u * sum_i P[i][j] |dO[i]|,   |err dK[j]| <= u * scale * sum_i |dS[i][j]| |Q[i]|,
//!   |err dQ[i]| <= u * scale * sum_j |dS[i][j]| |K[j]|.
//! Where the terms share a sign this is u * |result| (rtol); otherwise the rounding errors have
//! random signs and grow like sqrt(n) * u * (a typical term): for these standard normal inputs
//! (|dO|, |Q|, |K| up to ~4.5, sum_i P[i][j] up to ~ln 130 + 0.6 ~ 5.4 for the first causal key)
//! that is ~1e-2 at most, the worst-case sum ~0.1 never being approached. Then dq, dk, dv are stored
//! in bf16 (after adding the starting values in [-1, 1]): another u * |result|. Hence rtol = 2u
//! ~ 8e-3 and atol 1.5e-2. Measured over these cases: |err| - u * |want| is at most 9.3e-3 (dv of
//! the d64 causal biased case), the largest |err| 1.9e-2 at |want| ~ 7.5 (where bf16's spacing is
//! 2^-5). The prefix gradients are f32 but carry the P/dS rounding (within 4e-3 measured); dbias adds
//! the unrounded f32 dS (within 2e-6). The SIMT fallback cases use the SIMT tolerances.

use super::cuda_tests::{cpu_bwd, run_cuda, GRAD_NAMES};
use super::tests::{grad_starts, Data, Pad};
use super::*;
use crate::testing::{cuda_or_skip, round_bf16, Tol};
use crate::Cuda;
use half::bf16;

const TC_BWD: Tol = Tol::new("tc-bwd-bf16", 1.5e-2, 8e-3);
/// dbias adds the unrounded f32 dS (measured within 2e-6): its own, tight tolerance, so a dS rounded
/// to bf16 before the add, or contributions dropped, fail.
const TC_DBIAS: Tol = Tol::new("tc-bwd-dbias-f32", 5e-5, 1e-4);

/// The bf16 CUDA forward then backward of `d` (inputs and the bf16 gradients' starting values
/// rounded to bf16) against the CPU backward on the same values and the device's `o`, `lse`;
/// asserts the path the backward's main kernel took.
fn check_bwd(dev: &Cuda, name: &str, data: Data, want_path: BwdPath, tol: Tol) {
    let mut d = data;
    for v in [&mut d.q, &mut d.k, &mut d.v, &mut d.pk, &mut d.pv, &mut d.d_o, &mut d.bias] {
        *v = round_bf16(v);
    }
    let mut starts = grad_starts(&d.p, 0x7CB0);
    for s in &mut starts[..3] {
        *s = round_bf16(s); // dq, dk, dv are bf16 on the device; dpk, dpv, dbias f32
    }
    let out = run_cuda::<bf16>(dev, &d, &starts);
    let what = format!("attention tc bwd {name} {:?}", d.p);
    assert_eq!(last_bwd_path(), Some(want_path), "{what}: backward path");
    let s = d.p.kv_len as usize;
    if d.p.has_mask == 1 && d.p.prefix_len == 0 && d.mask[d.mask.len() - s..].iter().all(|&m| m == 0) {
        // Pad::Scattered masks the last sequence entirely: its rows see no key
        assert!(out.lse.contains(&f32::NEG_INFINITY), "{what}: case should have fully masked rows");
    }
    let want = cpu_bwd(&d, &out.o, &out.lse, &starts);
    for ((gname, got), want) in GRAD_NAMES.iter().zip(&out.grads).zip(&want) {
        let tol = if *gname == "dbias" && want_path == BwdPath::TensorCore { TC_DBIAS } else { tol };
        tol.assert_close(&format!("{what} {gname}"), got, want);
    }
}

fn tc_case(dev: &Cuda, name: &str, d: Data) {
    assert_eq!(tc_bwd_refusal(dev, &d.p), None, "{name}: the tensor-core backward should cover {:?}", d.p);
    check_bwd(dev, name, d, BwdPath::TensorCore, TC_BWD);
}

// Data::new(seed, batch, heads, kv_heads, q_len, kv_len, prefix_len, head_dim, causal, pad)

#[test]
fn tc_bwd_d64_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_bwd_d64_matches_cpu") else { return };
    tc_case(&dev, "d64 causal 130", Data::new(6400, 1, 2, 2, 130, 130, 0, 64, true, Pad::None));
    tc_case(&dev, "d64 bidir 80 mask gqa4/2", Data::new(6401, 2, 4, 2, 80, 80, 0, 64, false, Pad::Scattered));
    tc_case(&dev, "d64 causal 1 after 130 gqa2/1", Data::new(6402, 2, 2, 1, 1, 130, 0, 64, true, Pad::Right));
    tc_case(
        &dev,
        "d64 causal 17 after 80 prefix 70 mask",
        Data::new(6403, 2, 2, 2, 17, 80, 70, 64, true, Pad::Scattered),
    );
    tc_case(&dev, "d64 bidir 17 prefix 5 gqa2/1", Data::new(6404, 1, 2, 1, 17, 17, 5, 64, false, Pad::None));
}

#[test]
fn tc_bwd_d128_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_bwd_d128_matches_cpu") else { return };
    tc_case(&dev, "d128 causal 80 gqa2/1 mask", Data::new(12800, 2, 2, 1, 80, 80, 0, 128, true, Pad::Scattered));
    tc_case(&dev, "d128 bidir 130", Data::new(12801, 1, 1, 1, 130, 130, 0, 128, false, Pad::None));
    tc_case(
        &dev,
        "d128 causal 17 after 130 prefix 3 left pad",
        Data::new(12802, 2, 2, 2, 17, 130, 3, 128, true, Pad::Left),
    );
    tc_case(&dev, "d128 bidir 1 prefix 80", Data::new(12803, 1, 2, 1, 1, 1, 80, 128, false, Pad::None));
}

#[test]
fn tc_bwd_d32_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_bwd_d32_matches_cpu") else { return };
    tc_case(&dev, "d32 causal 130 gqa4/1", Data::new(3200, 1, 4, 1, 130, 130, 0, 32, true, Pad::None));
    tc_case(
        &dev,
        "d32 bidir 17 after 80 mask prefix 64",
        Data::new(3201, 2, 2, 2, 17, 80, 64, 32, false, Pad::Scattered),
    );
    // q_len > kv_len without causal masking (a longer decoder over an encoder)
    tc_case(&dev, "d32 bidir 80 over 17", Data::new(3202, 1, 2, 1, 80, 17, 0, 32, false, Pad::Right));
    tc_case(&dev, "d32 causal 80 mask", Data::new(3203, 3, 2, 2, 80, 80, 0, 32, true, Pad::Scattered));
}

/// Per-sequence prefix ranges (one crossing the 64-key tile, one empty, one at the table's end);
/// the prefix gradients of rows several sequences share are summed over them.
#[test]
fn tc_bwd_prefix_rows_match_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_bwd_prefix_rows_match_cpu") else { return };
    let d = Data::new(9000, 3, 2, 1, 17, 40, 100, 64, true, Pad::Right).with_prefix_rows(&[(0, 70), (30, 0), (60, 40)]);
    tc_case(&dev, "d64 prefix rows", d);
    let d = Data::new(9001, 2, 4, 2, 80, 80, 130, 128, false, Pad::None).with_prefix_rows(&[(0, 130), (65, 65)]);
    tc_case(&dev, "d128 prefix rows bidir 80", d);
}

/// An additive score bias over prefix and content columns, with its gradient (summed over the
/// batch) and, `has_bias` 2, without one.
#[test]
fn tc_bwd_score_bias_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_bwd_score_bias_matches_cpu") else { return };
    let d = Data::new(4810, 2, 4, 2, 80, 80, 0, 64, true, Pad::Scattered).with_bias(5, 0.5);
    tc_case(&dev, "d64 causal 80 gqa4/2 mask bias", d);
    let d = Data::new(4811, 2, 2, 1, 17, 70, 90, 32, false, Pad::Right)
        .with_prefix_rows(&[(10, 80), (0, 3)])
        .with_bias(6, 1.0);
    tc_case(&dev, "d32 bidir 17 after 70 prefix rows bias", d);
    let mut d = Data::new(4812, 1, 2, 2, 130, 130, 6, 128, true, Pad::None).with_bias(7, 0.5);
    d.p.has_bias = 2; // the bias is read, no gradient is wanted for it
    tc_case(&dev, "d128 causal 130 prefix 6 bias without dbias", d);
}

/// Calls the tensor-core backward does not take still run (on the SIMT kernel), say why, and match.
#[test]
fn tc_bwd_uncovered_calls_fall_back_to_simt() {
    let Some(dev) = cuda_or_skip("attention::tc_bwd_uncovered_calls_fall_back_to_simt") else { return };
    let d48 = Data::new(4800, 2, 2, 1, 17, 17, 0, 48, true, Pad::Scattered);
    assert_eq!(tc_bwd_refusal(&dev, &d48.p), Some("head_dim not 32, 64 or 128"));
    check_bwd(&dev, "d48", d48, BwdPath::Simt("head_dim not 32, 64 or 128"), Tol::CUDA_BF16);
    // f32 stays on SIMT
    let d = Data::new(4820, 1, 2, 2, 17, 17, 0, 64, true, Pad::None);
    let starts = grad_starts(&d.p, 0x7CB1);
    let out = run_cuda::<f32>(&dev, &d, &starts);
    assert_eq!(last_bwd_path(), Some(BwdPath::Simt("f32 elements")));
    let want = cpu_bwd(&d, &out.o, &out.lse, &starts);
    for ((gname, got), want) in GRAD_NAMES.iter().zip(&out.grads).zip(&want) {
        Tol::CUDA_F32.assert_close(&format!("attention f32 bwd {gname}"), got, want);
    }
}

/// The SIMT bf16 kernels at the tensor cores' head dims, which a device without enough shared
/// memory for the tensor-core kernels runs (sm_86/89 at d128) and the emulated device otherwise
/// never launches: forced onto them, forward and backward match the CPU to the SIMT bf16 tolerance.
#[test]
fn the_simt_bf16_kernels_at_tensor_core_head_dims_still_match_cpu() {
    let Some(dev) = cuda_or_skip("attention::the_simt_bf16_kernels_at_tensor_core_head_dims_still_match_cpu") else {
        return;
    };
    let forced = FwdPath::Simt("forced (ops::attention::force_simt)");
    force_simt(true);
    for (seed, hd, causal, prefix) in [(12800, 128, true, 0), (12801, 128, false, 5), (6400, 64, true, 0)] {
        let d = Data::new(seed, 2, 2, 1, 40, 40, prefix, hd, causal, Pad::Scattered);
        check_bwd(&dev, &format!("forced SIMT d{hd}"), d, forced, Tol::CUDA_BF16);
        assert_eq!(last_fwd_path(), Some(forced), "d{hd}: the forward took the tensor cores");
    }
    force_simt(false);
}
