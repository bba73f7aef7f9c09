//! RMSNorm tests: f64 reference (proven by central differences), CPU against it, shape errors,
//! and CUDA against CPU for both row-kernel configurations, f32 and bf16.

use super::*;
use crate::backend::CpuFloat;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// f64 forward: `(y, rstd)`.
fn ref_fwd(x: &[f64], gamma: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut rstd) = (vec![0.0; x.len()], vec![]);
    for (r, row) in x.chunks(dim).enumerate() {
        let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        for i in 0..dim {
            y[r * dim + i] = row[i] * rs * gamma[i];
        }
        rstd.push(rs);
    }
    (y, rstd)
}

/// f64 gradients of `sum(y * dy)`: `(dx, dgamma)`.
fn ref_bwd(x: &[f64], gamma: &[f64], dy: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (_, rstd) = ref_fwd(x, gamma, dim, eps);
    let (mut dx, mut dg) = (vec![0.0; x.len()], vec![0.0; dim]);
    for (r, &rs) in rstd.iter().enumerate() {
        let s = r * dim;
        let mgx = (0..dim).map(|i| dy[s + i] * gamma[i] * x[s + i] * rs).sum::<f64>() / dim as f64;
        for i in 0..dim {
            let xh = x[s + i] * rs;
            dx[s + i] = rs * (dy[s + i] * gamma[i] - xh * mgx);
            dg[i] += dy[s + i] * xh;
        }
    }
    (dx, dg)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// Random inputs `(x, gamma, dy)`.
fn inputs(rng: &mut Rng, rows: usize, dim: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut x = rng.normal_vec(rows * dim, 1.0);
    for row in x.chunks_mut(dim) {
        let off = rng.uniform(-1.0, 1.0);
        row.iter_mut().for_each(|v| *v += off);
    }
    (x, rng.vec(dim, 0.5, 1.5), rng.vec(rows * dim, -1.0, 1.0))
}

#[test]
fn reference_gradient_matches_central_differences() {
    let (rows, dim, eps) = (3, 7, 1e-6);
    let mut rng = Rng::new(21);
    let (x, g, dy) = inputs(&mut rng, rows, dim);
    let (x, g, dy) = (f64s(&x), f64s(&g), f64s(&dy));
    let loss = |x: &[f64], g: &[f64]| -> f64 { ref_fwd(x, g, dim, eps).0.iter().zip(&dy).map(|(y, d)| y * d).sum() };
    let (dx, dg) = ref_bwd(&x, &g, &dy, dim, eps);
    let h = 1e-5;
    let fd = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
        let (mut p, mut m) = (v.to_vec(), v.to_vec());
        p[i] += h;
        m[i] -= h;
        (f(&p) - f(&m)) / (2.0 * h)
    };
    let fdx: Vec<f64> = (0..x.len()).map(|i| fd(&x, i, &|v| loss(v, &g))).collect();
    let fdg: Vec<f64> = (0..dim).map(|i| fd(&g, i, &|v| loss(&x, v))).collect();
    Tol::GRAD_CHECK.assert_close("rmsnorm ref dx", &dx, &fdx);
    Tol::GRAD_CHECK.assert_close("rmsnorm ref dgamma", &dg, &fdg);
}

#[test]
fn cpu_matches_f64_reference() {
    let mut rng = Rng::new(22);
    for (rows, dim, eps) in [(37, 1, 1e-5), (19, 33, 1e-6), (64, 769, 1e-5), (7, 1024, 1e-6), (5, 2077, 1e-5)] {
        let p = RmsNormParams::new(rows, dim, eps);
        let (x, g, dy) = inputs(&mut rng, rows, dim);
        let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        Cpu.rmsnorm_fwd(&p, &x, &g, &mut y, &mut rstd).unwrap();
        let (wy, wr) = ref_fwd(&f64s(&x), &f64s(&g), dim, eps as f64);
        let what = format!("rmsnorm [{rows}, {dim}] eps {eps:e}");
        Tol::F32.assert_close(&format!("{what} y"), &y, &wy);
        Tol::F32.assert_close(&format!("{what} rstd"), &rstd, &wr);

        // backward accumulates: start every gradient nonzero
        let (mut dx, mut dg) = (vec![0.25; rows * dim], vec![0.5; dim]);
        Cpu.rmsnorm_bwd(&p, &x, &g, &rstd, &dy, &mut dx, Some(&mut dg)).unwrap();
        let (wdx, wdg) = ref_bwd(&f64s(&x), &f64s(&g), &f64s(&dy), dim, eps as f64);
        let plus = |w: Vec<f64>, c: f64| w.into_iter().map(|v| v + c).collect::<Vec<_>>();
        Tol::F32.assert_close(&format!("{what} dx"), &dx, &plus(wdx, 0.25));
        Tol::F32.assert_close(&format!("{what} dgamma"), &dg, &plus(wdg, 0.5));
    }
}

