//! `tuna train`, `tuna eval`, `tuna export`: command-line arguments (parse only) turned into the
//! trainer's validated settings.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use tuna_models::adapt::{EncoderKind, LoraConfig, Method, PromptInit};
use tuna_models::checkpointing::Checkpointing;
use tuna_trainer::{Decay, Fields, OutMode, Task, TrainConfig};

/// The largest `--batch-size` (examples per step) and `--steps` accepted.
pub const MAX_BATCH: u64 = 1 << 16;
pub const MAX_STEPS: u64 = 1 << 40;

/// `Err` with `msg` unless `ok`: the range checks of the flags below.
fn require(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!(msg())
    }
}

/// A comma-separated flag value as a list: entries trimmed, an empty entry an error naming the flag.
pub fn list_flag(flag: &str, value: &str) -> Result<Vec<String>> {
    let items: Vec<String> = value.split(',').map(|x| x.trim().to_string()).collect();
    if let Some(i) = items.iter().position(String::is_empty) {
        bail!("{flag} {value:?}: entry {} is empty (entries are comma-separated words)", i + 1);
    }
    Ok(items)
}

/// Which adaptation method and its hyperparameters. Each is `None` unless given, so that a flag
/// no chosen method uses is refused ([`MethodArgs::check_used`]) rather than silently ignored; the
/// defaults are in the accessors below (and in `--help`).
#[derive(clap::Args, Clone, Debug)]
pub struct MethodArgs {
    /// Virtual tokens of prompt tuning, P-tuning, prefix tuning and P-tuning v2 [default: 20].
    #[arg(long)]
    pub virtual_tokens: Option<usize>,
    /// Prompt tuning init: random (N(0,1), as PEFT), vocab (embeddings of random tokens), text
    /// (--prompt-init-text), labels (the label words) [default: vocab].
    #[arg(long)]
    pub prompt_init: Option<String>,
    /// The text a `text` prompt init copies the token embeddings of (repeated or cut to n).
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// Prefix init (prefix, prefix-mlp, ptuning-v2): random (N(0,1), as PEFT), or each layer's own
    /// keys and values of real tokens run through the frozen model: vocab (random tokens), text
    /// (--prefix-init-text), labels (the label words). prefix-mlp fits its last layer to them
    /// [default: vocab].
    #[arg(long)]
    pub prefix_init: Option<String>,
    /// The text a `text` prefix init runs through the model (its tokens repeated or cut to n).
    #[arg(long)]
    pub prefix_init_text: Option<String>,
    /// Hidden size of prefix tuning's reparameterization MLP (method prefix-mlp) [default: 128].
    #[arg(long)]
    pub prefix_hidden: Option<usize>,
    /// P-tuning's prompt encoder (method ptuning): mlp (PEFT's 3-layer ReLU MLP) or lstm (PEFT's
    /// 2-layer bidirectional LSTM and MLP head) [default: mlp].
    #[arg(long)]
    pub ptuning_encoder: Option<String>,
    /// Hidden size of P-tuning's prompt encoder (method ptuning) [default: the model's hidden size,
    /// as PEFT's].
    #[arg(long)]
    pub ptuning_hidden: Option<usize>,
    /// Houlsby adapters' bottleneck [default: 32].
    #[arg(long)]
    pub bottleneck: Option<usize>,
    /// LoRA's rank [default: 8].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA's alpha (the update is scaled by alpha / r) [default: 16].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on LoRA's input during training (0 to below 1) [default: 0].
    /// (Read as written and checked as the f32 it trains with: a value that rounds to 1 is refused.)
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names LoRA adapts (default: the attention query and value).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Full fine-tuning: comma-separated name patterns (`*` wildcard) of the weights that train
    /// (default: all).
    #[arg(long)]
    pub train_patterns: Option<String>,
    /// prompt-engineered: the written prompt, `{text}` where each example's text goes; `\n`, `\t`
    /// are escapes [default: "{text}"].
    #[arg(long)]
    pub template: Option<String>,
    /// prompt-engineered: training examples shown before each question (decoders) or averaged
    /// per class (BERT) [default: 0, zero-shot; compare then also scores zero-shot].
    #[arg(long)]
    pub shots: Option<usize>,
}

/// The baseline method: the untrained model asked through a written template (nothing trains).
pub const BASELINE: &str = "prompt-engineered";

/// The prompt and prefix methods (the ones with virtual tokens).
const VIRTUAL: &[&str] = &["prompt", "ptuning", "prefix", "prefix-mlp", "ptuning-v2"];
/// The prefix methods (prefix inits).
pub(crate) const PREFIXES: &[&str] = &["prefix", "prefix-mlp", "ptuning-v2"];

/// Each method flag and the methods that use it.
pub const METHOD_FLAGS: &[(&str, &[&str])] = &[
    ("--virtual-tokens", VIRTUAL),
    ("--prompt-init", &["prompt"]),
    ("--prompt-init-text", &["prompt"]),
    ("--prefix-init", PREFIXES),
    ("--prefix-init-text", PREFIXES),
    ("--prefix-hidden", &["prefix-mlp"]),
    ("--ptuning-encoder", &["ptuning"]),
    ("--ptuning-hidden", &["ptuning"]),
    ("--bottleneck", &["houlsby"]),
    ("--lora-r", &["lora"]),
    ("--lora-alpha", &["lora"]),
    ("--lora-dropout", &["lora"]),
    ("--lora-targets", &["lora"]),
    ("--train-patterns", &["full"]),
    ("--template", &[BASELINE]),
    ("--shots", &[BASELINE]),
];

/// The method flags method `m` does not use (`compare` leaves them out of that method's run).
pub fn flags_not_for(m: &str) -> Vec<&'static str> {
    METHOD_FLAGS.iter().filter(|(_, users)| !users.contains(&m)).map(|(f, _)| *f).collect()
}

impl MethodArgs {
    fn n(&self) -> usize {
        self.virtual_tokens.unwrap_or(20)
    }
    fn prompt_init(&self) -> &str {
        self.prompt_init.as_deref().unwrap_or("vocab")
    }
    fn prefix_init(&self) -> &str {
        self.prefix_init.as_deref().unwrap_or("vocab")
    }
    fn prefix_hidden(&self) -> usize {
        self.prefix_hidden.unwrap_or(128)
    }

