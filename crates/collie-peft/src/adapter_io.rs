//! HF peft's adapter format: `adapter_config.json` + `adapter_model.safetensors`, so adapters
//! move between collie-rs, peft, vLLM and llama.cpp tools.
//!
//! Keys are peft's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` `[r, d_in]`,
//! `…lora_B.weight` `[d_out, r]`, `…ia3_l` `[d_out, 1]` or `[1, d_in]` for feed-forward layers,
//! `prompt_embeddings` for the prompt-learning methods). A reparameterized prompt encoder
//! (P-tuning, prefix projection) is saved by peft as its output only; we also write the encoder
//! itself to `prompt_encoder.safetensors` (peft's parameter names without the adapter name), so
//! training resumes exactly — peft ignores that file, and without it the saved output is loaded
//! as a fixed table, as peft does in inference mode.

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use collie_core::nn::{Adaptable, Adapter, Linear, VirtualTokens};
use collie_io::json::{read_json, write_json};
use collie_io::module::TensorSource;
use collie_io::safetensors::{save_safetensors, SafetensorsSource, SaveDtype};
use collie_io::HostTensor;
use serde_json::{json, Map, Value};

use crate::config::{PeftConfig, PeftKind, PromptInit, TargetModules};
use crate::error::{PeftError, Result};

/// peft's adapter config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// peft's adapter weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The full prompt encoder of a reparameterized prompt-learning adapter (collie-rs; peft ignores
/// it).
pub const ENCODER_FILE: &str = "prompt_encoder.safetensors";

const PREFIX: &str = "base_model.model.";

/// Writes `model`'s adapter into `dir` (created if needed) in peft's format.
/// `base_model` goes into `base_model_name_or_path`.
pub fn save<B: Backend, M: Adaptable<B> + Module<B>>(
    model: &mut M,
    config: &PeftConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    write_config(model, config, base_model, dir)?;
    let mut tensors = Vec::new();
    if config.kind.is_prompt_learning() {
        let v = model.virtual_tokens().ok_or_else(|| {
            PeftError::Config(format!(
                "the model has no {} virtual tokens",
                config.kind.peft_type()
            ))
        })?;
        tensors.push((
            "prompt_embeddings".to_string(),
            HostTensor::from_tensor(v.encode().detach()),
        ));
        if !v.mlp.is_empty() {
            save_safetensors(&dir.join(ENCODER_FILE), &encoder_tensors(v), SaveDtype::F32)?;
        }
    } else {
        for (name, linear) in model.named_linears() {
            match &linear.adapter {
                Some(Adapter::Lora(l)) => {
                    let a = HostTensor::from_tensor(l.a.val().detach()).transpose();
                    let b = HostTensor::from_tensor(l.b.val().detach()).transpose();
                    tensors.push((format!("{PREFIX}{name}.lora_A.weight"), a));
                    tensors.push((format!("{PREFIX}{name}.lora_B.weight"), b));
                }
                Some(Adapter::Ia3(a)) => {
                    let s = HostTensor::from_tensor(a.scale.val().detach());
                    let n = s.data.len();
                    let shape = if a.on_input { vec![1, n] } else { vec![n, 1] };
                    tensors.push((
                        format!("{PREFIX}{name}.ia3_l"),
                        HostTensor::new(shape, s.data),
                    ));
                }
                None => {}
            }
        }
    }
    save_safetensors(&dir.join(WEIGHTS_FILE), &tensors, SaveDtype::F32)?;
    Ok(())
}

/// Writes `dir/adapter_config.json` (creating `dir`) as peft writes it for `model`'s adapter.
/// `base_model` goes into `base_model_name_or_path`.
pub fn write_config<B: Backend, M: Adaptable<B>>(
    model: &mut M,
    config: &PeftConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| collie_io::IoError::io(dir, e))?;
    write_json(
        &dir.join(CONFIG_FILE),
        &config_json(model, config, base_model),
    )?;
    Ok(())
}

