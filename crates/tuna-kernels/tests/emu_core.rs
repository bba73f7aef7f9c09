//! Tests of the emulated CUDA device itself (`emu/`, `src/cuda/emu.rs`): every kernel compiled in,
//! parameter struct layouts as Rust's, the semantics of ids, warp ops, atomics, bf16 rounding and
//! shared memory, errors for bad launches and faulty kernels, and direct launches of the real
//! kernels against the CPU ops and a double-precision attention reference.
//!
//! `cargo test -p tuna-kernels --features emulator --test emu_core`
//! (`TUNA_EMU_SANITIZE=1` builds the emulator with ASan + UBSan: run through `emu/asan-run.sh`.)
#![cfg(feature = "emulator")]

use half::bf16;
use std::collections::BTreeSet;
use std::ffi::c_void;
use std::mem::{offset_of, size_of};
use tuna_kernels::cuda::emu::{self, LaunchError};
use tuna_kernels::testing::{note_skip, round_bf16, Rng, Tol};
use tuna_kernels::Cpu;

// ---- helpers ---------------------------------------------------------------------------------

/// Kernel argument values, each in its own 8-byte-aligned heap cell (args[i] points at one).
#[derive(Default)]
struct Args(Vec<Vec<u64>>);

impl Args {
    fn v<T: Copy>(mut self, x: T) -> Self {
        let mut cell = vec![0u64; size_of::<T>().div_ceil(8).max(1)];
        // SAFETY: the cell has at least size_of::<T>() bytes; T is Copy (plain data here).
        unsafe {
            std::ptr::copy_nonoverlapping(&x as *const T as *const u8, cell.as_mut_ptr() as *mut u8, size_of::<T>())
        };
        self.0.push(cell);
        self
    }
    fn p<T>(self, x: &[T]) -> Self {
        self.v(x.as_ptr())
    }
    fn m<T>(self, x: &mut [T]) -> Self {
        self.v(x.as_mut_ptr())
    }
}

/// Launch with the given arguments. Every test sizes its buffers for the kernel and grid it
/// launches (the safety contract of `emu::try_launch`).
fn launch(kernel: &str, grid: [u32; 3], block: [u32; 3], smem: u32, mut args: Args) -> Result<(), LaunchError> {
    let mut ptrs: Vec<*mut c_void> = args.0.iter_mut().map(|c| c.as_mut_ptr() as *mut c_void).collect();
    // SAFETY: see above; the cells outlive the call.
    unsafe { emu::try_launch(kernel, grid, block, smem, &mut ptrs) }
}

fn ok(kernel: &str, grid: [u32; 3], block: [u32; 3], smem: u32, args: Args) {
    if let Err(e) = launch(kernel, grid, block, smem, args) {
        panic!("{kernel}: {e}");
    }
}

fn expect_err(code: i32, kernel: &str, grid: [u32; 3], block: [u32; 3], smem: u32, args: Args, needles: &[&str]) {
    match launch(kernel, grid, block, smem, args) {
        Ok(()) => panic!("{kernel}: launch succeeded, expected error {code}"),
        Err(e) => {
            assert_eq!(e.code(), code, "{kernel}: wrong error kind: {e}");
            for n in needles {
                assert!(e.message().contains(n), "{kernel}: message lacks {n:?}: {}", e.message());
            }
        }
    }
}

fn bf(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}
fn unbf(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

// ---- the kernel list and struct layouts -----------------------------------------------------

fn kernels_dir() -> std::path::PathBuf {
    let m = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    ["kernels", "../../kernels"].iter().map(|d| m.join(d)).find(|d| d.join("common.cuh").is_file()).unwrap()
}

#[test]
fn every_kernel_symbol_is_registered() {
    let names = emu::kernels();
    assert!(names.len() > 100, "only {} kernels compiled in", names.len());
    let set: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(set.len(), names.len(), "duplicate kernel names");

    // Every .cu file contributes, and its literal (non-macro) kernel names are there.
    let mut files = 0;
    for e in std::fs::read_dir(kernels_dir()).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        files += 1;
        let src = std::fs::read_to_string(&path).unwrap();
        let mut n_extern = 0;
        for (i, _) in src.match_indices("extern \"C\" __global__ void ") {
            n_extern += 1;
            let rest = &src[i + "extern \"C\" __global__ void ".len()..];
            let rest = rest.strip_prefix("__launch_bounds__(").map(|r| r.split_once(')').unwrap().1).unwrap_or(rest);
            let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            let name: String =
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '#').collect();
            if !name.contains('#') {
                assert!(set.contains(name.as_str()), "{}: kernel {name} not compiled in", path.display());
            }
        }
        assert!(n_extern > 0, "{}: no kernels", path.display());
    }
    assert_eq!(files, tuna_kernels::cuda::sources::ALL.len(), ".cu files vs the sources embedded for NVRTC");

    // The defined C symbols of the library are exactly the registered kernels (plus the C ABI).
    let lib = env!("TUNA_EMU_LIB");
    match std::process::Command::new("nm").args(["-g", "--defined-only", lib]).output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let syms: BTreeSet<&str> = text
                .lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    let (_, kind, name) = (it.next()?, it.next()?, it.next()?);
                    (kind == "T" && !name.starts_with("_Z") && !name.starts_with("tuna_emu_")).then_some(name)
                })
                .collect();
            assert_eq!(syms, set, "nm's extern \"C\" functions vs the registry");
        }
        _ => note_skip("emu_core::every_kernel_symbol_is_registered (nm part)", "nm not available"),
    }

    // And exactly the kernels NVRTC compiles from the same sources, where NVRTC is present.
    use tuna_kernels::cuda::compile::{compile, nvrtc_present, parse_ptxas_log};
    if !nvrtc_present() {
        note_skip("emu_core::every_kernel_symbol_is_registered (NVRTC part)", "libnvrtc not found");
        return;
    }
    let mut device = BTreeSet::new();
    for k in tuna_kernels::cuda::sources::ALL {
        let c = compile(k, 80, true).unwrap_or_else(|e| panic!("NVRTC: {e}"));
        device.extend(parse_ptxas_log(&c.log).into_iter().map(|r| r.function));
    }
    let host: BTreeSet<String> = names.iter().filter(|n| !n.starts_with("emu_test_")).cloned().collect();
    assert_eq!(host, device, "emulator kernels vs NVRTC's");
}

macro_rules! layout {
    ($t:ty { $($f:ident),* $(,)? }) => {
        (stringify!($t), size_of::<$t>() as u64, vec![$(offset_of!($t, $f) as u64),*])
    };
}

/// Mirror of `struct EmuTestParams` in emu/test_kernels.cu (with padding).
#[repr(C)]
#[derive(Clone, Copy)]
struct EmuTestParams {
    a: u8,
    b: u64,
    c: u32,
    d: [f32; 3],
    e: bf16,
}

