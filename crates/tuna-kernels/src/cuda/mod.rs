//! The CUDA backend: a device layer with two implementations behind one [`Cuda`] type: the real
//! device (cudarc: context, stream, loaded-module cache, cuBLAS) and, in builds with the
//! `emulator` feature, the emulated device (host memory, `kernels/*.cu` compiled as host C++,
//! GEMM on the CPU) that tests select with `TUNA_CUDA_EMULATE=1`. Launchers describe each
//! launch once ([`Launch`]) and either device runs it.
//!
//! Nothing here panics on a machine without a driver: [`probe`] checks for `libcuda` before any
//! context is made (cudarc's `CudaContext::new` would panic), and [`Cuda::new`] returns
//! [`Error::NoCuda`] with the reason.

pub mod buf;
pub mod compile;
#[cfg(feature = "emulator")]
pub mod emu;
#[cfg(feature = "emulator")]
mod emu_log;
pub mod launch;
pub mod sources;

use crate::backend::{Backend, Elem};
use crate::error::{Error, Result};
use buf::Mem;
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use launch::Arg;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use buf::CudaBuf;
pub use cudarc;
pub use launch::{IntoArg, KernelArg, Launch};
pub use sources::KernelSource;

/// The environment variable that makes [`Cuda::new`] open the emulated device.
pub const EMULATE_ENV: &str = "TUNA_CUDA_EMULATE";

/// Dynamic shared memory a kernel may use without opting in (larger launches raise the kernel's
/// limit first).
pub const DEFAULT_DYN_SMEM: u32 = 48 * 1024;

/// Element types with CUDA kernels (f32, bf16, and the integer types of ids and masks); all
/// accumulate in f32.
pub trait CudaElem: Elem<Acc = f32> + DeviceRepr + ValidAsZeroBits + Unpin {}
impl CudaElem for f32 {}
impl CudaElem for half::bf16 {}
impl CudaElem for u8 {}
impl CudaElem for u32 {}
impl CudaElem for i32 {}

/// Number of CUDA devices, or why there are none. Never panics.
pub fn probe() -> Result<usize> {
    // SAFETY: only attempts to dlopen libcuda's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoCuda("no CUDA driver library (libcuda.so) found (use --device cpu)".into()));
    }
    // cudarc may panic while binding symbols of a broken or too-old driver: turn that into an error.
    let r = std::panic::catch_unwind(|| {
        cudarc::driver::result::init().map_err(|e| Error::cuda("cuInit", e))?;
        CudaContext::device_count().map_err(|e| Error::cuda("cuDeviceGetCount", e))
    });
    match r {
        Ok(Ok(n)) if n > 0 => Ok(n as usize),
        Ok(Ok(_)) => Err(Error::NoCuda("the CUDA driver reports no devices".into())),
        Ok(Err(e)) => Err(Error::NoCuda(e.to_string())),
        Err(_) => Err(Error::NoCuda("the CUDA driver library could not be loaded (too old?)".into())),
    }
}

