//! Prompt tuning through the autograd crate alone: a frozen embedding table and a frozen linear
//! head classify sequences by their mean embedding; only a soft prompt (2 learned vectors put in
//! front of every row by the embedding op) trains, by AdamW, and the loss goes down. The tape
//! launches no weight-gradient kernel for the frozen head.
//!
//! Run: `cargo run --example prompt_tune`

use std::sync::Arc;
use tuna_autograd::ops::elem::mean_pool;
use tuna_autograd::ops::embed::{embedding, Prompt};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::optim::{AdamW, AdamWParams};
use tuna_autograd::{stats, Ints, Tensor};
use tuna_kernels::Cpu;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (vocab, hidden, classes, n_prompt, batch, seq) = (16, 8, 3, 2, 4, 5);
    let dev = Arc::new(Cpu);
    let fill = |n: usize, phase: f32| (0..n).map(|i| (i as f32 * 0.7 + phase).sin()).collect::<Vec<f32>>();
    // The frozen "pretrained" model: constants record nothing on the tape.
    let table = Tensor::<Cpu, f32>::constant(&dev, &[vocab, hidden], &fill(vocab * hidden, 0.1))?;
    let head = Tensor::constant(&dev, &[classes, hidden], &fill(classes * hidden, 1.3))?;
    // The only trainable tensor: the soft prompt, [n_prompt, hidden].
    let soft = Tensor::param(&dev, "soft_prompt", &[n_prompt, hidden], &vec![0.0; n_prompt * hidden])?;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % vocab) as u32).collect();
    let ids = Ints::new(&dev, &[batch, seq], &ids)?;
    let at = Ints::new(&dev, &[batch], &vec![0u32; batch])?; // the prompt goes first in each row
    let mask = Ints::new(&dev, &[batch, n_prompt + seq], &vec![1u8; batch * (n_prompt + seq)])?;
    let labels = Ints::new(&dev, &[batch], &[2i32, 2, 1, 2])?; // the task the prompt steers toward

    let mut opt = AdamW::new(&[&soft], AdamWParams::new(0.1))?;
    let mut losses = Vec::new();
    stats::reset();
    for step in 0..30 {
        let x = embedding(&table, &ids, Some(Prompt { vectors: &soft, at: &at }))?; // [b, n + s, h]
        let logits = linear(&mean_pool(&x, &mask)?, &head, WeightLayout::OutIn, None)?;
        let loss = cross_entropy(logits, &labels, -100)?;
        losses.push(loss.to_vec()?[0]);
        loss.backward()?;
        opt.step()?; // updates the prompt and zeroes its gradient
        if step % 5 == 0 {
            println!("step {step:>2}  loss {:.4}", losses[step]);
        }
    }
    let (first, last, dw) = (losses[0], losses[losses.len() - 1], stats::snapshot().launches("linear.dW"));
    println!("loss {first:.4} -> {last:.4}; weight-gradient kernels launched: {dw}");
    assert!(last < first * 0.8, "prompt tuning did not lower the loss: {first} -> {last}");
    assert_eq!(dw, 0, "the frozen head must cost no dW");
    Ok(())
}
