//! Matrix products: `matmul` and the `linear` layer built on it. A frozen weight costs no `dW`
//! product, and its input is not kept for one.

use super::{unfilled, zeros, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output, recording, Saved, SavedBuf};
use crate::tensor::{Float, GradCell, Tensor};
use tuna_kernels::ops::elementwise::{BiasParams, ElementwiseKernel};
use tuna_kernels::ops::gelu::GeluKind;
pub use tuna_kernels::ops::matmul::{Activation, MatmulParams};

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`: PyTorch's `nn.Linear` (BERT, Llama).
    OutIn,
    /// `[in, out]`: GPT-2's `Conv1D`.
    InOut,
}

/// `alpha * op(a) op(b)` as `[m, n]`, the operands' buffers read as `p` says (their own shapes
/// only need the right element counts). Backward kinds: `matmul.dA`, `matmul.dB`.
pub fn matmul<B: Kernels<E>, E: Float>(a: &Tensor<B, E>, b: &Tensor<B, E>, p: MatmulParams) -> Result<Tensor<B, E>> {
    product(a, b, None, p, vec![p.m, p.n], ("matmul.dA", "matmul.dB"))
}

/// `x W^T (+ bias)` over the last dim of `x` (`[.., in] -> [.., out]`). Backward kinds:
/// `linear.dX` and `linear.dW` (and `add_bias.bwd_bias` for the bias).
///
/// The bias is part of the product's op, one op on the tape: the forward adds it after the product
/// (as `add_bias` did, the same bits), and the backward hands the output's gradient to `dX`/`dW`
/// as it is (no `dx += dy` copy) and sums its rows into the bias's. The bias's time is the
/// `matmul` op's in `tuna profile` (no `add_bias` op of its own).
pub fn linear<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    w: &Tensor<B, E>,
    layout: WeightLayout,
    bias: Option<&Tensor<B, E>>,
) -> Result<Tensor<B, E>> {
    let (p, shape) = linear_params(x, w, layout, bias)?;
    product(x, w, bias, p, shape, ("linear.dX", "linear.dW"))
}

/// The product's parameters and output shape for `linear(x, w, layout, bias)`, after its checks.
fn linear_params<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    w: &Tensor<B, E>,
    layout: WeightLayout,
    bias: Option<&Tensor<B, E>>,
) -> Result<(MatmulParams, Vec<usize>)> {
    let [r, c] = *w.shape() else {
        return Err(Error::Shape { op: "linear", what: "weight must be 2-D", left: w.shape().to_vec(), right: vec![] });
    };
    let (out, inp) = match layout {
        WeightLayout::OutIn => (r, c),
        WeightLayout::InOut => (c, r),
    };
    let k = *x.shape().last().unwrap_or(&0);
    if k != inp {
        return Err(Error::Shape {
            op: "linear",
            what: "x's last dim vs the weight's input dim",
            left: x.shape().to_vec(),
            right: w.shape().to_vec(),
        });
    }
    let m = x.numel() / inp.max(1);
    let p = MatmulParams { trans_b: layout == WeightLayout::OutIn, ..MatmulParams::new(m, out, inp) };
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("checked non-empty") = out;
    if let Some(b) = bias {
        if b.shape() != [out] {
            return Err(Error::Shape {
                op: "linear",
                what: "bias vs the weight's output dim",
                left: b.shape().to_vec(),
                right: w.shape().to_vec(),
            });
        }
    }
    Ok((p, shape))
}

/// `act(x W^T + bias)`: [`linear`] and the activation in one op on the fused kernel
/// (`matmul_epilogue_fwd`: on the CPU the GEMM and one pass adding the bias and applying GELU, the
/// same bits as `linear` then `gelu`; on CUDA a cuBLASLt epilogue, or its fallback). With
/// [`Activation::GeluTanh`] the op is `gelu(linear(x, w, layout, bias), GeluKind::Tanh)`, and while
/// recording it keeps the pre-activation for its backward (as the unfused pair keeps `gelu`'s
/// input); the backward is `d_pre = dy * gelu'(pre)` (the GELU backward kernel), then `linear`'s.
/// Profile kind `linear+gelu` (flops the product's); backward kinds `gelu.bwd`, `linear.dX`,
/// `linear.dW`, `add_bias.bwd_bias`, as the unfused pair. With [`Activation::None`] it is `linear`.
pub fn linear_act<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    w: &Tensor<B, E>,
    layout: WeightLayout,
    bias: Option<&Tensor<B, E>>,
    act: Activation,
) -> Result<Tensor<B, E>> {
    let (p, shape) = linear_params(x, w, layout, bias)?;
    if act == Activation::None {
        return product(x, w, bias, p, shape, ("linear.dX", "linear.dW"));
    }
    let kind = "linear+gelu";
    let dev = x.device();
    let mn = p.m * p.n;
    let mut inputs: Vec<&dyn crate::graph::Input> = vec![x, w];
    inputs.extend(bias.map(|t| t as &dyn crate::graph::Input));
    let mut y = unfilled::<B, E>(dev, mn)?;
    // The pre-activation only when a backward will read it.
    let mut aux = if recording(&inputs) { Some(unfilled::<B, E>(dev, mn)?) } else { None };
    {
        let bias_buf = bias.map(|t| t.buf());
        dev.matmul_epilogue_fwd(
            &p,
            act,
            &x.buf(),
            &w.buf(),
            bias_buf.as_deref(),
            B::buf_mut(&mut y),
            aux.as_mut().map(|a| B::buf_mut(a)),
        )?;
    }
    crate::stats::flops(kind, false, p.flops());
    Ok(output(kind, &inputs, dev, shape, y, |out, _| {
        let (cx, cw, dev) = (x.cell(), w.cell(), dev.clone());
        let cbias = bias.and_then(|t| t.cell());
        let x_s = cw.is_some().then(|| Saved::new(x));
        let w_s = cx.is_some().then(|| Saved::new(w));
        let pre = SavedBuf::new(aux.expect("recorded: the pre-activation was kept"), mn * std::mem::size_of::<E>());
        let bp = BiasParams::new(p.m, p.n);
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("gelu.bwd");
            let mut dpre = zeros::<B, E>(&*dev, mn)?;
            dev.gelu_bwd(GeluKind::Tanh, B::buf(pre.buf()), B::buf(&g), B::buf_mut(&mut dpre))?;
            drop((pre, g));
            let (xb, wb) = (x_s.as_ref().map(|s| s.t().buf()), w_s.as_ref().map(|s| s.t().buf()));
            if let Some(cx) = &cx {
                launched("linear.dX");
                crate::stats::flops(kind, true, p.flops());
                grad_a(&*dev, cx, &p, wb.as_deref(), B::buf(&dpre))?;
            }
            if let Some(cw) = &cw {
                launched("linear.dW");
                crate::stats::flops(kind, true, p.flops());
                cw.accumulate_acc(&dev, |dw| {
                    Ok(dev.matmul_bwd(&p, xb.as_deref(), None, B::buf(&dpre), None, Some(dw))?)
                })?;
            }
            if let Some(cbias) = &cbias {
                launched("add_bias.bwd_bias");
                cbias
                    .accumulate_acc(&dev, |db| Ok(ElementwiseKernel::<E>::bias_grad(&*dev, &bp, B::buf(&dpre), db)?))?;
            }
            Ok(())
        })
    }))
}

