//! `recipe-udr`: UDR (Li, Lv et al., ACL 2023) end to end with collie-rs's own models — a
//! two-tower MiniLM retriever trained from SmolLM2's feedback on real tasks, one round of
//! candidate mining, and in-context evaluation against random, BM25 and off-the-shelf
//! sentence-embedding demonstrations (`docs/udr.md`).
//!
//! `recipe-udr [--config F.toml] [--set a.b=value]... [--stage all|prepare|score|train|mine|evaluate|ablate|probe|bench]
//! [--device cpu|wgpu|cuda[:N]] [--quiet]`; without `--config` the built-in
//! `configs/default.toml` runs. Every stage resumes from its outputs in `output.dir`.

mod config;
mod pipeline;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use collie_core::device::{dispatch, BackendTask, DeviceSpec};

use crate::config::UdrConfig;

const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

/// UDR: train a demonstration retriever from LM feedback and evaluate it in context.
#[derive(Parser, Debug)]
#[command(name = "recipe-udr", version, about)]
struct Args {
    /// TOML config (default: the built-in configs/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key: `--set retriever.epochs=3`.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Which stage to run (`all` runs every stage not yet done).
    #[arg(long, default_value = "all")]
    stage: String,
    /// cpu, wgpu[:N] or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

struct Task {
    config: UdrConfig,
    stage: String,
    quiet: bool,
}

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let run = pipeline::Run::<B> {
            config: &self.config,
            device,
            quiet: self.quiet,
        };
        std::fs::create_dir_all(&self.config.output.dir)
            .with_context(|| format!("creating {}", self.config.output.dir.display()))?;
        std::fs::write(
            self.config.output.dir.join("config.resolved.toml"),
            toml::to_string_pretty(&self.config)?,
        )?;
        if self.stage == "bench" {
            // Needs the prepare and score stages of the first task.
            let line = run.bench(96, 8)?;
            println!("{line}");
            return Ok(());
        }
        pipeline::run_stages(&run, &self.stage)
    }
}

fn run(args: Args) -> Result<()> {
    let (text, origin) = match &args.config {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_CONFIG.to_string(),
            "configs/default.toml".to_string(),
        ),
    };
    let config = UdrConfig::parse(&text, &origin, &args.sets)?;
    const STAGES: &[&str] = &[
        "all", "prepare", "score", "train", "mine", "evaluate", "ablate", "probe", "bench",
    ];
    if !STAGES.contains(&args.stage.as_str()) {
        anyhow::bail!(
            "--stage `{}`: expected one of {}",
            args.stage,
            STAGES.join(", ")
        );
    }
    let device: DeviceSpec = args.device.parse()?;
    dispatch(
        device,
        Task {
            config,
            stage: args.stage,
            quiet: args.quiet,
        },
    )
    .context("selecting the device")?
}

/// Large buffers kept mapped between steps, so steady-state steps do not page-fault.
#[global_allocator]
static ALLOC: collie_core::CachingAlloc = collie_core::CachingAlloc;

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
