//! Training-step throughput and peak memory of one (model, method) configuration on the CPU:
//! random seeded weights at MiniLM or SmolLM2-135M shape, random tokens, W warmup + N timed steps
//! (forward, backward, AdamW), one JSON line out. Its PyTorch + PEFT peer is
//! `scripts/bench/train_step.py` (same JSON); `scripts/bench/train_step.sh` runs both.
//!
//! Run: `cargo bench -p tuna-models --bench train_step -- --model minilm --method lora
//! --batch 16 --seq 64 --steps 10 --warmup 2 [--layers L] [--seed S] [--device cpu|cuda]
//! [--base-precision f32|bf16|int8] [--tf32] [--precision f32|bf16]` (`--tf32`: CUDA's f32
//! products in TF32; `--precision bf16`: CUDA's bf16 mixed precision).
//! `--model gpt2` is GPT-2 small (the GPU check's training-step shape, `--device cuda`).
//!
//! MiniLM is a sequence classifier (mean-pooled encoder output, a trainable 2-class linear head,
//! cross-entropy); SmolLM2 is a causal LM (Hugging Face's shifted loss over every token). Tokens
//! per second count content tokens only (`batch * seq * steps / time`), never virtual ones.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::optim::AdamW;
use tuna_autograd::optim::OptimKernels;
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::ops::adamw::AdamWParams;
use tuna_kernels::testing::Rng;
use tuna_kernels::{Cpu, Cuda};
use tuna_models::adapt::{LoraConfig, Method, PromptInit};
use tuna_models::config::{BertConfig, Gpt2Config, LlamaConfig, ModelConfig};
use tuna_models::model::{AnyModel, BasePrecision};
use tuna_models::weights::WeightSource;

type Res<T> = std::result::Result<T, Box<dyn Error>>;
/// The element type a run computes in: f32, or bf16 mixed precision (CUDA: bf16 activations and
/// frozen weights, f32 masters, gradients and moments).
trait RunE: tuna_autograd::Float<Acc = f32> {}
impl<T: tuna_autograd::Float<Acc = f32>> RunE for T {}
type T32<B, E> = Tensor<B, E>;

/// Parsed command line.
struct Args {
    model: String,
    method: String,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    layers: Option<usize>,
    seed: u64,
    device: String,
    /// How the frozen block weights are held (f32, bf16, int8): `--base-precision`.
    base_precision: BasePrecision,
    /// `--profile-ops`: per-op times of the timed steps on stderr (tuna_autograd::stats), the
    /// peer of train_step.py's torch.profiler table on the same workload.
    profile_ops: bool,
    tf32: bool,
    /// `--precision f32|bf16`: what the step computes in (bf16: CUDA's mixed precision).
    precision: String,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        model: "minilm".into(),
        method: "lora".into(),
        batch: 16,
        seq: 64,
        steps: 10,
        warmup: 2,
        layers: None,
        seed: 0,
        device: "cpu".into(),
        base_precision: BasePrecision::F32,
        profile_ops: false,
        tf32: false,
        precision: "f32".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--bench" {
            continue; // cargo bench passes it
        }
        if k == "--profile-ops" {
            a.profile_ops = true;
            continue;
        }
        if k == "--tf32" {
            a.tf32 = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--model" => a.model = v,
            "--method" => a.method = v,
            "--batch" => a.batch = v.parse()?,
            "--seq" => a.seq = v.parse()?,
            "--steps" => a.steps = v.parse()?,
            "--warmup" => a.warmup = v.parse()?,
            "--layers" => a.layers = Some(v.parse()?),
            "--seed" => a.seed = v.parse()?,
            "--device" => a.device = v,
            "--base-precision" => a.base_precision = v.parse()?,
            "--precision" => a.precision = v,
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    if a.batch == 0 || a.seq == 0 || a.steps == 0 {
        return Err("batch, seq and steps must be at least 1".into());
    }
    Ok(a)
}

