use super::*;
use crate::backend::Cpu;
use crate::rng::SplitMix64 as Rng;

pub(super) fn rand(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect()
}

/// `y[m, out] = x w^T` in f64 with the original f32 weight `[out, in]`, and the bound on each
/// element: `sum_k |x_k| * err(w_row, k)`, plus, where the products take a dot-product path
/// (this CPU's [`matrix_path`] / [`bf16_path`]), the activation's rounding (int8: `max|x_group(k)|
/// / 254 * |w~_k|`; bf16: `2^-8 |x_k w_k|`).
fn reference(x: &[f32], w: &[f32], m: usize, out: usize, inp: usize, p: BasePrecision) -> (Vec<f64>, Vec<f64>) {
    let act = match p {
        BasePrecision::Int8 => matrix_path().dot_isa().is_some(),
        BasePrecision::Bf16 => bf16_path().is_some(),
        _ => false,
    };
    reference_on(x, w, m, out, inp, p, act)
}

/// [`reference`], with the activation's rounding in the bound when `act`.
pub(super) fn reference_on(
    x: &[f32],
    w: &[f32],
    m: usize,
    out: usize,
    inp: usize,
    p: BasePrecision,
    act: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * out];
    let mut bound = vec![0f64; m * out];
    for o in 0..out {
        let row = &w[o * inp..(o + 1) * inp];
        // int8's scale is per group of INT8_GROUP inputs: the largest weight of k's group.
        let amax = |k: usize| {
            let g0 = k / super::INT8_GROUP * super::INT8_GROUP;
            row[g0..(g0 + super::INT8_GROUP).min(inp)].iter().fold(0f32, |a, v| a.max(v.abs())) as f64
        };
        for r in 0..m {
            let (mut acc, mut b, mut mag) = (0f64, 0f64, 0f64);
            // int8's activation scale is per row and group of INT8_GROUP inputs.
            let ex = |k: usize| {
                if act && p == BasePrecision::Int8 {
                    let g0 = r * inp + k / super::INT8_GROUP * super::INT8_GROUP;
                    x[g0..(g0 + super::INT8_GROUP).min((r + 1) * inp)].iter().fold(0f32, |a, v| a.max(v.abs())) as f64
                        / 254.0
                } else {
                    0.0
                }
            };
            let bf = if act && p == BasePrecision::Bf16 { (1.0 / 256.0 + 1.0 / 65536.0) * (1.0 + 1e-6) } else { 0.0 };
            for k in 0..inp {
                let (xv, wv) = (x[r * inp + k] as f64, row[k] as f64);
                acc += xv * wv;
                mag += (xv * wv).abs();
                let ew = match p {
                    BasePrecision::Bf16 => wv.abs() / 256.0,
                    BasePrecision::Int8 => amax(k) / 254.0,
                    BasePrecision::F32 | BasePrecision::Q4 => 0.0,
                };
                b += xv.abs() * ew + ex(k) * (wv.abs() + ew) * (1.0 + 1e-5) + bf * (xv * wv).abs();
            }
            y[r * out + o] = acc;
            // f32 accumulation over `inp` terms: a generous 4 * inp * 2^-24 of the magnitudes.
            bound[r * out + o] = b + mag * 4.0 * inp as f64 * f32::EPSILON as f64 / 2.0 + 1e-30;
        }
    }
    (y, bound)
}

/// The paths of `isas` this CPU runs; each one it cannot run is skipped by name for `test`
/// (`available` and `name` of the path type: int8's `DotIsa`, bf16's `Bf16Isa`).
pub(super) fn runnable<I: Copy>(
    test: &str,
    isas: &[I],
    available: fn(I) -> bool,
    name: fn(I) -> &'static str,
) -> Vec<I> {
    isas.iter()
        .copied()
        .filter(|&isa| {
            let ok = available(isa);
            if !ok {
                crate::testing::note_skip(
                    &format!("{test}[{}]", name(isa)),
                    &format!("this CPU cannot run {}", name(isa)),
                );
            }
            ok
        })
        .collect()
}

/// Every `got[i]` within `bound[i]` of `want[i]`; the first that is not named with `what`.
pub(super) fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= b, "{what} [{i}]: {g} vs {w} (err {err:e} > bound {b:e})");
    }
}

pub(super) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