/// The f64 kernel against the f64 reference: only summation order differs (the dgamma chunk
/// partials), so it agrees to ~1e-12 and can serve f64 central-difference gradient checks.
#[test]
fn cpu_f64_matches_f64_reference() {
    let mut rng = Rng::new(24);
    for (rows, dim, eps) in [(37, 1, 1e-5), (19, 33, 1e-6), (64, 769, 1e-5), (7, 1024, 1e-6), (5, 2077, 1e-5)] {
        let p = RmsNormParams::new(rows, dim, eps);
        let (x, g, dy) = inputs(&mut rng, rows, dim);
        let (x, g, dy) = (f64s(&x), f64s(&g), f64s(&dy));
        let (mut y, mut rstd) = (vec![0.0f64; rows * dim], vec![0.0f64; rows]);
        Cpu.rmsnorm_fwd(&p, &x, &g, &mut y, &mut rstd).unwrap();
        let (wy, wr) = ref_fwd(&x, &g, dim, eps as f64);
        let what = format!("rmsnorm f64 [{rows}, {dim}] eps {eps:e}");
        Tol::F64.assert_close(&format!("{what} y"), &y, &wy);
        Tol::F64.assert_close(&format!("{what} rstd"), &rstd, &wr);

        let (mut dx, mut dg) = (vec![0.25f64; rows * dim], vec![0.5f64; dim]);
        Cpu.rmsnorm_bwd(&p, &x, &g, &rstd, &dy, &mut dx, Some(&mut dg)).unwrap();
        let (wdx, wdg) = ref_bwd(&x, &g, &dy, dim, eps as f64);
        let plus = |w: Vec<f64>, c: f64| w.into_iter().map(|v| v + c).collect::<Vec<_>>();
        Tol::F64.assert_close(&format!("{what} dx"), &dx, &plus(wdx, 0.25));
        Tol::F64.assert_close(&format!("{what} dgamma"), &dg, &plus(wdg, 0.5));
    }
}

/// A frozen gamma in `F`: dx is bitwise the full call's (the frozen path runs the same row
/// arithmetic) and `dgamma` is untouched, with or without it asked for.
fn cpu_frozen_gamma<F: CpuFloat<Acc = F>>(tol: Tol, seed: u64) {
    let mut rng = Rng::new(seed);
    let fv = |v: &[f32]| v.iter().map(|&a| F::c(a as f64)).collect::<Vec<F>>();
    let w = |v: &[F]| v.iter().map(|&a| a.into()).collect::<Vec<f64>>();
    for (rows, dim, eps) in [(37, 1, 1e-5), (64, 769, 1e-5), (5, 2077, 1e-6)] {
        let p = RmsNormParams::new(rows, dim, eps);
        let (x, g, dy) = inputs(&mut rng, rows, dim);
        let (x, g, dy) = (fv(&x), fv(&g), fv(&dy));
        let (mut y, mut rstd) = (fv(&vec![0.0; rows * dim]), fv(&vec![0.0; rows]));
        Cpu.rmsnorm_fwd(&p, &x, &g, &mut y, &mut rstd).unwrap();
        let (wdx, _) = ref_bwd(&w(&x), &w(&g), &w(&dy), dim, eps as f64);
        let what = format!("rmsnorm {} [{rows}, {dim}] frozen gamma", F::NAME);
        let (mut full_dx, mut dg) = (fv(&vec![0.25; rows * dim]), fv(&vec![0.5; dim]));
        Cpu.rmsnorm_bwd(&p, &x, &g, &rstd, &dy, &mut full_dx, Some(&mut dg)).unwrap();
        let mut dx = fv(&vec![0.25; rows * dim]);
        Cpu.rmsnorm_bwd(&p, &x, &g, &rstd, &dy, &mut dx, None).unwrap();
        assert!(w(&dx) == w(&full_dx), "{what}: dx differs from the full call");
        tol.assert_close(&format!("{what} dx"), &w(&dx), &wdx.iter().map(|v| v + 0.25).collect::<Vec<_>>());
    }
}

