//! The `tuna` command line.

use clap::{Parser, Subcommand};
use tuna::kernels::Device;
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
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A Hugging Face folder (config.json, model.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: std::path::PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample at this temperature (greedy when absent).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
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
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info => print!("{}", tuna::info::report()),
        Command::Generate(a) => {
            let sampling = match a.temperature {
                None if a.top_k.is_none() && a.top_p.is_none() => Sampling::Greedy,
                t => Sampling::Sample { temperature: t.unwrap_or(1.0), top_k: a.top_k, top_p: a.top_p, seed: a.seed },
            };
            let settings = tuna::generate_cmd::GenerateSettings {
                model: a.model,
                prompt: a.prompt,
                max_new_tokens: a.max_new_tokens,
                sampling,
                chat: a.chat,
                device: Device::parse(&a.device).map_err(|e| anyhow::anyhow!(e))?,
            };
            println!("{}", tuna::generate_cmd::run(&settings)?);
        }
    }
    Ok(())
}
