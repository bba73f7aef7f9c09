//! `tuna generate`: text from a decoder: a Llama-family model (a Hugging Face folder or a GGUF
//! file) or GPT-2 (a Hugging Face folder), picked by the folder's `config.json`.

use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::{Cpu, Cuda, Device};
use tuna_models::generate::{generate, Sampling};
use tuna_trainer::model::{Backend, Net};
use tuna_trainer::Model;

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

fn run_on<B: Backend>(dev: &Arc<B>, s: &GenerateSettings) -> Result<String> {
    // The same opening as training: a Hugging Face folder or a .gguf, with its tokenizer.
    let mut m = Model::open(dev, &s.model, |_| false)?;
    if let Some(a) = &s.adapter {
        m.load_adapter(a)?;
    }
    let prompt = if s.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", s.prompt)
    } else {
        s.prompt.clone()
    };
    let ids = m.encode(&prompt)?;
    let tok = &m.tokenizer;
    let eos =
        tok.token_to_id("<|im_end|>").or_else(|| tok.token_to_id("</s>")).or_else(|| tok.token_to_id("<|endoftext|>"));
    let not_a_decoder =
        || anyhow!("--model {}: `tuna generate` runs decoders (Llama family, GPT-2), not BERT", s.model.display());
    if !m.is_decoder() {
        return Err(not_a_decoder());
    }
    // Positions end at the model's limit (past the virtual tokens of a prompt or prefix); the last
    // new token is never fed back, so it may take the position after the last.
    let (virt, limit) = (m.virtual_tokens(), m.max_positions());
    if virt.saturating_add(ids.len()).saturating_add(s.max_new_tokens) > limit + 1 {
        let room = (limit + 1).saturating_sub(virt + ids.len());
        let fix = if room == 0 {
            "the prompt alone fills the context: shorten it".to_string()
        } else {
            format!("use --max-new-tokens {room} or less")
        };
        bail!(
            "{}: a {}-token prompt{} plus {} new tokens exceeds the model's {limit} positions: {fix}",
            s.model.display(),
            ids.len(),
            if virt > 0 { format!(" and {virt} virtual tokens") } else { String::new() },
            s.max_new_tokens,
        );
    }
    let out = match &m.net {
        Net::Llama(l) => generate(l, &ids, s.max_new_tokens, &s.sampling, eos)?,
        Net::Gpt2(g) => generate(g, &ids, s.max_new_tokens, &s.sampling, eos)?,
        Net::Bert(_) => return Err(not_a_decoder()),
    };
    tok.decode(&out, true).map_err(|e| anyhow!("tokenizer: {e}"))
}
