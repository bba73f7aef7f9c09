//! Compile check: every embedded kernel compiles with NVRTC for sm_80 and sm_90, and ptxas'
//! registers, spills and shared memory per kernel are printed.
//!
//! Needs libnvrtc (CUDA 13.0) on the loader path; no GPU. Without NVRTC the test says so by
//! name and skips, except under CI (`CI=true`), where a missing NVRTC is a failure:
//! `.ci/run` installs it from PyPI.

use tuna_kernels::cuda::compile::{compile, nvrtc_present, nvrtc_version, parse_ptxas_log};
use tuna_kernels::cuda::sources::ALL;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but libnvrtc was not found: .ci/run must install nvidia-cuda-nvrtc==13.0.* and set LD_LIBRARY_PATH");
        }
        tuna_kernels::testing::note_skip(
            "nvrtc_compile::every_kernel_compiles_for_sm80_and_sm90",
            "libnvrtc not found",
        );
        return;
    }
    let (ma, mi) = nvrtc_version().expect("nvrtcVersion");
    println!("NVRTC {ma}.{mi}; {} kernel sources", ALL.len());
    assert!(!ALL.is_empty(), "no kernels embedded");
    let mut failures = Vec::new();
    let mut table = String::from("arch   kernel                                   regs  spill(st/ld)  stack  smem\n");
    for arch in [80u32, 90] {
        for k in ALL {
            match compile(k, arch, true) {
                Ok(c) => {
                    let res = parse_ptxas_log(&c.log);
                    assert!(!res.is_empty(), "kernels/{}.cu for sm_{arch}: no ptxas report in log:\n{}", k.name, c.log);
                    for r in res {
                        let flag = if r.spill_stores + r.spill_loads > 0 { "  SPILLS" } else { "" };
                        table += &format!(
                            "sm_{arch}  {:<40} {:>4}  {:>5}/{:<5}  {:>5}  {:>5}{flag}\n",
                            r.function, r.registers, r.spill_stores, r.spill_loads, r.stack_bytes, r.smem_bytes
                        );
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    println!("{table}");
    // Also into the skip/report log so CI shows the table even though the harness captures stdout.
    if let Ok(path) = std::env::var("TUNA_KERNEL_REPORT") {
        std::fs::write(path, &table).expect("write kernel report");
    }
    assert!(failures.is_empty(), "{} kernel compile failures:\n{}", failures.len(), failures.join("\n\n"));
}

/// A cached cubin the driver refuses is compiled again: the recompiling path ignores the cache
/// entry (here a damaged one) and replaces it with a real cubin, which the reusing path then reads.
#[test]
fn a_damaged_cache_entry_is_replaced_by_recompiling() {
    use tuna_kernels::cuda::compile::{cache_path, cubin_in};
    if !nvrtc_present() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but libnvrtc was not found");
        }
        tuna_kernels::testing::note_skip(
            "nvrtc_compile::a_damaged_cache_entry_is_replaced_by_recompiling",
            "libnvrtc not found",
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("tuna-cubin-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = ALL.iter().find(|k| k.name == "gelu").expect("kernels/gelu.cu embedded");
    let path = cache_path(&dir, k, 90);
    std::fs::write(&path, b"not a cubin").unwrap();
    assert_eq!(cubin_in(&dir, k, 90, true).unwrap(), b"not a cubin", "the reusing path reads the entry");
    let fresh = cubin_in(&dir, k, 90, false).unwrap();
    assert_eq!(&fresh[..4], b"\x7fELF", "a cubin is an ELF image");
    assert_eq!(std::fs::read(&path).unwrap(), fresh, "the damaged entry was replaced");
    assert_eq!(cubin_in(&dir, k, 90, true).unwrap(), fresh);
    std::fs::remove_dir_all(&dir).ok();
}

/// The emulator's test kernels (`emu/test_kernels.cu`, never embedded for the device) compile with
/// NVRTC too: they use every primitive of `kernels/mma.cuh` (mma, all six ldmatrix variants,
/// cp.async of 4, 8 and 16 bytes, commit, wait_group, wait_all), so ptxas checks all of its PTX,
/// not only what `kernels/mma_gemm.cu` uses.
#[test]
fn emulator_test_kernels_compile_with_nvrtc() {
    use tuna_kernels::cuda::sources::KernelSource;
    if !nvrtc_present() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but libnvrtc was not found");
        }
        tuna_kernels::testing::note_skip(
            "nvrtc_compile::emulator_test_kernels_compile_with_nvrtc",
            "libnvrtc not found",
        );
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let kdir =
        ["kernels", "../../kernels"].iter().map(|d| dir.join(d)).find(|d| d.join("common.cuh").is_file()).unwrap();
    // `#include "x.cuh"` inlined from kernels/, as build.rs does for the embedded sources
    let mut src = String::new();
    for line in std::fs::read_to_string(dir.join("emu/test_kernels.cu")).unwrap().lines() {
        match line.trim_start().strip_prefix("#include \"").and_then(|r| r.split('"').next()) {
            Some(inc) => src += &std::fs::read_to_string(kdir.join(inc)).unwrap(),
            None => src += line,
        }
        src.push('\n');
    }
    let k =
        KernelSource { name: "emu_test_kernels", src: Box::leak(src.into_boxed_str()), hash: 0, precompiled_ptx: &[] };
    for arch in [80u32, 90] {
        let c = compile(&k, arch, true).unwrap_or_else(|e| panic!("emu/test_kernels.cu for sm_{arch}: {e}"));
        println!("sm_{arch}:\n{}", c.log);
        let funcs: Vec<String> = parse_ptxas_log(&c.log).into_iter().map(|r| r.function).collect();
        for f in ["emu_test_mma", "emu_test_ldmatrix", "emu_test_cp_async", "emu_test_mma_misuse"] {
            assert!(funcs.iter().any(|x| x == f), "sm_{arch}: {f} not in ptxas' report: {funcs:?}");
        }
    }
}
