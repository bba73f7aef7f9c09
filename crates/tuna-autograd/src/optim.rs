//! Optimizer-side ops on trainable tensors: global gradient norm and clipping, and AdamW (the
//! fused kernels of `tuna_kernels::ops::{grad, adamw}`). Gradients accumulate across backward
//! passes by construction; [`zero_grad`] is the optimizer step's zeroing.

use crate::error::{Error, Result};
use crate::ops::Kernels;
use crate::tensor::AccOwned;
use crate::tensor::{Float, Tensor};
use half::bf16;
pub use tuna_kernels::ops::adamw::AdamWParams;
use tuna_kernels::ops::adamw::{AdamWBf16Kernel, AdamWKernel};
use tuna_kernels::ops::grad::GradNormKernel;
use tuna_kernels::{Alloc, Elem};

/// Backends with the optimizer kernels for `E`: the update runs on the masters (`E::Acc`: the
/// parameters themselves for f32/f64, the f32 masters of bf16 ones) with `E::Acc` gradients.
pub trait OptimKernels<E: Float>:
    Kernels<E> + AdamWKernel<E::Acc> + AdamWBf16Kernel<E::Acc> + GradNormKernel<E::Acc> + Alloc<bf16>
{
}
impl<
        B: Kernels<E> + AdamWKernel<E::Acc> + AdamWBf16Kernel<E::Acc> + GradNormKernel<E::Acc> + Alloc<bf16>,
        E: Float,
    > OptimKernels<E> for B
{
}

/// How AdamW stores its two moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MomentStorage {
    /// In the masters' float (f32): PyTorch's AdamW.
    #[default]
    Master,
    /// In bf16 (half the optimizer's memory), stochastically rounded each step
    /// (`tuna_kernels::ops::adamw::AdamWBf16Kernel`).
    Bf16,
}

impl MomentStorage {
    /// Bytes of the two moments per trainable parameter (f32 masters).
    pub fn bytes_per_param(self) -> usize {
        match self {
            MomentStorage::Master => 8,
            MomentStorage::Bf16 => 4,
        }
    }
}

impl std::fmt::Display for MomentStorage {
    /// As the command line spells it (`f32`, `bf16`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MomentStorage::Master => "f32",
            MomentStorage::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for MomentStorage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(MomentStorage::Master),
            "bf16" => Ok(MomentStorage::Bf16),
            other => Err(format!("`{other}`: expected f32 or bf16")),
        }
    }
}

/// One parameter's first and second moments as host copies in the masters' float (`E::Acc`).
pub type MomentPair<E> = (Vec<<E as tuna_kernels::Elem>::Acc>, Vec<<E as tuna_kernels::Elem>::Acc>);

/// One parameter's moments, as stored.
enum Moments<B: OptimKernels<E>, E: Float> {
    Master(AccOwned<B, E>, AccOwned<B, E>),
    Bf16(<B as Alloc<bf16>>::Owned, <B as Alloc<bf16>>::Owned),
}

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
    let mut acc: AccOwned<B, E> = Alloc::<E::Acc>::zeros(&*dev, 1)?;
    for p in &params {
        if let Some(r) = p.with_grad(|g| dev.grad_sq_norm_acc(g, <B as Alloc<E::Acc>>::buf_mut(&mut acc)))? {
            r?;
        }
    }
    if let Some(max_norm) = clip {
        let max_norm = <E::Acc as Elem>::from_f64(max_norm);
        for p in params {
            if let Some(r) = p.with_grad(|g| dev.grad_clip(<B as Alloc<E::Acc>>::buf(&acc), max_norm, g))? {
                r?;
            }
        }
    }
    let sq: f64 = Alloc::<E::Acc>::to_host(&*dev, &acc)?[0].to_f64();
    Ok(sq.sqrt())
}

/// AdamW with decoupled weight decay (PyTorch's `AdamW`), its moments kept on the device, in the
/// masters' float or in bf16 ([`MomentStorage`]).
pub struct AdamW<B: OptimKernels<E>, E: Float> {
    pub hp: AdamWParams,
    params: Vec<Tensor<B, E>>,
    moments: Vec<Moments<B, E>>,
    storage: MomentStorage,
}

impl<B: OptimKernels<E>, E: Float> AdamW<B, E> {
    /// An optimizer over `params` (each must be trainable), moments in the masters' float.
    pub fn new(params: &[&Tensor<B, E>], hp: AdamWParams) -> Result<Self> {
        Self::with_storage(params, hp, MomentStorage::Master)
    }