/// A weight source that draws each tensor when it is asked for (seeded by name), so the process
/// never holds a second copy of the model: peak memory is the model's, as for PyTorch's
/// `from_config`. Matrices ~ N(0, 0.02) (Hugging Face's init), norm weights 1, biases 0.
struct RandomWeights {
    path: PathBuf,
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
}

impl RandomWeights {
    fn new(seed: u64) -> Self {
        RandomWeights { path: PathBuf::from("random/model.safetensors"), shapes: BTreeMap::new(), seed }
    }
    fn add(&mut self, name: String, shape: &[usize]) {
        self.shapes.insert(name, shape.to_vec());
    }
}

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }
    fn get(&self, name: &str) -> Option<tuna_models::Result<Cow<'_, [f32]>>> {
        let shape = self.shapes.get(name)?;
        let n: usize = shape.iter().product();
        let is_norm = name.contains("LayerNorm") || name.contains("layernorm") || name.ends_with("norm.weight");
        let v = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else {
            let h = name
                .bytes()
                .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            let mut rng = Rng::new(h);
            (0..n).map(|_| 0.02 * rng.normal()).collect()
        };
        Some(Ok(Cow::Owned(v)))
    }
}

fn minilm_cfg() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    }
}

fn smollm2_cfg(layers: Option<usize>) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: layers.unwrap_or(30),
        num_attention_heads: 9,
        num_key_value_heads: Some(3),
        rms_norm_eps: 1e-5,
        rope_theta: 1e5,
        tie_word_embeddings: true,
        max_position_embeddings: 8192,
        head_dim: None,
    }
}

fn bert_weights(cfg: &BertConfig, seed: u64) -> RandomWeights {
    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut w = RandomWeights::new(seed);
    let norm = |w: &mut RandomWeights, n: &str| {
        w.add(format!("{n}.weight"), &[h]);
        w.add(format!("{n}.bias"), &[h]);
    };
    w.add("embeddings.word_embeddings.weight".into(), &[cfg.vocab_size, h]);
    w.add("embeddings.position_embeddings.weight".into(), &[cfg.max_position_embeddings, h]);
    w.add("embeddings.token_type_embeddings.weight".into(), &[cfg.type_vocab_size, h]);
    norm(&mut w, "embeddings.LayerNorm");
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let lin = |w: &mut RandomWeights, n: String, out: usize, inp: usize| {
            w.add(format!("{n}.weight"), &[out, inp]);
            w.add(format!("{n}.bias"), &[out]);
        };
        for n in ["query", "key", "value"] {
            lin(&mut w, format!("{p}.attention.self.{n}"), h, h);
        }
        lin(&mut w, format!("{p}.attention.output.dense"), h, h);
        norm(&mut w, &format!("{p}.attention.output.LayerNorm"));
        lin(&mut w, format!("{p}.intermediate.dense"), ff, h);
        lin(&mut w, format!("{p}.output.dense"), h, ff);
        norm(&mut w, &format!("{p}.output.LayerNorm"));
    }
    w
}

fn llama_weights(cfg: &LlamaConfig, seed: u64) -> RandomWeights {
    let (h, ff, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
    let mut w = RandomWeights::new(seed);
    w.add("model.embed_tokens.weight".into(), &[cfg.vocab_size, h]);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        w.add(format!("{p}.input_layernorm.weight"), &[h]);
        w.add(format!("{p}.post_attention_layernorm.weight"), &[h]);
        w.add(format!("{p}.self_attn.q_proj.weight"), &[q, h]);
        w.add(format!("{p}.self_attn.k_proj.weight"), &[kv, h]);
        w.add(format!("{p}.self_attn.v_proj.weight"), &[kv, h]);
        w.add(format!("{p}.self_attn.o_proj.weight"), &[h, q]);
        w.add(format!("{p}.mlp.gate_proj.weight"), &[ff, h]);
        w.add(format!("{p}.mlp.up_proj.weight"), &[ff, h]);
        w.add(format!("{p}.mlp.down_proj.weight"), &[h, ff]);
    }
    w.add("model.norm.weight".into(), &[h]);
    w
}