#[test]
fn cpu_frozen_gamma_computes_dx_only() {
    cpu_frozen_gamma::<f32>(Tol::F32, 25);
    cpu_frozen_gamma::<f64>(Tol::F64, 26);
}

#[test]
fn shape_mismatch_is_an_error() {
    let p = RmsNormParams::new(2, 3, 1e-5);
    let (x, mut y, mut r) = (vec![0.0f32; 6], vec![0.0; 6], vec![0.0; 2]);
    let e = Cpu.rmsnorm_fwd(&p, &x, &[1.0; 4], &mut y, &mut r).unwrap_err();
    assert!(e.to_string().contains("rmsnorm") && e.to_string().contains("`gamma`"), "{e}");
    let e = Cpu.rmsnorm_fwd(&p, &x, &[1.0; 3], &mut y, &mut [0.0; 3]).unwrap_err();
    assert!(e.to_string().contains("`rstd`"), "{e}");
    let e = Cpu.rmsnorm_bwd(&p, &x, &[1.0; 3], &r, &x, &mut [0.0; 5], Some(&mut [0.0; 3])).unwrap_err();
    assert!(e.to_string().contains("`dx`"), "{e}");
    let e = Cpu.rmsnorm_bwd(&p, &x, &[1.0; 3], &r, &x, &mut [0.0; 5], None).unwrap_err();
    assert!(e.to_string().contains("`dx`"), "{e}");
    let e = Cpu.rmsnorm_bwd(&p, &x, &[1.0; 3], &r, &x, &mut [0.0; 6], Some(&mut [0.0; 4])).unwrap_err();
    assert!(e.to_string().contains("`dgamma`"), "{e}");
    let bad = RmsNormParams::new(2, 0, 1e-5);
    let e = RmsNormKernel::<f32>::rmsnorm_fwd(&Cpu, &bad, &[], &[], &mut [], &mut r).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

/// Everything one forward + backward produces, widened to f32: `(y, rstd, dx, dgamma)`.
type Outs = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// `want_dg`: whether the backward asks for dgamma (if not, it keeps its start value).
fn run_cuda<E: CudaElem>(dev: &Cuda, p: &RmsNormParams, want_dg: bool, x: &[f32], g: &[f32], dy: &[f32]) -> Outs
where
    Cuda: RmsNormKernel<E>,
{
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
    let down = |d: &crate::cuda::CudaBuf<E>| dev.download(d).unwrap().iter().map(|v| v.to_f32()).collect();
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let (xd, gd, dyd) = (up(x), up(g), up(dy));
    let (mut yd, mut rd) = (dev.zeros::<E>(rows * dim).unwrap(), dev.zeros(rows).unwrap());
    dev.rmsnorm_fwd(p, &xd, &gd, &mut yd, &mut rd).unwrap();
    let (mut dxd, mut dgd) = (up(&vec![0.25; rows * dim]), dev.upload(&vec![0.5f32; dim]).unwrap());
    dev.rmsnorm_bwd(p, &xd, &gd, &rd, &dyd, &mut dxd, want_dg.then_some(&mut dgd)).unwrap();
    (down(&yd), dev.download(&rd).unwrap(), down(&dxd), dev.download(&dgd).unwrap())
}

fn run_cpu(p: &RmsNormParams, want_dg: bool, x: &[f32], g: &[f32], dy: &[f32]) -> Outs {
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
    Cpu.rmsnorm_fwd(p, x, g, &mut y, &mut rstd).unwrap();
    let (mut dx, mut dg) = (vec![0.25; rows * dim], vec![0.5; dim]);
    Cpu.rmsnorm_bwd(p, x, g, &rstd, dy, &mut dx, want_dg.then_some(&mut dg[..])).unwrap();
    (y, rstd, dx, dg)
}

fn compare(what: &str, act: Tol, params: Tol, got: &Outs, want: &Outs) {
    act.assert_close(&format!("{what} y"), &got.0, &want.0);
    Tol::CUDA_F32.assert_close(&format!("{what} rstd"), &got.1, &want.1);
    act.assert_close(&format!("{what} dx"), &got.2, &want.2);
    params.assert_close(&format!("{what} dgamma"), &got.3, &want.3);
}

/// CUDA against CPU, f32 and bf16, with and without dgamma, at each `(rows, dim, eps)`.
fn cuda_cases(test: &str, seed: u64, cases: &[(usize, usize, f32)]) {
    let Some(dev) = cuda_or_skip(test) else { return };
    let mut rng = Rng::new(seed);
    for &(rows, dim, eps) in cases {
        let p = RmsNormParams::new(rows, dim, eps);
        // Sums over 33k rows in a different order: f32 rounding of sums of magnitude ~200.
        let params = if rows > 10_000 { Tol::new("cuda-f32 33k-row sums", 2e-3, 1e-3) } else { Tol::CUDA_F32 };
        let (x, g, dy) = inputs(&mut rng, rows, dim);
        let (xb, gb, dyb) = (round_bf16(&x), round_bf16(&g), round_bf16(&dy));
        // with dgamma, and with a frozen gamma (no partials or reduction launched)
        for want_dg in [true, false] {
            let what = format!("rmsnorm cuda [{rows}, {dim}] dgamma {want_dg}");
            let cpu = run_cpu(&p, want_dg, &x, &g, &dy);
            compare(
                &format!("{what} f32"),
                Tol::CUDA_F32,
                params,
                &run_cuda::<f32>(&dev, &p, want_dg, &x, &g, &dy),
                &cpu,
            );
            let cpu = run_cpu(&p, want_dg, &xb, &gb, &dyb);
            let got = run_cuda::<bf16>(&dev, &p, want_dg, &xb, &gb, &dyb);
            compare(&format!("{what} bf16"), Tol::CUDA_BF16, params, &got, &cpu);
        }
    }
}

/// The warp-per-row kernels (dim <= 1024), with rows that leave a partial last block of 8 rows
/// and a partial last chunk of parameter-gradient partials; 33001 rows make the partials use
/// 33-row chunks (1001 of them) instead of 32.
#[test]
fn cuda_warp_per_row_matches_cpu() {
    let cases = [(37, 1, 1e-5), (300, 33, 1e-6), (61, 576, 1e-5), (9, 1024, 1e-5), (33001, 5, 1e-5)];
    cuda_cases("rmsnorm::cuda_warp_per_row_matches_cpu", 23, &cases);
}

/// The block-per-row kernels (dim > 1024).
#[test]
fn cuda_block_per_row_matches_cpu() {
    cuda_cases("rmsnorm::cuda_block_per_row_matches_cpu", 123, &[(13, 1025, 1e-6), (70, 2077, 1e-5), (3, 4096, 1e-5)]);
}

// ---- add + rmsnorm ------------------------------------------------------------------------------

/// The fused pass's outputs `(h, y, rstd)` on the CPU, or those of `add_fwd` then `rmsnorm_fwd`
/// (`fused` false).
fn cpu_add_norm<F: CpuFloat<Acc = F>>(p: &RmsNormParams, fused: bool, x: &[F], r: &[F], g: &[F]) -> [Vec<F>; 3] {
    use crate::ops::elementwise::ElementwiseKernel;
    let (n, rows) = (x.len(), p.rows as usize);
    let (mut h, mut y, mut rstd) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); rows]);
    if fused {
        Cpu.add_rmsnorm_fwd(p, x, r, g, &mut h, &mut y, &mut rstd).unwrap();
    } else {
        Cpu.add_fwd(x, r, &mut h).unwrap();
        Cpu.rmsnorm_fwd(p, &h, g, &mut y, &mut rstd).unwrap();
    }
    [h, y, rstd]
}

