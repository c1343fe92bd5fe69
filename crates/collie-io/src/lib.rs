//! Weights and tokenizers in and out of collie-rs.
//!
//! - [`safetensors`]: HF safetensors, single file or sharded (`model.safetensors.index.json`),
//!   any float dtype converted to `f32` on load; atomic writes.
//! - [`gguf`]: GGUF v3 files (llama.cpp), dequantized through the `rlx-gguf` crate.
//! - [`tokenizer`]: `tokenizer.json` + `tokenizer_config.json`, or a tokenizer rebuilt from GGUF
//!   metadata exactly as transformers rebuilds it.
//! - [`module`]: moving named host tensors into and out of any Burn module, by parameter path.
//! - [`sharded`]: checkpoints every rank of a parallel run writes its own part of, with a
//!   manifest that puts the pieces back together.
//!
//! - [`family`]: the file side of the model contract (build, load, save a family's model) and the
//!   registry interface binaries pick a family through.
//!
//! Which HF or GGUF name a parameter has is not decided here: each model has its own state-dict
//! adapter next to it (`models/llama/src/hf.rs`).

pub mod dir;
pub mod error;
pub mod family;
pub mod gguf;
pub mod json;
pub mod module;
pub mod quant;
pub mod safetensors;
pub mod sharded;
pub mod tokenizer;

pub use error::{IoError, Result};
pub use module::HostTensor;
