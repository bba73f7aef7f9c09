//! Elementwise CUDA tests: every op against the CPU in f32 (`Tol::CUDA_F32`) and bf16
//! (bf16-rounded inputs, `Tol::CUDA_BF16`), for each launch configuration the launchers pick,
//! with gradients starting nonzero. Skipped, by name, without a GPU.

use super::tests::mask;
use super::*;
use crate::cuda::CudaBuf;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// Inputs as the element type sees them: rounded through bf16 for bf16.
fn prep<E: Elem>(v: Vec<f32>) -> Vec<f32> {
    if E::NAME == "bf16" {
        round_bf16(&v)
    } else {
        v
    }
}
fn up<E: CudaElem>(dev: &Cuda, v: &[f32]) -> CudaBuf<E> {
    dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<_>>()).unwrap()
}
fn down<E: CudaElem>(dev: &Cuda, d: &CudaBuf<E>) -> Vec<f32> {
    dev.download(d).unwrap().into_iter().map(E::to_f32).collect()
}
fn tol<E: Elem>() -> Tol {
    if E::NAME == "bf16" {
        Tol::CUDA_BF16
    } else {
        Tol::CUDA_F32
    }
}

fn flat_case<E: CudaElem>(dev: &Cuda, n: usize) {
    let (mut rng, t, name) = (Rng::new(10), tol::<E>(), E::NAME);
    let mut v = |lo, hi| prep::<E>(rng.vec(n, lo, hi));
    let (a, b, dy, g0a, g0b) = (v(-3.0, 3.0), v(-3.0, 3.0), v(-1.0, 1.0), v(-1.0, 1.0), v(-1.0, 1.0));
    let (ad, bd, dyd) = (up::<E>(dev, &a), up::<E>(dev, &b), up::<E>(dev, &dy));
    let s = -0.37;
    for op in ["add", "mul", "scale", "tanh"] {
        let (mut y, mut da, mut db) = (vec![0.0f32; n], g0a.clone(), g0b.clone());
        let (mut yd, mut dad, mut dbd) = (dev.zeros::<E>(n).unwrap(), up::<E>(dev, &g0a), up::<E>(dev, &g0b));
        match op {
            "add" => {
                Cpu.add_fwd(&a, &b, &mut y).unwrap();
                Cpu.add_bwd(&dy, &mut da, &mut db).unwrap();
                ElementwiseKernel::<E>::add_fwd(dev, &ad, &bd, &mut yd).unwrap();
                ElementwiseKernel::<E>::add_bwd(dev, &dyd, &mut dad, &mut dbd).unwrap();
            }
            "mul" => {
                Cpu.mul_fwd(&a, &b, &mut y).unwrap();
                Cpu.mul_bwd(&a, &b, &dy, &mut da, &mut db).unwrap();
                ElementwiseKernel::<E>::mul_fwd(dev, &ad, &bd, &mut yd).unwrap();
                ElementwiseKernel::<E>::mul_bwd(dev, &ad, &bd, &dyd, &mut dad, &mut dbd).unwrap();
            }
            "tanh" => {
                // the backward reads the forward's output: each device its own
                Cpu.tanh_fwd(&a, &mut y).unwrap();
                Cpu.tanh_bwd(&y, &dy, &mut da).unwrap();
                ElementwiseKernel::<E>::tanh_fwd(dev, &ad, &mut yd).unwrap();
                ElementwiseKernel::<E>::tanh_bwd(dev, &yd, &dyd, &mut dad).unwrap();
            }
            _ => {
                Cpu.scale_fwd(s, &a, &mut y).unwrap();
                Cpu.scale_bwd(s, &dy, &mut da).unwrap();
                ElementwiseKernel::<E>::scale_fwd(dev, s, &ad, &mut yd).unwrap();
                ElementwiseKernel::<E>::scale_bwd(dev, s, &dyd, &mut dad).unwrap();
            }
        }
        t.assert_close(&format!("{op} cuda {name} fwd"), &down(dev, &yd), &y);
        t.assert_close(&format!("{op} cuda {name} bwd da"), &down(dev, &dad), &da);
        t.assert_close(&format!("{op} cuda {name} bwd db"), &down(dev, &dbd), &db);
    }
}

#[test]
fn cuda_flat_ops_match_cpu() {
    let Some(dev) = cuda_or_skip("elementwise::cuda_flat_ops_match_cpu") else { return };
    // one grid-stride launch shape; a ragged tail block
    flat_case::<f32>(&dev, 5003);
    flat_case::<bf16>(&dev, 5003);
}