/// peft's names of the encoder layers (`mlp_head.{0,2,4}` for P-tuning, `transform.{0,2}` for
/// the prefix projection).
fn layer_name<B: Backend>(v: &VirtualTokens<B>, i: usize) -> String {
    let head = match v.target {
        collie_core::nn::VirtualTarget::Input => "mlp_head",
        collie_core::nn::VirtualTarget::Prefix { .. } => "transform",
    };
    format!("{head}.{}", 2 * i)
}

fn encoder_tensors<B: Backend>(v: &VirtualTokens<B>) -> Vec<(String, HostTensor)> {
    let mut out = vec![(
        "embedding.weight".to_string(),
        HostTensor::from_tensor(v.embedding.val().detach()),
    )];
    for (i, l) in v.mlp.iter().enumerate() {
        let name = layer_name(v, i);
        out.push((
            format!("{name}.weight"),
            HostTensor::from_tensor(l.weight.val().detach()).transpose(),
        ));
        if let Some(b) = &l.bias {
            out.push((
                format!("{name}.bias"),
                HostTensor::from_tensor(b.val().detach()),
            ));
        }
    }
    out
}

/// The `adapter_config.json` peft writes for this adapter.
fn config_json<B: Backend, M: Adaptable<B>>(
    model: &mut M,
    config: &PeftConfig,
    base_model: &str,
) -> Value {
    let d = model.dims();
    let mut m = Map::new();
    m.insert("peft_type".into(), json!(config.kind.peft_type()));
    m.insert("task_type".into(), json!("CAUSAL_LM"));
    m.insert("base_model_name_or_path".into(), json!(base_model));
    m.insert("inference_mode".into(), json!(true));
    // As peft records them: a list as given, `all-linear` as the full names it resolved to, a
    // regex as is.
    let targets = |model: &mut M| -> Value {
        match config.targets() {
            TargetModules::Names(mut names) => {
                names.sort();
                names.dedup();
                json!(names)
            }
            TargetModules::Pattern(p) if p == "all-linear" => {
                let output = model.output_layer_name();
                let t = TargetModules::Pattern(p);
                let names: Vec<String> = model
                    .named_linears()
                    .into_iter()
                    .filter(|(n, _)| crate::is_target(&t, n, output))
                    .map(|(n, _)| n)
                    .collect();
                json!(names)
            }
            TargetModules::Pattern(p) => json!(p),
        }
    };
    match config.kind {
        PeftKind::None => {}
        PeftKind::Lora => {
            m.insert("r".into(), json!(config.r));
            m.insert("lora_alpha".into(), json!(config.alpha));
            m.insert("lora_dropout".into(), json!(config.dropout));
            m.insert("use_rslora".into(), json!(config.use_rslora));
            m.insert("target_modules".into(), targets(model));
            m.insert("bias".into(), json!("none"));
            m.insert("fan_in_fan_out".into(), json!(false));
            m.insert("init_lora_weights".into(), json!(true));
            m.insert("use_dora".into(), json!(false));
            m.insert("modules_to_save".into(), Value::Null);
        }
        PeftKind::Ia3 => {
            m.insert("target_modules".into(), targets(model));
            m.insert("feedforward_modules".into(), json!(config.feedforward()));
            m.insert("fan_in_fan_out".into(), json!(false));
            m.insert("init_ia3_weights".into(), json!(true));
            m.insert("modules_to_save".into(), Value::Null);
        }
        PeftKind::Prefix | PeftKind::Prompt | PeftKind::Ptuning => {
            let (token_dim, heads) = match config.kind {
                PeftKind::Prefix => (d.kv_heads * d.head_dim, d.kv_heads),
                _ => (d.hidden, d.heads),
            };
            m.insert(
                "num_virtual_tokens".into(),
                json!(config.num_virtual_tokens),
            );
            m.insert("token_dim".into(), json!(token_dim));
            m.insert("num_transformer_submodules".into(), json!(1));
            m.insert("num_attention_heads".into(), json!(heads));
            m.insert("num_layers".into(), json!(d.layers));
            let encoder_hidden = config.encoder_hidden_size.unwrap_or(token_dim);
            match config.kind {
                PeftKind::Prefix => {
                    m.insert("prefix_projection".into(), json!(config.prefix_projection));
                    m.insert("encoder_hidden_size".into(), json!(encoder_hidden));
                }
                PeftKind::Ptuning => {
                    m.insert("encoder_reparameterization_type".into(), json!("MLP"));
                    m.insert("encoder_hidden_size".into(), json!(encoder_hidden));
                    m.insert("encoder_num_layers".into(), json!(2));
                    m.insert("encoder_dropout".into(), json!(0.0));
                }
                _ => {
                    // The saved embeddings replace any initialization.
                    m.insert("prompt_tuning_init".into(), json!("RANDOM"));
                }
            }
        }
    }
    Value::Object(m)
}

