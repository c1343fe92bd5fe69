//! The command line every recipe binary shares:
//! `recipe-X [--config F.toml] [--set a.b=v]... [--resume latest|DIR] [--device D]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use collie_core::device::{dispatch, BackendTask, DeviceSpec};
use collie_dist::Dist;
use collie_io::family::{Families, ModelTask, TrainModel};

use crate::config::TrainConfig;
use crate::trainer::{RunOptions, Summary, Trainer};

/// Arguments of a recipe binary.
#[derive(Parser, Debug, Clone)]
pub struct RecipeArgs {
    /// TOML config (default: the recipe's built-in `configs/default.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a key, e.g. `--set optim.lr=1e-4` (repeatable); `--set KEY=` removes it.
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
    fn report<B: AutodiffBackend, M: TrainModel<B>>(
        &self,
        trainer: &Trainer<B, M>,
        before: bool,
    ) -> Result<()>;
}

/// The `model_type` the run's model has: `[model.config]`'s for a model built from scratch,
/// else the checkpoint's (`config.json`, or a GGUF file's architecture).
pub fn model_type<F: Families>(config: &TrainConfig) -> Result<String> {
    match (config.model.init, &config.model.config) {
        (crate::config::ModelInit::Scratch, Some(table)) => Ok(table
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama")
            .to_string()),
        _ => Ok(F::model_type_of(&config.model.path)?),
    }
}

struct Task<R, F> {
    recipe: R,
    config: TrainConfig,
    options: RunOptions,
    families: std::marker::PhantomData<F>,
}

/// The run on backend `B`, with the family the config's model needs.
struct Train<B: AutodiffBackend, R> {
    recipe: R,
    config: TrainConfig,
    options: RunOptions,
    device: B::Device,
}

impl<B: AutodiffBackend, R: Recipe> ModelTask<B> for Train<B, R> {
    type Output = Result<Summary>;

    fn run<M: TrainModel<B>>(self) -> Result<Summary> {
        let mut trainer = Trainer::<B, M>::new(self.config, &self.options, &self.device)?;
        if self.options.resume.is_none() {
            self.recipe.report(&trainer, true)?;
        }
        let summary = trainer.run(&self.options)?;
        self.recipe.report(&trainer, false)?;
        Ok(summary)
    }
}

impl<R: Recipe, F: Families> BackendTask for Task<R, F> {
    type Output = Result<Summary>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Summary> {
        let model_type = model_type::<F>(&self.config)?;
        let scratch = self.config.model.init == crate::config::ModelInit::Scratch;
        let train = Train::<B, R> {
            recipe: self.recipe,
            config: self.config,
            options: self.options,
            device,
        };
        let run = F::run::<B, _>(&model_type, train);
        if scratch {
            run.context("model.config")?
        } else {
            run?
        }
    }
}

/// Runs the recipe; `dist` receives the process world once it exists, so that a failure after
/// that point can end every rank of a parallel run.
fn run<R: Recipe, F: Families>(
    recipe: R,
    args: RecipeArgs,
    dist: &mut Option<Arc<Dist>>,
) -> Result<Summary> {
    let device: DeviceSpec = args.device.parse()?;
    let mut config = match &args.config {
        Some(path) => TrainConfig::load(path, &args.overrides)?,
        None => TrainConfig::parse(
            R::DEFAULT_CONFIG,
            "built-in default config",
            &args.overrides,
        )?,
    };
    let p = &config.parallel;
    let world = Arc::new(Dist::init(p.dp, p.tp, p.pp)?);
    *dist = Some(world.clone());
    // Every rank prepares (the files are written atomically and are the same on every rank);
    // nobody reads them before all are done.
    recipe.prepare(&mut config)?;
    world.world.barrier();
    let options = RunOptions {
        resume: args.resume.clone(),
        peak_tflops: args.peak_tflops,
        quiet: args.quiet,
        dist: Some(world),
    };
    dispatch(
        device,
        Task::<R, F> {
            recipe,
            config,
            options,
            families: std::marker::PhantomData,
        },
    )
    .context("selecting the device")?
}

/// `main` of a recipe binary: parses arguments, runs, prints one `error:` line on failure.
///
/// Under `mpirun`, an error that every rank meets alike before training starts (configuration,
/// layout) is printed by rank 0 and every rank exits cleanly; an error after that, which may be
/// one rank's alone, ends the whole job at once (`MPI_Abort`) with the rank's number, since the
/// other ranks would otherwise wait for it in their next collective.
pub fn main<R: Recipe, F: Families>(recipe: R) -> ExitCode {
    tracing_subscriber_init();
    let args = RecipeArgs::parse();
    let mut dist = None;
    match run::<R, F>(recipe, args, &mut dist).with_context(|| R::NAME) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
            let message = chain.join(": ");
            match dist {
                Some(d) if d.size() > 1 => d.abort(&message, 1),
                _ => {
                    if collie_dist::world::launcher_rank() == 0 {
                        collie_dist::world::print_error(&message);
                    }
                    collie_dist::world::finish_failed_start();
                    ExitCode::FAILURE
                }
            }
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
    init_logging();
}

/// Log lines on stderr as `warning: …` / `info: …` (the CLI's `error: …` style), filtered by
/// `COLLIE_LOG` (default `warn`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COLLIE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .event_format(Plain)
        .try_init();
}

/// `level: message`, nothing else.
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing::Level;
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(writer, "{level}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
