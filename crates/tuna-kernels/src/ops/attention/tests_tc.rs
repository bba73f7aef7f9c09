//! The tensor-core attention forward (`kernels/attention_tc.cu`) against the CPU attention on
//! f32 copies of the same bf16 inputs, for every head dim it has (32, 64, 128), causal and not,
//! query/key lengths that are not multiples of its 64-row tiles (1, 17, 80, 130), a key padding
//! mask with fully masked rows, GQA, a KV-cache offset (and a strided cache), prefix keys/values
//! (whole table and per-sequence ranges), a score bias; each case asserts that the tensor-core path
//! ran. Calls it does not cover (head dim 48, f32) run on the SIMT kernel, say so, and match too.
//!
//! Tolerance (`TC`: atol 1e-2, rtol 1e-2 on `o`; `TC_LSE`: atol 4e-3, rtol 1e-3 on `lse`): the
//! scores are exact bf16 products summed in f32 (errors ~1e-6), but the probabilities are rounded
//! to bf16 before the P V product (relative error at most 2^-9 each, so the weighted mean of V
//! moves by at most 2^-9 * max|v| ~ 2e-3 * 4.5 for these standard normal values, ~9e-3 in the
//! worst case, far less typically), and `o` itself is stored in bf16 (2^-9 relative). The row sum
//! adds the same rounded probabilities, so `lse` is off by at most log(1 + 2^-9) ~ 2e-3.

use super::cuda_tests::{assert_lse, check_case, cpu_fwd, cuda_fwd};
use super::tests::{Data, Pad};
use super::*;
use crate::testing::{cuda_or_skip, round_bf16, Tol};
use crate::Cuda;
use half::bf16;

const TC: Tol = Tol::new("tc-bf16", 1e-2, 1e-2);
const TC_LSE: Tol = Tol::new("tc-bf16-lse", 4e-3, 1e-3);

/// `d` with every floating input rounded through bf16 (what the device holds).
fn rounded(mut d: Data) -> Data {
    for v in [&mut d.q, &mut d.k, &mut d.v, &mut d.pk, &mut d.pv, &mut d.bias] {
        *v = round_bf16(v);
    }
    d
}

/// The bf16 CUDA forward of `d` (inputs rounded to bf16) against the CPU in f32 on the same
/// values; asserts the path the forward took.
fn check_fwd(dev: &Cuda, name: &str, d: Data, want_path: FwdPath, tol: Tol, lse_tol: Tol) {
    let d = rounded(d);
    let (o, lse) = cuda_fwd::<bf16>(dev, &d);
    let what = format!("attention tc {name} {:?}", d.p);
    assert_eq!(last_fwd_path(), Some(want_path), "{what}: path");
    let (o_cpu, lse_cpu) = cpu_fwd(&d);
    let s = d.p.kv_len as usize;
    if d.p.has_mask == 1 && d.p.prefix_len == 0 && d.mask[d.mask.len() - s..].iter().all(|&m| m == 0) {
        // Pad::Scattered masks the last sequence entirely: its rows see no key
        assert!(lse_cpu.contains(&f32::NEG_INFINITY), "{what}: case should have fully masked rows");
    }
    tol.assert_close(&format!("{what} o"), &o, &o_cpu);
    assert_lse(&what, lse_tol, &lse, &lse_cpu);
}

fn tc_case(dev: &Cuda, name: &str, d: Data) {
    assert_eq!(tc_fwd_refusal(dev, &d.p), None, "{name}: the tensor-core kernel should cover {:?}", d.p);
    check_fwd(dev, name, d, FwdPath::TensorCore, TC, TC_LSE);
}

// Data::new(seed, batch, heads, kv_heads, q_len, kv_len, prefix_len, head_dim, causal, pad)