/// Reads `dir/adapter_config.json` into a [`PeftConfig`], rejecting what collie-rs cannot
/// reproduce exactly (another task type, DoRA, trained biases, extra saved modules, per-layer
/// ranks).
pub fn read_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(PeftError::adapter(
            dir,
            format!("no {CONFIG_FILE}: not a peft adapter directory"),
        ));
    }
    let v: Value = read_json(&path)?;
    let bad = |msg: String| PeftError::adapter(&path, msg);
    let peft_type = v
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing `peft_type`".into()))?;
    let kind = PeftKind::from_peft_type(peft_type).ok_or_else(|| {
        bad(format!(
            "peft_type `{peft_type}` is not supported (supported: LORA, IA3, PREFIX_TUNING, \
             PROMPT_TUNING, P_TUNING)"
        ))
    })?;
    if let Some(t) = v.get("task_type").and_then(Value::as_str) {
        if t != "CAUSAL_LM" {
            return Err(bad(format!(
                "task_type `{t}`: only CAUSAL_LM adapters apply to a causal language model"
            )));
        }
    }
    let get_f = |k: &str| v.get(k).and_then(Value::as_f64);
    let get_u = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
    let truthy = |k: &str| v.get(k).is_some_and(|x| x.as_bool() == Some(true));
    let set = |k: &str| {
        v.get(k)
            .is_some_and(|x| !x.is_null() && x.as_object().is_none_or(|o| !o.is_empty()))
    };
    if truthy("use_dora") {
        return Err(bad(
            "use_dora = true: DoRA adapters are not supported".into()
        ));
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(format!(
                "bias = `{b}`: only adapters without trained biases are supported"
            )));
        }
    }
    for k in [
        "modules_to_save",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
    ] {
        if set(k) {
            return Err(bad(format!("`{k}` is set: not supported")));
        }
    }
    if let Some(params) = v.get("target_parameters").and_then(Value::as_array) {
        if !params.is_empty() {
            return Err(bad(format!(
                "target_parameters = {params:?} (LoRA on parameters, such as a mixture of \
                 experts' stacked expert tensors) is set: not supported; adapters on modules are"
            )));
        }
    }
    if get_u("num_transformer_submodules").is_some_and(|n| n != 1) {
        return Err(bad(
            "num_transformer_submodules must be 1 (decoder-only)".into()
        ));
    }
    let mut c = PeftConfig::new(kind);
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) => Some(TargetModules::Pattern(s.clone())),
        Some(Value::Array(a)) => Some(TargetModules::Names(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        )),
        _ => None,
    };
    c.target_modules = targets;
    if let Some(r) = get_u("r") {
        c.r = r;
    }
    if let Some(a) = get_f("lora_alpha") {
        c.alpha = a;
    }
    c.dropout = get_f("lora_dropout").unwrap_or(0.0);
    c.use_rslora = truthy("use_rslora");
    if let Some(Value::Array(a)) = v.get("feedforward_modules") {
        c.feedforward_modules = Some(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        );
    }
    if let Some(n) = get_u("num_virtual_tokens") {
        c.num_virtual_tokens = n;
    }
    c.prefix_projection = truthy("prefix_projection");
    c.encoder_hidden_size = get_u("encoder_hidden_size");
    if let Some(t) = v
        .get("encoder_reparameterization_type")
        .and_then(Value::as_str)
    {
        c.encoder_reparameterization_type = t.to_string();
    }
    c.prompt_init = PromptInit::Random;
    c.validate().map_err(|e| bad(e.to_string()))?;
    Ok(c)
}

