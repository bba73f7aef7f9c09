//! The additive score bias (`has_bias`, T5's relative position bias) and bidirectional attention
//! with more queries than keys (`q_len > kv_len`, cross-attention): the CPU kernel against the f64
//! reference of `tests.rs` (forward, every backward split, `dbias` included) in f32 and f64, CUDA
//! against the CPU at every tile width, and the checks on the new buffers.

use super::tests::{check_case, check_case_in, Data, Pad};
use super::*;
use crate::testing::Tol;
use crate::Cpu;

// Data::new(seed, batch, heads, kv_heads, q_len, kv_len, prefix_len, head_dim, causal, pad)

#[test]
fn bias_cpu_matches_reference_causal_and_bidirectional() {
    check_case("bias mha causal d32 t37", &Data::new(51, 2, 4, 4, 37, 37, 0, 32, true, Pad::None).with_bias(1, 1.0));
    let gqa = Data::new(52, 2, 6, 2, 129, 129, 0, 64, false, Pad::Scattered).with_bias(2, 2.0);
    check_case("bias gqa6/2 bidir scattered d64 t129", &gqa);
    check_case("bias mqa causal d128 t70", &Data::new(53, 1, 4, 1, 70, 70, 0, 128, true, Pad::Right).with_bias(3, 1.0));
    check_case("bias d24 left pad causal", &Data::new(54, 3, 2, 2, 9, 9, 0, 24, true, Pad::Left).with_bias(4, 3.0));
}

#[test]
fn bias_cpu_matches_reference_with_prefix() {
    let one = Data::new(55, 2, 4, 2, 37, 37, 5, 32, true, Pad::Left).with_bias(5, 1.0);
    check_case("bias gqa prefix 5 causal left pad", &one);
    let two = Data::new(56, 2, 4, 2, 37, 37, 150, 32, false, Pad::Scattered).with_bias(6, 1.0);
    check_case("bias prefix 150 (two blocks) bidir", &two);
    // Per-sequence ranges: crossing a key block, empty, shared; bias columns are table rows.
    let rows = Data::new(57, 3, 4, 2, 9, 9, 138, 8, true, Pad::Left).with_prefix_rows(&[(0, 130), (130, 0), (0, 5)]);
    check_case("bias prefix rows causal", &rows.with_bias(7, 1.0));
}

/// `has_bias` 2: the bias without its gradient (a frozen position table). The forward and the
/// other gradients are the reference's, no `dbias` is asked for, and the backward keeps its
/// parallel split (the fused one included).
#[test]
fn a_bias_without_its_gradient_matches_reference() {
    let frozen = |d: Data| {
        let mut d = d;
        d.p.has_bias = 2;
        d
    };
    let causal = Data::new(90, 3, 4, 2, 37, 37, 5, 32, true, Pad::Left).with_bias(40, 1.0);
    check_case("frozen bias gqa prefix causal", &frozen(causal));
    let cross = Data::new(91, 2, 4, 4, 45, 9, 0, 16, false, Pad::Scattered).with_bias(41, 1.0);
    check_case("frozen bias t45 s9 bidir", &frozen(cross));
    let bad = AttnParams { has_bias: 3, ..Data::new(92, 1, 1, 1, 2, 2, 0, 8, false, Pad::None).p };
    assert!(bad.validate().unwrap_err().to_string().contains("has_bias 0 to 2"));
}

#[test]
fn bias_cpu_matches_reference_kv_cache() {
    // The bias rows are the query block's (q_len rows), its columns every key of the cache.
    check_case("bias q_len 1 after 70", &Data::new(58, 2, 4, 2, 1, 70, 3, 64, true, Pad::None).with_bias(8, 1.0));
    let block = Data::new(59, 2, 6, 2, 37, 129, 5, 64, true, Pad::Left).with_bias(9, 1.0);
    check_case("bias q_len 37 after 129 prefix 5", &block);
}

#[test]
fn more_queries_than_keys_bidirectional_matches_reference() {
    check_case("t150 s37 mha", &Data::new(60, 2, 2, 2, 150, 37, 0, 32, false, Pad::None));
    check_case(
        "t150 s37 gqa scattered bias",
        &Data::new(61, 2, 4, 2, 150, 37, 0, 32, false, Pad::Scattered).with_bias(10, 1.0),
    );
    check_case("t70 s1 prefix 3 bias", &Data::new(62, 2, 4, 1, 70, 1, 3, 24, false, Pad::None).with_bias(11, 1.0));
    let rows = Data::new(63, 2, 2, 2, 40, 9, 6, 8, false, Pad::Right).with_prefix_rows(&[(0, 2), (2, 4)]);
    check_case("t40 s9 prefix rows bias", &rows.with_bias(12, 1.0));
}

