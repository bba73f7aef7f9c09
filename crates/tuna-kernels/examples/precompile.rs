//! Compile every embedded kernel with NVRTC for the given archs into the kernel cache
//! (`TUNA_KERNEL_CACHE`, else the user's cache folder), so that a later run on a GPU of that arch
//! loads cubins instead of compiling. The GPU bundle (`scripts/gpu/bundle.sh`) runs it for sm_90
//! with the same NVRTC (13.0) the GPU machines have: the cache key holds NVRTC's version, so a
//! cubin from another version is never reused.
//!
//! Run: `cargo run -p tuna-kernels --example precompile -- 90 [80 ...]` (needs libnvrtc on the
//! loader path, e.g. `.nvrtc/nvidia/cu13/lib` after `bash scripts/install-nvrtc.sh`).

use tuna_kernels::cuda::compile::{cache_dir, cached_cubin, nvrtc_present, nvrtc_version};
use tuna_kernels::cuda::sources::ALL;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let archs: Vec<u32> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    if archs.is_empty() {
        return Err("usage: precompile <sm arch, e.g. 90> [more archs]".into());
    }
    if !nvrtc_present() {
        return Err(
            "libnvrtc not found on the loader path (bash scripts/install-nvrtc.sh, then LD_LIBRARY_PATH)".into()
        );
    }
    let (ma, mi) = nvrtc_version().ok_or("nvrtcVersion failed")?;
    for arch in archs {
        for k in ALL {
            let cubin = cached_cubin(k, arch)?;
            println!("sm_{arch} kernels/{}.cu: {} KiB (NVRTC {ma}.{mi})", k.name, cubin.len().div_ceil(1024));
        }
    }
    println!("cache: {}", cache_dir().display());
    Ok(())
}
