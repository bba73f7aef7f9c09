//! Turning checkpoint tensors into autograd tensors: every weight a model loads goes through
//! [`Loader`], which decides (by name) whether it trains, and records it for optimizers,
//! counting and saving.

use crate::error::Result;
use crate::weights::WeightSource;
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
}

impl<'a, B: Kernels<E>, E: Float> Loader<'a, B, E> {
    /// A loader where nothing trains (inference, and the base of every PEFT method).
    pub fn frozen(src: &'a dyn WeightSource, dev: &Arc<B>) -> Self {
        Loader { src, dev: dev.clone(), trainable: Box::new(|_| false), loaded: Vec::new() }
    }

    /// A loader where the weights named as `trainable` says train (full fine-tuning: `|_| true`).
    pub fn with_trainable(src: &'a dyn WeightSource, dev: &Arc<B>, trainable: impl Fn(&str) -> bool + 'static) -> Self {
        Loader { src, dev: dev.clone(), trainable: Box::new(trainable), loaded: Vec::new() }
    }

    /// Tensor `name` with exactly `shape` (error naming the tensor, expected and found shapes).
    pub fn load(&mut self, name: &str, shape: &[usize]) -> Result<Tensor<B, E>> {
        let values = self.src.require(name, shape)?;
        let host: Vec<E> = values.iter().map(|&v| E::from_f32(v)).collect();
        let t = if (self.trainable)(name) {
            Tensor::param(&self.dev, name, shape, &host)?
        } else {
            Tensor::constant(&self.dev, shape, &host)?
        };
        self.loaded.push((name.to_string(), t.clone()));
        Ok(t)
    }

    /// The first of `names` present in the checkpoint (for tensors stored under varying names,
    /// e.g. a tied head), loaded with `shape`.
    pub fn load_any(&mut self, names: &[&str], shape: &[usize]) -> Result<Tensor<B, E>> {
        let name = names.iter().find(|n| self.src.shape(n).is_some()).unwrap_or(&names[0]);
        self.load(name, shape)
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
