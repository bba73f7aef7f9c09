//! LoRA: a frozen linear `W` plus a trainable low-rank update `(alpha / r) B A` (`A` `[r, in]`,
//! `B` `[out, r]`), with dropout on the update's input, and merge into / unmerge from `W`.

use super::param;
use crate::error::{Error, Result};
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use tuna_autograd::ops::elem::{add, mul, scale};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;

/// Which linears get LoRA and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module name suffixes (PEFT's `target_modules`): `q_proj`, `c_attn`, `query`, ...
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// The update's scale, `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether module `name` is a target: it equals a target, or the whole name ends with
    /// `.target` (PEFT's rule for a list).
    pub fn targets_module(&self, name: &str) -> bool {
        super::targets::list_names(&self.targets, name)
    }
}

/// One adapted linear.
pub struct Lora<B: Kernels<E>, E: Float> {
    pub a: Tensor<B, E>,
    pub b: Tensor<B, E>,
    pub scale: f64,
    pub dropout: f32,
    /// The base weight (shared with the model) and how it is stored, for merging.
    pub base: Tensor<B, E>,
    pub layout: WeightLayout,
    merged: Cell<bool>,
}

impl<B: Kernels<E>, E: Float> Clone for Lora<B, E> {
    /// The same tensors (shared storage) and merge state.
    fn clone(&self) -> Self {
        let (a, b, base) = (self.a.clone(), self.b.clone(), self.base.clone());
        Lora { a, b, scale: self.scale, dropout: self.dropout, base, layout: self.layout, merged: self.merged.clone() }
    }
}

impl<B: Kernels<E>, E: Float> Lora<B, E> {
    /// A LoRA update for `base` (`[out, in]` or `[in, out]` as `layout` says) with PEFT's init:
    /// `A` Kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), `B` zero, so the model starts unchanged.
    pub fn new(
        dev: &Arc<B>,
        name: &str,
        base: &Tensor<B, E>,
        layout: WeightLayout,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        let (out, inp) = out_in(base, layout)?;
        if cfg.r == 0 {
            return Err(Error::InvalidArgument(format!("lora: rank 0 for {name}")));
        }
        let mut rng = SplitMix64::new(seed);
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let a = param(dev, &format!("{name}.lora_A"), &[cfg.r, inp], &a)?;
        let b = param(dev, &format!("{name}.lora_B"), &[out, cfg.r], &vec![0.0; out * cfg.r])?;
        Ok(Self::from_parts(a, b, cfg.scale(), cfg.dropout, base.clone(), layout))
    }

    pub fn from_parts(
        a: Tensor<B, E>,
        b: Tensor<B, E>,
        scale: f64,
        dropout: f32,
        base: Tensor<B, E>,
        layout: WeightLayout,
    ) -> Self {
        Lora { a, b, scale, dropout, base, layout, merged: Cell::new(false) }
    }

    pub fn is_merged(&self) -> bool {
        self.merged.get()
    }

    /// `y + scale * B A dropout(x)` (just `y` while merged).
    pub(crate) fn add_update(
        &self,
        y: Tensor<B, E>,
        x: &Tensor<B, E>,
        training: bool,
        rng: &RefCell<SplitMix64>,
    ) -> Result<Tensor<B, E>> {
        if self.merged.get() {
            return Ok(y);
        }
        Ok(add(&y, &self.update(x, training, rng)?)?)
    }

    /// The low-rank update alone, `scale * B A dropout(x)` (never merged-aware: the caller checks).
    pub(crate) fn update(&self, x: &Tensor<B, E>, training: bool, rng: &RefCell<SplitMix64>) -> Result<Tensor<B, E>> {
        let x =
            if training && self.dropout > 0.0 { dropout(x, self.dropout, &mut rng.borrow_mut())? } else { x.clone() };
        let h = linear(&x, &self.a, WeightLayout::OutIn, None)?;
        let d = linear(&h, &self.b, WeightLayout::OutIn, None)?;
        Ok(scale(&d, self.scale)?)
    }

    /// `W += scale * B A` in place (in the base weight's layout); the update then costs nothing.
    pub fn merge(&self) -> Result<()> {
        if !self.merged.get() {
            self.apply_delta(1.0)?;
            self.merged.set(true);
        }
        Ok(())
    }

    /// `W -= scale * B A`: the base weight back (to rounding: `(W + D) - D` in f64, stored as `E`).
    pub fn unmerge(&self) -> Result<()> {
        if self.merged.get() {
            self.apply_delta(-1.0)?;
            self.merged.set(false);
        }
        Ok(())
    }

    /// The dense update `scale * B A` as `[out, in]`, in f64.
    pub fn delta(&self) -> Result<Vec<f64>> {
        let (a, b) = (self.a.to_vec()?, self.b.to_vec()?);
        let (r, inp, out) = (self.a.shape()[0], self.a.shape()[1], self.b.shape()[0]);
        let mut d = vec![0.0f64; out * inp];
        for o in 0..out {
            for k in 0..r {
                let bk: f64 = b[o * r + k].to_f64();
                if bk == 0.0 {
                    continue;
                }
                for i in 0..inp {
                    let ak: f64 = a[k * inp + i].to_f64();
                    d[o * inp + i] += bk * ak;
                }
            }
        }
        d.iter_mut().for_each(|x| *x *= self.scale);
        Ok(d)
    }

    fn apply_delta(&self, sign: f64) -> Result<()> {
        let (out, inp) = out_in(&self.base, self.layout)?;
        let d = self.delta()?;
        let mut w: Vec<E> = self.base.to_vec()?;
        for o in 0..out {
            for i in 0..inp {
                let idx = match self.layout {
                    WeightLayout::OutIn => o * inp + i,
                    WeightLayout::InOut => i * out + o,
                };
                let v: f64 = w[idx].to_f64();
                w[idx] = E::c(v + sign * d[o * inp + i]);
            }
        }
        let dev = self.base.device();
        *self.base.data_mut() = dev.from_host(&w)?;
        Ok(())
    }
}

/// `(out, in)` of a linear weight stored as `layout`.
pub(crate) fn out_in<B: Kernels<E>, E: Float>(w: &Tensor<B, E>, layout: WeightLayout) -> Result<(usize, usize)> {
    match (w.shape(), layout) {
        (&[o, i], WeightLayout::OutIn) | (&[i, o], WeightLayout::InOut) => Ok((o, i)),
        _ => Err(Error::InvalidArgument(format!("lora: base weight must be 2-D, got {:?}", w.shape()))),
    }
}

/// Inverted dropout: each element kept with probability `1 - p` and scaled by `1 / (1 - p)`; the
/// mask is drawn on the host (seeded), so runs reproduce.
fn dropout<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, p: f32, rng: &mut SplitMix64) -> Result<Tensor<B, E>> {
    let keep = 1.0 - p as f64;
    let m: Vec<E> = (0..x.numel()).map(|_| if rng.next_f64() < keep { E::c(1.0 / keep) } else { E::c(0.0) }).collect();
    let mask = Tensor::constant(x.device(), x.shape(), &m)?;
    Ok(mul(x, &mask)?)
}
