//! Llama in GGUF: llama.cpp tensor names to Hugging Face names, the Q/K row un-permutation, and
//! `LlamaConfig` from `llama.*` metadata.

use super::GgufFile;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// Which of the llama.cpp-permuted projections a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permuted {
    Q,
    K,
}

/// The Hugging Face name of a llama.cpp llama tensor name, and whether its rows were permuted by
/// the converter. `None` for names outside the llama layout.
pub fn hf_name(gguf: &str) -> Option<(String, Option<Permuted>)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((f.to_string(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (hf, perm) = match part {
        "attn_q" => ("self_attn.q_proj", Some(Permuted::Q)),
        "attn_k" => ("self_attn.k_proj", Some(Permuted::K)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), perm))
}

/// Undo llama.cpp's Q/K row interleaving in place of a row-major `[rows, cols]` matrix:
/// `w.reshape(heads, rows/heads/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`. Within each
/// head, stored row `2i + j` becomes row `j * half + i`. Rows move whole, so this serves f32
/// values and the bytes of quantized rows (`cols` = bytes per row) alike.
pub fn unpermute_rows<T: Copy + Default>(w: &[T], rows: usize, cols: usize, heads: usize) -> Result<Vec<T>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) || w.len() != rows * cols {
        return Err(format!("cannot un-permute {rows}x{cols} (len {}) over {heads} heads", w.len()));
    }
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_rows + 2 * i + j) * cols;
                let dst = (h * head_rows + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Ok(out)
}

impl GgufFile {
    /// `general.architecture`, if present.
    pub fn architecture(&self) -> Option<&str> {
        self.meta("general.architecture").and_then(|v| v.as_str())
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| {
                    self.format_err(format!("metadata `{key}` is {v:?}, expected a non-negative integer"))
                })
            }
        }
    }

    fn need_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?.ok_or_else(|| self.format_err(format!("missing metadata `{key}`")))
    }

    fn meta_f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.meta(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| self.format_err(format!("metadata `{key}` is {v:?}, expected a number")))
            }
        }
    }

    /// The Llama configuration from `llama.*` metadata; other architectures are `Unsupported`.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        match self.architecture() {
            Some("llama") => {}
            other => {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    what: format!("GGUF architecture {other:?} (tuna reads \"llama\" from GGUF)"),
                })
            }
        }
        let heads = self.need_usize("llama.attention.head_count")?;
        let hidden = self.need_usize("llama.embedding_length")?;
        if heads == 0 || hidden == 0 {
            return Err(self.format_err(format!("llama: {heads} heads, hidden size {hidden}")));
        }
        let vocab = match self.meta_usize("llama.vocab_size")? {
            Some(v) => v,
            None => {
                self.meta("tokenizer.ggml.tokens").and_then(|t| t.as_array()).map(|a| a.len()).ok_or_else(|| {
                    self.format_err(
                        "neither `llama.vocab_size` nor `tokenizer.ggml.tokens` gives the vocabulary".into(),
                    )
                })?
            }
        };
        // A RoPE scaling (linear, YaRN, Llama 3's) is a computation tuna does not implement.
        if let Some(t) = self.meta("llama.rope.scaling.type").and_then(|t| t.as_str()).filter(|&t| t != "none") {
            return Err(self.format_err(format!("`llama.rope.scaling.type` {t:?} is not supported by tuna")));
        }
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.need_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.need_usize("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(self.meta_usize("llama.attention.head_count_kv")?.unwrap_or(heads)),
            rms_norm_eps: self.meta_f64("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: self.meta_f64("llama.rope.freq_base", 1e4)?,
            tie_word_embeddings: !self.tensors.iter().any(|t| t.name == "output.weight"),
            max_position_embeddings: self.meta_usize("llama.context_length")?.unwrap_or(2048),
            // Only when it differs from hidden / heads, as Hugging Face configs write it.
            head_dim: self.meta_usize("llama.attention.key_length")?.filter(|&k| Some(k) != hidden.checked_div(heads)),
        };
        crate::config::ModelConfig::Llama(cfg.clone()).check_dims().map_err(|e| self.format_err(e))?;
        Ok(cfg)
    }

    /// Heads to un-permute `which` over: query heads for Q, KV heads for K.
    pub(super) fn permute_heads(&self, which: Permuted) -> Result<usize> {
        let q = self.need_usize("llama.attention.head_count")?;
        Ok(match which {
            Permuted::Q => q,
            Permuted::K => self.meta_usize("llama.attention.head_count_kv")?.unwrap_or(q),
        })
    }
}
