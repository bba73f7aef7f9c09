//! A linear layer as loaded: its weight, optional bias and layout, and its Hugging Face module name
//! (`model.layers.0.self_attn.q_proj`; normalized: GPT-2's `transformer.h.N...` and BERT's
//! `encoder.layer.N...` whichever prefix the file used), set once where each architecture loads it
//! and read by the forward's LoRA lookup, `named_weights` and saving.

use crate::error::Result;
use tuna_autograd::ops::linear::WeightLayout;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

/// A linear layer and its module name.
pub struct Linear<B: Kernels<E>, E: Float> {
    /// The module name as PEFT's keys and `named_weights` spell it (without `.weight`).
    pub name: String,
    pub weight: Tensor<B, E>,
    pub bias: Option<Tensor<B, E>>,
    /// `OutIn` (`nn.Linear`) or `InOut` (GPT-2's Conv1D).
    pub layout: WeightLayout,
}

impl<B: Kernels<E>, E: Float> Clone for Linear<B, E> {
    fn clone(&self) -> Self {
        Linear { name: self.name.clone(), weight: self.weight.clone(), bias: self.bias.clone(), layout: self.layout }
    }
}

impl<B: Kernels<E>, E: Float> Linear<B, E> {
    /// `name.weight` and (when there is one) `name.bias`.
    pub fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut v = vec![(format!("{}.weight", self.name), self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push((format!("{}.bias", self.name), b.clone()));
        }
        v
    }

    /// `x W (+ bias)`, without any adaptation.
    pub fn apply(&self, x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        Ok(tuna_autograd::ops::linear::linear(x, &self.weight, self.layout, self.bias.as_ref())?)
    }
}
