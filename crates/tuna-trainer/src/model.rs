//! The model a run trains: GPT-2, Llama (Hugging Face folder or GGUF) or BERT, with its tokenizer,
//! the adaptation method installed, and the task heads (verbalizer rows or a classification head).

use crate::error::{Result, TrainError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tuna_autograd::ops::elem::{mean_pool, slice_cols};
use tuna_autograd::ops::embed::embedding;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::optim::OptimKernels;
use tuna_autograd::{Ints, Tensor};
use tuna_models::adapt::{full_finetune_predicate, Adapt, Adaptable, Method, ModelShape, PromptInit};
use tuna_models::bert::Bert;
use tuna_models::config::ModelConfig;
use tuna_models::gguf::GgufFile;
use tuna_models::gpt2::Gpt2;
use tuna_models::hf::HfCheckpoint;
use tuna_models::llama::{positions_from_mask, Llama};
use tuna_models::params::Loader;
use tuna_models::weights::WeightSource;

/// A batch's ids, mask and positions on the device.
type Inputs<B> = (Ints<B, u32>, Ints<B, u8>, Ints<B, u32>);

/// The backends a run can train on (the CPU, CUDA): every op and the optimizer kernels in f32.
pub trait Backend: OptimKernels<f32> {}
impl<B: OptimKernels<f32>> Backend for B {}

/// One of the supported architectures, in f32 on backend `B`.
pub enum Net<B: Backend> {
    Gpt2(Gpt2<B, f32>),
    Llama(Llama<B, f32>),
    Bert(Bert<B, f32>),
}

macro_rules! each {
    ($m:expr, $x:ident => $body:expr) => {
        match $m {
            Net::Gpt2($x) => $body,
            Net::Llama($x) => $body,
            Net::Bert($x) => $body,
        }
    };
}

/// A loaded model with its tokenizer and the base weights that train (full fine-tuning).
pub struct Model<B: Backend> {
    pub net: Net<B>,
    pub tokenizer: tokenizers::Tokenizer,
    /// Whether `encode` adds the tokenizer's special tokens (BERT's `[CLS]`/`[SEP]`; not for GGUF).
    pub add_special: bool,
    /// Base weights that train, by Hugging Face name (empty unless full fine-tuning).
    pub trainable_base: Vec<(String, Tensor<B, f32>)>,
    pub source: PathBuf,
    pub dev: Arc<B>,
}

impl<B: Backend> Model<B> {
    /// Load `path` (a Hugging Face folder or a Llama `.gguf`), training the base weights
    /// `method` says (full fine-tuning); the method itself is installed by [`Model::install`].
    pub fn open_for(dev: &Arc<B>, path: &Path, method: &Method) -> Result<Model<B>> {
        match method {
            Method::Full { patterns } => Model::open(dev, path, full_finetune_predicate(patterns)),
            _ => Model::open(dev, path, |_| false),
        }
    }

    /// Load `path` (a Hugging Face folder or a Llama `.gguf`) with its tokenizer; the base weights
    /// named as `trainable` says train. No adaptation is installed.
    pub fn open(dev: &Arc<B>, path: &Path, trainable: impl Fn(&str) -> bool + 'static) -> Result<Model<B>> {
        let dev = dev.clone();
        let (net, tokenizer, add_special, loaded) = if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(TrainError::Invalid(format!(
                    "--model {}: a file must be a .gguf; otherwise give a Hugging Face folder",
                    path.display()
                )));
            }
            let g = GgufFile::open(path)?;
            let cfg = g.llama_config()?;
            let tok = g.build_tokenizer()?;
            let mut l = Loader::with_trainable(&g as &dyn WeightSource, &dev, trainable);
            let net = Net::Llama(Llama::load(&cfg, &mut l)?);
            (net, tok, false, l.loaded)
        } else if path.is_dir() {
            let ck = HfCheckpoint::open(path)?;
            let tok = tuna_models::tokenizer::Tokenizer::from_file(path.join("tokenizer.json"))?
                .without_padding_and_truncation()
                .inner()
                .clone();
            let mut l = Loader::with_trainable(&ck as &dyn WeightSource, &dev, trainable);
            let net = match ck.config().clone() {
                ModelConfig::Gpt2(c) => Net::Gpt2(Gpt2::load(&c, &mut l)?),
                ModelConfig::Llama(c) => Net::Llama(Llama::load(&c, &mut l)?),
                ModelConfig::Bert(c) => Net::Bert(Bert::load(&c, &mut l)?),
            };
            (net, tok, true, l.loaded)
        } else {
            return Err(TrainError::Invalid(format!(
                "--model {}: no such file or folder (give a Hugging Face folder or a .gguf file; a hub id needs \
                 a model hub, which this machine cannot reach)",
                path.display()
            )));
        };
        let trainable_base = loaded.into_iter().filter(|(_, t)| t.requires_grad()).collect();
        Ok(Model { net, tokenizer, add_special, trainable_base, source: path.to_path_buf(), dev })
    }

    /// Install `method`'s new parameters (seeded). A TEXT or CLASS_LABELS prompt init given with
    /// no tokens takes them from `init_text`.
    pub fn install(&mut self, method: &Method, seed: u64, init_text: Option<&str>) -> Result<()> {
        let mut method = self.resolve(method)?;
        if let Method::Prompt { init: PromptInit::Text(ids) | PromptInit::ClassLabels(ids), .. } = &mut method {
            if ids.is_empty() {
                let text = init_text
                    .ok_or_else(|| TrainError::Invalid("the prompt init needs a text (--prompt-init-text)".into()))?;
                *ids = self.encode_plain(text)?;
            }
        }
        each!(&mut self.net, n => method.apply(n, seed))?;
        Ok(())
    }

    /// Install the adapter saved in `dir` (PEFT's format or tuna's), replacing any adaptation.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        Ok(each!(&mut self.net, n => tuna_models::adapt::peft::load(n, dir))?)
    }

    /// Save the adaptation into `dir` as a PEFT folder (`base_name` names the base model in it).
    pub fn save_adapter(&self, dir: &Path, base_name: &str) -> Result<()> {
        Ok(each!(&self.net, n => tuna_models::adapt::peft::save(n, dir, base_name))?)
    }

    /// `method` with LoRA's default targets filled in (the attention query and value projections,
    /// PEFT's defaults) when none were given.
    fn resolve(&self, method: &Method) -> Result<Method> {
        Ok(match method {
            Method::Lora(c) if c.targets.is_empty() => {
                let t: &[&str] = match self.net {
                    Net::Gpt2(_) => &["c_attn"],
                    Net::Llama(_) => &["q_proj", "v_proj"],
                    Net::Bert(_) => &["query", "value"],
                };
                Method::Lora(tuna_models::adapt::LoraConfig {
                    targets: t.iter().map(|s| s.to_string()).collect(),
                    ..c.clone()
                })
            }
            m => m.clone(),
        })
    }

    pub fn shape(&self) -> ModelShape {
        each!(&self.net, n => n.shape())
    }
    pub fn adapt(&self) -> &Adapt<B, f32> {
        each!(&self.net, n => n.adapt())
    }
    pub fn adapt_mut(&mut self) -> &mut Adapt<B, f32> {
        each!(&mut self.net, n => n.adapt_mut())
    }
    pub fn named_weights(&self) -> Vec<(String, Tensor<B, f32>)> {
        each!(&self.net, n => n.named_weights())
    }
    pub fn is_decoder(&self) -> bool {
        !matches!(self.net, Net::Bert(_))
    }

    /// The positions the model has (GPT-2's `n_positions`, `max_position_embeddings` otherwise:
    /// learned position tables end there, and Llama's RoPE was trained up to there).
    pub fn max_positions(&self) -> usize {
        match &self.net {
            Net::Gpt2(g) => g.cfg.n_positions,
            Net::Llama(l) => l.cfg.max_position_embeddings,
            Net::Bert(b) => b.cfg.max_position_embeddings,
        }
    }

    /// Positions the installed adaptation takes before the content (PEFT's rule: with `n` virtual
    /// tokens of a soft prompt or prefix, the content starts at position `n`).
    pub fn virtual_tokens(&self) -> usize {
        self.adapt().prompt_len() + self.adapt().prefix_len()
    }

    /// Every tensor the optimizer updates, by checkpoint name: trained base weights, then the
    /// adaptation's tensors (including a classification head in `adapt.extra`).
    pub fn trainable(&self) -> Vec<(String, Tensor<B, f32>)> {
        let mut v = self.trainable_base.clone();
        v.extend(self.adapt().params());
        v
    }

    /// Parameters of the base model (each tensor once).
    pub fn base_param_count(&self) -> usize {
        self.named_weights().iter().map(|(_, t)| t.numel()).sum()
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .tokenizer
            .encode(text, self.add_special)
            .map_err(|e| TrainError::Invalid(format!("tokenizer: {e}")))?;
        Ok(e.get_ids().to_vec())
    }

    /// The ids [`Model::encode`] gives `text`, of which the caller keeps the first `keep` (or with
    /// `from_end` the last `keep`), without tokenizing all of a long text. A window of about 16
    /// bytes per kept token is tokenized, cut at a whitespace, and doubled until it yields `keep`
    /// tokens and a margin. Tokenizers split words at whitespace, so the kept tokens are those of
    /// the whole text. A window never grows past [`MAX_WINDOW`] bytes: a text with no whitespace
    /// in that span, or whose tokens average more than that over `keep`, is cut there (at a
    /// character), which can change the tokens at the cut: only a text of that size is read.
    pub fn encode_window(&self, text: &str, keep: usize, from_end: bool) -> Result<Vec<u32>> {
        const MARGIN: usize = 16;
        let mut budget = (keep + MARGIN) * 16;
        while budget < text.len() {
            let last = budget >= MAX_WINDOW;
            let cut = if from_end { tail(text, budget) } else { head(text, budget) };
            match cut {
                Some(w) => {
                    let ids = self.encode(w)?;
                    if ids.len() >= keep + MARGIN || last {
                        return Ok(ids);
                    }
                }
                None if last => {
                    let w = if from_end { tail_chars(text, budget) } else { head_chars(text, budget) };
                    return self.encode(w);
                }
                None => {}
            }
            budget *= 2;
        }
        self.encode(text)
    }

    /// Token ids of `text` without special tokens (verbalizer words, prompt-init text).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tokenizer.encode(text, false).map_err(|e| TrainError::Invalid(format!("tokenizer: {e}")))?;
        Ok(e.get_ids().to_vec())
    }

    /// The id padding uses (masked out everywhere; the tokenizer's pad token where it has one).
    pub fn pad_id(&self) -> u32 {
        ["[PAD]", "<pad>", "<|endoftext|>", "</s>"].iter().find_map(|t| self.tokenizer.token_to_id(t)).unwrap_or(0)
    }

    /// Hugging Face's causal LM loss of `ids` (`[batch, seq]`, left-padded under `mask`) against
    /// `labels` (unshifted, -100 ignored), positions from the mask.
    pub fn lm_loss(&self, ids: &[u32], mask: &[u8], labels: &[i32], batch: usize) -> Result<Tensor<B, f32>> {
        let seq = ids.len() / batch.max(1);
        let (t, m, pos) = self.inputs(ids, mask, batch)?;
        Ok(match &self.net {
            Net::Gpt2(g) => g.loss_masked(&t, &pos, Some(&m), &Ints::new(&self.dev, &[batch, seq], labels)?)?,
            Net::Llama(l) => l.loss_with(&t, &pos, Some(&m), labels)?,
            Net::Bert(_) => {
                return Err(TrainError::Invalid(
                    "the lm and completion tasks need a decoder (GPT-2, Llama), not BERT".into(),
                ))
            }
        })
    }

    /// Class scores `[batch, classes]`: for decoders the head's logits of the verbalizer tokens at
    /// the last position (rows are left-padded); for BERT `head` (`classifier.weight` `[C, hidden]`
    /// and `classifier.bias`) over the mask-weighted mean of the last hidden states.
    pub fn class_scores(&self, ids: &[u32], mask: &[u8], batch: usize, verbalizer: &[u32]) -> Result<Tensor<B, f32>> {
        let (t, m, pos) = self.inputs(ids, mask, batch)?;
        let last = |h: Tensor<B, f32>| -> Result<Tensor<B, f32>> {
            let (s, hid) = (h.shape()[1], h.shape()[2]);
            Ok(slice_cols(&reshape(&h, &[batch, s * hid])?, (s - 1) * hid, hid)?)
        };
        let verb = |table: &Tensor<B, f32>, h: &Tensor<B, f32>| -> Result<Tensor<B, f32>> {
            let ids = Ints::new(&self.dev, &[1, verbalizer.len()], verbalizer)?;
            let rows = reshape(&embedding(table, &ids, None)?, &[verbalizer.len(), table.shape()[1]])?;
            Ok(linear(h, &rows, WeightLayout::OutIn, None)?)
        };
        match &self.net {
            Net::Gpt2(g) => {
                let (h, _) = g.hidden_prepared(&t, &pos, Some(&m), None)?;
                verb(&g.wte, &last(h)?)
            }
            Net::Llama(l) => {
                let (h, _) = l.hidden_states(&t, &pos, Some(&m), None)?;
                verb(&l.lm_head, &last(h)?)
            }
            Net::Bert(b) => {
                let (h, m) = b.encode(&t, &m)?;
                let pooled = mean_pool(&h, &m)?;
                let find = |n: &str| b.adapt.extra.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
                let (Some(w), Some(bias)) = (find("classifier.weight"), find("classifier.bias")) else {
                    return Err(TrainError::Invalid(
                        "BERT classification needs its head (classifier.weight/bias)".into(),
                    ));
                };
                Ok(linear(&pooled, &w, WeightLayout::OutIn, Some(&bias))?)
            }
        }
    }

    /// Add a trainable classification head for BERT (`[classes, hidden]`, small seeded init).
    pub fn add_head(&mut self, classes: usize, seed: u64) -> Result<()> {
        let hidden = self.shape().hidden;
        let mut rng = tuna_kernels::rng::SplitMix64::new(seed ^ 0x4ead);
        let bound = 1.0 / (hidden as f64).sqrt();
        let w: Vec<f32> = (0..classes * hidden).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let w = Tensor::param(&self.dev, "classifier.weight", &[classes, hidden], &w)?;
        let b = Tensor::param(&self.dev, "classifier.bias", &[classes], &vec![0.0; classes])?;
        let extra = &mut self.adapt_mut().extra;
        extra.retain(|(n, _)| !n.starts_with("classifier."));
        extra.push(("classifier.weight".into(), w));
        extra.push(("classifier.bias".into(), b));
        Ok(())
    }

    fn inputs(&self, ids: &[u32], mask: &[u8], batch: usize) -> Result<Inputs<B>> {
        let seq = ids.len() / batch.max(1);
        let t = Ints::new(&self.dev, &[batch, seq], ids)?;
        let m = Ints::new(&self.dev, &[batch, seq], mask)?;
        let pos = match self.net {
            // BERT takes positions 0..seq itself (right padding).
            Net::Bert(_) => tuna_models::llama::positions(batch, seq, 0),
            _ => positions_from_mask(mask, batch, seq),
        };
        Ok((t, m, Ints::new(&self.dev, &[batch, seq], &pos)?))
    }
}

