//! `tuna info` runs without a GPU, says so plainly, lists the embedded kernels, and says how the
//! binary was built.

use std::process::Command;

#[test]
fn info_reports_devices_and_kernels() {
    let out = Command::new(env!("CARGO_BIN_EXE_tuna")).arg("info").output().expect("run tuna info");
    assert!(out.status.success(), "tuna info failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("cpu:"), "{s}");
    assert!(s.contains("cuda"), "{s}");
    assert!(s.contains("gelu"), "kernel list missing: {s}");
    // The matrix instructions, as detected at run time, and the path the low-precision base takes.
    let matrix = s.lines().find_map(|l| l.trim().strip_prefix("cpu matrix instructions: ")).expect("matrix line");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        assert_eq!(matrix.contains("avx2+fma"), has!("avx2") && has!("fma"), "{s}");
        assert_eq!(matrix.contains("avx512f"), has!("avx512f"), "{s}");
    }
    let path = tuna_kernels::ops::lowp::matrix_path();
    let int8 = matrix.split("; ").find_map(|p| p.strip_prefix("int8 base: ")).unwrap_or_else(|| panic!("{s}"));
    let want = match path.name() {
        "widen" => "widened to f32",
        "emulated" => "portable Rust",
        "amx" => "AMX tiles",
        "avx512-vnni" => "AVX-512 VNNI",
        _ => "AVX-VNNI",
    };
    assert!(int8.contains(want), "{path:?}: {s}");
    let bf16 = matrix.split("; ").find_map(|p| p.strip_prefix("bf16 base: ")).unwrap_or_else(|| panic!("{s}"));
    let want = match tuna_kernels::ops::lowp::bf16_path() {
        None => "widened to f32",
        Some(p) if p.name() == "emulated" => "portable Rust",
        Some(p) if p.name() == "amx" => "AMX tiles",
        Some(_) => "AVX512_BF16",
    };
    assert!(bf16.contains(want), "{s}");
    let q4 = matrix.split("; ").find_map(|p| p.strip_prefix("q4 base: ")).unwrap_or_else(|| panic!("{s}"));
    match tuna_kernels::ops::lowp::matrix_path() {
        tuna_kernels::ops::lowp::MatrixPath::WidenF32 => assert!(q4.starts_with("widened to f32"), "{s}"),
        p => assert!(q4.contains("requantized to int8") && q4.contains(&format!("({})", p.name())), "{s}"),
    }
    // the build section, compiled in by build.rs
    let build = s.split("\nbuild:\n").nth(1).unwrap_or_else(|| panic!("no build section: {s}"));
    let value = |label: &str| {
        let line = build.lines().find_map(|l| l.trim_start().strip_prefix(label));
        let v = line.map(str::trim).unwrap_or_else(|| panic!("no `{label}` line: {s}"));
        assert!(!v.is_empty(), "`{label}` is empty: {s}");
        v.to_string()
    };
    assert_eq!(value("version:"), env!("CARGO_PKG_VERSION"));
    let rev = value("git revision:");
    let hash = rev.strip_suffix("-dirty").unwrap_or(&rev);
    assert!(rev == "unknown" || (hash.len() >= 7 && hash.chars().all(|c| c.is_ascii_hexdigit())), "{s}");
    let assertions = if cfg!(debug_assertions) { "debug assertions on" } else { "debug assertions off" };
    assert!(value("profile:").contains(assertions), "{s}");
    assert!(value("target:").contains(std::env::consts::ARCH), "{s}");
    value("cpu features:");
    assert!(value("cuda archs:").starts_with(env!("TUNA_CUDA_ARCHS")), "{s}");
    assert!(value("rustc:").starts_with("rustc "), "{s}");
    if tuna_kernels::cuda::emulation_requested() {
        // The test command's setting: --device cuda is the emulated device where it is built in
        // (--features tuna-kernels/emulator), and said to be missing where not.
        let emulated = s.contains("cuda: emulated on the CPU (TUNA_CUDA_EMULATE=1");
        assert!(emulated || s.contains("this build has no emulated device"), "{s}");
        // The device's attention check ran, and the tensor-core kernels passed it there.
        let checked = "attention: tensor-core attention checked against the CPU on this device (9 cases";
        assert!(!emulated || s.contains(checked), "{s}");
        let products =
            "products: cublasGemmEx and the fused cuBLASLt epilogues checked against the host on this device (27";
        assert!(!emulated || s.contains(products), "{s}");
    } else if tuna_kernels::cuda::probe().is_err() {
        assert!(s.contains("cuda: none") && s.contains("default device (auto): cpu"), "{s}");
    }
}

/// `TUNA_CPU_MATRIX` picks the int8 base's path (`TUNA_CPU_MATRIX_BF16` the bf16 base's); `info` reports the choice, a name this CPU cannot
/// run is reported by `info` and refused by every other command before it does anything.
#[test]
fn the_int8_path_follows_tuna_cpu_matrix() {
    let tuna = |env: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX", env).args(args).output().expect("run tuna")
    };
    let out = tuna("emulated", &["info"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && s.contains("int8 base: integer dot products computed in portable Rust"), "{s}");
    assert!(s.contains("q4 base: blocks requantized to int8 per 64 weights, then as the int8 base (emulated)"), "{s}");
    let out = tuna("widen", &["info"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("int8 base: widened to f32 per block, f32 FMA (TUNA_CPU_MATRIX=widen)"), "{s}");
    assert!(s.contains("q4 base: widened to f32 per block"), "{s}");
    // A value that is not UTF-8 is refused too, not taken for unset.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let out = Command::new(env!("CARGO_BIN_EXE_tuna"))
            .env("TUNA_CPU_MATRIX", std::ffi::OsStr::from_bytes(b"amx\xff"))
            .args(["train", "--model", "nowhere", "--task", "lm", "--method", "lora"])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains("TUNA_CPU_MATRIX=\"amx\\xFF\": unknown path"), "{e}");
    }
    let out =
        Command::new(env!("CARGO_BIN_EXE_tuna")).env("TUNA_CPU_MATRIX_BF16", "emulated").arg("info").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("bf16 base: bf16 dot products computed in portable Rust"), "{s}");
    let out = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .env("TUNA_CPU_MATRIX_BF16", "avx512-vnni")
        .args(["train", "--model", "nowhere", "--task", "lm", "--method", "lora"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && e.contains(
                "TUNA_CPU_MATRIX_BF16=\"avx512-vnni\": unknown path (expected one of: amx, avx512-bf16, emulated, widen"
            ),
        "{e}"
    );
    let out = tuna("fp8-tiles", &["info"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("int8 base: refused: TUNA_CPU_MATRIX=\"fp8-tiles\": unknown path (expected one of: amx, avx512-vnni, avx-vnni, emulated, widen"), "{s}");
    let dir = std::env::temp_dir().join(format!("tuna-matrix-env-{}", std::process::id()));
    let out = tuna(
        "fp8-tiles",
        &["train", "--model", "nowhere", "--task", "lm", "--method", "lora", "--out", dir.to_str().unwrap()],
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("TUNA_CPU_MATRIX=\"fp8-tiles\": unknown path"), "{e}");
    assert!(!dir.exists(), "nothing is written");
    // A path this CPU lacks (checked where it lacks one).
    if let Some(p) = tuna_kernels::ops::lowp::MatrixPath::ALL.into_iter().find(|p| !p.available()) {
        let out = tuna(p.name(), &["train", "--model", "nowhere", "--task", "lm", "--method", "lora"]);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(&format!("TUNA_CPU_MATRIX={:?}: ", p.name())) && e.contains("(it runs: "), "{e}");
    }
}