#[test]
fn forward_within_the_documented_bound() {
    let mut rng = Rng::new(7);
    // The last two shapes have more rows than one widened block (4 MiB / (2048 * 4) = 512), so
    // three blocks run, the last with a partial int8 group (2085 = 32 x 64 + 37) in blocks that
    // start past row 0; the others are one block, with odd sizes for the microkernels' edges.
    for &(m, out, inp) in &[(1, 1, 1), (5, 7, 3), (33, 65, 47), (64, 96, 384), (3, 1100, 2048), (3, 1100, 2085)] {
        let x = rand(&mut rng, m * inp, 1.0);
        let w = rand(&mut rng, out * inp, 0.2);
        for p in [BasePrecision::Bf16, BasePrecision::Int8] {
            let pw = PackedWeight::pack("w", &w, out, inp, false, p).unwrap();
            let mut y = vec![f32::NAN; m * out];
            LowpKernel::<f32>::lowp_linear_fwd(&Cpu, &pw, m, &x, &mut y).unwrap();
            let (r, b) = reference(&x, &w, m, out, inp, p);
            assert_within(&format!("{p} m={m} out={out} in={inp}"), &y, &r, &b);
        }
    }
}

#[test]
fn backward_accumulates_within_the_bound() {
    let mut rng = Rng::new(11);
    for &(m, out, inp) in &[(1, 1, 1), (9, 13, 5), (40, 70, 33), (3, 1100, 2048), (3, 1100, 2085)] {
        let dy = rand(&mut rng, m * out, 1.0);
        let w = rand(&mut rng, out * inp, 0.2);
        let before = rand(&mut rng, m * inp, 1.0);
        // dx = dy w = (w^T dy^T)^T: the forward's reference with the transposed weight.
        let wt = transpose(&w, out, inp);
        for p in [BasePrecision::Bf16, BasePrecision::Int8] {
            let pw = PackedWeight::pack("w", &w, out, inp, false, p).unwrap();
            let mut dx = before.clone();
            LowpKernel::<f32>::lowp_linear_bwd(&Cpu, &pw, m, &dy, &mut dx).unwrap();
            // The bound for int8 is per group of INT8_GROUP inputs of a weight row: w[o, k]'s
            // error is at most its group's amax / 254 (the contraction here runs over o).
            let g = super::INT8_GROUP;
            let amax = |o: usize, k: usize| {
                let g0 = k / g * g;
                w[o * inp + g0..o * inp + (g0 + g).min(inp)].iter().fold(0f32, |a, v| a.max(v.abs())) as f64
            };
            let act = p == BasePrecision::Int8 && matrix_path().dot_isa().is_some();
            let bf = if p == BasePrecision::Bf16 && bf16_path().is_some() { 1.0 / 256.0 + 1.0 / 65536.0 } else { 0.0 };
            for r in 0..m {
                for k in 0..inp {
                    let (mut acc, mut b) = (before[r * inp + k] as f64, 1e-30);
                    if act {
                        b += super::tests_dot::dy_rounding(&dy[r * out..(r + 1) * out], &w, out, inp, k);
                    }
                    for o in 0..out {
                        let (g, wv) = (dy[r * out + o] as f64, wt[k * out + o] as f64);
                        acc += g * wv;
                        b += g.abs()
                            * match p {
                                BasePrecision::Bf16 => wv.abs() / 256.0,
                                _ => amax(o, k) / 254.0,
                            }
                            + (g * wv).abs() * (4.0 * out as f64 * f32::EPSILON as f64 + bf * (1.0 + 1e-6));
                    }
                    let got = dx[r * inp + k] as f64;
                    assert!((got - acc).abs() <= b, "{p} m={m} out={out} in={inp} [{r},{k}]: {got} vs {acc}");
                }
            }
        }
    }
}