/// Let the device's stream-ordered memory pool (which cudarc allocates from where the driver has
/// one) keep what is freed instead of returning it to the driver at each synchronization, so a
/// training step after the first maps no new memory. Best effort: a driver without pools, or one
/// that refuses, leaves the default (the allocations still work).
fn keep_freed_memory(ctx: &Arc<CudaContext>) {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() || ctx.bind_to_thread().is_err() {
        return;
    }
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: the context is current on this thread and cu_device names its device; the pool
    // handle is written by the driver before it is read (only on success); the attribute value
    // is a u64 as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD takes, alive for the call.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS {
            let mut threshold = u64::MAX;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            let _ = sys::cuMemPoolSetAttribute(
                pool.assume_init(),
                attr,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

/// Whether the driver refused a module image as such (so compiling it again may help).
fn refused_image(e: &cudarc::driver::DriverError) -> bool {
    use cudarc::driver::sys::CUresult::*;
    matches!(
        e.0,
        CUDA_ERROR_INVALID_IMAGE
            | CUDA_ERROR_NO_BINARY_FOR_GPU
            | CUDA_ERROR_INVALID_SOURCE
            | CUDA_ERROR_INVALID_PTX
            | CUDA_ERROR_UNSUPPORTED_PTX_VERSION
    )
}

/// What `TUNA_CUDA_EMULATE` asks for: `Ok(true)` for 1/true/yes/on, `Ok(false)` when unset, empty
/// or 0/false/no/off (any case, spaces trimmed), and the value itself for anything else.
pub fn emulation_setting() -> std::result::Result<bool, String> {
    let Ok(v) = std::env::var(EMULATE_ENV) else { return Ok(false) };
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(v),
    }
}

/// Whether `TUNA_CUDA_EMULATE` asks for the emulated device (an unrecognized value counts as a
/// request, so [`Cuda::new`] reports it instead of silently opening a GPU).
pub fn emulation_requested() -> bool {
    emulation_setting() != Ok(false)
}

/// One CUDA device: real or emulated. Every op runs on its one stream, in order.
pub struct Cuda {
    ordinal: usize,
    arch: u32,
    name: String,
    /// The most dynamic shared memory one block may opt in to, in bytes.
    max_dyn_smem: u32,
    /// Whether f32 products may run on the tensor cores in TF32 ([`Cuda::set_tf32`]).
    tf32: std::sync::atomic::AtomicBool,
    /// The tensor-core attention's check on this device (`ops::attention::self_check`).
    attn_check: DeviceCheck<crate::ops::attention::self_check::Verdict>,
    /// The products' check on this device (`ops::matmul::self_check`).
    product_check: DeviceCheck<crate::ops::matmul::self_check::ProductVerdict>,
    layer: Layer,
}

enum Layer {
    Real(Real),
    #[cfg(feature = "emulator")]
    Emu,
}

/// The real device layer: context, stream, loaded modules, cuBLAS.
struct Real {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: OnceLock<Result<cudarc::cublas::CudaBlas, String>>,
    /// cuBLASLt and its workspace, created at the first fused product (`ops::matmul`).
    lt: OnceLock<Result<Box<LtState>, String>>,
}

/// A cuBLASLt handle and the workspace its matmuls may use (one per device, [`LT_WORKSPACE`]
/// bytes). Holds the stream so the context outlives the handle.
pub(crate) struct LtState {
    pub(crate) handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    pub(crate) workspace: Mutex<cudarc::driver::CudaSlice<u8>>,
    _stream: Arc<CudaStream>,
}

/// The cuBLASLt workspace: 32 MiB (NVIDIA's recommendation for Hopper; more than enough before).
pub(crate) const LT_WORKSPACE: usize = 32 << 20;

// SAFETY: the handle is an opaque pointer cuBLASLt allows any thread to use (calls on it are
// serialized by the workspace's mutex in `ops::matmul`); it is destroyed once, in Drop.
unsafe impl Send for LtState {}
unsafe impl Sync for LtState {}

impl Drop for LtState {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate in `Cuda::lt`, destroyed only here.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.handle) };
    }
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({}: {}, sm_{})", self.ordinal, self.name, self.arch)
    }
}

/// A check a device runs once, before the first call that needs it: its verdict, computed by the
/// first caller while later ones wait.
pub struct DeviceCheck<V> {
    verdict: OnceLock<V>,
    running: Mutex<()>,
}

impl<V> Default for DeviceCheck<V> {
    fn default() -> Self {
        DeviceCheck { verdict: OnceLock::new(), running: Mutex::new(()) }
    }
}

impl<V> DeviceCheck<V> {
    /// The verdict, if the check has run.
    pub fn get(&self) -> Option<&V> {
        self.verdict.get()
    }

    /// The verdict, running `check` first if no caller has (an error is returned and not kept:
    /// the next caller runs the check again). `check` must not wait for this same check.
    pub fn get_or_run(&self, check: impl FnOnce() -> Result<V>) -> Result<&V> {
        if let Some(v) = self.verdict.get() {
            return Ok(v);
        }
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = self.verdict.get() {
            return Ok(v);
        }
        let v = check()?;
        Ok(self.verdict.get_or_init(|| v))
    }
}

