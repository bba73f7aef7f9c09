//! Model configurations: the fields tuna uses from Hugging Face `config.json` (and from GGUF
//! metadata), one struct per architecture.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// GPT-2 (`model_type: "gpt2"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Context length (learned positions).
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; `None` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "eps_1e5")]
    pub layer_norm_epsilon: f64,
}

/// Llama (`model_type: "llama"`), e.g. SmolLM2.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// GQA: fewer key/value heads; `None` means as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "eps_1e6")]
    pub rms_norm_eps: f64,
    #[serde(default = "theta_1e4")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    /// Explicit head dim (some configs); `None` means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
}

/// BERT (`model_type: "bert"`), e.g. all-MiniLM-L6-v2.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "eps_1e12")]
    pub layer_norm_eps: f64,
}

fn eps_1e5() -> f64 {
    1e-5
}
fn eps_1e6() -> f64 {
    1e-6
}
fn eps_1e12() -> f64 {
    1e-12
}
fn theta_1e4() -> f64 {
    1e4
}
fn max_pos() -> usize {
    2048
}
fn type_vocab() -> usize {
    2
}

impl Gpt2Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// One of the architectures tuna runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
    Bert(BertConfig),
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json` text; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let fmt = |msg: String| Error::Format { path: path.to_path_buf(), msg };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| fmt(format!("invalid JSON: {e}")))?;
        let ty = v.get("model_type").and_then(|t| t.as_str()).ok_or_else(|| fmt("no `model_type`".into()))?;
        let parse_err = |e: serde_json::Error| fmt(format!("{ty} config: {e}"));
        Ok(match ty {
            "gpt2" => ModelConfig::Gpt2(serde_json::from_value(v.clone()).map_err(parse_err)?),
            "llama" => {
                // transformers 5 writes `rope_parameters: {rope_theta, ...}` instead of a top-level
                // `rope_theta`; accept both.
                let mut v = v.clone();
                if v.get("rope_theta").is_none() {
                    if let Some(t) = v.get("rope_parameters").and_then(|r| r.get("rope_theta")).cloned() {
                        v["rope_theta"] = t;
                    }
                }
                ModelConfig::Llama(serde_json::from_value(v).map_err(parse_err)?)
            }
            "bert" => ModelConfig::Bert(serde_json::from_value(v.clone()).map_err(parse_err)?),
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("architecture `model_type: {other}` (tuna runs gpt2, llama, bert)"),
                })
            }
        })
    }

    /// Read and parse `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        Self::from_json(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_architecture_and_rejects_others() {
        let p = Path::new("config.json");
        let g = ModelConfig::from_json(
            r#"{"model_type":"gpt2","vocab_size":50257,"n_positions":1024,"n_embd":768,"n_layer":12,"n_head":12}"#,
            p,
        )
        .unwrap();
        assert!(matches!(g, ModelConfig::Gpt2(ref c) if c.inner() == 3072 && c.layer_norm_epsilon == 1e-5));
        let l = ModelConfig::from_json(r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true}"#, p).unwrap();
        assert!(matches!(l, ModelConfig::Llama(ref c) if c.kv_heads() == 3 && c.head_dim() == 64));
        let l5 = ModelConfig::from_json(r#"{"model_type":"llama","vocab_size":96,"hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,"rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#, p).unwrap();
        assert!(matches!(l5, ModelConfig::Llama(ref c) if c.rope_theta == 1e5), "{l5:?}");
        let b = ModelConfig::from_json(r#"{"model_type":"bert","vocab_size":30522,"hidden_size":384,"num_hidden_layers":6,"num_attention_heads":12,"intermediate_size":1536,"max_position_embeddings":512}"#, p).unwrap();
        assert!(matches!(b, ModelConfig::Bert(ref c) if c.layer_norm_eps == 1e-12 && c.head_dim() == 32));
        let e = ModelConfig::from_json(r#"{"model_type":"t5"}"#, p).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("t5"), "{e}");
        let e = ModelConfig::from_json(r#"{"model_type":"gpt2","n_embd":768}"#, p).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        assert!(ModelConfig::from_json("{", p).unwrap_err().to_string().contains("invalid JSON"));
    }
}
