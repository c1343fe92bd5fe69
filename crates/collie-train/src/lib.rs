//! Training and generation loops of collie-rs.
//!
//! - [`eval`]: token NLL / perplexity.
//! - [`generate`]: batched autoregressive decoding with a KV cache: greedy, or sampling with
//!   temperature, top-k and top-p, as HF's `generate` does.

pub mod eval;
pub mod generate;
