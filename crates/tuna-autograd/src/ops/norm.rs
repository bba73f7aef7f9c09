//! LayerNorm and RMSNorm over the last dim, alone or behind the residual add that feeds them (one
//! kernel pass). Frozen weights get no parameter-gradient kernel.

use super::elem::add_output;
use super::{acc_unfilled, finish_slots, unfilled, AccSlot, GradSlot, Kernels};
use crate::error::{same_shape, Result};
use crate::graph::{launched, output, Saved, SavedBuf};
use crate::stats;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::layernorm::LayerNormParams;
use tuna_kernels::ops::rmsnorm::RmsNormParams;
use tuna_kernels::Alloc;

fn rows_dim<B: Kernels<E>, E: Float>(
    op: &'static str,
    x: &Tensor<B, E>,
    gamma: &Tensor<B, E>,
) -> Result<(usize, usize)> {
    let dim = *x.shape().last().unwrap_or(&0);
    same_shape(op, "gamma vs x's last dim", gamma.shape(), &[dim])?;
    Ok((x.numel() / dim.max(1), dim))
}

/// `(x - mean) / sqrt(var + eps) * gamma + beta` per row.
pub fn layernorm<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    gamma: &Tensor<B, E>,
    beta: &Tensor<B, E>,
    eps: f32,
) -> Result<Tensor<B, E>> {
    let (rows, dim) = rows_dim("layernorm", x, gamma)?;
    same_shape("layernorm", "beta vs gamma", beta.shape(), gamma.shape())?;
    let p = LayerNormParams::new(rows, dim, eps);
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    let (mut mean, mut rstd) = (acc_unfilled::<B, E>(dev, rows)?, acc_unfilled::<B, E>(dev, rows)?);
    dev.layernorm_fwd(
        &p,
        &x.buf(),
        &gamma.buf(),
        &beta.buf(),
        <B as Alloc<E>>::buf_mut(&mut y),
        <B as Alloc<E::Acc>>::buf_mut(&mut mean),
        <B as Alloc<E::Acc>>::buf_mut(&mut rstd),
    )?;
    Ok(layernorm_output(p, x, gamma, beta, y, (mean, rstd)))
}

/// `h = x + r` and `y = layernorm(h, gamma, beta)` from one kernel pass over the rows (the
/// residual add and the norm that reads it): returns `(h, y)`. The values and gradients are those
/// of [`add`](super::elem::add) then [`layernorm`] (the kernel gives their bits; the tape records
/// the same two ops, with their backwards: kinds `add.bwd`, `layernorm.bwd`, `layernorm.dW`).
/// Profile kind `add+layernorm` for the forward.
pub fn add_layernorm<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    r: &Tensor<B, E>,
    gamma: &Tensor<B, E>,
    beta: &Tensor<B, E>,
    eps: f32,
) -> Result<(Tensor<B, E>, Tensor<B, E>)> {
    same_shape("add_layernorm", "r vs x", r.shape(), x.shape())?;
    let (rows, dim) = rows_dim("layernorm", x, gamma)?;
    same_shape("layernorm", "beta vs gamma", beta.shape(), gamma.shape())?;
    let p = LayerNormParams::new(rows, dim, eps);
    let dev = x.device();
    let (mut h, mut y) = (unfilled::<B, E>(dev, x.numel())?, unfilled::<B, E>(dev, x.numel())?);
    let (mut mean, mut rstd) = (acc_unfilled::<B, E>(dev, rows)?, acc_unfilled::<B, E>(dev, rows)?);
    dev.add_layernorm_fwd(
        &p,
        &x.buf(),
        &r.buf(),
        &gamma.buf(),
        &beta.buf(),
        <B as Alloc<E>>::buf_mut(&mut h),
        <B as Alloc<E>>::buf_mut(&mut y),
        <B as Alloc<E::Acc>>::buf_mut(&mut mean),
        <B as Alloc<E::Acc>>::buf_mut(&mut rstd),
    )?;
    stats::forward_done("add+layernorm");
    // the two tape ops charge no forward time of their own: the kernel's went to the pair
    Ok(stats::composite(|| {
        let h = add_output(x, r, h);
        let y = layernorm_output(p, &h, gamma, beta, y, (mean, rstd));
        (h, y)
    }))
}

