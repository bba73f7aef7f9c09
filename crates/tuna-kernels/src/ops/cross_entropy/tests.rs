//! Cross-entropy tests: CPU against an f64 reference, the reference gradient against finite
//! differences, ignore/all-ignored/invalid targets, shape errors, and CUDA against the CPU for both
//! block sizes.

use super::cuda::{block_for, SMALL_VOCAB};
use super::*;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, to_f64, Rng, Tol};
use crate::{Cpu, CpuFloat, Cuda};
use half::bf16;

/// Random logits (some rows shifted far from 0, to exercise the max subtraction) and targets with
/// about a quarter ignored.
fn case(seed: u64, rows: usize, vocab: usize) -> (Vec<f32>, Vec<i32>) {
    let mut rng = Rng::new(seed);
    let mut logits = rng.normal_vec(rows * vocab, 3.0);
    for (r, row) in logits.chunks_mut(vocab).enumerate() {
        let shift = [0.0, 80.0, -60.0][r % 3];
        row.iter_mut().for_each(|x| *x += shift);
    }
    let targets = (0..rows).map(|_| if rng.below(4) == 0 { IGNORE_INDEX } else { rng.below(vocab) as i32 }).collect();
    (logits, targets)
}

/// f64 reference: per-row loss and the gradient `scale * (softmax - onehot)`.
fn reference(logits: &[f64], targets: &[i32], vocab: usize, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut loss, mut grad) = (Vec::new(), Vec::new());
    for (x, &t) in logits.chunks(vocab).zip(targets) {
        if t == IGNORE_INDEX {
            loss.push(0.0);
            grad.extend(std::iter::repeat_n(0.0, vocab));
            continue;
        }
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = x.iter().map(|v| (v - m).exp()).sum();
        loss.push(s.ln() + m - x[t as usize]);
        grad.extend(
            x.iter().enumerate().map(|(j, v)| scale * ((v - m).exp() / s - if j == t as usize { 1.0 } else { 0.0 })),
        );
    }
    (loss, grad)
}

/// The CPU loss and fused gradient on F (f32, or f64 for gradient checks) against the f64
/// reference, at vocab 1000 (not a multiple of any block) with `tol`, and at GPT-2's 50257 with
/// `long_tol` (sums over 50k terms).
fn cpu_case<F: CpuFloat>(tol: Tol, long_tol: Tol) {
    for (seed, rows, vocab, tol) in [(1, 37, 1000, tol), (2, 5, 50257, long_tol)] {
        let (logits32, targets) = case(seed, rows, vocab);
        let logits: Vec<F> = logits32.iter().map(|&x| F::c(x as f64)).collect();
        // A power-of-two scale (the kernel takes it as an f32; see CeParams::grad_scale).
        let scale = 0.25f32;
        let p = CeParams::new(rows, vocab).with_grad_scale(scale);
        let (want_loss, want_grad) = reference(&to_f64(&logits32), &targets, vocab, scale as f64);
        let what = |t: &str| format!("ce {} {t} vocab {vocab}", F::NAME);
        let mut loss = vec![F::nan(); rows];
        Cpu.ce_fwd(&p, &logits, &targets, &mut loss).unwrap();
        tol.assert_close(&what("fwd loss"), &loss, &want_loss);
        let (mut grad, mut loss2) = (logits.clone(), vec![F::nan(); rows]);
        Cpu.ce_fwd_bwd(&p, &mut grad, &targets, &mut loss2).unwrap();
        tol.assert_close(&what("fwd_bwd loss"), &loss2, &want_loss);
        tol.assert_close(&what("fwd_bwd grad"), &grad, &want_grad);
    }
}

#[test]
fn cpu_matches_f64_reference() {
    cpu_case::<f32>(Tol::F32, Tol::F32_LONG);
    // The mean-over-valid-rows scale of training, as an f32.
    let (rows, vocab) = (37, 1000);
    let (logits, targets) = case(1, rows, vocab);
    let scale = 1.0 / count_valid(&targets, IGNORE_INDEX).max(1) as f32;
    let p = CeParams::new(rows, vocab).with_grad_scale(scale);
    let (_, want_grad) = reference(&to_f64(&logits), &targets, vocab, scale as f64);
    let (mut grad, mut loss) = (logits.clone(), vec![f32::NAN; rows]);
    Cpu.ce_fwd_bwd(&p, &mut grad, &targets, &mut loss).unwrap();
    Tol::F32.assert_close("ce fwd_bwd grad, mean scale", &grad, &want_grad);
}

#[test]
fn cpu_f64_matches_f64_reference() {
    cpu_case::<f64>(Tol::F64, Tol::F64);
}

