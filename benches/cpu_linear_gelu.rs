//! The fused linear + bias + GELU-tanh forward (`matmul_epilogue_fwd`) against the unfused ops
//! (`matmul_fwd`, `add_bias_inplace`, `gelu_fwd`) at GPT-2 small's MLP up-projection (8 x 128
//! tokens, 768 -> 3072, the Conv1D `[in, out]` weight), f32 on the CPU; best of 5 after a warm-up.
//! Run: `cargo bench -p tuna-kernels --bench cpu_linear_gelu`.

use tuna_kernels::ops::elementwise::{BiasParams, ElementwiseKernel};
use tuna_kernels::ops::gelu::{GeluKernel, GeluKind};
use tuna_kernels::ops::matmul::bench::cpu_epilogue_f32;
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
    // The epilogue alone, on the product computed once (each run first restores it: the same copy
    // on both sides).
    Cpu.matmul_fwd(&p, &x, &w, &mut pre).unwrap();
    let prod = pre.clone();
    let mut aux = vec![0.0f32; m * n];
    let passes = best_of_5(|| {
        pre.copy_from_slice(&prod);
        Cpu.add_bias_inplace(&bp, &b, &mut pre).unwrap();
        Cpu.gelu_fwd(GeluKind::Tanh, &pre, &mut y).unwrap();
    });
    println!("| epilogue only: add_bias_inplace + gelu_fwd passes | {passes:.2} |");
    let one = best_of_5(|| {
        y.copy_from_slice(&prod);
        cpu_epilogue_f32(n, Activation::GeluTanh, Some(&b), &mut y, Some(&mut aux));
    });
    println!("| epilogue only: fused pass, with aux | {one:.2} |");
    let one_noaux = best_of_5(|| {
        y.copy_from_slice(&prod);
        cpu_epilogue_f32(n, Activation::GeluTanh, Some(&b), &mut y, None);
    });
    println!("| epilogue only: fused pass, no aux | {one_noaux:.2} |");
}
