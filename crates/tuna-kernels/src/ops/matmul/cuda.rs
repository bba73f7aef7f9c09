//! Matmul on CUDA through cuBLAS `cublasGemmEx`: f32 or bf16 operands, f32 or E output, fp32
//! compute (`CUBLAS_COMPUTE_32F`, no TF32 unless [`Cuda::set_tf32`] asks for it, so f32 results
//! track the CPU closely). On the emulated device the same product runs on the CPU in f32 (the
//! operands widened, TF32 operands rounded to 10 mantissa bits first, the result rounded to the
//! output type once, as cuBLAS does).
//!
//! The fused forward (`matmul_epilogue_fwd`) calls `cublasLtMatmul` with a bias / GELU epilogue;
//! a call cuBLASLt's rules exclude takes the unfused path (`cublasGemmEx`, then the bias and GELU
//! kernels), and so does every call after any cuBLASLt error in the process. That cuBLASLt call
//! has not run on a GPU: only the emulated device's semantics and the fallback are tested; each
//! device checks both calls against a host reference before its first product (`self_check.rs`).

use super::self_check::ProductVerdict;
use super::{check, check_bwd, check_epilogue, pick, Activation, MatmulKernel, MatmulParams, View};
use crate::backend::Elem;
use crate::cuda::CudaBuf;
use crate::cuda::{Cuda, CudaElem};
use crate::error::{Error, Result};
use crate::ops::elementwise::{BiasParams, ElementwiseKernel};
use crate::ops::gelu::{GeluKernel, GeluKind};
use cudarc::cublas::sys as cb;
use cudarc::cublaslt::{result as lt, sys as lts};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

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
    pub(super) fn gemm_ex<X: CudaElem, D: CudaElem>(
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

fn on_host() -> Error {
    Error::Invalid { op: "matmul", msg: "a real device's buffer given to the emulated one".into() }
}

/// An emulated buffer's values in f32 (rounded to TF32 when `tf32`).
fn widen<X: CudaElem>(b: &CudaBuf<X>, tf32: bool) -> Result<Vec<f32>> {
    let round = |v: f32| if tf32 { round_tf32(v) } else { v };
    b.host().map(|h| h.iter().map(|v| round(v.to_f32())).collect()).ok_or_else(on_host)
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
    let (xf, yf) = (widen(x.0, tf32)?, widen(y.0, tf32)?);
    let out = dst.host_mut().ok_or_else(on_host)?;
    let mut acc: Vec<f32> = if accumulate { out.iter().map(|v| v.to_f32()).collect() } else { vec![0.0; out.len()] };
    super::cpu::gemm_views::<f32>(&mut acc, (&xf, x.1), (&yf, y.1), alpha, accumulate, true);
    for (o, a) in out.iter_mut().zip(acc) {
        *o = D::from_f32(a);
    }
    Ok(())
}

/// GELU, tanh approximation, in f32: what the emulated device's epilogue applies to the f32
/// accumulator (cuBLASLt's exact instruction sequence is not documented; expect last-bit
/// differences on a GPU).
fn gelu_tanh_f32(x: f32) -> f32 {
    let (s2p, c) = (super::super::gelu::SQRT_2_OVER_PI as f32, super::super::gelu::GELU_C as f32);
    0.5 * x * (1.0 + (s2p * (x + c * x * x * x)).tanh())
}

/// The emulated device's fused product, with cuBLASLt's semantics: the product in f32, the bias
/// (widened) added to the f32 accumulator, the pre-activation rounded to `E` once into `aux`, and
/// the activation applied to the f32 value before its single rounding into `y`.
#[allow(clippy::too_many_arguments)]
fn emulated_epilogue<E: CudaElem>(
    p: &MatmulParams,
    act: Activation,
    a: &CudaBuf<E>,
    b: &CudaBuf<E>,
    bias: Option<&CudaBuf<E>>,
    y: &mut CudaBuf<E>,
    aux: Option<&mut CudaBuf<E>>,
    tf32: bool,
) -> Result<()> {
    let (af, bf) = (widen(a, tf32)?, widen(b, tf32)?);
    let mut acc = vec![0.0f32; p.m * p.n];
    super::cpu::gemm_views::<f32>(&mut acc, (&af, p.view_a()), (&bf, p.view_b()), p.alpha, false, true);
    let biasf = bias.map(|b| widen(b, false)).transpose()?;
    let mut aux = match aux {
        Some(x) => Some(x.host_mut().ok_or_else(on_host)?),
        None => None,
    };
    let out = y.host_mut().ok_or_else(on_host)?;
    for (i, (o, &v)) in out.iter_mut().zip(&acc).enumerate() {
        let pre = v + biasf.as_ref().map_or(0.0, |b| b[i % p.n]);
        if let Some(aux) = aux.as_deref_mut() {
            aux[i] = E::from_f32(pre);
        }
        *o = E::from_f32(match act {
            Activation::None => pre,
            Activation::GeluTanh => gelu_tanh_f32(pre),
        });
    }
    Ok(())
}

/// Which path a CUDA fused product ([`MatmulKernel::matmul_epilogue_fwd`]) took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpiloguePath {
    /// `cublasLtMatmul` with the bias / GELU epilogue.
    CublasLt,
    /// The emulated device's host computation of cuBLASLt's semantics.
    Emulated,
    /// `cublasGemmEx`, then the bias and GELU kernels, and why cuBLASLt did not take the call.
    Unfused(&'static str),
}

impl std::fmt::Display for EpiloguePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EpiloguePath::CublasLt => f.write_str("cuBLASLt epilogue"),
            EpiloguePath::Emulated => f.write_str("emulated cuBLASLt epilogue"),
            EpiloguePath::Unfused(why) => write!(f, "cublasGemmEx + bias/GELU kernels ({why})"),
        }
    }
}

