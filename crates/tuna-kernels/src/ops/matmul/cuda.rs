//! Matmul on CUDA through cuBLAS `cublasGemmEx`: f32 or bf16 operands, f32 or E output, fp32
//! compute (`CUBLAS_COMPUTE_32F`, no TF32 unless [`Cuda::set_tf32`] asks for it, so f32 results
//! track the CPU closely). On the emulated device the same product runs on the CPU in f32 (the
//! operands widened, TF32 operands rounded to 10 mantissa bits first, the result rounded to the
//! output type once, as cuBLAS does).

use super::{check, check_bwd, pick, MatmulKernel, MatmulParams, View};
use crate::backend::Elem;
use crate::cuda::CudaBuf;
use crate::cuda::{Cuda, CudaElem};
use crate::error::{Error, Result};
use cudarc::cublas::sys as cb;
use cudarc::driver::{DevicePtr, DevicePtrMut};

/// The cuBLAS data type of `E`; only f32 and bf16 have one here (the integer `CudaElem`s must not
/// reach cuBLAS, which would read them as 4-byte floats past the end of their buffers).
fn dtype<E: Elem>(dev: &Cuda) -> Result<cb::cudaDataType> {
    match E::NAME {
        "bf16" => Ok(cb::cudaDataType::CUDA_R_16BF),
        "f32" => Ok(cb::cudaDataType::CUDA_R_32F),
        other => Err(Error::Unsupported {
            op: "matmul",
            device: crate::Backend::device_name(dev),
            msg: format!("element type {other} (f32 and bf16 only)"),
        }),
    }
}

/// cuBLAS operation and leading dimension for a row-major logical view read column-major.
fn op_ld(v: View) -> (cb::cublasOperation_t, i32) {
    if v.transposed {
        (cb::cublasOperation_t::CUBLAS_OP_T, v.rows as i32)
    } else {
        (cb::cublasOperation_t::CUBLAS_OP_N, v.cols as i32)
    }
}

impl Cuda {
    /// Row-major `dst[M,N] = alpha * x y (+ dst)`, computed column-major as `dst^T = y^T x^T`.
    fn gemm_ex<X: CudaElem, D: CudaElem>(
        &self,
        dst: &mut CudaBuf<D>,
        x: (&CudaBuf<X>, View),
        y: (&CudaBuf<X>, View),
        alpha: f32,
        accumulate: bool,
    ) -> Result<()> {
        let (m, n, k) = (x.1.rows, y.1.cols, x.1.cols);
        if [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
            return Err(Error::Invalid { op: "matmul", msg: format!("dimension over i32 in {m}x{n}x{k}") });
        }
        let (tx, td) = (dtype::<X>(self)?, dtype::<D>(self)?);
        let tf32 = self.tf32() && X::NAME == "f32";
        if self.is_emulated() {
            return emulated_gemm(dst, x, y, alpha, accumulate, tf32);
        }
        let compute = if tf32 {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let (op_y, ld_y) = op_ld(y.1);
        let (op_x, ld_x) = op_ld(x.1);
        let beta: f32 = if accumulate { 1.0 } else { 0.0 };
        let blas = self.blas()?;
        // cuBLAS runs in the calling thread's current context; a thread that made no cudarc call
        // yet has none (cudarc's own launches bind it the same way).
        self.context()?.bind_to_thread().map_err(|e| Error::cuda("bind context", e))?;
        let stream = self.stream()?;
        let on_device = || Error::Invalid { op: "matmul", msg: "an emulated buffer given to a real device".into() };
        let (py, _gy) = y.0.device_slice().ok_or_else(on_device)?.device_ptr(stream);
        let (px, _gx) = x.0.device_slice().ok_or_else(on_device)?.device_ptr(stream);
        let (pd, _gd) = dst.device_slice_mut().ok_or_else(on_device)?.device_ptr_mut(stream);
        // SAFETY: the pointers are live device buffers on this handle's stream whose lengths were
        // checked against the views; alpha/beta are host f32 (default pointer mode); the data
        // types name the buffers' element types.
        let st = unsafe {
            cb::cublasGemmEx(
                *blas.handle(),
                op_y,
                op_x,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                py as *const _,
                tx,
                ld_y,
                px as *const _,
                tx,
                ld_x,
                &beta as *const f32 as *const _,
                pd as *mut _,
                td,
                n as i32,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if st != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::cuda(format!("cublasGemmEx {m}x{n}x{k}"), st));
        }
        Ok(())
    }
}

/// `x` rounded to TF32 (8 exponent bits, 10 mantissa bits: the low 13 bits of an f32's mantissa
/// dropped, to nearest, ties to even); infinities and NaN pass unchanged.
pub(crate) fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let b = x.to_bits();
    let lsb = (b >> 13) & 1;
    f32::from_bits(b.wrapping_add(0xfff + lsb) & !0x1fff)
}

