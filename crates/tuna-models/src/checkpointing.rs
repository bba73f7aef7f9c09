//! Which transformer blocks are checkpointed (their activations recomputed in the backward, see
//! [`tuna_autograd::checkpoint`]), and the per-block copy of the adaptation a checkpointed block
//! computes with.
//!
//! A checkpointed block's recompute runs after the forward has returned, so it cannot borrow
//! the model: it owns clones of the block's weights (tensors share their storage, so a clone
//! costs a reference count) and a [`BlockAdapt`] of the adaptation's per-layer parts.

use crate::adapt::Adapt;
use std::cell::Cell;
use tuna_autograd::ops::Kernels;
use tuna_autograd::Float;
use tuna_kernels::rng::SplitMix64;

/// The blocks whose activations are recomputed in the backward instead of kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// None (every activation kept).
    #[default]
    Off,
    /// Every `k`-th block, starting with the first (`k = 1`: every block).
    Every(usize),
}

impl Checkpointing {
    /// Whether block `layer` (from 0) is checkpointed.
    pub fn applies(self, layer: usize) -> bool {
        match self {
            Checkpointing::Off => false,
            Checkpointing::Every(k) => k > 0 && layer.is_multiple_of(k),
        }
    }

    /// The policy as `--checkpoint-activations` spells it: `off`, `every` or `k`.
    pub fn name(self) -> String {
        match self {
            Checkpointing::Off => "off".into(),
            Checkpointing::Every(1) => "every".into(),
            Checkpointing::Every(k) => k.to_string(),
        }
    }
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;

    /// `off`, `every` (= `1`) or a positive integer `k` (every `k`-th block); the error says what
    /// was given and what is expected (the caller names its flag).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(Checkpointing::Off),
            "every" => Ok(Checkpointing::Every(1)),
            t => match t.parse::<usize>() {
                Ok(k) if k > 0 => Ok(Checkpointing::Every(k)),
                _ => Err(format!("`{s}`: expected off, every, or a positive integer k (every k-th block)")),
            },
        }
    }
}

/// The adaptation as one checkpointed block sees it: its LoRA updates, the Houlsby adapters and
/// the training switch, sharing the dropout generator with the model's [`Adapt`]. The block's
/// dropout masks are drawn from the generator's state at the block's start both times it runs:
/// the forward leaves the generator advanced (as the plain forward does), the recompute puts it
/// back where it found it.
pub(crate) struct BlockAdapt<B: Kernels<E>, E: Float> {
    adapt: Adapt<B, E>,
    start: SplitMix64,
    ran: Cell<bool>,
}

impl<B: Kernels<E>, E: Float> BlockAdapt<B, E> {
    /// The view of `ad` for a block whose linears are named `linears`.
    pub(crate) fn new<'a>(ad: &Adapt<B, E>, linears: impl IntoIterator<Item = &'a str>) -> Self {
        let adapt = ad.block_view(linears);
        let start = adapt.dropout_state();
        BlockAdapt { adapt, start, ran: Cell::new(false) }
    }

    /// `f` over the view, with the dropout generator at the block's start.
    pub(crate) fn run<T>(&self, f: impl FnOnce(&Adapt<B, E>) -> T) -> T {
        let now = self.adapt.replace_dropout_state(self.start.clone());
        let out = f(&self.adapt);
        if self.ran.replace(true) {
            self.adapt.replace_dropout_state(now);
        }
        out
    }
}

/// Whether the blocks of a forward may be checkpointed: recording, no KV cache (generation), no
/// mixed batch (inference only), and `policy` not off.
pub(crate) fn active<B: Kernels<E>, E: Float>(policy: Checkpointing, ad: &Adapt<B, E>, cached: bool) -> bool {
    policy != Checkpointing::Off && !cached && tuna_autograd::grad_enabled() && !ad.is_mixed()
}

#[cfg(test)]
mod tests {
    use super::Checkpointing;

    #[test]
    fn policies_parse_and_print() {
        for (s, p) in [("off", Checkpointing::Off), ("every", Checkpointing::Every(1)), ("3", Checkpointing::Every(3))]
        {
            assert_eq!(s.parse::<Checkpointing>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        assert_eq!("1".parse::<Checkpointing>().unwrap(), Checkpointing::Every(1));
        for bad in ["0", "-1", "x", "", "every2", "1.5"] {
            let e = bad.parse::<Checkpointing>().unwrap_err();
            assert_eq!(e, format!("`{bad}`: expected off, every, or a positive integer k (every k-th block)"));
        }
    }

    #[test]
    fn every_kth_block_from_the_first() {
        let on: Vec<usize> = (0..7).filter(|&l| Checkpointing::Every(3).applies(l)).collect();
        assert_eq!(on, [0, 3, 6]);
        assert!((0..4).all(|l| Checkpointing::Every(1).applies(l)));
        assert!(!(0..4).any(|l| Checkpointing::Off.applies(l)));
    }
}