fn add_bias_case<E: CudaElem>(dev: &Cuda, rows: usize, cols: usize) {
    let (mut rng, t, name) = (Rng::new(11 + rows as u64), tol::<E>(), E::NAME);
    let p = BiasParams::new(rows, cols);
    let mut v = |n, lo, hi| prep::<E>(rng.vec(n, lo, hi));
    let (x, bias, dy, g0x) =
        (v(rows * cols, -3.0, 3.0), v(cols, -1.0, 1.0), v(rows * cols, -1.0, 1.0), v(rows * cols, -1.0, 1.0));
    let g0b = rng.vec(cols, -1.0, 1.0); // dbias is f32 on both devices
    let (mut y, mut dx, mut dbias) = (vec![0.0f32; rows * cols], g0x.clone(), g0b.clone());
    Cpu.add_bias_fwd(&p, &x, &bias, &mut y).unwrap();
    Cpu.add_bias_bwd(&p, &dy, &mut dx, &mut dbias).unwrap();

    let (xd, bd, dyd) = (up::<E>(dev, &x), up::<E>(dev, &bias), up::<E>(dev, &dy));
    let (mut yd, mut dxd, mut dbd) =
        (dev.zeros::<E>(rows * cols).unwrap(), up::<E>(dev, &g0x), dev.upload(&g0b).unwrap());
    ElementwiseKernel::<E>::add_bias_fwd(dev, &p, &xd, &bd, &mut yd).unwrap();
    ElementwiseKernel::<E>::add_bias_bwd(dev, &p, &dyd, &mut dxd, &mut dbd).unwrap();
    t.assert_close(&format!("add_bias cuda {name} fwd"), &down(dev, &yd), &y);
    t.assert_close(&format!("add_bias cuda {name} bwd dx"), &down(dev, &dxd), &dx);
    // f32 sums of up to 70k rows in another order than the CPU's: an f32-long-sum tolerance
    let tb = if name == "bf16" { t } else { Tol::new("cuda-f32 long column sums", 1e-3, 1e-3) };
    let got = dev.download(&dbd).unwrap();
    tb.assert_close(&format!("add_bias cuda {name} bwd dbias"), &got, &dbias);
    // no atomics: a second run from the same start gives the same bits
    let (mut dxd, mut dbd) = (up::<E>(dev, &g0x), dev.upload(&g0b).unwrap());
    ElementwiseKernel::<E>::add_bias_bwd(dev, &p, &dyd, &mut dxd, &mut dbd).unwrap();
    assert_eq!(dev.download(&dbd).unwrap(), got, "add_bias cuda {name}: dbias not reproducible");
    // bias_grad: add_bias_bwd's dbias alone, the same bits
    let mut dbd = dev.upload(&g0b).unwrap();
    ElementwiseKernel::<E>::bias_grad(dev, &p, &dyd, &mut dbd).unwrap();
    assert_eq!(dev.download(&dbd).unwrap(), got, "bias_grad cuda {name} vs add_bias_bwd's dbias");
    // add_bias_inplace: add_bias_fwd's bits, in y's own buffer
    let mut inplace = up::<E>(dev, &x);
    ElementwiseKernel::<E>::add_bias_inplace(dev, &p, &bd, &mut inplace).unwrap();
    assert_eq!(down(dev, &inplace), down(dev, &yd), "add_bias_inplace cuda {name} vs add_bias_fwd");
}

#[test]
fn cuda_add_bias_matches_cpu() {
    let Some(dev) = cuda_or_skip("elementwise::cuda_add_bias_matches_cpu") else { return };
    // (37, 1029): 32-row chunks, a ragged column block; (70_001, 3): rows past grid y's 65535
    // (the forward grid-strides) and chunks of more than 32 rows
    for (rows, cols) in [(37, 1029), (70_001, 3)] {
        add_bias_case::<f32>(&dev, rows, cols);
        add_bias_case::<bf16>(&dev, rows, cols);
    }
}

