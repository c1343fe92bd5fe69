//! Errors of weight, config and tokenizer I/O. Every variant names the file or key at fault.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = IoError> = std::result::Result<T, E>;

/// What can go wrong reading or writing checkpoints and tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A file-system error.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (shown in the message, so not chained as a source).
        cause: std::io::Error,
    },
    /// A JSON file that does not parse or does not have the expected fields.
    #[error("{path}:{line}:{column}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde's message.
        message: String,
    },
    /// A safetensors file that is truncated or malformed.
    #[error("{path}: not a valid safetensors file ({message})")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file that is truncated, malformed or uses something we do not read.
    #[error("{path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{key}` (for parameter `{param}`) is missing from {source_desc}")]
    MissingTensor {
        /// The checkpoint key.
        key: String,
        /// Our parameter path.
        param: String,
        /// The checkpoint.
        source_desc: String,
    },
    /// A tensor whose shape does not match the model built from the config.
    #[error("tensor `{key}` in {source_desc} has shape {found:?}, but the config gives parameter `{param}` shape {expected:?}")]
    ShapeMismatch {
        /// The checkpoint key.
        key: String,
        /// Our parameter path.
        param: String,
        /// Shape the model expects (in the checkpoint's layout).
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
        /// The checkpoint.
        source_desc: String,
    },
    /// A tensor stored in a dtype we cannot convert.
    #[error("tensor `{key}` in {path} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The key.
        key: String,
        /// The file.
        path: PathBuf,
        /// The dtype.
        dtype: String,
    },
    /// A tokenizer that cannot be loaded or built.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The file it came from.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Anything else about a file's content.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An error of the shared layer (assets, config).
    #[error(transparent)]
    Core(#[from] collie_core::CoreError),
}

impl IoError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError::Io {
            path: path.into(),
            cause: source,
        }
    }

    /// An [`IoError::Invalid`] for `path`.
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        IoError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}
