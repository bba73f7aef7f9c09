//! The tape on CUDA: the tiny transformer's loss and every gradient on the GPU (f32) against the
//! CPU (f32), for each trainable set. Skips by name without a GPU.

mod common;
// The bf16 tape: in this binary, so the GPU check's bundle carries it.
#[path = "bf16/cuda_mixed_precision.rs"]
mod cuda_mixed_precision;
// The fused residual add + norm on the device (its CPU tests are tests/add_norm.rs).
#[path = "bf16/cuda_add_norm.rs"]
mod cuda_add_norm;
use common::cpu;
use common::tiny::{Tiny, Train};
use tuna_autograd::optim::OptimKernels;
use tuna_kernels::testing::{cuda_or_skip, Tol};
use tuna_kernels::{Cpu, Cuda};

const IDS: [u32; 10] = [1, 4, 2, 9, 3, 7, 7, 0, 10, 5];

// Compile-time: CUDA implements every kernel the tape and the optimizer call, for f32.
fn _cuda_has_every_kernel<B: OptimKernels<f32>>() {}
const _: fn() = _cuda_has_every_kernel::<Cuda>;

#[test]
fn cuda_tape_matches_cpu() {
    let Some(dev) = cuda_or_skip("autograd::cuda_tape_matches_cpu") else { return };
    for train in [Train::All, Train::PromptOnly, Train::PrefixOnly] {
        let c = Tiny::<Cpu, f32>::new(&cpu(), 21, train);
        let g = Tiny::<Cuda, f32>::new(&dev, 21, train);
        let (lc, lg) = (c.loss(&IDS, 2).unwrap(), g.loss(&IDS, 2).unwrap());
        Tol::CUDA_F32.assert_close(&format!("{train:?} loss"), &lg.to_vec().unwrap(), &lc.to_vec().unwrap());
        lc.backward().unwrap();
        lg.backward().unwrap();
        for (a, b) in c.trainable().iter().zip(g.trainable()) {
            let what = format!("{train:?} grad {}", a.name().unwrap());
            Tol::CUDA_F32.assert_close(&what, &b.grad().unwrap().unwrap(), &a.grad().unwrap().unwrap());
        }
    }
}
