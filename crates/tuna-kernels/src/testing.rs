//! Test support shared by every op's tests (and by the higher crates): a seeded RNG, named
//! tolerances with a checker that prints the first mismatches, and the CUDA skip rule.

use crate::rng::{SplitMix64, GOLDEN};
use std::sync::{Arc, OnceLock};

/// Test inputs from [`SplitMix64`], so tests are reproducible with no extra dependency.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed ^ GOLDEN))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    /// Integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// `n` values uniform in [lo, hi).
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// `n` values, standard normal times `scale`.
    pub fn normal_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// A named tolerance: `|got - want| <= atol + rtol * |want|`.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub name: &'static str,
    pub atol: f64,
    pub rtol: f64,
}

impl Tol {
    /// f32 CPU kernel against an f64 reference, for short reductions.
    pub const F32: Tol = Tol { name: "f32", atol: 1e-5, rtol: 1e-4 };
    /// f32 against f64 where a reduction runs over thousands of terms (attention, matmul, CE).
    pub const F32_LONG: Tol = Tol { name: "f32-long", atol: 1e-4, rtol: 1e-3 };
    /// CUDA f32 against CPU f32: different summation order, fast-math intrinsics.
    pub const CUDA_F32: Tol = Tol { name: "cuda-f32", atol: 1e-4, rtol: 1e-3 };
    /// CUDA bf16 against CPU f32 on bf16-rounded inputs: bf16 has 8 mantissa bits (~4e-3).
    pub const CUDA_BF16: Tol = Tol { name: "cuda-bf16", atol: 2e-2, rtol: 2e-2 };
    /// f64 CPU kernel against an f64 reference: only summation order differs.
    pub const F64: Tol = Tol { name: "f64", atol: 1e-12, rtol: 1e-10 };
    /// Central finite differences in f64.
    pub const GRAD_CHECK: Tol = Tol { name: "grad-check", atol: 1e-6, rtol: 1e-5 };

    pub const fn new(name: &'static str, atol: f64, rtol: f64) -> Tol {
        Tol { name, atol, rtol }
    }

    /// Panics, listing the first mismatches with their indices, where `got` and `want` differ
    /// by more than this tolerance (or have different lengths, or `got` has a NaN).
    pub fn assert_close<A: Copy + Into<f64>, B: Copy + Into<f64>>(&self, what: &str, got: &[A], want: &[B]) {
        assert_eq!(got.len(), want.len(), "{what}: length {} vs reference {}", got.len(), want.len());
        let mut bad = Vec::new();
        let mut worst = 0.0f64;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let (g, w): (f64, f64) = (g.into(), w.into());
            let err = (g - w).abs();
            let lim = self.atol + self.rtol * w.abs();
            if err.is_nan() || err > lim {
                if bad.len() < 8 {
                    bad.push(format!("  [{i}] got {g:.7e} want {w:.7e} (err {err:.2e} > {lim:.2e})"));
                }
                worst = worst.max(err);
            }
        }
        if !bad.is_empty() {
            panic!(
                "{what}: mismatches beyond tolerance {} (atol {:e}, rtol {:e}); worst abs err {worst:.3e}; first:\n{}",
                self.name,
                self.atol,
                self.rtol,
                bad.join("\n")
            );
        }
    }
}

/// Round f32 values through bf16, for feeding the same inputs to a CPU reference and a bf16 kernel.
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

/// Widen to f64 for references.
pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The CUDA device for a CUDA test, or `None` after printing `SKIPPED <test>: <reason>`.
///
/// Set `TUNA_REQUIRE_CUDA=1` (the GPU harness does) to turn a skip into a failure.
pub fn cuda_or_skip(test: &str) -> Option<Arc<crate::Cuda>> {
    static DEV: OnceLock<Result<Arc<crate::Cuda>, String>> = OnceLock::new();
    let dev = DEV.get_or_init(|| crate::Cuda::new(0).map(Arc::new).map_err(|e| e.to_string()));
    match dev {
        Ok(d) => Some(d.clone()),
        Err(reason) => {
            if std::env::var("TUNA_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("{test}: TUNA_REQUIRE_CUDA=1 but CUDA is unavailable: {reason}");
            }
            note_skip(test, &format!("no CUDA device ({reason})"));
            None
        }
    }
}

/// Say that `test` skipped, by name: on stdout and stderr (shown with `--nocapture`), and as a
/// line appended to the file named by `TUNA_SKIP_LOG` (CI prints that file at the end, since the
/// test harness captures the output of passing tests).
pub fn note_skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    println!("{line}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("TUNA_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The CPU's model name from `/proc/cpuinfo` ("unknown CPU" where there is none): benchmarks and
/// `tuna info` print it beside their numbers.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The best time in seconds of `f` over about one second of repetitions, after one warm-up call
/// (the benchmarks' clock).
pub fn best_time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < 1.0 {
        let t = std::time::Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}