    /// Whether the method flag `flag` was given.
    fn given(&self, flag: &str) -> bool {
        match flag {
            "--virtual-tokens" => self.virtual_tokens.is_some(),
            "--prompt-init" => self.prompt_init.is_some(),
            "--prompt-init-text" => self.prompt_init_text.is_some(),
            "--prefix-init" => self.prefix_init.is_some(),
            "--prefix-init-text" => self.prefix_init_text.is_some(),
            "--prefix-hidden" => self.prefix_hidden.is_some(),
            "--ptuning-encoder" => self.ptuning_encoder.is_some(),
            "--ptuning-hidden" => self.ptuning_hidden.is_some(),
            "--bottleneck" => self.bottleneck.is_some(),
            "--lora-r" => self.lora_r.is_some(),
            "--lora-alpha" => self.lora_alpha.is_some(),
            "--lora-dropout" => self.lora_dropout.is_some(),
            "--lora-targets" => self.lora_targets.is_some(),
            "--train-patterns" => self.train_patterns.is_some(),
            "--template" => self.template.is_some(),
            "--shots" => self.shots.is_some(),
            _ => false,
        }
    }

    /// A method flag that none of `methods` (given by flag `which`: `--method` or `--methods`) uses
    /// is an error naming it (it would do nothing).
    pub fn check_used(&self, which: &str, methods: &[String]) -> Result<()> {
        for (flag, users) in METHOD_FLAGS {
            if self.given(flag) && !methods.iter().any(|m| users.contains(&m.as_str())) {
                bail!(
                    "{flag} applies to {} only; {which} {} would ignore it (drop it)",
                    users.join(", "),
                    methods.join(",")
                );
            }
        }
        Ok(())
    }

    /// What method `name` needs of the task and of its other settings, checked before any run
    /// starts (so that `compare` refuses before its first method trains): a `labels` init takes
    /// the label words of a classify task; a `prefix-mlp` started from real tokens reproduces them
    /// only with at least as many hidden units as virtual tokens.
    pub fn check_for_task(&self, name: &str, task: &str) -> Result<()> {
        let init = match name {
            "prompt" => Some(("--prompt-init", self.prompt_init())),
            n if PREFIXES.contains(&n) => Some(("--prefix-init", self.prefix_init())),
            _ => None,
        };
        if let Some((flag, "labels")) = init {
            require(task == "classify", || {
                format!("{flag} labels starts {name} from the label words: it needs --task classify (not {task})")
            })?;
        }
        if name == "prefix-mlp" && self.prefix_init() != "random" {
            let (h, n) = (self.prefix_hidden(), self.n());
            require(h >= n, || {
                format!(
                    "prefix-mlp with --prefix-init {}: --prefix-hidden {h} must be at least the {n} virtual tokens \
                     (the MLP's last layer is fitted to reproduce their keys and values); raise it or use --prefix-init random",
                    self.prefix_init()
                )
            })?;
        }
        Ok(())
    }

    /// The init text `name`'s method uses (`--prompt-init-text` or `--prefix-init-text`).
    pub fn init_text(&self, name: &str) -> Option<String> {
        match name {
            "prefix" | "prefix-mlp" | "ptuning-v2" => self.prefix_init_text.clone(),
            _ => self.prompt_init_text.clone(),
        }
    }

    /// The method named `name` (full, prompt, ptuning, prefix, prefix-mlp, ptuning-v2, houlsby,
    /// lora), its settings range-checked.
    pub fn method(&self, name: &str) -> Result<Method> {
        let list = |flag: &str, s: &Option<String>| -> Result<Vec<String>> {
            s.as_deref().map_or(Ok(Vec::new()), |v| list_flag(flag, v))
        };
        let n = self.n();
        let positive = |flag: &str, v: usize| require(v > 0, || format!("{flag} {v}: expected at least 1"));
        match name {
            "prompt" | "ptuning" | "prefix" | "prefix-mlp" | "ptuning-v2" => positive("--virtual-tokens", n)?,
            "houlsby" => positive("--bottleneck", self.bottleneck.unwrap_or(32))?,
            "lora" => {
                positive("--lora-r", self.lora_r.unwrap_or(8))?;
                let (a, d) = (self.lora_alpha.unwrap_or(16.0), self.lora_dropout.unwrap_or(0.0));
                // (an alpha that is 0 as the f32 the scale is computed in would train nothing)
                require(a.is_finite() && a as f32 > 0.0 && a <= 1e6, || {
                    format!("--lora-alpha {}: expected 0 < alpha <= 1e6 (and nonzero as an f32)", show_number(a))
                })?;
                // Checked as the f32 dropout is applied in (0.99999999999 is 1 there: nothing would
                // pass), echoed as written.
                require((0.0..1.0).contains(&d) && (d as f32) < 1.0, || {
                    format!("--lora-dropout {}: expected 0 <= p < 1 (and below 1 as an f32)", show_fraction(d))
                })?;
            }
            _ => {}
        }
        if name == "prefix-mlp" {
            positive("--prefix-hidden", self.prefix_hidden())?;
        }
        if let (Some(h), "ptuning") = (self.ptuning_hidden, name) {
            positive("--ptuning-hidden", h)?;
        }
        if name == "prompt" {
            let needs_text = self.prompt_init() == "text";
            require(!needs_text || self.prompt_init_text.as_deref().is_some_and(|t| !t.trim().is_empty()), || {
                "--prompt-init text needs --prompt-init-text \"...\" (the words whose embeddings start the prompt)"
                    .into()
            })?;
            require(needs_text || self.prompt_init_text.is_none(), || {
                format!("--prompt-init-text is used only with --prompt-init text (not {})", self.prompt_init())
            })?;
        }
        if matches!(name, "prefix" | "prefix-mlp" | "ptuning-v2") {
            let needs_text = self.prefix_init() == "text";
            require(!needs_text || self.prefix_init_text.as_deref().is_some_and(|t| !t.trim().is_empty()), || {
                "--prefix-init text needs --prefix-init-text \"...\" (the words whose keys and values start the prefix)"
                    .into()
            })?;
            require(needs_text || self.prefix_init_text.is_none(), || {
                format!("--prefix-init-text is used only with --prefix-init text (not {})", self.prefix_init())
            })?;
        }
        let init_of = |flag: &str, v: &str| -> Result<PromptInit> {
            Ok(match v {
                "random" => PromptInit::Random,
                "vocab" => PromptInit::SampleVocab,
                "text" => PromptInit::Text(Vec::new()),
                "labels" => PromptInit::ClassLabels(Vec::new()),
                other => bail!("{flag} {other}: expected random, vocab, text or labels"),
            })
        };
        Ok(match name {
            "full" => Method::Full { patterns: list("--train-patterns", &self.train_patterns)? },
            "prompt" => Method::Prompt { n, init: init_of("--prompt-init", self.prompt_init())? },
            "prefix" => Method::Prefix { n, projection: None, init: init_of("--prefix-init", self.prefix_init())? },
            "prefix-mlp" => Method::Prefix {
                n,
                projection: Some(self.prefix_hidden()),
                init: init_of("--prefix-init", self.prefix_init())?,
            },
            "ptuning" => Method::PTuning {
                n,
                encoder: match self.ptuning_encoder.as_deref().unwrap_or("mlp") {
                    "mlp" => EncoderKind::Mlp,
                    "lstm" => EncoderKind::Lstm,
                    other => bail!("--ptuning-encoder {other}: expected mlp or lstm"),
                },
                hidden: self.ptuning_hidden,
            },
            "ptuning-v2" => Method::PTuningV2 { n, init: init_of("--prefix-init", self.prefix_init())? },
            "houlsby" => Method::Houlsby { bottleneck: self.bottleneck.unwrap_or(32) },
            "lora" => Method::Lora(LoraConfig {
                r: self.lora_r.unwrap_or(8),
                alpha: self.lora_alpha.unwrap_or(16.0),
                dropout: self.lora_dropout.unwrap_or(0.0) as f32,
                targets: list("--lora-targets", &self.lora_targets)?,
            }),
            other => {
                bail!(
                    "unknown method `{other}`: full, prompt, ptuning, prefix, prefix-mlp, ptuning-v2, houlsby or lora"
                )
            }
        })
    }
}

