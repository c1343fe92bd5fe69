//! Errors of building and loading LLaMA-family models.

/// Result alias of this crate.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;

/// What can go wrong building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// A config value this model cannot be built from.
    #[error("invalid model config: {0}")]
    Config(String),
    /// An architecture or model type this crate does not implement.
    #[error("unknown architecture: {0}")]
    UnknownArchitecture(String),
    /// A weight, config or tokenizer file problem.
    #[error(transparent)]
    Io(#[from] collie_io::IoError),
    /// An asset or shared-layer problem.
    #[error(transparent)]
    Core(#[from] collie_core::CoreError),
}