/// The emulated device's product: `dst = alpha * x y (+ dst)` in f32 on the host (the operands
/// rounded to TF32 first when `tf32`).
fn emulated_gemm<X: CudaElem, D: CudaElem>(
    dst: &mut CudaBuf<D>,
    x: (&CudaBuf<X>, View),
    y: (&CudaBuf<X>, View),
    alpha: f32,
    accumulate: bool,
    tf32: bool,
) -> Result<()> {
    let on_host = || Error::Invalid { op: "matmul", msg: "a real device's buffer given to the emulated one".into() };
    let round = |v: f32| if tf32 { round_tf32(v) } else { v };
    let widen = |b: &CudaBuf<X>| {
        b.host().map(|h| h.iter().map(|v| round(v.to_f32())).collect::<Vec<f32>>()).ok_or_else(on_host)
    };
    let (xf, yf) = (widen(x.0)?, widen(y.0)?);
    let out = dst.host_mut().ok_or_else(on_host)?;
    let mut acc: Vec<f32> = if accumulate { out.iter().map(|v| v.to_f32()).collect() } else { vec![0.0; out.len()] };
    super::cpu::gemm_views::<f32>(&mut acc, (&xf, x.1), (&yf, y.1), alpha, accumulate, true);
    for (o, a) in out.iter_mut().zip(acc) {
        *o = D::from_f32(a);
    }
    Ok(())
}

impl<E: CudaElem> MatmulKernel<E> for Cuda {
    fn matmul_fwd(&self, p: &MatmulParams, a: &CudaBuf<E>, b: &CudaBuf<E>, c: &mut CudaBuf<E>) -> Result<()> {
        check(p, a.len(), b.len(), c.len())?;
        self.gemm_ex(c, (a, p.view_a()), (b, p.view_b()), p.alpha, p.accumulate)
    }

    fn matmul_bwd(
        &self,
        p: &MatmulParams,
        a: Option<&CudaBuf<E>>,
        b: Option<&CudaBuf<E>>,
        dc: &CudaBuf<E>,
        da: Option<&mut CudaBuf<E>>,
        db: Option<&mut CudaBuf<f32>>,
    ) -> Result<()> {
        let (la, lb) = (a.map(CudaBuf::len), b.map(CudaBuf::len));
        check_bwd(p, la, lb, dc.len(), da.as_deref().map(CudaBuf::len), db.as_deref().map(CudaBuf::len))?;
        if let Some(da) = da {
            let pr = p.grad_a();
            let (x, y) = (pick(pr.x.0, a, b, dc)?, pick(pr.y.0, a, b, dc)?);
            self.gemm_ex(da, (x, pr.x.1), (y, pr.y.1), p.alpha, true)?;
        }
        if let Some(db) = db {
            let pr = p.grad_b();
            let (x, y) = (pick(pr.x.0, a, b, dc)?, pick(pr.y.0, a, b, dc)?);
            self.gemm_ex(db, (x, pr.x.1), (y, pr.y.1), p.alpha, true)?;
        }
        Ok(())
    }
}