/// Data, task, optimization and output settings shared by `train` and `compare`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// A Hugging Face folder (config.json, model.safetensors, tokenizer.json), a Llama .gguf, or an
    /// id (`org/name[@revision]`) in the local Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or
    /// ~/.cache/huggingface/hub), downloaded into it from $HF_ENDPOINT when not there (never with
    /// HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `--model` as given when it was a Hugging Face id (`model` then holds its cached snapshot).
    #[arg(skip)]
    pub model_name: Option<String>,
    /// lm, completion or classify.
    #[arg(long, default_value = "classify")]
    pub task: String,
    /// Training data: .jsonl (one object per line) or .csv (header row).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Evaluation data (same format); evaluated every --eval-every steps and at the end.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// The field (JSON key or CSV column) holding the text (lm, classify).
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// The field holding the prompt (completion).
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// The field holding the completion (completion: the loss covers only it).
    #[arg(long, default_value = "completion")]
    pub completion_field: String,
    /// The field holding the label (classify).
    #[arg(long, default_value = "label")]
    pub label_field: String,
    /// Comma-separated labels (default: those in the training data, sorted).
    #[arg(long)]
    pub labels: Option<String>,
    /// Comma-separated words decoders score for each label (default: the labels).
    #[arg(long)]
    pub verbalizers: Option<String>,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Rows per forward/backward pass (gradient accumulation; 1 to --batch-size); default: the batch size.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Tokens per example at most (longer ones are truncated; completion keeps the end); with the
    /// virtual tokens it must fit the model's positions. Default: 128, or what the model has room for.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Peak learning rate. Default, from sweeps on movie-review polarity (README, "Fair defaults"):
    /// lora 3e-3; houlsby 3e-3 (BERT) or 1e-3 (decoders); prefix and ptuning-v2 3e-2 (BERT) or
    /// 9e-3 (decoders); prompt and prefix-mlp 3e-2; ptuning 3e-2 (not swept); full 1.5e-4 (BERT)
    /// or 5e-5 (decoders).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps (more than --steps is cut to --steps).
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub decay: String,
    /// The decay ends at this fraction of the peak learning rate (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay (0 or more).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// How AdamW stores its two moments: f32 (PyTorch's AdamW), or bf16 (half the optimizer's
    /// memory: 4 bytes per trainable parameter instead of 8; stochastically rounded each step).
    #[arg(long, default_value = "f32")]
    pub optimizer_state: String,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Activation checkpointing: off, every (every transformer block) or k (every k-th block, from
    /// the first). A checkpointed block keeps only its input and recomputes its forward during the
    /// backward: less activation memory, about one more forward of time, the same numbers.
    #[arg(long, default_value = "off", value_name = "POLICY", allow_hyphen_values = true)]
    pub checkpoint_activations: Checkpointing,
    /// Run AdamW inside the backward: each trainable tensor is updated, and its gradient freed, as
    /// soon as its gradient is complete, so the gradients of the whole model are never held at
    /// once (full fine-tuning's memory). The same numbers; needs one pass per step (no
    /// --micro-batch below --batch-size) and no global-norm clipping (--clip 0).
    #[arg(long)]
    pub update_in_backward: bool,
    /// How the frozen weights of the transformer blocks are held: f32 (as loaded), bf16 (half the
    /// memory), int8 (1.0625 bytes a weight: one f32 scale per 64 inputs of an output channel) or q4 (a GGUF's own Q4_0 /
    /// Q4_1 blocks kept as stored, 18 or 20 bytes per 32 weights; only for such a .gguf). CPU
    /// only, for the parameter-efficient methods (full fine-tuning trains those weights);
    /// embeddings, norms, heads and everything that trains stay f32.
    #[arg(long, default_value = "f32", value_name = "f32|bf16|int8|q4")]
    pub base_precision: tuna_models::model::BasePrecision,
    /// Start even when the memory plan (printed before the first step on the CPU) predicts a peak
    /// above the memory available.
    #[arg(long)]
    pub no_memory_check: bool,
    /// Evaluate every N steps (N >= 1; with --eval; also at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Checkpoint every N steps (N >= 1; also at each evaluation and the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Stop after this many evaluations without improvement (1 or more).
    #[arg(long)]
    pub patience: Option<u64>,
    /// Checkpoints kept besides the best (0 keeps every checkpoint).
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Use only the first N training examples.
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// Use only the first N evaluation examples.
    #[arg(long)]
    pub max_eval_examples: Option<usize>,
    /// Hold out the last N training examples: train on the rest and evaluate on them instead of
    /// --eval (compare --sweep-lr scores its learning rates so, never on the eval data).
    #[arg(long)]
    pub holdout: Option<usize>,
    /// Seeds the data order, the new parameters' init and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (metrics.jsonl, checkpoints/, adapter/ or model/, summary.json); for compare,
    /// the comparison's folder (default runs/compare), one subfolder per method.
    #[arg(long, default_value = "runs/tuna")]
    pub out: PathBuf,
    /// Continue from the latest valid checkpoint in --out (none is an error).
    #[arg(long, conflicts_with_all = ["overwrite", "resume_or_start"])]
    pub resume: bool,
    /// Continue from the latest valid checkpoint in --out, or start a new run where --out holds none.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume_or_start: bool,
    /// Replace the run --out holds (its checkpoints, metrics, summary and export; other files stay).
    #[arg(long)]
    pub overwrite: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// cpu, cuda, cuda:N, gpu (cuda) or auto (CUDA where a device is found, else the CPU) (CUDA training is bf16 mixed precision by default, or f32 with --precision; tested on the emulated CUDA device but not yet on a GPU: see the README).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// On CUDA: f32 matrix products on the tensor cores in TF32 (each operand rounded to 10
    /// mantissa bits, the sums in f32; what PyTorch calls allow_tf32). Off: f32 throughout.
    #[arg(long)]
    pub tf32: bool,
    /// What the run computes in: f32, or bf16 mixed precision (CUDA: train, profile, compare): bf16
    /// activations and frozen weights, f32 master weights, gradients and AdamW moments for what
    /// trains. The CPU computes in f32 (its bf16 frozen base is --base-precision bf16). Default: bf16
    /// on CUDA (f32 with --tf32, for the prompt-engineered baseline and for --train-patterns), f32 on
    /// the CPU; a run resumed on CUDA without --tf32 continues in the precision its checkpoint was
    /// trained in (a bf16 run resumed on the CPU or with --tf32 is refused by name).
    #[arg(long, value_name = "f32|bf16")]
    pub precision: Option<tuna_trainer::Precision>,
}