#[test]
fn f64_products_are_exact_against_the_stored_weight() {
    // In f64 the only difference from an f64 product with the dequantized weight is f64 rounding:
    // the path the gradient checks use.
    let mut rng = Rng::new(3);
    let (m, out, inp) = (6, 10, 12);
    let w = rand(&mut rng, out * inp, 0.5);
    let x: Vec<f64> = rand(&mut rng, m * inp, 1.0).into_iter().map(f64::from).collect();
    for p in [BasePrecision::Bf16, BasePrecision::Int8] {
        let pw = PackedWeight::pack("w", &w, out, inp, false, p).unwrap();
        let wd = pw.to_f32();
        let mut y = vec![0f64; m * out];
        LowpKernel::<f64>::lowp_linear_fwd(&Cpu, &pw, m, &x, &mut y).unwrap();
        for r in 0..m {
            for o in 0..out {
                let want: f64 = (0..inp).map(|k| x[r * inp + k] * wd[o * inp + k] as f64).sum();
                assert!((y[r * out + o] - want).abs() < 1e-12, "{p} [{r},{o}]");
            }
        }
    }
}

#[test]
fn packing_rounds_as_documented() {
    // bf16 keeps 8 significant bits: between 1 and 2 its step is 2^-7.
    let w = [1.0f32, -2.5, 3.0e-3, 1.0 + 3.0 / 256.0, 1.0 + 1.0 / 256.0, f32::NAN];
    let pw = PackedWeight::pack("w", &w, 2, 3, false, BasePrecision::Bf16).unwrap();
    let v = pw.to_f32();
    assert_eq!(&v[..2], &[1.0, -2.5]);
    assert!((v[2] - 3.0e-3).abs() <= 3.0e-3 / 256.0);
    // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): nearest even is up,
    // where truncation would give 1 + 2^-7.
    assert_eq!(v[3], 1.0 + 1.0 / 64.0);
    // 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7: nearest even is 1.
    assert_eq!(v[4], 1.0);
    assert!(v[5].is_nan());
    assert_eq!(pw.bytes(), 12);

    let w = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0];
    let pw = PackedWeight::pack("w", &w, 2, 3, false, BasePrecision::Int8).unwrap();
    let v = pw.to_f32();
    // Row 0: scale 1/127, so -1 and 0.5 (63.5 -> 64) come back within half a step.
    assert_eq!(v[1], -1.0);
    assert!((v[0] - 0.5).abs() <= 0.5 / 127.0 && (v[2] - 0.25).abs() <= 0.5 / 127.0);
    // An all-zero row has scale 0 and stays zero.
    assert_eq!(&v[3..], &[0.0, 0.0, 0.0]);
    assert_eq!(pw.bytes(), 6 + 2 * 4);
    // A row of subnormal weights (1/scale would overflow) keeps the bound.
    let tiny = [1.0e-39f32, -3.0e-39, 2.0e-39];
    let v = PackedWeight::pack("w", &tiny, 1, 3, false, BasePrecision::Int8).unwrap().to_f32();
    for (a, b) in v.iter().zip(&tiny) {
        assert!((a - b).abs() <= 3.0e-39 / 254.0 * 1.01, "{a:e} vs {b:e}");
    }
}

/// One large weight scales only its own group of INT8_GROUP: the small weights of the row's
/// other groups keep their own step (a per-row scale would round them all to 0), a partial last
/// group included; one f32 scale per group.
#[test]
fn int8_scales_each_group_of_a_row_apart() {
    use super::INT8_GROUP;
    let inp = 2 * INT8_GROUP + 5;
    let mut w: Vec<f32> = (0..inp).map(|i| 0.01 * ((i % 7) as f32 - 3.0)).collect();
    w[3] = 100.0;
    let pw = PackedWeight::pack("w", &w, 1, inp, false, BasePrecision::Int8).unwrap();
    assert_eq!(pw.bytes(), inp + 3 * 4, "one scale per group, the partial one too");
    let v = pw.to_f32();
    for (k, (&got, &want)) in v.iter().zip(&w).enumerate() {
        let amax = if k < INT8_GROUP { 100.0 } else { 0.03 };
        assert!((got - want).abs() <= amax / 254.0 * 1.0001, "[{k}]: {got} vs {want}");
        if k >= INT8_GROUP && want != 0.0 {
            assert!(got != 0.0, "[{k}]: {want} rounded to 0: the large weight's scale reached its group");
        }
    }
}

#[test]
fn in_out_layout_is_transposed_at_packing() {
    let mut rng = Rng::new(5);
    let (out, inp) = (7, 4);
    let w = rand(&mut rng, out * inp, 1.0);
    let t = transpose(&w, out, inp); // [in, out], GPT-2's Conv1D
    for p in [BasePrecision::Bf16, BasePrecision::Int8] {
        let a = PackedWeight::pack("w", &w, out, inp, false, p).unwrap().to_f32();
        let b = PackedWeight::pack("w", &t, out, inp, true, p).unwrap().to_f32();
        assert_eq!(a, b, "{p}");
    }
}

