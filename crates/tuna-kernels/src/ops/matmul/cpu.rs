//! Matmul on the CPU through the `gemm` crate (runtime-dispatched AVX-512/AVX2 microkernels,
//! rayon across both threads).

use super::{check, MatmulKernel, MatmulParams, Operand, Product, View};
use crate::backend::Cpu;
use crate::error::{check_len, Result};

/// `dst[rows, cols] = beta_dst * dst + alpha * x y`, all row-major except as the views say.
/// `accumulate` keeps `dst`; otherwise it is overwritten.
pub(crate) fn gemm_views(
    dst: &mut [f32],
    x: (&[f32], View),
    y: (&[f32], View),
    alpha: f32,
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
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

impl MatmulKernel<f32> for Cpu {
    fn matmul_fwd(&self, p: &MatmulParams, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        check(p, a.len(), b.len(), c.len())?;
        gemm_views(c, (a, p.view_a()), (b, p.view_b()), p.alpha, p.accumulate, true);
        Ok(())
    }

    fn matmul_bwd(
        &self,
        p: &MatmulParams,
        a: &[f32],
        b: &[f32],
        dc: &[f32],
        da: Option<&mut [f32]>,
        db: Option<&mut [f32]>,
    ) -> Result<()> {
        check(p, a.len(), b.len(), dc.len())?;
        let pick = |o: Operand| match o {
            Operand::A => a,
            Operand::B => b,
            Operand::DC => dc,
        };
        let run = |dst: &mut [f32], pr: Product| {
            gemm_views(dst, (pick(pr.x.0), pr.x.1), (pick(pr.y.0), pr.y.1), p.alpha, true, true)
        };
        if let Some(da) = da {
            check_len("matmul", "da", da.len(), p.m * p.k, || "same as a".into())?;
            run(da, p.grad_a());
        }
        if let Some(db) = db {
            check_len("matmul", "db", db.len(), p.k * p.n, || "same as b".into())?;
            run(db, p.grad_b());
        }
        Ok(())
    }
}