impl RunArgs {
    /// The prompt-engineered baseline's settings (`--task classify` only: it scores classes).
    /// `--base-precision` other than f32 where it cannot apply, refused by name: full fine-tuning
    /// (it trains those weights), the prompt-engineered baseline (it scores the f32 model, training
    /// nothing) and CUDA (the low-precision base is CPU-only). `compare` asks for every method
    /// before the first one trains.
    pub fn check_base_precision(&self, method: &str) -> Result<()> {
        let bp = self.base_precision;
        if bp == tuna_models::model::BasePrecision::F32 {
            return Ok(());
        }
        require(method != "full", || {
            format!("--base-precision {bp} holds the frozen base weights in {bp}; full fine-tuning trains them (use f32, or a parameter-efficient method)")
        })?;
        require(method != BASELINE, || {
            format!("--base-precision {bp}: {BASELINE} scores the f32 model and trains nothing (drop the flag, or the method)")
        })?;
        // The advice must be one the other checks let through: --precision bf16 and --tf32 are CUDA's.
        let bf16 = self.precision == Some(tuna_trainer::Precision::Bf16);
        let cuda_only: Vec<&str> = [(bf16, "--precision bf16"), (self.tf32, "--tf32")]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| f)
            .collect();
        require(!self.on_cuda()?, || match (bp, cuda_only.as_slice()) {
            (tuna_models::model::BasePrecision::Bf16, ["--precision bf16", ..]) => format!(
                "--base-precision bf16 applies to the CPU; on CUDA (--device {}), --precision bf16 already stores the \
                 frozen weights in bf16: drop --base-precision",
                self.device
            ),
            (tuna_models::model::BasePrecision::Bf16, []) if self.precision.is_none() => format!(
                "--base-precision bf16 applies to the CPU; on CUDA (--device {}), training is bf16 mixed precision by \
                 default, which already stores the frozen weights in bf16: drop --base-precision",
                self.device
            ),
            (_, []) => {
                format!(
                    "--base-precision {bp} runs on the CPU only (--device {}): use --device cpu, or f32",
                    self.device
                )
            }
            (_, flags) => format!(
                "--base-precision {bp} runs on the CPU only (--device {}), and {} on CUDA only: drop --base-precision \
                 to train on CUDA, or drop {} to train on the CPU (--device cpu)",
                self.device,
                flags.join(" and "),
                flags.join(" and ")
            ),
        })?;
        // q4 keeps a GGUF's blocks: a Hugging Face folder is refused before anything is created
        // (whether a .gguf holds Q4 block weights is checked as it opens).
        let folder = self.model.as_deref().filter(|m| bp == tuna_models::model::BasePrecision::Q4 && m.is_dir());
        require(folder.is_none(), || {
            format!(
                "--base-precision q4 keeps a GGUF file's Q4_0 or Q4_1 weights as they are stored; {} is a Hugging \
                 Face folder (q4 needs a .gguf; bf16 and int8 work on any model)",
                folder.map(|m| m.display().to_string()).unwrap_or_default()
            )
        })
    }

    pub fn baseline(&self, m: &MethodArgs) -> Result<tuna_trainer::BaselineConfig> {
        self.check_base_precision(BASELINE)?;
        let model = self.model.clone().context("--model is required")?;
        let train = self.train.clone().context("--train is required")?;
        require(self.task == "classify", || {
            format!("{BASELINE} scores classes: it needs --task classify (not {})", self.task)
        })?;
        self.check_ranges(1.0)?;
        let template = tuna_trainer::baseline::parse_template(m.template.as_deref().unwrap_or("{text}"))?;
        let list = |flag: &str, v: &Option<String>| v.as_deref().map(|v| list_flag(flag, v)).transpose();
        let out_mode = match (self.resume, self.resume_or_start, self.overwrite) {
            (true, _, _) => OutMode::Resume,
            (_, true, _) => OutMode::ResumeOrStart,
            (_, _, true) => OutMode::Overwrite,
            _ => OutMode::New,
        };
        Ok(tuna_trainer::BaselineConfig {
            model,
            model_name: self.model_name.clone(),
            fields: Fields {
                text: self.text_field.clone(),
                prompt: self.prompt_field.clone(),
                completion: self.completion_field.clone(),
                label: self.label_field.clone(),
            },
            train,
            eval: self.eval.clone(),
            labels: list("--labels", &self.labels)?,
            verbalizers: list("--verbalizers", &self.verbalizers)?,
            batch_size: self.batch_size,
            max_len: self.max_len,
            max_eval_examples: self.max_eval_examples,
            holdout: self.holdout,
            seed: self.seed,
            out: self.out.clone(),
            out_mode,
            template,
            shots: m.shots.unwrap_or(0),
        })
    }

    /// `--precision` against `method`: bf16 with full fine-tuning of some weights only is refused
    /// (the weights a pattern leaves frozen are held in bf16 only: the exported model would carry
    /// them rounded). `compare` asks for every method before the first one trains.
    pub fn check_precision_method(&self, method: &Method) -> Result<()> {
        match method {
            Method::Full { patterns } => {
                require(self.precision != Some(tuna_trainer::Precision::Bf16) || patterns.is_empty(), || {
                    "--precision bf16 with --train-patterns: the frozen weights would be exported rounded to bf16; \
                     train every weight, or use a parameter-efficient method"
                        .to_string()
                })
            }
            _ => Ok(()),
        }
    }

    /// The trainer's settings for `method`.
    pub fn config(&self, method: Method, init_text: Option<String>) -> Result<TrainConfig> {
        let model = self.model.clone().context("--model is required")?;
        let train = self.train.clone().context("--train is required")?;
        self.check_base_precision(method.name())?;
        let task: Task = self.task.parse().map_err(|e| anyhow::anyhow!("--task: {e}"))?;
        let decay: Decay = self.decay.parse().map_err(|e| anyhow::anyhow!("--decay: {e}"))?;
        let lr = self.lr.unwrap_or_else(|| default_lr(&method, is_decoder(&model)));
        self.check_ranges(lr)?;
        self.check_precision_method(&method)?;
        let precision = self.precision_for(Some(&method))?;
        let list = |flag: &str, v: &Option<String>| v.as_deref().map(|v| list_flag(flag, v)).transpose();
        let out_mode = match (self.resume, self.resume_or_start, self.overwrite) {
            (true, _, _) => OutMode::Resume,
            (_, true, _) => OutMode::ResumeOrStart,
            (_, _, true) => OutMode::Overwrite,
            _ => OutMode::New,
        };
        Ok(TrainConfig {
            model,
            model_name: self.model_name.clone(),
            method,
            task,
            fields: Fields {
                text: self.text_field.clone(),
                prompt: self.prompt_field.clone(),
                completion: self.completion_field.clone(),
                label: self.label_field.clone(),
            },
            train,
            eval: self.eval.clone(),
            labels: list("--labels", &self.labels)?,
            verbalizers: list("--verbalizers", &self.verbalizers)?,
            prompt_init_text: init_text,
            batch_size: self.batch_size,
            micro_batch: self.micro_batch.unwrap_or(self.batch_size),
            max_len: self.max_len,
            steps: self.steps,
            lr,
            // The default warmup (10) must not exceed a short run.
            warmup: self.warmup.min(self.steps),
            decay,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            optimizer_state: self.optimizer_state.parse().map_err(|e| anyhow::anyhow!("--optimizer-state {e}"))?,
            clip: (self.clip > 0.0).then_some(self.clip),
            checkpoint_activations: self.checkpoint_activations,
            update_in_backward: self.update_in_backward,
            base_precision: self.base_precision,
            tf32: self.tf32,
            precision,
            memory_check: !self.no_memory_check,
            eval_every: self.eval_every,
            save_every: self.save_every,
            patience: self.patience,
            keep_last: self.keep_last,
            max_train_examples: self.max_train_examples,
            max_eval_examples: self.max_eval_examples,
            holdout: self.holdout,
            seed: self.seed,
            out: self.out.clone(),
            out_mode,
            progress: !self.quiet,
        })
    }

    /// `--precision bf16` where it does not apply (the prompt-engineered baseline, which trains nothing),
    /// refused by name before anything is written.
    pub fn check_precision_for(&self, what: &str) -> Result<()> {
        require(self.precision != Some(tuna_trainer::Precision::Bf16), || {
            format!("--precision bf16 is CUDA's mixed precision for training; {what} trains nothing and scores in f32")
        })
    }

    /// The precision a run of `method` (`None`: a multi-task run) computes in: `--precision` as
    /// given; else f32 on the CPU, with `--tf32` (f32 products) and for full fine-tuning with
    /// `--train-patterns` (its frozen weights would be exported rounded); else, resuming, the one
    /// the run's newest checkpoint was trained in; else bf16 (CUDA's default). A resume these
    /// rules put in another precision than its checkpoint's (a bf16 run resumed on the CPU, or
    /// with `--tf32`) is refused by name. (The prompt-engineered baseline trains nothing and
    /// scores in f32.)
    pub fn precision_for(&self, method: Option<&Method>) -> Result<tuna_trainer::Precision> {
        use tuna_trainer::Precision;
        if let Some(p) = self.precision {
            return Ok(p);
        }
        let cuda = self.on_cuda()?;
        if !cuda || self.tf32 || matches!(method, Some(Method::Full { patterns }) if !patterns.is_empty()) {
            return Ok(Precision::F32);
        }
        if self.resume || self.resume_or_start {
            if let Some(p) = tuna_trainer::saved_precision(&self.out) {
                return Ok(p);
            }
        }
        Ok(Precision::Bf16)
    }

    /// The `note:` for a run in `p` that `--precision` did not ask for, where it is bf16 (CUDA's
    /// default, which a user of f32 runs may not expect): what it is and how to have f32.
    pub fn precision_note(&self, p: tuna_trainer::Precision) -> Option<String> {
        (self.precision.is_none() && p == tuna_trainer::Precision::Bf16).then(|| {
            "note: training in bf16 mixed precision, CUDA's default (or the resumed run's): --precision f32 for f32"
                .to_string()
        })
    }

    /// Whether `--device` names a CUDA device (`cuda`, `cuda:N`, `gpu`, or `auto` where one is
    /// found); an unknown device is the error naming it.
    pub fn on_cuda(&self) -> Result<bool> {
        let d = tuna_kernels::Device::parse(&self.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
        Ok(matches!(d, tuna_kernels::Device::Cuda(_)))
    }

    /// Every numeric flag in its range (`lr`: the learning rate in force, given or default).
    pub fn check_ranges(&self, lr: f64) -> Result<()> {
        let cuda = self.on_cuda()?;
        require(!self.tf32 || cuda, || {
            format!("--tf32 applies to CUDA's matrix products; --device {} has no TF32", self.device)
        })?;
        let bf16 = self.precision == Some(tuna_trainer::Precision::Bf16);
        require(!bf16 || cuda, || {
            format!(
                "--precision bf16 is CUDA's mixed precision; --device {} computes in f32 (a bf16 frozen base on the \
                 CPU is --base-precision bf16)",
                self.device
            )
        })?;
        require(!(bf16 && self.tf32), || {
            "--tf32 rounds f32 products; --precision bf16 has none (its products take bf16 operands)".to_string()
        })?;
        let at_least_1 = |flag: &str, v: u64| require(v >= 1, || format!("{flag} {v}: expected at least 1"));
        let in_range = |flag: &str, v: u64, max: u64| {
            require((1..=max).contains(&v), || format!("{flag} {v}: expected 1 to {max}"))
        };
        in_range("--batch-size", self.batch_size as u64, MAX_BATCH)?;
        in_range("--steps", self.steps, MAX_STEPS)?;
        at_least_1("--eval-every", self.eval_every)?;
        at_least_1("--save-every", self.save_every)?;
        if let Some(p) = self.patience {
            at_least_1("--patience", p)?;
        }
        for (flag, v) in
            [("--max-train-examples", self.max_train_examples), ("--max-eval-examples", self.max_eval_examples)]
        {
            if let Some(v) = v {
                at_least_1(flag, v as u64)?;
            }
        }
        if let Some(m) = self.micro_batch {
            let b = self.batch_size;
            require(m >= 1 && m <= b, || format!("--micro-batch {m}: expected 1 to --batch-size ({b})"))?;
        }
        // Checked as the f32 the optimizer computes with.
        let f32_ok = |v: f64| (v as f32).is_finite();
        // A rate that rounds to zero in f32 would train nothing.
        require(f32_ok(lr) && lr as f32 > 0.0, || {
            format!("--lr {}: expected a positive number from 1.4e-45 to 3.4e38 (an f32)", show_number(lr))
        })?;
        let r = self.min_lr_ratio;
        require((0.0..=1.0).contains(&r), || format!("--min-lr-ratio {}: expected 0 to 1", show_number(r)))?;
        let wd = self.weight_decay;
        require(f32_ok(wd) && wd >= 0.0, || format!("--weight-decay {}: expected 0 or more", show_number(wd)))?;
        let c = self.clip;
        // A norm that is 0 as an f32 but not 0 would clip every gradient to nothing.
        require(f32_ok(c) && c >= 0.0 && (c == 0.0 || c as f32 > 0.0), || {
            format!("--clip {}: expected 0 (off) or a positive norm (nonzero as an f32)", show_number(c))
        })?;
        if self.update_in_backward {
            // Clipping scales every gradient by the norm of all of them: known only once all exist.
            require(c == 0.0, || {
                format!("--update-in-backward applies each gradient as soon as it is complete, before the global norm that --clip {c} scales by is known: add --clip 0")
            })?;
            let (m, b) = (self.micro_batch.unwrap_or(self.batch_size), self.batch_size);
            require(m >= b, || {
                format!("--update-in-backward applies each gradient after one backward: --micro-batch {m} would accumulate {} passes per step (use --batch-size {m}, or drop --micro-batch)", b.div_ceil(m))
            })?;
        }
        if let Some(k) = self.holdout {
            require(self.eval.is_none() && self.max_eval_examples.is_none(), || {
                format!("--holdout {k} evaluates on the last {k} training examples: --eval and --max-eval-examples do not apply (drop them)")
            })?;
        }
        Ok(())
    }
}