#[test]
fn reference_gradient_matches_central_differences() {
    let (rows, vocab) = (4, 7);
    let (logits, mut targets) = case(3, rows, vocab);
    targets[0] = 2; // at least one valid row
    let x = to_f64(&logits);
    let n_valid = count_valid(&targets, IGNORE_INDEX) as f64;
    let mean_loss = |x: &[f64]| reference(x, &targets, vocab, 1.0).0.iter().sum::<f64>() / n_valid;
    let (_, grad) = reference(&x, &targets, vocab, 1.0 / n_valid);
    let h = 1e-6;
    let fd: Vec<f64> = (0..x.len())
        .map(|i| {
            let (mut up, mut dn) = (x.clone(), x.clone());
            up[i] += h;
            dn[i] -= h;
            (mean_loss(&up) - mean_loss(&dn)) / (2.0 * h)
        })
        .collect();
    Tol::GRAD_CHECK.assert_close("ce reference grad vs fd", &grad, &fd);
}

#[test]
fn all_ignored_rows_give_zero_loss_and_gradient() {
    let (rows, vocab) = (6, 333);
    let (mut logits, _) = case(4, rows, vocab);
    let targets = vec![IGNORE_INDEX; rows];
    assert_eq!(count_valid(&targets, IGNORE_INDEX), 0);
    let mut loss = vec![1.0; rows];
    Cpu.ce_fwd_bwd(&CeParams::new(rows, vocab), &mut logits, &targets, &mut loss).unwrap();
    assert!(loss.iter().all(|&l| l == 0.0) && logits.iter().all(|&g| g == 0.0));
    // A custom ignore index.
    let (mut logits, _) = case(5, 2, 5);
    let p = CeParams::new(2, 5).with_ignore_index(-1);
    Cpu.ce_fwd_bwd(&p, &mut logits, &[-1, 3], &mut loss[..2]).unwrap();
    assert!(loss[0] == 0.0 && logits[..5].iter().all(|&g| g == 0.0) && loss[1] > 0.0);
}

#[test]
fn invalid_target_is_an_error_before_writing() {
    let (mut logits, _) = case(6, 3, 10);
    let before = logits.clone();
    let mut loss = vec![7.0; 3];
    for bad in [10, -1] {
        let e = Cpu.ce_fwd_bwd(&CeParams::new(3, 10), &mut logits, &[0, bad, 1], &mut loss).unwrap_err().to_string();
        assert!(e.contains("targets[1]") && e.contains(&bad.to_string()), "{e}");
        assert!(logits == before && loss == [7.0; 3], "written before the target check");
    }
    assert!(validate_targets(&[0, 9, IGNORE_INDEX], 10, IGNORE_INDEX).is_ok());
}

