//! CPU elementwise costs at MiniLM prompt-tuning sizes, before and after in one run:
//!
//! - GELU forward and backward over 25M f32 (32 x 64 tokens x 1536 x 8 layers' worth): the code
//!   f32 ran before (`generic`: the f64 code instantiated for f32), the portable `scalar` path and
//!   the AVX2 `simd` path (what the kernel runs on a CPU with AVX2+FMA), in G elements/s;
//! - `linear` with a bias, forward and backward at m=2048, k=384, n=1536 and n=384, as the
//!   autograd op runs it (fresh zeroed outputs and gradient buffers, as `zeros` gives): before
//!   (product, then `add_bias` into a new buffer; backward `dx += dy` then the product's
//!   backward), the bias added in place after the product, and fused (rows set to the bias, the
//!   product accumulating onto them; backward: the bias's column sums only);
//! - the floor: the bytes an op must move over the memory bandwidth, measured here as a parallel
//!   copy of 100 MB (read + write counted; writes also cost a read for ownership, so the floor is
//!   a little optimistic).
//!
//! Run: `cargo bench -p tuna-kernels --bench cpu_elementwise` (RAYON_NUM_THREADS to pin threads).
//! Timings are the best of repeated runs; the variants compared in a row run in turns (about 6 s
//! for each group), so that a machine busy with something else slows them alike.

use rayon::prelude::*;
use std::time::Instant;
use tuna_kernels::ops::elementwise::{BiasParams, ElementwiseKernel};
use tuna_kernels::ops::gelu::bench::{bwd as gelu_bwd, fwd as gelu_fwd, Path};
use tuna_kernels::ops::gelu::{cpu_f32_simd, GeluKind};
use tuna_kernels::ops::matmul::{MatmulKernel, MatmulParams};
use tuna_kernels::testing::{best_time, cpu_model, Rng};
use tuna_kernels::Cpu;

/// The best time of each of `fs`, run in turns for about `secs` in all: variants compared on a
/// busy machine see the same conditions.
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

const CHUNK: usize = 16 * 1024;