/// The f64 kernel (used for gradient checks) with a bias and with q_len > kv_len, to f64 rounding.
#[test]
fn bias_cpu_f64_matches_reference() {
    let cases = [
        ("bias gqa bidir scattered", Data::new(64, 2, 6, 2, 129, 129, 0, 24, false, Pad::Scattered).with_bias(13, 1.0)),
        ("bias prefix 150 causal", Data::new(65, 2, 4, 2, 37, 37, 150, 32, true, Pad::Right).with_bias(14, 1.0)),
        ("bias kv-cache", Data::new(66, 1, 4, 2, 5, 70, 3, 16, true, Pad::Left).with_bias(15, 1.0)),
        ("t150 s37 bias", Data::new(67, 2, 4, 2, 150, 37, 2, 16, false, Pad::Scattered).with_bias(16, 1.0)),
    ];
    for (what, data) in &cases {
        check_case_in::<f64>(what, data, Tol::F64);
    }
}

/// Forward `(o, lse)` on the CPU in f32.
fn fwd(d: &Data) -> (Vec<f32>, Vec<f32>) {
    let (mut o, mut lse) = (vec![0.0; d.p.q_elems()], vec![0.0; d.p.lse_elems()]);
    Cpu.attn_fwd(&d.p, d.inputs(), &mut o, &mut lse).unwrap();
    (o, lse)
}

#[test]
fn zero_bias_is_no_bias_and_a_row_constant_shifts_only_lse() {
    let plain = Data::new(68, 2, 4, 2, 37, 70, 5, 32, true, Pad::Scattered);
    let mut zero = plain.clone().with_bias(17, 1.0);
    zero.bias.fill(0.0);
    assert!(fwd(&zero) == fwd(&plain), "a zero bias changes the forward");
    // Softmax is shift-invariant per row: bias c(h, i) leaves o, moves lse by c.
    let mut shift = zero.clone();
    let cols = (plain.p.prefix_len + plain.p.kv_len) as usize;
    for (r, row) in shift.bias.chunks_mut(cols).enumerate() {
        row.fill(r as f32 * 0.25 - 3.0);
    }
    let ((o0, l0), (o1, l1)) = (fwd(&plain), fwd(&shift));
    Tol::F32.assert_close("row-constant bias: o", &o1, &o0);
    let (t, h) = (plain.p.q_len as usize, plain.p.heads as usize);
    let want: Vec<f32> = l0
        .iter()
        .enumerate()
        .map(|(k, &l)| if l == f32::NEG_INFINITY { l } else { l + ((k / t % h) * t + k % t) as f32 * 0.25 - 3.0 })
        .collect();
    assert!(l1.iter().zip(&want).all(|(a, b)| (a == b) || (a - b).abs() <= 1e-4 * (1.0 + b.abs())));
}

#[test]
fn bias_backward_is_deterministic_and_strided_forward_equals_contiguous() {
    let data = Data::new(69, 3, 4, 2, 70, 70, 5, 32, true, Pad::Right).with_bias(18, 1.0);
    let p = data.p;
    let (o, lse) = fwd(&data);
    let run = || {
        let z = |n: usize| vec![0f32; n];
        let (mut dq, mut dk, mut dv) = (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()));
        let (mut dpk, mut dpv, mut db) = (z(p.prefix_elems()), z(p.prefix_elems()), z(p.bias_elems()));
        let dprefix = Some((&mut dpk[..], &mut dpv[..]));
        let g = AttnGrads::<Cpu, f32> { dq: &mut dq, dk: &mut dk, dv: &mut dv, dprefix, dbias: Some(&mut db) };
        Cpu.attn_bwd(&p, data.inputs(), &o, &data.d_o, &lse, g).unwrap();
        [dq, dk, dv, dpk, dpv, db]
    };
    assert!(run() == run(), "two backward runs differ");
    // A KV cache's buffer read in place, with a bias and (bidirectionally) more queries than keys.
    let long = Data::new(70, 2, 4, 2, 40, 9, 3, 8, false, Pad::Left).with_bias(19, 1.0);
    let block = Data::new(71, 2, 4, 2, 3, 40, 0, 16, true, Pad::Scattered).with_bias(20, 1.0);
    for d in [long, block] {
        for cap in [d.p.kv_len as usize + 1, 2 * d.p.kv_len as usize + 130] {
            assert!(fwd(&d.strided(cap, 7)) == fwd(&d), "kv_cap {cap} differs from contiguous");
        }
    }
}