/// A product's `dA` (from `b` and `dc`) into `cell`: written straight into a gradient that has no
/// value yet (no zeroing, no read of it), else accumulated. A missing `b` is `matmul_bwd`'s error
/// naming it.
fn grad_a<B: Kernels<E>, E: Float>(
    dev: &B,
    cell: &GradCell<B, E>,
    p: &MatmulParams,
    b: Option<&B::Buf<E>>,
    dc: &B::Buf<E>,
) -> Result<()> {
    let write = |da: &mut B::Buf<E>| match b {
        Some(b) => Ok(dev.matmul_bwd_a_overwrite(p, b, dc, da)?),
        None => Ok(dev.matmul_bwd(p, None, None, dc, Some(da), None)?),
    };
    cell.write_or_accumulate(dev, write, |da| Ok(dev.matmul_bwd(p, None, b, dc, Some(da), None)?))
}

/// `op(a) op(b) (+ bias)`: `bias` (`[n]`, checked by the caller) is added to every row.
fn product<B: Kernels<E>, E: Float>(
    a: &Tensor<B, E>,
    b: &Tensor<B, E>,
    bias: Option<&Tensor<B, E>>,
    p: MatmulParams,
    shape: Vec<usize>,
    kinds: (&'static str, &'static str),
) -> Result<Tensor<B, E>> {
    if a.numel() != p.m * p.k || b.numel() != p.k * p.n {
        return Err(Error::Shape {
            op: "matmul",
            what: "operand sizes vs m*k and k*n",
            left: a.shape().to_vec(),
            right: b.shape().to_vec(),
        });
    }
    let dev = a.device();
    let bp = BiasParams::new(p.m, p.n);
    // written in full: the product does not accumulate (cuBLAS with beta 0 never reads it)
    let mut c = unfilled::<B, E>(dev, p.m * p.n)?;
    // The product, then the bias added in place (the order of the unfused ops, so the same bits
    // as add_bias gave; presetting the rows to the bias and accumulating onto them rounds
    // differently, which moves saved adapters' last bits).
    dev.matmul_fwd(&MatmulParams { accumulate: false, ..p }, &a.buf(), &b.buf(), B::buf_mut(&mut c))?;
    crate::stats::flops("matmul", false, p.flops());
    if let Some(bias) = bias {
        dev.add_bias_inplace(&bp, &bias.buf(), B::buf_mut(&mut c))?;
    }
    let mut inputs: Vec<&dyn crate::graph::Input> = vec![a, b];
    inputs.extend(bias.map(|t| t as &dyn crate::graph::Input));
    Ok(output("matmul", &inputs, dev, shape, c, |out, _| {
        let (ca, cb, dev) = (a.cell(), b.cell(), dev.clone());
        let cbias = bias.and_then(|t| t.cell());
        // dA needs B, dB needs A: keep only what a wanted gradient reads.
        let a_s = cb.is_some().then(|| Saved::new(a));
        let b_s = ca.is_some().then(|| Saved::new(b));
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            let (ab, bb) = (a_s.as_ref().map(|s| s.t().buf()), b_s.as_ref().map(|s| s.t().buf()));
            if let Some(ca) = &ca {
                launched(kinds.0);
                crate::stats::flops("matmul", true, p.flops());
                grad_a(&*dev, ca, &p, bb.as_deref(), B::buf(&g))?;
            }
            if let Some(cb) = &cb {
                launched(kinds.1);
                crate::stats::flops("matmul", true, p.flops());
                cb.accumulate_acc(&dev, |db| {
                    Ok(dev.matmul_bwd(&p, ab.as_deref(), None, B::buf(&g), None, Some(db))?)
                })?;
            }
            if let Some(cbias) = &cbias {
                launched("add_bias.bwd_bias");
                cbias.accumulate_acc(&dev, |db| Ok(ElementwiseKernel::<E>::bias_grad(&*dev, &bp, B::buf(&g), db)?))?;
            }
            Ok(())
        })
    }))
}
