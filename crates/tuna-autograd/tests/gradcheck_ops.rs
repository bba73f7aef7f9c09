//! A gradient check for every differentiable op: the tape's gradients against central
//! differences in f64 on the CPU, on seeded random inputs.

mod common;
use common::{constant, cpu, param, T64};
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::ops::act::{gelu, silu, swiglu, GeluKind};
use tuna_autograd::ops::attention::{attention, attention_biased, AttnOptions, Prefix};
use tuna_autograd::ops::embed::{embedding, Prompt};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::rope::rope;
use tuna_autograd::{Ints, Result};
use tuna_kernels::testing::Rng;
use tuna_kernels::Cpu;

const H: f64 = 1e-5;

/// A scalar that depends on every element of `y`: cross-entropy of `y` read as `[rows, last]`
/// against fixed targets (one of them ignored).
fn reduce(y: T64, seed: u64) -> Result<T64> {
    let vocab = *y.shape().last().unwrap();
    let rows = y.numel() / vocab;
    let mut rng = Rng::new(seed);
    let mut t: Vec<i32> = (0..rows).map(|_| rng.below(vocab) as i32).collect();
    if rows > 1 {
        t[rows / 2] = -100;
    }
    let targets = Ints::new(&cpu(), &[rows], &t)?;
    // Flatten to [rows, vocab] by a copy-free reinterpretation: CE reads the last dim.
    cross_entropy(y, &targets, -100)
}

#[test]
fn gelu_silu_swiglu() {
    let mut rng = Rng::new(1);
    let x = param(&mut rng, "x", &[3, 7], 1.5);
    let u = param(&mut rng, "u", &[3, 7], 1.0);
    for kind in [GeluKind::Tanh, GeluKind::Erf, GeluKind::Relu] {
        check(&[&x], || reduce(gelu(&x, kind)?, 2), H, GRAD_TOL, 64).unwrap();
    }
    check(&[&x], || reduce(silu(&x)?, 3), H, GRAD_TOL, 64).unwrap();
    check(&[&x, &u], || reduce(swiglu(&x, &u)?, 4), H, GRAD_TOL, 64).unwrap();
}

#[test]
fn rope_by_positions() {
    let mut rng = Rng::new(5);
    let x = param(&mut rng, "x", &[2, 3, 2, 8], 1.0);
    let pos = Ints::new(&cpu(), &[2, 3], &[0u32, 1, 2, 7, 8, 9]).unwrap();
    check(&[&x], || reduce(rope(&x, &pos, 10000.0)?, 6), H, GRAD_TOL, 96).unwrap();
}

#[test]
fn cross_entropy_with_ignore_index() {
    let mut rng = Rng::new(7);
    let logits = param(&mut rng, "logits", &[5, 11], 2.0);
    check(&[&logits], || reduce(logits.clone(), 8), H, GRAD_TOL, 55).unwrap();
}

#[test]
fn embedding_with_soft_prompt() {
    let mut rng = Rng::new(9);
    let table = param(&mut rng, "table", &[13, 6], 1.0);
    let prompt = param(&mut rng, "prompt", &[3, 6], 1.0);
    let ids = Ints::new(&cpu(), &[2, 4], &[1u32, 5, 5, 12, 0, 3, 3, 3]).unwrap();
    let at = Ints::new(&cpu(), &[2], &[0u32, 2]).unwrap();
    let f = || reduce(embedding(&table, &ids, Some(Prompt { vectors: &prompt, at: &at }))?, 10);
    check(&[&table, &prompt], f, H, GRAD_TOL, 78).unwrap();
}

/// Attention over the feature grid: causal and not, GQA, prefix, padding mask, kv-cache offset.
#[test]
fn attention_with_prefix_mask_and_gqa() {
    let mut rng = Rng::new(11);
    let (b, t, s, h, kvh, d, p) = (2, 3, 5, 4, 2, 8, 2);
    let q = param(&mut rng, "q", &[b, t, h, d], 0.7);
    let k = param(&mut rng, "k", &[b, s, kvh, d], 0.7);
    let v = param(&mut rng, "v", &[b, s, kvh, d], 1.0);
    let pk = param(&mut rng, "prefix_k", &[p, kvh, d], 0.7);
    let pv = param(&mut rng, "prefix_v", &[p, kvh, d], 1.0);
    let mask = Ints::new(&cpu(), &[b, s], &[1u8, 1, 1, 1, 1, 0, 0, 1, 1, 1]).unwrap();
    for causal in [false, true] {
        let opt = AttnOptions { causal, scale: None, kv_len: None };
        let f = || reduce(attention(&q, &k, &v, Some(Prefix { k: &pk, v: &pv, rows: None }), Some(&mask), opt)?, 12);
        check(&[&q, &k, &v, &pk, &pv], f, H, GRAD_TOL, 40).unwrap();
        let f = || reduce(attention(&q, &k, &v, None, None, opt)?, 13);
        check(&[&q, &k, &v], f, H, GRAD_TOL, 40).unwrap();
    }
}

