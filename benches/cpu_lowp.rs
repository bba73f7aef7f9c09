//! The low-precision bases' dot-product paths against the f32 GEMM, in one run: `y = x W^T`
//! (forward) and `dx = dy W` (a frozen weight's input gradient) at 1024^3 and at the linear layers
//! of MiniLM's prompt-tuning step and SmolLM2-135M, in GOP/s (2 per multiply-add) and as a ratio to
//! the f32 GEMM on the same shape. Each low-precision time includes what the path does per call:
//! quantizing (int8) or rounding (bf16) the activations, and laying the stored weight out for the
//! instructions. Run: `cargo bench -p tuna-kernels --bench cpu_lowp`.
//!
//! Peaks, for the "% of peak" columns (printed; set them for the machine at hand):
//! `TUNA_PEAK_GFLOPS` (f32, default 300), `TUNA_PEAK_INT8_GOPS` and `TUNA_PEAK_BF16_GFLOPS`, whose
//! defaults scale the f32 peak by the path's multiply-adds per instruction against a 512-bit FMA's
//! 16, at the same issue rate (which not every core sustains): int8 `vpdpbusd` 4x on 512-bit
//! registers, 2x on 256-bit (AVX-VNNI), AMX `tdpbsud` 32x; bf16 `vdpbf16ps` 2x, AMX 16x.

use tuna_kernels::ops::lowp::{bf16_path, dot, dot_bf16, matrix_path, BasePrecision, Bf16Isa, DotIsa, PackedWeight};
use tuna_kernels::ops::matmul::{MatmulKernel, MatmulParams};
use tuna_kernels::testing::{best_time, cpu_model, Rng};
use tuna_kernels::Cpu;

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn main() {
    let peak = env_f64("TUNA_PEAK_GFLOPS").unwrap_or(300.0);
    let int8 = matrix_path().dot_isa();
    let bf = bf16_path();
    let i8_scale = match int8 {
        Some(DotIsa::Amx) => 32.0,
        Some(DotIsa::AvxVnni) => 2.0,
        _ => 4.0,
    };
    let peak_i8 = env_f64("TUNA_PEAK_INT8_GOPS").unwrap_or(i8_scale * peak);
    let peak_bf = env_f64("TUNA_PEAK_BF16_GFLOPS").unwrap_or(if bf == Some(Bf16Isa::Amx) { 16.0 } else { 2.0 } * peak);
    println!("CPU: {}, {} rayon threads", cpu_model(), rayon::current_num_threads());
    println!(
        "int8 path: {}; bf16 path: {}; peaks for the % columns: f32 {peak} GFLOP/s, int8 {peak_i8} GOP/s, bf16 \
         {peak_bf} GFLOP/s (TUNA_PEAK_*; nominal); best of repeated runs over 1 s\n",
        int8.map_or("none (widened to f32; nothing to measure here)", |i| i.name()),
        bf.map_or("none (widened to f32; nothing to measure here)", |i| i.name()),
    );
    println!("| shape | m x n x k | what | f32 GEMM GFLOP/s | int8 GOP/s | int8 / f32 | bf16 GFLOP/s | bf16 / f32 |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    // (name, tokens, in, out): y[tokens, out] = x[tokens, in] W^T
    let shapes = [
        ("square", 1024, 1024, 1024),
        ("MiniLM q/k/v/o (32x84 tok)", 2688, 384, 384),
        ("MiniLM mlp up (32x84 tok)", 2688, 384, 1536),
        ("MiniLM mlp down (32x84 tok)", 2688, 1536, 384),
        ("SmolLM2 q/o (4x148 tok)", 592, 576, 576),
        ("SmolLM2 mlp gate/up (4x148 tok)", 592, 576, 1536),
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
