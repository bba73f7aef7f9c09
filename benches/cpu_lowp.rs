//! The low-precision bases' dot-product paths against the f32 GEMM, in one run: `y = x W^T`
//! (forward) and `dx = dy W` (a frozen weight's input gradient) at 1024^3 and at the linear layers
//! of MiniLM's prompt-tuning step and SmolLM2-135M, in GOP/s (2 per multiply-add) and as a ratio to
//! the f32 GEMM on the same shape. Each low-precision time includes what the path does per call:
//! quantizing (int8) or rounding (bf16) the activations, and laying the stored weight out for the
//! instructions. Run: `cargo bench -p tuna-kernels --bench cpu_lowp`.
//!
//! Floors (printed): `TUNA_PEAK_GFLOPS` (f32, default 300), `TUNA_PEAK_INT8_GOPS` (default 4x the
//! f32 peak: `vpdpbusd` does 64 multiply-adds per 512-bit instruction where an f32 FMA does 16) and
//! `TUNA_PEAK_BF16_GFLOPS` (default 2x: `vdpbf16ps` does 32). Set them for the machine at hand.

use tuna_kernels::ops::lowp::{bf16_path, dot, dot_bf16, matrix_path, BasePrecision, PackedWeight};
use tuna_kernels::ops::matmul::{MatmulKernel, MatmulParams};
use tuna_kernels::testing::{best_time, cpu_model, Rng};
use tuna_kernels::Cpu;

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn main() {
    let peak = env_f64("TUNA_PEAK_GFLOPS").unwrap_or(300.0);
    let peak_i8 = env_f64("TUNA_PEAK_INT8_GOPS").unwrap_or(4.0 * peak);
    let peak_bf = env_f64("TUNA_PEAK_BF16_GFLOPS").unwrap_or(2.0 * peak);
    let int8 = matrix_path().dot_isa();
    let bf = bf16_path();
    println!("CPU: {}, {} rayon threads", cpu_model(), rayon::current_num_threads());
    println!(
        "int8 path: {}; bf16 path: {}; peaks (floors): f32 {peak} GFLOP/s, int8 {peak_i8} GOP/s, bf16 {peak_bf} \
         GFLOP/s (TUNA_PEAK_*); best of repeated runs over 1 s\n",
        int8.map_or("none (widened to f32; nothing to measure here)", |i| i.name()),
        bf.map_or("none (widened to f32; nothing to measure here)", |i| i.name()),
    );
    println!("| shape | m x n x k | what | f32 GEMM GFLOP/s | int8 GOP/s | int8 / f32 | bf16 GFLOP/s | bf16 / f32 |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    // (name, tokens, in, out): y[tokens, out] = x[tokens, in] W^T
    let shapes = [
        ("square", 1024, 1024, 1024),
        ("MiniLM q|k|v|o (32x84 tok)", 2688, 384, 384),
        ("MiniLM mlp up (32x84 tok)", 2688, 384, 1536),
        ("MiniLM mlp down (32x84 tok)", 2688, 1536, 384),
        ("SmolLM2 q|o (4x148 tok)", 592, 576, 576),
        ("SmolLM2 mlp gate|up (4x148 tok)", 592, 576, 1536),
        ("SmolLM2 mlp down (4x148 tok)", 592, 1536, 576),
    ];
    let mut rng = Rng::new(7);
    for (name, m, k, n) in shapes {
        let p = MatmulParams::linear(m, n, k);
        let (x, w, dy) = (rng.vec(m * k, -1.0, 1.0), rng.vec(n * k, -0.1, 0.1), rng.vec(m * n, -1.0, 1.0));
        let (mut y, mut dx) = (vec![0.0; m * n], vec![0.0; m * k]);
        let f32_fwd = best_time(|| Cpu.matmul_fwd(&p, &x, &w, &mut y).unwrap());
        let f32_bwd = best_time(|| Cpu.matmul_bwd(&p, None, Some(&w[..]), &dy, Some(&mut dx), None).unwrap());
        let (mut i8_fwd, mut i8_bwd, mut bf_fwd, mut bf_bwd) = (None, None, None, None);
        if let Some(isa) = int8 {
            let pw = PackedWeight::pack("w", &w, n, k, false, BasePrecision::Int8).unwrap();
            i8_fwd = Some(best_time(|| dot::linear_fwd(isa, &pw, m, &x, &mut y)));
            i8_bwd = Some(best_time(|| dot::linear_bwd(isa, &pw, m, &dy, &mut dx)));
        }
        if let Some(isa) = bf {
            let pw = PackedWeight::pack("w", &w, n, k, false, BasePrecision::Bf16).unwrap();
            bf_fwd = Some(best_time(|| dot_bf16::linear_fwd(isa, &pw, m, &x, &mut y)));
            bf_bwd = Some(best_time(|| dot_bf16::linear_bwd(isa, &pw, m, &dy, &mut dx)));
        }
        let ops = p.flops();
        let cell = |t: Option<f64>, f32t: f64, pk: f64| match t {
            Some(t) => format!("{:.1} ({:.0}% of peak) | {:.2}x", ops / t / 1e9, 100.0 * ops / t / 1e9 / pk, f32t / t),
            None => "— | —".to_string(),
        };
        for (what, f32t, i8t, bft) in [("fwd", f32_fwd, i8_fwd, bf_fwd), ("bwd dX", f32_bwd, i8_bwd, bf_bwd)] {
            println!(
                "| {name} | {m} x {n} x {k} | {what} | {:.1} ({:.0}%) | {} | {} |",
                ops / f32t / 1e9,
                100.0 * ops / f32t / 1e9 / peak,
                cell(i8t, f32t, peak_i8),
                cell(bft, f32t, peak_bf)
            );
        }
    }
}
