//! A tiny two-block decoder built from the crate's ops (embedding with soft prompt, layernorm,
//! linear, rope, attention with prefix, gelu, residual adds, cross-entropy), for composition,
//! frozen-base accounting and accumulation tests.

use std::sync::Arc;
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::attention::{attention, AttnOptions, Prefix};
use tuna_autograd::ops::elem::add;
use tuna_autograd::ops::embed::{embedding, Prompt};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::norm::layernorm;
use tuna_autograd::ops::rope::rope;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Result, Tensor};
use tuna_kernels::testing::Rng;

pub const V: usize = 11;
pub const C: usize = 8;
pub const HEADS: usize = 2;
pub const KV_HEADS: usize = 1;
pub const D: usize = C / HEADS;
pub const FF: usize = 12;
pub const N_PROMPT: usize = 2;
pub const N_PREFIX: usize = 3;

pub struct Block<B: Kernels<E>, E: Float> {
    pub ln1: (Tensor<B, E>, Tensor<B, E>),
    pub wq: Tensor<B, E>,
    pub wk: Tensor<B, E>,
    pub wv: Tensor<B, E>,
    pub wo: Tensor<B, E>,
    pub ln2: (Tensor<B, E>, Tensor<B, E>),
    pub w1: Tensor<B, E>,
    pub b1: Tensor<B, E>,
    pub w2: Tensor<B, E>,
    pub prefix: (Tensor<B, E>, Tensor<B, E>),
}

pub struct Tiny<B: Kernels<E>, E: Float> {
    pub dev: Arc<B>,
    pub table: Tensor<B, E>,
    pub prompt: Tensor<B, E>,
    pub blocks: Vec<Block<B, E>>,
    pub lnf: (Tensor<B, E>, Tensor<B, E>),
    pub head: Tensor<B, E>,
}

/// Which tensors train.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Train {
    All,
    PromptOnly,
    PrefixOnly,
}

fn make<B: Kernels<E>, E: Float>(
    dev: &Arc<B>,
    rng: &mut Rng,
    name: &str,
    shape: &[usize],
    scale: f32,
    trainable: bool,
) -> Tensor<B, E> {
    let n: usize = shape.iter().product();
    let v: Vec<E> = (0..n).map(|_| E::from_f32(rng.normal() * scale)).collect();
    if trainable {
        Tensor::param(dev, name, shape, &v).unwrap()
    } else {
        Tensor::constant(dev, shape, &v).unwrap()
    }
}

fn ln<B: Kernels<E>, E: Float>(dev: &Arc<B>, rng: &mut Rng, name: &str, t: bool) -> (Tensor<B, E>, Tensor<B, E>) {
    let g: Vec<E> = (0..C).map(|_| E::from_f32(1.0 + 0.1 * rng.normal())).collect();
    let b: Vec<E> = (0..C).map(|_| E::from_f32(0.1 * rng.normal())).collect();
    if t {
        (
            Tensor::param(dev, &format!("{name}.g"), &[C], &g).unwrap(),
            Tensor::param(dev, &format!("{name}.b"), &[C], &b).unwrap(),
        )
    } else {
        (Tensor::constant(dev, &[C], &g).unwrap(), Tensor::constant(dev, &[C], &b).unwrap())
    }
}

impl<B: Kernels<E>, E: Float> Tiny<B, E> {
    /// The same weights (from `seed`) whatever `train` says; only which ones need a gradient differs.
    pub fn new(dev: &Arc<B>, seed: u64, train: Train) -> Self {
        let mut rng = Rng::new(seed);
        let w = train == Train::All;
        let table = make(dev, &mut rng, "table", &[V, C], 1.0, w);
        let prompt = make(dev, &mut rng, "prompt", &[N_PROMPT, C], 1.0, train != Train::PrefixOnly);
        let s = 1.0 / (C as f32).sqrt();
        let blocks = (0..2)
            .map(|i| Block {
                ln1: ln(dev, &mut rng, &format!("b{i}.ln1"), w),
                wq: make(dev, &mut rng, &format!("b{i}.wq"), &[C, C], s, w),
                wk: make(dev, &mut rng, &format!("b{i}.wk"), &[KV_HEADS * D, C], s, w),
                wv: make(dev, &mut rng, &format!("b{i}.wv"), &[KV_HEADS * D, C], s, w),
                wo: make(dev, &mut rng, &format!("b{i}.wo"), &[C, C], s, w),
                ln2: ln(dev, &mut rng, &format!("b{i}.ln2"), w),
                w1: make(dev, &mut rng, &format!("b{i}.w1"), &[C, FF], s, w),
                b1: make(dev, &mut rng, &format!("b{i}.b1"), &[FF], 0.1, w),
                w2: make(dev, &mut rng, &format!("b{i}.w2"), &[C, FF], 1.0 / (FF as f32).sqrt(), w),
                prefix: (
                    make(
                        dev,
                        &mut rng,
                        &format!("b{i}.prefix_k"),
                        &[N_PREFIX, KV_HEADS, D],
                        1.0,
                        train != Train::PromptOnly,
                    ),
                    make(
                        dev,
                        &mut rng,
                        &format!("b{i}.prefix_v"),
                        &[N_PREFIX, KV_HEADS, D],
                        1.0,
                        train != Train::PromptOnly,
                    ),
                ),
            })
            .collect();
        let lnf = ln(dev, &mut rng, "lnf", w);
        let head = make(dev, &mut rng, "head", &[V, C], s, w);
        Tiny { dev: dev.clone(), table, prompt, blocks, lnf, head }
    }