#[test]
fn bad_input_is_refused_by_name() {
    let err = PackedWeight::pack("layer.3.fc", &[1.0, f32::INFINITY], 1, 2, false, BasePrecision::Int8).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("layer.3.fc") && msg.contains("row 0") && msg.contains("column 1"), "{msg}");
    assert!(PackedWeight::pack("w", &[1.0; 5], 2, 3, false, BasePrecision::Bf16)
        .unwrap_err()
        .to_string()
        .contains("5 elements"));
    assert!(PackedWeight::pack("w", &[], 0, 3, false, BasePrecision::Bf16).is_err());
    assert!(PackedWeight::pack("w", &[1.0; 6], 2, 3, false, BasePrecision::F32).is_err());

    let pw = PackedWeight::pack("w", &[1.0; 6], 2, 3, false, BasePrecision::Bf16).unwrap();
    let mut y = vec![0f32; 4];
    let e = LowpKernel::<f32>::lowp_linear_fwd(&Cpu, &pw, 2, &[0.0; 5], &mut y).unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("expected 6"), "{e}");
    let e = LowpKernel::<f32>::lowp_linear_bwd(&Cpu, &pw, 2, &[0.0; 4], &mut [0.0; 5]).unwrap_err().to_string();
    assert!(e.contains("`dx`") && e.contains("expected 6"), "{e}");
    assert!(LowpKernel::<f32>::lowp_linear_fwd(&Cpu, &pw, 0, &[], &mut []).is_err());
}

#[test]
fn precision_names_parse_back() {
    for p in BasePrecision::ALL {
        assert_eq!(p.name().parse::<BasePrecision>().unwrap(), p);
    }
    assert_eq!("q4".parse::<BasePrecision>().unwrap(), BasePrecision::Q4);
    assert!("fp8".parse::<BasePrecision>().unwrap_err().contains("expected f32, bf16, int8 or q4"));
}

#[test]
fn the_best_path_follows_the_features() {
    let none = CpuMatrixFeatures { avx2_fma: true, ..Default::default() };
    assert_eq!(none.best(), MatrixPath::WidenF32);
    assert_eq!(none.names(), vec!["avx2+fma"]);
    assert_eq!(CpuMatrixFeatures { avx512_vnni: true, ..none }.best(), MatrixPath::Avx512Vnni);
    assert_eq!(CpuMatrixFeatures { avx_vnni: true, ..none }.best(), MatrixPath::AvxVnni);
    assert_eq!(CpuMatrixFeatures { amx_tile: true, amx_int8: true, avx512_vnni: true, ..none }.best(), MatrixPath::Amx);
}

/// CUDA has no low-precision base: both products refuse, naming the flag, after the same length
/// checks as the CPU's (on the emulated device here; skipped by name without one).
#[test]
fn cuda_refuses_the_low_precision_products_by_name() {
    let Some(dev) = crate::testing::cuda_or_skip("lowp::cuda_refuses_the_low_precision_products_by_name") else {
        return;
    };
    let pw = PackedWeight::pack("w", &[0.5; 6], 2, 3, false, BasePrecision::Int8).unwrap();
    let x = dev.upload(&[1.0f32; 6]).unwrap();
    let mut y = dev.upload(&[0.0f32; 4]).unwrap();
    let e = LowpKernel::<f32>::lowp_linear_fwd(&*dev, &pw, 2, &x, &mut y).unwrap_err().to_string();
    assert!(e.contains("CPU-only") && e.contains("--base-precision"), "{e}");
    let mut dx = dev.upload(&[0.0f32; 6]).unwrap();
    let e = LowpKernel::<f32>::lowp_linear_bwd(&*dev, &pw, 2, &y, &mut dx).unwrap_err().to_string();
    assert!(e.contains("CPU-only"), "{e}");
    // A wrong length is still a shape error first.
    let e = LowpKernel::<f32>::lowp_linear_fwd(&*dev, &pw, 3, &x, &mut y).unwrap_err().to_string();
    assert!(e.contains("`x`"), "{e}");
}