/// Per-sequence prefix ranges into one stacked table: sequences 0 and 2 share rows 0..2, sequence 1
/// sees rows 2..5, sequence 3 none; the shared rows' gradients are the sum over their sequences.
#[test]
fn attention_with_per_sequence_prefix_rows() {
    let mut rng = Rng::new(12);
    let (b, t, s, h, kvh, d, p) = (4, 3, 4, 4, 2, 8, 5);
    let q = param(&mut rng, "q", &[b, t, h, d], 0.7);
    let k = param(&mut rng, "k", &[b, s, kvh, d], 0.7);
    let v = param(&mut rng, "v", &[b, s, kvh, d], 1.0);
    let pk = param(&mut rng, "prefix_k", &[p, kvh, d], 0.7);
    let pv = param(&mut rng, "prefix_v", &[p, kvh, d], 1.0);
    let mask = Ints::new(&cpu(), &[b, s], &[1u8, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1]).unwrap();
    let rows = Ints::new(&cpu(), &[b, 2], &[0u32, 2, 2, 3, 0, 2, 5, 0]).unwrap();
    for causal in [false, true] {
        let opt = AttnOptions { causal, scale: None, kv_len: None };
        let pre = || Some(Prefix { k: &pk, v: &pv, rows: Some(&rows) });
        let f = || reduce(attention(&q, &k, &v, pre(), Some(&mask), opt)?, 14);
        check(&[&q, &k, &v, &pk, &pv], f, H, GRAD_TOL, 40).unwrap();
    }
    // A range past the table is a shape error naming the op and the offending range.
    let bad = Ints::new(&cpu(), &[b, 2], &[0u32, 2, 4, 2, 0, 2, 5, 0]).unwrap();
    let e = attention(
        &q,
        &k,
        &v,
        Some(Prefix { k: &pk, v: &pv, rows: Some(&bad) }),
        None,
        AttnOptions { causal: true, scale: None, kv_len: None },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("attention") && e.contains("[4, 2]") && e.contains("prefix rows"), "{e}");
}

