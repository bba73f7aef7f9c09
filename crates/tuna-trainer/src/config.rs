//! What a run is asked to do ([`TrainConfig`], validated by the CLI) and what it ends with
//! ([`RunSummary`], also `summary.json`).

use crate::data::{Fields, Task};
use crate::run_dir::OutMode;
use crate::schedule::Decay;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tuna_models::adapt::Method;

/// Everything a run needs (validated by the CLI).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: PathBuf,
    /// The model as the user named it when that was a Hugging Face id (`model` is then its cached
    /// snapshot): what the summary and the saved adapter record.
    pub model_name: Option<String>,
    pub method: Method,
    pub task: Task,
    pub fields: Fields,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    /// Class labels in class order (default: those of the training data, sorted).
    pub labels: Option<Vec<String>>,
    /// Verbalizer words for decoders, one per label (default: the labels).
    pub verbalizers: Option<Vec<String>>,
    /// Text of a TEXT prompt init (CLASS_LABELS uses the verbalizers or labels).
    pub prompt_init_text: Option<String>,
    pub batch_size: usize,
    /// Rows per forward/backward (gradient accumulation over `batch_size / micro_batch` passes).
    pub micro_batch: usize,
    /// Tokens per example at most; `None`: [`crate::limits::DEFAULT_MAX_LEN`] or what the model's
    /// positions leave room for. Checked against the positions before the first step.
    pub max_len: Option<usize>,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// How AdamW stores its moments (f32, or bf16 for half the optimizer memory).
    pub optimizer_state: tuna_autograd::optim::MomentStorage,
    pub clip: Option<f64>,
    /// The transformer blocks whose activations are recomputed in the backward instead of kept
    /// (less memory, about one more forward of time; the same numbers).
    pub checkpoint_activations: tuna_models::checkpointing::Checkpointing,
    /// AdamW inside the backward: each trainable tensor updated, and its gradient freed, as soon
    /// as its gradient is complete (one pass per step, no global-norm clipping; the same numbers).
    pub update_in_backward: bool,
    /// How the frozen weights of the blocks are held (f32, bf16, int8 with a scale per 64 weights, or q4; CPU,
    /// parameter-efficient methods): less memory, products on the packed weights.
    pub base_precision: tuna_models::model::BasePrecision,
    /// `--precision`: the element type the run computes in (f32; bf16 mixed precision on CUDA:
    /// bf16 activations and frozen weights, f32 masters, gradients and moments). The caller runs
    /// [`crate::train_as`] with the matching type; recorded so that a resumed run keeps it.
    pub precision: Precision,
    /// `--tf32`: the CUDA device's f32 products in TF32 (set on the device by the caller; recorded
    /// here so that a resumed run keeps it, and in the summary).
    pub tf32: bool,
    /// Refuse to start when the memory plan's predicted peak exceeds the memory available.
    pub memory_check: bool,
    pub eval_every: u64,
    pub save_every: u64,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<u64>,
    pub keep_last: usize,
    /// Use at most this many examples of each file (the first ones).
    pub max_train_examples: Option<usize>,
    pub max_eval_examples: Option<usize>,
    /// Hold out the last N training examples (before `max_train_examples` applies): train on the
    /// rest and evaluate on them instead of `eval` (`compare --sweep-lr` scores its sweep so).
    pub holdout: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    /// A new run, replacing an old one, or resuming one (see [`OutMode`]).
    pub out_mode: OutMode,
    pub progress: bool,
}

/// The numbers a run ends with (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub method: String,
    pub model: String,
    pub task: String,
    pub trainable_params: usize,
    pub base_params: usize,
    pub steps: u64,
    /// The last step's training loss (`None` for the prompt-engineered baseline, which trains nothing).
    pub final_train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub train_tokens: u64,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    /// Bytes of the exported adapter (or trained model) weights.
    pub checkpoint_bytes: u64,
    pub stopped_early: bool,
    pub export: String,
    /// The peak learning rate and warmup steps the run used (absent in older summaries).
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Set when the training loss over the last steps after warmup stayed above the untrained
    /// model's loss on the same batches: the adaptation is hurting.
    #[serde(default)]
    pub hurting: Option<Hurting>,
    /// The memory plan's predicted peak resident set (CPU runs; absent in older summaries).
    #[serde(default)]
    pub predicted_peak_bytes: Option<u64>,
    /// The heap's measured peak over the whole run (live allocations), beside `peak_rss_bytes`.
    #[serde(default)]
    pub peak_heap_bytes: Option<u64>,
    /// How the frozen block weights were held (`--base-precision`: f32, bf16, int8; absent in
    /// older summaries, which were f32).
    #[serde(default)]
    pub base_precision: Option<String>,
    /// The element type the run computed in (`f32`, `bf16`; absent in older summaries, which were
    /// f32, and for the prompt-engineered baseline).
    #[serde(default)]
    pub precision: Option<String>,
    /// Whether the f32 products ran in TF32 (`--tf32`, CUDA; absent in older summaries, which
    /// were without it, and for the prompt-engineered baseline).
    #[serde(default)]
    pub tf32: Option<bool>,
    /// How a bf16 or int8 base's products ran on the CPU: `widened to f32`, `int8 dot products`
    /// or `bf16 dot products (<path>)` (absent for other bases and in older summaries, which
    /// widened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_products: Option<String>,
}

/// A run's training loss against the untrained model's (the method set aside, a task head at its
/// init) on the same batches: the mean over the last `steps` steps after warmup (fewer in a short
/// run or a resumed one).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Hurting {
    pub steps: u64,
    pub train_loss: f64,
    pub untrained_loss: f64,
}

impl Hurting {
    /// The warning a summary prints.
    pub fn warning(&self) -> String {
        format!(
            "warning: over the last steps after warmup the training loss ({:.4}) stayed above the untrained model's \
             loss on the same batches ({:.4}): the adaptation is hurting (try a lower --lr, a longer --warmup, or \
             another init)",
            self.train_loss, self.untrained_loss
        )
    }
}

/// What a run computes in (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 mixed precision (CUDA): bf16 activations and frozen weights; f32 masters, gradients
    /// and optimizer moments for what trains.
    Bf16,
}

impl std::fmt::Display for Precision {
    /// As the command line spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("`{other}`: expected f32 or bf16")),
        }
    }
}
