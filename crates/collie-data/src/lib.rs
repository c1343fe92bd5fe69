//! Data for collie-rs.
//!
//! - [`chat`]: chat templates — a model's own Jinja template rendered as HF's
//!   `apply_chat_template` renders it, or a built-in ChatML / Llama-2 / Alpaca template.
//! - [`dataset`]: JSONL formats (`text`, `input_output`, `chat`, `tokens`), tokenization with
//!   loss masks, streaming by line offsets, `file:line` errors.
//! - [`corpora`]: readers of raw corpora (chatterbot-corpus YAML).
//! - [`loader`]: seeded order, rank sharding, right-padded batches and document packing.

pub mod chat;
pub mod corpora;
pub mod dataset;
pub mod loader;
