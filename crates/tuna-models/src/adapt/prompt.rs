//! Prompt tuning: `n` trainable virtual-token embeddings inserted before each row's content; and
//! P-tuning, whose inserted vectors are a prompt encoder's output (see [`super::ptuning`]).

use super::ptuning::{EncoderSpec, PromptEncoder};
use super::{normal, param, PromptInit};
use crate::error::{Error, Result};
use std::sync::Arc;
use tuna_autograd::ops::elem::slice_cols;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;

/// Where a soft prompt's vectors come from.
pub enum PromptParams<B: Kernels<E>, E: Float> {
    /// The vectors `[n, hidden]` themselves, trained directly (prompt tuning, or a P-tuning adapter
    /// loaded from PEFT's format, which holds the encoder's output only).
    Direct(Tensor<B, E>),
    /// P-tuning's prompt encoder, which computes them in every forward.
    Encoder(PromptEncoder<B, E>),
}

/// A soft prompt of `n` vectors `[n, hidden]`.
pub struct SoftPrompt<B: Kernels<E>, E: Float> {
    pub params: PromptParams<B, E>,
    /// P-tuning's encoder settings (`None`: prompt tuning); saved as a `P_TUNING` adapter.
    pub ptuning: Option<EncoderSpec>,
    /// The rows inserted, when fewer than the encoder computes (`None`: all). PEFT's prompt
    /// encoder for an encoder-decoder computes `2n` vectors and its forward inserts the first `n`.
    pub used: Option<usize>,
}

impl<B: Kernels<E>, E: Float> SoftPrompt<B, E> {
    /// A prompt-tuning prompt of these vectors.
    pub fn direct(vectors: Tensor<B, E>) -> Self {
        SoftPrompt { params: PromptParams::Direct(vectors), ptuning: None, used: None }
    }

    /// A P-tuning prompt computed by `encoder`.
    pub fn encoded(encoder: PromptEncoder<B, E>) -> Self {
        let spec = encoder.spec();
        SoftPrompt { params: PromptParams::Encoder(encoder), ptuning: Some(spec), used: None }
    }

    /// Only the first `n` of the vectors inserted (see [`SoftPrompt::used`]).
    pub fn first(self, n: usize) -> Self {
        SoftPrompt { used: Some(n), ..self }
    }

    /// The vectors inserted.
    pub fn len(&self) -> usize {
        self.used.unwrap_or_else(|| self.rows())
    }

    /// The vectors computed (those saved).
    pub fn rows(&self) -> usize {
        match &self.params {
            PromptParams::Direct(v) => v.shape()[0],
            PromptParams::Encoder(e) => e.len(),
        }
    }

    /// The vectors inserted, `[len, hidden]` (through the encoder, recorded, when there is one).
    pub fn vectors(&self) -> Result<Tensor<B, E>> {
        let all = self.all_vectors()?;
        match self.used {
            Some(n) if n < self.rows() => {
                let (rows, h) = (all.shape()[0], all.shape()[1]);
                let flat = reshape(&all, &[1, rows * h])?;
                Ok(reshape(&slice_cols(&flat, 0, n * h)?, &[n, h])?)
            }
            _ => Ok(all),
        }
    }

    /// Every vector computed, `[rows, hidden]` (what PEFT saves).
    pub fn all_vectors(&self) -> Result<Tensor<B, E>> {
        match &self.params {
            PromptParams::Direct(v) => Ok(v.clone()),
            PromptParams::Encoder(e) => e.forward(),
        }
    }

    /// Trainable tensors by checkpoint name: `prompt_embeddings`, or the encoder's (PEFT's names).
    pub fn params(&self) -> Vec<(String, Tensor<B, E>)> {
        match &self.params {
            PromptParams::Direct(v) => vec![("prompt_embeddings".to_string(), v.clone())],
            PromptParams::Encoder(e) => e.params(),
        }
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
        Ok(SoftPrompt::direct(param(dev, "prompt_embeddings", &[n, hidden], &v)?))
    }
}
