//! The `tuna` command line.

use clap::{Parser, Subcommand};
use std::sync::Arc;
use tuna::kernels::{Cpu, Cuda, Device};
use tuna::models::generate::Sampling;

#[derive(Parser)]
#[command(name = "tuna", version, about = "Adapt pretrained transformers: full fine-tuning to prompt tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the devices found, the kernels compiled in, and the build.
    Info,
    /// Generate text from a decoder: a Llama-family or GPT-2 Hugging Face folder, or a Llama .gguf file.
    Generate(GenerateArgs),
    /// Train one adaptation method on a task: checkpoints, metrics, and a PEFT adapter (or model) at
    /// the end; or with --tasks several tasks at once, each with its own adapter.
    Train(TrainArgs),
    /// Evaluate a model, with an adapter, on a data file (loss, accuracy or perplexity).
    Eval(EvalArgs),
    /// Write an adapter as a PEFT folder, or merged into the base model as a Hugging Face folder.
    Export(ExportArgs),
    /// Train several methods with the same data and budget and print the trade-off table (also
    /// JSON, and a report: compare.html with SVG panels). Without --model/--train: all-MiniLM-L6-v2
    /// on movie-review polarity.
    Compare(CompareArgs),
    /// Time a few training steps per op kind (forward and backward), like `train` but writing
    /// nothing: where a method's step time goes on this model and data.
    Profile(ProfileArgs),
    /// Serve one base model and its adapters over HTTP: OpenAI-compatible completions and chat
    /// (streamed by server-sent events), classification, adapters loaded and unloaded at run time.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The base model: a Hugging Face folder, a Llama .gguf file, or a hub id (org/name), from the
    /// local Hugging Face cache or downloaded into it.
    #[arg(long)]
    model: std::path::PathBuf,
    /// A folder of adapters: each subfolder holding a PEFT adapter (or a `tuna train` run's
    /// `adapter/`) is served under the subfolder's name.
    #[arg(long)]
    adapters: Option<std::path::PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port; the address is printed on stdout (`listening on http://...`).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests waiting for a batch slot at most; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Prompt tokens at most (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// New tokens one request may ask for at most.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Seconds requests in flight get to finish after SIGTERM or SIGINT.
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace: f64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Milliseconds to pause after each decoding step: a testing aid that keeps requests in
    /// flight (shutdown, disconnects); 0 in use.
    #[arg(long, default_value_t = 0, hide = true)]
    step_delay_ms: u64,
    /// How a step runs the batch: `mixed` (one forward for every decoding sequence, each row
    /// through its own adapter) or `swap` (a batch-of-one forward per sequence, its adapter
    /// swapped in). A testing and benchmarking aid.
    #[arg(long, default_value = "mixed", hide = true, value_parser = ["mixed", "swap"])]
    stepper: String,
    /// How the base's frozen block weights are held (f32, bf16, int8, or q4 for a Q4_0 / Q4_1
    /// GGUF; CPU), for every adapter (default: the one every adapter of --adapters records in its
    /// tuna_task.json as trained on, else f32). An adapter trained on another is served, with a
    /// note on stderr.
    #[arg(long, value_name = "f32|bf16|int8|q4")]
    base_precision: Option<tuna::models::model::BasePrecision>,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// full, prompt, ptuning, prefix, prefix-mlp, ptuning-v2, houlsby or lora.
    #[arg(long)]
    method: String,
    /// Steps run before measuring.
    #[arg(long, default_value_t = 2)]
    warmup_steps: u64,
    /// Steps measured.
    #[arg(long, default_value_t = 5)]
    profile_steps: u64,
    #[command(flatten)]
    method_args: tuna::train_cmd::MethodArgs,
    #[command(flatten)]
    run: tuna::train_cmd::RunArgs,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// full, prompt, ptuning, prefix, prefix-mlp, ptuning-v2, houlsby or lora; or prompt-engineered (no
    /// training: the untrained model scored through --template, zero-shot or with --shots
    /// examples; the training flags do not apply).
    #[arg(long, required_unless_present = "tasks")]
    method: Option<String>,
    /// Multi-task training: a JSON list of tasks, each with its name, method and settings, task and
    /// data (README, "Multi-task training"); batches mix the tasks' rows, each task trains its own
    /// adapter, written to --out/adapters/<name>/.
    #[arg(long, conflicts_with = "method")]
    tasks: Option<std::path::PathBuf>,
    #[command(flatten)]
    method_args: tuna::train_cmd::MethodArgs,
    #[command(flatten)]
    run: tuna::train_cmd::RunArgs,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// Comma-separated methods (prompt-engineered: the untrained model through --template, a
    /// zero-shot row and with --shots k a k-shot row).
    #[arg(long, default_value = "full,prompt,prefix,houlsby,lora")]
    methods: String,
    /// Before each method's run, try a few learning rates (--sweep-factors times its --lr or
    /// default) in short runs scored on the last --sweep-holdout training examples (never the eval
    /// data); the full run takes the best.
    #[arg(long)]
    sweep_lr: bool,
    /// Multiples of each method's learning rate the sweep tries (comma-separated).
    #[arg(long, default_value = "0.3,1,3", requires = "sweep_lr")]
    sweep_factors: String,
    /// Steps of each sweep run (default: a third of --steps, at least 1).
    #[arg(long, requires = "sweep_lr")]
    sweep_steps: Option<u64>,
    /// Training examples held out to score the sweep (the last ones of --train).
    #[arg(long, default_value_t = 200, requires = "sweep_lr")]
    sweep_holdout: usize,
    #[command(flatten)]
    method_args: tuna::train_cmd::MethodArgs,
    #[command(flatten)]
    run: tuna::train_cmd::RunArgs,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The base model: a Hugging Face folder (or a `--merged` export), a Llama .gguf, or an id
    /// (`org/name[@revision]`) from the local Hugging Face cache, downloaded into it if not there.
    #[arg(long)]
    model: std::path::PathBuf,
    /// An adapter folder (PEFT format, or a `tuna train` run's `adapter/`).
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// lm, completion or classify (default: the task the adapter was trained on, from its
    /// tuna_task.json; else classify).
    #[arg(long)]
    task: Option<String>,
    /// The data: .jsonl or .csv, as for `tuna train`.
    #[arg(long)]
    data: std::path::PathBuf,
    /// The field holding the text (lm, classify).
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The field holding the prompt (completion).
    #[arg(long, default_value = "prompt")]
    prompt_field: String,
    /// The field holding the completion (completion).
    #[arg(long, default_value = "completion")]
    completion_field: String,
    /// The field holding the label (classify).
    #[arg(long, default_value = "label")]
    label_field: String,
    /// Comma-separated labels, in the order training used (default: the adapter's tuna_task.json,
    /// else those in the data, sorted); given beside a task file, they must agree with it.
    #[arg(long)]
    labels: Option<String>,
    /// Comma-separated verbalizer words for decoders (default: the task file's, else the labels).
    #[arg(long)]
    verbalizers: Option<String>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Tokens per example at most (default: 128, or what the model's positions leave room for).
    #[arg(long)]
    max_len: Option<usize>,
    /// How the frozen weights of the transformer blocks are held (f32, bf16, int8, or q4 for a
    /// Q4_0 / Q4_1 GGUF), as for `tuna train` (default: what the adapter's tuna_task.json says it
    /// trained on, else f32).
    #[arg(long, value_name = "f32|bf16|int8|q4")]
    base_precision: Option<tuna::models::model::BasePrecision>,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The base model the adapter was trained on (folder, .gguf, or a cached hub id).
    #[arg(long)]
    model: std::path::PathBuf,
    /// The adapter folder (e.g. a `tuna train` run's `adapter/`).
    #[arg(long)]
    adapter: std::path::PathBuf,
    /// The folder to write.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Merge LoRA into the base weights and write a Hugging Face model folder.
    #[arg(long)]
    merged: bool,
    /// Write into a non-empty --out (replacing the files the export writes; never the base model's folder).
    #[arg(long)]
    overwrite: bool,
    /// `--model` as given when it was a Hugging Face id (the adapter config records it).
    #[arg(skip)]
    base_name: Option<String>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A Hugging Face folder (config.json, model.safetensors, tokenizer.json), a .gguf file, or an
    /// id (`org/name[@revision]`) from the local Hugging Face cache, downloaded into it if not there.
    #[arg(long)]
    model: std::path::PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// New tokens at most (the prompt, virtual tokens and new tokens must fit the model's positions).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample at this temperature (> 0). Greedy when none of --temperature, --top-k, --top-p is
    /// given; with only --top-k or --top-p the temperature is 1.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample from the k most likely tokens (k >= 1).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p (0 < p <= 1).
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the ChatML chat template (instruct models such as SmolLM2-Instruct).
    #[arg(long)]
    chat: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// An adapter folder (PEFT's format, or a `tuna train` run's `adapter/`).
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// How the frozen weights of the transformer blocks are held (f32, bf16, int8, or q4 for a
    /// Q4_0 / Q4_1 GGUF; CPU), as for `tuna train` (default: what the adapter's tuna_task.json says
    /// it trained on, else f32).
    #[arg(long, value_name = "f32|bf16|int8|q4")]
    base_precision: Option<tuna::models::model::BasePrecision>,
}

/// `--device`, parsed.
fn device(s: &str) -> anyhow::Result<Device> {
    Device::parse(s).map_err(|e| anyhow::anyhow!(e))
}

/// CUDA device `n`, its f32 products in TF32 when `tf32` (`--tf32`).
fn cuda(n: usize, tf32: bool) -> anyhow::Result<Arc<Cuda>> {
    let dev = Cuda::new(n)?;
    dev.set_tf32(tf32);
    Ok(Arc::new(dev))
}

/// Every allocation counted, so a run reports the heap it held (the memory plan, the summary).
#[global_allocator]
static HEAP: tuna::trainer::memory::Counting = tuna::trainer::memory::Counting;

fn main() -> std::process::ExitCode {
    tuna::trainer::memory::mark_installed();
    let cli = Cli::parse();
    // A training-like command frees and allocates the same large buffers step after step: keep
    // freed pages in the heap instead of mapping fresh ones each time (before any other thread
    // allocates). Not `serve`, a long-lived process whose heap should shrink after a burst.
    if !matches!(cli.command, Command::Serve(_)) {
        tuna::kernels::heap::keep_freed_memory();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", tuna::cli::error_chain(&e));
            // Bad data exits with 2, a non-finite loss with 3 (scripts can tell them apart).
            let code = e.downcast_ref::<tuna::trainer::TrainError>().map_or(1, |t| t.exit_code());
            std::process::ExitCode::from(code)
        }
    }
}

