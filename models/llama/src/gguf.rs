//! State-dict adapter for GGUF files: llama.cpp's metadata → [`LlamaConfig`], its tensor names →
//! our parameter paths, and its q/k row permutation undone; [`save_gguf`] writes the other way.

use std::path::Path;

use burn::tensor::backend::Backend;
use collie_core::nn::Adaptable;
use collie_core::rope::RopeScaling;
use collie_io::gguf::{GgufOut, GgufSource, MetaValue};
use collie_io::module::{load_module, torch_state_lazy, Binding, Convert, ParamInfo, TensorSource};
use collie_io::quant::QuantType;
use collie_io::{HostTensor, IoError};
use serde_json::{json, Map, Value};

use crate::config::LlamaConfig;
use crate::error::{LlamaError, Result};
use crate::model::{Llama, ParamPath};

/// GGUF architectures this adapter reads, and the HF model type each becomes.
pub const ARCHITECTURES: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma3", "gemma3_text"),
];

/// Builds the HF config a GGUF file's metadata describes.
pub fn config_from_gguf(src: &GgufSource) -> Result<LlamaConfig> {
    let arch = src.require_str("general.architecture")?;
    let Some(&(_, model_type)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        return Err(LlamaError::UnknownArchitecture(format!(
            "{}: GGUF architecture `{arch}` (supported: {})",
            src.path().display(),
            ARCHITECTURES
                .iter()
                .map(|a| a.0)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if src.shape("rope_freqs.weight").is_some() {
        return Err(LlamaError::Config(format!(
            "{}: per-frequency RoPE factors (`rope_freqs.weight`, Llama 3.1 style) are not supported in GGUF; \
             load the HF checkpoint instead",
            src.path().display()
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    if src.get_u64(&key("expert_count")).is_some_and(|n| n > 0) {
        return Err(LlamaError::Config(format!(
            "{}: a mixture of experts (`{arch}.expert_count`) in GGUF is not supported; load the \
             HF checkpoint instead",
            src.path().display()
        )));
    }
    let u = |k: &str| src.require_u64(&key(k)).map(|v| v as usize);
    let heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let vocab = match src.get_u64(&key("vocab_size")) {
        Some(v) => v as usize,
        None => src
            .get_str_array("tokenizer.ggml.tokens")
            .map(|t| t.len())
            .or_else(|| src.shape("token_embd.weight").map(|s| s[0]))
            .ok_or_else(|| IoError::Gguf {
                path: src.path().to_path_buf(),
                message:
                    "cannot tell the vocabulary size (no vocab_size, tokens or token_embd.weight)"
                        .into(),
            })?,
    };
    let mut config = LlamaConfig::new(
        vocab,
        hidden,
        u("feed_forward_length")?,
        u("block_count")?,
        heads,
        src.get_u64(&key("attention.head_count_kv"))
            .map_or(heads, |v| v as usize),
    );
    config.model_type = model_type.to_string();
    let class = crate::config::class_of(model_type).expect("a GGUF architecture's model type");
    config.architectures = Some(vec![class.to_string()]);
    config.max_position_embeddings = src
        .get_u64(&key("context_length"))
        .map_or(2048, |v| v as usize);
    config.rms_norm_eps = src.require_f64(&key("attention.layer_norm_rms_epsilon"))?;
    config.rope_theta = Some(src.get_f64(&key("rope.freq_base")).unwrap_or(10000.0));
    let head_dim = src
        .get_u64(&key("attention.key_length"))
        .or_else(|| src.get_u64(&key("rope.dimension_count")))
        .map(|v| v as usize);
    if let Some(hd) = head_dim.filter(|hd| *hd * heads != hidden) {
        config.head_dim = Some(hd);
    }
    if let Some(kind) = src
        .get_str(&key("rope.scaling.type"))
        .filter(|k| *k != "none")
    {
        let factor = src.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0);
        if kind != "linear" {
            return Err(LlamaError::Config(format!(
                "{}: GGUF rope scaling `{kind}` is not supported (linear is)",
                src.path().display()
            )));
        }
        config.rope_scaling = Some(json!({"rope_type": "linear", "factor": factor}));
    }
    config.tie_word_embeddings = src.shape("output.weight").is_none();
    if arch == "gemma3" {
        // What transformers' GGUF loader assumes too: the file names neither the activation nor
        // the layer pattern, so Gemma 3's defaults hold (GeGLU, every sixth layer global, local
        // RoPE base 10000, query_pre_attn_scalar 256).
        config.hidden_act = None;
        config.hidden_activation = Some("gelu_pytorch_tanh".into());
        config.sliding_window = src
            .get_u64(&key("attention.sliding_window"))
            .map(|v| v as usize);
    }
    if arch == "llama" && src.shape("blk.0.attn_q.bias").is_some() {
        config.attention_bias = Some(true);
    }
    let id = |k: &str| {
        src.get_u64(&format!("tokenizer.ggml.{k}"))
            .map(|v| json!(v))
    };
    config.bos_token_id = id("bos_token_id");
    config.eos_token_id = id("eos_token_id");
    config.pad_token_id = id("padding_token_id");
    config.extra = Map::from_iter([("torch_dtype".to_string(), Value::from("float32"))]);
    config.validate()?;
    Ok(config)
}

/// GGUF tensor name of one of our parameter paths.
pub fn gguf_key(path: &str) -> Option<String> {
    Some(match ParamPath::parse(path)? {
        ParamPath::Embed => "token_embd.weight".into(),
        ParamPath::FinalNorm(p) => format!("output_norm.{p}"),
        ParamPath::LmHead(p) => format!("output.{p}"),
        ParamPath::Block {
            index,
            module,
            param,
        } => {
            let (_, _, name, _) = crate::model::block_module(module)?;
            if name.is_empty() {
                return None;
            }
            format!("blk.{index}.{name}.{param}")
        }
    })
}

/// The heads whose rows llama.cpp permutes in GGUF tensor `name` (`blk.N.attn_q…` /
/// `blk.N.attn_k…`), for its `llama` architecture only (it rotates interleaved pairs).
fn permuted_heads(config: &LlamaConfig, arch: &str, name: &str) -> Option<usize> {
    if arch != "llama" {
        return None;
    }
    match name.split('.').nth(2)? {
        "attn_q" => Some(config.num_attention_heads),
        "attn_k" => Some(config.kv_heads()),
        _ => None,
    }
}

/// Undoes llama.cpp's q/k permutation, which reorders each head's rows from HF's
/// `[first half | second half]` rotation layout to interleaved pairs.
///
/// llama.cpp writes row `h·hd + 2i + t` from HF row `h·hd + t·hd/2 + i` (`t` ∈ {0, 1});
/// this puts every row back. Works on weights (`[rows, cols]`) and biases (`[rows]`).
pub fn unpermute_rows(t: HostTensor, n_heads: usize) -> HostTensor {
    let order = unpermute_order(t.shape[0], n_heads);
    move_rows(t, &order)
}

/// Row `i` of the result is row `from[i]` of `t` (a weight `[rows, cols]` or a bias `[rows]`).
fn move_rows(t: HostTensor, from: &[usize]) -> HostTensor {
    let cols = t.data.len() / t.shape[0];
    let data = from
        .iter()
        .flat_map(|&r| t.data[r * cols..(r + 1) * cols].iter().copied())
        .collect();
    HostTensor::new(t.shape, data)
}

/// Loads config and weights from a GGUF file (every tensor dequantized to `f32`).
pub fn load_gguf<B: Backend>(
    src: &GgufSource,
    device: &B::Device,
) -> Result<(LlamaConfig, Llama<B>)> {
    load(src, device, false)
}

/// [`load_gguf`] with the blocks' linear weights kept as the file stores them (frozen
/// [`collie_core::nn::QuantWeight`]s, q/k rows put back in HF's order by moving whole rows);
/// norms, embeddings and the LM head dequantized to `f32`.
pub fn load_gguf_keep<B: Backend>(
    src: &GgufSource,
    device: &B::Device,
) -> Result<(LlamaConfig, Llama<B>)> {
    load(src, device, true)
}

/// Row `i` of HF's q/k layout is row `from[i]` of llama.cpp's ([`unpermute_rows`]).
fn unpermute_order(rows: usize, n_heads: usize) -> Vec<usize> {
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut from = vec![0; rows];
    for h in 0..n_heads {
        for i in 0..half {
            for p in 0..2 {
                from[h * hd + p * half + i] = h * hd + 2 * i + p;
            }
        }
    }
    from
}

fn load<B: Backend>(
    src: &GgufSource,
    device: &B::Device,
    keep: bool,
) -> Result<(LlamaConfig, Llama<B>)> {
    let config = config_from_gguf(src)?;
    let model = config.init::<B>(device)?;
    let arch = src.get_str("general.architecture").unwrap_or("");
    // llama.cpp stores Gemma's norms as `1 + w`; the model holds HF's `w`.
    let shifted_norms = config.norm_offset();
    let bind = |info: &ParamInfo| -> Option<Binding> {
        let key = gguf_key(&info.path)?;
        let linear = info.is_linear_weight();
        if keep && linear && key.starts_with("blk.") {
            // Read below as blocks; the float parameter is never materialized.
            return Some(Binding {
                key,
                convert: Convert::Elsewhere(true),
            });
        }
        let norm = info.path.ends_with("norm.weight") && shifted_norms != 0.0;
        let convert = match permuted_heads(&config, arch, &key) {
            Some(n) => Convert::Custom(Box::new(move |t| unpermute_rows(t, n)), linear),
            None if norm => Convert::Custom(
                Box::new(move |mut t| {
                    t.data.iter_mut().for_each(|w| *w -= shifted_norms as f32);
                    t
                }),
                false,
            ),
            None if linear => Convert::Transpose,
            None => Convert::Identity,
        };
        Some(Binding { key, convert })
    };
    let mut model = load_module(model, src, bind)?;
    if keep {
        for slot in model.linears_mut() {
            let Some(base) = gguf_module(&slot.name).filter(|b| b.starts_with("blk.")) else {
                continue;
            };
            let key = format!("{base}.weight");
            let mut blocks = collie_io::quant::gguf_blocks(src, &key)?;
            if let Some(n) = permuted_heads(&config, arch, &base) {
                let rows = slot.linear.dims()[1];
                blocks = blocks.permute_rows(&unpermute_order(rows, n));
            }
            slot.linear
                .set_quantized(blocks.into_weight())
                .map_err(|m| IoError::Gguf {
                    path: src.path().to_path_buf(),
                    message: format!("`{key}`: {m}"),
                })?;
        }
    }
    Ok((config, model))
}

/// llama.cpp's q/k permutation (its converter's `permute`): each head's rows go from HF's
/// `[first half | second half]` rotation layout to interleaved pairs. Inverse of
/// [`unpermute_rows`].
pub fn permute_rows(t: HostTensor, n_heads: usize) -> HostTensor {
    let rows = t.shape[0];
    let mut from = vec![0; rows];
    for (hf, &cpp) in unpermute_order(rows, n_heads).iter().enumerate() {
        from[cpp] = hf;
    }
    move_rows(t, &from)
}

/// llama.cpp's architecture for a model type this writer serves (Mistral is written as `llama`,
/// as llama.cpp's converter does).
fn gguf_architecture(config: &LlamaConfig) -> Result<&'static str> {
    let arch = match config.model_type.as_str() {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        other => {
            return Err(LlamaError::UnknownArchitecture(format!(
            "model type `{other}` cannot be written as GGUF (llama, mistral, qwen2 and qwen3 can)"
        )))
        }
    };
    let unsupported = |what: &str| {
        Err(LlamaError::Config(format!(
            "a {} model with {what} cannot be written as GGUF",
            config.model_type
        )))
    };
    if config.sliding_window.is_some()
        && config.use_sliding_window != Some(false)
        && arch != "llama"
    {
        return unsupported("sliding-window attention");
    }
    if config.mlp_bias == Some(true) {
        return unsupported("MLP biases");
    }
    if config.activation()? != collie_core::nn::Activation::Silu {
        return unsupported("an activation other than SiLU");
    }
    Ok(arch)
}

/// Writes `model` as a GGUF file llama.cpp loads: its architecture's metadata, its tensor names,
/// q/k rows permuted for the `llama` architecture, 2-D weights stored as `ty` (F32 when `None`;
/// a matrix whose rows are not a whole number of `ty`'s blocks falls back to Q8_0, then F16),
/// norms and biases in F32, and `tokenizer` (`tokenizer.*` keys) when given. `general.file_type`
/// names the type most weights have (llama.cpp's `LLAMA_FTYPE_*`).
pub fn save_gguf<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    tokenizer: &[(String, MetaValue)],
    path: &Path,
    ty: Option<QuantType>,
) -> Result<()> {
    let arch = gguf_architecture(config)?;
    let mut out = GgufOut::new(arch);
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |v: usize| MetaValue::U32(v as u32);
    let (theta, scaling) = config.rope()?;
    let name = config
        .extra
        .get("_name_or_path")
        .and_then(Value::as_str)
        .unwrap_or(&config.model_type);
    out.set("general.name", MetaValue::String(name.to_string()));
    let file_type = match ty {
        None => 0,
        Some(QuantType::F16) => 1,
        Some(QuantType::Q8_0) => 7,
        // LLAMA_FTYPE_MOSTLY_Q4_K_S: every matrix Q4_K.
        Some(QuantType::Q4K) => 14,
    };
    out.set("general.file_type", MetaValue::U32(file_type));
    if matches!(ty, Some(QuantType::Q8_0 | QuantType::Q4K)) {
        out.set("general.quantization_version", MetaValue::U32(2));
    }
    out.set(&key("vocab_size"), u32_of(config.vocab_size));
    out.set(
        &key("context_length"),
        u32_of(config.max_position_embeddings),
    );
    out.set(&key("embedding_length"), u32_of(config.hidden_size));
    out.set(
        &key("feed_forward_length"),
        u32_of(config.intermediate_size),
    );
    out.set(&key("block_count"), u32_of(config.num_hidden_layers));
    out.set(
        &key("attention.head_count"),
        u32_of(config.num_attention_heads),
    );
    out.set(&key("attention.head_count_kv"), u32_of(config.kv_heads()));
    out.set(
        &key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(config.rms_norm_eps as f32),
    );
    out.set(&key("rope.freq_base"), MetaValue::F32(theta as f32));
    out.set(&key("rope.dimension_count"), u32_of(config.head_dim()));
    if config.head_dim() * config.num_attention_heads != config.hidden_size {
        out.set(&key("attention.key_length"), u32_of(config.head_dim()));
        out.set(&key("attention.value_length"), u32_of(config.head_dim()));
    }
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            out.set(
                &key("rope.scaling.type"),
                MetaValue::String("linear".into()),
            );
            out.set(&key("rope.scaling.factor"), MetaValue::F32(factor));
        }
        other => {
            return Err(LlamaError::Config(format!(
                "RoPE scaling {other:?} cannot be written as GGUF (linear can)"
            )))
        }
    }
    for (k, v) in tokenizer {
        out.set(k, v.clone());
    }
    // One tensor read (and converted) at a time: a lazily loaded model streams from its files.
    for t in torch_state_lazy(model, gguf_key) {
        let mut value = t.read();
        if let Some(n) = permuted_heads(config, arch, &t.name) {
            value = permute_rows(value, n);
        }
        let matrix = value.shape.len() == 2 && t.name.ends_with(".weight");
        let row = value.shape.last().copied().unwrap_or(1);
        let stored = ty
            .filter(|_| matrix)
            .map(|ty| collie_io::quant::fallback(ty, row));
        out.add(&t.name, &value.shape, &value.data, stored)?;
    }
    out.write(path)?;
    Ok(())
}

/// GGUF tensor name (without `.weight`) of an HF linear module name
/// (`model.layers.3.self_attn.q_proj` → `blk.3.attn_q`, `lm_head` → `output`).
pub fn gguf_module(hf_name: &str) -> Option<String> {
    if hf_name == "lm_head" {
        return Some("output".into());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (index, module) = rest.split_once('.')?;
    index.parse::<usize>().ok()?;
    let row = crate::model::BLOCK_MODULES
        .iter()
        .find(|m| m.1 == module && !m.2.is_empty())?;
    Some(format!("blk.{index}.{}", row.2))
}

/// Writes LoRA adapters as llama.cpp's adapter GGUF (what its `convert_lora_to_gguf.py` writes
/// and `--lora` loads): `general.type = "adapter"`, `adapter.type = "lora"`,
/// `adapter.lora.alpha`, and per adapted matrix `<name>.weight.lora_a` (`[r, d_in]`) and
/// `.lora_b` (`[d_out, r]`) in F32, `lora_b`'s rows permuted as the base's q/k rows are.
/// `lora` holds `(HF module name, A, B)` in peft's layout; llama.cpp scales by `alpha / r`.
pub fn save_gguf_lora(
    config: &LlamaConfig,
    lora: &[(String, HostTensor, HostTensor)],
    alpha: f32,
    path: &Path,
) -> Result<()> {
    let arch = gguf_architecture(config)?;
    let mut out = GgufOut::new(arch);
    out.set("general.type", MetaValue::String("adapter".into()));
    out.set("adapter.type", MetaValue::String("lora".into()));
    out.set("adapter.lora.alpha", MetaValue::F32(alpha));
    for (name, a, b) in lora {
        let base = gguf_module(name).ok_or_else(|| {
            LlamaError::Config(format!(
                "LoRA on `{name}`: llama.cpp has no tensor for this module"
            ))
        })?;
        let b = match permuted_heads(config, arch, &base) {
            Some(n) => permute_rows(b.clone(), n),
            None => b.clone(),
        };
        out.add(&format!("{base}.weight.lora_a"), &a.shape, &a.data, None)?;
        out.add(&format!("{base}.weight.lora_b"), &b.shape, &b.data, None)?;
    }
    out.write(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_paths_to_gguf_names() {
        assert_eq!(gguf_key("embed.weight").unwrap(), "token_embd.weight");
        assert_eq!(
            gguf_key("layers.2.attn.q_proj.weight").unwrap(),
            "blk.2.attn_q.weight"
        );
        assert_eq!(
            gguf_key("layers.2.attn.o_proj.weight").unwrap(),
            "blk.2.attn_output.weight"
        );
        assert_eq!(
            gguf_key("layers.2.mlp_norm.weight").unwrap(),
            "blk.2.ffn_norm.weight"
        );
        assert_eq!(gguf_key("head.lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_key("layers.2.attn.q_proj.adapter.a").is_none());
        assert_eq!(
            gguf_module("model.layers.11.self_attn.k_proj").unwrap(),
            "blk.11.attn_k"
        );
        assert_eq!(
            gguf_module("model.layers.0.mlp.down_proj").unwrap(),
            "blk.0.ffn_down"
        );
        assert_eq!(gguf_module("lm_head").unwrap(), "output");
        assert!(gguf_module("model.layers.0.self_attn.qkv_proj").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)
        let (n_heads, hd, cols) = (2, 6, 3);
        let rows = n_heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut permuted = vec![0.0; hf.len()];
        for h in 0..n_heads {
            for t in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + t * hd / 2 + i;
                    let dst = h * hd + i * 2 + t;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let order = unpermute_order(rows, n_heads);
        let moved: Vec<f32> = order
            .iter()
            .flat_map(|&r| permuted[r * cols..(r + 1) * cols].to_vec())
            .collect();
        assert_eq!(moved, hf, "row order of the kept blocks");
        let back = unpermute_rows(HostTensor::new(vec![rows, cols], permuted.clone()), n_heads);
        assert_eq!(back.data, hf);
        let again = permute_rows(HostTensor::new(vec![rows, cols], hf), n_heads);
        assert_eq!(again.data, permuted);
    }
}