/// A method's learning rate when `--lr` is not given, for a decoder (GPT-2, Llama: `decoder`) or
/// an encoder (BERT). Chosen by `compare --sweep-lr` on movie-review polarity (README, "Fair
/// defaults"): LoRA 3e-3 on both families; Houlsby 3e-3 on MiniLM but 1e-3 on SmolLM2; prefix
/// methods 3e-2 on MiniLM but 9e-3 on SmolLM2; full fine-tuning 1.5e-4 on MiniLM (5e-5, not
/// swept, on decoders); prompt tuning 3e-2 (the sweep's 9e-2 did worse in the full run); P-tuning
/// 3e-2, prompt tuning's (not swept).
pub fn default_lr(method: &Method, decoder: bool) -> f64 {
    match (method, decoder) {
        (Method::Full { .. }, false) => 1.5e-4,
        (Method::Full { .. }, true) => 5e-5,
        (Method::Lora(_), _) => 3e-3,
        (Method::Houlsby { .. }, false) => 3e-3,
        (Method::Houlsby { .. }, true) => 1e-3,
        (Method::Prefix { projection: None, .. } | Method::PTuningV2 { .. }, true) => 9e-3,
        _ => 3e-2,
    }
}

/// Whether `model` is a decoder (a `.gguf`, or a folder whose `config.json` names another
/// `model_type` than BERT's), for [`default_lr`]; an unreadable config counts as a decoder (the
/// load reports it).
pub fn is_decoder(model: &std::path::Path) -> bool {
    if model.extension().is_some_and(|e| e == "gguf") {
        return true;
    }
    // The one config reader; a folder it cannot read picks the decoders' defaults (the run itself
    // then reports what is wrong with the folder).
    let path = model.join("config.json");
    let cfg =
        std::fs::read_to_string(&path).ok().and_then(|t| tuna_models::config::ModelConfig::from_json(&t, &path).ok());
    !matches!(cfg, Some(tuna_models::config::ModelConfig::Bert(_)))
}

