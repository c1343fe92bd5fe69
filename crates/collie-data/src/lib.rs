//! Data for collie-rs.
//!
//! - [`chat`]: chat templates — a model's own Jinja template rendered as HF's
//!   `apply_chat_template` renders it, or a built-in ChatML / Llama-2 / Alpaca template.

pub mod chat;