thread_local! {
    static LAST_EPILOGUE: std::cell::Cell<Option<EpiloguePath>> = const { std::cell::Cell::new(None) };
    static FORCE_FALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Set once any cuBLASLt call fails: every later fused product of the process takes the unfused
/// path (a wrong cuBLASLt call costs speed, never a result).
static LT_FAILED: AtomicBool = AtomicBool::new(false);

/// Remember a cuBLASLt failure for the process, saying so once.
fn lt_failed(msg: &str) {
    if !LT_FAILED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "tuna: cuBLASLt fused matmul failed ({msg}); using cublasGemmEx and separate bias/GELU kernels from now on"
        );
    }
}

/// The path the calling thread's last CUDA fused product took (`None` before the first).
pub fn last_epilogue_path() -> Option<EpiloguePath> {
    LAST_EPILOGUE.with(|c| c.get())
}

/// Send this thread's fused products down the unfused path (`on`), on either device: for tests,
/// so the fallback that a cuBLASLt failure would take runs on the emulated device too.
pub fn force_epilogue_fallback(on: bool) {
    FORCE_FALLBACK.with(|c| c.set(on));
}

/// Why the cuBLASLt path did not run: refused for this call (a shape or alignment cuBLASLt's
/// rules exclude), or failed (a non-success status: remembered for the process).
enum LtMiss {
    Refused(&'static str),
    Failed(String),
}

/// A cuBLASLt status as the failure of `what`.
fn failed(what: impl std::fmt::Display) -> impl FnOnce(lt::CublasError) -> LtMiss {
    move |e| LtMiss::Failed(format!("{what}: {e:?}"))
}

/// Destroys a cuBLASLt descriptor when dropped.
struct Guard<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), lt::CublasError>);