/// The fused add + rmsnorm gives the bits of the two ops it replaces, f32 and f64.
#[test]
fn cpu_add_rmsnorm_is_bitwise_add_then_rmsnorm() {
    fn run<F: CpuFloat<Acc = F>>(seed: u64) {
        let mut rng = Rng::new(seed);
        let fv = |v: &[f32]| v.iter().map(|&a| F::c(a as f64)).collect::<Vec<F>>();
        for (rows, dim, eps) in [(37, 1, 1e-5), (19, 33, 1e-6), (64, 769, 1e-5), (5, 2077, 1e-6)] {
            let p = RmsNormParams::new(rows, dim, eps);
            let (x, g, r) = inputs(&mut rng, rows, dim);
            let (x, g, r) = (fv(&x), fv(&g), fv(&r));
            let (fused, pair) = (cpu_add_norm(&p, true, &x, &r, &g), cpu_add_norm(&p, false, &x, &r, &g));
            for (name, (f, u)) in ["h", "y", "rstd"].into_iter().zip(fused.iter().zip(&pair)) {
                let bits = |v: &[F]| v.iter().map(|&a| Into::<f64>::into(a).to_bits()).collect::<Vec<u64>>();
                assert!(
                    bits(f) == bits(u),
                    "add_rmsnorm {} [{rows}, {dim}] {name}: not the bits of add then rmsnorm",
                    F::NAME
                );
            }
        }
    }
    run::<f32>(31);
    run::<f64>(32);
}