fn cols_case<E: CudaElem>(dev: &Cuda, p: ColsParams) {
    let (mut rng, t, name) = (Rng::new(12 + p.rows), tol::<E>(), E::NAME);
    let mut v = |n, lo, hi| prep::<E>(rng.vec(n, lo, hi));
    let (wide, narrow, g0w, g0n) =
        (v(p.wide(), -3.0, 3.0), v(p.narrow(), -3.0, 3.0), v(p.wide(), -1.0, 1.0), v(p.narrow(), -1.0, 1.0));
    let (wd, nd) = (up::<E>(dev, &wide), up::<E>(dev, &narrow));
    let mut y = vec![0.0f32; p.narrow()];
    let mut yd = dev.zeros::<E>(p.narrow()).unwrap();
    Cpu.slice_cols_fwd(&p, &wide, &mut y).unwrap();
    ElementwiseKernel::<E>::slice_cols_fwd(dev, &p, &wd, &mut yd).unwrap();
    t.assert_close(&format!("slice_cols cuda {name} fwd"), &down(dev, &yd), &y);
    let (mut dx, mut dxd) = (g0w.clone(), up::<E>(dev, &g0w));
    Cpu.slice_cols_bwd(&p, &narrow, &mut dx).unwrap();
    ElementwiseKernel::<E>::slice_cols_bwd(dev, &p, &nd, &mut dxd).unwrap();
    t.assert_close(&format!("slice_cols cuda {name} bwd"), &down(dev, &dxd), &dx);
    // concat into a nonzero y: the columns outside the block must be kept
    let (mut y, mut yd) = (g0w.clone(), up::<E>(dev, &g0w));
    Cpu.concat_cols_fwd(&p, &narrow, &mut y).unwrap();
    ElementwiseKernel::<E>::concat_cols_fwd(dev, &p, &nd, &mut yd).unwrap();
    t.assert_close(&format!("concat_cols cuda {name} fwd"), &down(dev, &yd), &y);
    let (mut dx, mut dxd) = (g0n.clone(), up::<E>(dev, &g0n));
    Cpu.concat_cols_bwd(&p, &wide, &mut dx).unwrap();
    ElementwiseKernel::<E>::concat_cols_bwd(dev, &p, &wd, &mut dxd).unwrap();
    t.assert_close(&format!("concat_cols cuda {name} bwd"), &down(dev, &dxd), &dx);
}

#[test]
fn cuda_slice_and_concat_cols_match_cpu() {
    let Some(dev) = cuda_or_skip("elementwise::cuda_slice_and_concat_cols_match_cpu") else { return };
    // a ragged qkv split (k of 3 x 67 columns); rows past grid y's 65535 (grid-stride over rows)
    for p in [ColsParams::new(37, 201, 67, 67), ColsParams::new(70_001, 7, 2, 3)] {
        cols_case::<f32>(&dev, p);
        cols_case::<bf16>(&dev, p);
    }
}

fn pool_case<E: CudaElem>(dev: &Cuda, p: PoolParams) {
    let (batch, seq, hid) = (p.batch as usize, p.seq as usize, p.hidden as usize);
    let (mut rng, t, name) = (Rng::new(13 + seq as u64), tol::<E>(), E::NAME);
    let m = mask(&mut rng, batch, seq);
    let mut v = |n, lo, hi| prep::<E>(rng.vec(n, lo, hi));
    let (x, dy, g0) = (v(batch * seq * hid, -3.0, 3.0), v(batch * hid, -1.0, 1.0), v(batch * seq * hid, -1.0, 1.0));
    let (mut y, mut dx) = (vec![0.0f32; batch * hid], g0.clone());
    Cpu.sum_rows_masked_mean_fwd(&p, &x, &m, &mut y).unwrap();
    Cpu.sum_rows_masked_mean_bwd(&p, &m, &dy, &mut dx).unwrap();
    let (xd, md, dyd) = (up::<E>(dev, &x), dev.upload(&m).unwrap(), up::<E>(dev, &dy));
    let (mut yd, mut dxd) = (dev.zeros::<E>(batch * hid).unwrap(), up::<E>(dev, &g0));
    ElementwiseKernel::<E>::sum_rows_masked_mean_fwd(dev, &p, &xd, &md, &mut yd).unwrap();
    ElementwiseKernel::<E>::sum_rows_masked_mean_bwd(dev, &p, &md, &dyd, &mut dxd).unwrap();
    t.assert_close(&format!("sum_rows_masked_mean cuda {name} fwd {p:?}"), &down(dev, &yd), &y);
    t.assert_close(&format!("sum_rows_masked_mean cuda {name} bwd {p:?}"), &down(dev, &dxd), &dx);
}

#[test]
fn cuda_sum_rows_masked_mean_matches_cpu() {
    let Some(dev) = cuda_or_skip("elementwise::cuda_sum_rows_masked_mean_matches_cpu") else { return };
    // ragged small; seq*hidden past the backward's 1024 x 256 threads per batch row (grid-stride);
    // batch past grid y's 65535
    for (b, s, h) in [(5, 13, 71), (2, 300, 1000), (66_000, 3, 2)] {
        pool_case::<f32>(&dev, PoolParams::new(b, s, h));
        pool_case::<bf16>(&dev, PoolParams::new(b, s, h));
    }
}
