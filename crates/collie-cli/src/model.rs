//! Loading a model for the CLI commands.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use collie_llama::LoadedModel;
use serde_json::Value;

/// Loads `spec` (HF directory, GGUF file or asset) onto `device`.
pub fn load<B: Backend>(spec: &str, device: &B::Device) -> Result<LoadedModel<B>> {
    collie_llama::load::<B>(spec, device).with_context(|| format!("loading model `{spec}`"))
}

/// Loads `spec` and applies the PEFT adapter in `adapter`, if any.
pub fn load_adapted<B: Backend>(
    spec: &str,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let mut loaded = load::<B>(spec, device)?;
    if let Some(dir) = adapter {
        let (model, config) = collie_peft::adapter_io::load(loaded.model, dir, device)
            .with_context(|| format!("applying adapter {}", dir.display()))?;
        tracing::info!(
            "applied {} adapter {}",
            config.kind.peft_type(),
            dir.display()
        );
        loaded.model = model;
    }
    Ok(loaded)
}

/// EOS ids generation stops at: `generation_config.json` when the directory has one (HF's
/// `generate` prefers it), else the model config.
pub fn eos_ids<B: Backend>(loaded: &LoadedModel<B>) -> Result<Vec<u32>> {
    let path = loaded.path.join("generation_config.json");
    if loaded.path.is_dir() && path.is_file() {
        let v: Value = collie_io::json::read_json(&path)?;
        let ids = collie_llama::config::token_ids(v.get("eos_token_id"));
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(loaded.config.eos_ids())
}

/// The storage dtype a `--dtype` flag names.
pub fn save_dtype(name: &str) -> Result<collie_io::safetensors::SaveDtype> {
    use collie_io::safetensors::SaveDtype;
    Ok(match name {
        "f32" => SaveDtype::F32,
        "f16" => SaveDtype::F16,
        "bf16" => SaveDtype::BF16,
        other => anyhow::bail!("--dtype `{other}`: expected f32, f16 or bf16"),
    })
}
