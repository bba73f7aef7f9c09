//! Elementwise tests on the CPU: f64 references (proven by central differences), the CPU kernels
//! in f32 and f64 against them at ragged sizes with nonzero starting gradients, shape errors.

use super::*;
use crate::backend::CpuFloat;
use crate::testing::{Rng, Tol};
use crate::Cpu;

pub(super) fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}
fn cast<F: CpuFloat>(v: &[f32]) -> Vec<F> {
    v.iter().map(|&a| F::c(a as f64)).collect()
}
/// `start + delta`, elementwise: the expected value of an accumulated gradient.
fn plus(start: &[f32], delta: &[f64]) -> Vec<f64> {
    start.iter().zip(delta).map(|(&s, d)| s as f64 + d).collect()
}

// ---- f64 references: forwards, and the gradients of sum(y * dy) ----

pub(super) fn ref_add_bias(x: &[f64], bias: &[f64]) -> Vec<f64> {
    x.chunks(bias.len()).flat_map(|row| row.iter().zip(bias).map(|(x, b)| x + b)).collect()
}
pub(super) fn ref_dbias(dy: &[f64], cols: usize) -> Vec<f64> {
    let mut g = vec![0.0; cols];
    for row in dy.chunks(cols) {
        (0..cols).for_each(|c| g[c] += row[c]);
    }
    g
}
/// `dst[r, dst_off + c] = src[r, src_off + c]` for `c < width`, on a copy of `dst`.
fn ref_copy(
    src: &[f64],
    (sc, so): (usize, usize),
    dst: &[f64],
    (dc, doff): (usize, usize),
    rows: usize,
    w: usize,
) -> Vec<f64> {
    let mut out = dst.to_vec();
    for r in 0..rows {
        for c in 0..w {
            out[r * dc + doff + c] = src[r * sc + so + c];
        }
    }
    out
}
pub(super) fn ref_slice(x: &[f64], p: &ColsParams) -> Vec<f64> {
    let (cols, off, w) = (p.cols as usize, p.off as usize, p.width as usize);
    ref_copy(x, (cols, off), &vec![0.0; p.narrow()], (w, 0), p.rows as usize, w)
}
/// Forward of concat into `y0` (columns outside the block keep `y0`); also the gradient of slice.
pub(super) fn ref_concat(x: &[f64], y0: &[f64], p: &ColsParams) -> Vec<f64> {
    let (cols, off, w) = (p.cols as usize, p.off as usize, p.width as usize);
    ref_copy(x, (w, 0), y0, (cols, off), p.rows as usize, w)
}
/// `dx = dy * (1 - y^2)` from tanh's output `y`.
pub(super) fn ref_tanh_bwd(y: &[f64], dy: &[f64]) -> Vec<f64> {
    y.iter().zip(dy).map(|(y, d)| d * (1.0 - y * y)).collect()
}
fn count(mask: &[u8]) -> f64 {
    mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0)
}
pub(super) fn ref_pool(x: &[f64], mask: &[u8], p: &PoolParams) -> Vec<f64> {
    let (batch, seq, hid) = (p.batch as usize, p.seq as usize, p.hidden as usize);
    let mut y = vec![0.0; batch * hid];
    for b in 0..batch {
        let m = &mask[b * seq..(b + 1) * seq];
        for h in 0..hid {
            let s: f64 = (0..seq).map(|t| m[t] as f64 * x[(b * seq + t) * hid + h]).sum();
            y[b * hid + h] = s / count(m);
        }
    }
    y
}
pub(super) fn ref_pool_bwd(mask: &[u8], dy: &[f64], p: &PoolParams) -> Vec<f64> {
    let (batch, seq, hid) = (p.batch as usize, p.seq as usize, p.hidden as usize);
    let mut dx = vec![0.0; batch * seq * hid];
    for b in 0..batch {
        let m = &mask[b * seq..(b + 1) * seq];
        for t in 0..seq {
            for h in 0..hid {
                dx[(b * seq + t) * hid + h] = m[t] as f64 * dy[b * hid + h] / count(m);
            }
        }
    }
    dx
}
/// A 0/1 mask whose first row is all zeros (count clamped to 1) and others random.
pub(super) fn mask(rng: &mut Rng, batch: usize, seq: usize) -> Vec<u8> {
    (0..batch * seq).map(|i| if i < seq { 0 } else { (rng.below(3) != 0) as u8 }).collect()
}