#[test]
fn bias_buffers_are_checked() {
    let data = Data::new(72, 2, 4, 2, 5, 7, 2, 8, false, Pad::None).with_bias(21, 1.0);
    let p = data.p;
    assert_eq!(p.bias_elems(), 4 * 5 * (2 + 7));
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    let mut x = data.inputs();
    x.bias = Some(&data.bias[1..]);
    let e = Cpu.attn_fwd(&p, x, &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("`bias`"), "{e}");
    x.bias = None;
    let e = Cpu.attn_fwd(&p, x, &mut o, &mut lse).unwrap_err();
    assert!(e.to_string().contains("has_bias"), "{e}");
    Cpu.attn_fwd(&p, data.inputs(), &mut o, &mut lse).unwrap();
    let z = |n: usize| vec![0f32; n];
    let (mut dq, mut dk, mut dv) = (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()));
    let (mut dpk, mut dpv, mut db) = (z(p.prefix_elems()), z(p.prefix_elems()), z(p.bias_elems() - 1));
    let g = AttnGrads::<Cpu, f32> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: Some((&mut dpk, &mut dpv)),
        dbias: Some(&mut db),
    };
    let e = Cpu.attn_bwd(&p, data.inputs(), &o, &data.d_o, &lse, g).unwrap_err();
    assert!(e.to_string().contains("`dbias`"), "{e}");
    let g = AttnGrads::<Cpu, f32> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: Some((&mut dpk, &mut dpv)),
        dbias: None,
    };
    let e = Cpu.attn_bwd(&p, data.inputs(), &o, &data.d_o, &lse, g).unwrap_err();
    assert!(e.to_string().contains("bias gradient"), "{e}");
}

// ---- CUDA (the emulated device without a GPU) against the CPU ----------------------------------

#[test]
fn cuda_bias_matches_cpu() {
    use super::cuda_tests::check_case;
    let Some(dev) = crate::testing::cuda_or_skip("attention::cuda_bias_matches_cpu") else { return };
    let d32 = Data::new(80, 2, 6, 2, 37, 37, 0, 32, true, Pad::Scattered).with_bias(30, 1.0);
    check_case(&dev, "bias d32 gqa6/2 causal mask", d32);
    let d64 = Data::new(81, 2, 4, 4, 37, 70, 35, 64, true, Pad::Scattered).with_bias(31, 1.0);
    check_case(&dev, "bias d64 mha kv-cache prefix35 mask", d64);
    check_case(
        &dev,
        "bias d128 bidir prefix5",
        Data::new(82, 1, 2, 1, 33, 33, 5, 128, false, Pad::None).with_bias(32, 1.0),
    );
    let rows = Data::new(83, 3, 4, 2, 9, 9, 40, 8, true, Pad::Left).with_prefix_rows(&[(0, 35), (35, 0), (30, 10)]);
    check_case(&dev, "bias d8 prefix rows causal", rows.with_bias(33, 1.0));
    check_case(&dev, "bias d24 q_len 1", Data::new(84, 2, 2, 2, 1, 40, 0, 24, true, Pad::None).with_bias(34, 1.0));
    // has_bias 2: read, no dbias (the atomics skipped).
    let mut frozen = Data::new(89, 2, 4, 2, 37, 37, 3, 32, true, Pad::Scattered).with_bias(38, 1.0);
    frozen.p.has_bias = 2;
    check_case(&dev, "frozen bias d32 prefix3 causal", frozen);
}