impl Cuda {
    /// Open device `ordinal`, or say why not. With `TUNA_CUDA_EMULATE=1` this is the emulated
    /// device ([`Cuda::emulated`]).
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if emulation_requested() {
            if let Err(v) = emulation_setting() {
                return Err(Error::NoCuda(format!("{EMULATE_ENV}={v:?}: expected 1 (the emulated device) or 0")));
            }
            if ordinal != 0 {
                return Err(Error::NoCuda(format!(
                    "device cuda:{ordinal} requested; the emulated device is cuda:0 only"
                )));
            }
            return Cuda::emulated();
        }
        let n = probe()?;
        if ordinal >= n {
            return Err(Error::NoCuda(format!("device cuda:{ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        let (ma, mi) = ctx.compute_capability().map_err(|e| Error::cuda("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        keep_freed_memory(&ctx);
        // sm_80: 163 KiB, sm_86/89: 99 KiB, sm_90: 227 KiB; 48 KiB where the driver will not say.
        let optin = cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let max_dyn_smem = ctx.attribute(optin).map_or(DEFAULT_DYN_SMEM, |b| (b.max(0) as u32).max(DEFAULT_DYN_SMEM));
        let real = Real {
            ctx,
            stream,
            modules: Mutex::default(),
            functions: Mutex::default(),
            blas: OnceLock::new(),
            lt: OnceLock::new(),
        };
        Ok(Cuda {
            ordinal,
            arch: (ma * 10 + mi) as u32,
            name,
            max_dyn_smem,
            tf32: false.into(),
            attn_check: Default::default(),
            product_check: Default::default(),
            layer: Layer::Real(real),
        })
    }

    /// The emulated device: host memory, the kernels compiled as host C++ (one fiber per CUDA
    /// thread, exact-size NaN-poisoned shared memory), GEMM on the CPU. It reports sm_90. Only in
    /// builds with the `emulator` feature; otherwise [`Error::NoCuda`] says so.
    pub fn emulated() -> Result<Cuda> {
        #[cfg(feature = "emulator")]
        {
            let max_dyn_smem = 227 * 1024; // sm_90's
            let name = "emulated on the CPU".into();
            let (attn_check, product_check) = Default::default();
            let tf32 = false.into();
            Ok(Cuda { ordinal: 0, arch: 90, name, max_dyn_smem, tf32, attn_check, product_check, layer: Layer::Emu })
        }
        #[cfg(not(feature = "emulator"))]
        {
            Err(Error::NoCuda(format!(
                "{EMULATE_ENV} is set but this build has no emulated device (build with the `emulator` feature)"
            )))
        }
    }

    /// Let products of f32 operands run on the tensor cores in TF32 (cuBLAS
    /// `CUBLAS_COMPUTE_32F_FAST_TF32`: each operand rounded to 10 mantissa bits, products summed
    /// in f32), or not (the default: `CUBLAS_COMPUTE_32F`, f32 throughout). bf16 operands are not
    /// affected. The emulated device rounds the operands the same way (to nearest, ties to even)
    /// before its f32 product. What PyTorch calls `allow_tf32`.
    pub fn set_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether f32 products run in TF32 ([`Cuda::set_tf32`]).
    pub fn tf32(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The attention check's state (`ops::attention::self_check`).
    pub(crate) fn attention_check_state(&self) -> &DeviceCheck<crate::ops::attention::self_check::Verdict> {
        &self.attn_check
    }

    /// The products' check state (`ops::matmul::self_check`).
    pub(crate) fn product_check_state(&self) -> &DeviceCheck<crate::ops::matmul::self_check::ProductVerdict> {
        &self.product_check
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        !matches!(self.layer, Layer::Real(_))
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Compute capability as one number: 90 for sm_90.
    pub fn arch(&self) -> u32 {
        self.arch
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The most dynamic shared memory one block may use (after opting in), in bytes.
    pub fn max_dyn_smem(&self) -> u32 {
        self.max_dyn_smem
    }

    #[cfg_attr(not(feature = "emulator"), allow(unused_variables))]
    fn real(&self, what: &str) -> Result<&Real> {
        match &self.layer {
            Layer::Real(r) => Ok(r),
            #[cfg(feature = "emulator")]
            Layer::Emu => Err(Error::Unsupported {
                op: "cuda",
                device: self.device_name(),
                msg: format!("{what} needs a real CUDA device"),
            }),
        }
    }

    /// The driver context (a real device only).
    pub fn context(&self) -> Result<&Arc<CudaContext>> {
        Ok(&self.real("the driver context")?.ctx)
    }
    /// The stream every op runs on (a real device only).
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        Ok(&self.real("a stream")?.stream)
    }

    /// cuBLAS on this device's stream, created at first use (a real device only).
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        let real = self.real("cuBLAS")?;
        real.blas
            .get_or_init(|| cudarc::cublas::CudaBlas::new(real.stream.clone()).map_err(|e| format!("{e:?}")))
            .as_ref()
            .map_err(|e| Error::Cuda { context: "cublasCreate".into(), msg: e.clone() })
    }

    /// cuBLASLt on this device with its workspace, created at first use (a real device only). An
    /// error (no libcublasLt, a failed create or allocation) is kept: later calls return it too.
    pub(crate) fn lt(&self) -> Result<&LtState> {
        let real = self.real("cuBLASLt")?;
        real.lt
            .get_or_init(|| {
                // SAFETY: only tries to open the library (cudarc's loader would panic without it).
                if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
                    return Err("libcublasLt not found".into());
                }
                real.ctx.bind_to_thread().map_err(|e| format!("bind context: {e:?}"))?;
                let handle = cudarc::cublaslt::result::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
                let workspace = match real.stream.alloc_zeros::<u8>(LT_WORKSPACE) {
                    Ok(w) => w,
                    Err(e) => {
                        // SAFETY: just created, not shared.
                        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(handle) };
                        return Err(format!("cuBLASLt workspace: {e:?}"));
                    }
                };
                Ok(Box::new(LtState { handle, workspace: Mutex::new(workspace), _stream: real.stream.clone() }))
            })
            .as_ref()
            .map(|b| &**b)
            .map_err(|e| Error::Cuda { context: "cuBLASLt".into(), msg: e.clone() })
    }

    /// Kernel `function` of `kernels/<module>.cu` on the real device, compiling/loading the module
    /// on first use: nvcc-precompiled PTX for this arch where build.rs made one, else an NVRTC
    /// cubin from the disk cache or compiled now.
    pub fn function(&self, module: &'static str, function: &str) -> Result<CudaFunction> {
        let real = self.real("loading a kernel")?;
        let key = format!("{module}::{function}");
        if let Some(f) = real.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(real, module)?;
        let f = m.load_function(function).map_err(|e| Error::cuda(format!("load {key}"), e))?;
        real.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, real: &Real, name: &'static str) -> Result<Arc<CudaModule>> {
        if let Some(m) = real.modules.lock().unwrap().get(name) {
            return Ok(m.clone());
        }
        let src = sources::source(name)
            .ok_or_else(|| Error::Invalid { op: "cuda module", msg: format!("no kernels/{name}.cu embedded") })?;
        let m = match src.precompiled_ptx.iter().find(|(a, _)| *a == self.arch) {
            Some((_, ptx)) => real
                .ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                .map_err(|e| Error::cuda(format!("load module {name}"), e))?,
            None => {
                let cubin = compile::cached_cubin(src, self.arch)?;
                match real.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)) {
                    Ok(m) => m,
                    // A cached cubin the driver refuses as an image (written by another driver or
                    // toolkit, or damaged): compile it again, replacing the cache entry, and load
                    // that. Other failures (out of memory, a lost context) are errors as they are.
                    Err(first) if refused_image(&first) => {
                        let cubin = compile::recompile_cubin(src, self.arch)?;
                        real.ctx
                            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                            .map_err(|e| Error::cuda(format!("load module {name} (recompiled after: {first:?})"), e))?
                    }
                    Err(e) => return Err(Error::cuda(format!("load module {name}"), e)),
                }
            }
        };
        real.modules.lock().unwrap().insert(name, m.clone());
        Ok(m)
    }

