//! State-dict adapter: our parameter paths ↔ HF transformers' `LlamaForCausalLM` keys, and
//! HF directory load/save.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use collie_io::json::{read_json, write_json};
use collie_io::module::{
    load_module_lazy, torch_state_dict, torch_state_lazy, Binding, ParamInfo, SharedSource,
};
use collie_io::safetensors::{
    save_safetensors, save_safetensors_lazy, SafetensorsSource, SaveDtype,
};
use collie_io::tokenizer::TokenizerBundle;
use collie_io::IoError;
use serde_json::{json, Value};

use crate::config::LlamaConfig;
use crate::error::{LlamaError, Result};
use crate::internlm2::InternLm2;
use crate::layout::{self, CodeGen, Mixtral};
use crate::model::{block_module, hf_module, Llama, ParamPath};

use collie_core::nn::{Adaptable, Embedding, LinearSlot, ModelDims, ParallelMode, VirtualTokens};

/// The PEFT / tensor-parallel view of the model: the linear-layer table of
/// [`BLOCK_MODULES`](crate::model::BLOCK_MODULES) for every block, then the untied LM head
/// (vocabulary-parallel: its output columns split).
impl<B: Backend> Adaptable<B> for Llama<B> {
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_, B>> {
        let mut out = Vec::new();
        let names = self.names;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (path, linear) in layer.linears_mut() {
                let (_, _, _, parallel) = block_module(path).expect("a table row");
                out.push(LinearSlot {
                    name: names.block_module(i, path).expect("a named linear layer"),
                    parallel: *parallel,
                    linear,
                });
            }
        }
        if let Some(lm_head) = &mut self.head.lm_head {
            out.push(LinearSlot {
                name: "lm_head".into(),
                parallel: ParallelMode::Column,
                linear: lm_head,
            });
        }
        out
    }

    fn head_local_params(&self) -> Vec<burn::module::ParamId> {
        let norms = self.layers.iter().map(|l| &l.attn);
        norms
            .flat_map(|a| [a.q_norm.as_ref(), a.k_norm.as_ref()])
            .flatten()
            .map(|n| n.weight.id)
            .collect()
    }

    fn virtual_tokens_mut(&mut self) -> &mut Option<VirtualTokens<B>> {
        &mut self.virtual_tokens
    }

    fn virtual_tokens(&self) -> Option<&VirtualTokens<B>> {
        self.virtual_tokens.as_ref()
    }

    fn dims(&self) -> ModelDims {
        let attn = &self.layers[0].attn;
        ModelDims {
            layers: self.layers.len(),
            hidden: self.embed.weight.lazy_shape().dims::<2>()[1],
            heads: attn.n_heads,
            kv_heads: attn.n_kv_heads,
            head_dim: attn.head_dim,
            vocab: self.vocab_size(),
        }
    }

    fn input_embedding(&self) -> &Embedding<B> {
        &self.embed
    }
}

/// HF key of one of our parameter paths in a model with or without sandwich norms (Gemma 3);
/// `None` for parameters HF's base model does not have (adapters).
pub fn hf_key(path: &str, sandwich: bool) -> Option<String> {
    Some(match ParamPath::parse(path)? {
        ParamPath::Embed => "model.embed_tokens.weight".into(),
        ParamPath::FinalNorm(p) => format!("model.norm.{p}"),
        ParamPath::LmHead(p) => format!("lm_head.{p}"),
        ParamPath::Block {
            index,
            module,
            param,
        } => match module.strip_prefix("moe.experts.") {
            // Each expert's projections (Qwen3-MoE): `mlp.experts.N.gate_proj.weight`.
            Some(expert) => format!("model.layers.{index}.mlp.experts.{expert}.{param}"),
            None => format!(
                "model.layers.{index}.{}.{param}",
                hf_module(module, sandwich)?
            ),
        },
    })
}

/// Reads `config.json` of an HF model directory.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(IoError::invalid(dir, "no config.json: not an HF model directory").into());
    }
    let config: LlamaConfig = read_json(&path)?;
    config.validate().map_err(|e| match e {
        LlamaError::Config(m) => LlamaError::Config(format!("{}: {m}", path.display())),
        LlamaError::UnknownArchitecture(m) => {
            LlamaError::UnknownArchitecture(format!("{}: {m}", path.display()))
        }
        other => other,
    })?;
    Ok(config)
}

/// Loads config and weights from an HF model directory (single or sharded safetensors).
pub fn load_hf_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<(LlamaConfig, Llama<B>)> {
    let config = read_config(dir)?;
    let model = config.init::<B>(device)?;
    let source: SharedSource = Arc::new(SafetensorsSource::open(dir)?);
    let sandwich = config.sandwich_norms();
    let model = match config.model_type.as_str() {
        "internlm2" => layout::load(model, source, &internlm2_layout(&config))?,
        "mixtral" => layout::load(model, source, &Mixtral)?,
        "codegen" => layout::load(model, source, &CodeGen)?,
        _ => load_module_lazy(model, source, |info: &ParamInfo| {
            Some(Binding::torch(info, hf_key(&info.path, sandwich)?))
        })?,
    };
    Ok((config, model))
}

