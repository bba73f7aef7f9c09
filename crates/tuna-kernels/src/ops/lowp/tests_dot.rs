//! The int8 dot-product path ([`super::dot`]): each instruction path against an f64 reference
//! within the documented bound, the hardware paths against the emulated one bit for bit, and the
//! integer tiles against a plain integer product. A path this CPU cannot run is skipped by name.

use super::dot::{self, DotIsa};
use super::tests::{assert_within, rand, reference_on};
use super::*;
use crate::rng::SplitMix64 as Rng;

/// The paths of `isas` this CPU runs (the others skipped by name).
fn runnable(test: &str, isas: &[DotIsa]) -> Vec<DotIsa> {
    super::tests::runnable(test, isas, DotIsa::available, DotIsa::name)
}

/// What the dot path adds to the bound on `dx[r, k]` (beyond the int8 weight's own rounding):
/// the requantization of the stored weight per 64 output channels of column `k`
/// (`|dy_o| max_(o' in o's 64) |w~[o', k]| / 254`) and `dy`'s rounding per row and group of 64
/// output channels (`max|dy_group| / 254` times `|w^[o, k]|`, the requantized weight).
pub(super) fn dy_rounding(dy: &[f32], w: &[f32], out: usize, inp: usize, k: usize) -> f64 {
    let g0 = k / INT8_GROUP * INT8_GROUP;
    // The stored weight: within its group's amax / 254 of w.
    let ew = |o: usize| {
        w[o * inp + g0..o * inp + (g0 + INT8_GROUP).min(inp)].iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 254.0
    };
    let mut b = 0.0;
    for og in (0..out).step_by(64) {
        let os = og..(og + 64).min(out);
        let edy = dy[os.clone()].iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 254.0;
        let et = os.clone().map(|o| w[o * inp + k].abs() as f64 + ew(o)).fold(0f64, f64::max) / 254.0;
        for o in os {
            b += dy[o].abs() as f64 * et + edy * (w[o * inp + k].abs() as f64 + ew(o) + et);
        }
    }
    b * (1.0 + 1e-5)
}

const SHAPES: [(usize, usize, usize); 7] =
    [(1, 1, 1), (5, 7, 3), (17, 33, 65), (16, 16, 64), (33, 70, 130), (40, 100, 200), (3, 150, 2085)];
/// q4's rows are whole blocks of 32: one block (half a group), one and a half groups, several.
const Q4_SHAPES: [(usize, usize, usize); 5] = [(1, 1, 32), (5, 7, 96), (17, 33, 64), (33, 70, 160), (3, 150, 2080)];

/// The weights the dot path takes: int8 packed from `w` (returned as the reference: the bound
/// counts int8's rounding of it), or ggml blocks (the reference their dequantized values, which
/// the dot path requantizes to int8 per group of 64: the same bound).
fn weights(rng: &mut Rng, fmt: Option<Q4Format>, out: usize, inp: usize, scale: f32) -> (PackedWeight, Vec<f32>) {
    match fmt {
        None => {
            let w = rand(rng, out * inp, scale);
            (PackedWeight::pack("w", &w, out, inp, false, BasePrecision::Int8).unwrap(), w)
        }
        Some(fmt) => {
            let blocks = super::tests::q4_blocks(rng, fmt, out, inp);
            let mut w = vec![0f32; out * inp];
            q4::dequant_blocks(fmt, &blocks, &mut w);
            (PackedWeight::from_q4("w", fmt, blocks, out, inp).unwrap(), w)
        }
    }
}

/// Shapes `(m, out, in)`.
type Shapes = &'static [(usize, usize, usize)];

/// int8, then q4 in both formats, each with its shapes.
fn kinds() -> Vec<(Option<Q4Format>, Shapes)> {
    vec![(None, &SHAPES[..]), (Some(Q4Format::Q4_0), &Q4_SHAPES[..]), (Some(Q4Format::Q4_1), &Q4_SHAPES[..])]
}

