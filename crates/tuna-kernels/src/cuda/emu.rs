//! The emulated CUDA device's C ABI (`emu/emu.cpp`, built by build.rs with the `emulator`
//! feature), wrapped for Rust: launch a kernel of `kernels/*.cu` compiled as host C++ on host
//! memory, look up the compiler's layout of a kernel parameter struct, list the kernels.
//!
//! Every CUDA thread of a block runs as a fiber; blocks run one after another on the calling
//! thread (or on `TUNA_EMU_THREADS` worker threads). `__syncthreads`, warp shuffles/votes and
//! `__syncwarp` behave as on the device, and misuse (a barrier in divergent code, a warp op with
//! exited lanes, a deadlock) is an error instead of a hang. Shared memory is a fresh allocation
//! per block of exactly the launch's bytes, filled with NaN. Launches from several threads at
//! once are independent. Environment (read once): `TUNA_EMU_THREADS` (workers per launch,
//! default 1: deterministic atomics), `TUNA_EMU_STACK_KB` (fiber stack, default 64, 512 with
//! ASan), `TUNA_EMU_SCHEDULE=reverse` (run ready threads in descending order, to expose code that
//! depends on the order of threads between barriers).

use std::ffi::{c_char, c_int, c_long, c_uint, c_ulonglong, c_void, CStr, CString};

extern "C" {
    fn tuna_emu_launch(
        kernel: *const c_char,
        grid: *const c_uint,
        block: *const c_uint,
        dyn_smem: c_uint,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tuna_emu_struct_layout(
        name: *const c_char,
        size: *mut c_ulonglong,
        offsets: *mut c_ulonglong,
        max_fields: usize,
        nfields: *mut usize,
    ) -> c_int;
    fn tuna_emu_kernel_count() -> usize;
    fn tuna_emu_kernel_name(i: usize) -> *const c_char;
    fn tuna_emu_launches(kernel: *const c_char) -> c_ulonglong;
    fn tuna_emu_kernel_params(kernel: *const c_char, sizes: *mut c_uint, max: usize) -> c_long;
    fn tuna_emu_struct_count() -> usize;
    fn tuna_emu_struct_name(i: usize) -> *const c_char;
}

/// Why a launch failed: the C ABI's return code and the emulator's message (which names the
/// kernel, and the block and thread where one is to blame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// 1: no kernel of that name is compiled in.
    UnknownKernel(String),
    /// 2: an invalid launch configuration (a zero or oversized grid/block dim, more threads than
    /// `__launch_bounds__`, too much shared memory, a block that is not a multiple of 32 threads
    /// for a kernel using warp ops, the wrong number of arguments).
    Invalid(String),
    /// 3: a fault while running (barrier divergence, deadlock, a warp op with exited lanes,
    /// `__trap()`).
    Fault(String),
}

impl LaunchError {
    /// The C ABI's return code (1, 2 or 3).
    pub fn code(&self) -> i32 {
        match self {
            LaunchError::UnknownKernel(_) => 1,
            LaunchError::Invalid(_) => 2,
            LaunchError::Fault(_) => 3,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            LaunchError::UnknownKernel(m) | LaunchError::Invalid(m) | LaunchError::Fault(m) => m,
        }
    }
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "emulated CUDA launch failed (error {}): {}", self.code(), self.message())
    }
}

impl std::error::Error for LaunchError {}

fn cstring(s: &str) -> Option<CString> {
    CString::new(s).ok()
}

/// The byte sizes of `kernel`'s parameters in declaration order, `None` for an unknown kernel.
pub fn kernel_params(kernel: &str) -> Option<Vec<u32>> {
    let name = cstring(kernel)?;
    // SAFETY: `name` is NUL-terminated; a null `sizes` only asks for the count.
    let n = unsafe { tuna_emu_kernel_params(name.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return None;
    }
    let mut sizes = vec![0u32; n as usize];
    // SAFETY: `sizes` has room for the `n` sizes written.
    unsafe { tuna_emu_kernel_params(name.as_ptr(), sizes.as_mut_ptr(), sizes.len()) };
    Some(sizes)
}

/// Runs `kernel` (its `extern "C"` name) over `grid` x `block` threads with `dyn_smem` bytes of
/// dynamic shared memory, synchronously: every block has run when it returns. `args[i]` points at
/// the value of the kernel's i-th argument, as cuLaunchKernel's `kernelParams` (for a pointer
/// argument, at the pointer). The number of arguments is checked against the kernel's.
///
/// # Safety
/// This runs C++ code that dereferences what the arguments point to, so the caller guarantees,
/// as for a real launch:
/// - each `args[i]` points at a live, initialized value of exactly the type of the kernel's i-th
///   parameter (a `#[repr(C)]` struct whose layout matches the C++ one: see [`struct_layout`]; a
///   `*const T`/`*mut T` for a pointer parameter, where `T` has the C++ element's size and
///   representation, e.g. `half::bf16` for `bf16_t`);
/// - every pointer argument points into host memory valid, for the whole call, for every element
///   the kernel reads or writes with this grid and these parameters (buffers sized as the
///   launcher's shape checks require), and memory the kernel writes is not aliased by a live
///   Rust reference (`&`/`&mut`) used concurrently by another thread;
/// - no other thread writes memory this kernel reads while it runs (the kernel's own atomics
///   excepted).
///
/// Nothing else is required: the emulator validates the name, the launch configuration, the
/// argument count and non-null `args[i]`, and reports faults as errors rather than hanging.
pub unsafe fn launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    args: &mut [*mut c_void],
) -> Result<(), String> {
    // SAFETY: the same contract, passed on to the caller.
    unsafe { try_launch(kernel, grid, block, dyn_smem, args) }.map_err(|e| e.to_string())
}