impl<T: Copy> Drop for Guard<T> {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by the matching cublasLt*Create and is dropped once.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// The cuBLASLt data type of `E` (f32 or bf16; `dtype` has refused the others already).
fn lt_dtype<E: Elem>() -> lts::cudaDataType {
    if E::NAME == "bf16" {
        lts::cudaDataType::CUDA_R_16BF
    } else {
        lts::cudaDataType::CUDA_R_32F
    }
}

/// A row-major logical view as a cuBLASLt (column-major) layout of its storage and the op that
/// reads it back: `(rows, cols, ld, transposed)`.
fn lt_layout(v: View) -> (u64, u64, i64, bool) {
    if v.transposed {
        // stored row-major [cols, rows] = column-major [rows, cols]
        (v.rows as u64, v.cols as u64, v.rows as i64, true)
    } else {
        // stored row-major [rows, cols] = column-major [cols, rows], read transposed back by N
        (v.cols as u64, v.rows as u64, v.cols as i64, false)
    }
}

impl Cuda {
    /// The fused product on cuBLASLt: row-major `y[m,n] = act(op(a) op(b) + bias)` computed
    /// column-major as `y^T[n,m] = op(b)^T op(a)^T` (as `gemm_ex`), so the bias runs along D's rows
    /// (`n` of them, what cuBLASLt's bias epilogue broadcasts) and `aux` is D-shaped with ld `n`.
    #[allow(clippy::too_many_arguments)]
    fn lt_epilogue<E: CudaElem>(
        &self,
        p: &MatmulParams,
        act: Activation,
        a: &CudaBuf<E>,
        b: &CudaBuf<E>,
        bias: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        aux: Option<&mut CudaBuf<E>>,
        tf32: bool,
    ) -> std::result::Result<(), LtMiss> {
        let (m, n, k) = (p.m, p.n, p.k);
        if [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
            return Err(LtMiss::Refused("dimension over i32"));
        }
        // cuBLASLt: the aux buffer's leading dimension must be a multiple of 8.
        if aux.is_some() && n % 8 != 0 {
            return Err(LtMiss::Refused("aux ld (out features) not a multiple of 8"));
        }
        let state = self.lt().map_err(|e| LtMiss::Failed(e.to_string()))?;
        self.context()
            .and_then(|c| c.bind_to_thread().map_err(|e| Error::cuda("bind context", e)))
            .map_err(|e| LtMiss::Failed(e.to_string()))?;
        let stream = self.stream().map_err(|e| LtMiss::Failed(e.to_string()))?;
        let not_device = || LtMiss::Refused("an emulated buffer given to a real device");
        let (pa, _ga) = a.device_slice().ok_or_else(not_device)?.device_ptr(stream);
        let (pb, _gb) = b.device_slice().ok_or_else(not_device)?.device_ptr(stream);
        let bias_ptr = match bias {
            Some(bb) => Some(bb.device_slice().ok_or_else(not_device)?.device_ptr(stream)),
            None => None,
        };
        let aux_ptr = match aux {
            Some(x) => Some(x.device_slice_mut().ok_or_else(not_device)?.device_ptr_mut(stream)),
            None => None,
        };
        let (pd, _gd) = y.device_slice_mut().ok_or_else(not_device)?.device_ptr_mut(stream);
        // cuBLASLt: the aux pointer 16-byte aligned (so is the bias, for the vector loads).
        if aux_ptr.as_ref().is_some_and(|(q, _)| q % 16 != 0) || bias_ptr.as_ref().is_some_and(|(q, _)| q % 16 != 0) {
            return Err(LtMiss::Refused("aux or bias pointer not 16-byte aligned"));
        }
        let epilogue = match (act, bias.is_some(), aux_ptr.is_some()) {
            (Activation::None, false, _) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            (Activation::None, true, _) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            (Activation::GeluTanh, false, false) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
            (Activation::GeluTanh, false, true) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX,
            (Activation::GeluTanh, true, false) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            (Activation::GeluTanh, true, true) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        };
        let compute = if tf32 {
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let dt = lt_dtype::<E>();
        // D^T = A' B' with A' = op(b) read as [n, k] and B' = op(a) read as [k, m].
        let (wa, wb) = (lt_layout(p.view_b()), lt_layout(p.view_a()));
        let op = |t: bool| {
            if t {
                cb::cublasOperation_t::CUBLAS_OP_T as i32
            } else {
                cb::cublasOperation_t::CUBLAS_OP_N as i32
            }
        };
        use lts::cublasLtMatmulDescAttributes_t as D;
        let desc = Guard(
            lt::create_matmul_desc(compute, lts::cudaDataType::CUDA_R_32F)
                .map_err(failed("cublasLtMatmulDescCreate"))?,
            lt::destroy_matmul_desc,
        );
        // SAFETY: each attribute is given a value of the type and size cuBLASLt documents for it
        // (int32 ops, uint32 epilogue, pointers, int32 data type, int64 ld).
        let set =
            |attr: D, v: *const c_void, size: usize| unsafe { lt::set_matmul_desc_attribute(desc.0, attr, v, size) };
        let (ta, tb, epi) = (op(wa.3), op(wb.3), epilogue as u32);
        set(D::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const i32 as *const c_void, 4).map_err(failed("TRANSA"))?;
        set(D::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const i32 as *const c_void, 4).map_err(failed("TRANSB"))?;
        set(D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi as *const u32 as *const c_void, 4).map_err(failed("EPILOGUE"))?;
        if let Some((q, _)) = &bias_ptr {
            let ptr = *q as *const c_void;
            // The bias's type is D's (bf16 for a bf16 product): set explicitly, not left to the default.
            let bt = dt as i32;
            set(
                D::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &ptr as *const *const c_void as *const c_void,
                std::mem::size_of::<*const c_void>(),
            )
            .map_err(failed("BIAS_POINTER"))?;
            set(D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt as *const i32 as *const c_void, 4)
                .map_err(failed("BIAS_DATA_TYPE"))?;
        }
        if let Some((q, _)) = &aux_ptr {
            let (ptr, ld) = (*q as *mut c_void, n as i64);
            set(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                &ptr as *const *mut c_void as *const c_void,
                std::mem::size_of::<*mut c_void>(),
            )
            .map_err(failed("EPILOGUE_AUX_POINTER"))?;
            set(D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld as *const i64 as *const c_void, 8)
                .map_err(failed("EPILOGUE_AUX_LD"))?;
        }
        let layout = |(r, c, ld, _): (u64, u64, i64, bool)| {
            lt::create_matrix_layout(dt, r, c, ld)
                .map(|l| Guard(l, lt::destroy_matrix_layout))
                .map_err(failed("cublasLtMatrixLayoutCreate"))
        };
        let (la, lb, ld) = (layout(wa)?, layout(wb)?, layout((n as u64, m as u64, n as i64, false))?);
        let pref =
            Guard(lt::create_matmul_pref().map_err(failed("cublasLtMatmulPreferenceCreate"))?, lt::destroy_matmul_pref);
        let ws_bytes = crate::cuda::LT_WORKSPACE as u64;
        // SAFETY: a uint64 attribute, its size.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws_bytes as *const u64 as *const c_void,
                8,
            )
        }
        .map_err(failed("MAX_WORKSPACE_BYTES"))?;
        // SAFETY: live descriptors; the pointers set above are live device buffers whose lengths
        // were checked (the heuristic reads their alignment).
        let heur = unsafe { lt::get_matmul_algo_heuristic(state.handle, desc.0, la.0, lb.0, ld.0, ld.0, pref.0) }
            .map_err(failed("cublasLtMatmulAlgoGetHeuristic"))?;
        if heur.workspaceSize > crate::cuda::LT_WORKSPACE {
            return Err(LtMiss::Refused("the algorithm wants more workspace than allocated"));
        }
        let mut ws = state.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let (pw, _gw) = ws.device_ptr_mut(stream);
        let (alpha, beta) = (p.alpha, 0.0f32);
        // SAFETY: as for the heuristic; alpha/beta are host f32 (the scale type, default pointer
        // mode); C = D with beta 0 (D is overwritten, never read); the workspace is this device's,
        // held by the lock for the call, on the stream every op of this device runs on.
        unsafe {
            lt::matmul(
                state.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pb as *const c_void,
                la.0,
                pa as *const c_void,
                lb.0,
                pd as *const c_void,
                ld.0,
                pd as *mut c_void,
                ld.0,
                &heur.algo,
                pw as *mut c_void,
                crate::cuda::LT_WORKSPACE,
                stream.cu_stream() as lts::cudaStream_t,
            )
        }
        .map_err(failed(format!("cublasLtMatmul {m}x{n}x{k}")))
    }

