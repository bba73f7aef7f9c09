//! Turning checkpoint tensors into autograd tensors: every weight a model loads goes through
//! [`Loader`], which decides (by name) whether it trains, and records it for optimizers,
//! counting and saving; [`Loader::finish`] then refuses a checkpoint holding tensors the model
//! did not take (a checkpoint for another configuration must not load with part of it ignored).

use crate::error::{some_names, Error, Result};
use crate::hf::BASE_PREFIXES;
use crate::weights::WeightSource;
use std::collections::BTreeSet;
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

/// Which weights train, by Hugging Face name.
pub type TrainPredicate = dyn Fn(&str) -> bool;

/// Loads named weights onto a device as frozen constants or trainable parameters.
pub struct Loader<'a, B: Kernels<E>, E: Float> {
    pub src: &'a dyn WeightSource,
    pub dev: Arc<B>,
    trainable: Box<TrainPredicate>,
    /// Every tensor loaded, in load order, with its name.
    pub loaded: Vec<(String, Tensor<B, E>)>,
    /// The source's names (as [`WeightSource::names`] lists them) of the tensors loaded.
    taken: BTreeSet<String>,
    /// How [`Loader::linear`] holds a frozen linear weight (`--base-precision`; f32: as loaded).
    pub pack: tuna_autograd::ops::lowp::BasePrecision,
}

impl<'a, B: Kernels<E>, E: Float> Loader<'a, B, E> {
    /// A loader where nothing trains (inference, and the base of every PEFT method).
    pub fn frozen(src: &'a dyn WeightSource, dev: &Arc<B>) -> Self {
        Self::with_trainable(src, dev, |_| false)
    }

    /// A loader where the weights named as `trainable` says train (full fine-tuning: `|_| true`).
    pub fn with_trainable(src: &'a dyn WeightSource, dev: &Arc<B>, trainable: impl Fn(&str) -> bool + 'static) -> Self {
        Loader {
            src,
            dev: dev.clone(),
            trainable: Box::new(trainable),
            loaded: Vec::new(),
            taken: BTreeSet::new(),
            pack: Default::default(),
        }
    }

    /// A block's linear layer as loaded: its frozen weight packed now when [`Loader::pack`] asks
    /// for bf16 or int8 (its f32 storage released before the next tensor loads). q4 packs nothing
    /// here: a weight the source holds in Q4 came through [`Loader::load_q4`] already packed, and
    /// one stored otherwise (F32, F16, Q8_0, ...) stays f32, as loaded.
    pub fn linear(&mut self, lin: crate::linear::Linear<B, E>) -> Result<crate::linear::Linear<B, E>> {
        use tuna_autograd::ops::lowp::BasePrecision;
        if !matches!(self.pack, BasePrecision::F32 | BasePrecision::Q4) && lin.is_packable() {
            lin.pack(self.pack)?;
        }
        Ok(lin)
    }