fn main() {
    // TUNA_BENCH_ONLY=gelu or =linear runs one half
    let only = std::env::var("TUNA_BENCH_ONLY").unwrap_or_default();
    let threads = rayon::current_num_threads();
    println!(
        "CPU: {}, {threads} rayon threads, f32 GELU vector path: {}",
        cpu_model(),
        cpu_f32_simd().unwrap_or("none (scalar)")
    );

    // memory bandwidth: a parallel copy of 25M f32
    let n = 25 * 1024 * 1024;
    let mut rng = Rng::new(1);
    let x = rng.vec(n, -6.0, 6.0);
    let dy = rng.vec(n, -1.0, 1.0);
    let mut y = vec![0.0f32; n];
    let copy = best_time(|| {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let bw = 2.0 * 4.0 * n as f64 / copy; // bytes/s, read + write
    println!("memory bandwidth (parallel copy of {} MB): {:.1} GB/s\n", (4 * n) >> 20, bw / 1e9);

    println!("GELU, {n} f32 elements (floor = bytes / bandwidth: forward reads x, writes y: 8 B/element; backward reads x, dy, dx, writes dx: 16 B/element)\n");
    println!("| kind | path | fwd ms | fwd G elem/s | bwd ms | bwd G elem/s | fwd floor ms | bwd floor ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let (floor_f, floor_b) = (8.0 * n as f64 / bw, 16.0 * n as f64 / bw);
    // each path its own output, so that the three run in turns
    let (mut y2, mut y3) = (y.clone(), y.clone());
    let (mut d1, mut d2, mut d3) = (y.clone(), y.clone(), y.clone());
    let kinds = if only == "linear" { vec![] } else { vec![GeluKind::Tanh, GeluKind::Erf, GeluKind::Relu] };
    for kind in kinds {
        let f = time_turns(
            6.0,
            &mut [
                &mut || gelu_fwd(Path::Generic, kind, &x, &mut y),
                &mut || gelu_fwd(Path::Scalar, kind, &x, &mut y2),
                &mut || gelu_fwd(Path::Simd, kind, &x, &mut y3),
            ],
        );
        let b = time_turns(
            6.0,
            &mut [
                &mut || gelu_bwd(Path::Generic, kind, &x, &dy, &mut d1),
                &mut || gelu_bwd(Path::Scalar, kind, &x, &dy, &mut d2),
                &mut || gelu_bwd(Path::Simd, kind, &x, &dy, &mut d3),
            ],
        );
        let g = |s: f64| n as f64 / s / 1e9;
        for (i, name) in ["generic (before)", "scalar", "simd"].iter().enumerate() {
            println!(
                "| {kind:?} | {name} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} |",
                f[i] * 1e3,
                g(f[i]),
                b[i] * 1e3,
                g(b[i]),
                floor_f * 1e3,
                floor_b * 1e3
            );
        }
    }

    println!(
        "\nlinear with bias, f32 (x [m, k], W [n, k], bias [n]; forward and backward as the autograd op runs them)\n"
    );
    println!("| m x k -> n | variant | fwd ms | bwd ms (dX + dW + dbias) | fwd + bwd ms | bias passes' floor ms |");
    println!("|---|---|---:|---:|---:|---:|");
    let shapes = if only == "gelu" { vec![] } else { vec![(2048, 384, 1536), (2048, 384, 384)] };
    for (m, k, nn) in shapes {
        let p = MatmulParams::linear(m, nn, k);
        let bp = BiasParams::new(m, nn);
        let (xa, w, bias, g) =
            (rng.vec(m * k, -1.0, 1.0), rng.vec(nn * k, -1.0, 1.0), rng.vec(nn, -1.0, 1.0), rng.vec(m * nn, -1.0, 1.0));
        let acc = MatmulParams { accumulate: true, ..p };
        let mut keep = 0.0f32; // keeps the outputs alive
        let mut before_f = || {
            let mut c = vec![0.0f32; m * nn];
            Cpu.matmul_fwd(&p, &xa, &w, &mut c).unwrap();
            let mut y = vec![0.0f32; m * nn];
            Cpu.add_bias_fwd(&bp, &c, &bias, &mut y).unwrap();
            keep += y[0];
        };
        let mut inplace_f = || {
            let mut c = vec![0.0f32; m * nn];
            Cpu.matmul_fwd(&p, &xa, &w, &mut c).unwrap();
            Cpu.add_bias_inplace(&bp, &bias, &mut c).unwrap();
            std::hint::black_box(&c);
        };
        let mut fused_f = || {
            let mut c = vec![0.0f32; m * nn];
            c.par_chunks_mut(nn).for_each(|row| row.copy_from_slice(&bias));
            Cpu.matmul_fwd(&acc, &xa, &w, &mut c).unwrap();
            std::hint::black_box(&c);
        };
        let mut alone_f = || {
            let mut c = vec![0.0f32; m * nn];
            Cpu.matmul_fwd(&p, &xa, &w, &mut c).unwrap();
            std::hint::black_box(&c);
        };
        let f = time_turns(8.0, &mut [&mut before_f, &mut inplace_f, &mut fused_f, &mut alone_f]);
        let (before_f, inplace_f, fused_f, alone_f) = (f[0], f[1], f[2], f[3]);
        let (mut dx, mut dw, mut db) = (vec![0.0f32; m * k], vec![0.0f32; nn * k], vec![0.0f32; nn]);
        let (mut dx2, mut dw2, mut db2) = (dx.clone(), dw.clone(), db.clone());
        let (mut dx3, mut dw3) = (dx.clone(), dw.clone());
        let mut before_b = || {
            // add_bias's backward: the product's gradient buffer (zeroed at first use), += dy
            let mut dc = vec![0.0f32; m * nn];
            Cpu.add_bias_bwd(&bp, &g, &mut dc, &mut db).unwrap();
            Cpu.matmul_bwd(&p, Some(&xa), Some(&w), &dc, Some(&mut dx), Some(&mut dw)).unwrap();
        };
        let mut fused_b = || {
            Cpu.bias_grad(&bp, &g, &mut db2).unwrap();
            Cpu.matmul_bwd(&p, Some(&xa), Some(&w), &g, Some(&mut dx2), Some(&mut dw2)).unwrap();
        };
        let mut alone_b = || {
            Cpu.matmul_bwd(&p, Some(&xa), Some(&w), &g, Some(&mut dx3), Some(&mut dw3)).unwrap();
        };
        let b = time_turns(8.0, &mut [&mut before_b, &mut fused_b, &mut alone_b]);
        let (before_b, fused_b, alone_b) = (b[0], b[1], b[2]);
        // bytes the bias costs beyond the product: before, fwd read c + write y, bwd read dy +
        // read/write dc + read dy (sums); fused, fwd write c, bwd read dy (sums)
        let mb = (m * nn * 4) as f64;
        let (floor_before, floor_fused) = ((2.0 * mb + 4.0 * mb) / bw, (mb + mb) / bw);
        for (name, f, b, floor) in [
            ("before: product, then add_bias", before_f, before_b, floor_before),
            ("product, then add_bias_inplace (the library's)", inplace_f, fused_b, f64::NAN),
            ("fused: bias rows, product accumulates", fused_f, fused_b, floor_fused),
            ("(the product alone, no bias)", alone_f, alone_b, f64::NAN),
        ] {
            let fl = if floor.is_nan() { "".to_string() } else { format!("{:.2}", floor * 1e3) };
            println!("| {m} x {k} -> {nn} | {name} | {:.2} | {:.2} | {:.2} | {fl} |", f * 1e3, b * 1e3, (f + b) * 1e3);
        }
        std::hint::black_box(keep);
    }
}