/// The method, with the hyperparameters the PyTorch + PEFT peer uses.
fn method(name: &str, lora_targets: &[&str]) -> Res<Method> {
    Ok(match name {
        "full" => Method::Full { patterns: vec![] },
        "prompt" => Method::Prompt { n: 20, init: PromptInit::Random },
        "prefix" => Method::Prefix { n: 20, projection: None, init: PromptInit::Random },
        "lora" => Method::Lora(LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: lora_targets.iter().map(|s| s.to_string()).collect(),
        }),
        other => return Err(format!("unknown method {other} (full|prompt|prefix|lora)").into()),
    })
}

/// What one step needs: the trainable tensors and a closure computing the loss.
struct Job<B: OptimKernels<E>, E: RunE> {
    params: Vec<T32<B, E>>,
    loss: Box<dyn Fn() -> Res<T32<B, E>>>,
}

fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// The bench's model through the one model interface: `cfg` with `weights`, `method` installed
/// (a full fine-tune trains every base weight). No text is tokenized, so the tokenizer is empty.
fn open<B: OptimKernels<E>, E: RunE>(
    dev: &Arc<B>,
    cfg: ModelConfig,
    weights: RandomWeights,
    method: &Method,
    seed: u64,
    base: BasePrecision,
) -> Res<AnyModel<B, E>> {
    let weights = Box::leak(Box::new(weights));
    let full = matches!(method, Method::Full { .. });
    let tokenizer = tokenizers::Tokenizer::new(tokenizers::models::wordlevel::WordLevel::default());
    // A low-precision base is packed as it loads: the f32 model never exists whole.
    let mut model =
        AnyModel::from_source_with(dev, &cfg, &*weights, weights.path(), tokenizer, false, move |_| full, base)?;
    model.install(method, seed, None)?;
    Ok(model)
}

fn minilm_job<B: OptimKernels<E>, E: RunE>(a: &Args, dev: &Arc<B>) -> Res<Job<B, E>> {
    let cfg = minilm_cfg();
    let m = method(&a.method, &["query", "value"])?;
    let weights = bert_weights(&cfg, a.seed);
    let vocab = cfg.vocab_size;
    let mut model = open(dev, ModelConfig::Bert(cfg), weights, &m, a.seed, a.base_precision)?;
    // the classification head trains in every method
    model.add_head(2, a.seed)?;
    let params: Vec<T32<B, E>> = model.trainable().into_iter().map(|(_, t)| t).collect();
    let mut rng = Rng::new(a.seed ^ 0x4ead);
    let (b, t) = (a.batch, a.seq);
    let ids = random_ids(&mut rng, b * t, vocab);
    let mask = vec![1u8; b * t];
    let targets: Vec<i32> = (0..b).map(|_| rng.below(2) as i32).collect();
    let targets = Ints::new(dev, &[b], &targets)?;
    let loss =
        move || -> Res<T32<B, E>> { Ok(cross_entropy(model.class_scores(&ids, &mask, b, &[])?, &targets, -100)?) };
    Ok(Job { params, loss: Box::new(loss) })
}

/// A causal LM job (labels = input ids) on `model`.
fn lm_job<B: OptimKernels<E>, E: RunE>(model: AnyModel<B, E>, a: &Args, vocab: usize, seed: u64) -> Res<Job<B, E>> {
    let params: Vec<T32<B, E>> = model.trainable().into_iter().map(|(_, t)| t).collect();
    let mut rng = Rng::new(seed);
    let (b, t) = (a.batch, a.seq);
    let ids = random_ids(&mut rng, b * t, vocab);
    let labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let mask = vec![1u8; b * t];
    let loss = move || -> Res<T32<B, E>> { Ok(model.lm_loss(&ids, &mask, &labels, b)?) };
    Ok(Job { params, loss: Box::new(loss) })
}

fn smollm2_job<B: OptimKernels<E>, E: RunE>(a: &Args, dev: &Arc<B>) -> Res<Job<B, E>> {
    let cfg = smollm2_cfg(a.layers);
    let m = method(&a.method, &["q_proj", "v_proj"])?;
    let (weights, vocab) = (llama_weights(&cfg, a.seed), cfg.vocab_size);
    lm_job(open(dev, ModelConfig::Llama(cfg), weights, &m, a.seed, a.base_precision)?, a, vocab, a.seed ^ 0x70c5)
}

