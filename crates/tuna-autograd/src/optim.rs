//! Optimizer-side ops on trainable tensors: global gradient norm and clipping, and AdamW (the
//! fused kernels of `tuna_kernels::ops::{grad, adamw}`). Gradients accumulate across backward
//! passes by construction; [`zero_grad`] is the optimizer step's zeroing.

use crate::error::{Error, Result};
use crate::ops::{host, zeros, Kernels};
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::adamw::AdamWKernel;
pub use tuna_kernels::ops::adamw::AdamWParams;
use tuna_kernels::ops::grad::GradNormKernel;
use tuna_kernels::Alloc;

/// Backends with the optimizer kernels for `E`.
pub trait OptimKernels<E: Float>: Kernels<E> + AdamWKernel<E> + GradNormKernel<E> {}
impl<B: Kernels<E> + AdamWKernel<E> + GradNormKernel<E>, E: Float> OptimKernels<E> for B {}

/// Drop every parameter's accumulated gradient.
pub fn zero_grad<B: Kernels<E>, E: Float>(params: &[&Tensor<B, E>]) {
    for p in params {
        p.zero_grad();
    }
}

/// The global L2 norm of all accumulated gradients; when it exceeds `max_norm`, every gradient
/// is scaled by `max_norm / norm` on the device. Returns the norm before clipping (one host read).
pub fn clip_grad_norm<B: OptimKernels<E>, E: Float>(params: &[&Tensor<B, E>], max_norm: f64) -> Result<f64> {
    norm_then(params, Some(max_norm))
}

/// The global L2 norm of all accumulated gradients, without changing them (one host read): a
/// run that does not clip still learns of a non-finite gradient before applying it.
pub fn grad_norm<B: OptimKernels<E>, E: Float>(params: &[&Tensor<B, E>]) -> Result<f64> {
    norm_then(params, None)
}

fn norm_then<B: OptimKernels<E>, E: Float>(params: &[&Tensor<B, E>], clip: Option<f64>) -> Result<f64> {
    let Some(first) = params.first() else { return Ok(0.0) };
    // A tensor listed twice counts once (and is clipped once).
    let mut seen = std::collections::HashSet::new();
    let params: Vec<_> = params.iter().filter(|p| seen.insert(p.id())).collect();
    let dev = first.device().clone();
    let mut acc = zeros::<B, E>(&dev, 1)?;
    for p in &params {
        if let Some(r) = p.with_grad(|g| dev.grad_sq_norm_acc(g, B::buf_mut(&mut acc))) {
            r?;
        }
    }
    if let Some(max_norm) = clip {
        for p in params {
            if let Some(c) = &p.inner.grad {
                if let Some(g) = c.buf.borrow_mut().as_mut() {
                    dev.grad_clip(B::buf(&acc), E::c(max_norm), B::buf_mut(g))?;
                }
            }
        }
    }
    let sq: f64 = host::<B, E>(&dev, &acc)?[0].into();
    Ok(sq.sqrt())
}

/// AdamW with decoupled weight decay (PyTorch's `AdamW`), its moments kept on the device.
pub struct AdamW<B: OptimKernels<E>, E: Float> {
    pub hp: AdamWParams,
    params: Vec<Tensor<B, E>>,
    moments: Vec<(<B as Alloc<E>>::Owned, <B as Alloc<E>>::Owned)>,
}

impl<B: OptimKernels<E>, E: Float> AdamW<B, E> {
    /// An optimizer over `params` (each must be trainable).
    pub fn new(params: &[&Tensor<B, E>], hp: AdamWParams) -> Result<Self> {
        let mut moments = Vec::new();
        for p in params {
            if !p.requires_grad() || !p.is_leaf() {
                return Err(Error::Backward(format!("AdamW: {p:?} is not a trainable leaf")));
            }
            let dev = p.device();
            moments.push((zeros::<B, E>(dev, p.numel())?, zeros::<B, E>(dev, p.numel())?));
        }
        Ok(AdamW { hp: AdamWParams { step: 0, ..hp }, params: params.iter().map(|p| (*p).clone()).collect(), moments })
    }

    /// The first and second moments of each parameter, in the order given to [`AdamW::new`]
    /// (host copies, for checkpoints).
    pub fn moments(&self) -> Result<Vec<(Vec<E>, Vec<E>)>> {
        let dev = match self.params.first() {
            Some(p) => p.device().clone(),
            None => return Ok(Vec::new()),
        };
        self.moments.iter().map(|(m, v)| Ok((dev.to_host(m)?, dev.to_host(v)?))).collect()
    }

    /// Restore moments saved by [`AdamW::moments`] and the step count (`hp.step`); an error names
    /// the parameter whose length disagrees.
    pub fn load_moments(&mut self, moments: &[(Vec<E>, Vec<E>)], step: u32) -> Result<()> {
        if moments.len() != self.params.len() {
            return Err(Error::Backward(format!(
                "AdamW: {} saved moment pairs for {} parameters",
                moments.len(),
                self.params.len()
            )));
        }
        for (i, (p, (m, v))) in self.params.iter().zip(moments).enumerate() {
            if m.len() != p.numel() || v.len() != p.numel() {
                return Err(Error::Backward(format!(
                    "AdamW: saved moments of parameter #{i} ({:?}) have {} / {} values, the parameter {}",
                    p.name(),
                    m.len(),
                    v.len(),
                    p.numel()
                )));
            }
            let dev = p.device();
            self.moments[i] = (dev.from_host(m)?, dev.from_host(v)?);
        }
        self.hp.step = step;
        Ok(())
    }

    /// One update of every parameter that has a gradient, then zero the gradients.
    pub fn step(&mut self) -> Result<()> {
        self.hp.step += 1;
        for (p, (m, v)) in self.params.iter().zip(self.moments.iter_mut()) {
            let dev = p.device().clone();
            let hp = self.hp;
            let r =
                p.with_grad(|g| dev.adamw_step(&hp, B::buf_mut(&mut *p.data_mut()), g, B::buf_mut(m), B::buf_mut(v)));
            if let Some(r) = r {
                r?;
            }
            p.zero_grad();
        }
        Ok(())
    }
}