#[test]
fn every_dot_path_is_within_the_documented_bound() {
    let test = "lowp::every_dot_path_is_within_the_documented_bound";
    let mut rng = Rng::new(21);
    for isa in runnable(test, &DotIsa::ALL) {
        for (fmt, shapes) in kinds() {
            for &(m, out, inp) in shapes {
                let x = rand(&mut rng, m * inp, 1.0);
                let (pw, w) = weights(&mut rng, fmt, out, inp, 0.2);
                let isa_name = format!("{} {}", isa.name(), fmt.map_or("int8", Q4Format::name));
                let mut y = vec![f32::NAN; m * out];
                dot::linear_fwd(isa, &pw, m, &x, &mut y);
                let (r, b) = reference_on(&x, &w, m, out, inp, BasePrecision::Int8, true);
                assert_within(&format!("{isa_name} fwd m={m} out={out} in={inp}"), &y, &r, &b);

                let dy = rand(&mut rng, m * out, 1.0);
                let before = rand(&mut rng, m * inp, 1.0);
                let mut dx = before.clone();
                dot::linear_bwd(isa, &pw, m, &dy, &mut dx);
                for rr in 0..m {
                    for k in 0..inp {
                        let g0 = k / INT8_GROUP * INT8_GROUP;
                        let (mut acc, mut bound) = (before[rr * inp + k] as f64, 1e-30);
                        bound += dy_rounding(&dy[rr * out..(rr + 1) * out], &w, out, inp, k);
                        for o in 0..out {
                            let (g, wv) = (dy[rr * out + o] as f64, w[o * inp + k] as f64);
                            let amax = w[o * inp + g0..o * inp + (g0 + INT8_GROUP).min(inp)]
                                .iter()
                                .fold(0f32, |a, v| a.max(v.abs())) as f64;
                            acc += g * wv;
                            bound += g.abs() * amax / 254.0 + (g * wv).abs() * 4.0 * out as f64 * f32::EPSILON as f64;
                        }
                        let got = dx[rr * inp + k] as f64;
                        assert!(
                            (got - acc).abs() <= bound,
                            "{isa_name} bwd m={m} out={out} in={inp} [{rr},{k}]: {got} vs {acc} (bound {bound:e})",
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn hardware_dot_paths_give_the_emulated_bits() {
    let test = "lowp::hardware_dot_paths_give_the_emulated_bits";
    let mut rng = Rng::new(5);
    for isa in runnable(test, &[DotIsa::AvxVnni, DotIsa::Avx512Vnni, DotIsa::Amx]) {
        for (fmt, shapes) in kinds() {
            for &(m, out, inp) in shapes.iter().chain(&[(70, 300, 576)]) {
                let x = rand(&mut rng, m * inp, 3.0);
                let (pw, _) = weights(&mut rng, fmt, out, inp, 0.1);
                let (mut y0, mut y1) = (vec![0f32; m * out], vec![0f32; m * out]);
                dot::linear_fwd(DotIsa::Emulated, &pw, m, &x, &mut y0);
                dot::linear_fwd(isa, &pw, m, &x, &mut y1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y0), bits(&y1), "{} {fmt:?} fwd m={m} out={out} in={inp}", isa.name());
                let dy = rand(&mut rng, m * out, 1.0);
                let (mut d0, mut d1) = (x.clone(), x.clone());
                dot::linear_bwd(DotIsa::Emulated, &pw, m, &dy, &mut d0);
                dot::linear_bwd(isa, &pw, m, &dy, &mut d1);
                assert_eq!(bits(&d0), bits(&d1), "{} {fmt:?} bwd m={m} out={out} in={inp}", isa.name());
            }
        }
    }
}

#[test]
fn integer_tiles_are_the_plain_integer_products() {
    // Every byte value, both signs of A at their extremes (-128 included), B from 0 to 255, sums
    // of several chunks, a row stride wider than the chunks read.
    let test = "lowp::integer_tiles_are_the_plain_integer_products";
    let mut rng = Rng::new(9);
    let (per, sums, stride) = (3, 2, 64 * 6 + 32);
    let a: Vec<i8> = (0..16 * stride).map(|_| rng.next_u64() as i8).collect();
    let b: Vec<u8> = (0..1024 * per * sums).map(|_| rng.next_u64() as u8).collect();
    let mut want = vec![0i32; 256 * sums];
    for t in 0..sums {
        for j in t * per..(t + 1) * per {
            for r in 0..16 {
                for c in 0..16 {
                    for k in 0..64 {
                        let bv = b[j * 1024 + (k / 4) * 64 + c * 4 + k % 4] as i32;
                        want[t * 256 + r * 16 + c] += a[r * stride + 64 * j + k] as i32 * bv;
                    }
                }
            }
        }
    }
    for isa in runnable(test, &DotIsa::ALL) {
        let mut c = vec![7i32; 256 * sums];
        dot::tiles(isa, &a, stride, &b, per, sums, &mut c);
        assert_eq!(c, want, "{}", isa.name());
    }
}

#[test]
fn dot_paths_keep_zero_rows_zero_and_non_finite_rows_non_finite() {
    let test = "lowp::dot_paths_keep_zero_rows_zero_and_non_finite_rows_non_finite";
    let mut rng = Rng::new(13);
    let (m, out, inp) = (20, 24, 70);
    let w = rand(&mut rng, out * inp, 0.3);
    let pw = PackedWeight::pack("w", &w, out, inp, false, BasePrecision::Int8).unwrap();
    for isa in runnable(test, &DotIsa::ALL) {
        let mut x = rand(&mut rng, m * inp, 1.0);
        x[3 * inp..4 * inp].fill(0.0);
        let mut clean = vec![0f32; m * out];
        dot::linear_fwd(isa, &pw, m, &x, &mut clean);
        assert!(clean[3 * out..4 * out].iter().all(|&v| v == 0.0), "{}", isa.name());
        x[5 * inp + 7] = f32::NAN;
        x[9 * inp + 1] = f32::INFINITY;
        let mut y = vec![0f32; m * out];
        dot::linear_fwd(isa, &pw, m, &x, &mut y);
        for r in 0..m {
            let row = &y[r * out..(r + 1) * out];
            if r == 5 || r == 9 {
                assert!(row.iter().all(|v| v.is_nan()), "{} row {r}: {row:?}", isa.name());
            } else {
                // A row's quantization is its own: the other rows are unchanged.
                assert_eq!(row, &clean[r * out..(r + 1) * out], "{} row {r}", isa.name());
            }
        }
        let mut dy = rand(&mut rng, m * out, 1.0);
        dy[2 * out + 3] = f32::NAN;
        let mut dx = vec![0f32; m * inp];
        dot::linear_bwd(isa, &pw, m, &dy, &mut dx);
        for r in 0..m {
            let row = &dx[r * inp..(r + 1) * inp];
            assert_eq!(row.iter().all(|v| v.is_nan()), r == 2, "{} dx row {r}", isa.name());
            assert!(r == 2 || row.iter().all(|v| v.is_finite()), "{} dx row {r}", isa.name());
        }
    }
}

#[test]
fn the_chosen_path_is_one_this_cpu_runs() {
    // Unset, TUNA_CPU_MATRIX leaves the choice to the CPU: the best path it runs. (CI may set it
    // to test another path; then that path must be runnable here.)
    let p = matrix_path_checked().expect("TUNA_CPU_MATRIX names a path this CPU runs");
    assert!(p.available(), "{p:?}");
    if std::env::var(MATRIX_ENV).is_err() {
        let best = [MatrixPath::Amx, MatrixPath::Avx512Vnni, MatrixPath::AvxVnni]
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(MatrixPath::WidenF32);
        assert_eq!(p, best);
    }
    // Likewise the bf16 base's: AMX-BF16, then AVX512_BF16, else widen (`None`).
    let b = bf16_path_checked().expect("TUNA_CPU_MATRIX_BF16 names a path this CPU runs");
    if std::env::var(MATRIX_BF16_ENV).is_err() {
        assert_eq!(b, [Bf16Isa::Amx, Bf16Isa::Avx512Bf16].into_iter().find(|p| p.available()));
    }
    for p in MatrixPath::ALL {
        assert_eq!(MatrixPath::ALL.iter().filter(|q| q.name() == p.name()).count(), 1);
        assert_eq!(p.dot_isa().is_none(), p == MatrixPath::WidenF32);
    }
}

#[test]
fn an_activation_outlier_coarsens_only_its_own_group() {
    // The weight's first 64 inputs are zero; an outlier there (1000x the rest) leaves the product
    // bit for bit what it is without it: the other groups' scales are their own.
    let test = "lowp::an_activation_outlier_coarsens_only_its_own_group";
    let mut rng = Rng::new(17);
    let (m, out, inp) = (3, 20, 200);
    let mut w = rand(&mut rng, out * inp, 0.3);
    for o in 0..out {
        w[o * inp..o * inp + 64].fill(0.0);
    }
    let pw = PackedWeight::pack("w", &w, out, inp, false, BasePrecision::Int8).unwrap();
    let x = rand(&mut rng, m * inp, 1.0);
    let mut xo = x.clone();
    xo[inp + 5] = 1000.0;
    for isa in runnable(test, &DotIsa::ALL) {
        let (mut y, mut yo) = (vec![0f32; m * out], vec![0f32; m * out]);
        dot::linear_fwd(isa, &pw, m, &x, &mut y);
        dot::linear_fwd(isa, &pw, m, &xo, &mut yo);
        assert_eq!(y, yo, "{}", isa.name());
    }
}

#[test]
fn a_q4_block_with_a_non_finite_scale_makes_its_products_nan_as_the_widen_path_does() {
    // Output channel 2's second block (inputs 32..64) has a NaN scale: the widen path gives NaN in
    // that channel for every row and in those 32 input gradients' columns; so must the dot path,
    // and everything else finite. An infinite scale the same.
    let test = "lowp::a_q4_block_with_a_non_finite_scale_makes_its_products_nan_as_the_widen_path_does";
    let mut rng = Rng::new(29);
    let (m, out, inp) = (5, 6, 96);
    for (fmt, bad) in [(Q4Format::Q4_0, half::f16::NAN), (Q4Format::Q4_1, half::f16::INFINITY)] {
        let mut blocks = super::tests::q4_blocks(&mut rng, fmt, out, inp);
        let at = (2 * (inp / Q4_BLOCK) + 1) * fmt.block_bytes();
        blocks[at..at + 2].copy_from_slice(&bad.to_le_bytes());
        let pw = PackedWeight::from_q4("w", fmt, blocks, out, inp).unwrap();
        let x = rand(&mut rng, m * inp, 1.0);
        let dy = rand(&mut rng, m * out, 1.0);
        for isa in runnable(test, &DotIsa::ALL) {
            let mut y = vec![0f32; m * out];
            dot::linear_fwd(isa, &pw, m, &x, &mut y);
            for (i, v) in y.iter().enumerate() {
                assert_eq!(v.is_nan(), i % out == 2, "{} {fmt} y[{i}] = {v}", isa.name());
            }
            let mut dx = vec![0f32; m * inp];
            dot::linear_bwd(isa, &pw, m, &dy, &mut dx);
            for (i, v) in dx.iter().enumerate() {
                assert_eq!(v.is_nan(), (32..64).contains(&(i % inp)), "{} {fmt} dx[{i}] = {v}", isa.name());
            }
        }
    }
}

#[test]
fn each_weight_the_products_use_is_the_stored_one_within_half_a_step() {
    // One-hot rows are quantized exactly (127 at scale 1/127), so `x = I` reads back the weight
    // the forward multiplies by, element by element, and `dy = I` the backward's: the stored
    // weight `w~` (what the widen path multiplies by) exactly for int8's forward, within half a
    // requantization step (`max|w~ group| / 254`) for q4's forward (groups of 64 inputs of a row)
    // and every backward (groups of 64 output channels of a column). Tighter than the products'
    // bounds, which add errors of both signs.
    let test = "lowp::each_weight_the_products_use_is_the_stored_one_within_half_a_step";
    let mut rng = Rng::new(31);
    for isa in runnable(test, &DotIsa::ALL) {
        for (fmt, (out, inp)) in
            [(None, (70, 130)), (Some(Q4Format::Q4_0), (70, 160)), (Some(Q4Format::Q4_1), (130, 96))]
        {
            let (pw, _) = weights(&mut rng, fmt, out, inp, 0.3);
            let ws = pw.to_f32();
            let name = format!("{} {}", isa.name(), fmt.map_or("int8", Q4Format::name));
            let amax = |vals: &mut dyn Iterator<Item = f32>| vals.fold(0f32, |a, v| a.max(v.abs())) / 254.0;
            let eye = |n: usize| (0..n * n).map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
            let mut y = vec![0f32; inp * out];
            dot::linear_fwd(isa, &pw, inp, &eye(inp), &mut y);
            for o in 0..out {
                for k in 0..inp {
                    let (g0, w) = (k / 64 * 64, ws[o * inp + k]);
                    let step = if fmt.is_none() {
                        0.0
                    } else {
                        amax(&mut ws[o * inp + g0..o * inp + (g0 + 64).min(inp)].iter().copied())
                    };
                    let got = y[k * out + o];
                    assert!(
                        (got - w).abs() <= step * 1.00001 + 4.0 * f32::EPSILON * w.abs(),
                        "{name} fwd [{o},{k}]: {got} vs {w} (half step {step:e})"
                    );
                }
            }
            let mut dx = vec![0f32; out * inp];
            dot::linear_bwd(isa, &pw, out, &eye(out), &mut dx);
            for o in 0..out {
                for k in 0..inp {
                    let (o0, w) = (o / 64 * 64, ws[o * inp + k]);
                    let step = amax(&mut (o0..(o0 + 64).min(out)).map(|o| ws[o * inp + k]));
                    let got = dx[o * inp + k];
                    assert!(
                        (got - w).abs() <= step * 1.00001 + 4.0 * f32::EPSILON * w.abs(),
                        "{name} bwd [{o},{k}]: {got} vs {w} (half step {step:e})"
                    );
                }
            }
        }
    }
}

#[test]
fn the_int8_products_keep_their_bits() {
    // A fingerprint of the portable path's forward and input-gradient bits (int8, Q4_0, Q4_1; odd
    // shapes, partial groups and blocks). Every path gives these bits (tested above), so a change to
    // the shared arithmetic that moves a single bit shows here. Recorded from d66f238 and unchanged
    // since; if a change is meant to move them, check it against the bounds above and record anew.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (seed, (m, out, inp)) in
        [(1u64, (37usize, 50usize, 224usize)), (2, (16, 16, 64)), (3, (70, 130, 96)), (4, (5, 64, 1536))]
    {
        for fmt in [None, Some(Q4Format::Q4_0), Some(Q4Format::Q4_1)] {
            let mut rng = Rng::new(seed);
            let (pw, _) = weights(&mut rng, fmt, out, inp, 0.3);
            let (x, dy) = (rand(&mut rng, m * inp, 1.0), rand(&mut rng, m * out, 1.0));
            let (mut y, mut dx) = (vec![0f32; m * out], rand(&mut rng, m * inp, 0.1));
            dot::linear_fwd(DotIsa::Emulated, &pw, m, &x, &mut y);
            dot::linear_bwd(DotIsa::Emulated, &pw, m, &dy, &mut dx);
            for v in y.iter().chain(&dx) {
                h = (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    assert_eq!(h, GOLDEN, "the int8 dot path's bits moved: {h:#018x}");
}

/// [`the_int8_products_keep_their_bits`]: recorded from d66f238 (before the per-group epilogue,
/// the vectorized quantization and the signed-activation layout, which kept them).
const GOLDEN: u64 = 0x91f3_443b_f2b8_4b46;
