//! Activation checkpointing: a function (a transformer block) whose forward records nothing and
//! whose backward recomputes it.
//!
//! [`checkpoint`] runs `f` unrecorded, so none of the activations inside it are kept, and records
//! one node that keeps only `f` itself and its explicit inputs. Its backward runs `f` again with
//! recording on, seeds the recomputed output's gradient with the one that reached the
//! checkpoint's output, and differentiates the recomputed graph alone (the nodes made since the
//! recompute started; see [`graph::run_backward_from`]).
//!
//! The recompute runs on the inputs themselves, not on detached copies: the recomputed ops add
//! into the gradients of what they read from outside (the inputs, trainable parameters, and
//! activations `f` captured, such as a prefix's keys sliced from a table) exactly as the plain
//! forward's ops would have, in the same order, so gradients are bitwise those of the plain
//! graph on the CPU. The unrecorded forward notes the recorded activations `f` reads (see
//! [`graph::Collected`]): they become the node's parents, so the outer backward runs their nodes
//! only after the recompute has added to their gradients.
//!
//! `f` must compute the same thing both times: randomness inside it (dropout) must be drawn from
//! a state it restores itself (the models reseed their dropout generator from a snapshot).
//! Under [`no_grad`](crate::no_grad), or when nothing `f` reads needs a gradient, `f` simply
//! runs once and nothing is recorded (as its ops would record nothing either).

use crate::error::{Error, Result};
use crate::graph::{self, Saved};
use crate::ops::Kernels;
use crate::tensor::{Float, Tensor};

/// `f(inputs)`, keeping only `inputs` for the backward, which recomputes `f` (see the module
/// docs). `f`'s error type is the caller's; a recompute that fails is a backward error naming it.
pub fn checkpoint<B, E, F, Er>(inputs: &[Tensor<B, E>], f: F) -> std::result::Result<Tensor<B, E>, Er>
where
    B: Kernels<E>,
    E: Float,
    F: Fn(&[Tensor<B, E>]) -> std::result::Result<Tensor<B, E>, Er> + 'static,
    Er: From<Error> + std::fmt::Display,
{
    if !graph::grad_enabled() {
        return f(inputs);
    }
    let (y, got) = graph::no_grad_collecting(|| f(inputs));
    let y = y?;
    if !got.needs_grad && !inputs.iter().any(|t| t.requires_grad()) {
        return Ok(y);
    }
    let mut parents = got.parents;
    for n in inputs.iter().filter_map(|t| t.node()) {
        if !parents.iter().any(|p| std::rc::Rc::ptr_eq(p, &n)) {
            parents.push(n);
        }
    }
    // The parameters the block reads: their gradients complete only after its recompute.
    let mut leaves = got.leaves;
    for t in inputs.iter().filter(|t| t.requires_grad() && t.is_leaf()) {
        graph::push_unique(&mut leaves, t.id());
    }
    let cell = crate::tensor::GradCell::<B, E>::new(y.numel());
    let saved: Vec<Saved<B, E>> =
        crate::stats::saving_as(graph::CHECKPOINT_KIND, || inputs.iter().map(Saved::new).collect());
    let (out_cell, shape) = (cell.clone(), y.shape().to_vec());
    let backward = Box::new(move || -> Result<()> {
        // No gradient reached the output: nothing flows into the block either.
        let Some(g) = out_cell.take() else { return Ok(()) };
        let inputs: Vec<Tensor<B, E>> = saved.iter().map(|s| s.t().clone()).collect();
        let since = graph::next_seq();
        // Profiling: the recomputed ops' forward time starts here, not at the last forward op.
        crate::stats::mark();
        let y = graph::with_grad(|| f(&inputs))
            .map_err(|e| Error::Backward(format!("recomputing a checkpointed block: {e}")))?;
        drop(inputs);
        crate::error::same_shape("checkpoint", "recomputed output vs the forward's", y.shape(), &shape)?;
        let (Some(c), Some(n)) = (y.cell(), y.node().filter(|n| n.seq >= since)) else {
            return Err(Error::Backward(
                "a checkpointed function's recompute recorded nothing (its output is not computed, in \
                 the function, from anything that needs a gradient)"
                    .into(),
            ));
        };
        *c.buf.borrow_mut() = Some(g);
        drop(y);
        graph::run_backward_from(n, since)
    });
    let node = graph::node(graph::CHECKPOINT_KIND, parents, leaves, backward);
    Ok(Tensor::from_op(y.device(), y.shape().to_vec(), y.inner.data.clone(), Some((cell, node))))
}

#[cfg(test)]
mod tests {
    use super::checkpoint;
    use crate::ops::act::{gelu, GeluKind};
    use crate::ops::elem::{add, slice_cols};
    use crate::ops::linear::{linear, WeightLayout};
    use crate::ops::loss::cross_entropy;
    use crate::ops::norm::layernorm;
    use crate::{no_grad, stats, Ints, Result, Tensor};
    use std::sync::Arc;
    use tuna_kernels::rng::SplitMix64;
    use tuna_kernels::Cpu;

    type T = Tensor<Cpu, f32>;

