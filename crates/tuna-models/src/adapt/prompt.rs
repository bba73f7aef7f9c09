//! Prompt tuning: `n` trainable virtual-token embeddings inserted before each row's content.

use super::{normal, param, PromptInit};
use crate::error::{Error, Result};
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;

/// A soft prompt: `vectors` `[n, hidden]`.
pub struct SoftPrompt<B: Kernels<E>, E: Float> {
    pub vectors: Tensor<B, E>,
}

impl<B: Kernels<E>, E: Float> SoftPrompt<B, E> {
    pub fn len(&self) -> usize {
        self.vectors.shape()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` vectors initialized as `init` says, from the model's input embedding table
    /// (`[vocab, hidden]`, read to the host once).
    pub fn init(dev: &Arc<B>, n: usize, init: &PromptInit, table: &Tensor<B, E>, seed: u64) -> Result<Self> {
        let &[vocab, hidden] = table.shape() else {
            return Err(Error::InvalidArgument(format!("embedding table must be 2-D, got {:?}", table.shape())));
        };
        let mut rng = SplitMix64::new(seed);
        let rows_of = |ids: &[u32], what: &str| -> Result<Vec<f32>> {
            if ids.is_empty() {
                return Err(Error::InvalidArgument(format!("prompt init {what}: no tokens to initialize from")));
            }
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(Error::InvalidArgument(format!("prompt init {what}: token {bad} >= vocab {vocab}")));
            }
            let t = table.to_vec()?;
            // Repeated or cut to n, as PEFT does for TEXT.
            Ok((0..n)
                .flat_map(|i| {
                    let r = ids[i % ids.len()] as usize;
                    t[r * hidden..(r + 1) * hidden].iter().map(|&x| tuna_kernels::Elem::to_f32(x)).collect::<Vec<_>>()
                })
                .collect())
        };
        let v = match init {
            // PEFT's RANDOM: nn.Embedding's default N(0, 1).
            PromptInit::Random => normal(&mut rng, n * hidden, 1.0),
            PromptInit::SampleVocab => {
                let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
                rows_of(&ids, "SAMPLE_VOCAB")?
            }
            PromptInit::Text(ids) => rows_of(ids, "TEXT")?,
            PromptInit::ClassLabels(ids) => rows_of(ids, "CLASS_LABELS")?,
        };
        Ok(SoftPrompt { vectors: param(dev, "prompt_embeddings", &[n, hidden], &v)? })
    }
}
