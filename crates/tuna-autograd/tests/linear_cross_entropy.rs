//! `linear_cross_entropy` (the head and the loss fused, chunked, only the rows with a target)
//! against `cross_entropy(linear(h, w))`: the value and the gradients of `h` and `w` (trained or
//! frozen), every chunk size, ignored rows, no row at all; a gradient check in f64; no
//! `[rows, vocab]` buffer saved; the same on CUDA (the emulated device without a GPU).

mod common;
use common::{constant, cpu, param};
use std::sync::Arc;
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::{cross_entropy, linear_cross_entropy};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{stats, Float, Ints, Tensor};
use tuna_kernels::testing::{cuda_or_skip, Rng, Tol};
use tuna_kernels::Cpu;

const ROWS: usize = 9;
const HIDDEN: usize = 6;
const VOCAB: usize = 23;

fn targets() -> Vec<i32> {
    let mut t: Vec<i32> = (0..ROWS).map(|r| ((r * 7 + 3) % VOCAB) as i32).collect();
    t[0] = -100;
    t[4] = -100;
    t
}

/// Loss, dh (empty when `h` needs none) and dw (when `w` trains) of one run.
type Run<E> = (Vec<E>, Vec<E>, Option<Vec<E>>);

/// Loss, dh and dw of the unfused ops and of the fused one (at `chunk`).
fn both<B: Kernels<E>, E: Float + tuna_kernels::CpuFloat>(
    h: &Tensor<B, E>,
    w: &Tensor<B, E>,
    t: &[i32],
    chunk: Option<usize>,
) -> [Run<E>; 2] {
    let dev = h.device().clone();
    let run = |fused: bool| {
        h.zero_grad();
        w.zero_grad();
        let loss = if fused {
            linear_cross_entropy(h, w, t, -100, chunk).unwrap()
        } else {
            let y = linear(h, w, WeightLayout::OutIn, None).unwrap();
            cross_entropy(y, &Ints::new(&dev, &[t.len()], t).unwrap(), -100).unwrap()
        };
        let v = loss.to_vec().unwrap();
        loss.backward().unwrap();
        (v, h.grad().unwrap().unwrap_or_default(), w.grad().unwrap())
    };
    [run(false), run(true)]
}

fn f64_pair(tol: Tol, what: &str, a: &[f64], b: &[f64]) {
    tol.assert_close(what, a, b);
}

#[test]
fn fused_equals_unfused_for_every_chunk_size() {
    let mut rng = Rng::new(3);
    let h = param(&mut rng, "h", &[3, 3, HIDDEN], 1.0);
    let (w_train, w_frozen) = (param(&mut rng, "w", &[VOCAB, HIDDEN], 0.7), constant(&mut rng, &[VOCAB, HIDDEN], 0.7));
    for (w, trains) in [(&w_train, true), (&w_frozen, false)] {
        for chunk in [Some(1), Some(2), Some(3), Some(100), None] {
            let [(lu, hu, wu), (lf, hf, wf)] = both(&h, w, &targets(), chunk);
            let what = format!("chunk {chunk:?}, w trains {trains}");
            f64_pair(Tol::F64, &format!("{what}: loss"), &lf, &lu);
            f64_pair(Tol::F64, &format!("{what}: dh"), &hf, &hu);
            assert_eq!(wf.is_some(), trains, "{what}: a gradient for w iff it trains");
            if let (Some(a), Some(b)) = (wf, wu) {
                f64_pair(Tol::F64, &format!("{what}: dw"), &a, &b);
            }
        }
    }
    // Only the head trains (h is an input): its gradient alone, the same.
    let x = constant(&mut rng, &[ROWS, HIDDEN], 1.0);
    let [(lu, _, wu), (lf, hf, wf)] = both(&x, &w_train, &targets(), Some(2));
    f64_pair(Tol::F64, "head only: loss", &lf, &lu);
    assert!(hf.is_empty(), "a gradient for an input");
    f64_pair(Tol::F64, "head only: dw", &wf.unwrap(), &wu.unwrap());
    // Every row ignored: 0, and no gradient anywhere.
    let none = vec![-100; ROWS];
    let [(lu, _, _), (lf, hf, wf)] = both(&h, &w_train, &none, None);
    assert_eq!((lf.clone(), lu), (vec![0.0], vec![0.0]));
    assert!(hf.iter().all(|&x| x == 0.0) && wf.is_none(), "gradients from no target");
}

#[test]
fn gradient_check_in_f64() {
    let mut rng = Rng::new(5);
    let h = param(&mut rng, "h", &[ROWS, HIDDEN], 1.0);
    let w = param(&mut rng, "w", &[VOCAB, HIDDEN], 0.7);
    let t = targets();
    check(&[&h, &w], || linear_cross_entropy(&h, &w, &t, -100, Some(2)), 1e-5, GRAD_TOL, 57).unwrap();
}

/// The backward keeps `[targets, hidden]`, never the `[rows, vocab]` logits the unfused ops keep.
#[test]
fn no_logits_are_saved() {
    let mut rng = Rng::new(7);
    let (rows, hidden, vocab) = (64, 8, 4096);
    let h = param(&mut rng, "h", &[rows, hidden], 1.0);
    let w = constant(&mut rng, &[vocab, hidden], 0.5);
    // Half the rows scored (a completion's target).
    let t: Vec<i32> = (0..rows).map(|r| if r % 2 == 0 { -100 } else { (r * 13 % vocab) as i32 }).collect();
    let saved = |fused: bool| {
        stats::reset();
        let base = stats::snapshot().saved_bytes;
        let loss = if fused {
            linear_cross_entropy(&h, &w, &t, -100, Some(8)).unwrap()
        } else {
            let y = linear(&h, &w, WeightLayout::OutIn, None).unwrap();
            cross_entropy(y, &Ints::new(&cpu(), &[rows], &t).unwrap(), -100).unwrap()
        };
        let s = stats::snapshot().peak_saved_bytes - base;
        drop(loss);
        s
    };
    let (fused, unfused) = (saved(true), saved(false));
    assert!(unfused >= rows * vocab * 8, "unfused saved {unfused}");
    assert!(fused <= rows / 2 * hidden * 8 * 2, "fused saved {fused} (unfused {unfused})");
}

#[test]
fn cuda_fused_matches_cpu() {
    let Some(dev) = cuda_or_skip("autograd::linear_cross_entropy::cuda_fused_matches_cpu") else { return };
    let mut rng = Rng::new(11);
    let hv: Vec<f32> = (0..ROWS * HIDDEN).map(|_| rng.normal()).collect();
    let wv: Vec<f32> = (0..VOCAB * HIDDEN).map(|_| rng.normal() * 0.7).collect();
    let c = both(
        &Tensor::param(&Arc::new(Cpu), "h", &[ROWS, HIDDEN], &hv).unwrap(),
        &Tensor::param(&Arc::new(Cpu), "w", &[VOCAB, HIDDEN], &wv).unwrap(),
        &targets(),
        Some(4),
    );
    let g = both(
        &Tensor::param(&dev, "h", &[ROWS, HIDDEN], &hv).unwrap(),
        &Tensor::param(&dev, "w", &[VOCAB, HIDDEN], &wv).unwrap(),
        &targets(),
        Some(4),
    );
    let [(lc, hc, wc), _] = &c;
    let [_, (lg, hg, wg)] = &g;
    Tol::CUDA_F32.assert_close("cuda loss", lg, lc);
    Tol::CUDA_F32.assert_close("cuda dh", hg, hc);
    Tol::CUDA_F32.assert_close("cuda dw", wg.as_ref().unwrap(), wc.as_ref().unwrap());
}
