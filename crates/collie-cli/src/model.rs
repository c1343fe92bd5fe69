//! Loading a model for the CLI commands, with whichever family the checkpoint needs: a command is
//! a [`WithModel`] task, [`run`] selects the backend, reads the checkpoint's `model_type` and runs
//! the task with that family through the registry (`collie_models::Registry`).

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_core::device::{dispatch, BackendTask, DeviceSpec};
use collie_core::model::ModelConfig;
use collie_io::family::{token_ids, Families, Loaded, ModelFiles, ModelTask, TrainModel};
use collie_io::quant::Quantize;
use collie_models::Registry;
use serde_json::Value;

/// A command's work on the model at [`WithModel::model_spec`], written once for every family.
pub trait WithModel {
    /// What the command returns.
    type Output;

    /// The model the command runs (HF directory, GGUF file or asset spec).
    fn model_spec(&self) -> &str;

    /// The work, with backend `B` and family `M` (inference uses `M::Inner`).
    fn run<B: AutodiffBackend, M: TrainModel<B>>(self, device: B::Device) -> Result<Self::Output>;
}

struct OnDevice<T>(T);

struct WithFamily<B: AutodiffBackend, T> {
    task: T,
    device: B::Device,
}

impl<B: AutodiffBackend, T: WithModel> ModelTask<B> for WithFamily<B, T> {
    type Output = Result<T::Output>;

    fn run<M: TrainModel<B>>(self) -> Result<T::Output> {
        self.task.run::<B, M>(self.device)
    }
}

impl<T: WithModel> BackendTask for OnDevice<T> {
    type Output = Result<T::Output>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<T::Output> {
        let spec = self.0.model_spec().to_string();
        let model_type =
            Registry::model_type_of(&spec).with_context(|| format!("loading model `{spec}`"))?;
        Registry::run::<B, _>(
            &model_type,
            WithFamily {
                task: self.0,
                device,
            },
        )
        .with_context(|| format!("loading model `{spec}`"))?
    }
}

/// Runs `task` on `device` with the family of its model.
pub fn run<T: WithModel>(device: DeviceSpec, task: T) -> Result<T::Output> {
    dispatch(device, OnDevice(task)).context("selecting the device")?
}

/// Loads `spec` (HF directory, GGUF file or asset) onto `device`.
pub fn load<B: Backend, M: ModelFiles<B>>(spec: &str, device: &B::Device) -> Result<Loaded<B, M>> {
    M::load(spec, device).with_context(|| format!("loading model `{spec}`"))
}

/// The `--quantize` flag of the commands that run a model.
#[derive(clap::Args, Debug, Clone)]
pub struct QuantizeArg {
    /// Store the linear weights as `q8_0` or `q4_k` (encoded on load), or `keep` a GGUF file's
    /// blocks as they are; `none` (default) loads them as f32.
    #[arg(long, default_value = "none")]
    pub quantize: String,
}

impl QuantizeArg {
    /// The parsed flag.
    pub fn get(&self) -> Result<Quantize> {
        self.quantize
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--{e}"))
    }
}

/// Loads `spec` with its linear weights stored as `quantize` says, and applies the PEFT
/// adapter in `adapter`, if any.
pub fn load_adapted<B: Backend, M: ModelFiles<B>>(
    spec: &str,
    adapter: Option<&Path>,
    quantize: Quantize,
    device: &B::Device,
) -> Result<Loaded<B, M>> {
    let mut loaded = M::load_quantized(spec, device, quantize)
        .with_context(|| format!("loading model `{spec}`"))?;
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
pub fn eos_ids<B: Backend, M: ModelFiles<B>>(loaded: &Loaded<B, M>) -> Result<Vec<u32>> {
    let path = loaded.path.join("generation_config.json");
    if loaded.path.is_dir() && path.is_file() {
        let v: Value = collie_io::json::read_json(&path)?;
        let ids = token_ids(v.get("eos_token_id"));
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(loaded.config.eos_ids())
}

/// The id generation pads finished or shorter rows with: the config's pad id, else the first
/// EOS id, else 0.
pub fn pad_id<B: Backend, M: ModelFiles<B>>(loaded: &Loaded<B, M>, eos_ids: &[u32]) -> u32 {
    loaded
        .config
        .pad_id()
        .or(eos_ids.first().copied())
        .unwrap_or(0)
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

/// Writes `loaded` as an HF directory at `output` in `dtype` (`convert`, `merge`) and says so.
pub fn write_hf_dir<B: Backend, M: ModelFiles<B>>(
    loaded: &Loaded<B, M>,
    output: &Path,
    dtype: collie_io::safetensors::SaveDtype,
) -> Result<()> {
    loaded
        .model
        .save_hf_dir(&loaded.config, loaded.tokenizer.as_ref(), output, dtype)
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("wrote {}", output.display());
    Ok(())
}
