//! `tuna generate`: text from a Llama-family model (a Hugging Face folder or a GGUF file).

use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_kernels::{Cpu, Cuda, Device};
use tuna_models::config::ModelConfig;
use tuna_models::generate::{generate, Sampling};
use tuna_models::gguf::GgufFile;
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
        let cfg = g.llama_config()?;
        let tok = Tok::Raw(g.build_tokenizer()?);
        (Box::new(g), cfg, tok)
    } else if s.model.is_dir() {
        let ck = HfCheckpoint::open(&s.model)?;
        let ModelConfig::Llama(cfg) = ck.config().clone() else {
            bail!(
                "--model {}: `tuna generate` runs Llama-family models so far (found {:?})",
                s.model.display(),
                ck.config()
            );
        };
        let tf = ck.tokenizer_file().with_context(|| format!("{}: no tokenizer.json", s.model.display()))?;
        let tok = Tok::Hf(tuna_models::tokenizer::Tokenizer::from_file(tf)?.without_padding_and_truncation());
        (Box::new(ck), cfg, tok)
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
    cfg: &tuna_models::config::LlamaConfig,
    ids: &[u32],
    s: &GenerateSettings,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    let model = Llama::<B, f32>::load(cfg, &mut Loader::frozen(src, dev))?;
    Ok(generate(&model, ids, s.max_new_tokens, &s.sampling, eos)?)
}
