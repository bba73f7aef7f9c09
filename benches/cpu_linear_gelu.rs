//! The fused linear + bias + GELU-tanh forward (`matmul_epilogue_fwd`) against the unfused ops
//! (`matmul_fwd`, `add_bias_inplace`, `gelu_fwd`) at GPT-2 small's MLP up-projection (8 x 128
//! tokens, 768 -> 3072, the Conv1D `[in, out]` weight), f32 on the CPU; best of 5 after a warm-up.
//! Run: `cargo bench -p tuna-kernels --bench cpu_linear_gelu`.

use tuna_kernels::ops::elementwise::{BiasParams, ElementwiseKernel};
use tuna_kernels::ops::gelu::{GeluKernel, GeluKind};
use tuna_kernels::ops::matmul::{Activation, MatmulKernel, MatmulParams};
use tuna_kernels::testing::{cpu_model, Rng};
use tuna_kernels::Cpu;

/// Best of 5 timed runs after one warm-up, in ms.
fn best_of_5(mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let (m, k, n) = (8 * 128, 768, 3072);
    println!(
        "CPU: {} ({} rayon threads); y[{m}, {n}] = gelu_tanh(x[{m}, {k}] W + b), f32, best of 5\n",
        cpu_model(),
        rayon::current_num_threads()
    );
    println!("| what | ms |");
    println!("|---|---:|");
    let mut rng = Rng::new(1);
    let p = MatmulParams::new(m, n, k); // W stored [in, out] (GPT-2's Conv1D)
    let (x, w, b) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -0.05, 0.05), rng.vec(n, -0.1, 0.1));
    let (mut pre, mut y) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
    let bp = BiasParams::new(m, n);
    let gemm = best_of_5(|| Cpu.matmul_fwd(&p, &x, &w, &mut pre).unwrap());
    println!("| GEMM alone | {gemm:.2} |");
    let unfused = best_of_5(|| {
        Cpu.matmul_fwd(&p, &x, &w, &mut pre).unwrap();
        Cpu.add_bias_inplace(&bp, &b, &mut pre).unwrap();
        Cpu.gelu_fwd(GeluKind::Tanh, &pre, &mut y).unwrap();
    });
    println!("| unfused: GEMM, add_bias_inplace, gelu_fwd (pre-activation kept, as training) | {unfused:.2} |");
    let fused_aux = best_of_5(|| {
        Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &x, &w, Some(&b), &mut y, Some(&mut pre)).unwrap()
    });
    println!("| fused, with aux (training) | {fused_aux:.2} |");
    let fused =
        best_of_5(|| Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &x, &w, Some(&b), &mut y, None).unwrap());
    println!("| fused, no aux (inference) | {fused:.2} |");
}