    /// A small residual block's weights, a captured activation (sliced from a trainable table,
    /// as a prefix's keys are) and the loss's targets.
    struct Net {
        w1: T,
        w2: T,
        gamma: T,
        beta: T,
        table: T,
        x: T,
    }

    fn net(dev: &Arc<Cpu>, seed: u64) -> Result<Net> {
        let mut rng = SplitMix64::new(seed);
        let mut v = |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect() };
        Ok(Net {
            w1: Tensor::param(dev, "w1", &[16, 8], &v(128))?,
            w2: Tensor::param(dev, "w2", &[8, 16], &v(128))?,
            gamma: Tensor::param(dev, "gamma", &[8], &v(8))?,
            beta: Tensor::constant(dev, &[8], &v(8))?,
            table: Tensor::param(dev, "table", &[4, 24], &v(96))?,
            x: Tensor::param(dev, "x", &[4, 8], &v(32))?,
        })
    }

    /// `x + w2 gelu(w1 layernorm(x)) + bias` where `bias` is one of `bias_cols` column slices.
    fn block(n: &Net, x: &T, bias: &T) -> Result<T> {
        let h = linear(&layernorm(x, &n.gamma, &n.beta, 1e-5)?, &n.w1, WeightLayout::OutIn, None)?;
        let y = linear(&gelu(&h, GeluKind::Tanh)?, &n.w2, WeightLayout::OutIn, None)?;
        add(&add(x, &y)?, bias)
    }

    /// The loss of three blocks (the middle ones checkpointed where `ckpt` says) and every gradient.
    fn run(n: &Net, ckpt: [bool; 3]) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut x = add(&n.x, &n.x)?;
        for (l, &c) in ckpt.iter().enumerate() {
            let bias = slice_cols(&n.table, 8 * l, 8)?;
            x = if c {
                let (w1, w2, gamma, beta, table, xx) =
                    (n.w1.clone(), n.w2.clone(), n.gamma.clone(), n.beta.clone(), n.table.clone(), n.x.clone());
                checkpoint(&[x], move |xs: &[T]| {
                    let n = Net {
                        w1: w1.clone(),
                        w2: w2.clone(),
                        gamma: gamma.clone(),
                        beta: beta.clone(),
                        table: table.clone(),
                        x: xx.clone(),
                    };
                    block(&n, &xs[0], &bias)
                })?
            } else {
                block(n, &x, &bias)?
            };
        }
        let targets = Ints::new(n.x.device(), &[4], &[1i32, 7, 3, 0])?;
        let loss = cross_entropy(x, &targets, -100)?;
        let lv = loss.to_vec()?;
        loss.backward()?;
        let grads = [&n.w1, &n.w2, &n.gamma, &n.table, &n.x]
            .iter()
            .map(|t| {
                let g = t.grad()?.expect("a gradient");
                t.zero_grad();
                Ok(g)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((lv, grads))
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_graph_bitwise() -> Result<()> {
        let dev = Arc::new(Cpu);
        let n = net(&dev, 7)?;
        let plain = run(&n, [false; 3])?;
        for ckpt in [[true; 3], [true, false, true], [false, true, false]] {
            let got = run(&n, ckpt)?;
            assert_eq!(got.0, plain.0, "loss, {ckpt:?}");
            for (i, (g, p)) in got.1.iter().zip(&plain.1).enumerate() {
                assert!(g.iter().zip(p).all(|(a, b)| a.to_bits() == b.to_bits()), "gradient {i}, {ckpt:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn checkpointed_blocks_keep_only_their_inputs() -> Result<()> {
        let dev = Arc::new(Cpu);
        let n = net(&dev, 8)?;
        let peak = |ckpt: [bool; 3]| -> Result<usize> {
            stats::reset();
            let base = stats::snapshot().saved_bytes;
            run(&n, ckpt)?;
            Ok(stats::snapshot().peak_saved_bytes - base)
        };
        let (plain, every) = (peak([false; 3])?, peak([true; 3])?);
        assert!(every < plain, "checkpointed peak {every} B vs plain {plain} B");
        Ok(())
    }

    #[test]
    fn without_gradients_the_function_runs_once_and_records_nothing() -> Result<()> {
        let dev = Arc::new(Cpu);
        let n = net(&dev, 9)?;
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let c = calls.clone();
        let x = Tensor::constant(&dev, &[4, 8], &[0.5; 32])?;
        let w = n.w1.clone();
        let f = move |xs: &[T]| -> Result<T> {
            c.set(c.get() + 1);
            linear(&xs[0], &w, WeightLayout::OutIn, None)
        };
        let y = no_grad(|| checkpoint(std::slice::from_ref(&x), f))?;
        assert!(!y.requires_grad());
        assert_eq!(calls.get(), 1);
        // Frozen weights and a constant input: nothing to differentiate, nothing recorded.
        let frozen = Tensor::constant(&dev, &[16, 8], &n.w1.to_vec()?)?;
        let y = checkpoint(&[x], move |xs: &[T]| linear(&xs[0], &frozen, WeightLayout::OutIn, None))?;
        assert!(!y.requires_grad());
        Ok(())
    }
}