    /// An optimizer over `params` with its moments stored as `storage` says.
    pub fn with_storage(params: &[&Tensor<B, E>], hp: AdamWParams, storage: MomentStorage) -> Result<Self> {
        let mut moments = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in params {
            if !seen.insert(p.id()) {
                return Err(Error::Backward(format!("AdamW: {p:?} is listed twice")));
            }
            if !p.requires_grad() || !p.is_leaf() {
                return Err(Error::Backward(format!("AdamW: {p:?} is not a trainable leaf")));
            }
            let (dev, n) = (p.device(), p.numel());
            moments.push(match storage {
                MomentStorage::Master => {
                    Moments::Master(Alloc::<E::Acc>::zeros(&**dev, n)?, Alloc::<E::Acc>::zeros(&**dev, n)?)
                }
                MomentStorage::Bf16 => {
                    Moments::Bf16(Alloc::<bf16>::zeros(&**dev, n)?, Alloc::<bf16>::zeros(&**dev, n)?)
                }
            });
        }
        Ok(AdamW {
            hp: AdamWParams { step: 0, ..hp },
            params: params.iter().map(|p| (*p).clone()).collect(),
            moments,
            storage,
        })
    }

    /// How the moments are stored.
    pub fn storage(&self) -> MomentStorage {
        self.storage
    }

    /// The first and second moments of each parameter, in the order given to [`AdamW::new`]
    /// (host copies in the masters' float, for checkpoints; bf16 moments widen exactly).
    pub fn moments(&self) -> Result<Vec<MomentPair<E>>> {
        (0..self.params.len()).map(|i| Ok((self.moment(i, false)?, self.moment(i, true)?))).collect()
    }

    /// Parameter `i`'s first moment (`second` false) or second moment, as [`AdamW::moments`] gives
    /// it: one host copy at a time (a checkpoint streams them so).
    pub fn moment(&self, i: usize, second: bool) -> Result<Vec<E::Acc>> {
        let dev = self.params[i].device();
        let widen = |v: Vec<bf16>| v.into_iter().map(|x| <E::Acc as Elem>::from_f64(x.to_f64())).collect::<Vec<_>>();
        Ok(match (&self.moments[i], second) {
            (Moments::Master(m, _), false) | (Moments::Master(_, m), true) => Alloc::<E::Acc>::to_host(&**dev, m)?,
            (Moments::Bf16(m, _), false) | (Moments::Bf16(_, m), true) => widen(Alloc::<bf16>::to_host(&**dev, m)?),
        })
    }

