//! Hugging Face model folders: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped, served as a [`WeightSource`].
//!
//! # Tensor names
//!
//! Tensors are listed ([`WeightSource::names`]) as stored. Lookups ([`WeightSource::shape`],
//! [`WeightSource::get`], [`WeightSource::require`]) resolve a requested name by this rule, since
//! checkpoints of one architecture differ in whether the base model carries a prefix (`BertModel`
//! saves `embeddings.…`, `BertForMaskedLM` saves `bert.embeddings.…`; the `gpt2` hub checkpoint
//! stores `h.0.…`, a saved `GPT2LMHeadModel` stores `transformer.h.0.…`; `LlamaModel` saves
//! `layers.0.…`, `LlamaForCausalLM` `model.layers.0.…`):
//!
//! 1. the name exactly as requested, if stored;
//! 2. else, if it starts with one of [`BASE_PREFIXES`] (`bert.`, `transformer.`, `model.`), the
//!    name without that prefix;
//! 3. else the first of `prefix + name`, over [`BASE_PREFIXES`] in order, that is stored.
//!
//! So models may ask for either form. Heads outside the base model (`lm_head.weight`,
//! `cls.predictions.…`) are stored unprefixed and found by rule 1.

pub(crate) mod st_file;
#[cfg(test)]
mod tests;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::WeightSource;
use st_file::{Entry, StFile};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Prefixes the base model's tensors may or may not carry (see the module docs).
pub const BASE_PREFIXES: [&str; 3] = ["bert.", "transformer.", "model."];

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// An opened Hugging Face model folder.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    /// `model.safetensors`, or the index file of a sharded checkpoint: what errors name.
    weights_path: PathBuf,
    files: Vec<StFile>,
    /// Float tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
}

impl HfCheckpoint {
    /// Open `dir`: parse `config.json`, map `model.safetensors` (preferred when both exist) or
    /// the shards listed by `model.safetensors.index.json`. Errors name the folder or file.
    pub fn open(dir: impl AsRef<Path>) -> Result<HfCheckpoint> {
        let dir = dir.as_ref();
        let meta = std::fs::metadata(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
        if !meta.is_dir() {
            return Err(Error::Format { path: dir.to_path_buf(), msg: "not a folder".into() });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let (single, index_path) = (dir.join(SINGLE), dir.join(INDEX));
        let (weights_path, files, index) = if single.is_file() {
            let f = StFile::open(&single)?;
            let index = f.tensors.keys().map(|k| (k.clone(), 0)).collect();
            (single, vec![f], index)
        } else if index_path.is_file() {
            let (files, index) = open_sharded(dir, &index_path)?;
            (index_path, files, index)
        } else {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: format!("no {SINGLE} or {INDEX} in the folder"),
            });
        };
        Ok(HfCheckpoint { dir: dir.to_path_buf(), config, weights_path, files, index })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `tokenizer.json` in the folder, if there is one.
    pub fn tokenizer_file(&self) -> Option<PathBuf> {
        Some(self.dir.join("tokenizer.json")).filter(|p| p.is_file())
    }

    /// Names of the non-float tensors that were skipped (e.g. BERT's int64 `position_ids`).
    pub fn skipped(&self) -> Vec<String> {
        self.files.iter().flat_map(|f| f.skipped.iter().cloned()).collect()
    }

    /// The stored name a requested name resolves to (rule in the module docs), if any.
    pub fn resolve(&self, name: &str) -> Option<&str> {
        if let Some((k, _)) = self.index.get_key_value(name) {
            return Some(k);
        }
        if let Some(bare) = BASE_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
            return self.index.get_key_value(bare).map(|(k, _)| k.as_str());
        }
        BASE_PREFIXES.iter().find_map(|p| self.index.get_key_value(&format!("{p}{name}")).map(|(k, _)| k.as_str()))
    }

    fn entry(&self, name: &str) -> Option<(&StFile, &str, &Entry)> {
        let stored = self.resolve(name)?;
        let file = &self.files[*self.index.get(stored)?];
        Some((file, stored, file.tensors.get(stored)?))
    }
}

/// Parse the index and map every shard it names; check each listed tensor is in its shard.
fn open_sharded(dir: &Path, index_path: &Path) -> Result<(Vec<StFile>, BTreeMap<String, usize>)> {
    let fmt = |msg: String| Error::Format { path: index_path.to_path_buf(), msg };
    let text =
        std::fs::read_to_string(index_path).map_err(|e| Error::Io { path: index_path.to_path_buf(), source: e })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| fmt(format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| fmt("no `weight_map` object".into()))?;
    let mut files: Vec<StFile> = Vec::new();
    let mut by_shard: HashMap<String, usize> = HashMap::new();
    let mut index = BTreeMap::new();
    // Sorted for a deterministic shard order.
    let sorted: BTreeMap<&String, &serde_json::Value> = map.iter().collect();
    for (name, shard) in sorted {
        let shard = shard.as_str().ok_or_else(|| fmt(format!("`weight_map[{name}]` is not a file name")))?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(fmt(format!("shard `{shard}` is not a plain file name")));
        }
        let i = match by_shard.get(shard) {
            Some(&i) => i,
            None => {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(fmt(format!("shard `{shard}` (for tensor `{name}`) is missing: {}", path.display())));
                }
                files.push(StFile::open(&path)?);
                by_shard.insert(shard.to_string(), files.len() - 1);
                files.len() - 1
            }
        };
        let f = &files[i];
        if !f.holds(name) {
            return Err(fmt(format!("tensor `{name}` is not in its shard {}", f.path.display())));
        }
        if f.tensors.contains_key(name) {
            index.insert(name.clone(), i);
        }
    }
    Ok((files, index))
}

impl WeightSource for HfCheckpoint {
    fn path(&self) -> &Path {
        &self.weights_path
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entry(name).map(|(_, _, e)| e.shape.clone())
    }

    fn get(&self, name: &str) -> Option<Result<Cow<'_, [f32]>>> {
        self.entry(name).map(|(f, stored, e)| f.read(stored, e))
    }

    fn stored_name(&self, name: &str) -> Option<String> {
        self.resolve(name).map(str::to_string)
    }
}