#[test]
fn cuda_more_queries_than_keys_match_cpu() {
    use super::cuda_tests::check_case;
    let Some(dev) = crate::testing::cuda_or_skip("attention::cuda_more_queries_than_keys_match_cpu") else { return };
    check_case(&dev, "t70 s9 d32 gqa mask", Data::new(85, 2, 4, 2, 70, 9, 0, 32, false, Pad::Scattered));
    let biased = Data::new(86, 2, 2, 2, 45, 33, 3, 64, false, Pad::Right).with_bias(35, 1.0);
    check_case(&dev, "t45 s33 d64 prefix3 bias", biased);
    check_case(&dev, "t40 s1 d8 bias", Data::new(87, 1, 2, 1, 40, 1, 0, 8, false, Pad::None).with_bias(36, 1.0));
}

/// The CUDA forward on a strided KV cache with a bias equals the CPU's on contiguous keys.
#[test]
fn cuda_bias_strided_forward_matches_cpu() {
    use super::cuda_tests::{assert_lse, cpu_fwd, cuda_fwd};
    let Some(dev) = crate::testing::cuda_or_skip("attention::cuda_bias_strided_forward_matches_cpu") else { return };
    let d = Data::new(88, 2, 4, 2, 3, 40, 2, 16, true, Pad::Scattered).with_bias(37, 1.0);
    let w = d.strided(97, 9);
    let (o_cpu, lse_cpu) = cpu_fwd(&d);
    let (o, lse) = cuda_fwd::<f32>(&dev, &w);
    Tol::CUDA_F32.assert_close("bias strided o", &o, &o_cpu);
    assert_lse("bias strided", Tol::CUDA_F32, &lse, &lse_cpu);
}

/// A NaN score (a NaN query, key or bias) makes its row's output and lse NaN, never the zeros of
/// a row that saw no key: a diverged run must show NaN downstream. Rows without NaN scores are
/// untouched. CPU in f32 (the vectorized path) and f64, and CUDA.
#[test]
fn a_nan_score_gives_a_nan_row_not_zeros() {
    // Query row 3 of head 1 (batch 0) holds a NaN: every score of that row is NaN.
    let mut d = Data::new(95, 2, 2, 2, 9, 9, 0, 8, true, Pad::None);
    let (h, d_) = (d.p.heads as usize, d.p.head_dim as usize);
    d.q[(3 * h + 1) * d_] = f32::NAN;
    // One bias entry NaN (row 5 of head 0, key 2): that row only.
    let mut biased = Data::new(96, 1, 2, 2, 9, 9, 0, 8, false, Pad::None).with_bias(42, 1.0);
    biased.bias[5 * 9 + 2] = f32::NAN;
    let check = |what: &str, o: &[f32], lse: &[f32], bad: &[(usize, usize, usize)], p: &AttnParams| {
        let (t, h, dd) = (p.q_len as usize, p.heads as usize, p.head_dim as usize);
        for b in 0..p.batch as usize {
            for hh in 0..h {
                for i in 0..t {
                    let row = &o[((b * t + i) * h + hh) * dd..][..dd];
                    let l = lse[(b * h + hh) * t + i];
                    if bad.contains(&(b, hh, i)) {
                        assert!(row.iter().all(|x| x.is_nan()) && l.is_nan(), "{what}: row {b},{hh},{i}: {row:?} {l}");
                    } else {
                        assert!(row.iter().all(|x| x.is_finite()) && l.is_finite(), "{what}: row {b},{hh},{i} got NaN");
                    }
                }
            }
        }
    };
    for (what, data, bad) in [("nan q", &d, vec![(0, 1, 3)]), ("nan bias", &biased, vec![(0, 0, 5)])] {
        let (o, lse) = fwd(data);
        check(&format!("{what} f32"), &o, &lse, &bad, &data.p);
        let x = super::tests::Cast::<f64>::new(data);
        let (mut o, mut lse) = (vec![0f64; data.p.q_elems()], vec![0f64; data.p.lse_elems()]);
        Cpu.attn_fwd(&data.p, x.inputs(data), &mut o, &mut lse).unwrap();
        let (o, lse): (Vec<f32>, Vec<f32>) =
            (o.iter().map(|&v| v as f32).collect(), lse.iter().map(|&v| v as f32).collect());
        check(&format!("{what} f64"), &o, &lse, &bad, &data.p);
        if let Some(dev) = crate::testing::cuda_or_skip("attention::a_nan_score_gives_a_nan_row_not_zeros (cuda)") {
            let (o, lse) = super::cuda_tests::cuda_fwd::<f32>(&dev, data);
            check(&format!("{what} cuda"), &o, &lse, &bad, &data.p);
        }
    }
}
