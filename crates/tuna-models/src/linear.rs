//! A linear layer as loaded: its weight, optional bias and layout, and its Hugging Face module name
//! (`model.layers.0.self_attn.q_proj`; normalized: GPT-2's `transformer.h.N...` and BERT's
//! `encoder.layer.N...` whichever prefix the file used), set once where each architecture loads it
//! and read by the forward's LoRA lookup, `named_weights` and saving.

use crate::error::Result;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use tuna_autograd::ops::linear::WeightLayout;
use tuna_autograd::ops::lowp::PackedWeight;
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
    /// The frozen weight held in low precision (`--base-precision`), shared by every clone of this
    /// layer: when set, the forward uses it and `weight`'s f32 storage has been released (its
    /// shape stays; reading its values is an error).
    pub packed: Rc<RefCell<Option<Arc<PackedWeight>>>>,
}

impl<B: Kernels<E>, E: Float> Clone for Linear<B, E> {
    fn clone(&self) -> Self {
        Linear {
            name: self.name.clone(),
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            layout: self.layout,
            packed: self.packed.clone(),
        }
    }
}

impl<B: Kernels<E>, E: Float> Linear<B, E> {
    /// A layer as loaded (f32, not packed).
    pub fn new(name: String, weight: Tensor<B, E>, bias: Option<Tensor<B, E>>, layout: WeightLayout) -> Self {
        Linear { name, weight, bias, layout, packed: Rc::new(RefCell::new(None)) }
    }

    /// A layer whose frozen weight is held packed from the start (`--base-precision q4`: a GGUF's
    /// blocks): `weight` carries the shape only ([`Tensor::released`]).
    pub fn with_packed(
        name: String,
        weight: Tensor<B, E>,
        bias: Option<Tensor<B, E>>,
        layout: WeightLayout,
        pw: PackedWeight,
    ) -> Self {
        Linear { name, weight, bias, layout, packed: Rc::new(RefCell::new(Some(Arc::new(pw)))) }
    }

    /// The packed low-precision weight, when the layer holds one.
    pub fn packed(&self) -> Option<Arc<PackedWeight>> {
        self.packed.borrow().clone()
    }

    /// Whether `--base-precision` can pack this layer: its weight is frozen and not packed yet.
    pub fn is_packable(&self) -> bool {
        !self.weight.requires_grad() && self.packed.borrow().is_none()
    }

    /// `(out, in)` features, whatever the layout.
    pub fn out_in(&self) -> (usize, usize) {
        let s = self.weight.shape();
        match self.layout {
            WeightLayout::OutIn => (s[0], s[1]),
            WeightLayout::InOut => (s[1], s[0]),
        }
    }

    /// Holds the (frozen) weight in `p` from now on and releases its f32 storage; returns the
    /// bytes released and the bytes the packed weight holds. Refuses a weight that trains.
    pub fn pack(&self, p: tuna_autograd::ops::lowp::BasePrecision) -> Result<(usize, usize)> {
        if self.weight.requires_grad() {
            return Err(crate::error::Error::InvalidArgument(format!(
                "{}.weight trains: only a frozen weight can be held in {p}",
                self.name
            )));
        }
        if self.packed.borrow().is_some() {
            return Err(crate::error::Error::InvalidArgument(format!("{}.weight is already packed", self.name)));
        }
        let (out, inp) = self.out_in();
        let host: Vec<f32> = self.weight.to_vec()?.into_iter().map(|v| v.to_f32()).collect();
        let name = format!("{}.weight", self.name);
        let pw = PackedWeight::pack(&name, &host, out, inp, self.layout == WeightLayout::InOut, p)?;
        let (before, after) = (self.weight.bytes(), pw.bytes());
        self.weight.release_storage()?;
        *self.packed.borrow_mut() = Some(Arc::new(pw));
        Ok((before, after))
    }

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
        if let Some(pw) = self.packed.borrow().as_ref() {
            return Ok(tuna_autograd::ops::lowp::linear_packed(x, pw, self.bias.as_ref())?);
        }
        Ok(tuna_autograd::ops::linear::linear(x, &self.weight, self.layout, self.bias.as_ref())?)
    }
}
