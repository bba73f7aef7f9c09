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

/// T5 (`model_type: "t5"`): the original T5 (ReLU feed-forward, head tied to the shared
/// embedding) and T5 v1.1 / flan-T5 (`feed_forward_proj: "gated-gelu"`, a head of its own).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head (`num_heads * d_kv` need not be `d_model`).
    pub d_kv: usize,
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Decoder layers; `None` means `num_layers`.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "buckets_32")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "max_distance_128")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps_1e6")]
    pub layer_norm_epsilon: f64,
    /// `"relu"` or `"gated-gelu"` (checked when parsed).
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
    /// Absent or true: the decoder output is scaled by `d_model^-0.5` before the head (original
    /// T5); false (v1.1 configs): not.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// transformers 5 writes this beside `tie_word_embeddings: true`; it wins when present.
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// The context tuna allows (T5's relative positions have no table; its tokenizers say 512).
    #[serde(default = "t5_positions")]
    pub n_positions: usize,
}

impl T5Config {
    /// Settings the relative positions and the special tokens need: at least 4 buckets (the
    /// encoder's two directions each need exact and logarithmic ones), a `max_distance` past the
    /// exact buckets (the logarithmic ones grow from there), and the start and pad tokens inside
    /// the vocabulary.
    pub fn check(&self) -> std::result::Result<(), String> {
        let (nb, maxd) = (self.relative_attention_num_buckets, self.relative_attention_max_distance);
        if nb < 4 {
            return Err(format!("`relative_attention_num_buckets` {nb}: T5's relative positions need at least 4"));
        }
        if maxd <= nb / 2 {
            return Err(format!(
                "`relative_attention_max_distance` {maxd} must exceed the {} exact-distance buckets \
                 (relative_attention_num_buckets / 2) for the logarithmic buckets to grow",
                nb / 2
            ));
        }
        for (key, id) in [("decoder_start_token_id", self.decoder_start_token_id), ("pad_token_id", self.pad_token_id)]
        {
            if let Some(id) = id.filter(|&i| i as usize >= self.vocab_size) {
                return Err(format!("`{key}` {id} is outside the vocabulary of {}", self.vocab_size));
            }
        }
        Ok(())
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Why PEFT's prefix tuning cannot express this model, if it cannot: a decoder deeper than
    /// the encoder (PEFT's table covers `num_layers` decoder layers), or heads whose width
    /// `num_heads * d_kv` is not `d_model` (PEFT sizes the prefix by `d_model`).
    pub fn prefix_refusal(&self) -> Option<String> {
        if self.decoder_layers() > self.num_layers {
            return Some(format!(
                "prefix tuning on T5 with more decoder layers ({}) than encoder layers ({}): PEFT's seq2seq prefix \
                 covers only num_layers decoder layers",
                self.decoder_layers(),
                self.num_layers
            ));
        }
        if self.num_heads * self.d_kv != self.d_model {
            return Some(format!(
                "prefix tuning on T5 with num_heads x d_kv ({} x {}) != d_model ({}): PEFT sizes the prefix by d_model \
                 and cannot express it",
                self.num_heads, self.d_kv, self.d_model
            ));
        }
        None
    }
    /// Whether the feed-forward is gated (`wi_0`, `wi_1`, GELU tanh) rather than ReLU (`wi`).
    pub fn gated(&self) -> bool {
        self.feed_forward_proj == "gated-gelu"
    }
    /// Whether the decoder output is scaled by `d_model^-0.5` before the head.
    pub fn scales_output(&self) -> bool {
        self.scale_decoder_outputs.unwrap_or(self.tie_word_embeddings != Some(false))
    }
    /// The token the decoder starts from (`decoder_start_token_id`, else the pad id, else 0).
    pub fn decoder_start(&self) -> u32 {
        self.decoder_start_token_id.or(self.pad_token_id).unwrap_or(0)
    }
}

fn buckets_32() -> usize {
    32
}
fn max_distance_128() -> usize {
    128
}
fn relu() -> String {
    "relu".into()
}
fn t5_positions() -> usize {
    512
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
    T5(T5Config),
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json` text; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let fmt = |msg: String| Error::Format { path: path.to_path_buf(), msg };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| fmt(format!("invalid JSON: {e}")))?;
        let ty = v.get("model_type").and_then(|t| t.as_str()).ok_or_else(|| fmt("no `model_type`".into()))?;
        let parse_err = |e: serde_json::Error| fmt(format!("{ty} config: {e}"));
        check_computation(&v, ty).map_err(fmt)?;
        let cfg = match ty {
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
            "t5" => ModelConfig::T5(serde_json::from_value(v.clone()).map_err(parse_err)?),
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("architecture `model_type: {other}` (tuna runs gpt2, llama, bert, t5)"),
                })
            }
        };
        cfg.check_dims().map_err(fmt)?;
        Ok(cfg)
    }

    /// Dimensions a model can be built from: no zero sizes, heads that divide the width (unless
    /// Llama gives its head dim), key/value heads that divide the query heads.
    pub fn check_dims(&self) -> std::result::Result<(), String> {
        let (sizes, heads, kv, width, explicit_head_dim): (Vec<(&str, usize)>, usize, usize, usize, bool) = match self {
            ModelConfig::Gpt2(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("n_positions", c.n_positions),
                    ("n_layer", c.n_layer),
                    ("n_embd", c.n_embd),
                    ("n_head", c.n_head),
                ],
                c.n_head,
                c.n_head,
                c.n_embd,
                false,
            ),
            ModelConfig::Llama(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("hidden_size", c.hidden_size),
                    ("intermediate_size", c.intermediate_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("num_key_value_heads", c.kv_heads()),
                    ("max_position_embeddings", c.max_position_embeddings),
                    ("head_dim", c.head_dim.unwrap_or(1)),
                ],
                c.num_attention_heads,
                c.kv_heads(),
                c.hidden_size,
                c.head_dim.is_some(),
            ),
            ModelConfig::Bert(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("hidden_size", c.hidden_size),
                    ("intermediate_size", c.intermediate_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("max_position_embeddings", c.max_position_embeddings),
                ],
                c.num_attention_heads,
                c.num_attention_heads,
                c.hidden_size,
                false,
            ),
            ModelConfig::T5(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("d_model", c.d_model),
                    ("d_kv", c.d_kv),
                    ("d_ff", c.d_ff),
                    ("num_layers", c.num_layers),
                    ("num_decoder_layers", c.decoder_layers()),
                    ("num_heads", c.num_heads),
                    ("relative_attention_num_buckets", c.relative_attention_num_buckets),
                    ("relative_attention_max_distance", c.relative_attention_max_distance),
                    ("n_positions", c.n_positions),
                ],
                c.num_heads,
                c.num_heads,
                c.d_model,
                true,
            ),
        };
        if let Some((k, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{k}` is 0"));
        }
        if let ModelConfig::T5(c) = self {
            c.check()?;
        }
        if !explicit_head_dim && width % heads != 0 {
            return Err(format!("the width {width} is not a multiple of the {heads} attention heads"));
        }
        if heads % kv != 0 {
            return Err(format!("the {heads} attention heads are not a multiple of the {kv} key/value heads"));
        }
        Ok(())
    }

    /// Read and parse `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        Self::from_json(&text, path)
    }
}