    /// Run one launch on this device.
    ///
    /// # Safety
    /// The launch's arguments must be, in order, what the kernel's C signature declares (by-value
    /// structs laid out as the C structs; buffers of the element types its pointers name), every
    /// buffer must hold what the kernel indexes for this grid, and the dynamic shared memory must
    /// be what the kernel's shared arrays need. The launchers state why each of theirs is.
    pub unsafe fn launch(&self, mut l: Launch<'_>, cfg: LaunchConfig) -> Result<()> {
        let what = launch::describe(&l.kernel, &cfg);
        match &self.layer {
            Layer::Real(real) => {
                let f = self.function(l.module, &l.kernel)?;
                let smem = cfg.shared_mem_bytes;
                if smem > DEFAULT_DYN_SMEM {
                    f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                        .map_err(|e| Error::cuda(format!("{what}: allow {smem} B of shared memory"), e))?;
                }
                let args = &mut l.args;
                let mut b = real.stream.launch_builder(&f);
                for a in args.iter_mut() {
                    match a {
                        Arg::Val(bytes) => {
                            cudarc::driver::PushKernelArg::arg(&mut b, &*bytes);
                        }
                        Arg::In(x) => x.push_real(&mut b)?,
                        Arg::Out(x) => x.push_real_mut(&mut b)?,
                    }
                }
                // SAFETY: the caller guarantees the arguments match the kernel (this function's
                // contract); cudarc records the buffers' reads and writes on the stream.
                unsafe { b.launch(cfg) }.map_err(|e| Error::cuda(what, e))?;
                Ok(())
            }
            #[cfg(feature = "emulator")]
            Layer::Emu => {
                // The kernel's C signature, as the emulator compiled it: every by-value argument
                // must have its parameter's size (a Rust struct that drifted from its C twin shows
                // here), every buffer a pointer's.
                if let Some(sizes) = emu::kernel_params(&l.kernel) {
                    let given: Vec<u32> = l
                        .args
                        .iter()
                        .map(|a| match a {
                            Arg::Val(bytes) => bytes.size as u32,
                            Arg::In(_) | Arg::Out(_) => std::mem::size_of::<*const u8>() as u32,
                        })
                        .collect();
                    if given != sizes {
                        return Err(Error::Cuda {
                            context: what,
                            msg: format!("argument sizes {given:?} do not match the kernel's parameters {sizes:?}"),
                        });
                    }
                }
                // kernelParams semantics: each entry points at the argument's value; for a buffer
                // the value is its host pointer, kept in `slots` (sized first: no reallocation).
                let mut slots: Vec<*mut std::ffi::c_void> = Vec::with_capacity(l.args.len());
                for a in l.args.iter_mut() {
                    slots.push(match a {
                        Arg::Val(bytes) => bytes as *mut launch::ArgBytes as *mut std::ffi::c_void,
                        Arg::In(x) => x.host_ptr()?,
                        Arg::Out(x) => x.host_ptr_mut()?,
                    });
                }
                let mut params: Vec<*mut std::ffi::c_void> = Vec::with_capacity(slots.len());
                for (a, slot) in l.args.iter().zip(slots.iter_mut()) {
                    params.push(match a {
                        Arg::Val(_) => *slot,
                        Arg::In(_) | Arg::Out(_) => slot as *mut *mut std::ffi::c_void as *mut std::ffi::c_void,
                    });
                }
                let (g, b) = (cfg.grid_dim, cfg.block_dim);
                emu_log::launched(&l.kernel, &cfg);
                // SAFETY: `params` follows cuLaunchKernel's convention over values that live until
                // the call returns (the bytes in `l.args`, the pointers in `slots`, the buffers
                // borrowed by `l`); the caller guarantees they match the kernel.
                unsafe { emu::launch(&l.kernel, [g.0, g.1, g.2], [b.0, b.1, b.2], cfg.shared_mem_bytes, &mut params) }
                    .map_err(|msg| Error::Cuda { context: what, msg })
            }
        }
    }