/// GPT-2 small (124M): 12 layers, width 768, 12 heads, 1024 positions, tied head.
fn gpt2_cfg(layers: Option<usize>) -> Gpt2Config {
    Gpt2Config {
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: layers.unwrap_or(12),
        n_head: 12,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
    }
}

fn gpt2_weights(cfg: &Gpt2Config, seed: u64) -> RandomWeights {
    let (c, ff) = (cfg.n_embd, cfg.inner());
    let mut w = RandomWeights::new(seed);
    w.add("wte.weight".into(), &[cfg.vocab_size, c]);
    w.add("wpe.weight".into(), &[cfg.n_positions, c]);
    for i in 0..cfg.n_layer {
        let p = format!("h.{i}");
        for n in ["ln_1", "ln_2"] {
            w.add(format!("{p}.{n}.weight"), &[c]);
            w.add(format!("{p}.{n}.bias"), &[c]);
        }
        for (n, i_, o) in [("attn.c_attn", c, 3 * c), ("attn.c_proj", c, c), ("mlp.c_fc", c, ff), ("mlp.c_proj", ff, c)]
        {
            w.add(format!("{p}.{n}.weight"), &[i_, o]);
            w.add(format!("{p}.{n}.bias"), &[o]);
        }
    }
    w.add("ln_f.weight".into(), &[c]);
    w.add("ln_f.bias".into(), &[c]);
    w
}

/// GPT-2 small as a causal LM (labels = input ids), the GPU issue's training-step shape.
fn gpt2_job<B: OptimKernels<E>, E: RunE>(a: &Args, dev: &Arc<B>) -> Res<Job<B, E>> {
    let cfg = gpt2_cfg(a.layers);
    let m = method(&a.method, &["c_attn"])?;
    let (weights, vocab) = (gpt2_weights(&cfg, a.seed), cfg.vocab_size);
    lm_job(open(dev, ModelConfig::Gpt2(cfg), weights, &m, a.seed, a.base_precision)?, a, vocab, a.seed ^ 0x6972)
}

/// VmHWM (peak resident set) in MiB, from /proc/self/status.
fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// `--profile-ops`: each op's forward and backward milliseconds per step (an op's forward time
/// runs from the previous op's end, as in `tuna profile`), sorted by total, on stderr.
fn print_op_table(step_s: f64, steps: f64) {
    let s = tuna_autograd::stats::snapshot();
    let mut rows: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (k, t) in &s.forward_time {
        rows.entry(k).or_default().0 += t.nanos as f64 / 1e6 / steps;
    }
    for (k, t) in &s.backward_time {
        rows.entry(k).or_default().1 += t.nanos as f64 / 1e6 / steps;
    }
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by(|a, b| (b.1 .0 + b.1 .1).total_cmp(&(a.1 .0 + a.1 .1)));
    eprintln!("tuna per-op times, ms per step (step {:.1} ms):", step_s * 1e3);
    eprintln!("| op | fwd ms | bwd ms | % of step |\n|---|---:|---:|---:|");
    for (k, (f, b)) in rows {
        eprintln!("| {k} | {f:.1} | {b:.1} | {:.1}% |", 100.0 * (f + b) / (step_s * 1e3));
    }
}

fn main() -> Res<()> {
    // a training binary: freed activation buffers stay in the heap for the next step
    tuna_kernels::heap::keep_freed_memory();
    let a = parse_args()?;
    if a.tf32 && a.device != "cuda" {
        return Err("--tf32 needs --device cuda".into());
    }
    let bf16 = match a.precision.as_str() {
        "f32" => false,
        "bf16" if a.device == "cuda" && !a.tf32 => true,
        "bf16" => return Err("--precision bf16 needs --device cuda and no --tf32".into()),
        other => return Err(format!("unknown precision {other} (f32|bf16)").into()),
    };
    match a.device.as_str() {
        "cpu" => run::<Cpu, f32>(&a, &Arc::new(Cpu)),
        "cuda" => {
            let dev = Cuda::new(0)?;
            dev.set_tf32(a.tf32);
            if bf16 {
                run::<Cuda, half::bf16>(&a, &Arc::new(dev))
            } else {
                run::<Cuda, f32>(&a, &Arc::new(dev))
            }
        }
        other => Err(format!("unknown device {other} (cpu|cuda)").into()),
    }
}

