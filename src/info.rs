//! `tuna info`: devices found, kernels compiled in, and the build.

use std::fmt::Write as _;
use tuna_kernels::cuda::{compile, probe, sources};

/// The report `tuna info` prints. Never panics, with or without a CUDA driver.
pub fn report() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "tuna {} ({} build, {} {})",
        env!("CARGO_PKG_VERSION"),
        build_profile(),
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    let _ = writeln!(s, "\ndevices:");
    let _ = writeln!(
        s,
        "  cpu: {} rayon threads, {} available cores, AVX-512F {}",
        rayon_threads(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if avx512() { "yes" } else { "no" }
    );
    let _ = writeln!(s, "  cpu model: {}", tuna_kernels::testing::cpu_model());
    let _ = writeln!(s, "  cpu matrix instructions: {}", matrix_line());
    if tuna_kernels::cuda::emulation_requested() {
        // --device cuda opens the emulated device, whatever GPUs exist.
        match tuna_kernels::Cuda::new(0) {
            Ok(d) => {
                let _ = writeln!(s, "  cuda: {} (TUNA_CUDA_EMULATE=1: --device cuda runs there)", d.name());
                check_lines(&mut s, &d);
            }
            Err(e) => {
                let _ = writeln!(s, "  cuda: none: {e}");
            }
        }
    } else {
        cuda_devices(&mut s);
    }
    let _ = writeln!(s, "  default device (auto): {}", tuna_kernels::Device::auto());
    let _ = writeln!(s, "\nkernels compiled in ({} CUDA sources, embedded):", sources::ALL.len());
    for k in sources::ALL {
        let syms = k.src.matches("extern \"C\" __global__").count();
        let pre: Vec<String> = k.precompiled_ptx.iter().map(|(a, _)| format!("sm_{a}")).collect();
        let how =
            if pre.is_empty() { "NVRTC at first use".to_string() } else { format!("nvcc PTX for {}", pre.join(", ")) };
        let _ = writeln!(s, "  {:<16} {:>3} kernel templates  hash {:016x}  {how}", k.name, syms, k.hash);
    }
    let _ = writeln!(
        s,
        "\nNVRTC: {}",
        match compile::nvrtc_version() {
            Some((a, b)) => format!("{a}.{b} found"),
            None => "not found (needed only to run on a GPU; see scripts/install-nvrtc.sh)".into(),
        }
    );
    let _ = writeln!(s, "kernel cache: {}", compile::cache_dir().display());
    let _ = writeln!(s, "\nbuild:");
    for (what, value) in build() {
        let note = match what {
            "cpu features:" => " (enabled at compile time)",
            "profile:" if cfg!(debug_assertions) => ", debug assertions on",
            "profile:" => ", debug assertions off",
            "cuda archs:" => " (TUNA_CUDA_ARCHS: nvcc PTX precompiled for these where nvcc was found)",
            _ => "",
        };
        let _ = writeln!(s, "  {what:<15} {value}{note}");
    }
    s
}

/// What the build compiled in (set by the root `build.rs`): `(label, value)` in print order.
pub fn build() -> [(&'static str, &'static str); 7] {
    [
        ("version:", env!("CARGO_PKG_VERSION")),
        ("git revision:", env!("TUNA_GIT_REV")),
        ("profile:", env!("TUNA_BUILD_PROFILE")),
        ("target:", env!("TUNA_TARGET")),
        ("cpu features:", env!("TUNA_TARGET_FEATURES")),
        ("cuda archs:", env!("TUNA_CUDA_ARCHS")),
        ("rustc:", env!("TUNA_RUSTC")),
    ]
}

fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// The matrix instructions found at run time, and the path each low-precision base takes.
pub fn matrix_line() -> String {
    use tuna_kernels::ops::lowp::{
        bf16_path_checked, matrix_path_checked, Bf16Isa, CpuMatrixFeatures, MatrixPath, MATRIX_BF16_ENV, MATRIX_ENV,
    };
    let f = CpuMatrixFeatures::detect();
    let names = f.names();
    let found = if names.is_empty() {
        "none found (looked for avx2 with fma, avx512, vnni, bf16, amx)".to_string()
    } else {
        names.join(", ")
    };
    let int8 = match matrix_path_checked() {
        Ok(MatrixPath::WidenF32) if std::env::var_os(MATRIX_ENV).is_some_and(|v| !v.is_empty()) => {
            format!("int8 base: widened to f32 per block, f32 FMA ({MATRIX_ENV}=widen)")
        }
        Ok(MatrixPath::WidenF32) => {
            "int8 base: widened to f32 per block, f32 FMA (no integer dot-product instructions)".to_string()
        }
        Ok(MatrixPath::Emulated) => format!(
            "int8 base: integer dot products computed in portable Rust ({MATRIX_ENV}=emulated: the hardware paths' numbers, far slower)"
        ),
        Ok(p) => format!(
            "int8 base: integer dot products on {} ({})",
            match p {
                MatrixPath::Amx => "AMX tiles",
                MatrixPath::Avx512Vnni => "AVX-512 VNNI",
                _ => "AVX-VNNI",
            },
            if p == MatrixPath::Amx { "tdpbsud" } else { "vpdpbusd" }
        ),
        Err(e) => format!("int8 base: refused: {e}"),
    };
    let bf16 = match bf16_path_checked() {
        Ok(None) if std::env::var_os(MATRIX_BF16_ENV).is_some_and(|v| !v.is_empty()) => {
            format!("bf16 base: widened to f32 per block ({MATRIX_BF16_ENV}=widen)")
        }
        Ok(None) => "bf16 base: widened to f32 per block (no bf16 dot-product instructions)".to_string(),
        Ok(Some(Bf16Isa::Emulated)) => {
            format!("bf16 base: bf16 dot products computed in portable Rust ({MATRIX_BF16_ENV}=emulated, far slower)")
        }
        Ok(Some(Bf16Isa::Amx)) => "bf16 base: bf16 dot products on AMX tiles (tdpbf16ps)".to_string(),
        Ok(Some(Bf16Isa::Avx512Bf16)) => "bf16 base: bf16 dot products on AVX512_BF16 (vdpbf16ps)".to_string(),
        Err(e) => format!("bf16 base: refused: {e}"),
    };
    // q4 follows the int8 base's path, its blocks requantized to int8 per 64 weights.
    let q4 = match matrix_path_checked() {
        Ok(MatrixPath::WidenF32) => "q4 base: widened to f32 per block".to_string(),
        Ok(p) => format!("q4 base: blocks requantized to int8 per 64 weights, then as the int8 base ({})", p.name()),
        Err(_) => format!("q4 base: refused (as the int8 base, by {MATRIX_ENV})"),
    };
    format!("{found}; {int8}; {bf16}; {q4}")
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The device's attention and product checks (run here if no call has run them): what bf16
/// attention and the products run on.
fn check_lines(s: &mut String, d: &tuna_kernels::Cuda) {
    let line = match d.attention_check() {
        Ok(v) => v.describe(),
        Err(e) => format!("the tensor-core attention's check could not run: {e}"),
    };
    let _ = writeln!(s, "    attention: {line}");
    let line = match d.product_check() {
        Ok(v) => v.describe(),
        Err(e) => format!("the products' check could not run: {e}"),
    };
    let _ = writeln!(s, "    products: {line}");
}

/// One line per CUDA device the driver reports, or why there is none.
fn cuda_devices(s: &mut String) {
    match probe() {
        Ok(n) => {
            for i in 0..n {
                match tuna_kernels::Cuda::new(i) {
                    Ok(d) => {
                        let _ = writeln!(s, "  cuda:{i}: {} (sm_{})", d.name(), d.arch());
                        check_lines(s, &d);
                    }
                    Err(e) => {
                        let _ = writeln!(s, "  cuda:{i}: present but cannot be opened: {e}");
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(s, "  cuda: none: {e}");
        }
    }
}
