//! `tuna generate`: text from a decoder: a Llama-family model (a Hugging Face folder or a GGUF
//! file) or GPT-2 (a Hugging Face folder), picked by the folder's `config.json`.

use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_kernels::{Cpu, Cuda, Device};
use tuna_models::config::{Gpt2Config, LlamaConfig, ModelConfig};
use tuna_models::generate::{generate, CausalLm, Sampling};
use tuna_models::gguf::GgufFile;
use tuna_models::gpt2::Gpt2;
use tuna_models::hf::HfCheckpoint;
use tuna_models::llama::Llama;
use tuna_models::params::Loader;
use tuna_models::weights::WeightSource;

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

/// The decoders `tuna generate` runs, with their configurations.
enum Arch {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

/// Text tokenization for either source.
enum Tok {
    Hf(tuna_models::tokenizer::Tokenizer),
    Raw(tokenizers::Tokenizer),
}

impl Tok {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match self {
            Tok::Hf(t) => t.encode(text, true)?,
            Tok::Raw(t) => t.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec(),
        })
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(match self {
            Tok::Hf(t) => t.decode(ids, true)?,
            Tok::Raw(t) => t.decode(ids, true).map_err(|e| anyhow!("tokenizer: {e}"))?,
        })
    }
    fn id(&self, token: &str) -> Option<u32> {
        match self {
            Tok::Hf(t) => t.token_to_id(token),
            Tok::Raw(t) => t.token_to_id(token),
        }
    }
}

/// Run `tuna generate`; returns the generated text.
pub fn run(s: &GenerateSettings) -> Result<String> {
    let (src, cfg, tok): (Box<dyn WeightSource>, _, _) = if s.model.is_file() {
        if s.model.extension().and_then(|e| e.to_str()) != Some("gguf") {
            bail!("--model {}: a file must be a .gguf; otherwise give a Hugging Face folder", s.model.display());
        }
        let g = GgufFile::open(&s.model)?;
        let cfg = Arch::Llama(g.llama_config()?);
        let tok = Tok::Raw(g.build_tokenizer()?);
        (Box::new(g), cfg, tok)
    } else if s.model.is_dir() {
        let ck = HfCheckpoint::open(&s.model)?;
        let cfg = match ck.config().clone() {
            ModelConfig::Llama(c) => Arch::Llama(c),
            ModelConfig::Gpt2(c) => Arch::Gpt2(c),
            other => bail!(
                "--model {}: `tuna generate` runs decoders (Llama family, GPT-2), not {other:?}",
                s.model.display()
            ),
        };
        let tf = ck.tokenizer_file().with_context(|| format!("{}: no tokenizer.json", s.model.display()))?;
        let tok = Tok::Hf(tuna_models::tokenizer::Tokenizer::from_file(tf)?.without_padding_and_truncation());
        (Box::new(ck), cfg, tok)
    } else if !s.model.exists() {
        bail!("--model {}: no such file or folder", s.model.display());
    } else {
        bail!(
            "--model {}: not a folder or a .gguf file (hub ids need a model hub, which this machine cannot reach)",
            s.model.display()
        );
    };
    let prompt = if s.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", s.prompt)
    } else {
        s.prompt.clone()
    };
    let ids = tok.encode(&prompt)?;
    let eos = tok.id("<|im_end|>").or_else(|| tok.id("</s>")).or_else(|| tok.id("<|endoftext|>"));
    let out = match s.device {
        Device::Cpu => run_on(&Arc::new(Cpu), &*src, &cfg, &ids, s, eos)?,
        Device::Cuda(n) => run_on(&Arc::new(Cuda::new(n)?), &*src, &cfg, &ids, s, eos)?,
    };
    tok.decode(&out)
}

fn run_on<B: Kernels<f32>>(
    dev: &Arc<B>,
    src: &dyn WeightSource,
    arch: &Arch,
    ids: &[u32],
    s: &GenerateSettings,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    let mut loader = Loader::frozen(src, dev);
    let model: Box<dyn CausalLm<B, f32>> = match arch {
        Arch::Llama(cfg) => {
            let mut m = Llama::<B, f32>::load(cfg, &mut loader)?;
            if let Some(a) = &s.adapter {
                tuna_models::adapt::peft::load(&mut m, a)?;
            }
            Box::new(m)
        }
        Arch::Gpt2(cfg) => {
            // Learned positions end at n_positions: the last new token is never fed back.
            if ids.len() + s.max_new_tokens > cfg.n_positions + 1 {
                bail!(
                    "{}: a {}-token prompt plus {} new tokens exceeds GPT-2's {} positions (n_positions)",
                    s.model.display(),
                    ids.len(),
                    s.max_new_tokens,
                    cfg.n_positions
                );
            }
            let mut m = Gpt2::<B, f32>::load(cfg, &mut loader)?;
            if let Some(a) = &s.adapter {
                tuna_models::adapt::peft::load(&mut m, a)?;
            }
            Box::new(m)
        }
    };
    Ok(generate(&*model, ids, s.max_new_tokens, &s.sampling, eos)?)
}