/// Central differences of `L = sum(f(inputs) * dy)` against each analytic gradient in `grads`.
fn fd_check(what: &str, inputs: &[Vec<f64>], dy: &[f64], f: impl Fn(&[Vec<f64>]) -> Vec<f64>, grads: &[Vec<f64>]) {
    let loss = |ins: &[Vec<f64>]| f(ins).iter().zip(dy).map(|(y, d)| y * d).sum::<f64>();
    let h = 1e-4;
    for (k, grad) in grads.iter().enumerate() {
        let fd: Vec<f64> = (0..inputs[k].len())
            .map(|i| {
                let mut ins = inputs.to_vec();
                ins[k][i] += h;
                let up = loss(&ins);
                ins[k][i] -= 2.0 * h;
                (up - loss(&ins)) / (2.0 * h)
            })
            .collect();
        Tol::GRAD_CHECK.assert_close(&format!("{what}: input {k}"), grad, &fd);
    }
}

#[test]
fn reference_gradients_match_central_differences() {
    let mut rng = Rng::new(1);
    let n = 11;
    let (a, b, dy) = (f64s(&rng.vec(n, -2.0, 2.0)), f64s(&rng.vec(n, -2.0, 2.0)), f64s(&rng.vec(n, -1.0, 1.0)));
    let add = |i: &[Vec<f64>]| i[0].iter().zip(&i[1]).map(|(a, b)| a + b).collect::<Vec<_>>();
    fd_check("add", &[a.clone(), b.clone()], &dy, add, &[dy.clone(), dy.clone()]);
    let mul = |i: &[Vec<f64>]| i[0].iter().zip(&i[1]).map(|(a, b)| a * b).collect::<Vec<_>>();
    let (da, db) = (dy.iter().zip(&b).map(|(d, b)| d * b).collect(), dy.iter().zip(&a).map(|(d, a)| d * a).collect());
    fd_check("mul", &[a.clone(), b.clone()], &dy, mul, &[da, db]);
    let scale = |i: &[Vec<f64>]| i[0].iter().map(|a| 0.37 * a).collect::<Vec<_>>();
    fd_check("scale", std::slice::from_ref(&a), &dy, scale, &[dy.iter().map(|d| 0.37 * d).collect()]);
    let tanh = |i: &[Vec<f64>]| i[0].iter().map(|a| a.tanh()).collect::<Vec<_>>();
    let a = [a];
    fd_check("tanh", &a, &dy, tanh, &[ref_tanh_bwd(&tanh(&a), &dy)]);

    let (rows, cols) = (3, 5);
    let (x, bias, dy) = (f64s(&rng.vec(15, -2.0, 2.0)), f64s(&rng.vec(cols, -1.0, 1.0)), f64s(&rng.vec(15, -1.0, 1.0)));
    let f = |i: &[Vec<f64>]| ref_add_bias(&i[0], &i[1]);
    fd_check("add_bias", &[x, bias], &dy, f, &[dy.clone(), ref_dbias(&dy, cols)]);

    let p = ColsParams::new(rows, 7, 2, 4);
    let (x, dy) = (f64s(&rng.vec(p.wide(), -2.0, 2.0)), f64s(&rng.vec(p.narrow(), -1.0, 1.0)));
    let slice_grad = ref_concat(&dy, &vec![0.0; p.wide()], &p);
    fd_check("slice_cols", std::slice::from_ref(&x), &dy, |i| ref_slice(&i[0], &p), &[slice_grad]);
    let (xn, dyw) = (f64s(&rng.vec(p.narrow(), -2.0, 2.0)), f64s(&rng.vec(p.wide(), -1.0, 1.0)));
    fd_check("concat_cols", &[xn], &dyw, |i| ref_concat(&i[0], &x, &p), &[ref_slice(&dyw, &p)]);

    let p = PoolParams::new(3, 4, 5);
    let m = mask(&mut rng, 3, 4);
    let (x, dy) = (f64s(&rng.vec(60, -2.0, 2.0)), f64s(&rng.vec(15, -1.0, 1.0)));
    fd_check("sum_rows_masked_mean", &[x], &dy, |i| ref_pool(&i[0], &m, &p), &[ref_pool_bwd(&m, &dy, &p)]);
}