#[test]
fn struct_layouts_match_rust() {
    use tuna_kernels::ops::adamw::AdamWKernelParams;
    use tuna_kernels::ops::attention::AttnParams;
    use tuna_kernels::ops::cross_entropy::CeParams;
    use tuna_kernels::ops::elementwise::{BiasParams, ColsParams, FlatParams, PoolParams};
    use tuna_kernels::ops::embedding::EmbedParams;
    use tuna_kernels::ops::gelu::GeluParams;
    use tuna_kernels::ops::grad::GradParams;
    use tuna_kernels::ops::layernorm::LayerNormParams;
    use tuna_kernels::ops::rmsnorm::RmsNormParams;
    use tuna_kernels::ops::rope::RopeParams;
    use tuna_kernels::ops::swiglu::SwigluParams;
    let rust = [
        layout!(AdamWKernelParams { n, lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2, _pad }),
        layout!(AttnParams {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            prefix_len,
            head_dim,
            causal,
            has_mask,
            has_prefix_rows,
            kv_cap,
            has_bias,
            scale
        }),
        layout!(CeParams { rows, vocab, ignore_index, grad_scale }),
        layout!(FlatParams { n, s, _pad }),
        layout!(BiasParams { rows, cols }),
        layout!(ColsParams { rows, cols, off, width }),
        layout!(PoolParams { batch, seq, hidden }),
        layout!(EmbedParams { batch, seq, vocab, hidden, n_prompt, _pad }),
        layout!(GeluParams { n, kind, _pad }),
        layout!(GradParams { n, scale, max_norm }),
        layout!(LayerNormParams { rows, dim, eps }),
        layout!(RmsNormParams { rows, dim, eps }),
        layout!(RopeParams { batch, seq, heads, head_dim, theta }),
        layout!(SwigluParams { n }),
        layout!(EmuTestParams { a, b, c, d, e }),
    ];
    for (name, size, offsets) in &rust {
        let got = emu::struct_layout(name).unwrap_or_else(|| panic!("emulator knows no struct {name}"));
        assert_eq!(got, (*size, offsets.clone()), "{name}: C++ (size, offsets) vs Rust");
    }
    // Every struct a kernel takes by value is checked above.
    let checked: BTreeSet<&str> = rust.iter().map(|r| r.0).collect();
    let known: BTreeSet<String> = emu::structs().into_iter().collect();
    assert_eq!(
        known.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        checked,
        "structs the kernels take vs checked"
    );
    assert_eq!(emu::struct_layout("NormLane"), None, "not a kernel parameter");
    assert_eq!(emu::struct_layout("NoSuchStruct"), None);
}

// ---- emulator semantics ------------------------------------------------------------------------

#[test]
fn thread_and_block_ids_and_struct_arguments() {
    let (grid, block) = ([3u32, 2, 2], [4u32, 3, 2]);
    let nthreads = (grid.iter().product::<u32>() * block.iter().product::<u32>()) as usize;
    let mut out = vec![u32::MAX; 12 * nthreads];
    let mut echo = vec![0f32; 7];
    let p = EmuTestParams { a: 7, b: 1 << 40, c: 12345, d: [1.5, -2.0, 3.25], e: bf16::from_f32(-0.5) };
    ok("emu_test_ids", grid, block, 0, Args::default().v(p).m(&mut out).m(&mut echo));
    let mut g = 0;
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                for tz in 0..block[2] {
                    for ty in 0..block[1] {
                        for tx in 0..block[0] {
                            let want =
                                [tx, ty, tz, bx, by, bz, block[0], block[1], block[2], grid[0], grid[1], grid[2]];
                            assert_eq!(&out[12 * g..12 * g + 12], &want, "thread {g}");
                            g += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(echo, vec![7.0, (1u64 << 40) as f32, 12345.0, 1.5, -2.0, 3.25, -0.5]);
}

#[test]
fn warp_ops_follow_cuda_semantics() {
    let (nb, nt) = (2usize, 64usize);
    let mut rng = Rng::new(5);
    let input: Vec<i32> = (0..nb * nt).map(|_| rng.below(1000) as i32).collect();
    let mut out = vec![0i32; 16 * nb * nt];
    ok("emu_test_warp", [nb as u32, 1, 1], [nt as u32, 1, 1], 0, Args::default().p(&input).m(&mut out));
    for w in 0..nb * nt / 32 {
        let v = |l: usize| input[w * 32 + l];
        let ballot = (0..32).filter(|&l| v(l) & 1 != 0).fold(0u32, |b, l| b | 1 << l) as i32;
        let sum: f32 = {
            // warp_sum's butterfly order
            let mut x: Vec<f32> = (0..32).map(|l| v(l) as f32).collect();
            let mut o = 16;
            while o > 0 {
                x = (0..32).map(|l| x[l] + x[l ^ o]).collect();
                o >>= 1;
            }
            x[0]
        };
        for l in 0..32 {
            let o = &out[16 * (w * 32 + l)..16 * (w * 32 + l + 1)];
            let want = [
                v(3),
                v((l & !7) + 3),
                v(l ^ 1),
                if (l ^ 5) < (l & !3) + 4 { v(l ^ 5) } else { v(l) },
                if l + 1 < 32 { v(l + 1) } else { v(l) },
                if (l & 7) + 2 < 8 { v(l + 2) } else { v(l) },
                if l >= 2 { v(l - 2) } else { v(l) },
                if (l & 15) >= 1 { v(l - 1) } else { v(l) },
                ballot,
                (0..32).any(|k| v(k) == 7) as i32,
                1,
                sum.to_bits() as i32,
                if l % 2 == 0 { v(l ^ 2) } else { -1 },
                -1, // __activemask: every lane present
                v(31),
                -1, // ballot(1)
            ];
            assert_eq!(o, &want, "warp {w} lane {l}");
        }
    }
}

#[test]
fn atomics_from_every_thread() {
    let (nb, nt) = (7u32, 96u32);
    let n = (nb * nt) as usize;
    let (mut f, mut i, mut u, mut c) = (vec![0f32], vec![0i32], vec![0u32], vec![0u64]);
    ok("emu_test_atomics", [nb, 1, 1], [nt, 1, 1], 0, Args::default().m(&mut f).m(&mut i).m(&mut u).m(&mut c));
    assert_eq!((f[0], i[0], u[0], c[0]), (0.5 * n as f32, n as i32, n as u32 - 1, 2 * n as u64));
}

/// cvt.rn.bf16.f32: round to nearest even; NaN -> canonical NaN 0x7fff.
fn bf16_rn(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fff;
    }
    let lsb = (u >> 16) & 1;
    ((u as u64 + 0x7fff + lsb as u64) >> 16) as u16
}

#[test]
fn bf16_conversion_is_round_to_nearest_even() {
    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000, // zeros, infinities
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f7f_8000,
        0x7f7f_7fff, // max finite: rounds to inf / stays
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x3f80_7fff, // ties to even, above, below
        0x0000_0001,
        0x0000_8000,
        0x0001_8000,
        0x807f_ffff, // subnormals
        0x7fc0_0000,
        0x7f80_0001,
        0xffff_ffff,
        0x7fff_ffff,
        0xff80_0001,
        0x7fbf_ffff, // NaNs
    ];
    let mut rng = Rng::new(11);
    bits.extend((0..1 << 16).map(|_| rng.next_u64() as u32));
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let n = x.len();
    let mut y = vec![bf16::ZERO; n];
    let mut back = vec![0f32; n];
    ok("emu_test_bf16", [64, 1, 1], [128, 1, 1], 0, Args::default().v(n as u64).p(&x).m(&mut y).m(&mut back));
    for i in 0..n {
        let want = bf16_rn(x[i]);
        assert_eq!(y[i].to_bits(), want, "bf16({:#010x})", bits[i]);
        if !x[i].is_nan() {
            assert_eq!(want, bf16::from_f32(x[i]).to_bits(), "half's RNE agrees on {:#010x}", bits[i]);
        } else {
            assert!(back[i].is_nan(), "NaN {:#010x} stays NaN", bits[i]);
        }
        assert_eq!(back[i].to_bits(), (want as u32) << 16, "ld(bf16) widens exactly");
    }
}

#[test]
fn shared_memory_is_poisoned_and_private_to_each_block() {
    let nb = 5usize;
    let mut out = vec![0u32; 4 + 2 * nb];
    ok("emu_test_smem", [nb as u32, 1, 1], [64, 1, 1], 8, Args::default().m(&mut out));
    assert_eq!(&out[..4], &[u32::MAX, u32::MAX, u32::MAX, 1], "0xff poison (a NaN as float)");
    for b in 0..nb {
        assert_eq!(out[4 + b], b as u32 * 10 + 1, "static __shared__ of block {b}");
        assert_eq!(out[4 + nb + b], b as u32 * 10 + 2, "dynamic shared memory of block {b}");
    }
}

// ---- errors -----------------------------------------------------------------------------------

#[test]
fn unknown_kernel_is_error_1() {
    let mut out = vec![0f32; 32];
    expect_err(1, "no_such_kernel", [1, 1, 1], [32, 1, 1], 0, Args::default().m(&mut out), &["no_such_kernel"]);
    assert_eq!(emu::launches("no_such_kernel"), 0);
    assert!(emu::kernel_params("no_such_kernel").is_none());
}

#[test]
fn invalid_launches_are_error_2() {
    let mut out = vec![0f32; 4096];
    let a = |o: &mut Vec<f32>| Args::default().m(o);
    let k = "emu_test_trap";
    expect_err(2, k, [0, 1, 1], [32, 1, 1], 0, a(&mut out), &[k, "grid (0,1,1)"]);
    expect_err(2, k, [1, 65536, 1], [32, 1, 1], 0, a(&mut out), &[k, "grid"]);
    expect_err(2, k, [1, 1, 1], [1025, 1, 1], 0, a(&mut out), &[k, "block (1025,1,1)"]);
    expect_err(2, k, [1, 1, 1], [1, 1, 65], 0, a(&mut out), &[k, "block"]);
    expect_err(2, k, [1, 1, 1], [64, 32, 1], 0, a(&mut out), &[k, "1024 threads"]);
    expect_err(2, k, [1, 1, 1], [32, 1, 1], 227 * 1024 + 4, a(&mut out), &[k, "dynamic shared memory"]);
    expect_err(
        2,
        "emu_test_bounds",
        [1, 1, 1],
        [128, 1, 1],
        0,
        a(&mut out),
        &["emu_test_bounds", "__launch_bounds__(64)"],
    );
    ok("emu_test_bounds", [1, 1, 1], [64, 1, 1], 0, a(&mut out));
    // wrong number of arguments (checked by the shim against the kernel's parameters)
    expect_err(2, k, [1, 1, 1], [32, 1, 1], 0, a(&mut out).v(1u32), &[k, "2 argument(s) given, it takes 1"]);
    // a null argument pointer
    let mut ptrs = vec![std::ptr::null_mut::<c_void>()];
    // SAFETY: the emulator rejects a null args[i] before running anything.
    let e = unsafe { emu::try_launch(k, [1, 1, 1], [32, 1, 1], 0, &mut ptrs) }.unwrap_err();
    assert_eq!(e.code(), 2, "{e}");

    // A block-per-row kernel (block_sum: warp shuffles) with 48 threads: warp 1 has 16 lanes.
    use tuna_kernels::ops::layernorm::LayerNormParams;
    let (rows, dim) = (2usize, 64usize);
    let x = vec![1f32; rows * dim];
    let (g, b) = (vec![1f32; dim], vec![0f32; dim]);
    let (mut y, mut mean, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows], vec![0f32; rows]);
    let p = LayerNormParams::new(rows, dim, 1e-5);
    let args = Args::default().v(p).p(&x).p(&g).p(&b).m(&mut y).m(&mut mean).m(&mut rstd);
    expect_err(
        2,
        "layernorm_fwd_block_f32",
        [rows as u32, 1, 1],
        [48, 1, 1],
        0,
        args,
        &[
            "layernorm_fwd_block_f32",
            "block (0,0,0)",
            "warp 1 has only 16 lane(s)",
            "multiple of 32",
            "__shfl_xor_sync",
        ],
    );
}

