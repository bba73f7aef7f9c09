//! Activations: GELU (tanh, erf), SiLU, SwiGLU.

use super::{unfilled, GradSlot, Kernels};
use crate::error::{same_shape, Result};
use crate::graph::{launched, output, Saved};
use crate::tensor::{Float, Tensor};
pub use tuna_kernels::ops::gelu::GeluKind;

/// `gelu(x)`, elementwise (or `max(x, 0)` with [`GeluKind::Relu`]).
pub fn gelu<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, kind: GeluKind) -> Result<Tensor<B, E>> {
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    dev.gelu_fwd(kind, &x.buf(), B::buf_mut(&mut y))?;
    // Profiles name ReLU as what it is, though it runs on the GELU kernel.
    let (name, bwd) = if kind == GeluKind::Relu { ("relu", "relu.bwd") } else { ("gelu", "gelu.bwd") };
    Ok(output(name, &[x], dev, x.shape().to_vec(), y, |out, _| {
        let (xs, cx) = (Saved::new(x), x.cell().expect("recorded: x needs a gradient"));
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched(bwd);
            let dev = xs.t().device();
            cx.accumulate(dev, |dx| Ok(dev.gelu_bwd(kind, &xs.t().buf(), B::buf(&g), dx)?))
        })
    }))
}

/// `silu(x) = x * sigmoid(x)`, elementwise.
pub fn silu<B: Kernels<E>, E: Float>(x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    dev.silu_fwd(&x.buf(), B::buf_mut(&mut y))?;
    Ok(output("silu", &[x], dev, x.shape().to_vec(), y, |out, _| {
        let (xs, cx) = (Saved::new(x), x.cell().expect("recorded: x needs a gradient"));
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("silu.bwd");
            let dev = xs.t().device();
            cx.accumulate(dev, |dx| Ok(dev.silu_bwd(&xs.t().buf(), B::buf(&g), dx)?))
        })
    }))
}

/// `silu(gate) * up` (Llama's MLP), elementwise over equal shapes.
pub fn swiglu<B: Kernels<E>, E: Float>(gate: &Tensor<B, E>, up: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    same_shape("swiglu", "gate vs up", gate.shape(), up.shape())?;
    let dev = gate.device();
    let mut y = unfilled::<B, E>(dev, gate.numel())?;
    dev.swiglu_fwd(&gate.buf(), &up.buf(), B::buf_mut(&mut y))?;
    Ok(output("swiglu", &[gate, up], dev, gate.shape().to_vec(), y, |out, _| {
        // Both inputs are read by either gradient (dgate needs up, dup needs gate).
        let (gs, us) = (Saved::new(gate), Saved::new(up));
        let (cg, cu) = (gate.cell(), up.cell());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("swiglu.bwd");
            let dev = gs.t().device();
            let n = gs.t().numel();
            // The kernel writes both gradients; a scratch buffer stands in for one not wanted.
            let (mut sg, mut su) = (GradSlot::new(&**dev, &cg, n)?, GradSlot::new(&**dev, &cu, n)?);
            let (dg, du) = (sg.buf(), su.buf());
            dev.swiglu_bwd(&gs.t().buf(), &us.t().buf(), B::buf(&g), dg, du)?;
            GradSlot::finish(&**dev, [Some(sg), Some(su)])
        })
    }))
}
