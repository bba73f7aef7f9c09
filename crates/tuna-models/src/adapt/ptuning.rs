//! P-tuning (Liu et al. 2021; PEFT's `P_TUNING`): the soft prompt is the output of a prompt encoder
//! run over `n` trainable virtual-token embeddings `E` (`[n, token_dim]`, token_dim = the hidden size).
//! The two encoders are PEFT 0.21.2's (`peft/tuners/p_tuning/model.py`, checked by the fixtures):
//!
//! - MLP: `Linear(token_dim, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, token_dim)` (PEFT
//!   ignores `encoder_num_layers` here: always these three layers);
//! - LSTM: a bidirectional LSTM of [`LSTM_LAYERS`] layers, hidden size `h` (PyTorch's gate order
//!   i, f, g, o; zero initial states; each direction's input weights `[4h, in]`, recurrent `[4h, h]`,
//!   two biases), run over the `n` tokens as one sequence, then `Linear(2h, 2h) -> ReLU ->
//!   Linear(2h, token_dim)` on its `[n, 2h]` output.
//!
//! Every batch row gets the same prompt (PEFT encodes one row and repeats it). Parameters carry
//! PEFT's names less the adapter name (`prompt_encoder.mlp_head.0.weight`); PEFT saves only the
//! encoder's output, as `prompt_embeddings` (see [`super::peft`]).
//!
//! Built from the autograd crate's differentiable ops: ReLU is `x * [x > 0]` (the mask read from
//! the forward's values, a constant: the gradient is PyTorch's, 0 at and below 0), and the
//! sigmoid is `0.5 tanh(x / 2) + 0.5`.

use super::{normal, param};
use crate::error::{Error, Result};
use std::sync::Arc;
use tuna_autograd::ops::elem::{add, add_bias, concat_cols, mul, scale, slice_cols, tanh};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;

/// Layers of the LSTM encoder: PEFT's default `encoder_num_layers` (the only count tuna trains).
pub const LSTM_LAYERS: usize = 2;

/// Which prompt encoder (PEFT's `encoder_reparameterization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    Mlp,
    Lstm,
}

impl EncoderKind {
    /// PEFT's name: `MLP` or `LSTM`.
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderKind::Mlp => "MLP",
            EncoderKind::Lstm => "LSTM",
        }
    }

    /// From PEFT's name (`MLP`, `LSTM`).
    pub fn from_peft(name: &str) -> Option<Self> {
        match name {
            "MLP" => Some(EncoderKind::Mlp),
            "LSTM" => Some(EncoderKind::Lstm),
            _ => None,
        }
    }
}

/// The encoder's settings as `adapter_config.json` records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSpec {
    pub kind: EncoderKind,
    /// `encoder_hidden_size`.
    pub hidden: usize,
    /// `encoder_num_layers` (the LSTM's layers; PEFT's MLP ignores it).
    pub layers: usize,
}

/// One LSTM direction of one layer: `w_ih` `[4h, in]`, `w_hh` `[4h, h]`, `b_ih`, `b_hh` `[4h]`.
pub struct LstmCell<B: Kernels<E>, E: Float> {
    pub w_ih: Tensor<B, E>,
    pub w_hh: Tensor<B, E>,
    pub b_ih: Tensor<B, E>,
    pub b_hh: Tensor<B, E>,
}

/// The trainable prompt encoder: the embeddings, the LSTM (its layers' forward and reverse
/// cells; empty for the MLP) and the MLP head's linears (`(weight [out, in], bias)`).
pub struct PromptEncoder<B: Kernels<E>, E: Float> {
    pub kind: EncoderKind,
    pub hidden: usize,
    pub embedding: Tensor<B, E>,
    pub lstm: Vec<[LstmCell<B, E>; 2]>,
    pub head: Vec<(Tensor<B, E>, Tensor<B, E>)>,
}

