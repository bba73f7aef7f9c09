//! The fields of `adapter_config.json`, per `peft_type`: those tuna honors (reads and applies, or
//! checks against the model and the tensors), those that change nothing in a loaded adapter
//! (metadata, initialization settings), and those accepted only at their no-op default. Any other
//! field is refused unless it holds nothing (null, false, empty), so that an option of a newer
//! PEFT never silently changes what an adapter computes. Also the typed readers the loader
//! uses, whose errors name the file, the field and its value.
//!
//! The field lists are PEFT 0.21.2's (the fixtures under `tests/fixtures/peft/`, and what
//! [`super::peft`] writes), plus tuna's Houlsby format.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

pub(crate) const PROMPT_TUNING: &str = "PROMPT_TUNING";
pub(crate) const PREFIX_TUNING: &str = "PREFIX_TUNING";
pub(crate) const P_TUNING: &str = "P_TUNING";
pub(crate) const LORA: &str = "LORA";
/// tuna's own adapter type (PEFT has no Houlsby adapters; see [`super::Houlsby`]).
pub(crate) const HOULSBY: &str = "HOULSBY";

/// What tuna does with one field of `adapter_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Read and applied, or checked against the model or the tensors.
    Honored,
    /// Changes nothing in a loaded adapter (metadata, initialization settings).
    Ignored,
    /// Accepted only at its no-op default (see [`is_default`]); any other value is refused, the
    /// text saying what tuna does not support.
    DefaultOnly(&'static str),
}

use Rule::{DefaultOnly, Honored, Ignored};

/// Fields of every PEFT config (`PeftConfig`).
const COMMON: &[(&str, Rule)] = &[
    ("peft_type", Honored),
    ("peft_version", Ignored),
    ("base_model_name_or_path", Ignored),
    ("revision", Ignored),
    ("task_type", Ignored),
    ("inference_mode", Ignored),
    ("auto_mapping", Ignored),
    ("modules_to_save", DefaultOnly("trained copies of base modules; tuna keeps a head in tuna_extra.safetensors")),
];

/// Fields of prompt and prefix tuning (`PromptLearningConfig`).
const PROMPT_LEARNING: &[(&str, Rule)] = &[
    ("num_virtual_tokens", Honored),
    ("token_dim", Honored),
    // Must be 1: 2 is an encoder-decoder model, which tuna does not run.
    ("num_transformer_submodules", Honored),
];

const PROMPT: &[(&str, Rule)] = &[
    // The model's own dimensions, unused by a soft prompt (`token_dim` is checked).
    ("num_attention_heads", Ignored),
    ("num_layers", Ignored),
    ("prompt_tuning_init", Ignored),
    ("prompt_tuning_init_text", Ignored),
    ("tokenizer_name_or_path", Ignored),
    ("tokenizer_kwargs", Ignored),
];

const PTUNING: &[(&str, Rule)] = &[
    // The model's own dimensions, unused by a soft prompt (`token_dim` is checked).
    ("num_attention_heads", Ignored),
    ("num_layers", Ignored),
    // The encoder's settings: checked in form and kept (saved again), but the saved
    // `prompt_embeddings` is already the encoder's output (PEFT saves no encoder), so they change
    // nothing in what the loaded adapter computes.
    ("encoder_reparameterization_type", Honored),
    ("encoder_hidden_size", Honored),
    ("encoder_num_layers", Honored),
    // A training setting of the LSTM encoder, which a loaded adapter does not run.
    ("encoder_dropout", Ignored),
];

const PREFIX: &[(&str, Rule)] = &[
    // Key/value heads and layers: how the saved table splits (checked against the model).
    ("num_attention_heads", Honored),
    ("num_layers", Honored),
    ("prefix_projection", Honored),
    // The projection's width: the saved table is already projected (PEFT saves no MLP).
    ("encoder_hidden_size", Ignored),
    ("init_weights", Ignored),
];