fn internlm2_layout(config: &LlamaConfig) -> InternLm2 {
    InternLm2 {
        heads: config.num_attention_heads,
        kv_heads: config.kv_heads(),
    }
}

/// Every parameter under its HF key, in PyTorch's layout.
pub fn hf_state_dict<B: Backend>(model: &Llama<B>) -> Vec<(String, collie_io::HostTensor)> {
    let sandwich = is_sandwich(model);
    torch_state_dict(model, |path| hf_key(path, sandwich))
}

/// Whether the blocks carry norms after attention and MLP (Gemma 2/3), which renames a norm.
fn is_sandwich<B: Backend>(model: &Llama<B>) -> bool {
    model
        .layers
        .first()
        .is_some_and(|l| l.post_attn_norm.is_some())
}

/// Writes an HF model directory that `AutoModelForCausalLM.from_pretrained` loads:
/// `config.json`, `generation_config.json`, `model.safetensors` and, when given, the tokenizer.
///
/// Everything is written into a staging directory next to `dir` and renamed into place, so a
/// failed save leaves no half-written model; an existing `dir` is replaced.
pub fn save_hf_dir<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    tokenizer: Option<&TokenizerBundle>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    collie_io::dir::write_dir_atomically(dir, |staging| {
        write_into(model, config, tokenizer, staging, dtype)
    })
}

fn write_into<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    tokenizer: Option<&TokenizerBundle>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    let mut config = config.clone();
    if config.architectures.is_none() {
        let class = crate::config::class_of(&config.model_type).unwrap_or("LlamaForCausalLM");
        config.architectures = Some(vec![class.into()]);
    }
    config
        .extra
        .insert("torch_dtype".into(), json!(dtype.torch_name()));
    config.extra.remove("dtype");
    config.extra.remove("quantization_config");
    write_json(&dir.join("config.json"), &config.to_json()?)?;
    let mut generation = serde_json::Map::new();
    for (key, value) in [
        ("bos_token_id", &config.bos_token_id),
        ("eos_token_id", &config.eos_token_id),
        ("pad_token_id", &config.pad_token_id),
    ] {
        if let Some(v) = value {
            generation.insert(key.into(), v.clone());
        }
    }
    write_json(
        &dir.join("generation_config.json"),
        &Value::Object(generation),
    )?;
    let file = dir.join(collie_io::safetensors::SINGLE_FILE);
    // Layouts that fuse several parameters into one tensor collect them first; the others are
    // written one tensor at a time (a lazily loaded model is streamed from its files).
    let fused = match config.model_type.as_str() {
        "internlm2" => Some(layout::state_dict(model, &internlm2_layout(&config))),
        "mixtral" => Some(layout::state_dict(model, &Mixtral)),
        "codegen" => Some(layout::state_dict(model, &CodeGen)),
        _ => None,
    };
    match fused {
        Some(state) => save_safetensors(&file, &state, dtype)?,
        None => {
            let sandwich = is_sandwich(model);
            let state = torch_state_lazy(model, |path| hf_key(path, sandwich));
            save_safetensors_lazy(&file, &state, dtype)?;
        }
    }
    if let Some(tok) = tokenizer {
        tok.save(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf_key_plain(path: &str) -> Option<String> {
        hf_key(path, false)
    }

    #[test]
    fn sandwich_blocks_rename_the_pre_mlp_norm() {
        assert_eq!(
            hf_key("layers.0.mlp_norm.weight", true).unwrap(),
            "model.layers.0.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_key("layers.0.post_attn_norm.weight", true).unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_key("layers.0.post_mlp_norm.weight", true).unwrap(),
            "model.layers.0.post_feedforward_layernorm.weight"
        );
    }

    #[test]
    fn maps_paths_to_hf_keys() {
        assert_eq!(
            hf_key_plain("embed.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            hf_key_plain("layers.3.attn.q_proj.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_key_plain("layers.3.attn.k_proj.bias").unwrap(),
            "model.layers.3.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_key_plain("layers.0.attn_norm.weight").unwrap(),
            "model.layers.0.input_layernorm.weight"
        );
        assert_eq!(
            hf_key_plain("layers.0.mlp_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_key_plain("layers.1.mlp.down_proj.weight").unwrap(),
            "model.layers.1.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_key_plain("head.norm.weight").unwrap(),
            "model.norm.weight"
        );
        assert_eq!(
            hf_key_plain("head.lm_head.weight").unwrap(),
            "lm_head.weight"
        );
        assert!(hf_key_plain("layers.1.attn.q_proj.adapter.a").is_none());
    }
}
