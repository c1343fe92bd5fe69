//! UDR (Li, Lv et al., ACL 2023) for collie-rs: the pieces of a unified demonstration retriever.
//!
//! - [`bm25`]: BM25 candidates (iteration 0).
//! - [`loss`]: the list-wise ranking loss + in-batch loss, as the released code computes them.
//! - [`sampling`]: candidates per query per step, √-size multi-task batching.
//! - [`index`]: exact inner-product search on the backend.

pub mod bm25;
pub mod index;
pub mod loss;
pub mod sampling;

pub use bm25::{Bm25, Bm25Params};
pub use index::DenseIndex;
pub use loss::{udr_loss, LossWeights, UdrLoss};
pub use sampling::{batch_schedule, task_weights, CandidateSampling};