#[test]
fn tc_fwd_d64_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_d64_matches_cpu") else { return };
    tc_case(&dev, "d64 causal 130", Data::new(640, 1, 2, 2, 130, 130, 0, 64, true, Pad::None));
    tc_case(&dev, "d64 bidir 80 mask gqa4/2", Data::new(641, 2, 4, 2, 80, 80, 0, 64, false, Pad::Scattered));
    tc_case(&dev, "d64 causal 1 after 130 gqa2/1", Data::new(642, 2, 2, 1, 1, 130, 0, 64, true, Pad::Right));
    tc_case(
        &dev,
        "d64 causal 17 after 80 prefix 70 mask",
        Data::new(643, 2, 2, 2, 17, 80, 70, 64, true, Pad::Scattered),
    );
    tc_case(&dev, "d64 bidir 17 prefix 5", Data::new(644, 1, 2, 1, 17, 17, 5, 64, false, Pad::None));
}

#[test]
fn tc_fwd_d128_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_d128_matches_cpu") else { return };
    tc_case(&dev, "d128 causal 80 gqa2/1 mask", Data::new(1280, 2, 2, 1, 80, 80, 0, 128, true, Pad::Scattered));
    tc_case(&dev, "d128 bidir 130", Data::new(1281, 1, 1, 1, 130, 130, 0, 128, false, Pad::None));
    tc_case(&dev, "d128 causal 17 after 130 prefix 3", Data::new(1282, 1, 2, 2, 17, 130, 3, 128, true, Pad::Left));
    tc_case(&dev, "d128 bidir 1 prefix 80", Data::new(1283, 1, 2, 1, 1, 1, 80, 128, false, Pad::None));
}

#[test]
fn tc_fwd_d32_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_d32_matches_cpu") else { return };
    tc_case(&dev, "d32 causal 130 gqa4/1", Data::new(320, 1, 4, 1, 130, 130, 0, 32, true, Pad::None));
    tc_case(
        &dev,
        "d32 bidir 17 after 80 mask prefix 64",
        Data::new(321, 2, 2, 2, 17, 80, 64, 32, false, Pad::Scattered),
    );
    // q_len > kv_len without causal masking (a longer decoder over an encoder)
    tc_case(&dev, "d32 bidir 80 over 17", Data::new(322, 1, 2, 1, 80, 17, 0, 32, false, Pad::Right));
}

/// Per-sequence prefix ranges (one crossing the 64-row tile, one empty) and a KV cache read in
/// place from buffers of `kv_cap > kv_len` rows (noise past the keys).
#[test]
fn tc_fwd_prefix_rows_and_strided_cache_match_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_prefix_rows_and_strided_cache_match_cpu") else { return };
    let d = Data::new(900, 3, 2, 1, 17, 40, 100, 64, true, Pad::Right).with_prefix_rows(&[(0, 70), (30, 0), (90, 10)]);
    tc_case(&dev, "d64 prefix rows", d);
    let cache = Data::new(901, 2, 4, 2, 3, 70, 0, 64, true, Pad::Scattered);
    let (o_want, lse_want) = cpu_fwd(&rounded(cache.clone()));
    let strided = rounded(cache.strided(128, 9));
    let (o, lse) = cuda_fwd::<bf16>(&dev, &strided);
    assert_eq!(last_fwd_path(), Some(FwdPath::TensorCore), "strided cache: path");
    TC.assert_close("attention tc strided cache o", &o, &o_want);
    assert_lse("attention tc strided cache", TC_LSE, &lse, &lse_want);
}

/// An additive score bias (T5's relative positions) over prefix and content columns, with
/// per-sequence prefix ranges, GQA, a mask and a KV offset.
#[test]
fn tc_fwd_score_bias_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_score_bias_matches_cpu") else { return };
    let d = Data::new(481, 2, 4, 2, 80, 80, 0, 64, true, Pad::Scattered).with_bias(5, 0.5);
    tc_case(&dev, "d64 causal 80 gqa4/2 mask bias", d);
    let d = Data::new(482, 2, 2, 1, 17, 70, 90, 32, false, Pad::Right)
        .with_prefix_rows(&[(10, 80), (0, 3)])
        .with_bias(6, 1.0);
    tc_case(&dev, "d32 bidir 17 after 70 prefix rows bias", d);
}

