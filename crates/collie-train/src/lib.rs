//! Training and generation loops of collie-rs.
//!
//! - [`config`]: the TOML run configuration with `--set` overrides.
//! - [`trainer`]: the step loop — gradient accumulation, clipping, schedules, evaluation,
//!   checkpoints, exact resume, monitors.
//! - [`update`]: optimizer, schedule and clipping — the update every training loop shares.
//! - [`blockwise`]: the reverse block walk behind activation checkpointing and LOMO/AdaLomo.
//! - [`cli`]: the command line shared by the recipe binaries.
//! - [`checkpoint`]: atomic `step-N` checkpoints (HF weights + optimizer + trainer state).
//! - [`eval`]: token NLL / perplexity, classification, generation metrics.
//! - [`generate`]: batched autoregressive decoding with a KV cache; [`batcher`]: the same with
//!   continuous batching (sequences join and leave the running batch between steps).
//! - [`streamed`]: forward passes of a model spread over ranks (ZeRO-3, stage-local pipelines),
//!   each block gathered as it runs.
//! - [`metrics`], [`plot`], [`textmetrics`]: monitors, `loss.png`, BLEU / ROUGE-L.

pub mod batcher;
pub mod blockwise;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod metrics;
pub mod optimizer;
pub mod parallel;
pub mod pipeline;
pub mod plot;
pub mod scaler;
mod step;
pub mod streamed;
pub mod textmetrics;
pub mod trainer;
pub mod update;

pub use config::TrainConfig;
pub use error::TrainError;
pub use trainer::{RunOptions, Summary, Trainer};