/// Print a run's summary as aligned rows.
pub fn print_summary(s: &tuna_trainer::RunSummary) {
    let mut t = tuna_trainer::Summary::new();
    t.row("method", &s.method).row("steps", s.steps);
    t.row("trainable params", format!("{} ({:.3}% of {})", s.trainable_params, pct(s), s.base_params));
    if let Some(l) = s.final_train_loss {
        t.row("final train loss", format!("{l:.4}"));
    }
    if let Some(l) = s.eval_loss {
        t.row("eval loss", format!("{l:.4}"));
    }
    if let Some(a) = s.eval_accuracy {
        t.row("eval accuracy", format!("{a:.4}"));
    }
    if let Some(p) = s.eval_perplexity {
        t.row("eval perplexity", format!("{p:.3}"));
    }
    if s.steps > 0 {
        t.row("throughput", tuna_trainer::tokens_per_s(s.tokens_per_s));
    }
    let mut peak = tuna_trainer::human_bytes(s.peak_rss_bytes);
    if let Some(p) = s.predicted_peak_bytes {
        let off = (s.peak_rss_bytes as f64 / p.max(1) as f64 - 1.0) * 100.0;
        peak += &format!(" (the memory plan predicted {}: {off:+.0}%)", tuna_trainer::human_bytes(p));
    }
    t.row("peak memory", peak);
    if let Some(p) = s.base_precision.as_deref().filter(|p| *p != "f32") {
        t.row("base precision", format!("{p} (the frozen block weights; --base-precision)"));
    }
    t.row("checkpoint", format!("{} ({})", s.export, tuna_trainer::human_bytes(s.checkpoint_bytes)));
    print!("{t}");
    if let Some(h) = &s.hurting {
        println!("{}", h.warning());
    }
}