/// Settings of `config.json` that change what the model computes, with the values tuna implements
/// (absent or null also means the default): any other value is refused by name rather than
/// computed differently from Hugging Face.
const COMPUTATION: &[(&str, &str, &[&str])] = &[
    ("llama", "hidden_act", &["\"silu\""]),
    ("llama", "rope_scaling", &[]),
    ("llama", "attention_bias", &["false"]),
    ("llama", "mlp_bias", &["false"]),
    ("gpt2", "activation_function", &["\"gelu_new\"", "\"gelu_pytorch_tanh\""]),
    ("gpt2", "scale_attn_weights", &["true"]),
    ("gpt2", "scale_attn_by_inverse_layer_idx", &["false"]),
    ("gpt2", "add_cross_attention", &["false"]),
    ("bert", "hidden_act", &["\"gelu\""]),
    ("bert", "position_embedding_type", &["\"absolute\""]),
    ("bert", "is_decoder", &["false"]),
    ("bert", "add_cross_attention", &["false"]),
    ("t5", "feed_forward_proj", &["\"relu\"", "\"gated-gelu\""]),
    ("t5", "is_decoder", &["false"]),
    ("t5", "is_encoder_decoder", &["true"]),
];

/// Refuse a `config.json` of `ty` whose settings ask for a computation tuna does not implement
/// (a RoPE scaling, another activation, biases the architecture has not), naming the setting.
fn check_computation(v: &serde_json::Value, ty: &str) -> std::result::Result<(), String> {
    for (_, key, allowed) in COMPUTATION.iter().filter(|(t, _, _)| *t == ty) {
        let Some(x) = v.get(*key).filter(|x| !x.is_null()) else { continue };
        if !allowed.contains(&x.to_string().as_str()) {
            return Err(format!(
                "`{key}` {x} is not supported by tuna (it computes {}), so the model would differ from Hugging Face's",
                if allowed.is_empty() { "without it".to_string() } else { allowed.join(" or ") }
            ));
        }
    }
    // transformers 5 keeps the RoPE variant in `rope_parameters.rope_type`.
    match v.get("rope_parameters").and_then(|r| r.get("rope_type")) {
        Some(t) if t != "default" => {
            Err(format!("`rope_parameters.rope_type` {t} is not supported by tuna (it computes \"default\" RoPE)"))
        }
        _ => Ok(()),
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
        let e = ModelConfig::from_json(r#"{"model_type":"bart"}"#, p).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("bart"), "{e}");
        let e = ModelConfig::from_json(r#"{"model_type":"gpt2","n_embd":768}"#, p).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        assert!(ModelConfig::from_json("{", p).unwrap_err().to_string().contains("invalid JSON"));
    }

    #[test]
    fn settings_that_change_the_computation_and_impossible_dims_are_refused_by_name() {
        let p = Path::new("config.json");
        let llama = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        assert!(ModelConfig::from_json(&format!("{{{llama}}}"), p).is_ok());
        for (extra, needle) in [
            (r#","rope_scaling":{"rope_type":"linear","factor":4}"#, "`rope_scaling`"),
            (r#","rope_parameters":{"rope_type":"llama3","rope_theta":1e4}"#, "`rope_parameters.rope_type` \"llama3\""),
            (r#","hidden_act":"relu""#, "`hidden_act` \"relu\""),
            (r#","attention_bias":true"#, "`attention_bias` true"),
            (r#","num_key_value_heads":3"#, "not a multiple of the 3 key/value heads"),
        ] {
            let e = ModelConfig::from_json(&format!("{{{llama}{extra}}}"), p).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let zero = llama.replace(r#""num_attention_heads":2"#, r#""num_attention_heads":0"#);
        let e = ModelConfig::from_json(&format!("{{{zero}}}"), p).unwrap_err().to_string();
        assert!(e.contains("`num_attention_heads` is 0"), "{e}");
        let gpt2 = r#"{"model_type":"gpt2","vocab_size":10,"n_positions":8,"n_embd":8,"n_layer":1,"n_head":2,"activation_function":"relu"}"#;
        assert!(ModelConfig::from_json(gpt2, p).unwrap_err().to_string().contains("`activation_function` \"relu\""));
        let gpt2 = r#"{"model_type":"gpt2","vocab_size":10,"n_positions":8,"n_embd":8,"n_layer":1,"n_head":3}"#;
        assert!(ModelConfig::from_json(gpt2, p)
            .unwrap_err()
            .to_string()
            .contains("not a multiple of the 3 attention heads"));
    }
}