/// Applies the adapter in `dir` to `model` (freezing the base): reads its config, builds the
/// method's structure and fills it with the saved weights, checking every key and shape.
pub fn load<B: Backend, M: Adaptable<B> + Module<B>>(
    model: M,
    dir: &Path,
    device: &B::Device,
) -> Result<(M, PeftConfig)> {
    let config = read_config(dir)?;
    let sharded = collie_io::sharded::is_sharded(dir);
    let path = dir.join(WEIGHTS_FILE);
    if !sharded && !path.is_file() {
        return Err(PeftError::adapter(dir, format!("no {WEIGHTS_FILE}")));
    }
    let mut model = crate::apply(model, &config, None, device).map_err(|e| match e {
        PeftError::Config(m) => PeftError::adapter(dir.join(CONFIG_FILE), m),
        e => e,
    })?;
    if sharded {
        return Ok((load_sharded(model, dir)?, config));
    }
    let source = SafetensorsSource::open(&path)?;
    let mut used = BTreeSet::new();
    let mut read = |key: &str, shape: &[usize]| -> Result<HostTensor> {
        let Some(found) = source.shape(key) else {
            return Err(PeftError::adapter(
                &path,
                format!("missing `{key}` (is this adapter for another base model?)"),
            ));
        };
        if found != shape {
            return Err(PeftError::adapter(
                &path,
                format!(
                    "`{key}` has shape {found:?}, this model needs {shape:?}: the adapter was \
                     made for another base model"
                ),
            ));
        }
        used.insert(key.to_string());
        Ok(source.read(key)?)
    };
    if config.kind.is_prompt_learning() {
        let slot = model.virtual_tokens_mut();
        let v = slot.take().expect("apply built the virtual tokens");
        let encoder = dir.join(ENCODER_FILE);
        let v = if encoder.is_file() {
            load_encoder(v, &encoder, device)?
        } else {
            let out = v.encode();
            let [n, d] = out.dims();
            let table = read("prompt_embeddings", &[n, d])?;
            VirtualTokens {
                embedding: Param::from_tensor(table.to_tensor(device)),
                mlp: Vec::new(),
                activation: v.activation,
                target: v.target,
            }
        };
        if !encoder.is_file() || source.keys().iter().any(|k| k == "prompt_embeddings") {
            used.insert("prompt_embeddings".to_string());
        }
        *model.virtual_tokens_mut() = Some(v);
    } else {
        for (name, linear) in model.named_linears() {
            fill_linear(&name, linear, &mut read, device)?;
        }
    }
    let unused: Vec<String> = source
        .keys()
        .into_iter()
        .filter(|k| !used.contains(k))
        .collect();
    if let Some(k) = unused.first() {
        return Err(PeftError::adapter(
            &path,
            format!(
                "`{k}` (and {} more keys) match no adapted layer of this model: the adapter was \
                 made for another base model",
                unused.len() - 1
            ),
        ));
    }
    Ok((model, config))
}

