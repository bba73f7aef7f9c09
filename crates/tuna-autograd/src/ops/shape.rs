//! Shape ops that move no data.

use super::Kernels;
use crate::error::{Error, Result};
use crate::graph::{launched, output_shared};
use crate::tensor::{numel, Float, Tensor};

/// The same data under another shape (same element count). Shares the storage; its gradient
/// flows back unchanged.
pub fn reshape<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, shape: &[usize]) -> Result<Tensor<B, E>> {
    if numel(shape) != x.numel() {
        return Err(Error::Shape {
            op: "reshape",
            what: "element counts differ",
            left: x.shape().to_vec(),
            right: shape.to_vec(),
        });
    }
    Ok(output_shared("reshape", x, shape.to_vec(), |out| {
        let (cx, dev) = (x.cell().expect("recorded"), x.device().clone());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("reshape.bwd");
            // The gradient buffer moves to the input when it has none yet (the usual case).
            cx.add_owned(&dev, g)
        })
    }))
}