#[test]
fn add_rmsnorm_names_a_mismatched_buffer() {
    let p = RmsNormParams::new(2, 3, 1e-5);
    let (x, g) = (vec![0.0f32; 6], vec![1.0f32; 3]);
    let (mut h, mut y, mut s) = (vec![0.0f32; 6], vec![0.0f32; 6], vec![0.0f32; 2]);
    let e = Cpu.add_rmsnorm_fwd(&p, &x, &[0.0; 5], &g, &mut h, &mut y, &mut s).unwrap_err();
    assert!(e.to_string().contains("rmsnorm") && e.to_string().contains("`r`"), "{e}");
    let e = Cpu.add_rmsnorm_fwd(&p, &x, &x, &g, &mut [0.0; 7], &mut y, &mut s).unwrap_err();
    assert!(e.to_string().contains("`h`"), "{e}");
}

/// CUDA's fused kernel (warp- and block-per-row, f32 and bf16) against the two CUDA kernels it
/// replaces, bit for bit, and against the CPU within the norm's tolerance.
#[test]
fn cuda_add_rmsnorm_is_bitwise_add_then_rmsnorm() {
    use crate::ops::elementwise::ElementwiseKernel;
    let test = "rmsnorm::cuda_add_rmsnorm_is_bitwise_add_then_rmsnorm";
    let Some(dev) = cuda_or_skip(test) else { return };
    fn run<E: CudaElem>(dev: &Cuda, p: &RmsNormParams, v: [&[f32]; 3], fused: bool) -> [Vec<f32>; 3]
    where
        Cuda: RmsNormKernel<E> + ElementwiseKernel<E>,
    {
        let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
        let down = |d: &crate::cuda::CudaBuf<E>| dev.download(d).unwrap().iter().map(|v| v.to_f32()).collect();
        let (n, rows) = (p.rows as usize * p.dim as usize, p.rows as usize);
        let [x, r, g] = v.map(up);
        // unfilled (NaN on the emulated device): an element or row statistic left unwritten shows
        let (mut h, mut y, mut s) =
            (dev.unfilled::<E>(n).unwrap(), dev.unfilled::<E>(n).unwrap(), dev.unfilled(rows).unwrap());
        if fused {
            dev.add_rmsnorm_fwd(p, &x, &r, &g, &mut h, &mut y, &mut s).unwrap();
        } else {
            dev.add_fwd(&x, &r, &mut h).unwrap();
            dev.rmsnorm_fwd(p, &h, &g, &mut y, &mut s).unwrap();
        }
        [down(&h), down(&y), dev.download(&s).unwrap()]
    }
    let mut rng = Rng::new(33);
    for (rows, dim, eps) in [(37, 1, 1e-5), (300, 33, 1e-6), (61, 769, 1e-5), (13, 1025, 1e-6), (3, 2077, 1e-5)] {
        let p = RmsNormParams::new(rows, dim, eps);
        let (x, g, r) = inputs(&mut rng, rows, dim);
        let cpu = cpu_add_norm(&p, true, &x, &r, &g);
        for bf in [false, true] {
            let v =
                if bf { [round_bf16(&x), round_bf16(&r), round_bf16(&g)] } else { [x.clone(), r.clone(), g.clone()] };
            let v = [&v[0][..], &v[1], &v[2]];
            let (fused, pair) = if bf {
                (run::<bf16>(&dev, &p, v, true), run::<bf16>(&dev, &p, v, false))
            } else {
                (run::<f32>(&dev, &p, v, true), run::<f32>(&dev, &p, v, false))
            };
            let what = format!("add_rmsnorm cuda [{rows}, {dim}] {}", if bf { "bf16" } else { "f32" });
            for (name, (f, u)) in ["h", "y", "rstd"].into_iter().zip(fused.iter().zip(&pair)) {
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
                assert!(bits(f) == bits(u), "{what} {name}: not the bits of add_fwd then rmsnorm_fwd");
            }
            if !bf {
                Tol::CUDA_F32.assert_close(&format!("{what} y vs cpu"), &fused[1], &cpu[1]);
            }
        }
    }
}