/// Print a multi-task run's summary: the run's rows, then a row per task.
pub fn print_multi_summary(s: &tuna_trainer::MultiSummary) {
    let mut t = tuna_trainer::Summary::new();
    t.row("tasks", s.tasks.len()).row("steps", s.steps);
    if let Some(l) = s.final_train_loss {
        t.row("final train loss", format!("{l:.4}"));
    }
    if let Some(l) = s.eval_loss {
        t.row("eval loss (mean)", format!("{l:.4}"));
    }
    if s.steps > 0 {
        t.row("throughput", tuna_trainer::tokens_per_s(s.tokens_per_s));
    }
    t.row("peak memory", tuna_trainer::human_bytes(s.peak_rss_bytes));
    if let Some(p) = s.base_precision.as_deref().filter(|p| *p != "f32") {
        t.row("base precision", format!("{p} (the frozen block weights; --base-precision)"));
    }
    for k in &s.tasks {
        let mut v = format!("{} {}, {} params, lr {:e}", k.method, k.task, k.trainable_params, k.lr);
        if let Some(l) = k.final_train_loss {
            v += &format!(", train loss {l:.4}");
        }
        if let Some(l) = k.eval_loss {
            v += &format!(", eval loss {l:.4}");
        }
        if let Some(a) = k.eval_accuracy {
            v += &format!(", accuracy {a:.4}");
        }
        v += &format!(" -> {}", k.export);
        t.row(&format!("task {}", k.name), v);
    }
    print!("{t}");
}

/// Trainable parameters as a percentage of the base model's.
pub fn pct(s: &tuna_trainer::RunSummary) -> f64 {
    100.0 * s.trainable_params as f64 / s.base_params.max(1) as f64
}

/// A profile as a markdown table: per op kind, calls and milliseconds per step, and the share of
/// the step; then the optimizer and what no op accounts for.
pub fn profile_table(p: &tuna_trainer::Profile) -> String {
    let pct = |ms: f64| 100.0 * ms / p.step_ms.max(1e-12);
    let mut s = format!(
        "{} steps measured{}: {:.1} ms per step, {:.0} tokens/s, peak saved activations {} (times per step; an op's forward time runs from the previous op's end)\n\n",
        p.steps,
        if p.precision == "f32" { String::new() } else { format!(" in {} mixed precision", p.precision) },
        p.step_ms,
        p.tokens_per_s,
        tuna_trainer::human_bytes(p.peak_saved_bytes as u64)
    );
    match p.peak_gflops {
        Some(peak) => {
            s += &format!(
                "GFLOP/s: achieved by the counted ops (matrix products and attention; 2 per multiply-add), with the share of this CPU's f32 GEMM rate, {peak:.0} GFLOP/s (a 1024^3 product measured before the steps: the f32 path's practical peak)"
            );
            let base =
                p.rows.iter().find_map(|r| r.kind.strip_prefix("matmul (").and_then(|k| k.strip_suffix(" base)")));
            // q4 takes the int8 path (its blocks requantized to int8 as the product packs them).
            let on = |b: &str| if b == "bf16" { "bf16" } else { "int8" };
            match (base, &p.base_path, p.base_peak_gops) {
                (Some(b), Some(path), Some(peak)) => {
                    s += &format!(
                        "; the {b} base's products run on {} dot products ({path}{}) and are read against that path's rate, {peak:.0} GOP/s (a 1024^3 product, the activations' {} included)",
                        on(b),
                        if b == "q4" { ", its blocks requantized to int8 per product" } else { "" },
                        if b == "bf16" { "rounding" } else { "quantization" }
                    )
                }
                (Some(b), Some(_), None) => {
                    s += &format!("; the {b} base's products widen to f32 and run on it (no {} dot-product path here, or {}=widen)", on(b), if b == "bf16" { "TUNA_CPU_MATRIX_BF16" } else { "TUNA_CPU_MATRIX" })
                }
                _ => s += "; a low-precision base widens to f32 and runs on it",
            }
            s += "\n\n";
        }
        None => s += "GFLOP/s: achieved by the counted ops (matrix products and attention)\n\n",
    }
    s += "| op | forward calls | forward ms | fwd GFLOP/s | backward calls | backward ms | bwd GFLOP/s | % of step | saved at the peak |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    let rate = |kind: &str, g: Option<f64>| {
        let peak = match p.base_peak_gops {
            Some(lowp) if kind.starts_with("matmul (") && kind.ends_with(" base)") => Some(lowp),
            _ => p.peak_gflops,
        };
        match (g, peak) {
            (Some(g), Some(peak)) => format!("{g:.1} ({:.0}%)", 100.0 * g / peak),
            (Some(g), None) => format!("{g:.1}"),
            (None, _) => String::new(),
        }
    };
    let mut accounted = p.optimizer_ms;
    for r in &p.rows {
        let t = r.forward_ms + r.backward_ms;
        accounted += t;
        s += &format!(
            "| {} | {} | {:.2} | {} | {} | {:.2} | {} | {:.1}% | {} |\n",
            r.kind,
            r.forward_calls,
            r.forward_ms,
            rate(&r.kind, r.forward_gflops),
            r.backward_calls,
            r.backward_ms,
            rate(&r.kind, r.backward_gflops),
            pct(t),
            if r.saved_at_peak > 0 { tuna_trainer::human_bytes(r.saved_at_peak as u64) } else { String::new() }
        );
    }
    // With --update-in-backward the updates run inside the backward (charged to the ops there).
    s += &format!(
        "| optimizer (clip, AdamW after the backward) | | | | | {:.2} | | {:.1}% | |\n",
        p.optimizer_ms,
        pct(p.optimizer_ms)
    );
    let rest = (p.step_ms - accounted).max(0.0);
    s += &format!("| other (batching, tape bookkeeping) | | | | | {:.2} | | {:.1}% | |\n", rest, pct(rest));
    s
}