/// Warmup and timed steps on `dev`. On CUDA the per-phase times are host-side (launches are
/// asynchronous); the step time is exact, as each step ends reading the loss back.
fn run<B: OptimKernels<E>, E: RunE>(a: &Args, dev: &Arc<B>) -> Res<()> {
    let job = match a.model.as_str() {
        "minilm" => minilm_job(a, dev)?,
        "smollm2" => smollm2_job(a, dev)?,
        "gpt2" => gpt2_job(a, dev)?,
        other => return Err(format!("unknown model {other} (minilm|smollm2|gpt2)").into()),
    };
    let trainable: usize = job.params.iter().map(|t| t.numel()).sum();
    let refs: Vec<&T32<B, E>> = job.params.iter().collect();
    let mut opt = AdamW::new(&refs, AdamWParams::new(1e-4))?;
    // per-phase seconds over the timed steps: forward, backward, optimizer
    let (mut fwd, mut bwd, mut upd) = (0.0f64, 0.0f64, 0.0f64);
    let mut last_loss = f32::NAN;
    let mut start = Instant::now();
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            (fwd, bwd, upd) = (0.0, 0.0, 0.0);
            if a.profile_ops {
                tuna_autograd::stats::reset();
                tuna_autograd::stats::set_profiling(true);
            }
            start = Instant::now();
        }
        let t0 = Instant::now();
        tuna_autograd::stats::mark(); // the first op's forward time starts here, not at the last op
        let loss = (job.loss)()?;
        let t1 = Instant::now();
        loss.backward()?;
        let t2 = Instant::now();
        opt.step()?;
        let t3 = Instant::now();
        last_loss = loss.value()? as f32;
        fwd += (t1 - t0).as_secs_f64();
        bwd += (t2 - t1).as_secs_f64();
        upd += (t3 - t2).as_secs_f64();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = a.steps as f64;
    if a.profile_ops {
        tuna_autograd::stats::set_profiling(false);
        print_op_table(secs / n, n);
    }
    let tokens = (a.batch * a.seq * a.steps) as f64;
    let layers = match a.model.as_str() {
        "minilm" => minilm_cfg().num_hidden_layers,
        "gpt2" => gpt2_cfg(a.layers).n_layer,
        _ => smollm2_cfg(a.layers).num_hidden_layers,
    };
    println!(
        "{{\"side\":\"tuna\",\"model\":\"{}\",\"method\":\"{}\",\"layers\":{layers},\"batch\":{},\"seq\":{},\"steps\":{},\
\"tokens_per_s\":{:.1},\"step_ms\":{:.2},\"fwd_ms\":{:.2},\"bwd_ms\":{:.2},\"opt_ms\":{:.2},\"peak_rss_mb\":{:.1},\
\"trainable\":{trainable},\"threads\":{},\"device\":\"{}\",\"base_precision\":\"{}\",\"lowp_path\":\"{}\",\"tf32\":{},\"precision\":\"{}\",\"loss\":{last_loss:.5}}}",
        a.model,
        a.method,
        a.batch,
        a.seq,
        a.steps,
        tokens / secs,
        1e3 * secs / n,
        1e3 * fwd / n,
        1e3 * bwd / n,
        1e3 * upd / n,
        peak_rss_mb(),
        rayon::current_num_threads(),
        a.device,
        a.base_precision,
        tuna_kernels::ops::lowp::base_path_name(a.base_precision).unwrap_or(""),
        a.tf32,
        a.precision,
    );
    Ok(())
}
