//! State-dict adapter for GGUF files: llama.cpp's metadata → [`LlamaConfig`], its tensor names →
//! our parameter paths, and its q/k row permutation undone.

use burn::tensor::backend::Backend;
use collie_io::gguf::GgufSource;
use collie_io::module::{load_module, Binding, Convert, ParamInfo, TensorSource};
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

/// Undoes llama.cpp's q/k permutation, which reorders each head's rows from HF's
/// `[first half | second half]` rotation layout to interleaved pairs.
///
/// llama.cpp writes row `h·hd + 2i + t` from HF row `h·hd + t·hd/2 + i` (`t` ∈ {0, 1});
/// this puts every row back. Works on weights (`[rows, cols]`) and biases (`[rows]`).
pub fn unpermute_rows(t: HostTensor, n_heads: usize) -> HostTensor {
    let rows = t.shape[0];
    let cols = t.data.len() / rows;
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut out = vec![0.0f32; t.data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for p in 0..2 {
                let src = h * hd + 2 * i + p;
                let dst = h * hd + p * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor::new(t.shape, out)
}

/// Loads config and weights from a GGUF file (every tensor dequantized to `f32`).
pub fn load_gguf<B: Backend>(
    src: &GgufSource,
    device: &B::Device,
) -> Result<(LlamaConfig, Llama<B>)> {
    let config = config_from_gguf(src)?;
    let model = config.init::<B>(device)?;
    // Only llama.cpp's `llama` architecture permutes q/k (it rotates interleaved pairs).
    let permuted = src.get_str("general.architecture") == Some("llama");
    // llama.cpp stores Gemma's norms as `1 + w`; the model holds HF's `w`.
    let shifted_norms = config.norm_offset();
    let (heads, kv_heads) = (config.num_attention_heads, config.kv_heads());
    let bind = |info: &ParamInfo| -> Option<Binding> {
        let key = gguf_key(&info.path)?;
        let linear = info.is_linear_weight();
        let n = if info.path.contains("attn.q_proj.") {
            Some(heads)
        } else if info.path.contains("attn.k_proj.") {
            Some(kv_heads)
        } else {
            None
        };
        let norm = info.path.ends_with("norm.weight") && shifted_norms != 0.0;
        let convert = match n.filter(|_| permuted) {
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
    let model = load_module(model, src, bind)?;
    Ok((config, model))
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
        let back = unpermute_rows(HostTensor::new(vec![rows, cols], permuted), n_heads);
        assert_eq!(back.data, hf);
    }
}