/// `--model` as a path: a folder or file as given, else a Hugging Face id's snapshot (from the local
/// hub cache, or downloaded into it); neither is an error here, before any command creates or locks
/// anything.
fn hub(p: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let resolved = tuna::models::hub::resolve(p)?;
    if !resolved.exists() {
        anyhow::bail!("--model {}: no such file or folder (nor a Hugging Face model id, org/name)", p.display());
    }
    Ok(resolved)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut command = cli.command;
    // TUNA_CPU_MATRIX(_BF16) naming a path this CPU cannot run is refused before any work (`info`
    // says it in its report).
    if !matches!(command, Command::Info) {
        tuna::kernels::ops::lowp::matrix_path_checked().map_err(anyhow::Error::msg)?;
        tuna::kernels::ops::lowp::bf16_path_checked().map_err(anyhow::Error::msg)?;
    }
    match &mut command {
        Command::Info => {}
        Command::Generate(a) => a.model = hub(&a.model)?,
        Command::Eval(a) => a.model = hub(&a.model)?,
        Command::Export(a) => {
            let resolved = hub(&a.model)?;
            if resolved != a.model {
                a.base_name = Some(a.model.display().to_string());
            }
            a.model = resolved;
        }
        Command::Serve(a) => a.model = hub(&a.model)?,
        Command::Train(TrainArgs { run, .. })
        | Command::Profile(ProfileArgs { run, .. })
        | Command::Compare(CompareArgs { run, .. }) => {
            if let Some(m) = &mut run.model {
                let resolved = hub(m)?;
                if resolved != *m {
                    // Recorded as given (PEFT's configs name the hub id, not a local path).
                    run.model_name = Some(m.display().to_string());
                }
                *m = resolved;
            }
        }
    }
    match command {
        Command::Info => print!("{}", tuna::info::report()),
        Command::Serve(a) => {
            if !(a.shutdown_grace.is_finite() && (0.0..=3600.0).contains(&a.shutdown_grace)) {
                anyhow::bail!("--shutdown-grace {}: expected 0 to 3600 seconds", a.shutdown_grace);
            }
            tuna::serve::run(tuna::serve::ServeSettings {
                model: a.model,
                adapters: a.adapters,
                host: a.host,
                port: a.port,
                max_queue: a.max_queue,
                max_prompt_tokens: a.max_prompt_tokens,
                max_new_tokens: a.max_new_tokens,
                max_batch: a.max_batch,
                shutdown_grace: std::time::Duration::from_secs_f64(a.shutdown_grace),
                device: device(&a.device)?,
                step_delay: std::time::Duration::from_millis(a.step_delay_ms.min(10_000)),
                mixed: a.stepper == "mixed",
                base_precision: a.base_precision,
            })?;
        }
        Command::Generate(a) => {
            let sampling = match a.temperature {
                None if a.top_k.is_none() && a.top_p.is_none() => Sampling::Greedy,
                t => Sampling::Sample { temperature: t.unwrap_or(1.0), top_k: a.top_k, top_p: a.top_p, seed: a.seed },
            };
            sampling.validate()?;
            let settings = tuna::generate_cmd::GenerateSettings {
                model: a.model,
                prompt: a.prompt,
                max_new_tokens: a.max_new_tokens,
                sampling,
                chat: a.chat,
                adapter: a.adapter,
                device: Device::parse(&a.device).map_err(|e| anyhow::anyhow!(e))?,
                base_precision: a.base_precision,
            };
            println!("{}", tuna::generate_cmd::run(&settings)?);
        }
        Command::Train(TrainArgs { tasks: Some(file), method_args, run, .. }) => {
            tuna::tasks_cmd::check_no_task_flags(&std::env::args().skip(2).collect::<Vec<_>>())?;
            // Method settings go in the tasks file, per task.
            method_args.check_used("--tasks (the tasks file sets each task's)", &[])?;
            let cfg = tuna::tasks_cmd::multi_config(&file, &run)?;
            let precision = run.precision_for(None)?;
            if let Some(note) = run.precision_note(precision) {
                eprintln!("{note}");
            }
            let summary = match (device(&run.device)?, precision) {
                (Device::Cpu, _) => tuna::trainer::train_multi(&Arc::new(Cpu), &cfg)?,
                (Device::Cuda(n), tuna::trainer::Precision::F32) => {
                    tuna::trainer::train_multi(&cuda(n, run.tf32)?, &cfg)?
                }
                (Device::Cuda(n), tuna::trainer::Precision::Bf16) => {
                    tuna::trainer::train_multi_as::<Cuda, half::bf16>(&cuda(n, false)?, &cfg)?
                }
            };
            tuna::train_cmd::print_multi_summary(&summary);
        }
        Command::Train(TrainArgs { method: None, .. }) => anyhow::bail!("--method or --tasks is required"),
        Command::Train(a) if a.method.as_deref() == Some(tuna::train_cmd::BASELINE) => {
            let method = a.method.clone().unwrap_or_default();
            a.method_args.check_used("--method", std::slice::from_ref(&method))?;
            a.run.check_precision_for("the prompt-engineered baseline")?;
            let cfg = a.run.baseline(&a.method_args)?;
            let summary = match device(&a.run.device)? {
                Device::Cpu => tuna::trainer::prompt_engineered(&Arc::new(Cpu), &cfg)?,
                Device::Cuda(n) => tuna::trainer::prompt_engineered(&cuda(n, a.run.tf32)?, &cfg)?,
            };
            tuna::train_cmd::print_summary(&summary);
        }
        Command::Train(a) => {
            let name = a.method.clone().unwrap_or_default();
            // The name first: a mistyped method is named as such, not as ignoring a flag.
            let method = a.method_args.method(&name)?;
            a.method_args.check_used("--method", std::slice::from_ref(&name))?;
            a.method_args.check_for_task(&name, &a.run.task)?;
            let cfg = a.run.config(method, a.method_args.init_text(&name))?;
            if let Some(note) = a.run.precision_note(cfg.precision) {
                eprintln!("{note}");
            }
            let summary = match (device(&a.run.device)?, cfg.precision) {
                (Device::Cpu, _) => tuna::trainer::train(&Arc::new(Cpu), &cfg)?,
                (Device::Cuda(n), tuna::trainer::Precision::F32) => tuna::trainer::train(&cuda(n, a.run.tf32)?, &cfg)?,
                (Device::Cuda(n), tuna::trainer::Precision::Bf16) => {
                    tuna::trainer::train_as::<Cuda, half::bf16>(&cuda(n, false)?, &cfg)?
                }
            };
            tuna::train_cmd::print_summary(&summary);
        }
        Command::Eval(a) => {
            // The task, labels and verbalizers as training had them (the export's task file),
            // unless given; given ones must agree with it.
            let saved_in = a.adapter.as_ref().unwrap_or(&a.model);
            let saved = tuna::trainer::TaskFile::read(saved_in)?;
            let task = tuna::cli::eval_task(a.task.as_deref(), saved.as_ref(), saved_in)?;
            let fields = tuna::trainer::Fields {
                text: a.text_field,
                prompt: a.prompt_field,
                completion: a.completion_field,
                label: a.label_field,
            };
            if !(1..=tuna::train_cmd::MAX_BATCH as usize).contains(&a.batch_size) {
                anyhow::bail!("--batch-size {}: expected 1 to {}", a.batch_size, tuna::train_cmd::MAX_BATCH);
            }
            // (A merged export has no adapter and its task file no precision: nothing to note.)
            let base = tuna::cli::BaseChoice::new(a.base_precision, saved.as_ref(), saved_in, a.adapter.is_some())?;
            if let Some(n) = base.note() {
                eprintln!("{n}");
            }
            let m = tuna::models::model::AnyModel::<_, f32>::open_adapted_with(
                &Arc::new(Cpu),
                &a.model,
                a.adapter.as_deref(),
                base.precision,
            )
            .map_err(|e| base.explain(e, "evaluates"))?;
            let given =
                |flag: &str, v: &Option<String>| v.as_deref().map(|v| tuna::train_cmd::list_flag(flag, v)).transpose();
            let labels = tuna::cli::agree(
                "--labels",
                given("--labels", &a.labels)?,
                saved.as_ref().and_then(|t| t.labels.clone()),
                saved_in,
            )?;
            // Training's verbalizers default to its labels.
            let verbalizers = tuna::cli::agree(
                "--verbalizers",
                given("--verbalizers", &a.verbalizers)?,
                saved.and_then(|t| t.verbalizers.or(t.labels)),
                saved_in,
            )?;
            let e = tuna::trainer::eval_file(
                &m,
                task,
                &a.data,
                &fields,
                labels.as_deref(),
                verbalizers.as_deref(),
                a.batch_size,
                a.max_len,
            )?;
            println!("{}", tuna::trainer::describe_eval(&e));
        }
        Command::Export(a) => {
            // Where the export goes, checked before any work: one writer at a time (the lock is
            // taken first, so two exports cannot both find the folder empty), never the base
            // model's folder (or the adapter's), a non-empty folder only with --overwrite. The
            // lock is a run's (the two exclude each other); its file goes when the export ends.
            tuna::cli::check_export_target(&a.out, &a.model, &a.adapter)?;
            tuna::trainer::run_dir::refuse_export_into_run(&a.out)?;
            // Into a run's own folder (its adapter/): that run's lock first, so the two exclude
            // each other (a training run rewrites it when it ends).
            let _run_lock = tuna::trainer::run_dir::lock_enclosing_run(&a.out)?;
            let _lock = tuna::trainer::run_dir::lock_export(&a.out)?;
            // A killed export's temporary files (its names only, its process gone) are litter,
            // not contents: gone before the folder is judged empty.
            tuna::trainer::export::remove_stale_export_temps(&a.out);
            tuna::cli::check_export_empty(&a.out, a.overwrite)?;
            let m =
                tuna::models::model::AnyModel::<Cpu, f32>::open_adapted(&Arc::new(Cpu), &a.model, Some(&a.adapter))?;
            let base = a.base_name.clone().unwrap_or_else(|| a.model.display().to_string());
            // The task file (class order, verbalizers) travels on; a merged model is a plain f32
            // folder, so the base precision the adapter trained on does not (eval would ask it of
            // a folder that has no packed or Q4 weights).
            let task = tuna::trainer::TaskFile::read(&a.adapter)?;
            // All or nothing: every file is written aside and moved in only once all are written
            // (a full disk leaves the folder as it was), and an earlier export's files this one
            // does not write go (the other kind's), so the folder holds exactly one export.
            tuna::trainer::export::write_staged(&a.out, |stage| -> anyhow::Result<()> {
                if a.merged {
                    m.save_merged(stage).map_err(|e| anyhow::anyhow!("--merged: {e}"))?;
                } else {
                    m.save_adapter(stage, &base)?;
                }
                if let Some(mut t) = task {
                    if a.merged {
                        t.base_precision = None;
                    }
                    t.write(stage)?;
                }
                Ok(())
            })?;
            println!("wrote {}", a.out.display());
        }
        Command::Profile(a) => {
            // The name first: a mistyped method is named as such, not as ignoring a flag.
            let method = a.method_args.method(&a.method)?;
            a.method_args.check_used("--method", std::slice::from_ref(&a.method))?;
            a.method_args.check_for_task(&a.method, &a.run.task)?;
            let cfg = a.run.config(method, a.method_args.init_text(&a.method))?;
            if a.warmup_steps > 1_000_000 || !(1..=1_000_000).contains(&a.profile_steps) {
                anyhow::bail!(
                    "--warmup-steps 0 to 1000000 and --profile-steps 1 to 1000000 (got {} and {})",
                    a.warmup_steps,
                    a.profile_steps
                );
            }
            let (warmup, steps) = (a.warmup_steps, a.profile_steps);
            let p = match (device(&a.run.device)?, cfg.precision) {
                (Device::Cpu, _) => tuna::trainer::profile(&Arc::new(Cpu), &cfg, warmup, steps)?,
                (Device::Cuda(n), tuna::trainer::Precision::F32) => {
                    tuna::trainer::profile(&cuda(n, a.run.tf32)?, &cfg, warmup, steps)?
                }
                (Device::Cuda(n), tuna::trainer::Precision::Bf16) => {
                    tuna::trainer::profile_as::<Cuda, half::bf16>(&cuda(n, false)?, &cfg, warmup, steps)?
                }
            };
            print!("{}", tuna::train_cmd::profile_table(&p));
        }
        Command::Compare(a) => {
            if a.run.resume || a.run.resume_or_start {
                anyhow::bail!("compare trains every method anew; --resume is for tuna train");
            }
            let methods = tuna::train_cmd::list_flag("--methods", &a.methods)?;
            // Every method's settings are checked before the first one trains (names first).
            for m in &methods {
                if m != tuna::train_cmd::BASELINE {
                    a.method_args.method(m)?;
                }
            }
            a.method_args.check_used("--methods", &methods)?;
            for (i, m) in methods.iter().enumerate() {
                a.run.check_base_precision(m)?;
                if m == tuna::train_cmd::BASELINE {
                    a.run.check_precision_for("the prompt-engineered baseline")?;
                    if a.run.task != "classify" {
                        anyhow::bail!("{m} scores classes: it needs --task classify (not {})", a.run.task);
                    }
                    if let Some(t) = &a.method_args.template {
                        tuna::trainer::baseline::parse_template(t)?;
                    }
                } else {
                    a.run.check_precision_method(&a.method_args.method(m)?)?;
                    a.method_args.check_for_task(m, &a.run.task)?;
                }
                if methods[..i].contains(m) {
                    anyhow::bail!("--methods {}: `{m}` is listed twice", a.methods);
                }
            }
            let passthrough = tuna::compare_cmd::passthrough_args(std::env::args().skip(2).collect());
            let mut model_path = None;
            if let Some(m) = &a.run.model {
                // Each method's run resolves a hub id itself (and records it as given); compare's
                // own look at the model (the default learning rates) uses the path resolved here.
                model_path = Some(m.display().to_string());
            }
            let (args, out) = tuna::compare_cmd::with_defaults(&a.run, passthrough)?;
            // The run-wide flags every method's run would refuse (--holdout beside --eval, ...),
            // refused here once before anything trains.
            a.run.check_ranges(a.run.lr.unwrap_or(1e-3))?;
            if methods.iter().any(|m| m == tuna::train_cmd::BASELINE) {
                tuna::compare_cmd::check_baseline(&args, &a.run, a.method_args.shots.unwrap_or(0))?;
            }
            let model_arg = model_path.clone().or_else(|| tuna::compare_cmd::flag_value(&args, "--model"));
            tuna::compare_cmd::check_model_methods(model_arg.as_deref(), &methods)?;
            // The comparison's folder is one run: locked while it runs, and replaced only when told.
            tuna::trainer::run_dir::refuse_unsafe_out(&out)?;
            let _lock = tuna::trainer::lock(&out)?;
            tuna::compare_cmd::check_out(&out, &tuna::compare_cmd::run_folders(&methods, &args), a.run.overwrite)?;
            let plan = if a.sweep_lr {
                let factors = tuna::train_cmd::list_flag("--sweep-factors", &a.sweep_factors)?
                    .iter()
                    .map(|f| match f.parse::<f64>() {
                        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
                        _ => anyhow::bail!("--sweep-factors {}: `{f}` is not a positive number", a.sweep_factors),
                    })
                    .collect::<anyhow::Result<Vec<f64>>>()?;
                tuna::compare_cmd::check_factors(&factors, &a.sweep_factors)?;
                let steps = a.sweep_steps.unwrap_or((a.run.steps / 3).max(1));
                if steps == 0 || a.sweep_holdout == 0 {
                    anyhow::bail!("--sweep-steps and --sweep-holdout: expected at least 1");
                }
                tuna::compare_cmd::check_holdout(&args, &a.run, a.sweep_holdout)?;
                Some(tuna::compare_cmd::SweepPlan { factors, steps, holdout: a.sweep_holdout })
            } else {
                None
            };
            // The rate each method's sweep multiplies: --lr, else the method's default for this model.
            let model = model_path.or_else(|| tuna::compare_cmd::flag_value(&args, "--model"));
            let decoder = model.is_some_and(|p| tuna::train_cmd::is_decoder(std::path::Path::new(&p)));
            let base_lr = |m: &str| -> anyhow::Result<f64> {
                Ok(a.run.lr.unwrap_or(tuna::train_cmd::default_lr(&a.method_args.method(m)?, decoder)))
            };
            let runs = tuna::compare_cmd::run(&methods, &args, &out, plan.as_ref(), base_lr)?;
            let paths = tuna::compare_cmd::write(&runs, &out)?;
            println!("{}", tuna::compare_cmd::table(&runs));
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            println!("wrote {}", names.join(", "));
        }
    }
    Ok(())
}
