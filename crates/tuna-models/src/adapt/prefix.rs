//! Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): `n` trainable key/value
//! positions per layer, prepended to every attention through the fused kernel's prefix input.
//!
//! The table of all layers' keys and values is `[n, layers * 2 * kv_heads * head_dim]` (PEFT's
//! `prompt_embeddings`): column block `2i` holds layer `i`'s keys and block `2i + 1` its values,
//! each `[n, kv_heads, head_dim]` row-major. With the reparameterization the table is
//! `Linear(tanh(Linear(E)))` of an `[n, kv_heads * head_dim]` embedding `E` (PEFT's `prefix_projection`).

use super::{normal, param};
use crate::error::{Error, Result};
use std::sync::Arc;
use tuna_autograd::ops::elem::{slice_cols, tanh};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;

/// What the prefix is called (both train the same way; P-tuning v2 has no reparameterization).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixKind {
    Prefix,
    PTuningV2,
}

/// Where the key/value table comes from.
pub enum PrefixParams<B: Kernels<E>, E: Float> {
    /// The table itself, trained directly.
    Direct(Tensor<B, E>),
    /// `w2 tanh(w1 emb + b1) + b2`: `emb` `[n, token_dim]`, `w1` `[enc, token_dim]`, `w2` `[width, enc]`.
    Mlp { emb: Tensor<B, E>, w1: Tensor<B, E>, b1: Tensor<B, E>, w2: Tensor<B, E>, b2: Tensor<B, E> },
}

pub struct PrefixTuning<B: Kernels<E>, E: Float> {
    pub n: usize,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub kind: PrefixKind,
    pub params: PrefixParams<B, E>,
}

impl<B: Kernels<E>, E: Float> PrefixTuning<B, E> {
    /// Width of the table: `layers * 2 * kv_heads * head_dim`.
    pub fn width(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim
    }

    /// A new prefix: the table N(0, 1) (PEFT's nn.Embedding init) or, with `encoder_hidden`, an
    /// MLP from an `[n, kv_heads * head_dim]` embedding (PEFT's `token_dim`, which is the hidden size
    /// without grouped-query attention), PyTorch-default Linear init: U(+-1/sqrt(fan_in)).
    pub fn new(
        dev: &Arc<B>,
        kind: PrefixKind,
        n: usize,
        (layers, kv_heads, head_dim): (usize, usize, usize),
        encoder_hidden: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidArgument("prefix tuning needs at least one virtual token".into()));
        }
        let mut rng = SplitMix64::new(seed);
        let width = layers * 2 * kv_heads * head_dim;
        let hidden = kv_heads * head_dim;
        let params = match encoder_hidden {
            None => {
                PrefixParams::Direct(param(dev, "prompt_embeddings", &[n, width], &normal(&mut rng, n * width, 1.0))?)
            }
            Some(enc) => {
                let mut uni = |fan_in: usize, len: usize| -> Vec<f32> {
                    let b = 1.0 / (fan_in as f64).sqrt();
                    (0..len).map(|_| ((rng.next_f64() * 2.0 - 1.0) * b) as f32).collect()
                };
                let (w1, b1) = (uni(hidden, enc * hidden), uni(hidden, enc));
                let (w2, b2) = (uni(enc, width * enc), uni(enc, width));
                PrefixParams::Mlp {
                    emb: param(
                        dev,
                        "prompt_encoder.embedding.weight",
                        &[n, hidden],
                        &normal(&mut rng, n * hidden, 1.0),
                    )?,
                    w1: param(dev, "prompt_encoder.transform.0.weight", &[enc, hidden], &w1)?,
                    b1: param(dev, "prompt_encoder.transform.0.bias", &[enc], &b1)?,
                    w2: param(dev, "prompt_encoder.transform.2.weight", &[width, enc], &w2)?,
                    b2: param(dev, "prompt_encoder.transform.2.bias", &[width], &b2)?,
                }
            }
        };
        Ok(PrefixTuning { n, layers, kv_heads, head_dim, kind, params })
    }

    /// The `[n, width]` key/value table (through the MLP when reparameterized).
    pub fn table(&self) -> Result<Tensor<B, E>> {
        match &self.params {
            PrefixParams::Direct(t) => Ok(t.clone()),
            PrefixParams::Mlp { emb, w1, b1, w2, b2 } => {
                let h = tanh(&linear(emb, w1, WeightLayout::OutIn, Some(b1))?)?;
                Ok(linear(&h, w2, WeightLayout::OutIn, Some(b2))?)
            }
        }
    }

    /// Each layer's `(keys, values)`, `[n, kv_heads, head_dim]`.
    pub fn layer_kv(&self) -> Result<Vec<super::LayerKv<B, E>>> {
        let t = self.table()?;
        let w = self.kv_heads * self.head_dim;
        let shape = [self.n, self.kv_heads, self.head_dim];
        (0..self.layers)
            .map(|i| {
                let k = reshape(&slice_cols(&t, 2 * i * w, w)?, &shape)?;
                let v = reshape(&slice_cols(&t, (2 * i + 1) * w, w)?, &shape)?;
                Ok((k, v))
            })
            .collect()
    }

    /// Trainable tensors by checkpoint name (the MLP's unprojected weights under PEFT's names).
    pub fn params(&self) -> Vec<(String, Tensor<B, E>)> {
        match &self.params {
            PrefixParams::Direct(t) => vec![("prompt_embeddings".into(), t.clone())],
            PrefixParams::Mlp { emb, w1, b1, w2, b2 } => vec![
                ("prompt_encoder.embedding.weight".into(), emb.clone()),
                ("prompt_encoder.transform.0.weight".into(), w1.clone()),
                ("prompt_encoder.transform.0.bias".into(), b1.clone()),
                ("prompt_encoder.transform.2.weight".into(), w2.clone()),
                ("prompt_encoder.transform.2.bias".into(), b2.clone()),
            ],
        }
    }
}
