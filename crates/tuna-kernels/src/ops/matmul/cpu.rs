//! Matmul on the CPU through the `gemm` crate (runtime-dispatched AVX-512/AVX2 microkernels,
//! rayon across both threads), generic over f32 and f64 ([`CpuFloat`]; `gemm` dispatches on the
//! type to its f32 or f64 microkernels).

use super::{check, check_bwd, check_epilogue, pick, Activation, MatmulKernel, MatmulParams, Product, View};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use crate::ops::gelu::{cpu_fwd_chunk, GeluKind, CPU_CHUNK};
use rayon::prelude::*;

/// `dst[rows, cols] = beta_dst * dst + alpha * x y`, all row-major except as the views say.
/// `accumulate` keeps `dst`; otherwise it is overwritten.
pub(crate) fn gemm_views<F: CpuFloat>(
    dst: &mut [F],
    x: (&[F], View),
    y: (&[F], View),
    alpha: F,
    accumulate: bool,
    parallel: bool,
) {
    let (xv, yv) = (x.1, y.1);
    debug_assert_eq!(xv.cols, yv.rows);
    let (m, n, k) = (xv.rows, yv.cols, xv.cols);
    let (xrs, xcs) = xv.strides();
    let (yrs, ycs) = yv.strides();
    let par = if parallel && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller checked every buffer's length against the views: x spans rows*cols
    // elements reachable with its strides, likewise y, and dst is m*n contiguous; dst does not
    // alias x or y (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.0.as_ptr(),
            xcs,
            xrs,
            y.0.as_ptr(),
            ycs,
            yrs,
            F::one(),
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// `c[i] += bias[(start + i) % n]`: the bias added to a run of a row-major `[m, n]` output that
/// begins at flat offset `start`.
fn add_bias_run<F: CpuFloat>(start: usize, n: usize, bias: &[F], c: &mut [F]) {
    let (mut i, mut col) = (0, start % n);
    while i < c.len() {
        let len = (n - col).min(c.len() - i);
        for (v, &b) in c[i..i + len].iter_mut().zip(&bias[col..col + len]) {
            *v += b;
        }
        i += len;
        col = 0;
    }
}

/// Elements per block of the epilogue inside one GELU chunk: a multiple of 8 (the f32 GELU's vector
/// width, so the vector/scalar split, and the bits, are the chunk's), small enough for L1.
const SUB: usize = 2048;

/// The fused forward's epilogue over the product in `y` (`[m, n]`, `n` columns): in one parallel
/// pass over [`CPU_CHUNK`]-element chunks (the GELU kernel's own), each in L1-sized blocks, add the
/// bias, keep the pre-activation in `aux` when given, and apply `act`. The same bits as
/// `add_bias_inplace` then `gelu_fwd`: every block but a chunk's last is a multiple of 8 long, so
/// the f32 GELU's vector/scalar split falls where the kernel's one call per chunk puts it.
pub(crate) fn epilogue<F: CpuFloat>(n: usize, act: Activation, bias: Option<&[F]>, y: &mut [F], aux: Option<&mut [F]>) {
    let add = |start: usize, c: &mut [F]| {
        if let Some(bias) = bias {
            add_bias_run(start, n, bias, c)
        }
    };
    // One block at flat offset `start`: `pre = y + bias`, `y = gelu(pre)`.
    let block = |start: usize, yb: &mut [F], pre: &mut [F]| {
        pre.copy_from_slice(yb);
        add(start, pre);
        cpu_fwd_chunk(GeluKind::Tanh, pre, yb);
    };
    match (act, aux) {
        (Activation::None, _) => {
            if bias.is_some() {
                y.par_chunks_mut(CPU_CHUNK).enumerate().for_each(|(i, c)| add(i * CPU_CHUNK, c));
            }
        }
        (Activation::GeluTanh, Some(aux)) => {
            y.par_chunks_mut(CPU_CHUNK).zip(aux.par_chunks_mut(CPU_CHUNK)).enumerate().for_each(|(i, (yc, pre))| {
                for (b, (yb, pb)) in yc.chunks_mut(SUB).zip(pre.chunks_mut(SUB)).enumerate() {
                    block(i * CPU_CHUNK + b * SUB, yb, pb);
                }
            })
        }
        (Activation::GeluTanh, None) => y.par_chunks_mut(CPU_CHUNK).enumerate().for_each_init(
            || vec![F::zero(); SUB],
            |scratch, (i, yc)| {
                for (b, yb) in yc.chunks_mut(SUB).enumerate() {
                    block(i * CPU_CHUNK + b * SUB, yb, &mut scratch[..yb.len()]);
                }
            },
        ),
    }
}

// `Acc = F` restates CpuFloat's own supertrait bound, which rustc does not use to normalize
// `F::Acc` in the trait's signature.
impl<F: CpuFloat<Acc = F>> MatmulKernel<F> for Cpu {
    fn matmul_fwd(&self, p: &MatmulParams, a: &[F], b: &[F], c: &mut [F]) -> Result<()> {
        check(p, a.len(), b.len(), c.len())?;
        gemm_views(c, (a, p.view_a()), (b, p.view_b()), F::c(p.alpha as f64), p.accumulate, true);
        Ok(())
    }

    fn matmul_bwd(
        &self,
        p: &MatmulParams,
        a: Option<&[F]>,
        b: Option<&[F]>,
        dc: &[F],
        da: Option<&mut [F]>,
        db: Option<&mut [F]>,
    ) -> Result<()> {
        let len = |x: Option<&[F]>| x.map(<[F]>::len);
        check_bwd(p, len(a), len(b), dc.len(), len(da.as_deref()), len(db.as_deref()))?;
        let run = |dst: &mut [F], pr: Product| -> Result<()> {
            let (x, y) = (pick(pr.x.0, a, b, dc)?, pick(pr.y.0, a, b, dc)?);
            gemm_views(dst, (x, pr.x.1), (y, pr.y.1), F::c(p.alpha as f64), true, true);
            Ok(())
        };
        if let Some(da) = da {
            run(da, p.grad_a())?;
        }
        if let Some(db) = db {
            run(db, p.grad_b())?;
        }
        Ok(())
    }

    fn matmul_bwd_a_overwrite(&self, p: &MatmulParams, b: &[F], dc: &[F], da: &mut [F]) -> Result<()> {
        check_bwd(p, None, Some(b.len()), dc.len(), Some(da.len()), None)?;
        let pr = p.grad_a();
        let (x, y) = (pick(pr.x.0, None, Some(b), dc)?, pick(pr.y.0, None, Some(b), dc)?);
        gemm_views(da, (x, pr.x.1), (y, pr.y.1), F::c(p.alpha as f64), false, true);
        Ok(())
    }

    fn matmul_epilogue_fwd(
        &self,
        p: &MatmulParams,
        act: Activation,
        a: &[F],
        b: &[F],
        bias: Option<&[F]>,
        y: &mut [F],
        aux: Option<&mut [F]>,
    ) -> Result<()> {
        let len = |x: Option<&[F]>| x.map(<[F]>::len);
        check_epilogue(p, act, a.len(), b.len(), len(bias), y.len(), len(aux.as_deref()))?;
        gemm_views(y, (a, p.view_a()), (b, p.view_b()), F::c(p.alpha as f64), false, true);
        epilogue(p.n, act, bias, y, aux);
        Ok(())
    }
}
