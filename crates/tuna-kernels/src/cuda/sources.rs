//! The kernel sources embedded by build.rs.

/// One `kernels/<name>.cu`, its local includes inlined.
#[derive(Debug)]
pub struct KernelSource {
    /// File stem: `attention` for `kernels/attention.cu`.
    pub name: &'static str,
    /// Expanded CUDA C++ source.
    pub src: &'static str,
    /// FNV-1a of `src`: the disk-cache key (with the arch).
    pub hash: u64,
    /// PTX precompiled by nvcc at build time, by arch (e.g. 90), where nvcc was present.
    pub precompiled_ptx: &'static [(u32, &'static str)],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The embedded source named `name`.
pub fn source(name: &str) -> Option<&'static KernelSource> {
    ALL.iter().find(|k| k.name == name)
}
