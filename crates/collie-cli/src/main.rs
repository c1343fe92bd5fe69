//! `collie`: generate text, serve a model over HTTP, measure perplexity, convert checkpoints, merge adapters and benchmark,
//! on any backend.

mod bench;
mod convert;
mod embed;
mod eval_ppl;
mod export;
mod generate;
mod merge;
mod model;
mod serve;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use collie_core::device::DeviceSpec;

/// collie-rs: LLaMA-family models on Burn.
#[derive(Parser, Debug)]
#[command(name = "collie", version, about)]
struct Cli {
    /// Device: cpu, wgpu[:N|:cpu] or cuda[:N].
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue a prompt (greedy unless --temperature is given).
    Generate(generate::Args),
    /// Serve a model over HTTP: OpenAI-compatible API with continuous batching, and a chat page.
    Serve(serve::Args),
    /// Perplexity of a model on a JSONL file of {"text": ...} lines.
    EvalPpl(eval_ppl::Args),
    /// Sentence vectors from a BERT-family encoder, one JSON line per input line.
    Embed(embed::Args),
    /// Convert a GGUF file or a parallel run's sharded checkpoint into an HF model (or peft
    /// adapter) directory.
    Convert(convert::Args),
    /// Fold a LoRA / IA3 adapter into its base model and write an HF model directory.
    Merge(merge::Args),
    /// Write a model (an adapter folded in) as a GGUF file llama.cpp loads.
    Export(export::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Command),
}

fn run(cli: Cli) -> Result<()> {
    let device: DeviceSpec = cli.device.parse()?;
    match cli.command {
        Command::Generate(args) => generate::run(args, device),
        Command::Serve(args) => serve::run(args, device),
        Command::EvalPpl(args) => eval_ppl::run(args, device),
        Command::Embed(args) => embed::run(args, device),
        Command::Convert(args) => convert::run(args, device),
        Command::Merge(args) => merge::run(args, device),
        Command::Export(args) => export::run(args, device),
        Command::Bench(cmd) => bench::run(cmd, device),
    }
}

/// Large buffers kept mapped between steps, so steady-state steps do not page-fault.
#[global_allocator]
static ALLOC: collie_core::CachingAlloc = collie_core::CachingAlloc;

fn main() -> ExitCode {
    collie_train::cli::init_logging();
    let cli = Cli::parse();
    match run(cli).context("collie") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first, without the "collie" wrapper.
            // Under mpirun every rank meets an error that gets here alike (one met by a single
            // rank ends the job through `Dist::abort`): rank 0 says it.
            let chain: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
            if collie_dist::world::launcher_rank() == 0 {
                collie_dist::world::print_error(&chain.join(": "));
            }
            ExitCode::FAILURE
        }
    }
}