    /// Copy a host slice to a new device buffer (an empty slice gives an empty buffer, as on the CPU).
    pub fn upload<E: CudaElem>(&self, host: &[E]) -> Result<CudaBuf<E>> {
        if host.is_empty() {
            return self.zeros(0);
        }
        let mem = match &self.layer {
            Layer::Real(r) => Mem::Real(r.stream.clone_htod(host).map_err(|e| Error::cuda("upload", e))?),
            #[cfg(feature = "emulator")]
            Layer::Emu => Mem::Emu(host.to_vec()),
        };
        Ok(CudaBuf { mem, len: host.len() })
    }
    /// Copy a device buffer to a new host vector (synchronizes the stream). The copy is of the
    /// buffer's [`CudaBuf::len`] elements.
    pub fn download<E: CudaElem>(&self, dev: &CudaBuf<E>) -> Result<Vec<E>> {
        match (&self.layer, &dev.mem) {
            (Layer::Real(_), Mem::Real(_)) if dev.len == 0 => Ok(Vec::new()),
            (Layer::Real(r), Mem::Real(s)) => r.stream.clone_dtoh(s).map_err(|e| Error::cuda("download", e)),
            #[cfg(feature = "emulator")]
            (Layer::Emu, Mem::Emu(v)) => Ok(v.clone()),
            _ => Err(Error::Invalid { op: "download", msg: "the buffer belongs to another device layer".into() }),
        }
    }
    /// A zeroed device buffer of `n` elements.
    pub fn zeros<E: CudaElem>(&self, n: usize) -> Result<CudaBuf<E>> {
        let mem = match &self.layer {
            // The driver cannot allocate zero bytes: an empty buffer holds one element it never shows.
            Layer::Real(r) => Mem::Real(r.stream.alloc_zeros::<E>(n.max(1)).map_err(|e| Error::cuda("alloc", e))?),
            #[cfg(feature = "emulator")]
            Layer::Emu => Mem::Emu(vec![E::default(); n]),
        };
        Ok(CudaBuf { mem, len: n })
    }
    /// A device buffer of `n` elements with no defined contents, for an output its kernel writes
    /// in full before anything reads it: no memset pass. On the emulated device every byte is
    /// 0xFF (NaN for f32 and bf16, the largest value for the integers), so an element a kernel
    /// leaves unwritten shows in the tests that compare its output.
    pub fn unfilled<E: CudaElem>(&self, n: usize) -> Result<CudaBuf<E>> {
        let mem = match &self.layer {
            // SAFETY: cudarc's alloc leaves device memory unset; a CudaSlice of plain-old-data
            // elements (CudaElem: f32, bf16, u8, u32, i32) is valid with any bytes, and the callers
            // write every element before reading it.
            Layer::Real(r) => Mem::Real(unsafe { r.stream.alloc::<E>(n.max(1)) }.map_err(|e| Error::cuda("alloc", e))?),
            #[cfg(feature = "emulator")]
            Layer::Emu => {
                let mut v = vec![E::default(); n];
                // SAFETY: the elements are plain-old-data types for which every bit pattern is a
                // value (see CudaElem), and the byte count is the vector's own.
                unsafe { std::ptr::write_bytes(v.as_mut_ptr() as *mut u8, 0xFF, n * std::mem::size_of::<E>()) };
                Mem::Emu(v)
            }
        };
        Ok(CudaBuf { mem, len: n })
    }
    /// Set every element of `buf` to zero, in stream order.
    pub fn memset_zeros<E: CudaElem>(&self, buf: &mut CudaBuf<E>) -> Result<()> {
        match (&self.layer, &mut buf.mem) {
            (Layer::Real(r), Mem::Real(s)) => r.stream.memset_zeros(s).map_err(|e| Error::cuda("memset", e)),
            #[cfg(feature = "emulator")]
            (Layer::Emu, Mem::Emu(v)) => {
                v.fill(E::default());
                Ok(())
            }
            _ => Err(Error::Invalid { op: "memset", msg: "the buffer belongs to another device layer".into() }),
        }
    }
    /// Wait for all work on the stream (the emulated device runs each launch to completion).
    pub fn synchronize(&self) -> Result<()> {
        match &self.layer {
            Layer::Real(r) => r.stream.synchronize().map_err(|e| Error::cuda("synchronize", e)),
            #[cfg(feature = "emulator")]
            Layer::Emu => Ok(()),
        }
    }
}

