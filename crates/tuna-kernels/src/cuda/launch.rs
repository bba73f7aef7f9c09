//! One launch description, two executors: a launcher builds a [`Launch`] (the kernel, its grid,
//! block and dynamic shared memory, and its arguments in the kernel's order) and
//! [`crate::Cuda::launch`] runs it on the real device through the driver, or on the emulated device
//! (the same `.cu` compiled as host C++), so a launcher's configuration and parameter structs are
//! what both run.

use crate::cuda::buf::{CudaBuf, Mem};
use crate::cuda::CudaElem;
use crate::error::{Error, Result};
use cudarc::driver::{DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use std::ffi::c_void;

/// Plain data a kernel takes by value: scalars and the `#[repr(C)]` parameter structs.
///
/// # Safety
/// The type's bytes must be exactly the C type the kernel declares for that argument (same size,
/// field offsets and alignment at most 16), with no padding the kernel reads, and no pointers.
pub unsafe trait KernelArg: Copy + 'static {}

// SAFETY: C's unsigned/int/unsigned long long/float have these sizes and alignments on every
// target CUDA and the emulator build for (LP64).
unsafe impl KernelArg for u32 {}
unsafe impl KernelArg for i32 {}
unsafe impl KernelArg for u64 {}
unsafe impl KernelArg for f32 {}

/// Largest by-value argument (the biggest parameter struct is well below it).
const ARG_BYTES: usize = 128;

/// A by-value argument's bytes, aligned for any of the parameter structs.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct ArgBytes {
    /// The value's bytes; uninitialized past `size` and wherever the value has padding.
    bytes: [std::mem::MaybeUninit<u8>; ARG_BYTES],
    /// The value's size (what the kernel's parameter must be).
    pub(crate) size: usize,
}

// SAFETY: cudarc passes `&ArgBytes` as a pointer to its first byte (`bytes` is the first field
// of a repr(C) struct), which is where the value was copied; the driver reads the kernel's declared size of the argument from there.
unsafe impl DeviceRepr for ArgBytes {}

impl ArgBytes {
    fn of<T: KernelArg>(v: &T) -> ArgBytes {
        let n = std::mem::size_of::<T>();
        assert!(n <= ARG_BYTES && std::mem::align_of::<T>() <= 16, "kernel argument of {n} bytes");
        let mut b = ArgBytes { bytes: [std::mem::MaybeUninit::uninit(); ARG_BYTES], size: n };
        // SAFETY: T is Copy plain data of n <= ARG_BYTES bytes; the bytes land in MaybeUninit
        // storage (padding may be uninitialized, which MaybeUninit<u8> may hold); no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(v as *const T as *const std::mem::MaybeUninit<u8>, b.bytes.as_mut_ptr(), n)
        };
        b
    }
}

/// A buffer argument of any element type.
#[doc(hidden)]
pub trait BufArg {
    fn push_real<'b>(&'b self, l: &mut LaunchArgs<'b>) -> Result<()>;
    fn push_real_mut<'b>(&'b mut self, l: &mut LaunchArgs<'b>) -> Result<()>;
    fn host_ptr(&self) -> Result<*mut c_void>;
    fn host_ptr_mut(&mut self) -> Result<*mut c_void>;
}

fn mixed() -> Error {
    Error::Invalid {
        op: "cuda launch",
        msg: "a buffer of the emulated device passed to a real one, or the reverse".into(),
    }
}

impl<E: CudaElem> BufArg for CudaBuf<E> {
    fn push_real<'b>(&'b self, l: &mut LaunchArgs<'b>) -> Result<()> {
        match &self.mem {
            Mem::Real(s) => {
                l.arg(s);
                Ok(())
            }
            Mem::Emu(_) => Err(mixed()),
        }
    }
    fn push_real_mut<'b>(&'b mut self, l: &mut LaunchArgs<'b>) -> Result<()> {
        match &mut self.mem {
            Mem::Real(s) => {
                l.arg(s);
                Ok(())
            }
            Mem::Emu(_) => Err(mixed()),
        }
    }
    fn host_ptr(&self) -> Result<*mut c_void> {
        match &self.mem {
            // The kernel only reads through an input pointer (the launchers' SAFETY comments).
            Mem::Emu(v) => Ok(v.as_ptr() as *mut c_void),
            Mem::Real(_) => Err(mixed()),
        }
    }
    fn host_ptr_mut(&mut self) -> Result<*mut c_void> {
        match &mut self.mem {
            Mem::Emu(v) => Ok(v.as_mut_ptr() as *mut c_void),
            Mem::Real(_) => Err(mixed()),
        }
    }
}

#[doc(hidden)]
pub enum Arg<'a> {
    Val(ArgBytes),
    In(&'a dyn BufArg),
    Out(&'a mut dyn BufArg),
}

/// What [`Launch::arg`] takes: a by-value [`KernelArg`] (copied now), a buffer the kernel reads
/// (`&CudaBuf`) or one it writes (`&mut CudaBuf`).
pub trait IntoArg<'a> {
    #[doc(hidden)]
    fn into_arg(self) -> Arg<'a>;
}

impl<'a, T: KernelArg> IntoArg<'a> for &'a T {
    fn into_arg(self) -> Arg<'a> {
        Arg::Val(ArgBytes::of(self))
    }
}
impl<'a, E: CudaElem> IntoArg<'a> for &'a CudaBuf<E> {
    fn into_arg(self) -> Arg<'a> {
        Arg::In(self)
    }
}
impl<'a, E: CudaElem> IntoArg<'a> for &'a mut CudaBuf<E> {
    fn into_arg(self) -> Arg<'a> {
        Arg::Out(self)
    }
}

/// One kernel launch's kernel and arguments: `module` is the `kernels/<module>.cu` file,
/// `kernel` its `extern "C"` symbol; [`crate::Cuda::launch`] runs it with a grid.
pub struct Launch<'a> {
    pub(crate) module: &'static str,
    pub(crate) kernel: String,
    pub(crate) args: Vec<Arg<'a>>,
}

impl<'a> Launch<'a> {
    pub fn new(module: &'static str, kernel: impl Into<String>) -> Self {
        Launch { module, kernel: kernel.into(), args: Vec::with_capacity(16) }
    }
    /// The next argument, in the kernel's order.
    pub fn arg<A: IntoArg<'a>>(&mut self, a: A) -> &mut Self {
        self.args.push(a.into_arg());
        self
    }
}

/// `kernel (grid) x (block), smem B`, for errors.
pub(crate) fn describe(kernel: &str, cfg: &LaunchConfig) -> String {
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    format!("{kernel} ({}x{}x{} blocks of {}x{}x{}, {} B shared)", g.0, g.1, g.2, b.0, b.1, b.2, cfg.shared_mem_bytes)
}