/// `v` as a user would write it: plain (`0`, `0.001`, `-3`) from 1e-4 to 1e6, else in exponent
/// form (`1e-45`, `3.5e38`), never Rust's `0e0`.
pub fn show_number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || (1e-4..1e6).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// A fraction (a probability) as [`show_number`] shows it, a whole one with a decimal: `1.0`,
/// not the count-like `1`.
pub fn show_fraction(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.1}")
    } else {
        show_number(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rates_follow_the_model_family() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/tuna-models/tests/fixtures");
        assert!(is_decoder(&fixtures.join("llama")) && is_decoder(&fixtures.join("gpt2")));
        assert!(!is_decoder(&fixtures.join("bert")));
        assert!(is_decoder(std::path::Path::new("any/model.gguf")));
        let prefix = Method::Prefix { n: 20, projection: None, init: PromptInit::SampleVocab };
        assert_eq!((default_lr(&prefix, false), default_lr(&prefix, true)), (3e-2, 9e-3));
        let houlsby = Method::Houlsby { bottleneck: 32 };
        assert_eq!((default_lr(&houlsby, false), default_lr(&houlsby, true)), (3e-3, 1e-3));
    }

    #[test]
    fn a_lora_dropout_that_is_1_as_an_f32_is_refused_as_written() {
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            m: MethodArgs,
        }
        let dropout = |v: &str| {
            let a = <Args as clap::Parser>::try_parse_from(["tuna".into(), format!("--lora-dropout={v}")]).unwrap();
            a.m.method("lora").map(|m| match m {
                Method::Lora(c) => c.dropout,
                other => panic!("{other:?}"),
            })
        };
        for v in ["0.99999999999", "0.99999999", "1.0", "1.5", "-0.1", "NaN"] {
            let e = dropout(v).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--lora-dropout {v}: expected 0 <= p < 1")), "{v}: {e}");
        }
        // An integral value is echoed with a decimal (it is a probability, not a count).
        let e = dropout("1").unwrap_err().to_string();
        assert!(e.starts_with("--lora-dropout 1.0: expected 0 <= p < 1"), "{e}");
        // The largest f32 below 1 (0.99999994) and plain values still train.
        assert_eq!(dropout("0.99999994").unwrap(), 0.99999994_f32);
        assert_eq!(dropout("0.1").unwrap(), 0.1_f32);
    }

    /// A low-precision base on CUDA is refused with advice the other checks let through: not
    /// `--device cpu` beside `--precision bf16` or `--tf32` (both CUDA's).
    #[test]
    fn a_base_precision_on_cuda_is_refused_with_advice_that_can_be_followed() {
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            r: RunArgs,
        }
        let refusal = |extra: &[&str]| {
            let argv = ["tuna", "--device", "cuda"].iter().chain(extra).map(|s| s.to_string());
            let a = <Args as clap::Parser>::try_parse_from(argv).unwrap();
            a.r.check_base_precision("lora").unwrap_err().to_string()
        };
        let e = refusal(&["--precision", "bf16", "--base-precision", "bf16"]);
        assert_eq!(
            e,
            "--base-precision bf16 applies to the CPU; on CUDA (--device cuda), --precision bf16 already stores the \
             frozen weights in bf16: drop --base-precision"
        );
        assert!(!e.contains("--device cpu"), "{e}");
        let e = refusal(&["--precision", "bf16", "--base-precision", "int8"]);
        assert!(e.contains("and --precision bf16 on CUDA only: drop --base-precision to train on CUDA, or drop --precision bf16 to train on the CPU (--device cpu)"), "{e}");
        let e = refusal(&["--tf32", "--base-precision", "bf16"]);
        assert!(e.contains("or drop --tf32 to train on the CPU"), "{e}");
        // Not asked for, CUDA's bf16 mixed precision is the default: the advice says so.
        let e = refusal(&["--base-precision", "bf16"]);
        assert!(e.contains("on CUDA (--device cuda), training is bf16 mixed precision by default"), "{e}");
        let e = refusal(&["--precision", "f32", "--base-precision", "bf16"]);
        assert!(e.contains("runs on the CPU only (--device cuda): use --device cpu, or f32"), "{e}");
        let e = refusal(&["--base-precision", "int8"]);
        assert!(e.contains("runs on the CPU only (--device cuda): use --device cpu, or f32"), "{e}");
    }

    #[test]
    fn numbers_are_echoed_as_written() {
        for (v, want) in
            [(0.0, "0"), (1e-3, "0.001"), (2.5, "2.5"), (1e-300, "1e-300"), (3.5e38, "3.5e38"), (-1e-9, "-1e-9")]
        {
            assert_eq!(show_number(v), want);
        }
    }
}
