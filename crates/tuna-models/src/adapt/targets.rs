//! PEFT's rule for the modules `target_modules` (and `exclude_modules`) name: a list names a
//! module whose name equals an entry or ends with "." + entry; a string is a Python regular
//! expression the whole module name must match (`re.fullmatch`), the string "all-linear" meaning
//! every linear but the output head; absent, PEFT's default list for the architecture. tuna
//! decides exactly the strings made of letters, digits, `_`, `-` and `.` (any one character, as
//! in a regular expression), and refuses other regular expressions by name rather than guess
//! what they match.

use super::peft_fields::Fields;
use super::Arch;
use crate::error::Result;
use serde_json::Value;

/// PEFT's special `target_modules` string: every linear layer but the output head.
pub(crate) const ALL_LINEAR: &str = "all-linear";

/// Which modules a `target_modules` or `exclude_modules` field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Targets {
    /// A list: a module whose name equals an entry or ends with "." + entry.
    Names(Vec<String>),
    /// `"all-linear"`: every linear tuna's models expose (their output heads are not among them).
    AllLinear,
    /// A regular expression without special characters but `.`, matched against the whole name.
    Pattern(String),
}

impl Targets {
    /// Field `key` of the config; `None` when absent or null. A list holding a non-string, and a
    /// regular expression tuna cannot decide exactly, are errors naming the field and its value.
    pub fn read(f: &Fields<'_>, key: &str) -> Result<Option<Targets>> {
        let Some(v) = f.get(key) else { return Ok(None) };
        match v {
            Value::Array(a) => {
                let names: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(String::from)).collect();
                names
                    .map(|n| Some(Targets::Names(n)))
                    .ok_or_else(|| f.err(format!("`{key}` is {v}: expected module names (strings) or one string")))
            }
            Value::String(s) if key == "target_modules" && s == ALL_LINEAR => Ok(Some(Targets::AllLinear)),
            Value::String(s) if is_plain(s) => Ok(Some(Targets::Pattern(s.clone()))),
            Value::String(_) => Err(f.err(format!(
                "`{key}` {v} is not supported by tuna (a regular expression: give a list of module names)"
            ))),
            _ => Err(f.err(format!("`{key}` is {v}: expected a list of module names or a string"))),
        }
    }

    /// Whether module `name` is named.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Targets::Names(list) => list_names(list, name),
            Targets::AllLinear => true,
            Targets::Pattern(p) => {
                p.len() == name.len() && p.bytes().zip(name.bytes()).all(|(a, b)| a == b'.' || a == b)
            }
        }
    }

    /// As JSON (for errors).
    pub fn json(&self) -> String {
        match self {
            Targets::Names(list) => Value::from(list.clone()).to_string(),
            Targets::AllLinear => Value::from(ALL_LINEAR).to_string(),
            Targets::Pattern(p) => Value::from(p.as_str()).to_string(),
        }
    }

    /// As a list that names the same modules of this model, given the modules adapted (which are
    /// every module named): a list stays as it is, a string becomes the adapted modules' names.
    pub fn into_list(self, adapted: impl Iterator<Item = String>) -> Vec<String> {
        match self {
            Targets::Names(list) => list,
            Targets::AllLinear | Targets::Pattern(_) => adapted.collect(),
        }
    }
}

/// PEFT's `target_modules` when a LoRA config has none (its per-model default mapping, checked
/// against PEFT 0.21.2: see `tests/fixtures/peft/SPEC.md`).
pub(crate) fn peft_default(arch: Arch) -> Targets {
    Targets::Names(default_lora_targets(arch).iter().map(|s| s.to_string()).collect())
}

/// PEFT's default LoRA targets for an architecture: the attention's query and value projections.
pub fn default_lora_targets(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Gpt2 => &["c_attn"],
        Arch::Llama => &["q_proj", "v_proj"],
        Arch::Bert => &["query", "value"],
        Arch::T5 => &["q", "v"],
    }
}

/// Whether the list `targets` names module `name`: equal to an entry, or ending with "." + entry.
pub(crate) fn list_names(targets: &[String], name: &str) -> bool {
    targets.iter().any(|t| name == t || name.strip_suffix(t.as_str()).is_some_and(|p| p.ends_with('.')))
}

/// A regular expression whose only special character is `.`: letters, digits, `_`, `-`, `.`.
fn is_plain(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_match_by_name_or_dotted_suffix() {
        let t = Targets::Names(vec!["q_proj".into(), "output.dense".into()]);
        for yes in ["q_proj", "model.layers.0.self_attn.q_proj", "encoder.layer.0.attention.output.dense"] {
            assert!(t.matches(yes), "{yes}");
        }
        for no in ["model.layers.0.self_attn.xq_proj", "q_proj.x", "encoder.layer.0.intermediate.dense"] {
            assert!(!t.matches(no), "{no}");
        }
    }

    #[test]
    fn plain_strings_are_whole_name_regular_expressions() {
        let t = Targets::Pattern("model.layers.0.self_attn.q_proj".into());
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("model_layers.0.self_attn.q_proj"), "`.` is any character, as in Python");
        assert!(!t.matches("model.layers.0.self_attn.q_proj2") && !t.matches("layers.0.self_attn.q_proj"));
        assert!(!is_plain(r".*\.q_proj") && !is_plain("(q|v)_proj") && is_plain("q_proj"));
    }
}