/// An additive score bias (T5's relative position bias) `[heads, q_len, prefix_len + kv_len]`:
/// its gradient (summed over the batch) and every other, causal and not, with a prefix, a padding
/// mask and GQA; then bidirectional cross-attention with more queries than keys, with the bias a
/// parameter and a constant.
#[test]
fn attention_with_score_bias_and_more_queries_than_keys() {
    let mut rng = Rng::new(15);
    let (b, t, s, h, kvh, d, p) = (2, 3, 5, 4, 2, 8, 2);
    let q = param(&mut rng, "q", &[b, t, h, d], 0.7);
    let k = param(&mut rng, "k", &[b, s, kvh, d], 0.7);
    let v = param(&mut rng, "v", &[b, s, kvh, d], 1.0);
    let pk = param(&mut rng, "prefix_k", &[p, kvh, d], 0.7);
    let pv = param(&mut rng, "prefix_v", &[p, kvh, d], 1.0);
    let bias = param(&mut rng, "bias", &[h, t, p + s], 1.0);
    let mask = Ints::new(&cpu(), &[b, s], &[1u8, 1, 1, 1, 1, 0, 0, 1, 1, 1]).unwrap();
    for causal in [false, true] {
        let opt = AttnOptions { causal, scale: None, kv_len: None };
        let pre = || Some(Prefix { k: &pk, v: &pv, rows: None });
        let f = || reduce(attention_biased(&q, &k, &v, pre(), Some(&mask), Some(&bias), opt)?, 16);
        check(&[&q, &k, &v, &pk, &pv, &bias], f, H, GRAD_TOL, 70).unwrap();
    }
    // Cross-attention: 7 decoder queries over 3 encoder keys (one padded), no prefix.
    let (t2, s2) = (7, 3);
    let q2 = param(&mut rng, "q2", &[b, t2, h, d], 0.7);
    let k2 = param(&mut rng, "k2", &[b, s2, kvh, d], 0.7);
    let v2 = param(&mut rng, "v2", &[b, s2, kvh, d], 1.0);
    let bias2 = param(&mut rng, "bias2", &[h, t2, s2], 1.0);
    let frozen = constant(&mut rng, &[h, t2, s2], 1.0);
    let mask2 = Ints::new(&cpu(), &[b, s2], &[1u8, 1, 1, 1, 0, 1]).unwrap();
    let opt = AttnOptions { causal: false, scale: None, kv_len: None };
    let f = || reduce(attention_biased(&q2, &k2, &v2, None, Some(&mask2), Some(&bias2), opt)?, 17);
    check(&[&q2, &k2, &v2, &bias2], f, H, GRAD_TOL, 84).unwrap();
    let f = || reduce(attention_biased(&q2, &k2, &v2, None, None, Some(&frozen), opt)?, 18);
    check(&[&q2, &k2, &v2], f, H, GRAD_TOL, 56).unwrap();
    let f = || reduce(attention(&q2, &k2, &v2, None, Some(&mask2), opt)?, 19);
    check(&[&q2, &k2, &v2], f, H, GRAD_TOL, 56).unwrap();
    // The bias alone needing a gradient records the op (the bias is one of its inputs).
    let (qc, kc) = (constant(&mut rng, &[b, t2, h, d], 0.7), constant(&mut rng, &[b, s2, kvh, d], 0.7));
    let f = || reduce(attention_biased(&qc, &kc, &kc, None, Some(&mask2), Some(&bias2), opt)?, 20);
    check(&[&bias2], f, H, GRAD_TOL, 84).unwrap();
    // Causal attention still needs at least as many keys as queries; a bias of the wrong shape
    // (here: missing the prefix columns) is a shape error naming it.
    let causal = AttnOptions { causal: true, ..opt };
    let e = attention(&q2, &k2, &v2, None, None, causal).unwrap_err().to_string();
    assert!(e.contains("kv_len") && e.contains("causal"), "{e}");
    let short = param(&mut rng, "short", &[h, t, s], 1.0);
    let pre = Some(Prefix { k: &pk, v: &pv, rows: None });
    let e = attention_biased(&q, &k, &v, pre, None, Some(&short), opt).unwrap_err().to_string();
    assert!(e.contains("bias") && e.contains("[4, 3, 5]") && e.contains("[4, 3, 7]"), "{e}");
}

#[test]
fn frozen_inputs_get_no_gradient() {
    let mut rng = Rng::new(13);
    let x = constant(&mut rng, &[4, 5], 1.0);
    let w = param(&mut rng, "w", &[4, 5], 1.0);
    let y = swiglu(&x, &w).unwrap();
    reduce(y, 1).unwrap().backward().unwrap();
    assert!(x.grad().unwrap().is_none());
    assert!(w.grad().unwrap().is_some());
    let _ = Cpu;
}

#[test]
fn elementwise_glue() {
    use tuna_autograd::ops::elem::{add, add_bias, concat_cols, mean_pool, mul, scale, slice_cols, tanh};
    use tuna_autograd::ops::shape::reshape;
    let mut rng = Rng::new(15);
    let a = param(&mut rng, "a", &[4, 6], 1.0);
    let b = param(&mut rng, "b", &[4, 6], 1.0);
    let bias = param(&mut rng, "bias", &[6], 1.0);
    check(&[&a, &b], || reduce(add(&a, &b)?, 16), H, GRAD_TOL, 24).unwrap();
    check(&[&a, &b], || reduce(mul(&a, &b)?, 17), H, GRAD_TOL, 24).unwrap();
    check(&[&a], || reduce(scale(&a, -0.75)?, 18), H, GRAD_TOL, 24).unwrap();
    // tanh's backward reads its output: scale the input so some elements saturate
    check(&[&a], || reduce(tanh(&scale(&a, 1.8)?)?, 22), H, GRAD_TOL, 24).unwrap();
    check(&[&a, &bias], || reduce(add_bias(&a, &bias)?, 19), H, GRAD_TOL, 24).unwrap();
    let f = || {
        let (x, y, z) = (slice_cols(&a, 0, 2)?, slice_cols(&a, 2, 3)?, slice_cols(&b, 5, 1)?);
        reduce(concat_cols(&[&z, &x, &y])?, 20)
    };
    check(&[&a, &b], f, H, GRAD_TOL, 24).unwrap();
    let mask = Ints::new(&cpu(), &[2, 2], &[1u8, 0, 1, 1]).unwrap();
    check(&[&a], || reduce(mean_pool(&reshape(&a, &[2, 2, 6])?, &mask)?, 21), H, GRAD_TOL, 24).unwrap();
}

