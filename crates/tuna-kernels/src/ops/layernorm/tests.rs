//! LayerNorm tests: f64 reference (proven by central differences), CPU against it, shape errors,
//! and CUDA against CPU for both row-kernel configurations, f32 and bf16.

use super::*;
use crate::backend::CpuFloat;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// f64 forward: `(y, mean, rstd)`.
fn ref_fwd(x: &[f64], gamma: &[f64], beta: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut mean, mut rstd) = (vec![0.0; x.len()], vec![], vec![]);
    for (r, row) in x.chunks(dim).enumerate() {
        let m = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / dim as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for i in 0..dim {
            y[r * dim + i] = (row[i] - m) * rs * gamma[i] + beta[i];
        }
        mean.push(m);
        rstd.push(rs);
    }
    (y, mean, rstd)
}

/// f64 gradients of `sum(y * dy)`: `(dx, dgamma, dbeta)`.
fn ref_bwd(x: &[f64], gamma: &[f64], dy: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (_, mean, rstd) = ref_fwd(x, gamma, &vec![0.0; dim], dim, eps);
    let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
    for r in 0..mean.len() {
        let s = r * dim;
        let xh: Vec<f64> = (0..dim).map(|i| (x[s + i] - mean[r]) * rstd[r]).collect();
        let g: Vec<f64> = (0..dim).map(|i| dy[s + i] * gamma[i]).collect();
        let mg = g.iter().sum::<f64>() / dim as f64;
        let mgx = (0..dim).map(|i| g[i] * xh[i]).sum::<f64>() / dim as f64;
        for i in 0..dim {
            dx[s + i] = rstd[r] * (g[i] - mg - xh[i] * mgx);
            dg[i] += dy[s + i] * xh[i];
            db[i] += dy[s + i];
        }
    }
    (dx, dg, db)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// Random inputs `(x, gamma, beta, dy)`; `x` has a per-row offset so the mean matters.
fn inputs(rng: &mut Rng, rows: usize, dim: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut x = rng.normal_vec(rows * dim, 1.5);
    for row in x.chunks_mut(dim) {
        let off = rng.uniform(-3.0, 3.0);
        row.iter_mut().for_each(|v| *v += off);
    }
    (x, rng.vec(dim, 0.5, 1.5), rng.vec(dim, -0.5, 0.5), rng.vec(rows * dim, -1.0, 1.0))
}

#[test]
fn reference_gradient_matches_central_differences() {
    let (rows, dim, eps) = (3, 7, 1e-5);
    let mut rng = Rng::new(11);
    let (x, g, b, dy) = inputs(&mut rng, rows, dim);
    let (x, g, b, dy) = (f64s(&x), f64s(&g), f64s(&b), f64s(&dy));
    let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
        ref_fwd(x, g, b, dim, eps).0.iter().zip(&dy).map(|(y, d)| y * d).sum()
    };
    let (dx, dg, db) = ref_bwd(&x, &g, &dy, dim, eps);
    let h = 1e-5;
    let fd = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
        let (mut p, mut m) = (v.to_vec(), v.to_vec());
        p[i] += h;
        m[i] -= h;
        (f(&p) - f(&m)) / (2.0 * h)
    };
    let fdx: Vec<f64> = (0..x.len()).map(|i| fd(&x, i, &|v| loss(v, &g, &b))).collect();
    let fdg: Vec<f64> = (0..dim).map(|i| fd(&g, i, &|v| loss(&x, v, &b))).collect();
    let fdb: Vec<f64> = (0..dim).map(|i| fd(&b, i, &|v| loss(&x, &g, v))).collect();
    Tol::GRAD_CHECK.assert_close("layernorm ref dx", &dx, &fdx);
    Tol::GRAD_CHECK.assert_close("layernorm ref dgamma", &dg, &fdg);
    Tol::GRAD_CHECK.assert_close("layernorm ref dbeta", &db, &fdb);
}