    /// A block's frozen linear weight `name` of `shape` (`[out, in]`) kept in the source's own
    /// Q4_0 / Q4_1 blocks, never dequantized: when [`Loader::pack`] is q4, the weight does not
    /// train, and the source stores it in Q4 with this shape. Returns a tensor of the shape with
    /// no data ([`Tensor::released`]), recorded as [`Loader::load`] records, and the packed
    /// weight; `None` when the weight loads as any other ([`Loader::load`]).
    pub fn load_q4(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<(Tensor<B, E>, tuna_autograd::ops::lowp::PackedWeight)>> {
        use tuna_autograd::ops::lowp::{BasePrecision, PackedWeight};
        if self.pack != BasePrecision::Q4 || (self.trainable)(name) || shape.len() != 2 {
            return Ok(None);
        }
        if self.src.shape(name).as_deref() != Some(shape) {
            return Ok(None);
        }
        let Some(blocks) = self.src.q4_blocks(name) else { return Ok(None) };
        let (fmt, bytes) = blocks?;
        let pw = PackedWeight::from_q4(name, fmt, bytes.into_owned(), shape[0], shape[1])?;
        let t = Tensor::released(&self.dev, shape)?;
        self.loaded.push((name.to_string(), t.clone()));
        self.taken.extend(self.src.stored_name(name));
        Ok(Some((t, pw)))
    }

    /// Tensor `name` with exactly `shape` (error naming the tensor, expected and found shapes).
    pub fn load(&mut self, name: &str, shape: &[usize]) -> Result<Tensor<B, E>> {
        let values = self.src.require(name, shape)?;
        let t = if (self.trainable)(name) {
            // A bf16 model's trainable weight keeps the checkpoint's f32 values in its master.
            let host: Vec<E::Acc> = values.iter().map(|&v| <E::Acc as tuna_kernels::Elem>::from_f32(v)).collect();
            Tensor::param_from_master(&self.dev, name, shape, &host)?
        } else {
            let host: Vec<E> = values.iter().map(|&v| E::from_f32(v)).collect();
            Tensor::constant(&self.dev, shape, &host)?
        };
        self.loaded.push((name.to_string(), t.clone()));
        self.taken.extend(self.src.stored_name(name));
        Ok(t)
    }

    /// The first of `names` present in the checkpoint (for tensors stored under varying names,
    /// e.g. a tied head), loaded with `shape`.
    pub fn load_any(&mut self, names: &[&str], shape: &[usize]) -> Result<Tensor<B, E>> {
        let name = names.iter().find(|n| self.src.shape(n).is_some()).unwrap_or(&names[0]);
        self.load(name, shape)
    }

    /// The end of a model's load: every tensor of the source that no [`Loader::load`] took is an
    /// error naming a few of them and their count, unless `known_unused` names it. Patterns are
    /// Hugging Face names where `*` stands for any run of characters (`h.*.attn.bias`), matched
    /// with or without a base prefix ([`BASE_PREFIXES`]): the buffers and heads real checkpoints
    /// carry that the architecture does not compute with.
    pub fn finish(&self, known_unused: &[&str]) -> Result<()> {
        let unexpected: Vec<String> = self
            .src
            .names()
            .into_iter()
            .filter(|n| !self.taken.contains(n) && !is_known_unused(n, known_unused))
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        Err(Error::Format {
            path: self.src.path().to_path_buf(),
            msg: format!(
                "tensors the model does not use: {}; the checkpoint holds more than its configuration describes \
                 (more layers, other modules or another architecture?)",
                some_names(&unexpected)
            ),
        })
    }
}

/// Whether `name` (or `name` without a base prefix) matches one of `patterns`.
fn is_known_unused(name: &str, patterns: &[&str]) -> bool {
    let bare = BASE_PREFIXES.iter().find_map(|p| name.strip_prefix(p));
    patterns
        .iter()
        .any(|p| glob(p.as_bytes(), name.as_bytes()) || bare.is_some_and(|b| glob(p.as_bytes(), b.as_bytes())))
}

/// `pattern` matches all of `s`, `*` standing for any run of characters (possibly empty).
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    match pattern.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// A `WeightSource` over an in-memory map (tests, synthetic models, and weights built in code).
pub struct MemWeights {
    pub path: std::path::PathBuf,
    pub tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl WeightSource for MemWeights {
    fn path(&self) -> &std::path::Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }
    fn get(&self, name: &str) -> Option<Result<std::borrow::Cow<'_, [f32]>>> {
        self.tensors.get(name).map(|(_, v)| Ok(std::borrow::Cow::Borrowed(v.as_slice())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_unused_patterns_match_whole_names_with_or_without_the_base_prefix() {
        let p = ["h.*.attn.bias", "cls.*", "lm_head.weight"];
        for yes in ["h.0.attn.bias", "transformer.h.11.attn.bias", "cls.predictions.bias", "lm_head.weight"] {
            assert!(is_known_unused(yes, &p), "{yes}");
        }
        for no in ["h.0.attn.c_attn.bias", "h.0.attn.bias.x", "xcls.a", "model.lm_head.weight.0", "lm_head.bias"] {
            assert!(!is_known_unused(no, &p), "{no}");
        }
    }
}