/// [`launch`], with the error's kind ([`LaunchError::code`]) kept apart from its message.
///
/// # Safety
/// As [`launch`].
pub unsafe fn try_launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    args: &mut [*mut c_void],
) -> Result<(), LaunchError> {
    let Some(name) = cstring(kernel) else {
        return Err(LaunchError::UnknownKernel(format!("unknown kernel {kernel:?} (contains a NUL byte)")));
    };
    match kernel_params(kernel) {
        None => {} // the emulator reports it (error 1)
        Some(p) if p.len() != args.len() => {
            return Err(LaunchError::Invalid(format!(
                "invalid launch of kernel {kernel}: {} argument(s) given, it takes {} (parameter sizes {p:?})",
                args.len(),
                p.len()
            )))
        }
        Some(_) => {}
    }
    let mut err = vec![0u8; 16 * 1024];
    // SAFETY: name, grid, block and err are valid for the call (err_len is err's length); the
    // args contract is the caller's (above). The emulator reads args[0..nparams] only, with
    // nparams == args.len() as checked above.
    let rc = unsafe {
        tuna_emu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dyn_smem,
            args.as_mut_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    Err(match rc {
        1 => LaunchError::UnknownKernel(msg),
        2 => LaunchError::Invalid(msg),
        _ => LaunchError::Fault(msg),
    })
}

/// `(size, field offsets in declaration order)` of the kernel parameter struct `name` (one passed
/// by value to some kernel, e.g. `"LayerNormParams"`) as the C++ compiler lays it out; `None` if
/// no kernel takes a struct of that name.
pub fn struct_layout(name: &str) -> Option<(u64, Vec<u64>)> {
    let name = cstring(name)?;
    let (mut size, mut n) = (0u64, 0usize);
    // SAFETY: name is NUL-terminated; with max_fields 0 no offset is written.
    if unsafe { tuna_emu_struct_layout(name.as_ptr(), &mut size, std::ptr::null_mut(), 0, &mut n) } != 0 {
        return None;
    }
    let mut offsets = vec![0u64; n];
    // SAFETY: offsets has room for the n offsets written.
    unsafe { tuna_emu_struct_layout(name.as_ptr(), &mut size, offsets.as_mut_ptr(), n, &mut n) };
    Some((size, offsets))
}

/// The names of every parameter struct the emulator knows (every struct passed by value to a
/// compiled kernel).
pub fn structs() -> Vec<String> {
    // SAFETY: plain calls; every index below the count names a static NUL-terminated string.
    (0..unsafe { tuna_emu_struct_count() })
        .map(|i| unsafe { CStr::from_ptr(tuna_emu_struct_name(i)) }.to_string_lossy().into_owned())
        .collect()
}

/// Every kernel compiled into the emulator: the `extern "C" __global__` functions of
/// `kernels/*.cu`, plus the emulator's own test kernels (`emu_test_*`).
pub fn kernels() -> Vec<String> {
    // SAFETY: plain calls; every index below the count names a static NUL-terminated string.
    (0..unsafe { tuna_emu_kernel_count() })
        .map(|i| unsafe { CStr::from_ptr(tuna_emu_kernel_name(i)) }.to_string_lossy().into_owned())
        .collect()
}

/// Launches of `kernel` so far in this process that passed validation and ran (faulted ones
/// included); 0 for an unknown kernel.
pub fn launches(kernel: &str) -> u64 {
    match cstring(kernel) {
        // SAFETY: NUL-terminated name.
        Some(n) => unsafe { tuna_emu_launches(n.as_ptr()) },
        None => 0,
    }
}

/// Whether the emulator library was built with AddressSanitizer and UBSan (`TUNA_EMU_SANITIZE=1`).
pub fn sanitized() -> bool {
    option_env!("TUNA_EMU_SANITIZED") == Some("1")
}