    /// The fused product on this device's fused path (cuBLASLt; on the emulated device its host
    /// computation of cuBLASLt's semantics), for the device's check: `Ok(true)` where it ran,
    /// `Ok(false)` where cuBLASLt refused or failed the call (not remembered for the process: the
    /// check's verdict then keeps the device's fused products on the unfused path).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused_for_check<E: CudaElem>(
        &self,
        p: &MatmulParams,
        act: Activation,
        a: &CudaBuf<E>,
        b: &CudaBuf<E>,
        bias: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        aux: Option<&mut CudaBuf<E>>,
    ) -> Result<bool> {
        let tf32 = self.tf32() && E::NAME == "f32";
        if self.is_emulated() {
            emulated_epilogue(p, act, a, b, bias, y, aux, tf32)?;
            return Ok(true);
        }
        if LT_FAILED.load(Ordering::Relaxed) {
            return Ok(false);
        }
        Ok(self.lt_epilogue(p, act, a, b, bias, y, aux, tf32).is_ok())
    }

    /// The fallback: `cublasGemmEx` (or the emulated GEMM), then the bias and GELU kernels.
    #[allow(clippy::too_many_arguments)]
    fn epilogue_unfused<E: CudaElem>(
        &self,
        p: &MatmulParams,
        act: Activation,
        a: &CudaBuf<E>,
        b: &CudaBuf<E>,
        bias: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        aux: Option<&mut CudaBuf<E>>,
    ) -> Result<()> {
        let bp = BiasParams::new(p.m, p.n);
        let product = |dst: &mut CudaBuf<E>| -> Result<()> {
            self.gemm_ex(dst, (a, p.view_a()), (b, p.view_b()), p.alpha, false)?;
            if let Some(bias) = bias {
                ElementwiseKernel::<E>::add_bias_inplace(self, &bp, bias, dst)?;
            }
            Ok(())
        };
        match act {
            Activation::None => product(y),
            Activation::GeluTanh => {
                let mut scratch;
                let pre = match aux {
                    Some(x) => x,
                    None => {
                        scratch = self.unfilled::<E>(p.m * p.n)?; // GemmEx with beta 0 writes it all
                        &mut scratch
                    }
                };
                product(pre)?;
                GeluKernel::<E>::gelu_fwd(self, GeluKind::Tanh, pre, y)
            }
        }
    }
}