fn flat_ops<F: CpuFloat<Acc = F>>(tol: Tol) {
    let n = 40_003; // several rayon chunks, the last one ragged
    let mut rng = Rng::new(2);
    let (a, b, dy) = (rng.vec(n, -3.0, 3.0), rng.vec(n, -3.0, 3.0), rng.vec(n, -1.0, 1.0));
    let (g0a, g0b) = (rng.vec(n, -1.0, 1.0), rng.vec(n, -1.0, 1.0)); // backwards accumulate
    let (af, bf, dyf) = (cast::<F>(&a), cast::<F>(&b), cast::<F>(&dy));
    let (a64, b64, dy64) = (f64s(&a), f64s(&b), f64s(&dy));
    let mut y = vec![F::zero(); n];
    let (mut da, mut db) = (cast::<F>(&g0a), cast::<F>(&g0b));
    Cpu.add_fwd(&af, &bf, &mut y).unwrap();
    tol.assert_close("add fwd", &y, &a64.iter().zip(&b64).map(|(a, b)| a + b).collect::<Vec<_>>());
    Cpu.add_bwd(&dyf, &mut da, &mut db).unwrap();
    tol.assert_close("add bwd da", &da, &plus(&g0a, &dy64));
    tol.assert_close("add bwd db", &db, &plus(&g0b, &dy64));

    let (mut da, mut db) = (cast::<F>(&g0a), cast::<F>(&g0b));
    Cpu.mul_fwd(&af, &bf, &mut y).unwrap();
    tol.assert_close("mul fwd", &y, &a64.iter().zip(&b64).map(|(a, b)| a * b).collect::<Vec<_>>());
    Cpu.mul_bwd(&af, &bf, &dyf, &mut da, &mut db).unwrap();
    let want_da: Vec<f64> = dy64.iter().zip(&b64).map(|(d, b)| d * b).collect();
    let want_db: Vec<f64> = dy64.iter().zip(&a64).map(|(d, a)| d * a).collect();
    tol.assert_close("mul bwd da", &da, &plus(&g0a, &want_da));
    tol.assert_close("mul bwd db", &db, &plus(&g0b, &want_db));

    let s = -0.37;
    let mut da = cast::<F>(&g0a);
    Cpu.scale_fwd(s, &af, &mut y).unwrap();
    tol.assert_close("scale fwd", &y, &a64.iter().map(|a| s * a).collect::<Vec<_>>());
    Cpu.scale_bwd(s, &dyf, &mut da).unwrap();
    tol.assert_close("scale bwd", &da, &plus(&g0a, &dy64.iter().map(|d| s * d).collect::<Vec<_>>()));

    // tanh: forward from x, backward from the forward's output (saturated inputs included)
    let mut da = cast::<F>(&g0a);
    Cpu.tanh_fwd(&af, &mut y).unwrap();
    let want_y: Vec<f64> = a64.iter().map(|a| a.tanh()).collect();
    tol.assert_close("tanh fwd", &y, &want_y);
    Cpu.tanh_bwd(&y, &dyf, &mut da).unwrap();
    tol.assert_close("tanh bwd", &da, &plus(&g0a, &ref_tanh_bwd(&want_y, &dy64)));
}

#[test]
fn cpu_flat_ops_match_reference() {
    flat_ops::<f32>(Tol::F32);
    flat_ops::<f64>(Tol::F64);
}

