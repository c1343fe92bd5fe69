//! Errors of building and loading LLaMA-family models: the model contract's
//! [`ModelError`](collie_io::family::ModelError).

pub use collie_io::family::ModelError as LlamaError;

/// Result alias of this crate.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;