#[test]
fn faulty_kernels_are_error_3() {
    let mut out = vec![0f32; 4096];
    let a = |o: &mut Vec<f32>| Args::default().m(o);
    expect_err(
        3,
        "emu_test_exit_before_sync",
        [2, 1, 1],
        [64, 1, 1],
        0,
        a(&mut out),
        &["emu_test_exit_before_sync", "block (0,0,0)", "__syncthreads", "exited"],
    );
    expect_err(
        3,
        "emu_test_two_syncs",
        [1, 1, 1],
        [64, 1, 1],
        0,
        a(&mut out),
        &["emu_test_two_syncs", "different __syncthreads", "test_kernels.cu:"],
    );
    expect_err(
        3,
        "emu_test_shfl_exited",
        [1, 1, 1],
        [32, 1, 1],
        0,
        a(&mut out),
        &["emu_test_shfl_exited", "__shfl_xor_sync", "exited"],
    );
    expect_err(
        3,
        "emu_test_deadlock",
        [1, 1, 1],
        [64, 1, 1],
        0,
        a(&mut out),
        &["deadlock", "emu_test_deadlock", "__syncwarp"],
    );
    expect_err(
        3,
        "emu_test_trap",
        [3, 1, 1],
        [32, 1, 1],
        0,
        a(&mut out),
        &["__trap()", "block (1,0,0), thread (5,0,0)"],
    );
    // The emulator stays usable after faults.
    let before = emu::launches("emu_test_bounds");
    ok("emu_test_bounds", [1, 1, 1], [64, 1, 1], 0, a(&mut out));
    assert_eq!(emu::launches("emu_test_bounds"), before + 1);
}

/// The ASan child: reads one float past the end of the dynamic shared memory (run by the test
/// below in a subprocess; a no-op otherwise).
#[test]
fn asan_child_smem_overrun() {
    if std::env::var_os("TUNA_EMU_ASAN_CHILD").is_none() {
        return;
    }
    let mut out = vec![0f32; 1];
    ok("emu_test_smem_overrun", [1, 1, 1], [32, 1, 1], 64, Args::default().v(16u32).m(&mut out));
    eprintln!("child: no ASan report, read {}", out[0]);
}

#[test]
fn asan_sees_shared_memory_overruns() {
    if !emu::sanitized() {
        note_skip("emu_core::asan_sees_shared_memory_overruns", "emulator not built with TUNA_EMU_SANITIZE=1");
        return;
    }
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "asan_child_smem_overrun", "--nocapture", "--test-threads=1"])
        .env("TUNA_EMU_ASAN_CHILD", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("heap-buffer-overflow"), "expected an ASan report, got:\n{err}");
}

// ---- the real kernels against the CPU ops ------------------------------------------------------------

fn layernorm_case(rows: usize, dim: usize, block: bool, bf16_io: bool) {
    use tuna_kernels::ops::layernorm::{LayerNormKernel, LayerNormParams};
    let mut rng = Rng::new(rows as u64 * 31 + dim as u64);
    let mut x = rng.normal_vec(rows * dim, 2.0);
    for v in x.iter_mut() {
        *v += 0.5;
    }
    let mut g = rng.normal_vec(dim, 1.0);
    let mut b = rng.normal_vec(dim, 1.0);
    if bf16_io {
        (x, g, b) = (round_bf16(&x), round_bf16(&g), round_bf16(&b));
    }
    let p = LayerNormParams::new(rows, dim, 1e-5);
    let (mut ry, mut rm, mut rr) = (vec![0f32; rows * dim], vec![0f32; rows], vec![0f32; rows]);
    Cpu.layernorm_fwd(&p, &x, &g, &b, &mut ry, &mut rm, &mut rr).unwrap();
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let (grid, name) = if block { ([rows as u32, 1, 1], "block") } else { ([rows.div_ceil(8) as u32, 1, 1], "warp") };
    let y = if bf16_io {
        let (xb, gb, bb) = (bf(&x), bf(&g), bf(&b));
        let mut yb = vec![bf16::ZERO; rows * dim];
        let args = Args::default().v(p).p(&xb).p(&gb).p(&bb).m(&mut yb).m(&mut mean).m(&mut rstd);
        ok(&format!("layernorm_fwd_{name}_bf16"), grid, [256, 1, 1], 0, args);
        unbf(&yb)
    } else {
        let mut y = vec![0f32; rows * dim];
        let args = Args::default().v(p).p(&x).p(&g).p(&b).m(&mut y).m(&mut mean).m(&mut rstd);
        ok(&format!("layernorm_fwd_{name}_f32"), grid, [256, 1, 1], 0, args);
        y
    };
    let tol = if bf16_io { Tol::CUDA_BF16 } else { Tol::CUDA_F32 };
    let what = format!("layernorm {name} rows {rows} dim {dim} bf16 {bf16_io}");
    tol.assert_close(&format!("{what}: y"), &y, &ry);
    Tol::CUDA_F32.assert_close(&format!("{what}: mean"), &mean, &rm);
    Tol::CUDA_F32.assert_close(&format!("{what}: rstd"), &rstd, &rr);
}