impl<E: CudaElem> MatmulKernel<E> for Cuda {
    fn matmul_fwd(&self, p: &MatmulParams, a: &CudaBuf<E>, b: &CudaBuf<E>, c: &mut CudaBuf<E>) -> Result<()> {
        check(p, a.len(), b.len(), c.len())?;
        self.checked_products()?;
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
        self.checked_products()?;
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

    fn matmul_bwd_a_overwrite(
        &self,
        p: &MatmulParams,
        b: &CudaBuf<E>,
        dc: &CudaBuf<E>,
        da: &mut CudaBuf<E>,
    ) -> Result<()> {
        check_bwd(p, None, Some(b.len()), dc.len(), Some(da.len()), None)?;
        self.checked_products()?;
        let pr = p.grad_a();
        let (x, y) = (pick(pr.x.0, None, Some(b), dc)?, pick(pr.y.0, None, Some(b), dc)?);
        self.gemm_ex(da, (x, pr.x.1), (y, pr.y.1), p.alpha, false)
    }

    fn matmul_epilogue_fwd(
        &self,
        p: &MatmulParams,
        act: Activation,
        a: &CudaBuf<E>,
        b: &CudaBuf<E>,
        bias: Option<&CudaBuf<E>>,
        y: &mut CudaBuf<E>,
        aux: Option<&mut CudaBuf<E>>,
    ) -> Result<()> {
        let len = |x: Option<&CudaBuf<E>>| x.map(CudaBuf::len);
        check_epilogue(p, act, a.len(), b.len(), len(bias), y.len(), len(aux.as_deref()))?;
        dtype::<E>(self)?;
        let tf32 = self.tf32() && E::NAME == "f32";
        let record = |path| LAST_EPILOGUE.with(|c| c.set(Some(path)));
        let unfused = |why, y: &mut CudaBuf<E>, aux| {
            record(EpiloguePath::Unfused(why));
            self.epilogue_unfused(p, act, a, b, bias, y, aux)
        };
        match self.checked_products()? {
            _ if FORCE_FALLBACK.with(|c| c.get()) => return unfused("forced", y, aux),
            ProductVerdict::Unfused { .. } => return unfused("the fused path failed this device's check", y, aux),
            ProductVerdict::Agrees { fused: false, .. } => {
                return unfused("cuBLASLt did not run this device's check", y, aux)
            }
            _ => {}
        }
        if self.is_emulated() {
            record(EpiloguePath::Emulated);
            return emulated_epilogue(p, act, a, b, bias, y, aux, tf32);
        }
        if LT_FAILED.load(Ordering::Relaxed) {
            return unfused("cuBLASLt failed earlier in this process", y, aux);
        }
        // The Lt call needs aux's pointer; on its failure the fallback needs the buffer again.
        let mut aux = aux;
        match self.lt_epilogue(p, act, a, b, bias, y, aux.as_deref_mut(), tf32) {
            Ok(()) => {
                record(EpiloguePath::CublasLt);
                Ok(())
            }
            Err(LtMiss::Refused(why)) => unfused(why, y, aux),
            Err(LtMiss::Failed(msg)) => {
                lt_failed(&msg);
                unfused("cuBLASLt failed", y, aux)
            }
        }
    }
}
