//! The `tuna` command line.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => print!("{}", tuna::info::report()),
    }
    Ok(())
}