#[test]
fn layernorm_forward_matches_cpu() {
    layernorm_case(37, 768, false, false); // warp per row; 37 rows: the last block is partly idle
    layernorm_case(5, 2500, true, false); // block per row
    layernorm_case(19, 96, false, true);
    layernorm_case(3, 1536, true, true);
}

#[test]
fn layernorm_backward_matches_cpu() {
    use tuna_kernels::ops::layernorm::{LayerNormKernel, LayerNormParams};
    let (rows, dim) = (70usize, 200usize);
    let mut rng = Rng::new(3);
    let (x, g, b) = (rng.normal_vec(rows * dim, 1.5), rng.normal_vec(dim, 1.0), rng.normal_vec(dim, 1.0));
    let dy = rng.normal_vec(rows * dim, 1.0);
    let dx0 = rng.normal_vec(rows * dim, 1.0);
    let p = LayerNormParams::new(rows, dim, 1e-5);
    let (mut y, mut mean, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows], vec![0f32; rows]);
    Cpu.layernorm_fwd(&p, &x, &g, &b, &mut y, &mut mean, &mut rstd).unwrap();
    let (mut rdx, mut rdg, mut rdb) = (dx0.clone(), vec![0.5f32; dim], vec![-0.5f32; dim]);
    Cpu.layernorm_bwd(&p, &x, &g, &mean, &rstd, &dy, &mut rdx, Some(&mut rdg), Some(&mut rdb)).unwrap();

    let mut dx = dx0.clone();
    let args = Args::default().v(p).p(&x).p(&g).p(&mean).p(&rstd).p(&dy).m(&mut dx);
    ok("layernorm_bwd_warp_f32", [rows.div_ceil(8) as u32, 1, 1], [256, 1, 1], 0, args);
    // dgamma/dbeta: per-chunk partials (32 x 8 blocks), then the in-order reduction
    let chunk_rows = (rows as u32).div_ceil(1024).max(32);
    let chunks = (rows as u32).div_ceil(chunk_rows);
    let (mut pg, mut pb) = (vec![0f32; chunks as usize * dim], vec![0f32; chunks as usize * dim]);
    let args = Args::default().v(p).v(chunk_rows).p(&x).p(&mean).p(&rstd).p(&dy).m(&mut pg).m(&mut pb);
    ok("layernorm_bwd_params_f32", [(dim as u32).div_ceil(32), chunks, 1], [32, 8, 1], 0, args);
    let (mut dg, mut db) = (vec![0.5f32; dim], vec![-0.5f32; dim]);
    for (part, grad) in [(&pg, &mut dg), (&pb, &mut db)] {
        let args = Args::default().v(p).v(chunks).p(part).m(grad);
        ok("layernorm_bwd_reduce_f32", [(dim as u32).div_ceil(256), 1, 1], [256, 1, 1], 0, args);
    }
    Tol::CUDA_F32.assert_close("layernorm bwd dx", &dx, &rdx);
    Tol::CUDA_F32.assert_close("layernorm bwd dgamma", &dg, &rdg);
    Tol::CUDA_F32.assert_close("layernorm bwd dbeta", &db, &rdb);
}

#[test]
fn cross_entropy_matches_cpu() {
    use tuna_kernels::ops::cross_entropy::{CeParams, CrossEntropyKernel};
    for (rows, vocab, threads) in [(6usize, 300usize, 256u32), (4, 5000, 1024)] {
        let mut rng = Rng::new(vocab as u64);
        let logits = rng.normal_vec(rows * vocab, 3.0);
        let mut targets: Vec<i32> = (0..rows).map(|_| rng.below(vocab) as i32).collect();
        targets[1] = -100; // ignored
        let p = CeParams::new(rows, vocab).with_grad_scale(0.25);
        let mut rloss = vec![0f32; rows];
        Cpu.ce_fwd(&p, &logits, &targets, &mut rloss).unwrap();
        let mut rgrad = logits.clone();
        let mut rloss2 = vec![0f32; rows];
        Cpu.ce_fwd_bwd(&p, &mut rgrad, &targets, &mut rloss2).unwrap();

        let mut loss = vec![f32::NAN; rows];
        ok(
            "cross_entropy_fwd_f32",
            [rows as u32, 1, 1],
            [threads, 1, 1],
            0,
            Args::default().v(p).p(&logits).p(&targets).m(&mut loss),
        );
        Tol::CUDA_F32.assert_close(&format!("ce fwd vocab {vocab}"), &loss, &rloss);
        let mut grad = logits.clone();
        let mut loss2 = vec![f32::NAN; rows];
        ok(
            "cross_entropy_bwd_f32",
            [rows as u32, 1, 1],
            [threads, 1, 1],
            0,
            Args::default().v(p).m(&mut grad).p(&targets).m(&mut loss2),
        );
        Tol::CUDA_F32.assert_close(&format!("ce fwd_bwd loss vocab {vocab}"), &loss2, &rloss2);
        Tol::CUDA_F32.assert_close(&format!("ce fwd_bwd grad vocab {vocab}"), &grad, &rgrad);
    }
}