    /// Every tensor, trainable or not, in a fixed order.
    pub fn tensors(&self) -> Vec<&Tensor<B, E>> {
        let mut v = vec![&self.table, &self.prompt];
        for b in &self.blocks {
            v.extend([
                &b.ln1.0,
                &b.ln1.1,
                &b.wq,
                &b.wk,
                &b.wv,
                &b.wo,
                &b.ln2.0,
                &b.ln2.1,
                &b.w1,
                &b.b1,
                &b.w2,
                &b.prefix.0,
                &b.prefix.1,
            ]);
        }
        v.extend([&self.lnf.0, &self.lnf.1, &self.head]);
        v
    }

    /// Every trainable tensor.
    pub fn trainable(&self) -> Vec<&Tensor<B, E>> {
        self.tensors().into_iter().filter(|t| t.requires_grad()).collect()
    }

    /// Mean next-token loss of `ids` (`[batch, seq]`), the prompt first, targets shifted by one.
    pub fn loss(&self, ids: &[u32], batch: usize) -> Result<Tensor<B, E>> {
        let dev = &self.dev;
        let seq = ids.len() / batch;
        let t = seq + N_PROMPT;
        let ids_t = Ints::new(dev, &[batch, seq], ids)?;
        let at = Ints::new(dev, &[batch], &vec![0u32; batch])?;
        let mut x = embedding(&self.table, &ids_t, Some(Prompt { vectors: &self.prompt, at: &at }))?;
        let pos: Vec<u32> = (0..batch).flat_map(|_| (N_PREFIX as u32)..(N_PREFIX + t) as u32).collect();
        let pos = Ints::new(dev, &[batch, t], &pos)?;
        for b in &self.blocks {
            let h = layernorm(&x, &b.ln1.0, &b.ln1.1, 1e-5)?;
            let q =
                rope(&reshape(&linear(&h, &b.wq, WeightLayout::OutIn, None)?, &[batch, t, HEADS, D])?, &pos, 10000.0)?;
            let k = rope(
                &reshape(&linear(&h, &b.wk, WeightLayout::OutIn, None)?, &[batch, t, KV_HEADS, D])?,
                &pos,
                10000.0,
            )?;
            let v = reshape(&linear(&h, &b.wv, WeightLayout::OutIn, None)?, &[batch, t, KV_HEADS, D])?;
            let prefix = Prefix { k: &b.prefix.0, v: &b.prefix.1, rows: None };
            let a = attention(&q, &k, &v, Some(prefix), None, AttnOptions { causal: true, scale: None, kv_len: None })?;
            x = add(&x, &linear(&reshape(&a, &[batch, t, C])?, &b.wo, WeightLayout::OutIn, None)?)?;
            let h = layernorm(&x, &b.ln2.0, &b.ln2.1, 1e-5)?;
            let f = gelu(&linear(&h, &b.w1, WeightLayout::InOut, Some(&b.b1))?, GeluKind::Tanh)?;
            x = add(&x, &linear(&f, &b.w2, WeightLayout::OutIn, None)?)?;
        }
        let x = layernorm(&x, &self.lnf.0, &self.lnf.1, 1e-5)?;
        let logits = linear(&x, &self.head, WeightLayout::OutIn, None)?;
        // next-token targets over the content; the prompt positions and the last token are ignored
        let mut targets = vec![-100i32; batch * t];
        for r in 0..batch {
            for i in 0..seq - 1 {
                targets[r * t + N_PROMPT + i] = ids[r * seq + i + 1] as i32;
            }
        }
        let targets = Ints::new(dev, &[batch * t], &targets)?;
        cross_entropy(reshape(&logits, &[batch * t, V])?, &targets, -100)
    }
}
