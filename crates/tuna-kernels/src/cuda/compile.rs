//! NVRTC compilation of the embedded kernels, the on-disk cache (keyed by source hash and
//! arch), and the ptxas resource report the compile check prints.

use super::sources::KernelSource;
use crate::error::{Error, Result};
use cudarc::nvrtc::{result as nvrtc, sys};
use std::ffi::{c_char, CString};
use std::path::PathBuf;

/// Whether libnvrtc can be loaded (looked up through the dynamic loader's path, e.g.
/// `LD_LIBRARY_PATH`). Never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names; no NVRTC call is made.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version, where it loads.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut ma, mut mi) = (0, 0);
    // SAFETY: the library is present; nvrtcVersion writes two ints.
    let r = unsafe { sys::nvrtcVersion(&mut ma, &mut mi) };
    (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some((ma, mi))
}

/// The NVRTC options every kernel is compiled with (the cache key includes them).
fn options(arch: u32) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture=sm_{arch}"), "--std=c++17".into(), "-lineinfo".into()];
    if let Ok(inc) = std::env::var("TUNA_CUDA_INCLUDE") {
        o.push(format!("--include-path={inc}"));
    }
    o
}

/// The result of one compilation: a cubin for a real arch, plus the compiler log.
#[derive(Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Compile `k` for `sm_<arch>` into a cubin. `verbose` asks ptxas for its resource report.
pub fn compile(k: &KernelSource, arch: u32, verbose: bool) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(Error::NoCuda("libnvrtc not found (set LD_LIBRARY_PATH to a CUDA 13 lib dir)".into()));
    }
    let arch_s = format!("sm_{arch}");
    let fail = |log: String| Error::Compile { kernel: k.name.into(), arch: arch_s.clone(), log };
    let src = CString::new(k.src).map_err(|e| fail(e.to_string()))?;
    let name = CString::new(format!("{}.cu", k.name)).unwrap();
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let mut opts = options(arch);
    if verbose {
        opts.push("--ptxas-options=-v".into());
    }
    // SAFETY: `prog` is a live program created above; options are plain strings.
    let status = unsafe { nvrtc::compile_program(prog, &opts) };
    // SAFETY: reading the log of a live program.
    let log = unsafe { nvrtc::get_program_log(prog) }.map(|l| cstr_vec(&l)).unwrap_or_default();
    let result = match status {
        Err(e) => Err(fail(format!("{e:?}\n{log}"))),
        Ok(()) => {
            let mut n = 0usize;
            // SAFETY: live, successfully compiled program; buffer sized by NVRTC.
            let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) };
            let mut cubin = vec![0u8; n];
            // SAFETY: `cubin` has the size NVRTC reported.
            let r2 = unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) };
            if r != sys::nvrtcResult::NVRTC_SUCCESS || r2 != sys::nvrtcResult::NVRTC_SUCCESS || n == 0 {
                Err(fail(format!("no cubin produced ({r:?}, {r2:?})\n{log}")))
            } else {
                Ok(Compiled { cubin, log })
            }
        }
    };
    // SAFETY: destroying the program we created, once.
    unsafe { nvrtc::destroy_program(prog) }.ok();
    result
}

fn cstr_vec(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where compiled kernels are cached: `$TUNA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tuna/kernels`,
/// else `~/.cache/tuna/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TUNA_KERNEL_CACHE") {
        return d.into();
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())).join(".cache"));
    base.join("tuna").join("kernels")
}

/// The cubin for `k` on `sm_<arch>`: from the disk cache where present, else compiled by NVRTC
/// and written to the cache atomically (temp file + rename). A cache that cannot be written is
/// not an error: the kernel is still returned.
pub fn cached_cubin(k: &KernelSource, arch: u32) -> Result<Vec<u8>> {
    cubin_in(&cache_dir(), k, arch, true)
}

/// The cubin for `k` on `sm_<arch>` compiled now, replacing the cache entry (for a cached cubin
/// the driver refused to load).
pub fn recompile_cubin(k: &KernelSource, arch: u32) -> Result<Vec<u8>> {
    cubin_in(&cache_dir(), k, arch, false)
}

/// Where the cubin for `k` on `sm_<arch>` is cached in `dir`. The name holds a hash of the source,
/// NVRTC's version and the options, so a new compiler or new flags never reuse a stale cubin.
pub fn cache_path(dir: &std::path::Path, k: &KernelSource, arch: u32) -> PathBuf {
    let (ma, mi) = nvrtc_version().unwrap_or((0, 0));
    let key = format!("{:016x}|{ma}.{mi}|{}", k.hash, options(arch).join(" "));
    let key = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    dir.join(format!("{}-{key:016x}-sm{arch}.cubin", k.name))
}

/// The cubin for `k` on `sm_<arch>` with `dir` as the cache: the cached file where `reuse` and it
/// is there, else compiled now and written atomically (temp file + rename) over the entry.
pub fn cubin_in(dir: &std::path::Path, k: &KernelSource, arch: u32, reuse: bool) -> Result<Vec<u8>> {
    let path = cache_path(dir, k, arch);
    if reuse {
        if let Some(bytes) = std::fs::read(&path).ok().filter(|b| !b.is_empty()) {
            return Ok(bytes);
        }
    }
    let c = compile(k, arch, false)?;
    if std::fs::create_dir_all(dir).is_ok() {
        let tmp = dir.join(format!(".{}-{}-{:?}.tmp", k.name, std::process::id(), std::thread::current().id()));
        if std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(c.cubin)
}

/// Per-kernel resources from a ptxas `-v` log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelResources {
    pub function: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
}

/// Parse ptxas' verbose report: one entry per `Compiling entry function '...'`.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let num_before = |s: &str, unit: &str| -> u32 {
        s.split(',')
            .find(|p| p.contains(unit))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse::<u32>().ok()))
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let f = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources { function: f, ..Default::default() });
        } else if let Some(cur) = out.last_mut() {
            if line.contains("bytes stack frame") {
                cur.stack_bytes = num_before(line, "stack frame");
                cur.spill_stores = num_before(line, "spill stores");
                cur.spill_loads = num_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                cur.registers = num_before(line, "registers");
                cur.smem_bytes = num_before(line, "smem");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'layernorm_fwd_f32' for 'sm_90'\n\
            ptxas info    : Function properties for layernorm_fwd_f32\n\
            \x20   8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0],
            KernelResources {
                function: "layernorm_fwd_f32".into(),
                registers: 40,
                spill_stores: 4,
                spill_loads: 4,
                stack_bytes: 8,
                smem_bytes: 2048
            }
        );
    }
}