impl<B: Kernels<E>, E: Float> PromptEncoder<B, E> {
    /// A new encoder for `n` virtual tokens of width `token_dim`, PyTorch's default inits: the
    /// embeddings N(0, 1) (nn.Embedding), linears U(+-1/sqrt(fan_in)), LSTM weights and biases
    /// U(+-1/sqrt(hidden)).
    pub fn new(dev: &Arc<B>, kind: EncoderKind, n: usize, token_dim: usize, hidden: usize, seed: u64) -> Result<Self> {
        if n == 0 || hidden == 0 {
            return Err(Error::InvalidArgument(format!(
                "p-tuning needs at least one virtual token and an encoder hidden size of at least 1 (got {n}, {hidden})"
            )));
        }
        let mut rng = SplitMix64::new(seed);
        let embedding =
            param(dev, "prompt_encoder.embedding.weight", &[n, token_dim], &normal(&mut rng, n * token_dim, 1.0))?;
        let mut uni = |bound_of: usize, shape: &[usize], name: &str| -> Result<Tensor<B, E>> {
            let b = 1.0 / (bound_of as f64).sqrt();
            let v: Vec<f32> = (0..shape.iter().product()).map(|_| ((rng.next_f64() * 2.0 - 1.0) * b) as f32).collect();
            param(dev, name, shape, &v)
        };
        let mut lstm = Vec::new();
        let dims: Vec<(usize, usize)> = match kind {
            EncoderKind::Mlp => vec![(token_dim, hidden), (hidden, hidden), (hidden, token_dim)],
            EncoderKind::Lstm => {
                for layer in 0..LSTM_LAYERS {
                    let input = if layer == 0 { token_dim } else { 2 * hidden };
                    let mut cell = |suffix: &str| -> Result<LstmCell<B, E>> {
                        let name = |w: &str| format!("prompt_encoder.lstm_head.{w}_l{layer}{suffix}");
                        Ok(LstmCell {
                            w_ih: uni(hidden, &[4 * hidden, input], &name("weight_ih"))?,
                            w_hh: uni(hidden, &[4 * hidden, hidden], &name("weight_hh"))?,
                            b_ih: uni(hidden, &[4 * hidden], &name("bias_ih"))?,
                            b_hh: uni(hidden, &[4 * hidden], &name("bias_hh"))?,
                        })
                    };
                    lstm.push([cell("")?, cell("_reverse")?]);
                }
                vec![(2 * hidden, 2 * hidden), (2 * hidden, token_dim)]
            }
        };
        let mut head = Vec::new();
        for (k, &(i, o)) in dims.iter().enumerate() {
            let name = |w: &str| format!("prompt_encoder.mlp_head.{}.{w}", 2 * k);
            head.push((uni(i, &[o, i], &name("weight"))?, uni(i, &[o], &name("bias"))?));
        }
        Ok(PromptEncoder { kind, hidden, embedding, lstm, head })
    }