impl Backend for Cuda {
    type Buf<E: Elem> = CudaBuf<E>;
    fn len<E: Elem>(buf: &CudaBuf<E>) -> usize {
        buf.len()
    }
    fn device_name(&self) -> String {
        format!("cuda:{} ({}, sm_{})", self.ordinal, self.name, self.arch)
    }
    /// 2^25 elements (128 MiB of f32 logits, 64 MiB of bf16): GPT-2's 50,257-token head in 667-row
    /// chunks (13 for 8 x 1024 tokens, against 99 at the CPU's 83 rows, each of which reads and
    /// writes the whole `[vocab, hidden]` weight gradient once).
    fn chunk_elems(&self) -> usize {
        1 << 25
    }
}

impl<E: CudaElem> crate::backend::Alloc<E> for Cuda {
    type Owned = CudaBuf<E>;
    fn buf(o: &CudaBuf<E>) -> &CudaBuf<E> {
        o
    }
    fn buf_mut(o: &mut CudaBuf<E>) -> &mut CudaBuf<E> {
        o
    }
    fn zeros(&self, n: usize) -> Result<CudaBuf<E>> {
        Cuda::zeros(self, n)
    }
    fn unfilled(&self, n: usize) -> Result<CudaBuf<E>> {
        Cuda::unfilled(self, n)
    }
    fn from_host(&self, host: &[E]) -> Result<CudaBuf<E>> {
        self.upload(host)
    }
    fn to_host(&self, o: &CudaBuf<E>) -> Result<Vec<E>> {
        self.download(o)
    }
}

/// A 1-D launch of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `block` threads per row, `rows` blocks (rows up to 2^31-1).
pub fn grid_rows(rows: usize, block: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes }
}

/// The kernel symbol `<op>_<dir>_<dtype>`.
pub fn symbol<E: Elem>(op: &str, dir: &str) -> String {
    format!("{op}_{dir}_{}", E::NAME)
}