fn add_bias<F: CpuFloat<Acc = F>>(tol: Tol, rows: usize, cols: usize) {
    let mut rng = Rng::new(3 + rows as u64);
    let p = BiasParams::new(rows, cols);
    let (x, bias, dy) = (rng.vec(rows * cols, -3.0, 3.0), rng.vec(cols, -1.0, 1.0), rng.vec(rows * cols, -1.0, 1.0));
    let (g0x, g0b) = (rng.vec(rows * cols, -1.0, 1.0), rng.vec(cols, -1.0, 1.0));
    let mut y = vec![F::zero(); rows * cols];
    Cpu.add_bias_fwd(&p, &cast::<F>(&x), &cast::<F>(&bias), &mut y).unwrap();
    tol.assert_close("add_bias fwd", &y, &ref_add_bias(&f64s(&x), &f64s(&bias)));
    let (mut dx, mut dbias) = (cast::<F>(&g0x), cast::<F>(&g0b));
    Cpu.add_bias_bwd(&p, &cast::<F>(&dy), &mut dx, &mut dbias).unwrap();
    tol.assert_close("add_bias bwd dx", &dx, &plus(&g0x, &f64s(&dy)));
    tol.assert_close("add_bias bwd dbias", &dbias, &plus(&g0b, &ref_dbias(&f64s(&dy), cols)));
    // bias_grad: the dbias half alone, the same bits as add_bias_bwd's
    let mut dbias_only = cast::<F>(&g0b);
    Cpu.bias_grad(&p, &cast::<F>(&dy), &mut dbias_only).unwrap();
    let exact = dbias_only.iter().zip(&dbias).all(|(&a, &b)| Into::<f64>::into(a) == b.into());
    assert!(exact, "bias_grad differs from add_bias_bwd's dbias");
    // add_bias_inplace: add_bias_fwd's bits, in y's own buffer
    let mut in_place = cast::<F>(&x);
    Cpu.add_bias_inplace(&p, &cast::<F>(&bias), &mut in_place).unwrap();
    let same = in_place.iter().zip(&y).all(|(&a, &b)| Into::<f64>::into(a) == b.into());
    assert!(same, "add_bias_inplace differs from add_bias_fwd");
}

#[test]
fn cpu_add_bias_matches_reference() {
    // f32 dbias sums up to 20_000 rows: the long-reduction tolerance
    for (rows, cols) in [(37, 1029), (20_001, 3), (1, 1)] {
        add_bias::<f32>(Tol::F32_LONG, rows, cols);
        add_bias::<f64>(Tol::F64, rows, cols);
    }
}

fn cols_ops<F: CpuFloat<Acc = F>>(tol: Tol, p: ColsParams) {
    let mut rng = Rng::new(4 + p.off);
    let (wide, narrow) = (rng.vec(p.wide(), -3.0, 3.0), rng.vec(p.narrow(), -3.0, 3.0));
    let (g0w, g0n) = (rng.vec(p.wide(), -1.0, 1.0), rng.vec(p.narrow(), -1.0, 1.0));
    let (w64, n64) = (f64s(&wide), f64s(&narrow));
    // slice: x wide -> y narrow; backward dx (wide) += dy (narrow) in the block
    let mut y = vec![F::zero(); p.narrow()];
    Cpu.slice_cols_fwd(&p, &cast::<F>(&wide), &mut y).unwrap();
    tol.assert_close("slice_cols fwd", &y, &ref_slice(&w64, &p));
    let mut dx = cast::<F>(&g0w);
    Cpu.slice_cols_bwd(&p, &cast::<F>(&narrow), &mut dx).unwrap();
    let block = ref_concat(&n64, &vec![0.0; p.wide()], &p);
    tol.assert_close("slice_cols bwd", &dx, &plus(&g0w, &block));
    // concat: x narrow written into y wide (starting as g0w: other columns kept); backward dx += block of dy
    let mut y = cast::<F>(&g0w);
    Cpu.concat_cols_fwd(&p, &cast::<F>(&narrow), &mut y).unwrap();
    tol.assert_close("concat_cols fwd", &y, &ref_concat(&n64, &f64s(&g0w), &p));
    let mut dx = cast::<F>(&g0n);
    Cpu.concat_cols_bwd(&p, &cast::<F>(&wide), &mut dx).unwrap();
    tol.assert_close("concat_cols bwd", &dx, &plus(&g0n, &ref_slice(&w64, &p)));
}

