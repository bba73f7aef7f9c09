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
//! Timings are the best of repeated runs over about 1 s each.

use rayon::prelude::*;
use std::time::Instant;
use tuna_kernels::ops::elementwise::{BiasParams, ElementwiseKernel};
use tuna_kernels::ops::gelu::bench::{bwd as gelu_bwd, fwd as gelu_fwd, Path};
use tuna_kernels::ops::gelu::{cpu_f32_simd, GeluKind};
use tuna_kernels::ops::matmul::{MatmulKernel, MatmulParams};
use tuna_kernels::testing::Rng;
use tuna_kernels::Cpu;

fn time<F: FnMut()>(mut f: F) -> f64 {
    f(); // warm up
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 1.0 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

const CHUNK: usize = 16 * 1024;

fn main() {
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
    let copy = time(|| {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let bw = 2.0 * 4.0 * n as f64 / copy; // bytes/s, read + write
    println!("memory bandwidth (parallel copy of {} MB): {:.1} GB/s\n", (4 * n) >> 20, bw / 1e9);

    println!("GELU, {n} f32 elements (floor = bytes / bandwidth: forward reads x, writes y: 8 B/element; backward reads x, dy, dx, writes dx: 16 B/element)\n");
    println!("| kind | path | fwd ms | fwd G elem/s | bwd ms | bwd G elem/s | fwd floor ms | bwd floor ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let (floor_f, floor_b) = (8.0 * n as f64 / bw, 16.0 * n as f64 / bw);
    for kind in [GeluKind::Tanh, GeluKind::Erf, GeluKind::Relu] {
        for (name, path) in [("generic (before)", Path::Generic), ("scalar", Path::Scalar), ("simd", Path::Simd)] {
            let f = time(|| gelu_fwd(path, kind, &x, &mut y));
            let mut dx = vec![0.0f32; n];
            let b = time(|| gelu_bwd(path, kind, &x, &dy, &mut dx));
            let g = |s: f64| n as f64 / s / 1e9;
            println!(
                "| {kind:?} | {name} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} |",
                f * 1e3,
                g(f),
                b * 1e3,
                g(b),
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
    for (m, k, nn) in [(2048, 384, 1536), (2048, 384, 384)] {
        let p = MatmulParams::linear(m, nn, k);
        let bp = BiasParams::new(m, nn);
        let (xa, w, bias, g) =
            (rng.vec(m * k, -1.0, 1.0), rng.vec(nn * k, -1.0, 1.0), rng.vec(nn, -1.0, 1.0), rng.vec(m * nn, -1.0, 1.0));
        let acc = MatmulParams { accumulate: true, ..p };
        let mut keep = 0.0f32; // keeps the outputs alive
        let before_f = time(|| {
            let mut c = vec![0.0f32; m * nn];
            Cpu.matmul_fwd(&p, &xa, &w, &mut c).unwrap();
            let mut y = vec![0.0f32; m * nn];
            Cpu.add_bias_fwd(&bp, &c, &bias, &mut y).unwrap();
            keep += y[0];
        });
        let inplace_f = time(|| {
            let mut c = vec![0.0f32; m * nn];
            Cpu.matmul_fwd(&p, &xa, &w, &mut c).unwrap();
            c.par_chunks_mut(nn).for_each(|row| row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b));
            keep += c[0];
        });
        let fused_f = time(|| {
            let mut c = vec![0.0f32; m * nn];
            assert!(Cpu.bias_rows_fwd(&bp, &bias, &mut c).unwrap());
            Cpu.matmul_fwd(&acc, &xa, &w, &mut c).unwrap();
            keep += c[0];
        });
        let (mut dx, mut dw, mut db) = (vec![0.0f32; m * k], vec![0.0f32; nn * k], vec![0.0f32; nn]);
        let before_b = time(|| {
            // add_bias's backward: the product's gradient buffer (zeroed at first use), += dy
            let mut dc = vec![0.0f32; m * nn];
            Cpu.add_bias_bwd(&bp, &g, &mut dc, &mut db).unwrap();
            Cpu.matmul_bwd(&p, Some(&xa), Some(&w), &dc, Some(&mut dx), Some(&mut dw)).unwrap();
        });
        let fused_b = time(|| {
            Cpu.bias_grad(&bp, &g, &mut db).unwrap();
            Cpu.matmul_bwd(&p, Some(&xa), Some(&w), &g, Some(&mut dx), Some(&mut dw)).unwrap();
        });
        // bytes the bias costs beyond the product: before, fwd read c + write y, bwd read dy +
        // read/write dc + read dy (sums); fused, fwd write c, bwd read dy (sums)
        let mb = (m * nn * 4) as f64;
        let (floor_before, floor_fused) = ((2.0 * mb + 4.0 * mb) / bw, (mb + mb) / bw);
        for (name, f, b, floor) in [
            ("before: product, then add_bias", before_f, before_b, floor_before),
            ("product, then bias in place (bwd as fused)", inplace_f, fused_b, f64::NAN),
            ("fused: bias rows, product accumulates", fused_f, fused_b, floor_fused),
        ] {
            let fl = if floor.is_nan() { "".to_string() } else { format!("{:.2}", floor * 1e3) };
            println!("| {m} x {k} -> {nn} | {name} | {:.2} | {:.2} | {:.2} | {fl} |", f * 1e3, b * 1e3, (f + b) * 1e3);
        }
        std::hint::black_box(keep);
    }
}