/// Calls the tensor-core kernel does not take still run (on the SIMT kernel), say why, and match.
#[test]
fn tc_fwd_uncovered_calls_fall_back_to_simt() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_uncovered_calls_fall_back_to_simt") else { return };
    let d48 = Data::new(480, 1, 2, 1, 17, 17, 0, 48, true, Pad::None);
    assert_eq!(tc_fwd_refusal(&dev, &d48.p), Some("head_dim not 32, 64 or 128"));
    check_fwd(&dev, "d48", d48, FwdPath::Simt("head_dim not 32, 64 or 128"), Tol::CUDA_BF16, Tol::CUDA_BF16);
    // f32 stays on SIMT
    let d = Data::new(482, 1, 2, 2, 17, 17, 0, 64, true, Pad::None);
    let (o, lse) = cuda_fwd::<f32>(&dev, &d);
    assert_eq!(last_fwd_path(), Some(FwdPath::Simt("f32 elements")));
    let (o_cpu, lse_cpu) = cpu_fwd(&d);
    Tol::CUDA_F32.assert_close("attention f32 o", &o, &o_cpu);
    assert_lse("attention f32", Tol::CUDA_F32, &lse, &lse_cpu);
}

/// The backward from the tensor-core forward's `o` and `lse` matches the CPU backward on the same
/// inputs (check_case runs the bf16 forward, and the bf16 backward, on tensor cores for these head
/// dims; its f32 run goes through the SIMT kernels).
#[test]
fn tc_fwd_feeds_the_backward() {
    let Some(dev) = cuda_or_skip("attention::tc_fwd_feeds_the_backward") else { return };
    check_case(&dev, "tc fwd d64 causal prefix mask", Data::new(77, 2, 2, 1, 40, 40, 6, 64, true, Pad::Scattered));
    assert_eq!(last_fwd_path(), Some(FwdPath::TensorCore), "check_case's bf16 forward (its last) ran on tensor cores");
    assert_eq!(last_bwd_path(), Some(BwdPath::TensorCore), "and its bf16 backward");
    let biased = Data::new(78, 2, 2, 2, 17, 40, 0, 128, true, Pad::None).with_bias(7, 0.5);
    check_case(&dev, "tc fwd d128 causal kv-offset bias", biased);
    assert_eq!(last_fwd_path(), Some(FwdPath::TensorCore));
}

/// The paths a call will take, as `tuna profile` names them: both tensor-core kernels for bf16 at
/// their head dims, SIMT (with the reason) for other head dims and for f32; the CPU has one path.
#[test]
fn planned_paths_name_the_kernels_a_call_takes() {
    let Some(dev) = cuda_or_skip("attention::planned_paths_name_the_kernels_a_call_takes") else { return };
    let p = |head_dim: u32| AttnParams::new(2, 4, 2, 70, head_dim as usize, true);
    for d in TC_HEAD_DIMS {
        let want =
            if dev.arch() >= 80 { FwdPath::TensorCore } else { FwdPath::Simt("mma.sync bf16 needs sm_80 or newer") };
        let got = AttentionKernel::<bf16>::attn_paths(&*dev, &p(d)).unwrap();
        // (A GPU with too little shared memory for d128 keeps its backward on SIMT.)
        assert!(got.0 == want && (got.1 == want || d == 128), "head dim {d}: {got:?}");
    }
    let simt = AttentionKernel::<bf16>::attn_paths(&*dev, &p(48)).unwrap();
    assert_eq!(simt, (FwdPath::Simt("head_dim not 32, 64 or 128"), FwdPath::Simt("head_dim not 32, 64 or 128")));
    let f32_paths = AttentionKernel::<f32>::attn_paths(&*dev, &p(64)).unwrap();
    assert_eq!(f32_paths, (FwdPath::Simt("f32 elements"), FwdPath::Simt("f32 elements")));
    assert_eq!(AttentionKernel::<f32>::attn_paths(&crate::Cpu, &p(64)), None);
}