/// The most bytes of one example [`Model::encode_window`] tokenizes.
pub const MAX_WINDOW: usize = 1 << 20;

/// The first `bytes` bytes of `text` (fewer, to end at a character).
fn head_chars(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last `bytes` bytes of `text` (fewer, to start at a character).
fn tail_chars(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The start of `text` up to its last whitespace within the first `bytes` bytes (exclusive);
/// `None` when there is none.
fn head(text: &str, bytes: usize) -> Option<&str> {
    let w = head_chars(text, bytes);
    w.char_indices().rev().find(|(_, c)| c.is_whitespace()).map(|(i, _)| &text[..i]).filter(|h| !h.is_empty())
}

/// The end of `text` from its first whitespace within the last `bytes` bytes (inclusive); `None`
/// when there is none.
fn tail(text: &str, bytes: usize) -> Option<&str> {
    let w = tail_chars(text, bytes);
    w.char_indices().find(|(_, c)| c.is_whitespace()).map(|(i, _)| &w[i..])
}

#[cfg(test)]
mod tests {
    use super::{head, head_chars, tail, tail_chars};

    #[test]
    fn windows_cut_at_whitespace_and_character_boundaries() {
        assert_eq!(head("one two three", 9), Some("one two"));
        assert_eq!(tail("one two three", 9), Some(" three"));
        assert_eq!(head("abcdef", 3), None);
        assert_eq!(tail("abcdef", 3), None);
        assert_eq!(head_chars("abcdef", 3), "abc");
        assert_eq!(tail_chars("abcdef", 3), "def");
        // Never inside a multi-byte character.
        assert_eq!(head_chars("ééé", 3), "é");
        assert_eq!(tail_chars("ééé", 3), "é");
    }
}
