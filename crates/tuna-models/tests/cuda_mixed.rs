//! Mixed-adapter batches on CUDA (f32; the emulated device under `TUNA_CUDA_EMULATE=1`): on the
//! tiny fixtures every row of the mixed batch equals that row alone on the same device (outputs,
//! greedy tokens, BERT class scores). Skips by name without a CUDA device.

mod golden_common;
mod mixed_common;

use golden_common::fixture;
use tuna_kernels::testing::{cuda_or_skip, Tol};
use tuna_kernels::Cuda;

/// f32 on both sides, summation order differing (more masked keys, other row counts).
const SAME_F32: Tol = Tol::new("cuda mixed batch vs each row alone (f32)", 1e-4, 1e-3);

#[test]
fn cuda_mixed_batch_equals_each_row_alone() {
    let Some(dev) = cuda_or_skip("cuda_mixed::cuda_mixed_batch_equals_each_row_alone") else { return };
    for arch in ["gpt2", "llama", "bert"] {
        mixed_common::check_mixed::<Cuda, f32>(&dev, &fixture(arch), arch, SAME_F32, 2, "cuda");
    }
}

/// f32 gradients summed in another order (atomics, more rows per matmul).
const GRAD_F32: Tol = Tol::new("cuda mixed-batch gradients vs rows alone (f32)", 2e-4, 5e-3);

/// Training a mixed batch on CUDA: each adapter's gradient is its rows' own gradients, weighted
/// (the embedding op's scatter-add and the attention backward's per-sequence prefix ranges).
#[test]
fn cuda_mixed_batch_gradients_are_the_rows_gradients() {
    let Some(dev) = cuda_or_skip("cuda_mixed::cuda_mixed_batch_gradients_are_the_rows_gradients") else { return };
    for arch in ["gpt2", "llama", "bert"] {
        mixed_common::check_gradients::<Cuda, f32>(&dev, &fixture(arch), arch, GRAD_F32, "cuda");
    }
}
