//! CPU fused attention benchmark: forward and forward+backward GFLOP/s at GPT-2-small and
//! MiniLM shapes beside a same-run gemm matmul, and peak extra heap bytes per call (a counting
//! global allocator) to show memory grows linearly in T, not as T^2.
//!
//! Run: `cargo bench -p tuna-kernels --bench cpu_attention`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;
use tuna_kernels::ops::attention::{AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use tuna_kernels::testing::Rng;
use tuna_kernels::Cpu;

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap bytes allocated beyond what was live when `f` started.
fn peak_extra(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    f();
    PEAK.load(Relaxed) - base
}

/// Median seconds of `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

struct Case {
    p: AttnParams,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<u8>,
    d_o: Vec<f32>,
}

impl Case {
    fn new(b: usize, h: usize, t: usize, d: usize, causal: bool, padded: bool) -> Self {
        let mut p = AttnParams::new(b, h, h, t, d, causal);
        let mut rng = Rng::new(7);
        let mut mask = Vec::new();
        if padded {
            p.has_mask = 1;
            mask = vec![1u8; b * t];
            for row in mask.chunks_mut(t) {
                row[t / 2 + rng.below(t / 2)..].fill(0); // keep between half and all tokens
            }
        }
        Case {
            q: rng.normal_vec(p.q_elems(), 1.0),
            k: rng.normal_vec(p.kv_elems(), 1.0),
            v: rng.normal_vec(p.kv_elems(), 1.0),
            d_o: rng.normal_vec(p.q_elems(), 1.0),
            mask,
            p,
        }
    }
    /// FLOPs of the (query, key) pairs the masks leave visible: the work that matters.
    fn useful_fwd_flops(&self) -> f64 {
        let (b, t) = (self.p.batch as usize, self.p.q_len as usize);
        let visible: usize = (0..b * t)
            .map(|bi| {
                let (bb, i) = (bi / t, bi % t);
                let keys = if self.p.causal == 1 { i + 1 } else { t };
                (0..keys).filter(|&j| self.p.has_mask == 0 || self.mask[bb * t + j] == 1).count()
            })
            .sum();
        4.0 * (self.p.heads * self.p.head_dim) as f64 * visible as f64
    }
    fn x(&self) -> AttnInputs<'_, Cpu, f32> {
        AttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix: None,
            key_mask: (self.p.has_mask == 1).then_some(&self.mask[..]),
            prefix_rows: None,
            bias: None,
        }
    }
    fn fwd(&self, o: &mut [f32], lse: &mut [f32]) {
        Cpu.attn_fwd(&self.p, self.x(), o, lse).expect("attention forward");
    }
    fn bwd(&self, o: &[f32], lse: &[f32], g: &mut [Vec<f32>; 3]) {
        let [dq, dk, dv] = g;
        let grads = AttnGrads::<Cpu, f32> { dq, dk, dv, dprefix: None, dbias: None };
        Cpu.attn_bwd(&self.p, self.x(), o, &self.d_o, lse, grads).expect("attention backward");
    }
    fn buffers(&self) -> (Vec<f32>, Vec<f32>, [Vec<f32>; 3]) {
        let p = &self.p;
        (
            vec![0.0; p.q_elems()],
            vec![0.0; p.lse_elems()],
            [vec![0.0; p.q_elems()], vec![0.0; p.kv_elems()], vec![0.0; p.kv_elems()]],
        )
    }
}

/// GFLOP/s of a 1024^3 f32 gemm on every rayon thread, for scale.
fn matmul_gflops() -> f64 {
    let n = 1024;
    let (a, b, mut c) = (vec![1.0f32; n * n], vec![1.0f32; n * n], vec![0.0f32; n * n]);
    let threads = rayon::current_num_threads();
    let secs = time(5, || {
        // SAFETY: a, b, c are n x n row-major buffers that outlive the call; c aliases neither.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        }
    });
    2.0 * (n * n * n) as f64 / secs / 1e9
}

fn main() {
    let threads = rayon::current_num_threads();
    let mm = matmul_gflops();
    println!("cpu attention, f32, {threads} rayon threads; gemm 1024^3 matmul in this run: {mm:.0} GFLOP/s");
    println!("FLOPs count the full T x S rectangle (masked and causal-skipped blocks included): fwd = 4*B*H*T*S*D, fwd+bwd = 3.5 x fwd (bwd = 2.5 x fwd, as FlashAttention counts). Peak f32 on 2 threads (AVX-512, 2 FMA units): ~300 GFLOP/s. The last column counts only visible (query, key) pairs (causal triangle, unpadded keys).\n");
    println!("| shape | B | H | T | D | mask | fwd ms | fwd GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s | vs matmul | fwd+bwd useful GFLOP/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let shapes = [
        ("GPT-2 small", 1, 12, 256, 64, true, false),
        ("GPT-2 small", 1, 12, 512, 64, true, false),
        ("GPT-2 small", 1, 12, 1024, 64, true, false),
        ("GPT-2 small", 2, 12, 1024, 64, true, false),
        ("MiniLM", 8, 12, 128, 32, false, true),
        ("MiniLM", 16, 12, 128, 32, false, true),
    ];
    for (name, b, h, t, d, causal, padded) in shapes {
        let c = Case::new(b, h, t, d, causal, padded);
        let (mut o, mut lse, mut g) = c.buffers();
        let reps = if t >= 1024 { 3 } else { 7 };
        let tf = time(reps, || c.fwd(&mut o, &mut lse));
        let tfb = time(reps, || {
            c.fwd(&mut o, &mut lse);
            c.bwd(&o, &lse, &mut g);
        });
        let fl = c.p.fwd_flops();
        let (gf, gfb) = (fl / tf / 1e9, 3.5 * fl / tfb / 1e9);
        let mask = if causal {
            "causal"
        } else if padded {
            "bidir + pad"
        } else {
            "bidir"
        };
        let useful = 3.5 * c.useful_fwd_flops() / tfb / 1e9;
        println!(
            "| {name} | {b} | {h} | {t} | {d} | {mask} | {:.2} | {gf:.0} | {:.2} | {gfb:.0} | {:.2} | {useful:.0} |",
            tf * 1e3,
            tfb * 1e3,
            gfb / mm
        );
    }
    println!("\nPeak extra heap bytes per call (B=1, H=12, D=64, causal; inputs/outputs excluded):\n");
    println!("| T | fwd bytes | bwd bytes | a T x T f32 score matrix would be |");
    println!("|---|---|---|---|");
    for t in [512, 1024, 2048] {
        let c = Case::new(1, 12, t, 64, true, false);
        let (mut o, mut lse, mut g) = c.buffers();
        let fwd = peak_extra(|| c.fwd(&mut o, &mut lse));
        let bwd = peak_extra(|| c.bwd(&o, &lse, &mut g));
        println!("| {t} | {fwd} | {bwd} | {} |", 12 * t * t * 4);
    }
}
