//! Houlsby adapters (Houlsby et al. 2019): after the attention and after the feed-forward of every
//! layer, `y + up(gelu(down(y)))` with a small bottleneck, initialized near identity.
//!
//! Checkpoint format (tuna's own; PEFT has no Houlsby adapters): `adapter_config.json` with
//! `"peft_type": "HOULSBY"`, `"bottleneck_size"`, `"num_layers"`, `"token_dim"`,
//! `"non_linearity"` ([`NON_LINEARITY`]) and `"placement"` ([`PLACEMENT`]), which a loaded
//! adapter must agree with, and tensors `houlsby.layers.<i>.<attn|ffn>.<down|up>.<weight|bias>` in
//! `adapter_model.safetensors` (`down.weight` `[bottleneck, hidden]`, `up.weight`
//! `[hidden, bottleneck]`, PyTorch `[out, in]`).

use super::{normal, param};
use crate::error::Result;
use std::sync::Arc;
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::elem::add;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;

/// The bottleneck's non-linearity, as the config names it (GELU, tanh approximation).
pub const NON_LINEARITY: &str = "gelu_tanh";
/// Where the adapters sit, as the config says it.
pub const PLACEMENT: &str =
    "after the attention output projection and after the feed-forward, before each residual add";

/// One bottleneck: `down` `[b, hidden]`, `up` `[hidden, b]`, with biases.
pub struct HoulsbyBlock<B: Kernels<E>, E: Float> {
    pub down: Tensor<B, E>,
    pub down_bias: Tensor<B, E>,
    pub up: Tensor<B, E>,
    pub up_bias: Tensor<B, E>,
}

/// Two bottlenecks per layer: `(after attention, after feed-forward)`.
pub struct Houlsby<B: Kernels<E>, E: Float> {
    pub bottleneck: usize,
    pub layers: Vec<(HoulsbyBlock<B, E>, HoulsbyBlock<B, E>)>,
}

impl<B: Kernels<E>, E: Float> Clone for HoulsbyBlock<B, E> {
    fn clone(&self) -> Self {
        let (down, down_bias) = (self.down.clone(), self.down_bias.clone());
        HoulsbyBlock { down, down_bias, up: self.up.clone(), up_bias: self.up_bias.clone() }
    }
}

impl<B: Kernels<E>, E: Float> Clone for Houlsby<B, E> {
    /// The same tensors (shared storage).
    fn clone(&self) -> Self {
        Houlsby { bottleneck: self.bottleneck, layers: self.layers.clone() }
    }
}

/// Standard deviation of the initial weights: small, so each adapter starts near the identity
/// (measured: a whole tiny model's outputs move by 1e-3 to 2e-3 of their largest value, see
/// tests/adapt.rs) while both matrices get gradients from the first step.
const INIT_STD: f64 = 1e-2;

impl<B: Kernels<E>, E: Float> Houlsby<B, E> {
    pub fn new(dev: &Arc<B>, layers: usize, hidden: usize, bottleneck: usize, seed: u64) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let mut block = |name: String| -> Result<HoulsbyBlock<B, E>> {
            Ok(HoulsbyBlock {
                down: param(
                    dev,
                    &format!("{name}.down.weight"),
                    &[bottleneck, hidden],
                    &normal(&mut rng, bottleneck * hidden, INIT_STD),
                )?,
                down_bias: param(dev, &format!("{name}.down.bias"), &[bottleneck], &vec![0.0; bottleneck])?,
                up: param(
                    dev,
                    &format!("{name}.up.weight"),
                    &[hidden, bottleneck],
                    &normal(&mut rng, bottleneck * hidden, INIT_STD),
                )?,
                up_bias: param(dev, &format!("{name}.up.bias"), &[hidden], &vec![0.0; hidden])?,
            })
        };
        let layers = (0..layers)
            .map(|i| Ok((block(format!("houlsby.layers.{i}.attn"))?, block(format!("houlsby.layers.{i}.ffn"))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Houlsby { bottleneck, layers })
    }

    /// `y + up(gelu(down(y)))` for layer `i` (`ffn`: the feed-forward's adapter).
    pub fn apply(&self, i: usize, ffn: bool, y: Tensor<B, E>) -> Result<Tensor<B, E>> {
        match self.delta(i, ffn, &y)? {
            Some(d) => Ok(add(&y, &d)?),
            None => Ok(y),
        }
    }

    /// `up(gelu(down(y)))` for layer `i`, `None` when the adapter has no layer `i`.
    pub(crate) fn delta(&self, i: usize, ffn: bool, y: &Tensor<B, E>) -> Result<Option<Tensor<B, E>>> {
        let Some((attn, ff)) = self.layers.get(i) else { return Ok(None) };
        let blk = if ffn { ff } else { attn };
        let h = gelu(&linear(y, &blk.down, WeightLayout::OutIn, Some(&blk.down_bias))?, GeluKind::Tanh)?;
        Ok(Some(linear(&h, &blk.up, WeightLayout::OutIn, Some(&blk.up_bias))?))
    }

    /// Every tensor by its checkpoint name.
    pub fn params(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = Vec::new();
        for (i, (a, f)) in self.layers.iter().enumerate() {
            for (part, b) in [("attn", a), ("ffn", f)] {
                let p = format!("houlsby.layers.{i}.{part}");
                out.push((format!("{p}.down.weight"), b.down.clone()));
                out.push((format!("{p}.down.bias"), b.down_bias.clone()));
                out.push((format!("{p}.up.weight"), b.up.clone()));
                out.push((format!("{p}.up.bias"), b.up_bias.clone()));
            }
        }
        out
    }
}
