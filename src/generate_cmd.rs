//! `tuna generate`: text from a decoder: a Llama-family model (a Hugging Face folder or a GGUF
//! file) or GPT-2 (a Hugging Face folder), picked by the folder's `config.json`.

use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_kernels::{Cpu, Cuda, Device};
use tuna_models::generate::Sampling;
use tuna_models::model::AnyModel;

/// Validated settings of one `tuna generate` run.
pub struct GenerateSettings {
    pub model: PathBuf,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Wrap the prompt in the ChatML template (`<|im_start|>user ... assistant`).
    pub chat: bool,
    pub device: Device,
    /// An adapter folder (PEFT format or tuna's) applied to the model: soft prompts and prefixes
    /// go through the KV cache like the tokens.
    pub adapter: Option<PathBuf>,
}

/// Run `tuna generate`; returns the generated text.
pub fn run(s: &GenerateSettings) -> Result<String> {
    match s.device {
        Device::Cpu => run_on(&Arc::new(Cpu), s),
        Device::Cuda(n) => run_on(&Arc::new(Cuda::new(n)?), s),
    }
}

fn run_on<B: Kernels<f32>>(dev: &Arc<B>, s: &GenerateSettings) -> Result<String> {
    // The same opening as training: a Hugging Face folder or a .gguf, with its tokenizer.
    let m = AnyModel::<B, f32>::open_adapted(dev, &s.model, s.adapter.as_deref())?;
    let prompt = if s.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", s.prompt)
    } else {
        s.prompt.clone()
    };
    let ids = m.encode(&prompt)?;
    let out = m.generate(&ids, s.max_new_tokens, &s.sampling)?;
    m.tokenizer.decode(&out, true).map_err(|e| anyhow!("tokenizer: {e}"))
}
