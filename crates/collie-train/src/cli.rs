//! The command line every recipe binary shares:
//! `recipe-X [--config F.toml] [--set a.b=v]... [--resume latest|DIR] [--device D]`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use collie_core::device::{dispatch, BackendTask, DeviceSpec};

use crate::config::TrainConfig;
use crate::trainer::{RunOptions, Summary, Trainer};

/// Arguments of a recipe binary.
#[derive(Parser, Debug, Clone)]
pub struct RecipeArgs {
    /// TOML config (default: the recipe's built-in `configs/default.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a key, e.g. `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from `latest` (the newest checkpoint of output.dir) or a checkpoint directory.
    #[arg(long)]
    pub resume: Option<String>,
    /// Device: cpu, wgpu[:N|:cpu] or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Peak dense TFLOPS of the device, for MFU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// What a recipe adds around the common trainer.
pub trait Recipe: Send {
    /// Binary name (for messages).
    const NAME: &'static str;
    /// The built-in default configuration.
    const DEFAULT_CONFIG: &'static str;

    /// Prepares data (and anything else) and fills in config paths; runs before the model loads.
    fn prepare(&self, config: &mut TrainConfig) -> Result<()>;

    /// Runs around training, e.g. samples before and after; `before` is false after training.
    fn report<B: AutodiffBackend>(&self, trainer: &Trainer<B>, before: bool) -> Result<()>;
}

struct Task<R> {
    recipe: R,
    config: TrainConfig,
    options: RunOptions,
}

impl<R: Recipe> BackendTask for Task<R> {
    type Output = Result<Summary>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Summary> {
        let mut trainer = Trainer::<B>::new(self.config, &self.options, &device)?;
        if self.options.resume.is_none() {
            self.recipe.report(&trainer, true)?;
        }
        let summary = trainer.run(&self.options)?;
        self.recipe.report(&trainer, false)?;
        Ok(summary)
    }
}

fn run<R: Recipe>(recipe: R, args: RecipeArgs) -> Result<Summary> {
    let device: DeviceSpec = args.device.parse()?;
    let mut config = match &args.config {
        Some(path) => TrainConfig::load(path, &args.overrides)?,
        None => TrainConfig::parse(
            R::DEFAULT_CONFIG,
            "built-in default config",
            &args.overrides,
        )?,
    };
    recipe.prepare(&mut config)?;
    let options = RunOptions {
        resume: args.resume.clone(),
        peak_tflops: args.peak_tflops,
        quiet: args.quiet,
    };
    dispatch(
        device,
        Task {
            recipe,
            config,
            options,
        },
    )
    .context("selecting the device")?
}

/// `main` of a recipe binary: parses arguments, runs, prints one `error:` line on failure.
pub fn main<R: Recipe>(recipe: R) -> ExitCode {
    tracing_subscriber_init();
    let args = RecipeArgs::parse();
    match run(recipe, args).with_context(|| R::NAME) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Appends sample generations (one JSON object each) to `dir/samples.jsonl`.
pub fn append_samples(dir: &std::path::Path, lines: &[serde_json::Value]) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("samples.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    for l in lines {
        writeln!(f, "{l}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn tracing_subscriber_init() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COLLIE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}