/// The other kernel families once each, as their launchers configure them, against the CPU op or
/// a few-line reference (so that an ASan run covers them too).
#[test]
fn other_kernels_match_references() {
    use tuna_kernels::ops::elementwise::{BiasParams, PoolParams};
    use tuna_kernels::ops::embedding::EmbedParams;
    use tuna_kernels::ops::grad::GradParams;
    use tuna_kernels::ops::rmsnorm::{RmsNormKernel, RmsNormParams};
    use tuna_kernels::ops::rope::{RopeKernel, RopeParams};
    let mut rng = Rng::new(99);

    // rmsnorm forward, warp and block variants
    for (rows, dim, block) in [(21usize, 320usize, false), (3, 3000, true)] {
        let (x, g) = (rng.normal_vec(rows * dim, 1.0), rng.normal_vec(dim, 1.0));
        let p = RmsNormParams::new(rows, dim, 1e-6);
        let (mut ry, mut rr) = (vec![0f32; rows * dim], vec![0f32; rows]);
        Cpu.rmsnorm_fwd(&p, &x, &g, &mut ry, &mut rr).unwrap();
        let (mut y, mut r) = (vec![0f32; rows * dim], vec![0f32; rows]);
        let (name, grid) = if block { ("block", rows as u32) } else { ("warp", rows.div_ceil(8) as u32) };
        let args = Args::default().v(p).p(&x).p(&g).m(&mut y).m(&mut r);
        ok(&format!("rmsnorm_fwd_{name}_f32"), [grid, 1, 1], [256, 1, 1], 0, args);
        Tol::CUDA_F32.assert_close(&format!("rmsnorm {name} y"), &y, &ry);
        Tol::CUDA_F32.assert_close(&format!("rmsnorm {name} rstd"), &r, &rr);
    }

    // rope forward: one block per token, head_dim floats of dynamic shared memory
    let p = RopeParams::new(2, 9, 3, 64, 10000.0);
    let n = p.tokens() * 3 * 64;
    let x = rng.normal_vec(n, 1.0);
    let pos: Vec<u32> = (0..p.tokens() as u32).map(|i| i * 7 % 50).collect();
    let mut ry = vec![0f32; n];
    Cpu.rope_fwd(&p, &pos, &x, &mut ry).unwrap();
    let mut y = vec![0f32; n];
    ok("rope_fwd_f32", [p.tokens() as u32, 1, 1], [128, 1, 1], 64 * 4, Args::default().v(p).p(&pos).p(&x).m(&mut y));
    Tol::CUDA_F32.assert_close("rope fwd", &y, &ry);

    // masked mean pooling, forward and backward
    let (b, t, h) = (3usize, 40usize, 300usize);
    let pp = PoolParams::new(b, t, h);
    let x = rng.normal_vec(b * t * h, 1.0);
    let mut mask: Vec<u8> = (0..b * t).map(|i| (i % 3 != 0) as u8).collect();
    mask[2 * t..].fill(0); // a row with nothing: divides by 1
    let cnt = |bb: usize| (mask[bb * t..(bb + 1) * t].iter().map(|&m| m as f32).sum::<f32>()).max(1.0);
    let want: Vec<f32> = (0..b * h)
        .map(|i| {
            let (bb, hh) = (i / h, i % h);
            (0..t).map(|tt| mask[bb * t + tt] as f32 * x[(bb * t + tt) * h + hh]).sum::<f32>() / cnt(bb)
        })
        .collect();
    let mut y = vec![0f32; b * h];
    let gx = h.div_ceil(256) as u32;
    ok(
        "sum_rows_masked_mean_fwd_f32",
        [gx, b as u32, 1],
        [256, 1, 1],
        0,
        Args::default().v(pp).p(&x).p(&mask).m(&mut y),
    );
    Tol::CUDA_F32.assert_close("masked mean fwd", &y, &want);
    let dy = rng.normal_vec(b * h, 1.0);
    let mut dx = vec![1f32; b * t * h];
    let gx = (t * h).div_ceil(256).min(64) as u32;
    ok(
        "sum_rows_masked_mean_bwd_f32",
        [gx, b as u32, 1],
        [256, 1, 1],
        0,
        Args::default().v(pp).p(&mask).p(&dy).m(&mut dx),
    );
    let want: Vec<f32> = (0..b * t * h)
        .map(|i| {
            let (bb, tt, hh) = (i / (t * h), i / h % t, i % h);
            1.0 + mask[bb * t + tt] as f32 / cnt(bb) * dy[bb * h + hh]
        })
        .collect();
    Tol::CUDA_F32.assert_close("masked mean bwd", &dx, &want);

    // add_bias backward: per-chunk partials, then the in-order reduction
    let (rows, cols) = (100usize, 70usize);
    let bp = BiasParams::new(rows, cols);
    let dy = rng.normal_vec(rows * cols, 1.0);
    let chunk_rows = (rows as u64).div_ceil(1024).max(32);
    let chunks = (rows as u64).div_ceil(chunk_rows) as u32;
    let mut part = vec![0f32; chunks as usize * cols];
    let args = Args::default().v(bp).v(chunk_rows).p(&dy).m(&mut part);
    ok("add_bias_bwd_partials_f32", [cols.div_ceil(32) as u32, chunks, 1], [32, 8, 1], 0, args);
    let mut db = vec![0.25f32; cols];
    ok("add_bias_bwd_reduce_f32", [1, 1, 1], [256, 1, 1], 0, Args::default().v(bp).v(chunks).p(&part).m(&mut db));
    let want: Vec<f32> = (0..cols).map(|c| 0.25 + (0..rows).map(|r| dy[r * cols + c]).sum::<f32>()).collect();
    Tol::CUDA_F32.assert_close("add_bias dbias", &db, &want);

    // squared gradient norm: block sums and one atomicAdd per block
    let g = rng.normal_vec(5000, 1.0);
    let mut acc = vec![0f32];
    let gp = GradParams { n: g.len() as u64, scale: 1.0, max_norm: 0.0 };
    ok(
        "grad_sqnorm_f32",
        [g.len().div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        Args::default().v(gp).p(&g).m(&mut acc),
    );
    Tol::CUDA_F32.assert_close("grad sqnorm", &acc, &[g.iter().map(|v| v * v).sum::<f32>()]);

    // embedding with a soft prompt: forward rows, and the table gradient (atomics)
    let ep = EmbedParams { batch: 2, seq: 5, vocab: 11, hidden: 300, n_prompt: 3, _pad: 0 };
    let (hid, len) = (300usize, 8usize);
    let table = rng.normal_vec(11 * hid, 1.0);
    let prompt = rng.normal_vec(3 * hid, 1.0);
    let ids: Vec<u32> = vec![1, 4, 4, 10, 0, 7, 7, 7, 2, 3];
    let at: Vec<u32> = vec![0, 9]; // the second clamps to seq: the prompt goes last
    let mut out = vec![0f32; 2 * len * hid];
    ok(
        "embedding_fwd_f32",
        [2 * len as u32, 1, 1],
        [256, 1, 1],
        0,
        Args::default().v(ep).p(&table).p(&ids).p(&prompt).p(&at).m(&mut out),
    );
    for bb in 0..2 {
        let a = at[bb].min(5) as usize;
        for tt in 0..len {
            let src = if tt >= a && tt < a + 3 {
                &prompt[(tt - a) * hid..(tt - a + 1) * hid]
            } else {
                let j = if tt < a { tt } else { tt - 3 };
                let id = ids[bb * 5 + j] as usize;
                &table[id * hid..(id + 1) * hid]
            };
            assert_eq!(&out[(bb * len + tt) * hid..(bb * len + tt + 1) * hid], src, "embedding row {bb},{tt}");
        }
    }
    let mut dt = vec![0f32; 11 * hid];
    ok("embedding_bwd_table_f32", [10, 1, 1], [256, 1, 1], 0, Args::default().v(ep).p(&ids).p(&at).p(&out).m(&mut dt));
    let mut want = vec![0f32; 11 * hid];
    for bb in 0..2 {
        let a = at[bb].min(5) as usize;
        for j in 0..5 {
            let tt = if j < a { j } else { j + 3 };
            let id = ids[bb * 5 + j] as usize;
            for k in 0..hid {
                want[id * hid + k] += out[(bb * len + tt) * hid + k];
            }
        }
    }
    Tol::CUDA_F32.assert_close("embedding d_table", &dt, &want);
}

// ---- attention: against the CPU op, and the retired dev/attention_emu double reference ----------

enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}
impl Buf {
    fn new(x: &[f32], is_bf16: bool) -> Buf {
        if is_bf16 {
            Buf::Bf16(bf(x))
        } else {
            Buf::F32(x.to_vec())
        }
    }
    fn ptr(&mut self) -> *mut c_void {
        match self {
            Buf::F32(v) => v.as_mut_ptr().cast(),
            Buf::Bf16(v) => v.as_mut_ptr().cast(),
        }
    }
    fn f32(&self) -> Vec<f32> {
        match self {
            Buf::F32(v) => v.clone(),
            Buf::Bf16(v) => unbf(v),
        }
    }
}

struct AttnCase {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    s: usize,
    p: usize,
    d: usize,
    causal: bool,
    mask: bool,
    bf16: bool,
}

