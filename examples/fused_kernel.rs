//! One fused kernel called through `tuna_kernels` directly: LayerNorm forward (y and the saved
//! row statistics) and backward (dx, dgamma, dbeta in one pass), on the CPU and, when a CUDA
//! device is present, on CUDA, the two compared. Without a GPU it says, by name, that it skipped
//! the CUDA half (`TUNA_REQUIRE_CUDA=1` makes that a failure, as for the CUDA tests).
//!
//! Run: `cargo run --example fused_kernel`

use tuna_kernels::ops::layernorm::{LayerNormKernel, LayerNormParams};
use tuna_kernels::testing::{cuda_or_skip, Rng, Tol};
use tuna_kernels::{Alloc, Cpu};

/// `[y, dx, dgamma, dbeta]` of LayerNorm on `dev`, for the upstream gradient `dy`.
fn layernorm<B: LayerNormKernel<f32> + Alloc<f32>>(
    dev: &B,
    p: &LayerNormParams,
    [x, gamma, beta, dy]: [&[f32]; 4],
) -> tuna_kernels::Result<[Vec<f32>; 4]> {
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let (x, gamma, beta, dy) = (dev.from_host(x)?, dev.from_host(gamma)?, dev.from_host(beta)?, dev.from_host(dy)?);
    let (mut y, mut mean, mut rstd) = (dev.zeros(rows * dim)?, dev.zeros(rows)?, dev.zeros(rows)?);
    let (g, b) = (B::buf(&gamma), B::buf(&beta));
    dev.layernorm_fwd(p, B::buf(&x), g, b, B::buf_mut(&mut y), B::buf_mut(&mut mean), B::buf_mut(&mut rstd))?;
    // The backward accumulates (+=) into zeroed gradients.
    let (mut dx, mut dgamma, mut dbeta) = (dev.zeros(rows * dim)?, dev.zeros(dim)?, dev.zeros(dim)?);
    let (m, r, dyb) = (B::buf(&mean), B::buf(&rstd), B::buf(&dy));
    let (dg, db) = (Some(B::buf_mut(&mut dgamma)), Some(B::buf_mut(&mut dbeta)));
    dev.layernorm_bwd(p, B::buf(&x), g, m, r, dyb, B::buf_mut(&mut dx), dg, db)?;
    Ok([dev.to_host(&y)?, dev.to_host(&dx)?, dev.to_host(&dgamma)?, dev.to_host(&dbeta)?])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (rows, dim) = (64, 768); // GPT-2 small's width
    let p = LayerNormParams::new(rows, dim, 1e-5);
    let mut rng = Rng::new(7);
    let (x, dy) = (rng.normal_vec(rows * dim, 2.0), rng.vec(rows * dim, -1.0, 1.0));
    let (gamma, beta) = (rng.vec(dim, 0.5, 1.5), rng.vec(dim, -0.5, 0.5));
    let inputs = [&x[..], &gamma[..], &beta[..], &dy[..]];

    let cpu = layernorm(&Cpu, &p, inputs)?;
    let [y, dx, _, dbeta] = &cpu;
    // Checks that need no reference: each row of dx sums to 0, and dbeta is dy's column sums.
    let worst_row_sum = dx.chunks(dim).map(|r| r.iter().sum::<f32>().abs()).fold(0.0, f32::max);
    assert!(worst_row_sum < 1e-3, "dx rows sum to {worst_row_sum}");
    let col_sums: Vec<f32> = (0..dim).map(|j| (0..rows).map(|i| dy[i * dim + j]).sum()).collect();
    Tol::F32.assert_close("dbeta", dbeta, &col_sums);
    println!("cpu:  layernorm [{rows} x {dim}] y[0..3] = {:?}, max |row sum of dx| = {worst_row_sum:.1e}", &y[..3]);

    // Without a device this prints `SKIPPED fused_kernel example, CUDA half: ...` (and appends it
    // to $TUNA_SKIP_LOG, which the test command lists at the end).
    if let Some(cuda) = cuda_or_skip("fused_kernel example, CUDA half (layernorm on CUDA vs CPU)") {
        let gpu = layernorm(&*cuda, &p, inputs)?;
        for (name, (g, c)) in ["y", "dx", "dgamma", "dbeta"].iter().zip(gpu.iter().zip(&cpu)) {
            Tol::CUDA_F32.assert_close(name, g, c);
        }
        println!("cuda: layernorm on {} (sm_{}) matches the CPU ({})", cuda.name(), cuda.arch(), Tol::CUDA_F32.name);
    }
    Ok(())
}
