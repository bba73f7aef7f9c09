//! Choosing a method: [`Method`] describes it, [`Method::apply`] installs it on a model.

use super::{Adaptable, EncoderKind, Houlsby, Lora, LoraConfig, PrefixKind, PrefixTuning, PromptEncoder, SoftPrompt};
use crate::error::{Error, Result};
use tuna_autograd::ops::Kernels;
use tuna_autograd::Float;

/// How a soft prompt or a prefix starts (PEFT's `prompt_tuning_init`, plus tuna's CLASS_LABELS).
/// A prompt copies the tokens' input embeddings; a prefix takes each layer's keys and values of
/// the tokens run through the frozen model (see `prefix_init`).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// N(0, 1), as PEFT's RANDOM (nn.Embedding's init); for the prefix MLP, its random init.
    Random,
    /// `n` tokens drawn uniformly from the vocabulary.
    SampleVocab,
    /// These tokens (a tokenized text), repeated or cut to `n`.
    Text(Vec<u32>),
    /// The label words' tokens, repeated or cut to `n`.
    ClassLabels(Vec<u32>),
}

/// An adaptation method and its hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Train base weights: all, or those whose name matches one of `patterns` (see
    /// [`full_finetune_predicate`]). Chosen when the model is loaded, not installed here.
    Full {
        patterns: Vec<String>,
    },
    Prompt {
        n: usize,
        init: PromptInit,
    },
    /// Prefix tuning; `projection: Some(h)` reparameterizes through an MLP of hidden size `h`.
    Prefix {
        n: usize,
        projection: Option<usize>,
        init: PromptInit,
    },
    /// P-tuning (PEFT's `P_TUNING`): a soft prompt of `n` vectors computed by a prompt encoder
    /// (`encoder`, hidden size `hidden`; `None`: the model's hidden size, PEFT's default) from `n`
    /// trainable embeddings.
    PTuning {
        n: usize,
        encoder: EncoderKind,
        hidden: Option<usize>,
    },
    /// P-tuning v2: deep prompts (a prefix at every layer), no reparameterization.
    PTuningV2 {
        n: usize,
        init: PromptInit,
    },
    Houlsby {
        bottleneck: usize,
    },
    Lora(LoraConfig),
}

impl Method {
    /// The positions the method puts before the content: `n` virtual tokens for prompt and prefix
    /// methods (PEFT's rule: the content then starts at position `n`), else 0.
    pub fn virtual_tokens(&self) -> usize {
        match self {
            Method::Prompt { n, .. }
            | Method::Prefix { n, .. }
            | Method::PTuning { n, .. }
            | Method::PTuningV2 { n, .. } => *n,
            _ => 0,
        }
    }

    /// The initialization of a prompt or prefix method (`None` for the others, P-tuning included:
    /// its embeddings start N(0, 1), as PEFT's).
    pub fn init_mut(&mut self) -> Option<&mut PromptInit> {
        match self {
            Method::Prompt { init, .. } | Method::Prefix { init, .. } | Method::PTuningV2 { init, .. } => Some(init),
            _ => None,
        }
    }

