//! The CUDA backend: context, stream, the loaded-module cache, cuBLAS, and launch helpers.
//!
//! Nothing here panics on a machine without a driver: [`probe`] checks for `libcuda` before any
//! context is made (cudarc's `CudaContext::new` would panic), and [`Cuda::new`] returns
//! [`Error::NoCuda`] with the reason.

pub mod compile;
pub mod sources;

use crate::backend::{Backend, Elem};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use cudarc;
pub use sources::KernelSource;

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

/// One CUDA device: its context, one stream that every op runs on, loaded modules, cuBLAS.
pub struct Cuda {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: u32,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: OnceLock<Result<cudarc::cublas::CudaBlas, String>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({}: {}, sm_{})", self.ordinal, self.name, self.arch)
    }
}

impl Cuda {
    /// Open device `ordinal`, or say why not.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let n = probe()?;
        if ordinal >= n {
            return Err(Error::NoCuda(format!("device cuda:{ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        let (ma, mi) = ctx.compute_capability().map_err(|e| Error::cuda("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        Ok(Cuda {
            ordinal,
            ctx,
            stream,
            arch: (ma * 10 + mi) as u32,
            name,
            modules: Mutex::default(),
            functions: Mutex::default(),
            blas: OnceLock::new(),
        })
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
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// cuBLAS on this device's stream, created at first use.
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        self.blas
            .get_or_init(|| cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(|e| format!("{e:?}")))
            .as_ref()
            .map_err(|e| Error::Cuda { context: "cublasCreate".into(), msg: e.clone() })
    }

    /// Kernel `function` of `kernels/<module>.cu`, compiling/loading the module on first use:
    /// nvcc-precompiled PTX for this arch where build.rs made one, else an NVRTC cubin from the
    /// disk cache or compiled now.
    pub fn function(&self, module: &'static str, function: &str) -> Result<CudaFunction> {
        let key = format!("{module}::{function}");
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(function).map_err(|e| Error::cuda(format!("load {key}"), e))?;
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.lock().unwrap().get(name) {
            return Ok(m.clone());
        }
        let src = sources::source(name)
            .ok_or_else(|| Error::Invalid { op: "cuda module", msg: format!("no kernels/{name}.cu embedded") })?;
        let image = match src.precompiled_ptx.iter().find(|(a, _)| *a == self.arch) {
            Some((_, ptx)) => cudarc::nvrtc::Ptx::from_src(*ptx),
            None => cudarc::nvrtc::Ptx::from_binary(compile::cached_cubin(src, self.arch)?),
        };
        let m = self.ctx.load_module(image).map_err(|e| Error::cuda(format!("load module {name}"), e))?;
        self.modules.lock().unwrap().insert(name, m.clone());
        Ok(m)
    }

    /// Copy a host slice to a new device buffer.
    pub fn upload<E: CudaElem>(&self, host: &[E]) -> Result<CudaSlice<E>> {
        self.stream.clone_htod(host).map_err(|e| Error::cuda("upload", e))
    }
    /// Copy a device buffer to a new host vector (synchronizes the stream).
    pub fn download<E: CudaElem>(&self, dev: &CudaSlice<E>) -> Result<Vec<E>> {
        self.stream.clone_dtoh(dev).map_err(|e| Error::cuda("download", e))
    }
    /// A zeroed device buffer of `n` elements.
    pub fn zeros<E: CudaElem>(&self, n: usize) -> Result<CudaSlice<E>> {
        self.stream.alloc_zeros::<E>(n).map_err(|e| Error::cuda("alloc", e))
    }
    /// Wait for all work on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::cuda("synchronize", e))
    }
}

impl Backend for Cuda {
    type Buf<E: Elem> = CudaSlice<E>;
    fn len<E: Elem>(buf: &CudaSlice<E>) -> usize {
        buf.len()
    }
    fn device_name(&self) -> String {
        format!("cuda:{} ({}, sm_{})", self.ordinal, self.name, self.arch)
    }
}

impl<E: CudaElem> crate::backend::Alloc<E> for Cuda {
    type Owned = CudaSlice<E>;
    fn buf(o: &CudaSlice<E>) -> &CudaSlice<E> {
        o
    }
    fn buf_mut(o: &mut CudaSlice<E>) -> &mut CudaSlice<E> {
        o
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<E>> {
        Cuda::zeros(self, n)
    }
    fn from_host(&self, host: &[E]) -> Result<CudaSlice<E>> {
        self.upload(host)
    }
    fn to_host(&self, o: &CudaSlice<E>) -> Result<Vec<E>> {
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