struct AttnOut {
    o: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dpk: Vec<f32>,
    dpv: Vec<f32>,
}

/// The attention kernels' launch sequence (as in ops/attention/cuda.rs): forward, then the
/// backward's delta preprocess, key-block main kernel and dq add.
fn attention_emu(
    c: &AttnCase,
    p: tuna_kernels::ops::attention::AttnParams,
    inp: [&[f32]; 5],
    mask: &[u8],
    d_o: &[f32],
    g0: [&[f32]; 5],
) -> AttnOut {
    let dt = if c.bf16 { "bf16" } else { "f32" };
    let [q, k, v, pk, pv] = inp.map(|x| Buf::new(x, c.bf16));
    let (mut q, mut k, mut v, mut pk, mut pv) = (q, k, v, pk, pv);
    let mut dob = Buf::new(d_o, c.bf16);
    let [dq0, dk0, dv0, dpk0, dpv0] = g0;
    let (mut dq, mut dk, mut dv) = (Buf::new(dq0, c.bf16), Buf::new(dk0, c.bf16), Buf::new(dv0, c.bf16));
    let (mut dpk, mut dpv) = (dpk0.to_vec(), dpv0.to_vec());
    let (nq, nl) = (c.b * c.t * c.h * c.d, c.b * c.h * c.t);
    let mut o = Buf::new(&vec![0f32; nq], c.bf16);
    let mut lse = vec![0f32; nl];
    let mut mask_v = if c.mask { mask.to_vec() } else { vec![0u8] };
    let (qp, kp, vp, op, dop) = (q.ptr(), k.ptr(), v.ptr(), o.ptr(), dob.ptr());
    // an empty prefix passes q as the dummy (never read), as the launcher does
    let (pkp, pvp) = if c.p > 0 { (pk.ptr(), pv.ptr()) } else { (qp, qp) };
    let (mut d1, mut d2) = (vec![0f32; 1], vec![0f32; 1]);
    let (dpkp, dpvp) = if c.p > 0 { (dpk.as_mut_ptr(), dpv.as_mut_ptr()) } else { (d1.as_mut_ptr(), d2.as_mut_ptr()) };
    let tile = 32;
    let fs = (4 * tile * (3 * c.d + 1)) as u32;
    let bs = (4 * (4 * tile * (c.d + 1) + 2 * tile * (tile + 1) + 2 * tile)) as u32;
    // no per-sequence prefix ranges: a stand-in (never read, has_prefix_rows is 0)
    let mut rows_v = vec![0u32; 1];
    let rows_p = rows_v.as_mut_ptr();
    // no bias: q stands in (never read, has_bias is 0), and a 1-float dbias stand-in
    let mut no_dbias = vec![0f32; 1];
    let fwd =
        Args::default().v(p).v(qp).v(kp).v(vp).v(pkp).v(pvp).v(rows_p).v(mask_v.as_mut_ptr()).v(qp).v(op).m(&mut lse);
    ok(
        &format!("attention_fwd_d{}_{dt}", c.d),
        [c.t.div_ceil(32) as u32, c.h as u32, c.b as u32],
        [256, 1, 1],
        fs,
        fwd,
    );
    let mut delta = vec![0f32; nl];
    let mut dq_acc = vec![0f32; nq];
    ok(
        &format!("attention_bwd_pre_{dt}"),
        [nl.div_ceil(8) as u32, 1, 1],
        [256, 1, 1],
        0,
        Args::default().v(p).v(op).v(dop).m(&mut delta),
    );
    let bwd = Args::default()
        .v(p)
        .v(qp)
        .v(kp)
        .v(vp)
        .v(pkp)
        .v(pvp)
        .v(rows_p)
        .v(mask_v.as_mut_ptr())
        .v(qp)
        .v(dop)
        .p(&lse)
        .p(&delta)
        .m(&mut dq_acc)
        .v(dk.ptr())
        .v(dv.ptr())
        .v(dpkp)
        .v(dpvp)
        .m(&mut no_dbias);
    let kblocks = (c.p.div_ceil(32) + c.s.div_ceil(32)) as u32;
    ok(&format!("attention_bwd_d{}_{dt}", c.d), [kblocks, c.kvh as u32, c.b as u32], [256, 1, 1], bs, bwd);
    ok(
        &format!("attention_dq_add_{dt}"),
        [nq.div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        Args::default().v(nq as u64).p(&dq_acc).v(dq.ptr()),
    );
    AttnOut { o: o.f32(), lse, dq: dq.f32(), dk: dk.f32(), dv: dv.f32(), dpk, dpv }
}

fn attention_check(c: AttnCase) {
    use tuna_kernels::ops::attention::AttnParams;
    let mut rng = Rng::new((c.t * 7 + c.d) as u64);
    let mut rnd = |n: usize| {
        let x = rng.normal_vec(n, 1.0);
        if c.bf16 {
            round_bf16(&x)
        } else {
            x
        }
    };
    let (nq, nkv, np) = (c.b * c.t * c.h * c.d, c.b * c.s * c.kvh * c.d, c.p * c.kvh * c.d);
    let (q, k, v, pk, pv, d_o) = (rnd(nq), rnd(nkv), rnd(nkv), rnd(np), rnd(np), rnd(nq));
    let (dq0, dk0, dv0, dpk0, dpv0) = (rnd(nq), rnd(nkv), rnd(nkv), rnd(np), rnd(np));
    let mut mask = vec![1u8; c.b * c.s];
    if c.mask {
        for m in mask.iter_mut() {
            *m = (rng.below(4) != 0) as u8;
        }
        mask[0] = 0;
        if c.b > 1 {
            mask[(c.b - 1) * c.s..].fill(0); // a sequence with every key masked
        }
    }
    let p = AttnParams {
        batch: c.b as u32,
        heads: c.h as u32,
        kv_heads: c.kvh as u32,
        q_len: c.t as u32,
        kv_len: c.s as u32,
        prefix_len: c.p as u32,
        head_dim: c.d as u32,
        causal: c.causal as u32,
        has_mask: c.mask as u32,
        has_prefix_rows: 0,
        kv_cap: 0,
        has_bias: 0,
        scale: 1.0 / (c.d as f32).sqrt(),
    };
    let got = attention_emu(&c, p, [&q, &k, &v, &pk, &pv], &mask, &d_o, [&dq0, &dk0, &dv0, &dpk0, &dpv0]);

    // double reference (ported from dev/attention_emu/main.cpp)
    let d = c.d;
    let sc = p.scale as f64;
    let g = c.h / c.kvh;
    let w = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (mut ro, mut rl) = (vec![0f64; nq], vec![0f64; c.b * c.h * c.t]);
    let (mut rdq, mut rdk, mut rdv, mut rdpk, mut rdpv) = (w(&dq0), w(&dk0), w(&dv0), w(&dpk0), w(&dpv0));
    for b in 0..c.b {
        for i in 0..c.t {
            for h in 0..c.h {
                let kh = h / g;
                let qo = ((b * c.t + i) * c.h + h) * d;
                // keys: (is_prefix, j)
                let mut keys: Vec<(bool, usize)> = (0..c.p).map(|j| (true, j)).collect();
                for j in 0..c.s {
                    if (!c.mask || mask[b * c.s + j] != 0) && (!c.causal || j + c.t <= c.s + i) {
                        keys.push((false, j));
                    }
                }
                let ko = |(pre, j): (bool, usize)| ((if pre { j } else { b * c.s + j }) * c.kvh + kh) * d;
                let li = (b * c.h + h) * c.t + i;
                if keys.is_empty() {
                    rl[li] = f64::NEG_INFINITY;
                    continue;
                }
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&kk| {
                        let kb = if kk.0 { &pk } else { &k };
                        (0..d).map(|e| q[qo + e] as f64 * kb[ko(kk) + e] as f64).sum::<f64>() * sc
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                rl[li] = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                let delta: f64 = (0..d).map(|e| d_o[qo + e] as f64 * got.o[qo + e] as f64).sum();
                for (t, &kk) in keys.iter().enumerate() {
                    let pr = (s[t] - rl[li]).exp();
                    let (kb, vb) = if kk.0 { (&pk, &pv) } else { (&k, &v) };
                    let dp: f64 = (0..d).map(|e| d_o[qo + e] as f64 * vb[ko(kk) + e] as f64).sum();
                    let ds = pr * (dp - delta);
                    for e in 0..d {
                        ro[qo + e] += pr * vb[ko(kk) + e] as f64;
                        rdq[qo + e] += sc * ds * kb[ko(kk) + e] as f64;
                    }
                    let (dkr, dvr) = if kk.0 { (&mut rdpk, &mut rdpv) } else { (&mut rdk, &mut rdv) };
                    for e in 0..d {
                        dkr[ko(kk) + e] += sc * ds * q[qo + e] as f64;
                        dvr[ko(kk) + e] += pr * d_o[qo + e] as f64;
                    }
                }
            }
        }
    }
    let tol = if c.bf16 { Tol::CUDA_BF16 } else { Tol::new("attn-f32", 1e-4, 1e-3) };
    let what = format!(
        "attention B{} H{}/{} T{} S{} P{} D{} causal {} mask {} bf16 {}",
        c.b, c.h, c.kvh, c.t, c.s, c.p, c.d, c.causal, c.mask, c.bf16
    );
    // a fully masked row: lse -inf exactly
    for (i, (&gl, &wl)) in got.lse.iter().zip(&rl).enumerate() {
        assert_eq!(gl.is_infinite(), wl.is_infinite(), "{what}: lse[{i}] {gl} vs {wl}");
    }
    let fin = |x: &[f64]| x.iter().map(|&v| if v.is_infinite() { 0.0 } else { v }).collect::<Vec<f64>>();
    let finf = |x: &[f32]| x.iter().map(|&v| if v.is_infinite() { 0.0 } else { v }).collect::<Vec<f32>>();
    tol.assert_close(&format!("{what}: o"), &got.o, &ro);
    tol.assert_close(&format!("{what}: lse"), &finf(&got.lse), &fin(&rl));
    tol.assert_close(&format!("{what}: dq"), &got.dq, &rdq);
    tol.assert_close(&format!("{what}: dk"), &got.dk, &rdk);
    tol.assert_close(&format!("{what}: dv"), &got.dv, &rdv);
    tol.assert_close(&format!("{what}: dpk"), &got.dpk, &rdpk);
    tol.assert_close(&format!("{what}: dpv"), &got.dpv, &rdpv);
}

#[test]
fn attention_matches_double_reference_d32() {
    #[rustfmt::skip]
    attention_check(AttnCase { b: 2, h: 6, kvh: 2, t: 37, s: 37, p: 0, d: 32, causal: false, mask: true, bf16: false });
    #[rustfmt::skip]
    attention_check(AttnCase { b: 1, h: 2, kvh: 2, t: 45, s: 45, p: 0, d: 32, causal: true, mask: false, bf16: true });
}

#[test]
fn attention_matches_double_reference_d64() {
    #[rustfmt::skip]
    attention_check(AttnCase { b: 2, h: 4, kvh: 4, t: 37, s: 37, p: 0, d: 64, causal: true, mask: true, bf16: false });
    #[rustfmt::skip]
    attention_check(AttnCase { b: 2, h: 6, kvh: 2, t: 37, s: 70, p: 5, d: 64, causal: true, mask: true, bf16: true });
}

#[test]
fn attention_matches_double_reference_d128() {
    #[rustfmt::skip]
    attention_check(AttnCase { b: 2, h: 4, kvh: 1, t: 37, s: 70, p: 35, d: 128, causal: true, mask: true, bf16: false });
    #[rustfmt::skip]
    attention_check(AttnCase { b: 1, h: 2, kvh: 2, t: 33, s: 33, p: 3, d: 128, causal: false, mask: false, bf16: false });
}

#[test]
fn attention_forward_d32_matches_cpu() {
    use tuna_kernels::ops::attention::{AttentionKernel, AttnInputs, AttnParams};
    let mut p = AttnParams::new(2, 4, 2, 50, 32, true);
    p.kv_len = 50;
    let mut rng = Rng::new(77);
    let (q, k, v) =
        (rng.normal_vec(p.q_elems(), 1.0), rng.normal_vec(p.kv_elems(), 1.0), rng.normal_vec(p.kv_elems(), 1.0));
    let mut ro = vec![0f32; p.q_elems()];
    let mut rl = vec![0f32; p.lse_elems()];
    let inputs: AttnInputs<'_, Cpu, f32> =
        AttnInputs { q: &q, k: &k, v: &v, prefix: None, key_mask: None, prefix_rows: None, bias: None };
    Cpu.attn_fwd(&p, inputs, &mut ro, &mut rl).unwrap();
    let mut o = vec![0f32; p.q_elems()];
    let mut lse = vec![0f32; p.lse_elems()];
    let (dummy, no_rows) = ([0u8], [0u32]);
    let args = Args::default().v(p).p(&q).p(&k).p(&v).p(&q).p(&q).p(&no_rows).p(&dummy).p(&q).m(&mut o).m(&mut lse);
    ok("attention_fwd_d32_f32", [2, 4, 2], [256, 1, 1], 4 * 32 * (3 * 32 + 1), args);
    Tol::CUDA_F32.assert_close("attention fwd o vs CPU", &o, &ro);
    Tol::CUDA_F32.assert_close("attention fwd lse vs CPU", &lse, &rl);
}

// ---- concurrency and speed ----------------------------------------------------------------------

fn layernorm_emu(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    use tuna_kernels::ops::layernorm::LayerNormParams;
    let mut rng = Rng::new(seed);
    let (x, g, b) = (rng.normal_vec(rows * dim, 1.0), rng.normal_vec(dim, 1.0), rng.normal_vec(dim, 1.0));
    let (mut y, mut mean, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows], vec![0f32; rows]);
    let p = LayerNormParams::new(rows, dim, 1e-5);
    let args = Args::default().v(p).p(&x).p(&g).p(&b).m(&mut y).m(&mut mean).m(&mut rstd);
    ok("layernorm_fwd_block_f32", [rows as u32, 1, 1], [256, 1, 1], 0, args);
    y
}

#[test]
fn launches_from_many_threads_at_once() {
    let want: Vec<Vec<f32>> = (0..4).map(|s| layernorm_emu(40, 1100, s)).collect();
    let before = emu::launches("layernorm_fwd_block_f32");
    let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|sc| {
        let hs: Vec<_> =
            (0..4).map(|s| sc.spawn(move || (0..3).map(|_| layernorm_emu(40, 1100, s)).collect())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (s, runs) in got.iter().enumerate() {
        for r in runs {
            assert!(r.iter().zip(&want[s]).all(|(a, b)| a.to_bits() == b.to_bits()), "thread {s}: bitwise the same");
        }
    }
    assert!(emu::launches("layernorm_fwd_block_f32") >= before + 12);
}

// ---- tensor-core primitives (kernels/mma.cuh) ----------------------------------------------------

/// Random bf16 values (normal, scale 1), as raw bits and as f32.
fn rand_bf16(rng: &mut Rng, n: usize) -> (Vec<u16>, Vec<f32>) {
    let v: Vec<f32> = rng.normal_vec(n, 1.0).iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    (v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect(), v)
}

#[test]
fn mma_m16n8k16_bf16_matches_a_double_reference() {
    let mut rng = Rng::new(1616);
    let warps = 2;
    let (a_bits, a) = rand_bf16(&mut rng, warps * 256);
    let (b_bits, b) = rand_bf16(&mut rng, warps * 128);
    let c = rng.normal_vec(warps * 128, 4.0);
    let mut d = vec![0f32; warps * 128];
    ok("emu_test_mma", [1, 1, 1], [32 * warps as u32, 1, 1], 0, Args::default().p(&a_bits).p(&b_bits).p(&c).m(&mut d));
    for w in 0..warps {
        for i in 0..16 {
            for j in 0..8 {
                let mut s = c[w * 128 + i * 8 + j] as f64;
                for k in 0..16 {
                    s += a[w * 256 + i * 16 + k] as f64 * b[w * 128 + k * 8 + j] as f64;
                }
                let got = d[w * 128 + i * 8 + j] as f64;
                // the emulator's model: the exact sum rounded once to f32
                assert!(
                    (got - s).abs() <= s.abs() * 6e-8 + 1e-30,
                    "warp {w} D[{i}][{j}]: got {got:e}, want {s:e} (f32 {:e})",
                    s as f32
                );
            }
        }
    }
}

#[test]
fn ldmatrix_follows_the_fragment_layout() {
    let mut rng = Rng::new(88);
    let src: Vec<u16> = (0..256).map(|_| rng.next_u64() as u16).collect();
    let mut out = vec![0u32; 6 * 32 * 4];
    ok("emu_test_ldmatrix", [1, 1, 1], [32, 1, 1], 0, Args::default().p(&src).m(&mut out));
    for v in 0..6 {
        let (num, trans) = (1usize << (v % 3), v >= 3);
        for lane in 0..32 {
            let (g, c) = (lane / 4, 2 * (lane % 4));
            for i in 0..4 {
                let got = out[(v * 32 + lane) * 4 + i];
                let want = if i < num {
                    let m = |r: usize, col: usize| src[i * 64 + r * 8 + col] as u32;
                    if trans {
                        m(c, g) | m(c + 1, g) << 16
                    } else {
                        m(g, c) | m(g, c + 1) << 16
                    }
                } else {
                    0xdead_beef // not written by this variant
                };
                assert_eq!(got, want, "variant x{num}{} lane {lane} register {i}", if trans { ".trans" } else { "" });
            }
        }
    }
}

#[test]
fn cp_async_lands_at_the_wait_and_reads_nan_before() {
    let mut rng = Rng::new(4);
    let src = rng.normal_vec(256, 1.0);
    let mut out = vec![0f32; 512];
    ok("emu_test_cp_async", [1, 1, 1], [32, 1, 1], 0, Args::default().p(&src).m(&mut out).v(0i32));
    assert_eq!(&out[..128], &src[..128], "group 0 after wait_group 1");
    assert!(out[128..256].iter().all(|x| x.is_nan()), "group 1 is still pending after wait_group 1: NaN");
    for lane in 0..32 {
        let n = ((lane + 1) % 32) * 4;
        for i in 0..4 {
            assert_eq!(out[256 + lane * 4 + i], src[n + i], "lane {lane} reads its neighbour's group 0");
            assert_eq!(out[384 + lane * 4 + i], src[128 + n + i], "lane {lane} reads its neighbour's group 1");
        }
    }
    // The classic bug: no wait before reading the destination.
    let mut out = vec![0f32; 512];
    ok("emu_test_cp_async", [1, 1, 1], [32, 1, 1], 0, Args::default().p(&src).m(&mut out).v(1i32));
    assert!(out[..128].iter().all(|x| x.is_nan()), "read before cp.async.wait_group must see the NaN fill");
    // Misaligned source, destination outside shared memory.
    let mut out = vec![0f32; 512];
    let a = |o: &mut Vec<f32>, mode: i32| Args::default().p(&src).m(o).v(mode);
    expect_err(
        3,
        "emu_test_cp_async",
        [1, 1, 1],
        [32, 1, 1],
        0,
        a(&mut out, 2),
        &["emu_test_cp_async", "cp.async.cg.shared.global", "16-byte aligned", "test_kernels.cu:"],
    );
    expect_err(
        3,
        "emu_test_cp_async",
        [1, 1, 1],
        [32, 1, 1],
        0,
        a(&mut out, 3),
        &["cp.async.cg.shared.global", "not inside the block's shared memory", "test_kernels.cu:"],
    );
}

#[test]
fn misused_warp_matrix_ops_are_faults() {
    let mut out = vec![0f32; 64];
    let a = |o: &mut Vec<f32>, mode: i32| Args::default().v(mode).m(o);
    let k = "emu_test_mma_misuse";
    let mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    // a lane that exits instead of joining the mma
    expect_err(3, k, [1, 1, 1], [32, 1, 1], 0, a(&mut out, 0), &[k, "thread (5,0,0) exited", mma, "test_kernels.cu:"]);
    // lanes at two different mma call sites
    expect_err(3, k, [1, 1, 1], [32, 1, 1], 0, a(&mut out, 1), &[k, mma, "same instruction", "test_kernels.cu:"]);
    // half the warp at __syncthreads: reported as a deadlock, not a hang
    expect_err(3, k, [1, 1, 1], [32, 1, 1], 0, a(&mut out, 2), &["deadlock", k, mma, "__syncthreads"]);
    // ldmatrix rows: misaligned, not in shared memory
    expect_err(
        3,
        k,
        [1, 1, 1],
        [32, 1, 1],
        0,
        a(&mut out, 3),
        &[k, "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "lane 3", "not 16-byte aligned", "test_kernels.cu:"],
    );
    expect_err(
        3,
        k,
        [1, 1, 1],
        [32, 1, 1],
        0,
        a(&mut out, 4),
        &[k, "ldmatrix.sync.aligned.m8n8.x2.shared.b16", "lane 9", "not inside the block's shared memory"],
    );
    // a partial warp cannot run an mma: an invalid launch
    expect_err(2, k, [1, 1, 1], [16, 1, 1], 0, a(&mut out, 0), &[k, mma, "multiple of 32"]);
}

#[test]
fn mma_gemm_kernel_matches_a_double_reference() {
    let mut rng = Rng::new(6464);
    let (m, n, k) = (128usize, 128usize, 96usize); // 2 x 2 blocks, 3 K chunks (both buffers, odd count)
    let (a_bits, a) = rand_bf16(&mut rng, m * k);
    let (b_bits, b) = rand_bf16(&mut rng, n * k);
    let mut c = vec![f32::NAN; m * n];
    let args =
        |c: &mut Vec<f32>, kk: usize| Args::default().p(&a_bits).p(&b_bits).m(c).v(m as i32).v(n as i32).v(kk as i32);
    ok("mma_gemm_bf16_nt", [(n / 64) as u32, (m / 64) as u32, 1], [128, 1, 1], 0, args(&mut c, k));
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0f64, 0f64);
            for kk in 0..k {
                let p = a[i * k + kk] as f64 * b[j * k + kk] as f64;
                s += p;
                mag += p.abs();
            }
            // one f32 rounding of the running sum per k16 step (6 here)
            let got = c[i * n + j] as f64;
            assert!((got - s).abs() <= mag * 1e-6, "C[{i}][{j}]: got {got:e}, want {s:e}");
        }
    }
    // k not a multiple of 32: the kernel refuses (traps)
    let mut c2 = vec![0f32; m * n];
    expect_err(3, "mma_gemm_bf16_nt", [2, 2, 1], [128, 1, 1], 0, args(&mut c2, 80), &["mma_gemm_bf16_nt", "__trap()"]);
}
