//! State-dict adapter: our parameter paths ↔ HF `BertModel` keys (with or without the `bert.`
//! prefix of task heads, `LayerNorm.weight/bias` or the old `gamma/beta`), and HF directory load
//! and save.

use std::path::Path;

use burn::tensor::backend::Backend;
use collie_io::json::{read_json, write_json};
use collie_io::module::{load_module, torch_state_dict, Binding, ParamInfo, TensorSource};
use collie_io::safetensors::{save_safetensors, SafetensorsSource, SaveDtype};
use collie_io::tokenizer::TokenizerBundle;
use collie_io::IoError;

use crate::config::BertConfig;
use crate::error::{BertError, Result};
use crate::model::Bert;

/// HF key (without prefix) of one of our parameter paths.
pub fn hf_key(path: &str) -> Option<String> {
    let norm = |p: &str, rest: &str| format!("{p}.LayerNorm.{rest}");
    if let Some(rest) = path.strip_prefix("embeddings.") {
        let (name, field) = rest.split_once('.')?;
        return Some(match name {
            "word" => format!("embeddings.word_embeddings.{field}"),
            "position" => format!("embeddings.position_embeddings.{field}"),
            "token_type" => format!("embeddings.token_type_embeddings.{field}"),
            "norm" => norm("embeddings", field),
            _ => return None,
        });
    }
    let rest = path.strip_prefix("layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let p = format!("encoder.layer.{i}");
    let (module, field) = rest.rsplit_once('.')?;
    Some(match module {
        "attn.query" | "attn.key" | "attn.value" => {
            format!("{p}.attention.self.{}.{field}", &module[5..])
        }
        "attn.output" => format!("{p}.attention.output.dense.{field}"),
        "attn.norm" => norm(&format!("{p}.attention.output"), field),
        "intermediate" => format!("{p}.intermediate.dense.{field}"),
        "output" => format!("{p}.output.dense.{field}"),
        "norm" => norm(&format!("{p}.output"), field),
        _ => return None,
    })
}

/// Reads and validates `config.json` of an HF encoder directory.
pub fn read_config(dir: &Path) -> Result<BertConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(IoError::invalid(dir, "no config.json: not an HF model directory").into());
    }
    let config: BertConfig = read_json(&path)?;
    config.validate().map_err(|e| match e {
        BertError::Config(m) => BertError::Config(format!("{}: {m}", path.display())),
        other => other,
    })?;
    Ok(config)
}

/// Loads config and weights from an HF directory holding a `BertModel` (or a model with a `bert.`
/// body, whose heads are ignored).
pub fn load_hf_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<(BertConfig, Bert<B>)> {
    let config = read_config(dir)?;
    let model = config.init::<B>(device)?;
    let source = SafetensorsSource::open(dir)?;
    let keys = source.keys();
    let prefix = if keys.iter().any(|k| k.starts_with("bert.embeddings.")) {
        "bert."
    } else {
        ""
    };
    let old_norms = keys.iter().any(|k| k.ends_with("LayerNorm.gamma"));
    let bind = |info: &ParamInfo| -> Option<Binding> {
        let mut key = format!("{prefix}{}", hf_key(&info.path)?);
        if old_norms && key.contains("LayerNorm.") {
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma");
            key = key.replace("LayerNorm.bias", "LayerNorm.beta");
        }
        Some(Binding::torch(info, key))
    };
    let model = load_module(model, &Body(&source), bind)?;
    Ok((config, model))
}

/// A checkpoint seen without what the encoder has no use for: the pooler, task heads and the
/// `position_ids` buffer (so loading does not warn about them).
struct Body<'a>(&'a SafetensorsSource);

impl Body<'_> {
    fn wanted(key: &str) -> bool {
        let key = key.strip_prefix("bert.").unwrap_or(key);
        key.starts_with("encoder.")
            || (key.starts_with("embeddings.") && !key.ends_with("position_ids"))
    }
}

impl TensorSource for Body<'_> {
    fn describe(&self) -> String {
        self.0.describe()
    }

    fn keys(&self) -> Vec<String> {
        self.0
            .keys()
            .into_iter()
            .filter(|k| Self::wanted(k))
            .collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.0.shape(key)
    }

    fn read(&self, key: &str) -> collie_io::Result<collie_io::HostTensor> {
        self.0.read(key)
    }
}

/// Writes an HF `BertModel` directory (`config.json`, `model.safetensors`, tokenizer when given)
/// that transformers and sentence-transformers load. Written into a staging directory and
/// renamed into place.
pub fn save_hf_dir<B: Backend>(
    model: &Bert<B>,
    config: &BertConfig,
    tokenizer: Option<&TokenizerBundle>,
    dir: &Path,
) -> Result<()> {
    collie_io::dir::write_dir_atomically(dir, |staging: &Path| -> Result<()> {
        let mut config = config.clone();
        config
            .extra
            .insert("architectures".into(), serde_json::json!(["BertModel"]));
        write_json(&staging.join("config.json"), &config)?;
        let tensors = torch_state_dict(model, hf_key);
        save_safetensors(
            &staging.join(collie_io::safetensors::SINGLE_FILE),
            &tensors,
            SaveDtype::F32,
        )?;
        if let Some(tok) = tokenizer {
            tok.save(staging)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_paths_to_hf_keys() {
        let cases = [
            (
                "embeddings.word.weight",
                "embeddings.word_embeddings.weight",
            ),
            ("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
            (
                "layers.2.attn.query.weight",
                "encoder.layer.2.attention.self.query.weight",
            ),
            (
                "layers.2.attn.output.bias",
                "encoder.layer.2.attention.output.dense.bias",
            ),
            (
                "layers.0.attn.norm.weight",
                "encoder.layer.0.attention.output.LayerNorm.weight",
            ),
            (
                "layers.5.intermediate.weight",
                "encoder.layer.5.intermediate.dense.weight",
            ),
            ("layers.5.output.bias", "encoder.layer.5.output.dense.bias"),
            (
                "layers.5.norm.weight",
                "encoder.layer.5.output.LayerNorm.weight",
            ),
        ];
        for (ours, theirs) in cases {
            assert_eq!(hf_key(ours).as_deref(), Some(theirs), "{ours}");
        }
    }
}