const LORA_FIELDS: &[(&str, Rule)] = &[
    ("r", Honored),
    ("lora_alpha", Honored),
    ("use_rslora", Honored),
    ("lora_dropout", Honored),
    ("target_modules", Honored),
    ("exclude_modules", Honored),
    // Checked against the layer kind of each adapted module.
    ("fan_in_fan_out", Honored),
    // Checked: initializations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)
    // make an adapter that only fits the changed base.
    ("init_lora_weights", Honored),
    // Settings of initializations (a loaded adapter brings its trained values).
    ("eva_config", Ignored),
    ("corda_config", Ignored),
    ("loftq_config", Ignored),
    ("lora_ga_config", Ignored),
    // Only with `use_qalora` (refused unless false).
    ("qalora_group_size", Ignored),
    // Megatron's parallel linears: how a layer is split over devices, not what it computes.
    ("megatron_config", Ignored),
    ("megatron_core", Ignored),
    // Ties adapters of tied embeddings and heads, which tuna never adapts.
    ("ensure_weight_tying", Ignored),
    ("runtime_config", Ignored),
    ("alpha_pattern", DefaultOnly("per-module alphas")),
    ("rank_pattern", DefaultOnly("per-module ranks")),
    ("layers_to_transform", DefaultOnly("LoRA on some layers only")),
    ("layers_pattern", DefaultOnly("LoRA on some layers only")),
    ("layer_replication", DefaultOnly("layer replication")),
    ("target_parameters", DefaultOnly("LoRA on parameters rather than modules")),
    ("trainable_token_indices", DefaultOnly("trainable token embeddings")),
    ("bias", DefaultOnly("trained biases")),
    ("lora_bias", DefaultOnly("a bias on lora_B")),
    ("use_dora", DefaultOnly("DoRA")),
    ("use_qalora", DefaultOnly("QA-LoRA")),
    ("use_bdlora", DefaultOnly("block-diagonal LoRA")),
    ("alora_invocation_tokens", DefaultOnly("activated LoRA")),
    ("arrow_config", DefaultOnly("Arrow routing")),
    ("kasa_config", DefaultOnly("KaSA")),
    ("monteclora_config", DefaultOnly("MonteCLoRA")),
    ("velora_config", DefaultOnly("VeLoRA")),
];

const HOULSBY_FIELDS: &[(&str, Rule)] = &[
    ("bottleneck_size", Honored),
    ("num_layers", Honored),
    ("token_dim", Honored),
    ("non_linearity", Honored),
    ("placement", Honored),
];

