//! Errors of PEFT transforms and adapter files.

use std::path::PathBuf;

/// What went wrong applying, loading or saving an adapter.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A `[peft]` option is invalid (the message names the key).
    #[error("{0}")]
    Config(String),
    /// An adapter file does not fit this model or is not one we read.
    #[error("{path}: {message}")]
    Adapter {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Reading or writing weights failed.
    #[error(transparent)]
    Io(#[from] collie_io::IoError),
}

impl PeftError {
    /// An adapter error about `path`.
    pub fn adapter(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        PeftError::Adapter {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;
