//! The bf16 dot-product path ([`super::dot_bf16`]): each instruction path against an f64 reference
//! within the documented bound, the hardware paths against the portable one within the f32
//! rounding of the sum, and the tiles against f64 sums of the same bf16 values. A path this CPU
//! cannot run is skipped by name.

use super::dot_bf16::{self, Bf16Isa};
use super::tests::{assert_within, rand, reference_on, transpose};
use super::*;
use crate::rng::SplitMix64 as Rng;

/// The paths of `isas` this CPU runs (the others skipped by name).
fn runnable(test: &str, isas: &[Bf16Isa]) -> Vec<Bf16Isa> {
    super::tests::runnable(test, isas, Bf16Isa::available, Bf16Isa::name)
}

const SHAPES: [(usize, usize, usize); 7] =
    [(1, 1, 1), (5, 7, 3), (17, 33, 65), (16, 16, 32), (33, 70, 130), (40, 100, 200), (3, 150, 2085)];

#[test]
fn every_bf16_dot_path_is_within_the_documented_bound() {
    let test = "lowp::every_bf16_dot_path_is_within_the_documented_bound";
    let mut rng = Rng::new(31);
    for isa in runnable(test, &Bf16Isa::ALL) {
        for &(m, out, inp) in &SHAPES {
            let x = rand(&mut rng, m * inp, 1.0);
            let w = rand(&mut rng, out * inp, 0.2);
            let pw = PackedWeight::pack("w", &w, out, inp, false, BasePrecision::Bf16).unwrap();
            let mut y = vec![f32::NAN; m * out];
            dot_bf16::linear_fwd(isa, &pw, m, &x, &mut y);
            let (r, b) = reference_on(&x, &w, m, out, inp, BasePrecision::Bf16, true);
            assert_within(&format!("{} fwd m={m} out={out} in={inp}", isa.name()), &y, &r, &b);
            // The backward: dx = before + dy w, the forward's reference with w transposed.
            let dy = rand(&mut rng, m * out, 1.0);
            let before = rand(&mut rng, m * inp, 1.0);
            let mut dx = before.clone();
            dot_bf16::linear_bwd(isa, &pw, m, &dy, &mut dx);
            let wt = transpose(&w, out, inp);
            let (r, b) = reference_on(&dy, &wt, m, inp, out, BasePrecision::Bf16, true);
            for i in 0..m * inp {
                let want = r[i] + before[i] as f64;
                // One more rounding: the sum added to `before`.
                let bound = b[i] + (want.abs() + r[i].abs()) * f32::EPSILON as f64;
                let err = (dx[i] as f64 - want).abs();
                assert!(
                    err <= bound,
                    "{} bwd m={m} out={out} in={inp} [{i}]: {} vs {want} (err {err:e} > {bound:e})",
                    isa.name(),
                    dx[i]
                );
            }
        }
    }
}

#[test]
fn hardware_bf16_paths_follow_the_portable_one() {
    // Within the f32 rounding of the sum (the instructions may round a pair's two products once,
    // and flush subnormals): 2 * (terms + 2) * 2^-24 of the sum of magnitudes.
    let test = "lowp::hardware_bf16_paths_follow_the_portable_one";
    let mut rng = Rng::new(6);
    for isa in runnable(test, &[Bf16Isa::Avx512Bf16, Bf16Isa::Amx]) {
        for &(m, out, inp) in SHAPES.iter().chain(&[(70, 300, 576)]) {
            let x = rand(&mut rng, m * inp, 3.0);
            let w = rand(&mut rng, out * inp, 0.1);
            let pw = PackedWeight::pack("w", &w, out, inp, false, BasePrecision::Bf16).unwrap();
            let (mut y0, mut y1) = (vec![0f32; m * out], vec![0f32; m * out]);
            dot_bf16::linear_fwd(Bf16Isa::Emulated, &pw, m, &x, &mut y0);
            dot_bf16::linear_fwd(isa, &pw, m, &x, &mut y1);
            let wd = pw.to_f32();
            let mut same = 0;
            for r in 0..m {
                for o in 0..out {
                    let mag: f64 = (0..inp).map(|k| (x[r * inp + k] * wd[o * inp + k]).abs() as f64).sum();
                    let (a, b) = (y0[r * out + o], y1[r * out + o]);
                    same += (a.to_bits() == b.to_bits()) as usize;
                    let tol = mag * 2.0 * (inp + 2) as f64 * f32::EPSILON as f64 / 2.0 + 1e-30;
                    assert!(
                        ((a - b) as f64).abs() <= tol,
                        "{} m={m} out={out} in={inp} [{r},{o}]: {a} vs {b}",
                        isa.name()
                    );
                }
            }
            println!(
                "{} m={m} out={out} in={inp}: {same} of {} outputs bit-identical to the portable path",
                isa.name(),
                m * out
            );
        }
    }
}

#[test]
fn bf16_tiles_sum_the_products_of_the_bf16_values() {
    let test = "lowp::bf16_tiles_sum_the_products_of_the_bf16_values";
    let mut rng = Rng::new(8);
    let (chunks, stride) = (3, 32 * 3 + 16);
    let bits = |rng: &mut Rng| half::bf16::from_f32(rng.next_f64() as f32 * 4.0 - 2.0).to_bits();
    let a: Vec<u16> = (0..16 * stride).map(|_| bits(&mut rng)).collect();
    let b: Vec<u16> = (0..512 * chunks).map(|_| bits(&mut rng)).collect();
    let f = |v: u16| f32::from_bits((v as u32) << 16) as f64;
    for isa in runnable(test, &Bf16Isa::ALL) {
        let mut c = vec![7f32; 256];
        dot_bf16::tiles(isa, &a, stride, &b, chunks, &mut c);
        for r in 0..16 {
            for col in 0..16 {
                let (mut want, mut mag) = (0f64, 0f64);
                for j in 0..chunks {
                    for k in 0..32 {
                        let p = f(a[r * stride + 32 * j + k]) * f(b[j * 512 + (k / 2) * 32 + col * 2 + k % 2]);
                        want += p;
                        mag += p.abs();
                    }
                }
                let got = c[r * 16 + col] as f64;
                assert!(
                    (got - want).abs() <= mag * 100.0 * f32::EPSILON as f64,
                    "{} [{r},{col}]: {got} vs {want}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn bf16_dot_paths_keep_non_finite_rows_to_themselves() {
    let test = "lowp::bf16_dot_paths_keep_non_finite_rows_to_themselves";
    let mut rng = Rng::new(14);
    let (m, out, inp) = (20, 24, 70);
    let w = rand(&mut rng, out * inp, 0.3);
    let pw = PackedWeight::pack("w", &w, out, inp, false, BasePrecision::Bf16).unwrap();
    for isa in runnable(test, &Bf16Isa::ALL) {
        let mut x = rand(&mut rng, m * inp, 1.0);
        let mut clean = vec![0f32; m * out];
        dot_bf16::linear_fwd(isa, &pw, m, &x, &mut clean);
        x[5 * inp + 7] = f32::NAN;
        let mut y = vec![0f32; m * out];
        dot_bf16::linear_fwd(isa, &pw, m, &x, &mut y);
        for r in 0..m {
            let row = &y[r * out..(r + 1) * out];
            if r == 5 {
                assert!(row.iter().all(|v| v.is_nan()), "{} row {r}: {row:?}", isa.name());
            } else {
                assert_eq!(row, &clean[r * out..(r + 1) * out], "{} row {r}", isa.name());
            }
        }
    }
}