/// `out` rows of `inp / 32` random `fmt` blocks: scales and minimums exact in f16, every nibble.
pub(super) fn q4_blocks(rng: &mut Rng, fmt: Q4Format, out: usize, inp: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(out * inp / Q4_BLOCK * fmt.block_bytes());
    for _ in 0..out * inp / Q4_BLOCK {
        let d = half::f16::from_f32(rng.next_f64() as f32 * 0.02 + 1e-3);
        b.extend(d.to_le_bytes());
        if fmt == Q4Format::Q4_1 {
            b.extend(half::f16::from_f32(-(rng.next_f64() as f32) * 0.15).to_le_bytes());
        }
        b.extend((0..Q4_BLOCK / 2).map(|_| (rng.next_f64() * 256.0) as u8));
    }
    b
}

/// q4's products against f64 products with the dequantized weight (the f32 numbers the kernel
/// computes with). The only difference is f32 arithmetic: each f32 product and sum of `n` terms
/// in any order is within `n * 2^-24` (relative, to first order; Higham's gamma_n) of the sum of
/// the terms' magnitudes. The bound below is exactly that, with `n` = the terms summed (the
/// contraction, plus the accumulated `dx` in the backward) and 1% for the second-order term.
#[test]
fn q4_products_are_the_f32_products_of_the_dequantized_blocks() {
    let mut rng = Rng::new(17);
    let u = f32::EPSILON as f64 / 2.0;
    // Several blocks per row throughout; the last shape's rows do not divide into the widened
    // block of 4 MiB / (2048 * 4) = 512 rows: blocks of 512, 512 and 76 rows.
    for &(m, out, inp) in &[(1, 1, 32), (5, 7, 64), (33, 65, 96), (64, 96, 384), (3, 1100, 2048)] {
        for fmt in [Q4Format::Q4_0, Q4Format::Q4_1] {
            let blocks = q4_blocks(&mut rng, fmt, out, inp);
            let mut w = vec![0f32; out * inp];
            q4::dequant_blocks(fmt, &blocks, &mut w);
            let pw = PackedWeight::from_q4("w", fmt, blocks, out, inp).unwrap();
            assert_eq!(pw.precision(), BasePrecision::Q4);
            assert_eq!(pw.q4_format(), Some(fmt));
            assert_eq!(pw.bytes(), out * inp / 32 * fmt.block_bytes());
            assert_eq!(pw.to_f32(), w, "{fmt}: widened rows are the dequantized blocks");

            let x = rand(&mut rng, m * inp, 1.0);
            let mut y = vec![f32::NAN; m * out];
            LowpKernel::<f32>::lowp_linear_fwd(&Cpu, &pw, m, &x, &mut y).unwrap();
            // On an int8 dot path (TUNA_CPU_MATRIX, or the CPU's default) the blocks are
            // requantized to int8 and the activations quantized: int8's bounds, with the
            // dequantized blocks as the weight.
            let dot = matrix_path().dot_isa().is_some();
            if dot {
                let (r, b) = reference_on(&x, &w, m, out, inp, BasePrecision::Int8, true);
                assert_within(&format!("{fmt} fwd on the dot path m={m} out={out} in={inp}"), &y, &r, &b);
            }
            for r in (0..m).filter(|_| !dot) {
                for o in 0..out {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for k in 0..inp {
                        let t = x[r * inp + k] as f64 * w[o * inp + k] as f64;
                        want += t;
                        mag += t.abs();
                    }
                    let got = y[r * out + o] as f64;
                    let bound = 1.01 * (inp + 1) as f64 * u * mag;
                    assert!(
                        (got - want).abs() <= bound,
                        "{fmt} fwd m={m} out={out} in={inp} [{r},{o}]: {got} vs {want} (> {bound:e})"
                    );
                }
            }

            let dy = rand(&mut rng, m * out, 1.0);
            let before = rand(&mut rng, m * inp, 1.0);
            let mut dx = before.clone();
            LowpKernel::<f32>::lowp_linear_bwd(&Cpu, &pw, m, &dy, &mut dx).unwrap();
            for r in 0..m {
                for k in 0..inp {
                    let (mut want, mut mag) = (before[r * inp + k] as f64, (before[r * inp + k] as f64).abs());
                    let mut bound = 0.0;
                    if dot {
                        // The dot path's requantizations (int8's backward bound; the blocks have
                        // no rounding of their own against `w`, so the int8 terms only loosen it).
                        bound += super::tests_dot::dy_rounding(&dy[r * out..(r + 1) * out], &w, out, inp, k);
                        for o in 0..out {
                            let g0 = k / super::INT8_GROUP * super::INT8_GROUP;
                            let amax = w[o * inp + g0..o * inp + (g0 + super::INT8_GROUP).min(inp)]
                                .iter()
                                .fold(0f32, |a, v| a.max(v.abs())) as f64;
                            bound += (dy[r * out + o] as f64).abs() * amax / 254.0;
                        }
                    }
                    for o in 0..out {
                        let t = dy[r * out + o] as f64 * w[o * inp + k] as f64;
                        want += t;
                        mag += t.abs();
                    }
                    let got = dx[r * inp + k] as f64;
                    let bound = bound + 1.01 * (out + 2) as f64 * u * mag;
                    assert!(
                        (got - want).abs() <= bound,
                        "{fmt} bwd m={m} out={out} in={inp} [{r},{k}]: {got} vs {want} (> {bound:e})"
                    );
                }
            }
        }
    }
}