#[test]
fn linear_matmul_and_norms() {
    use tuna_autograd::ops::linear::{linear, matmul, MatmulParams, WeightLayout};
    use tuna_autograd::ops::norm::{layernorm, rmsnorm};
    let mut rng = Rng::new(23);
    let x = param(&mut rng, "x", &[2, 3, 5], 1.0);
    let w_oi = param(&mut rng, "w_out_in", &[4, 5], 0.5);
    let w_io = param(&mut rng, "w_in_out", &[5, 4], 0.5);
    let bias = param(&mut rng, "bias", &[4], 0.5);
    check(&[&x, &w_oi, &bias], || reduce(linear(&x, &w_oi, WeightLayout::OutIn, Some(&bias))?, 24), H, GRAD_TOL, 30)
        .unwrap();
    check(&[&x, &w_io], || reduce(linear(&x, &w_io, WeightLayout::InOut, None)?, 25), H, GRAD_TOL, 30).unwrap();
    // x's 30 values read as A stored [k=5, m=6] (trans_a), times B = w_io [5, 4], scaled by 0.5
    let p = MatmulParams { trans_a: true, alpha: 0.5, ..MatmulParams::new(6, 4, 5) };
    check(&[&x, &w_io], || reduce(matmul(&x, &w_io, p)?, 26), H, GRAD_TOL, 30).unwrap();
    let gamma = param(&mut rng, "gamma", &[5], 1.0);
    let beta = param(&mut rng, "beta", &[5], 1.0);
    check(&[&x, &gamma, &beta], || reduce(layernorm(&x, &gamma, &beta, 1e-5)?, 27), H, GRAD_TOL, 30).unwrap();
    check(&[&x, &gamma], || reduce(rmsnorm(&x, &gamma, 1e-5)?, 28), H, GRAD_TOL, 30).unwrap();
    // frozen weights: only x trains, through the dX-only kernels
    let (g0, b0) = (constant(&mut rng, &[5], 1.0), constant(&mut rng, &[5], 1.0));
    check(&[&x], || reduce(layernorm(&x, &g0, &b0, 1e-5)?, 29), H, GRAD_TOL, 30).unwrap();
    check(&[&x], || reduce(rmsnorm(&x, &g0, 1e-5)?, 30), H, GRAD_TOL, 30).unwrap();
    // the fused bias: only the bias trains (x and the weight frozen), or the bias is frozen
    let (xc, wc) = (constant(&mut rng, &[2, 3, 5], 1.0), constant(&mut rng, &[4, 5], 0.5));
    check(&[&bias], || reduce(linear(&xc, &wc, WeightLayout::OutIn, Some(&bias))?, 31), H, GRAD_TOL, 30).unwrap();
    let bc = constant(&mut rng, &[4], 0.5);
    check(&[&x, &w_io], || reduce(linear(&x, &w_io, WeightLayout::InOut, Some(&bc))?, 32), H, GRAD_TOL, 30).unwrap();
}

/// A frozen weight packed in bf16 or int8 (`--base-precision`): the product is linear in `x` with
/// the packed weight's values, so central differences check `dx` (and the bias) exactly as for an
/// f32 weight; nothing is kept for a `dW`.
#[test]
fn linear_over_a_packed_weight() {
    use std::sync::Arc;
    use tuna_autograd::ops::lowp::{linear_packed, BasePrecision, PackedWeight};
    let mut rng = Rng::new(29);
    let x = param(&mut rng, "x", &[2, 3, 5], 1.0);
    let bias = param(&mut rng, "bias", &[4], 0.5);
    let w: Vec<f32> = (0..20).map(|i| ((i * 7 % 11) as f32 - 5.0) / 9.0).collect();
    for (p, in_out) in [(BasePrecision::Bf16, false), (BasePrecision::Int8, true)] {
        let pw = Arc::new(PackedWeight::pack("w", &w, 4, 5, in_out, p).unwrap());
        check(&[&x, &bias], || reduce(linear_packed(&x, &pw, Some(&bias))?, 30), H, GRAD_TOL, 30).unwrap();
    }
    // A shape that does not meet the weight's input is refused by name.
    let pw = Arc::new(PackedWeight::pack("w", &w, 4, 5, false, BasePrecision::Bf16).unwrap());
    let bad = param(&mut rng, "bad", &[2, 4], 1.0);
    let e = linear_packed(&bad, &pw, None).unwrap_err().to_string();
    assert!(e.contains("linear_packed") && e.contains("input dim"), "{e}");
}