/// The field tables of `peft_type` (`None`: a type tuna does not load).
fn tables(peft_type: &str) -> Option<&'static [&'static [(&'static str, Rule)]]> {
    Some(match peft_type {
        PROMPT_TUNING => &[COMMON, PROMPT_LEARNING, PROMPT],
        PREFIX_TUNING => &[COMMON, PROMPT_LEARNING, PREFIX],
        P_TUNING => &[COMMON, PROMPT_LEARNING, PTUNING],
        LORA => &[COMMON, LORA_FIELDS],
        HOULSBY => &[COMMON, HOULSBY_FIELDS],
        _ => return None,
    })
}

/// What tuna does with `field` of a `peft_type` config (`None`: not a field tuna knows).
pub(crate) fn rule(peft_type: &str, field: &str) -> Option<Rule> {
    tables(peft_type)?.iter().flat_map(|t| t.iter()).find(|(k, _)| *k == field).map(|&(_, r)| r)
}

/// A value that holds nothing: null, false, `""`, `{}` or `[]` (what an unknown field may hold).
pub(crate) fn is_nothing(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The no-op default of a [`Rule::DefaultOnly`] field: nothing, or `"none"` (LoRA's `bias`).
pub(crate) fn is_default(v: &Value) -> bool {
    is_nothing(v) || v == "none"
}

/// `adapter_config.json`, parsed, with readers whose errors name the file and the field.
pub(crate) struct Fields<'a> {
    pub path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn new(path: &'a Path, map: &'a Map<String, Value>) -> Self {
        Fields { path, map }
    }

    /// A format error about this file.
    pub fn err(&self, msg: String) -> Error {
        Error::Format { path: self.path.to_path_buf(), msg }
    }

    /// The field's value; `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// `peft_type`, a type tuna loads.
    pub fn peft_type(&self) -> Result<&'a str> {
        let t = self.get("peft_type").ok_or_else(|| self.err("no `peft_type`".into()))?;
        let t = t.as_str().ok_or_else(|| self.err(format!("`peft_type` is {t}: expected a string")))?;
        if tables(t).is_none() {
            return Err(Error::Unsupported { path: self.path.to_path_buf(), what: format!("peft_type {t}") });
        }
        Ok(t)
    }

    /// Every field checked against `peft_type`'s tables: a field accepted only at its default
    /// that holds something else, and an unknown field that holds something, are errors naming
    /// the field and its value.
    pub fn check_all(&self, peft_type: &str) -> Result<()> {
        for (key, v) in self.map {
            match rule(peft_type, key) {
                Some(Honored | Ignored) => {}
                Some(DefaultOnly(_)) if is_default(v) => {}
                None if is_nothing(v) => {}
                Some(DefaultOnly(why)) => {
                    return Err(self.err(format!("`{key}` {v} is not supported by tuna ({why})")));
                }
                None => {
                    return Err(self.err(format!(
                        "`{key}` {v} is not a {peft_type} field tuna knows: refused rather than ignored, \
                         since it may change what the adapter computes"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A positive integer field; `None` when absent or null.
    pub fn count(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(self.err(format!("`{key}` is {v}: expected a positive integer"))),
        }
    }

    /// A positive integer field that must be there.
    pub fn need_count(&self, key: &str) -> Result<usize> {
        self.count(key)?.ok_or_else(|| self.err(format!("no `{key}`")))
    }

    /// A number field; `None` when absent or null.
    pub fn number(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_f64().map(Some).ok_or_else(|| self.err(format!("`{key}` is {v}: expected a number")))
    }

    /// A boolean field; `None` when absent or null.
    pub fn flag(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_bool().map(Some).ok_or_else(|| self.err(format!("`{key}` is {v}: expected true or false")))
    }

    /// A string field; `None` when absent or null.
    pub fn text(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_str().map(Some).ok_or_else(|| self.err(format!("`{key}` is {v}: expected a string")))
    }

    /// An optional dimension field that, when given, must equal the model's `have`.
    pub fn expect_dim(&self, key: &str, what: &str, have: usize) -> Result<()> {
        match self.count(key)? {
            Some(d) if d != have => Err(self
                .err(format!("{}model with {what} ({key}) {d}, but this model has {have}", super::peft::OTHER_MODEL))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field tuna writes (and so every field of PEFT 0.21.2's configs, which tuna writes in
    /// full) has a rule: none falls to the unknown-field check.
    #[test]
    fn every_field_tuna_writes_has_a_rule() {
        let lora = super::super::peft::lora_config_json(
            &super::super::LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["q".into()] },
            false,
        );
        for (k, v) in lora.as_object().unwrap() {
            let r = rule(LORA, k).unwrap_or_else(|| panic!("LoRA field `{k}` has no rule"));
            assert!(!matches!(r, DefaultOnly(_)) || is_default(v), "tuna writes `{k}` {v}, which it refuses");
        }
    }

    #[test]
    fn nothing_and_default_values() {
        for v in [Value::Null, false.into(), "".into(), serde_json::json!({}), serde_json::json!([])] {
            assert!(is_nothing(&v) && is_default(&v), "{v}");
        }
        assert!(is_default(&"none".into()) && !is_nothing(&"none".into()));
        for v in [true.into(), 0.into(), "all".into(), serde_json::json!({"a": 1}), serde_json::json!([0])] {
            assert!(!is_nothing(&v) && !is_default(&v), "{v}");
        }
    }
}