#[test]
fn q4_blocks_dequantize_as_ggml_lays_them_out() {
    // Codes 0..15 in the low nibbles (elements 0..15), 15..0 in the high ones (16..31).
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let h = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let b0: Vec<u8> = h(0.25).into_iter().chain(qs.iter().copied()).collect();
    let b1: Vec<u8> = h(0.5).into_iter().chain(h(-1.0)).chain(qs.iter().copied()).collect();
    let mut y = [0f32; 32];
    q4::dequant_block(Q4Format::Q4_0, &b0, &mut y);
    for j in 0..16 {
        assert_eq!((y[j], y[j + 16]), ((j as f32 - 8.0) * 0.25, (7.0 - j as f32) * 0.25), "Q4_0 {j}");
    }
    q4::dequant_block(Q4Format::Q4_1, &b1, &mut y);
    for j in 0..16 {
        assert_eq!((y[j], y[j + 16]), (j as f32 * 0.5 - 1.0, (15 - j) as f32 * 0.5 - 1.0), "Q4_1 {j}");
    }
    // Two rows of two blocks: rows are whole runs of blocks, in order.
    let mut bytes: Vec<u8> = [&b0, &b0, &b0, &b0].into_iter().flatten().copied().collect();
    bytes[18 * 3] = h(1.0)[0];
    bytes[18 * 3 + 1] = h(1.0)[1];
    let pw = PackedWeight::from_q4("w", Q4Format::Q4_0, bytes, 2, 64).unwrap();
    let v = pw.to_f32();
    assert_eq!((v[0], v[63], v[64], v[96], v[127]), (-2.0, -2.0, -2.0, -8.0, -8.0));
    // In f64 the products are the dequantized weight's to f64 rounding.
    let x: Vec<f64> = (0..64).map(|i| i as f64 * 0.01 - 0.3).collect();
    let mut y = vec![0f64; 2];
    LowpKernel::<f64>::lowp_linear_fwd(&Cpu, &pw, 1, &x, &mut y).unwrap();
    for o in 0..2 {
        let want: f64 = (0..64).map(|k| x[k] * v[o * 64 + k] as f64).sum();
        assert!((y[o] - want).abs() < 1e-12, "row {o}: {} vs {want}", y[o]);
    }
}

#[test]
fn q4_refuses_what_ggml_cannot_hold_by_name() {
    let e = PackedWeight::from_q4("blk.0.ffn_down", Q4Format::Q4_1, vec![0; 20], 1, 33).unwrap_err().to_string();
    assert!(e.contains("blk.0.ffn_down") && e.contains("multiple of 32"), "{e}");
    let e = PackedWeight::from_q4("w", Q4Format::Q4_0, vec![0; 20], 1, 32).unwrap_err().to_string();
    assert!(e.contains("20 bytes") && e.contains("expected 18"), "{e}");
    assert!(PackedWeight::from_q4("w", Q4Format::Q4_0, vec![], 0, 32).is_err());
    let e = PackedWeight::pack("w", &[1.0; 32], 1, 32, false, BasePrecision::Q4).unwrap_err().to_string();
    assert!(e.contains("Q4_0 / Q4_1") && e.contains("not made from f32"), "{e}");
}