    /// Virtual tokens.
    pub fn len(&self) -> usize {
        self.embedding.shape()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The settings `adapter_config.json` records.
    pub fn spec(&self) -> EncoderSpec {
        let layers = if self.lstm.is_empty() { LSTM_LAYERS } else { self.lstm.len() };
        EncoderSpec { kind: self.kind, hidden: self.hidden, layers }
    }

    /// The soft prompt, `[n, token_dim]`.
    pub fn forward(&self) -> Result<Tensor<B, E>> {
        let mut x = self.embedding.clone();
        for [fwd, rev] in &self.lstm {
            let f = run_lstm(&x, fwd, self.hidden, false)?;
            let r = run_lstm(&x, rev, self.hidden, true)?;
            x = concat_cols(&[&f, &r])?;
        }
        let last = self.head.len().saturating_sub(1);
        for (k, (w, b)) in self.head.iter().enumerate() {
            x = linear(&x, w, WeightLayout::OutIn, Some(b))?;
            if k < last {
                x = relu(&x)?;
            }
        }
        Ok(x)
    }

    /// Trainable tensors by checkpoint name (PEFT's, less the adapter name), in PEFT's order.
    pub fn params(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = vec![("prompt_encoder.embedding.weight".to_string(), self.embedding.clone())];
        for (layer, cells) in self.lstm.iter().enumerate() {
            for (cell, suffix) in cells.iter().zip(["", "_reverse"]) {
                let name = |w: &str| format!("prompt_encoder.lstm_head.{w}_l{layer}{suffix}");
                out.push((name("weight_ih"), cell.w_ih.clone()));
                out.push((name("weight_hh"), cell.w_hh.clone()));
                out.push((name("bias_ih"), cell.b_ih.clone()));
                out.push((name("bias_hh"), cell.b_hh.clone()));
            }
        }
        for (k, (w, b)) in self.head.iter().enumerate() {
            out.push((format!("prompt_encoder.mlp_head.{}.weight", 2 * k), w.clone()));
            out.push((format!("prompt_encoder.mlp_head.{}.bias", 2 * k), b.clone()));
        }
        out
    }
}

/// `max(x, 0)` as `x * [x > 0]`, the mask a constant read from `x`'s values.
fn relu<B: Kernels<E>, E: Float>(x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let mask: Vec<E> = x.to_vec()?.into_iter().map(|v| E::from_f32(if v.to_f32() > 0.0 { 1.0 } else { 0.0 })).collect();
    Ok(mul(x, &Tensor::constant(x.device(), x.shape(), &mask)?)?)
}

/// `1 / (1 + e^-x)` as `0.5 tanh(x / 2) + 0.5`.
fn sigmoid<B: Kernels<E>, E: Float>(x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let cols = *x.shape().last().unwrap_or(&0);
    let half = Tensor::constant(x.device(), &[cols], &vec![E::from_f32(0.5); cols])?;
    Ok(add_bias(&scale(&tanh(&scale(x, 0.5)?)?, 0.5)?, &half)?)
}

/// One direction of one LSTM layer over the rows of `x` (`[n, in]`, one sequence; `reverse`:
/// last row first), zero initial states: the hidden states `[n, h]` in the rows' order.
fn run_lstm<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    cell: &LstmCell<B, E>,
    h: usize,
    reverse: bool,
) -> Result<Tensor<B, E>> {
    let n = x.shape()[0];
    // The input's part of every step's gates at once: [n, 4h] viewed as one row.
    let xw = linear(x, &cell.w_ih, WeightLayout::OutIn, Some(&cell.b_ih))?;
    let xw = reshape(&xw, &[1, n * 4 * h])?;
    let mut states: Vec<Option<Tensor<B, E>>> = (0..n).map(|_| None).collect();
    let mut prev: Option<(Tensor<B, E>, Tensor<B, E>)> = None;
    let order: Vec<usize> = if reverse { (0..n).rev().collect() } else { (0..n).collect() };
    for t in order {
        let xt = slice_cols(&xw, t * 4 * h, 4 * h)?;
        // With a zero hidden state the recurrent product is 0: only its bias remains.
        let gates = match &prev {
            Some((hp, _)) => add(&xt, &linear(hp, &cell.w_hh, WeightLayout::OutIn, Some(&cell.b_hh))?)?,
            None => add_bias(&xt, &cell.b_hh)?,
        };
        let i = sigmoid(&slice_cols(&gates, 0, h)?)?;
        let g = tanh(&slice_cols(&gates, 2 * h, h)?)?;
        let o = sigmoid(&slice_cols(&gates, 3 * h, h)?)?;
        let ig = mul(&i, &g)?;
        // The forget gate acts on the previous cell state (none at the first step).
        let c = match &prev {
            Some((_, cp)) => add(&mul(&sigmoid(&slice_cols(&gates, h, h)?)?, cp)?, &ig)?,
            None => ig,
        };
        let ht = mul(&o, &tanh(&c)?)?;
        states[t] = Some(ht.clone());
        prev = Some((ht, c));
    }
    let states: Vec<Tensor<B, E>> = states.into_iter().map(|s| s.expect("every step ran")).collect();
    let refs: Vec<&Tensor<B, E>> = states.iter().collect();
    Ok(reshape(&concat_cols(&refs)?, &[n, h])?)
}
