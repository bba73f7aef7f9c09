//! `tuna generate`: text from a decoder: a Llama-family model (a Hugging Face folder or a GGUF
//! file) or GPT-2 (a Hugging Face folder), picked by the folder's `config.json`.

use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_kernels::{Cpu, Cuda, Device};
use tuna_models::generate::Sampling;
use tuna_models::model::{AnyModel, BasePrecision};

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
    /// `--base-precision` as given; `None`: what the adapter's `tuna_task.json` records as
    /// trained on (f32 when none does, or without an adapter).
    pub base_precision: Option<BasePrecision>,
}

/// Run `tuna generate`; returns the generated text. The base is held in the precision the adapter
/// trained on unless `--base-precision` says otherwise (then a `note:` on stderr), as `tuna eval`
/// does ([`crate::cli::BaseChoice`]).
pub fn run(s: &GenerateSettings) -> Result<String> {
    let base = match &s.adapter {
        Some(dir) => {
            crate::cli::BaseChoice::new(s.base_precision, tuna_trainer::TaskFile::read(dir)?.as_ref(), dir, true)?
        }
        None => crate::cli::BaseChoice::new(s.base_precision, None, &s.model, false)?,
    };
    if let Some(n) = base.note() {
        eprintln!("{n}");
    }
    match s.device {
        Device::Cpu => run_on(&Arc::new(Cpu), s, &base),
        Device::Cuda(n) => run_on(&Arc::new(Cuda::new(n)?), s, &base),
    }
}

fn run_on<B: Kernels<f32>>(dev: &Arc<B>, s: &GenerateSettings, base: &crate::cli::BaseChoice) -> Result<String> {
    // The same opening as training: a Hugging Face folder or a .gguf, with its tokenizer.
    let m = AnyModel::<B, f32>::open_adapted_with(dev, &s.model, s.adapter.as_deref(), base.precision)
        .map_err(|e| base.explain(e, "generates"))?;
    let prompt = if s.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", s.prompt)
    } else {
        s.prompt.clone()
    };
    let ids = m.encode(&prompt)?;
    let out = m.generate(&ids, s.max_new_tokens, &s.sampling)?;
    m.tokenizer.decode(&out, true).map_err(|e| anyhow!("tokenizer: {e}"))
}
