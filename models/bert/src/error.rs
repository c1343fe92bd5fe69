//! Errors of building and loading BERT-family encoders.

/// Result alias of this crate.
pub type Result<T, E = BertError> = std::result::Result<T, E>;

/// What can go wrong building or loading an encoder.
#[derive(Debug, thiserror::Error)]
pub enum BertError {
    /// A config value this model cannot be built from.
    #[error("invalid encoder config: {0}")]
    Config(String),
    /// A weight, config or tokenizer file problem.
    #[error(transparent)]
    Io(#[from] collie_io::IoError),
    /// An asset problem.
    #[error(transparent)]
    Core(#[from] collie_core::CoreError),
}
