//! Errors of training runs.

use std::path::PathBuf;

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Bad data.
    #[error(transparent)]
    Data(#[from] collie_data::dataset::DataError),
    /// Model building or loading.
    #[error(transparent)]
    Model(#[from] collie_io::family::ModelError),
    /// A layout or shared-layer problem (tensor-parallel split, assets).
    #[error(transparent)]
    Core(#[from] collie_core::CoreError),
    /// Checkpoint or tokenizer I/O.
    #[error(transparent)]
    Io(#[from] collie_io::IoError),
    /// A file-system error.
    #[error("{path}: {cause}")]
    Fs {
        /// The path.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A checkpoint that cannot be resumed.
    #[error("resume: {0}")]
    Resume(String),
    /// Optimizer state that does not fit.
    #[error(transparent)]
    OptimizerState(#[from] collie_optim::StateError),
    /// A PEFT option or adapter file.
    #[error(transparent)]
    Peft(#[from] collie_peft::PeftError),
    /// Generation during evaluation.
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    /// A parallel layout that does not fit.
    #[error(transparent)]
    Dist(#[from] collie_dist::DistError),
    /// Anything else that makes the run impossible.
    #[error("{0}")]
    Invalid(String),
}

impl TrainError {
    /// A file-system error at `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        TrainError::Fs {
            path: path.into(),
            cause,
        }
    }
}