/// Fills the adapted `model`'s trainable parameters from a sharded checkpoint of a parallel run
/// (`collie_io::sharded`), where they are stored by path in the model's own layout.
fn load_sharded<B: Backend, M: Module<B>>(model: M, dir: &Path) -> Result<M> {
    use collie_io::module::{load_module, Binding, Convert};
    use collie_io::sharded::{Kind, Manifest, Part, ShardedSource};
    if Manifest::read(dir)?.kind != Kind::Adapter {
        return Err(PeftError::adapter(
            dir,
            "a sharded checkpoint of the whole model, not of an adapter",
        ));
    }
    let source = ShardedSource::open(dir, Part::Params)?;
    let stored: BTreeSet<String> = source.keys().into_iter().collect();
    let mut used = BTreeSet::new();
    let model = load_module(model, &source, |info| {
        stored.get(&info.path).map(|key| {
            used.insert(key.clone());
            Binding {
                key: key.clone(),
                convert: Convert::Identity,
            }
        })
    })?;
    if let Some(k) = stored.difference(&used).next() {
        return Err(PeftError::adapter(
            dir.join(collie_io::sharded::MANIFEST),
            format!(
                "`{k}` is no parameter of this model with its adapter: the checkpoint was made                  for another base model or adapter"
            ),
        ));
    }
    Ok(model)
}

fn fill_linear<B: Backend>(
    name: &str,
    linear: &mut Linear<B>,
    read: &mut impl FnMut(&str, &[usize]) -> Result<HostTensor>,
    device: &B::Device,
) -> Result<()> {
    match &mut linear.adapter {
        Some(Adapter::Lora(l)) => {
            let [d_in, r] = l.a.dims();
            let d_out = l.b.dims()[1];
            let a = read(&format!("{PREFIX}{name}.lora_A.weight"), &[r, d_in])?;
            let b = read(&format!("{PREFIX}{name}.lora_B.weight"), &[d_out, r])?;
            l.a = Param::from_tensor(a.transpose().to_tensor(device));
            l.b = Param::from_tensor(b.transpose().to_tensor(device));
        }
        Some(Adapter::Ia3(a)) => {
            let n = a.scale.dims()[0];
            let shape = if a.on_input { [1, n] } else { [n, 1] };
            let s = read(&format!("{PREFIX}{name}.ia3_l"), &shape)?;
            a.scale = Param::from_tensor(HostTensor::new(vec![n], s.data).to_tensor(device));
        }
        None => {}
    }
    Ok(())
}

/// Loads a full prompt encoder written by [`save`] (or from peft's parameters).
fn load_encoder<B: Backend>(
    v: VirtualTokens<B>,
    path: &Path,
    device: &B::Device,
) -> Result<VirtualTokens<B>> {
    let source = SafetensorsSource::open(path)?;
    let expected: Vec<(String, Vec<usize>)> = encoder_tensors(&v)
        .into_iter()
        .map(|(k, t)| (k, t.shape))
        .collect();
    let mut values = Vec::new();
    for (key, shape) in &expected {
        match source.shape(key) {
            Some(s) if &s == shape => values.push(source.read(key)?),
            Some(s) => {
                return Err(PeftError::adapter(
                    path,
                    format!("`{key}` has shape {s:?}, this adapter's config needs {shape:?}"),
                ))
            }
            None => return Err(PeftError::adapter(path, format!("missing `{key}`"))),
        }
    }
    let mut values = values.into_iter();
    let embedding = Param::from_tensor(values.next().expect("embedding").to_tensor(device));
    let mlp = v
        .mlp
        .iter()
        .map(|l| {
            let w = values.next().expect("weight").transpose().to_tensor(device);
            let bias = l
                .bias
                .as_ref()
                .map(|_| Param::from_tensor(values.next().expect("bias").to_tensor(device)));
            Linear {
                weight: Param::from_tensor(w),
                bias,
                adapter: None,
                parallel: l.parallel,
                tp: l.tp.clone(),
                quant: None,
            }
        })
        .collect();
    Ok(VirtualTokens {
        embedding,
        mlp,
        activation: v.activation,
        target: v.target,
    })
}