#[test]
fn cpu_matches_f64_reference() {
    let mut rng = Rng::new(12);
    for (rows, dim, eps) in [(37, 1, 1e-5), (19, 33, 1e-12), (64, 769, 1e-5), (7, 1024, 1e-12), (5, 2077, 1e-5)] {
        let p = LayerNormParams::new(rows, dim, eps);
        let (x, g, b, dy) = inputs(&mut rng, rows, dim);
        let (mut y, mut mean, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        Cpu.layernorm_fwd(&p, &x, &g, &b, &mut y, &mut mean, &mut rstd).unwrap();
        let (wy, wm, wr) = ref_fwd(&f64s(&x), &f64s(&g), &f64s(&b), dim, eps as f64);
        let what = format!("layernorm [{rows}, {dim}] eps {eps:e}");
        Tol::F32.assert_close(&format!("{what} y"), &y, &wy);
        Tol::F32.assert_close(&format!("{what} mean"), &mean, &wm);
        Tol::F32.assert_close(&format!("{what} rstd"), &rstd, &wr);

        // backward accumulates: start every gradient nonzero
        let (mut dx, mut dg, mut db) = (vec![0.25; rows * dim], vec![0.5; dim], vec![-0.5; dim]);
        Cpu.layernorm_bwd(&p, &x, &g, &mean, &rstd, &dy, &mut dx, Some(&mut dg), Some(&mut db)).unwrap();
        let (wdx, wdg, wdb) = ref_bwd(&f64s(&x), &f64s(&g), &f64s(&dy), dim, eps as f64);
        let plus = |w: Vec<f64>, c: f64| w.into_iter().map(|v| v + c).collect::<Vec<_>>();
        Tol::F32.assert_close(&format!("{what} dx"), &dx, &plus(wdx, 0.25));
        Tol::F32.assert_close(&format!("{what} dgamma"), &dg, &plus(wdg, 0.5));
        Tol::F32.assert_close(&format!("{what} dbeta"), &db, &plus(wdb, -0.5));
    }
}

/// The f64 kernel against the f64 reference: only summation order differs (the dgamma/dbeta
/// chunk partials), so it agrees to ~1e-12 and can serve f64 central-difference gradient checks.
#[test]
fn cpu_f64_matches_f64_reference() {
    let mut rng = Rng::new(14);
    for (rows, dim, eps) in [(37, 1, 1e-5), (19, 33, 1e-12), (64, 769, 1e-5), (7, 1024, 1e-12), (5, 2077, 1e-5)] {
        let p = LayerNormParams::new(rows, dim, eps);
        let (x, g, b, dy) = inputs(&mut rng, rows, dim);
        let (x, g, b, dy) = (f64s(&x), f64s(&g), f64s(&b), f64s(&dy));
        let (mut y, mut mean, mut rstd) = (vec![0.0f64; rows * dim], vec![0.0f64; rows], vec![0.0f64; rows]);
        Cpu.layernorm_fwd(&p, &x, &g, &b, &mut y, &mut mean, &mut rstd).unwrap();
        let (wy, wm, wr) = ref_fwd(&x, &g, &b, dim, eps as f64);
        let what = format!("layernorm f64 [{rows}, {dim}] eps {eps:e}");
        Tol::F64.assert_close(&format!("{what} y"), &y, &wy);
        Tol::F64.assert_close(&format!("{what} mean"), &mean, &wm);
        Tol::F64.assert_close(&format!("{what} rstd"), &rstd, &wr);

        let (mut dx, mut dg, mut db) = (vec![0.25f64; rows * dim], vec![0.5f64; dim], vec![-0.5f64; dim]);
        Cpu.layernorm_bwd(&p, &x, &g, &mean, &rstd, &dy, &mut dx, Some(&mut dg), Some(&mut db)).unwrap();
        let (wdx, wdg, wdb) = ref_bwd(&x, &g, &dy, dim, eps as f64);
        let plus = |w: Vec<f64>, c: f64| w.into_iter().map(|v| v + c).collect::<Vec<_>>();
        Tol::F64.assert_close(&format!("{what} dx"), &dx, &plus(wdx, 0.25));
        Tol::F64.assert_close(&format!("{what} dgamma"), &dg, &plus(wdg, 0.5));
        Tol::F64.assert_close(&format!("{what} dbeta"), &db, &plus(wdb, -0.5));
    }
}

/// Which parameter gradients a backward asks for: (dgamma, dbeta).
const SUBSETS: [(bool, bool); 4] = [(true, true), (false, false), (true, false), (false, true)];

/// Each subset of {dgamma, dbeta} in `F`: dx is bitwise the full call's (the frozen path runs
/// the same row arithmetic), the gradients asked for match the reference (accumulating), and
/// those not asked for are untouched.
fn cpu_subsets<F: CpuFloat<Acc = F>>(tol: Tol, seed: u64) {
    let mut rng = Rng::new(seed);
    let fv = |v: &[f32]| v.iter().map(|&a| F::c(a as f64)).collect::<Vec<F>>();
    for (rows, dim, eps) in [(37, 1, 1e-5), (64, 769, 1e-5), (5, 2077, 1e-12)] {
        let p = LayerNormParams::new(rows, dim, eps);
        let (x, g, b, dy) = inputs(&mut rng, rows, dim);
        let (x, g, b, dy) = (fv(&x), fv(&g), fv(&b), fv(&dy));
        let (mut y, mut mean, mut rstd) = (fv(&vec![0.0; rows * dim]), fv(&vec![0.0; rows]), fv(&vec![0.0; rows]));
        Cpu.layernorm_fwd(&p, &x, &g, &b, &mut y, &mut mean, &mut rstd).unwrap();
        let w = |v: &[F]| v.iter().map(|&a| a.into()).collect::<Vec<f64>>();
        let (_, wdg, wdb) = ref_bwd(&w(&x), &w(&g), &w(&dy), dim, eps as f64);
        let mut full_dx = None;
        for (want_g, want_b) in SUBSETS {
            let (mut dx, mut dg, mut db) = (fv(&vec![0.25; rows * dim]), fv(&vec![0.5; dim]), fv(&vec![-0.5; dim]));
            let (og, ob) = (want_g.then_some(&mut dg[..]), want_b.then_some(&mut db[..]));
            Cpu.layernorm_bwd(&p, &x, &g, &mean, &rstd, &dy, &mut dx, og, ob).unwrap();
            let what = format!("layernorm {} [{rows}, {dim}] dgamma {want_g} dbeta {want_b}", F::NAME);
            let dx = w(&dx);
            assert!(full_dx.get_or_insert_with(|| dx.clone()) == &dx, "{what}: dx differs from the full call");
            let expect = |on: bool, r: &[f64], c: f64| r.iter().map(|v| if on { v + c } else { c }).collect::<Vec<_>>();
            tol.assert_close(&format!("{what} dgamma"), &w(&dg), &expect(want_g, &wdg, 0.5));
            tol.assert_close(&format!("{what} dbeta"), &w(&db), &expect(want_b, &wdb, -0.5));
        }
    }
}

#[test]
fn cpu_optional_param_grads() {
    cpu_subsets::<f32>(Tol::F32, 15);
    cpu_subsets::<f64>(Tol::F64, 16);
}

#[test]
fn shape_mismatch_is_an_error() {
    let p = LayerNormParams::new(2, 3, 1e-5);
    let (x, mut y, mut m, mut r) = (vec![0.0f32; 6], vec![0.0; 6], vec![0.0; 2], vec![0.0; 2]);
    let e = Cpu.layernorm_fwd(&p, &x, &[1.0; 4], &[0.0; 3], &mut y, &mut m, &mut r).unwrap_err();
    assert!(e.to_string().contains("layernorm") && e.to_string().contains("`gamma`"), "{e}");
    let e = Cpu.layernorm_fwd(&p, &x, &[1.0; 3], &[0.0; 3], &mut y, &mut m, &mut [0.0; 3]).unwrap_err();
    assert!(e.to_string().contains("`rstd`"), "{e}");
    let (mut dx, mut dg) = (vec![0.0; 6], vec![0.0; 3]);
    let e = Cpu.layernorm_bwd(&p, &x, &[1.0; 3], &m, &r, &x, &mut dx, Some(&mut dg), Some(&mut [0.0; 2])).unwrap_err();
    assert!(e.to_string().contains("`dbeta`"), "{e}");
    let e = Cpu.layernorm_bwd(&p, &x, &[1.0; 3], &m, &r, &x, &mut dx, None, Some(&mut [0.0; 2])).unwrap_err();
    assert!(e.to_string().contains("`dbeta`"), "{e}");
    let e = Cpu.layernorm_bwd(&p, &x, &[1.0; 3], &m, &r, &x, &mut dx, Some(&mut [0.0; 4]), None).unwrap_err();
    assert!(e.to_string().contains("`dgamma`"), "{e}");
    let bad = LayerNormParams::new(2, 0, 1e-5);
    let e = LayerNormKernel::<f32>::layernorm_fwd(&Cpu, &bad, &[], &[], &[], &mut [], &mut m, &mut r).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

/// Everything one forward + backward produces, widened to f32.
struct Outs {
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    dx: Vec<f32>,
    dg: Vec<f32>,
    db: Vec<f32>,
}

/// `want`: which of (dgamma, dbeta) the backward asks for; the others keep their start values.
fn run_cuda<E: CudaElem>(
    dev: &Cuda,
    p: &LayerNormParams,
    want: (bool, bool),
    x: &[f32],
    g: &[f32],
    b: &[f32],
    dy: &[f32],
) -> Outs
where
    Cuda: LayerNormKernel<E>,
{
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
    let down = |d: &crate::cuda::CudaBuf<E>| dev.download(d).unwrap().iter().map(|v| v.to_f32()).collect();
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let (xd, gd, bd, dyd) = (up(x), up(g), up(b), up(dy));
    let (mut yd, mut md, mut rd) =
        (dev.zeros::<E>(rows * dim).unwrap(), dev.zeros(rows).unwrap(), dev.zeros(rows).unwrap());
    dev.layernorm_fwd(p, &xd, &gd, &bd, &mut yd, &mut md, &mut rd).unwrap();
    let mut dxd = up(&vec![0.25; rows * dim]);
    let (mut dgd, mut dbd) = (dev.upload(&vec![0.5f32; dim]).unwrap(), dev.upload(&vec![-0.5f32; dim]).unwrap());
    dev.layernorm_bwd(p, &xd, &gd, &md, &rd, &dyd, &mut dxd, want.0.then_some(&mut dgd), want.1.then_some(&mut dbd))
        .unwrap();
    Outs {
        y: down(&yd),
        mean: dev.download(&md).unwrap(),
        rstd: dev.download(&rd).unwrap(),
        dx: down(&dxd),
        dg: dev.download(&dgd).unwrap(),
        db: dev.download(&dbd).unwrap(),
    }
}

fn run_cpu(p: &LayerNormParams, want: (bool, bool), x: &[f32], g: &[f32], b: &[f32], dy: &[f32]) -> Outs {
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let (mut y, mut mean, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
    Cpu.layernorm_fwd(p, x, g, b, &mut y, &mut mean, &mut rstd).unwrap();
    let (mut dx, mut dg, mut db) = (vec![0.25; rows * dim], vec![0.5; dim], vec![-0.5; dim]);
    let (og, ob) = (want.0.then_some(&mut dg[..]), want.1.then_some(&mut db[..]));
    Cpu.layernorm_bwd(p, x, g, &mean, &rstd, dy, &mut dx, og, ob).unwrap();
    Outs { y, mean, rstd, dx, dg, db }
}

fn compare(what: &str, act: Tol, params: Tol, got: &Outs, want: &Outs) {
    act.assert_close(&format!("{what} y"), &got.y, &want.y);
    Tol::CUDA_F32.assert_close(&format!("{what} mean"), &got.mean, &want.mean);
    Tol::CUDA_F32.assert_close(&format!("{what} rstd"), &got.rstd, &want.rstd);
    act.assert_close(&format!("{what} dx"), &got.dx, &want.dx);
    params.assert_close(&format!("{what} dgamma"), &got.dg, &want.dg);
    params.assert_close(&format!("{what} dbeta"), &got.db, &want.db);
}

/// CUDA against CPU, f32 and bf16, for every subset of parameter gradients, at each `(rows, dim, eps)`.
fn cuda_cases(test: &str, seed: u64, cases: &[(usize, usize, f32)]) {
    let Some(dev) = cuda_or_skip(test) else { return };
    let mut rng = Rng::new(seed);
    for &(rows, dim, eps) in cases {
        let p = LayerNormParams::new(rows, dim, eps);
        // Sums over 33k rows in a different order: f32 rounding of sums of magnitude ~200.
        let params = if rows > 10_000 { Tol::new("cuda-f32 33k-row sums", 2e-3, 1e-3) } else { Tol::CUDA_F32 };
        let (x, g, b, dy) = inputs(&mut rng, rows, dim);
        let (xb, gb, bb, dyb) = (round_bf16(&x), round_bf16(&g), round_bf16(&b), round_bf16(&dy));
        // every subset of parameter gradients, including none (frozen gamma and beta)
        for want in SUBSETS {
            let what = format!("layernorm cuda [{rows}, {dim}] grads {want:?}");
            let cpu = run_cpu(&p, want, &x, &g, &b, &dy);
            let got = run_cuda::<f32>(&dev, &p, want, &x, &g, &b, &dy);
            compare(&format!("{what} f32"), Tol::CUDA_F32, params, &got, &cpu);
            let cpu = run_cpu(&p, want, &xb, &gb, &bb, &dyb);
            let got = run_cuda::<bf16>(&dev, &p, want, &xb, &gb, &bb, &dyb);
            compare(&format!("{what} bf16"), Tol::CUDA_BF16, params, &got, &cpu);
        }
    }
}

/// The warp-per-row kernels (dim <= 1024), with rows that leave a partial last block of 8 rows
/// and a partial last chunk of parameter-gradient partials; 33001 rows make the partials use
/// 33-row chunks (1001 of them) instead of 32.
#[test]
fn cuda_warp_per_row_matches_cpu() {
    let cases = [(37, 1, 1e-5), (300, 33, 1e-12), (61, 769, 1e-5), (9, 1024, 1e-5), (33001, 5, 1e-5)];
    cuda_cases("layernorm::cuda_warp_per_row_matches_cpu", 13, &cases);
}

/// The block-per-row kernels (dim > 1024).
#[test]
fn cuda_block_per_row_matches_cpu() {
    cuda_cases(
        "layernorm::cuda_block_per_row_matches_cpu",
        113,
        &[(13, 1025, 1e-12), (70, 2077, 1e-5), (3, 4096, 1e-5)],
    );
}

// ---- add + layernorm ----------------------------------------------------------------------------

/// The fused pass's outputs `(h, y, mean, rstd)` on the CPU, or those of `add_fwd` then
/// `layernorm_fwd` (`fused` false).
fn cpu_add_norm<F: CpuFloat<Acc = F>>(
    p: &LayerNormParams,
    fused: bool,
    x: &[F],
    r: &[F],
    g: &[F],
    b: &[F],
) -> [Vec<F>; 4] {
    use crate::ops::elementwise::ElementwiseKernel;
    let (n, rows) = (x.len(), p.rows as usize);
    let (mut h, mut y, mut mean, mut rstd) =
        (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); rows], vec![F::zero(); rows]);
    if fused {
        Cpu.add_layernorm_fwd(p, x, r, g, b, &mut h, &mut y, &mut mean, &mut rstd).unwrap();
    } else {
        Cpu.add_fwd(x, r, &mut h).unwrap();
        Cpu.layernorm_fwd(p, &h, g, b, &mut y, &mut mean, &mut rstd).unwrap();
    }
    [h, y, mean, rstd]
}

/// The fused add + layernorm gives the bits of the two ops it replaces, f32 and f64, at the
/// shapes of the row tests (one element, odd dims, above 1024).
#[test]
fn cpu_add_layernorm_is_bitwise_add_then_layernorm() {
    fn run<F: CpuFloat<Acc = F>>(seed: u64) {
        let mut rng = Rng::new(seed);
        let fv = |v: &[f32]| v.iter().map(|&a| F::c(a as f64)).collect::<Vec<F>>();
        for (rows, dim, eps) in [(37, 1, 1e-5), (19, 33, 1e-12), (64, 769, 1e-5), (5, 2077, 1e-5)] {
            let p = LayerNormParams::new(rows, dim, eps);
            let (x, g, b, r) = inputs(&mut rng, rows, dim);
            let (x, g, b, r) = (fv(&x), fv(&g), fv(&b), fv(&r));
            let fused = cpu_add_norm(&p, true, &x, &r, &g, &b);
            let pair = cpu_add_norm(&p, false, &x, &r, &g, &b);
            for (name, f, u) in
                ["h", "y", "mean", "rstd"].into_iter().zip(&fused).zip(&pair).map(|((n, f), u)| (n, f, u))
            {
                let bits = |v: &[F]| v.iter().map(|&a| Into::<f64>::into(a).to_bits()).collect::<Vec<u64>>();
                assert!(
                    bits(f) == bits(u),
                    "add_layernorm {} [{rows}, {dim}] {name}: not the bits of add then layernorm",
                    F::NAME
                );
            }
        }
    }
    run::<f32>(21);
    run::<f64>(22);
}

#[test]
fn add_layernorm_names_a_mismatched_buffer() {
    let p = LayerNormParams::new(2, 3, 1e-5);
    let (x, g, b) = (vec![0.0f32; 6], vec![1.0f32; 3], vec![0.0f32; 3]);
    let (mut h, mut y, mut m, mut s) = (vec![0.0f32; 6], vec![0.0f32; 6], vec![0.0f32; 2], vec![0.0f32; 2]);
    let e = Cpu.add_layernorm_fwd(&p, &x, &[0.0; 5], &g, &b, &mut h, &mut y, &mut m, &mut s).unwrap_err();
    assert!(e.to_string().contains("layernorm") && e.to_string().contains("`r`"), "{e}");
    let e = Cpu.add_layernorm_fwd(&p, &x, &x, &g, &b, &mut [0.0; 7], &mut y, &mut m, &mut s).unwrap_err();
    assert!(e.to_string().contains("`h`"), "{e}");
}

/// CUDA's fused kernel (warp- and block-per-row, f32 and bf16) against the two CUDA kernels it
/// replaces, bit for bit, and against the CPU within the norm's tolerance.
#[test]
fn cuda_add_layernorm_is_bitwise_add_then_layernorm() {
    use crate::ops::elementwise::ElementwiseKernel;
    let test = "layernorm::cuda_add_layernorm_is_bitwise_add_then_layernorm";
    let Some(dev) = cuda_or_skip(test) else { return };
    fn run<E: CudaElem>(dev: &Cuda, p: &LayerNormParams, v: [&[f32]; 4], fused: bool) -> [Vec<f32>; 4]
    where
        Cuda: LayerNormKernel<E> + ElementwiseKernel<E>,
    {
        let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
        let down = |d: &crate::cuda::CudaBuf<E>| dev.download(d).unwrap().iter().map(|v| v.to_f32()).collect();
        let (n, rows) = (p.elems(), p.rows as usize);
        let [x, r, g, b] = v.map(up);
        // unfilled (NaN on the emulated device): an element or row statistic left unwritten shows
        let (mut h, mut y) = (dev.unfilled::<E>(n).unwrap(), dev.unfilled::<E>(n).unwrap());
        let (mut m, mut s) = (dev.unfilled::<f32>(rows).unwrap(), dev.unfilled::<f32>(rows).unwrap());
        if fused {
            dev.add_layernorm_fwd(p, &x, &r, &g, &b, &mut h, &mut y, &mut m, &mut s).unwrap();
        } else {
            dev.add_fwd(&x, &r, &mut h).unwrap();
            dev.layernorm_fwd(p, &h, &g, &b, &mut y, &mut m, &mut s).unwrap();
        }
        [down(&h), down(&y), dev.download(&m).unwrap(), dev.download(&s).unwrap()]
    }
    let mut rng = Rng::new(23);
    for (rows, dim, eps) in [(37, 1, 1e-5), (300, 33, 1e-12), (61, 769, 1e-5), (13, 1025, 1e-12), (3, 2077, 1e-5)] {
        let p = LayerNormParams::new(rows, dim, eps);
        let (x, g, b, r) = inputs(&mut rng, rows, dim);
        let cpu = cpu_add_norm(&p, true, &x, &r, &g, &b);
        for bf in [false, true] {
            let v = if bf {
                [round_bf16(&x), round_bf16(&r), round_bf16(&g), round_bf16(&b)]
            } else {
                [x.clone(), r.clone(), g.clone(), b.clone()]
            };
            let v = [&v[0][..], &v[1], &v[2], &v[3]];
            let (fused, pair) = if bf {
                (run::<bf16>(&dev, &p, v, true), run::<bf16>(&dev, &p, v, false))
            } else {
                (run::<f32>(&dev, &p, v, true), run::<f32>(&dev, &p, v, false))
            };
            let what = format!("add_layernorm cuda [{rows}, {dim}] {}", if bf { "bf16" } else { "f32" });
            for (name, (f, u)) in ["h", "y", "mean", "rstd"].into_iter().zip(fused.iter().zip(&pair)) {
                let (fb, ub): (Vec<u32>, Vec<u32>) =
                    (f.iter().map(|v| v.to_bits()).collect(), u.iter().map(|v| v.to_bits()).collect());
                assert!(fb == ub, "{what} {name}: not the bits of add_fwd then layernorm_fwd");
            }
            if !bf {
                Tol::CUDA_F32.assert_close(&format!("{what} y vs cpu"), &fused[1], &cpu[1]);
            }
        }
    }
}

/// `lane_sum` against its definition written out: element `i` into lane `i % 16` in order, then
/// the lanes folded pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1), bit for bit, at lengths around the lane
/// count; and it is the sum within rounding.
#[test]
fn lane_sum_is_its_fixed_order() {
    use super::lane_sum;
    let mut rng = Rng::new(24);
    for n in [0usize, 1, 2, 15, 16, 17, 31, 33, 100, 384] {
        let (a, b) = (rng.vec(n, -2.0, 2.0), rng.vec(n, -2.0, 2.0));
        let mut lanes = [0f32; 16];
        for i in 0..n {
            lanes[i % 16] += a[i] * b[i];
        }
        let mut w = 16;
        while w > 1 {
            w /= 2;
            for j in 0..w {
                lanes[j] += lanes[j + w];
            }
        }
        let got = lane_sum(&a, &b, &a, |x, y, _| x * y);
        assert_eq!(got.to_bits(), lanes[0].to_bits(), "n = {n}");
        let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!(
            (got as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()) * n.max(1) as f64,
            "n = {n}: {got} vs {exact}"
        );
    }
}