    /// A short name for tables and file names.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full { .. } => "full",
            Method::Prompt { .. } => "prompt",
            Method::Prefix { projection: None, .. } => "prefix",
            Method::Prefix { projection: Some(_), .. } => "prefix-mlp",
            Method::PTuning { .. } => "ptuning",
            Method::PTuningV2 { .. } => "ptuning-v2",
            Method::Houlsby { .. } => "houlsby",
            Method::Lora(_) => "lora",
        }
    }

    /// Install the method's new parameters on `model` (seeded). Full fine-tuning installs nothing.
    pub fn apply<B: Kernels<E>, E: Float, M: Adaptable<B, E>>(&self, model: &mut M, seed: u64) -> Result<()> {
        let s = model.shape();
        let dev = model.input_embeddings().device().clone();
        match self {
            Method::Full { .. } => {}
            Method::Prompt { n, init } => {
                if *n == 0 {
                    return Err(Error::InvalidArgument("prompt tuning needs at least one virtual token".into()));
                }
                let p = SoftPrompt::init(&dev, *n, init, model.input_embeddings(), seed)?;
                model.adapt_mut().prompt = Some(p);
            }
            Method::Prefix { n, projection, init } => {
                install_prefix(model, PrefixKind::Prefix, *n, *projection, init, seed)?;
            }
            Method::PTuning { n, encoder, hidden } => {
                // PEFT's encoder-decoder prompt encoder runs over 2n tokens and inserts the first n.
                let k = super::peft_load::submodules(&s);
                let e = PromptEncoder::new(&dev, *encoder, k * n, s.hidden, hidden.unwrap_or(s.hidden), seed)?;
                let p = SoftPrompt::encoded(e);
                model.adapt_mut().prompt = Some(if k > 1 { p.first(*n) } else { p });
            }
            Method::PTuningV2 { n, init } => install_prefix(model, PrefixKind::PTuningV2, *n, None, init, seed)?,
            Method::Houlsby { bottleneck } => {
                if *bottleneck == 0 {
                    return Err(Error::InvalidArgument("houlsby adapters need a bottleneck of at least 1".into()));
                }
                model.adapt_mut().houlsby = Some(Houlsby::new(&dev, s.blocks, s.hidden, *bottleneck, seed)?);
            }
            Method::Lora(cfg) => {
                let targets: Vec<_> = model.linears().into_iter().filter(|m| cfg.targets_module(&m.name)).collect();
                if targets.is_empty() {
                    let names: Vec<String> = model.linears().iter().take(8).map(|m| m.name.clone()).collect();
                    return Err(Error::InvalidArgument(format!(
                        "lora: no linear matches the targets {:?} (modules are named like {names:?})",
                        cfg.targets
                    )));
                }
                for (k, m) in targets.into_iter().enumerate() {
                    let l = Lora::new(&dev, &m.name, &m.weight, m.layout, cfg, seed.wrapping_add(k as u64 * 0x9e37))?;
                    model.adapt_mut().lora.insert(m.name, l);
                }
                model.adapt_mut().lora_config = Some(cfg.clone());
            }
        }
        Ok(())
    }
}

/// A new prefix on `model`: random (PEFT's init), or each layer's own keys and values of the
/// tokens `init` names, computed by the frozen model (any other adaptation set aside meanwhile).
fn install_prefix<B: Kernels<E>, E: Float, M: Adaptable<B, E>>(
    model: &mut M,
    kind: PrefixKind,
    n: usize,
    projection: Option<usize>,
    init: &PromptInit,
    seed: u64,
) -> Result<()> {
    let s = model.shape();
    let dev = model.input_embeddings().device().clone();
    let mut p = PrefixTuning::new(&dev, kind, n, (s.layers, s.kv_heads, s.head_dim), projection, seed)?;
    if let Some(ids) = super::prefix_init::init_tokens(init, n, s.vocab, seed)? {
        let saved = std::mem::take(model.adapt_mut());
        let kv = model.token_kv(&ids);
        *model.adapt_mut() = saved;
        p.start_from(&kv?)?;
    }
    model.adapt_mut().prefix = Some(p);
    Ok(())
}

/// Which base weights full fine-tuning trains: all when `patterns` is empty, otherwise those whose
/// name contains one of the patterns (`*` matches any run of characters).
pub fn full_finetune_predicate(patterns: &[String]) -> impl Fn(&str) -> bool + 'static {
    let patterns = patterns.to_vec();
    move |name: &str| patterns.is_empty() || patterns.iter().any(|p| glob_contains(p, name))
}

/// Whether `name` contains a match of `pat` (`*` = any run, including empty).
fn glob_contains(pat: &str, name: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    (0..=name.len()).filter(|&i| name.is_char_boundary(i)).any(|start| {
        let mut pos = start;
        for (k, part) in parts.iter().enumerate() {
            if k == 0 {
                if !name[pos..].starts_with(part) {
                    return false;
                }
                pos += part.len();
            } else {
                match name[pos..].find(part) {
                    Some(off) => pos += off + part.len(),
                    None => return false,
                }
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_finetune_patterns() {
        let all = full_finetune_predicate(&[]);
        assert!(all("anything"));
        let p = full_finetune_predicate(&["layers.1.*proj".into(), "norm".into()]);
        assert!(p("model.layers.1.self_attn.q_proj.weight"));
        assert!(!p("model.layers.0.self_attn.q_proj.weight"));
        assert!(p("model.norm.weight"));
        assert!(!p("model.embed_tokens.weight"));
    }
}
