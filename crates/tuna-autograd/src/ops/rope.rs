//! Rotary position embedding (Hugging Face's `rotate_half`), by per-token positions.

use super::{unfilled, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output};
use crate::ints::Ints;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::rope::RopeParams;

/// Rotate `x` (`[batch, seq, heads, head_dim]`) by the angles of positions `pos` (`[batch, seq]`)
/// with base `theta`.
pub fn rope<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, pos: &Ints<B, u32>, theta: f32) -> Result<Tensor<B, E>> {
    let [b, t, h, d] = *x.shape() else {
        return Err(Error::Shape {
            op: "rope",
            what: "x must be [batch, seq, heads, head_dim]",
            left: x.shape().to_vec(),
            right: vec![],
        });
    };
    if pos.shape() != [b, t] {
        return Err(Error::Shape {
            op: "rope",
            what: "positions vs x's [batch, seq]",
            left: pos.shape().to_vec(),
            right: vec![b, t],
        });
    }
    let p = RopeParams::new(b, t, h, d, theta);
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    dev.rope_fwd(&p, pos.buf(), &x.buf(), B::buf_mut(&mut y))?;
    Ok(output("rope", &[x], dev, x.shape().to_vec(), y, |out, _| {
        // The backward is the inverse rotation of dy: it needs the positions, not x.
        let (pos, cx, dev) = (pos.clone(), x.cell().expect("recorded"), dev.clone());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("rope.bwd");
            cx.accumulate(&dev, |dx| Ok(dev.rope_bwd(&p, pos.buf(), B::buf(&g), dx)?))
        })
    }))
}