/// The output tensor of `layernorm(x, gamma, beta)` whose data `y` and row statistics are already
/// computed, with layernorm's backward.
fn layernorm_output<B: Kernels<E>, E: Float>(
    p: LayerNormParams,
    x: &Tensor<B, E>,
    gamma: &Tensor<B, E>,
    beta: &Tensor<B, E>,
    y: <B as Alloc<E>>::Owned,
    (mean, rstd): (<B as Alloc<E::Acc>>::Owned, <B as Alloc<E::Acc>>::Owned),
) -> Tensor<B, E> {
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let dev = x.device();
    output("layernorm", &[x, gamma, beta], dev, x.shape().to_vec(), y, |out, _| {
        let (xs, gs) = (Saved::new(x), Saved::new(gamma));
        let stats = SavedBuf::new((mean, rstd), 2 * rows * std::mem::size_of::<E::Acc>());
        let (cx, cg, cb, dev) = (x.cell(), gamma.cell(), beta.cell(), dev.clone());
        let n = x.numel();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("layernorm.bwd");
            if cg.is_some() || cb.is_some() {
                launched("layernorm.dW");
            }
            let mut sx = GradSlot::new(&*dev, &cx, n)?;
            let mut sg = AccSlot::optional(&*dev, &cg, dim)?;
            let mut sb = AccSlot::optional(&*dev, &cb, dim)?;
            let (dgamma, dbeta) = (sg.as_mut().map(|s| s.buf()), sb.as_mut().map(|s| s.buf()));
            let (mean, rstd) = stats.buf();
            dev.layernorm_bwd(
                &p,
                &xs.t().buf(),
                &gs.t().buf(),
                <B as Alloc<E::Acc>>::buf(mean),
                <B as Alloc<E::Acc>>::buf(rstd),
                <B as Alloc<E>>::buf(&g),
                sx.buf(),
                dgamma,
                dbeta,
            )?;
            finish_slots(&*dev, [Some(sx)], [sg, sb])
        })
    })
}

/// `x / sqrt(mean(x^2) + eps) * gamma` per row (Llama).
pub fn rmsnorm<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, gamma: &Tensor<B, E>, eps: f32) -> Result<Tensor<B, E>> {
    let (rows, dim) = rows_dim("rmsnorm", x, gamma)?;
    let p = RmsNormParams::new(rows, dim, eps);
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    let mut rstd = acc_unfilled::<B, E>(dev, rows)?;
    dev.rmsnorm_fwd(
        &p,
        &x.buf(),
        &gamma.buf(),
        <B as Alloc<E>>::buf_mut(&mut y),
        <B as Alloc<E::Acc>>::buf_mut(&mut rstd),
    )?;
    Ok(rmsnorm_output(p, x, gamma, y, rstd))
}

/// `h = x + r` and `y = rmsnorm(h, gamma)` from one kernel pass over the rows: returns `(h, y)`,
/// the values and gradients of [`add`](super::elem::add) then [`rmsnorm`] (the kernel gives their
/// bits; the tape records the two ops: backward kinds `add.bwd`, `rmsnorm.bwd`, `rmsnorm.dW`).
/// Profile kind `add+rmsnorm` for the forward.
pub fn add_rmsnorm<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    r: &Tensor<B, E>,
    gamma: &Tensor<B, E>,
    eps: f32,
) -> Result<(Tensor<B, E>, Tensor<B, E>)> {
    same_shape("add_rmsnorm", "r vs x", r.shape(), x.shape())?;
    let (rows, dim) = rows_dim("rmsnorm", x, gamma)?;
    let p = RmsNormParams::new(rows, dim, eps);
    let dev = x.device();
    let (mut h, mut y) = (unfilled::<B, E>(dev, x.numel())?, unfilled::<B, E>(dev, x.numel())?);
    let mut rstd = acc_unfilled::<B, E>(dev, rows)?;
    dev.add_rmsnorm_fwd(
        &p,
        &x.buf(),
        &r.buf(),
        &gamma.buf(),
        <B as Alloc<E>>::buf_mut(&mut h),
        <B as Alloc<E>>::buf_mut(&mut y),
        <B as Alloc<E::Acc>>::buf_mut(&mut rstd),
    )?;
    stats::forward_done("add+rmsnorm");
    Ok(stats::composite(|| {
        let h = add_output(x, r, h);
        let y = rmsnorm_output(p, &h, gamma, y, rstd);
        (h, y)
    }))
}

/// The output tensor of `rmsnorm(x, gamma)` whose data `y` and `rstd` are already computed, with
/// rmsnorm's backward.
fn rmsnorm_output<B: Kernels<E>, E: Float>(
    p: RmsNormParams,
    x: &Tensor<B, E>,
    gamma: &Tensor<B, E>,
    y: <B as Alloc<E>>::Owned,
    rstd: <B as Alloc<E::Acc>>::Owned,
) -> Tensor<B, E> {
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let dev = x.device();
    output("rmsnorm", &[x, gamma], dev, x.shape().to_vec(), y, |out, _| {
        let (xs, gs) = (Saved::new(x), Saved::new(gamma));
        let rstd = SavedBuf::new(rstd, rows * std::mem::size_of::<E::Acc>());
        let (cx, cg, dev) = (x.cell(), gamma.cell(), dev.clone());
        let n = x.numel();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("rmsnorm.bwd");
            if cg.is_some() {
                launched("rmsnorm.dW");
            }
            let mut sx = GradSlot::new(&*dev, &cx, n)?;
            let mut sg = AccSlot::optional(&*dev, &cg, dim)?;
            let dgamma = sg.as_mut().map(|s| s.buf());
            dev.rmsnorm_bwd(
                &p,
                &xs.t().buf(),
                &gs.t().buf(),
                <B as Alloc<E::Acc>>::buf(rstd.buf()),
                <B as Alloc<E>>::buf(&g),
                sx.buf(),
                dgamma,
            )?;
            finish_slots(&*dev, [Some(sx)], [sg])
        })
    })
}
