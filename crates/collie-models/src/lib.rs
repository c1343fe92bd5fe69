//! The registry of model families: which family builds a checkpoint, by its `model_type`
//! (`config.json`) or its GGUF `general.architecture`. Generic crates (the trainer, the CLI's
//! commands) are written over the model contract; binaries pass [`Registry`] to pick the family
//! at run time. Adding a family adds its crate under `models/` and one row here
//! (`docs/models.md`).

use burn::tensor::backend::AutodiffBackend;
use collie_io::family::{Families, ModelError, ModelResult, ModelTask};
use collie_io::gguf::GgufSource;
use collie_io::IoError;

/// A family of the registry: the `model_type`s it builds (with their HF classes) and the GGUF
/// architectures it reads (architecture → `model_type`).
struct Family {
    model_types: &'static [(&'static str, &'static str)],
    gguf: &'static [(&'static str, &'static str)],
}

/// Every family, in the order `model_type`s are listed in errors.
const FAMILIES: &[Family] = &[Family {
    model_types: collie_llama::config::MODEL_TYPES,
    gguf: collie_llama::gguf::ARCHITECTURES,
}];

/// The project's families.
#[derive(Debug, Clone, Copy, Default)]
pub struct Registry;

/// Every `model_type` some family builds.
pub fn model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().map(|t| t.0))
        .collect()
}

/// Every GGUF architecture some family reads.
pub fn gguf_architectures() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.gguf.iter().map(|a| a.0))
        .collect()
}

impl Families for Registry {
    fn model_type_of(path_or_spec: &str) -> ModelResult<String> {
        let path = collie_core::asset::resolve(path_or_spec)?;
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.is_file() {
                return Err(
                    IoError::invalid(&path, "no config.json: not an HF model directory").into(),
                );
            }
            let value: serde_json::Value = collie_io::json::read_json(&config)?;
            let model_type = value
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("llama");
            if !model_types().contains(&model_type) {
                return Err(ModelError::UnknownArchitecture(format!(
                    "{}: model_type `{model_type}` (supported: {})",
                    config.display(),
                    model_types().join(", ")
                )));
            }
            return Ok(model_type.to_string());
        }
        if collie_io::family::is_gguf(&path) {
            let src = GgufSource::open(&path)?;
            let arch = src.require_str("general.architecture")?;
            return FAMILIES
                .iter()
                .flat_map(|f| f.gguf.iter())
                .find(|a| a.0 == arch)
                .map(|a| a.1.to_string())
                .ok_or_else(|| {
                    ModelError::UnknownArchitecture(format!(
                        "{}: GGUF architecture `{arch}` (supported: {})",
                        path.display(),
                        gguf_architectures().join(", ")
                    ))
                });
        }
        if !path.exists() {
            return Err(IoError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            )
            .into());
        }
        Err(IoError::invalid(
            &path,
            "not a model: expected an HF directory (config.json + model.safetensors) or a GGUF file",
        )
        .into())
    }

    fn run<B: AutodiffBackend, T: ModelTask<B>>(
        model_type: &str,
        task: T,
    ) -> ModelResult<T::Output> {
        if collie_llama::config::class_of(model_type).is_some() {
            return Ok(task.run::<collie_llama::Llama<B>>());
        }
        Err(ModelError::UnknownArchitecture(format!(
            "model_type `{model_type}` (supported: {})",
            model_types().join(", ")
        )))
    }
}
