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
    let out = match &m.net {
        Net::Llama(l) => generate(l, &ids, s.max_new_tokens, &s.sampling, eos)?,
        Net::Gpt2(g) => {
            // Learned positions end at n_positions (past the virtual tokens of a prompt or prefix):
            // the last new token is never fed back.
            let virt = g.adapt.prompt_len() + g.adapt.prefix_len();
            if virt + ids.len() + s.max_new_tokens > g.cfg.n_positions + 1 {
                bail!(
                    "{}: a {}-token prompt plus {} new tokens exceeds GPT-2's {} positions (n_positions)",
                    s.model.display(),
                    virt + ids.len(),
                    s.max_new_tokens,
                    g.cfg.n_positions
                );
            }
            generate(g, &ids, s.max_new_tokens, &s.sampling, eos)?
        }
        Net::Bert(_) => {
            bail!("--model {}: `tuna generate` runs decoders (Llama family, GPT-2), not BERT", s.model.display())
        }
    };
    tok.decode(&out, true).map_err(|e| anyhow!("tokenizer: {e}"))
}