#[test]
fn shape_mismatch_is_an_error() {
    let e = Cpu.ce_fwd(&CeParams::new(2, 3), &[0.0f32; 6], &[0, 1], &mut [0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("cross_entropy") && e.contains("`loss`"), "{e}");
    let e = Cpu.ce_fwd_bwd(&CeParams::new(2, 3), &mut [0.0f32; 5], &[0, 1], &mut [0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("`logits`"), "{e}");
}

/// bf16 gradients against the CPU's f32 ones on the same (bf16-rounded) logits: the math is f32 on
/// both sides, so the difference is the one rounding of the stored gradient to bf16 (at most 2^-8
/// relative) plus f32 noise. Tol::CUDA_BF16's atol 2e-2 would exceed most entries of a gradient
/// scaled by 1 / num_valid and check almost nothing.
const BF16_GRAD: Tol = Tol::new("cuda-bf16-ce-grad", 1e-4, 1e-2);

/// CUDA (E = f32 or bf16 logits, rounded through bf16 first) against the CPU on one case; `tol`
/// for the losses, `grad_tol` for the gradient.
fn cuda_case<E: CudaElem>(
    dev: &Cuda,
    logits: &[f32],
    targets: &[i32],
    p: &CeParams,
    (tol, grad_tol): (Tol, Tol),
    what: &str,
) where
    Cuda: CrossEntropyKernel<E>,
{
    let rows = p.rows as usize;
    let (mut want_grad, mut want_loss) = (logits.to_vec(), vec![0.0; rows]);
    Cpu.ce_fwd_bwd(p, &mut want_grad, targets, &mut want_loss).unwrap();
    let xe: Vec<E> = logits.iter().map(|&v| E::from_f32(v)).collect();
    let (mut x, t) = (dev.upload(&xe).unwrap(), dev.upload(targets).unwrap());
    let mut loss = dev.upload(&vec![f32::NAN; rows]).unwrap();
    CrossEntropyKernel::<E>::ce_fwd(dev, p, &x, &t, &mut loss).unwrap();
    tol.assert_close(&format!("{what} fwd loss"), &dev.download(&loss).unwrap(), &want_loss);
    let mut loss = dev.upload(&vec![f32::NAN; rows]).unwrap();
    CrossEntropyKernel::<E>::ce_fwd_bwd(dev, p, &mut x, &t, &mut loss).unwrap();
    tol.assert_close(&format!("{what} fwd_bwd loss"), &dev.download(&loss).unwrap(), &want_loss);
    let grad: Vec<f32> = dev.download(&x).unwrap().into_iter().map(|g| g.to_f32()).collect();
    grad_tol.assert_close(&format!("{what} fwd_bwd grad"), &grad, &want_grad);
}

#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("cross_entropy::cuda_matches_cpu") else { return };
    // Both launch configurations (256 threads up to SMALL_VOCAB, 1024 above), ragged vocabs and
    // the block-size boundary; rows include ignored targets.
    for (seed, rows, vocab) in
        [(10, 29, 1000), (11, 7, 4096), (12, 7, 4097), (13, 5, 50257), (14, 4, 49152), (15, 3, 31)]
    {
        let expected_block = if vocab as u32 <= SMALL_VOCAB { 256 } else { 1024 };
        assert_eq!(block_for(vocab as u32), expected_block);
        let (logits, targets) = case(seed, rows, vocab);
        let logits = round_bf16(&logits);
        let scale = 1.0 / count_valid(&targets, IGNORE_INDEX).max(1) as f32;
        let p = CeParams::new(rows, vocab).with_grad_scale(scale);
        let tag = format!("ce cuda vocab {vocab} block {expected_block}");
        cuda_case::<f32>(&dev, &logits, &targets, &p, (Tol::CUDA_F32, Tol::CUDA_F32), &format!("{tag} f32"));
        cuda_case::<bf16>(&dev, &logits, &targets, &p, (Tol::CUDA_BF16, BF16_GRAD), &format!("{tag} bf16"));
    }
    // All ignored, both block sizes.
    for vocab in [300, 5000] {
        let (logits, _) = case(16, 3, vocab);
        let targets = vec![IGNORE_INDEX; 3];
        let p = CeParams::new(3, vocab);
        cuda_case::<f32>(&dev, &logits, &targets, &p, (Tol::CUDA_F32, Tol::CUDA_F32), "ce cuda all ignored");
    }
}

#[test]
fn cuda_invalid_target_gives_nan_loss_and_zero_gradient() {
    let Some(dev) = cuda_or_skip("cross_entropy::cuda_invalid_target_gives_nan_loss_and_zero_gradient") else { return };
    let (logits, _) = case(17, 3, 50);
    let (mut x, t) = (dev.upload(&logits).unwrap(), dev.upload(&[1i32, 50, 2]).unwrap());
    let mut loss = dev.zeros::<f32>(3).unwrap();
    CrossEntropyKernel::<f32>::ce_fwd_bwd(&*dev, &CeParams::new(3, 50), &mut x, &t, &mut loss).unwrap();
    let (loss, grad) = (dev.download(&loss).unwrap(), dev.download(&x).unwrap());
    assert!(loss[0].is_finite() && loss[1].is_nan() && loss[2].is_finite(), "{loss:?}");
    assert!(grad[50..100].iter().all(|&g| g == 0.0));
}

#[test]
fn cuda_nan_logit_gives_nan_loss() {
    let Some(dev) = cuda_or_skip("cross_entropy::cuda_nan_logit_gives_nan_loss") else { return };
    // NaN logits at every element one thread of the block strides over (and only there), so that
    // thread's running max stays -inf: its NaN sum must still reach the loss, as on the CPU.
    // vocab 31 < 256 threads; vocab 1000 (256 threads: thread 255); vocab 5000 (1024: thread 1023).
    for (vocab, nan_at) in [(31, vec![5]), (1000, vec![255, 511, 767]), (5000, vec![1023, 2047, 3071, 4095])] {
        let (mut logits, _) = case(18, 2, vocab);
        nan_at.iter().for_each(|&i| logits[i] = f32::NAN);
        let (targets, p) = ([0, 1], CeParams::new(2, vocab));
        let mut want = [0.0; 2];
        Cpu.ce_fwd(&p, &logits, &targets, &mut want).unwrap();
        assert!(want[0].is_nan() && want[1].is_finite(), "cpu vocab {vocab}: {want:?}");
        let (mut x, t) = (dev.upload(&logits).unwrap(), dev.upload(&targets).unwrap());
        let mut loss = dev.zeros::<f32>(2).unwrap();
        CrossEntropyKernel::<f32>::ce_fwd(&*dev, &p, &x, &t, &mut loss).unwrap();
        let fwd = dev.download(&loss).unwrap();
        CrossEntropyKernel::<f32>::ce_fwd_bwd(&*dev, &p, &mut x, &t, &mut loss).unwrap();
        let fwd_bwd = dev.download(&loss).unwrap();
        for l in [fwd, fwd_bwd] {
            assert!(l[0].is_nan() && l[1].is_finite(), "cuda vocab {vocab} (block {}): {l:?}", block_for(vocab as u32));
        }
    }
}
