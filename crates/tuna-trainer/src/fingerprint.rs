//! The base model's fingerprint, recorded in every checkpoint so that `--resume` onto another base
//! model (another architecture, fewer layers, other weights under the same names) is refused with
//! a message that says which of these differs.

use crate::checkpoint::Fnv64;
use crate::error::Result;
use crate::model::{Backend, Model, RunFloat};
use serde::{Deserialize, Serialize};

/// Values the content hash reads from each tensor, evenly strided over it.
const SAMPLES_PER_TENSOR: usize = 4096;

/// What identifies a base model: its dimensions, its tensors' names and shapes, and a strided
/// sample of every tensor's values (a whole tensor scaled or replaced changes it; one weight edited
/// alone may not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFingerprint {
    pub arch: String,
    /// Layers, hidden size, heads, KV heads, head dim and vocabulary, as one readable line.
    pub dims: String,
    /// Number of base tensors.
    pub tensors: usize,
    /// FNV-1a 64 of every tensor's name and shape, in order (16 hex digits).
    pub names_hash: String,
    /// FNV-1a 64 of `SAMPLES_PER_TENSOR` strided values of every tensor (16 hex digits).
    pub content_hash: String,
}

impl BaseFingerprint {
    /// The fingerprint of `model`'s base weights as loaded (call before any training step).
    pub fn of<B: Backend<E>, E: RunFloat>(model: &Model<B, E>) -> Result<BaseFingerprint> {
        let s = model.shape();
        let weights = model.named_weights();
        let mut names = Fnv64::new();
        for (n, t) in &weights {
            names.write(format!("{n}:{:?};", t.shape()).as_bytes());
        }
        let mut content = Fnv64::new();
        for (n, t) in &weights {
            // One tensor on the host at a time (a copy), so the peak stays one tensor's size. A
            // weight held packed (--base-precision) is read as the packed values, [out, in].
            let packed = if t.is_released() { model.packed_weight(n) } else { None };
            let v = match packed {
                Some(p) => p.to_f32(),
                None => t.master_to_vec()?,
            };
            let stride = (v.len() / SAMPLES_PER_TENSOR).max(1);
            for x in v.iter().step_by(stride) {
                content.write(&x.to_bits().to_le_bytes());
            }
        }
        Ok(BaseFingerprint {
            arch: s.arch.name().to_string(),
            dims: format!(
                "{} layers, hidden {}, {} heads, {} kv heads, head dim {}, vocab {}",
                s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.vocab
            ),
            tensors: weights.len(),
            names_hash: format!("{:016x}", names.finish()),
            content_hash: format!("{:016x}", content.finish()),
        })
    }

    /// What differs between the fingerprint a checkpoint recorded (`self`) and the model's now
    /// (`now`), in words; `None` when they agree.
    pub fn difference(&self, now: &BaseFingerprint) -> Option<String> {
        if self.arch != now.arch {
            return Some(format!("it was a {} model, this one is {}", self.arch, now.arch));
        }
        if self.dims != now.dims {
            return Some(format!("it had {}; this one has {}", self.dims, now.dims));
        }
        if self.tensors != now.tensors || self.names_hash != now.names_hash {
            return Some(format!(
                "its {} tensors had other names or shapes than this model's {}",
                self.tensors, now.tensors
            ));
        }
        if self.content_hash != now.content_hash {
            return Some("same names and shapes, but other weight values".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_what_changed() {
        let a = BaseFingerprint {
            arch: "llama".into(),
            dims: "2 layers".into(),
            tensors: 10,
            names_hash: "1".into(),
            content_hash: "2".into(),
        };
        assert_eq!(a.difference(&a.clone()), None);
        let other = |f: fn(&mut BaseFingerprint)| {
            let mut b = a.clone();
            f(&mut b);
            a.difference(&b).unwrap()
        };
        assert!(other(|b| b.arch = "gpt2".into()).contains("llama model, this one is gpt2"));
        assert!(other(|b| b.dims = "1 layers".into()).contains("it had 2 layers; this one has 1 layers"));
        assert!(other(|b| b.names_hash = "3".into()).contains("other names or shapes"));
        assert!(other(|b| b.content_hash = "3".into()).contains("other weight values"));
    }
}