#[test]
fn cpu_slice_and_concat_cols_match_reference() {
    // GPT-2's qkv split at a ragged hidden size: q, k, v; then a ragged block and a full-width one
    let h = 67;
    for p in [(37, 3 * h, 0, h), (37, 3 * h, h, h), (37, 3 * h, 2 * h, h), (5, 13, 4, 7), (3, 6, 0, 6)] {
        let p = ColsParams::new(p.0, p.1, p.2, p.3);
        cols_ops::<f32>(Tol::F32, p);
        cols_ops::<f64>(Tol::F64, p);
    }
}

fn pool<F: CpuFloat<Acc = F>>(tol: Tol, p: PoolParams) {
    let (batch, seq, hid) = (p.batch as usize, p.seq as usize, p.hidden as usize);
    let mut rng = Rng::new(5 + seq as u64);
    let m = mask(&mut rng, batch, seq);
    let (x, dy, g0) =
        (rng.vec(batch * seq * hid, -3.0, 3.0), rng.vec(batch * hid, -1.0, 1.0), rng.vec(batch * seq * hid, -1.0, 1.0));
    let mut y = vec![F::zero(); batch * hid];
    Cpu.sum_rows_masked_mean_fwd(&p, &cast::<F>(&x), &m, &mut y).unwrap();
    tol.assert_close("sum_rows_masked_mean fwd", &y, &ref_pool(&f64s(&x), &m, &p));
    let mut dx = cast::<F>(&g0);
    Cpu.sum_rows_masked_mean_bwd(&p, &m, &cast::<F>(&dy), &mut dx).unwrap();
    tol.assert_close("sum_rows_masked_mean bwd", &dx, &plus(&g0, &ref_pool_bwd(&m, &f64s(&dy), &p)));
}

#[test]
fn cpu_sum_rows_masked_mean_matches_reference() {
    for (b, s, h) in [(5, 13, 71), (2, 1, 3), (3, 0, 4)] {
        pool::<f32>(Tol::F32, PoolParams::new(b, s, h));
        pool::<f64>(Tol::F64, PoolParams::new(b, s, h));
    }
}

#[test]
fn shape_mismatches_name_the_tensor() {
    let msg = |e: crate::Error| e.to_string();
    let e = msg(Cpu.add_fwd(&[0.0f32; 3], &[0.0; 3], &mut [0.0; 4]).unwrap_err());
    assert!(e.contains("add") && e.contains("`y`"), "{e}");
    let e = msg(Cpu.mul_bwd(&[0.0f64; 3], &[0.0; 3], &[0.0; 3], &mut [0.0; 3], &mut [0.0; 2]).unwrap_err());
    assert!(e.contains("mul") && e.contains("`db`"), "{e}");
    let e = msg(Cpu.tanh_bwd(&[0.0f32; 3], &[0.0; 2], &mut [0.0; 3]).unwrap_err());
    assert!(e.contains("tanh") && e.contains("`dy`"), "{e}");
    let p = BiasParams::new(2, 3);
    let e = msg(Cpu.add_bias_fwd(&p, &[0.0f32; 6], &[0.0; 2], &mut [0.0; 6]).unwrap_err());
    assert!(e.contains("add_bias") && e.contains("`bias`"), "{e}");
    let e = msg(Cpu.add_bias_bwd(&p, &[0.0f32; 6], &mut [0.0; 6], &mut [0.0; 6]).unwrap_err());
    assert!(e.contains("`dbias`"), "{e}");
    let e = msg(Cpu.slice_cols_fwd(&ColsParams::new(2, 6, 4, 3), &[0.0f32; 12], &mut [0.0; 6]).unwrap_err());
    assert!(e.contains("slice_cols") && e.contains("outside"), "{e}");
    let e = msg(Cpu.concat_cols_fwd(&ColsParams::new(2, 6, 3, 3), &[0.0f32; 5], &mut [0.0; 12]).unwrap_err());
    assert!(e.contains("concat_cols") && e.contains("`x`"), "{e}");
    let p = PoolParams::new(2, 3, 4);
    let e = msg(Cpu.sum_rows_masked_mean_fwd(&p, &[0.0f32; 24], &[1u8; 5], &mut [0.0; 8]).unwrap_err());
    assert!(e.contains("sum_rows_masked_mean") && e.contains("`mask`"), "{e}");
}
