//! CPU matmul throughput at GPT-2-small and MiniLM shapes, forward and backward, in GFLOP/s
//! beside the machine's f32 peak. Run: `cargo bench -p tuna-kernels --bench cpu_matmul`.
//!
//! Peak: 2 cores x 2 AVX-512 FMA units x 16 lanes x 2 FLOPs x clock; `TUNA_PEAK_GFLOPS`
//! overrides the default 300 (2 threads at ~2.3 GHz sustained AVX-512 clock).

use tuna_kernels::ops::matmul::{MatmulKernel, MatmulParams};
use tuna_kernels::testing::{best_time, Rng};
use tuna_kernels::Cpu;

fn main() {
    let peak: f64 = std::env::var("TUNA_PEAK_GFLOPS").ok().and_then(|s| s.parse().ok()).unwrap_or(300.0);
    println!(
        "CPU matmul, {} rayon threads, peak ~{peak} GFLOP/s f32 (best of repeated runs over 1 s)\n",
        rayon::current_num_threads()
    );
    println!("| shape | what | m x n x k | ms | GFLOP/s | % of peak |");
    println!("|---|---|---|---:|---:|---:|");
    // square products, both layouts of B, for scale
    let mut rng = Rng::new(1);
    for (name, tb) in [("square A B", false), ("square A B^T", true)] {
        let n = 1024;
        let p = MatmulParams { trans_b: tb, ..MatmulParams::new(n, n, n) };
        let (a, b) = (rng.vec(n * n, -1.0, 1.0), rng.vec(n * n, -1.0, 1.0));
        let mut c = vec![0.0; n * n];
        let secs = best_time(|| Cpu.matmul_fwd(&p, &a, &b, &mut c).unwrap());
        let g = p.flops() / secs / 1e9;
        println!("| {name} | fwd | {n} x {n} x {n} | {:.2} | {g:.1} | {:.0}% |", secs * 1e3, 100.0 * g / peak);
    }
    // (name, tokens, in, out): linear layers y[tokens, out] = x[tokens, in] W^T
    let shapes = [
        ("GPT-2 small qkv (8x128 tok)", 1024, 768, 2304),
        ("GPT-2 small mlp up (8x128 tok)", 1024, 768, 3072),
        ("GPT-2 small mlp down (8x128 tok)", 1024, 3072, 768),
        ("MiniLM qkv (16x128 tok)", 2048, 384, 1152),
        ("MiniLM mlp up (16x128 tok)", 2048, 384, 1536),
        // prompt tuning's step: 32 x (64 + 20 virtual) tokens, q/k/v/o separate
        ("MiniLM q|k|v|o (32x84 tok)", 2688, 384, 384),
        ("MiniLM mlp up (32x84 tok)", 2688, 384, 1536),
        ("MiniLM mlp down (32x84 tok)", 2688, 1536, 384),
    ];
    for (name, m, k, n) in shapes {
        let p = MatmulParams::linear(m, n, k);
        let (a, b, dc) = (rng.vec(m * k, -1.0, 1.0), rng.vec(n * k, -1.0, 1.0), rng.vec(m * n, -1.0, 1.0));
        let mut c = vec![0.0; m * n];
        let (mut da, mut db) = (vec![0.0; m * k], vec![0.0; n * k]);
        let fwd = best_time(|| Cpu.matmul_fwd(&p, &a, &b, &mut c).unwrap());
        let bwd =
            best_time(|| Cpu.matmul_bwd(&p, Some(&a[..]), Some(&b[..]), &dc, Some(&mut da), Some(&mut db)).unwrap());
        // a frozen weight (parameter-efficient methods): the input's gradient only
        let bwd_dx = best_time(|| Cpu.matmul_bwd(&p, None, Some(&b[..]), &dc, Some(&mut da), None).unwrap());
        for (what, secs, flops) in
            [("fwd", fwd, p.flops()), ("bwd dX+dW", bwd, 2.0 * p.flops()), ("bwd dX only", bwd_dx, p.flops())]
        {
            let g = flops / secs / 1e9;
            println!("| {name} | {what} | {m} x {n} x {k} | {:.2} | {g:.1} | {:.0}% |", secs * 1e3, 100.0 * g / peak);
        }
    }
}