    /// Restore moments saved by [`AdamW::moments`] and the step count (`hp.step`); an error names
    /// the parameter whose length disagrees.
    pub fn load_moments(&mut self, moments: &[MomentPair<E>], step: u32) -> Result<()> {
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
        }
        for (i, (m, v)) in moments.iter().enumerate() {
            self.load_moment(i, false, m)?;
            self.load_moment(i, true, v)?;
        }
        self.hp.step = step;
        Ok(())
    }

    /// Restore parameter `i`'s first moment (`second` false) or second moment, as
    /// [`AdamW::moment`] gave it, over the one held (in place where the device can: one moment at
    /// a time, a resume holds no second copy of the optimizer). The step count is the caller's to
    /// set (`hp.step`). An error names the parameter whose length disagrees.
    pub fn load_moment(&mut self, i: usize, second: bool, saved: &[E::Acc]) -> Result<()> {
        let n = self.params.len();
        let p = self.params.get(i).ok_or_else(|| Error::Backward(format!("AdamW: no parameter #{i} of {n}")))?;
        if saved.len() != p.numel() {
            return Err(Error::Backward(format!(
                "AdamW: the saved {} moment of parameter #{i} ({:?}) has {} values, the parameter {}",
                if second { "second" } else { "first" },
                p.name(),
                saved.len(),
                p.numel()
            )));
        }
        let dev = p.device();
        match (&mut self.moments[i], second) {
            (Moments::Master(m, _), false) | (Moments::Master(_, m), true) => {
                Alloc::<E::Acc>::copy_from_host(&**dev, m, saved)?;
            }
            (Moments::Bf16(m, _), false) | (Moments::Bf16(_, m), true) => {
                // Saved from bf16 moments these are exact; from f32 ones, rounded to nearest.
                let narrow: Vec<bf16> = saved.iter().map(|&x| bf16::from_f64(x.to_f64())).collect();
                Alloc::<bf16>::copy_from_host(&**dev, m, &narrow)?;
            }
        }
        Ok(())
    }

    /// One update of every parameter that has a gradient, then zero the gradients.
    pub fn step(&mut self) -> Result<()> {
        self.hp.step += 1;
        for i in 0..self.params.len() {
            self.update(i)?;
        }
        Ok(())
    }

    /// Parameter `i`'s update at the current step (none without a gradient), then its gradient
    /// is dropped.
    fn update(&mut self, i: usize) -> Result<()> {
        let (p, mv) = (&self.params[i], &mut self.moments[i]);
        let dev = p.device().clone();
        let hp = self.hp;
        // The stochastic rounding's draw: per step and per parameter, so runs reproduce.
        let seed = hp.step.wrapping_mul(0x9e37_79b9) ^ (i as u32).wrapping_mul(0x85eb_ca6b);
        // The update runs on the master (the parameter itself for f32/f64), which then writes the
        // parameter's data.
        let grad = p.inner.grad.as_ref().filter(|_| p.has_grad());
        if grad.is_some() {
            p.update_master(|master| {
                let r = p.with_grad(|g| match mv {
                    Moments::Master(m, v) => dev.adamw_step(
                        &hp,
                        master,
                        g,
                        <B as Alloc<E::Acc>>::buf_mut(m),
                        <B as Alloc<E::Acc>>::buf_mut(v),
                    ),
                    Moments::Bf16(m, v) => dev.adamw_step_bf16_moments(
                        &hp,
                        seed,
                        master,
                        g,
                        <B as Alloc<bf16>>::buf_mut(m),
                        <B as Alloc<bf16>>::buf_mut(v),
                    ),
                })?;
                if let Some(r) = r {
                    r?;
                }
                Ok(())
            })?;
        }
        p.zero_grad();
        Ok(())
    }

    /// The backward of `loss` with the optimizer inside it: each parameter is updated (one
    /// [`AdamW::step`]'s update, at `hp.lr`) as soon as its gradient is complete, and its gradient
    /// freed then, so the gradients of the whole model are never held at once. The same numbers as
    /// `loss.backward()` then [`AdamW::step`] (each parameter's update reads only its own gradient
    /// and moments), without clipping by a global norm, which needs every gradient first, and for
    /// one backward per step (gradients accumulated over several would be applied after the
    /// first).
    ///
    /// Each gradient's squared norm is read before its update (one host read per parameter, a wait
    /// for the device on CUDA): a non-finite one is not applied, and neither is any gradient
    /// completing after it; the outcome says so, and the parameters updated before it keep their
    /// update (the caller stops, as after any non-finite gradient, and resumes from a checkpoint).
    pub fn backward_and_step(&mut self, loss: &Tensor<B, E>) -> Result<InBackward> {
        self.hp.step += 1;
        let index: std::collections::HashMap<u64, usize> =
            self.params.iter().enumerate().map(|(i, p)| (p.id(), i)).collect();
        let ids: Vec<u64> = self.params.iter().map(|p| p.id()).collect();
        let mut done = vec![false; self.params.len()];
        let mut out = InBackward::default();
        let mut complete = |id: u64| -> Result<()> {
            let Some(&i) = index.get(&id) else { return Ok(()) };
            if done[i] || !self.params[i].has_grad() {
                return Ok(());
            }
            done[i] = true;
            let held: usize = self.params.iter().filter(|p| p.has_grad()).map(|p| p.grad_bytes()).sum();
            out.peak_grad_bytes = out.peak_grad_bytes.max(held);
            if out.non_finite.is_some() {
                // After a non-finite gradient nothing more is applied.
                self.params[i].zero_grad();
                return Ok(());
            }
            let sq = norm_then(&[&self.params[i]], None)?.powi(2);
            if !sq.is_finite() {
                out.non_finite = Some(self.params[i].name().unwrap_or("(unnamed)").to_string());
                out.grad_sq_norm = f64::NAN;
                self.params[i].zero_grad();
                return Ok(());
            }
            out.grad_sq_norm += sq;
            out.updated += 1;
            self.update(i)
        };
        loss.backward_updating(&mut complete)?;
        // A gradient the accounting did not see complete (none should be left) is applied last.
        for id in ids {
            complete(id)?;
        }
        // A parameter that took a gradient after its update (an op that adds to a parameter's
        // gradient without listing it among its inputs) would have it applied a step late: refuse.
        if let Some(p) = self.params.iter().zip(&done).find(|(p, d)| **d && p.has_grad()) {
            return Err(Error::Backward(format!(
                "AdamW in the backward: {:?} received gradient after its update (an op that does not list it \
                 among its inputs adds to its gradient); use backward() then step()",
                p.0
            )));
        }
        Ok(out)
    }
}

/// The backward of `loss` with each parameter's gradient dropped as soon as it is complete: the
/// memory [`AdamW::backward_and_step`] needs, without updating anything (a memory probe).
pub fn backward_discarding<B: Kernels<E>, E: Float>(loss: &Tensor<B, E>, params: &[&Tensor<B, E>]) -> Result<()> {
    let by_id: std::collections::HashMap<u64, &Tensor<B, E>> = params.iter().map(|p| (p.id(), *p)).collect();
    loss.backward_updating(&mut |id| {
        if let Some(p) = by_id.get(&id) {
            p.zero_grad();
        }
        Ok(())
    })?;
    zero_grad(params);
    Ok(())
}

/// What [`AdamW::backward_and_step`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InBackward {
    /// Parameters updated.
    pub updated: usize,
    /// The sum of the applied gradients' squared norms (NaN after a non-finite one).
    pub grad_sq_norm: f64,
    /// The parameter whose gradient was not finite, if one was (it and those completing after it
    /// were not updated).
    pub non_finite: Option<String>,
    /// The most bytes of parameter gradients held at once, as seen each time one completed.
    pub peak_grad_bytes: usize,
}
