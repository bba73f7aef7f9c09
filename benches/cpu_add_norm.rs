//! The residual add and the norm that reads it, as two kernels (`add_fwd` then `layernorm_fwd` /
//! `rmsnorm_fwd`) and as one (`add_layernorm_fwd` / `add_rmsnorm_fwd`), f32 on the CPU, at the
//! row shapes of the models' training steps, with the floor beside them: the bytes each variant
//! must move over the memory bandwidth measured here (a parallel copy). The pair reads x and r,
//! writes h, then reads h and writes y (20 bytes an element); the fused pass reads x and r and
//! writes h and y (16). The outputs are preallocated (the kernels alone).
//!
//! Run: `cargo bench -p tuna-kernels --bench cpu_add_norm`. Each row's variants run in turns for
//! about 4 s, best time of each.

use rayon::prelude::*;
use std::time::Instant;
use tuna_kernels::ops::elementwise::ElementwiseKernel;
use tuna_kernels::ops::layernorm::{LayerNormKernel, LayerNormParams};
use tuna_kernels::ops::rmsnorm::{RmsNormKernel, RmsNormParams};
use tuna_kernels::testing::{best_time, cpu_model, Rng};
use tuna_kernels::Cpu;

/// The best time of each of `fs`, run in turns for about `secs` in all.
fn time_turns(secs: f64, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; fs.len()];
    fs.iter_mut().for_each(|f| f()); // warm up
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        for (f, b) in fs.iter_mut().zip(best.iter_mut()) {
            let t = Instant::now();
            f();
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    best
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("CPU: {}, {threads} rayon threads", cpu_model());
    let n = 25 * 1024 * 1024;
    let mut rng = Rng::new(1);
    let src = rng.vec(n, -1.0, 1.0);
    let mut dst = vec![0.0f32; n];
    let copy = best_time(|| {
        dst.par_chunks_mut(16 * 1024).zip(src.par_chunks(16 * 1024)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let bw = 8.0 * n as f64 / copy;
    println!("memory bandwidth (parallel copy of {} MB): {:.1} GB/s\n", (4 * n) >> 20, bw / 1e9);
    println!("| rows x dim (model) | norm | two kernels ms | fused ms | ratio | floor two / fused ms |");
    println!("|---|---|---:|---:|---:|---:|");
    let shapes = [
        (2048, 384, "MiniLM 32x64"),
        (512, 576, "SmolLM2 4x128"),
        (8192, 768, "GPT-2 small 8x1024"),
        (16384, 1024, "16k x 1024"),
    ];
    for (rows, dim, what) in shapes {
        let e = rows * dim;
        let (x, r) = (rng.vec(e, -1.0, 1.0), rng.vec(e, -1.0, 1.0));
        let (g, b) = (rng.vec(dim, 0.5, 1.5), rng.vec(dim, -0.5, 0.5));
        let (mut h, mut y, mut m, mut s) = (vec![0.0f32; e], vec![0.0f32; e], vec![0.0f32; rows], vec![0.0f32; rows]);
        let (mut h2, mut y2, mut m2, mut s2) = (h.clone(), y.clone(), m.clone(), s.clone());
        let floor = |bytes: f64| bytes * e as f64 / bw * 1e3;
        let lp = LayerNormParams::new(rows, dim, 1e-5);
        let t = time_turns(
            4.0,
            &mut [
                &mut || {
                    Cpu.add_fwd(&x, &r, &mut h).unwrap();
                    Cpu.layernorm_fwd(&lp, &h, &g, &b, &mut y, &mut m, &mut s).unwrap();
                },
                &mut || Cpu.add_layernorm_fwd(&lp, &x, &r, &g, &b, &mut h2, &mut y2, &mut m2, &mut s2).unwrap(),
            ],
        );
        let row = |norm: &str, t: &[f64]| {
            println!(
                "| {rows} x {dim} ({what}) | {norm} | {:.3} | {:.3} | {:.2}x | {:.3} / {:.3} |",
                t[0] * 1e3,
                t[1] * 1e3,
                t[0] / t[1],
                floor(20.0),
                floor(16.0)
            )
        };
        row("layernorm", &t);
        let rp = RmsNormParams::new(rows, dim, 1e-6);
        let t = time_turns(
            4.0,
            &mut [
                &mut || {
                    Cpu.add_fwd(&x, &r, &mut h).unwrap();
                    Cpu.rmsnorm_fwd(&rp, &h, &g, &mut y, &mut s).unwrap();
                },
                &mut || Cpu.add_rmsnorm_fwd(&rp, &x, &r, &g, &mut h2, &mut y2, &mut s2).unwrap(),
            ],
        );
        row("rmsnorm", &t);
    }
}
