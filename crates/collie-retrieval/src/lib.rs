//! UDR (Li, Lv et al., ACL 2023) for collie-rs: the pieces of a unified demonstration retriever.
//!
//! - [`bm25`]: BM25 candidates (iteration 0).
//! - [`loss`]: the list-wise ranking loss + in-batch loss, as the released code computes them.
//! - [`sampling`]: candidates per query per step, √-size multi-task batching.
//! - [`index`]: exact inner-product search on the backend.
//! - [`retriever`]: the two-tower retriever and its training loop.
//! - [`scoring`]: LM feedback (mean target NLL), batched, with a resumable fingerprinted cache.
//! - [`icl`]: prompts with retrieved demonstrations, classification / generation, bootstrap CIs.
//! - [`tasks`]: the task registry (real data through the asset resolver) and seeded splits.

pub mod bm25;
pub mod icl;
pub mod index;
pub mod loss;
pub mod retriever;
pub mod sampling;
pub mod scoring;
pub mod tasks;

use std::path::{Path, PathBuf};

/// What can go wrong preparing, scoring, training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    /// A bad option (the message names it).
    #[error("{0}")]
    Config(String),
    /// Data that cannot be used (the message names the file, line or task).
    #[error("{0}")]
    Data(String),
    /// A file-system error.
    #[error("{path}: {cause}")]
    Fs {
        /// The path.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// Fetching an asset.
    #[error(transparent)]
    Asset(#[from] collie_core::CoreError),
    /// Reading or writing tensors or tokenizers.
    #[error(transparent)]
    Io(#[from] collie_io::IoError),
    /// The training machinery: optimizer state, checkpoints, metrics.
    #[error(transparent)]
    Train(Box<collie_train::TrainError>),
}

impl From<collie_train::TrainError> for RetrievalError {
    fn from(e: collie_train::TrainError) -> Self {
        RetrievalError::Train(Box::new(e))
    }
}

impl RetrievalError {
    /// A file-system error at `path`.
    pub fn io(path: &Path, cause: std::io::Error) -> Self {
        RetrievalError::Fs {
            path: path.to_path_buf(),
            cause,
        }
    }
}

pub use bm25::{Bm25, Bm25Params};
pub use index::DenseIndex;
pub use loss::{udr_loss, LossWeights, UdrLoss};
pub use sampling::{batch_schedule, task_weights, CandidateSampling};
pub use tasks::{Example, Metric, Splits, Task};
