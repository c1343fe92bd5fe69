//! InternLM2's checkpoint layout (`model_type = "internlm2"`): LLaMA's block under other names,
//! with q, k and v fused into one grouped `attention.wqkv` — for every key/value head, the rows
//! of its query heads, then its key head, then its value head. The model holds q/k/v as separate
//! layers (so tensor parallelism and PEFT see LLaMA's table); loading cuts `wqkv`, saving fuses
//! it back.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use collie_io::module::torch_state_dict;
use collie_io::HostTensor;

use crate::model::Llama;

/// q, k or v: which rows of `wqkv` a projection owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvPart {
    /// The query heads of every group.
    Q,
    /// The key head of every group.
    K,
    /// The value head of every group.
    V,
}

/// InternLM2's names for our module paths inside a block (`None`: fused into `wqkv`).
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "attention_norm"),
    ("attn.o_proj", "attention.wo"),
    ("mlp_norm", "ffn_norm"),
    ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.up_proj", "feed_forward.w3"),
    ("mlp.down_proj", "feed_forward.w2"),
];

/// InternLM2's key for one of our parameter paths, and the part of `wqkv` it is for q/k/v;
/// `None` for parameters the checkpoint does not hold (adapters).
pub fn key(path: &str) -> Option<(String, Option<QkvPart>)> {
    if path.contains(".adapter.") {
        return None;
    }
    let key = match path {
        "embed.weight" => "model.tok_embeddings.weight".to_string(),
        "head.norm.weight" => "model.norm.weight".to_string(),
        "head.lm_head.weight" => "output.weight".to_string(),
        _ => {
            let rest = path.strip_prefix("layers.")?;
            let (index, rest) = rest.split_once('.')?;
            let (module, param) = rest.rsplit_once('.')?;
            let part = match module {
                "attn.q_proj" => Some(QkvPart::Q),
                "attn.k_proj" => Some(QkvPart::K),
                "attn.v_proj" => Some(QkvPart::V),
                _ => None,
            };
            if let Some(part) = part {
                let key = format!("model.layers.{index}.attention.wqkv.{param}");
                return Some((key, Some(part)));
            }
            let (_, name) = BLOCK_NAMES.iter().find(|(m, _)| *m == module)?;
            format!("model.layers.{index}.{name}.{param}")
        }
    };
    Some((key, None))
}

/// The rows of `part` in a fused `wqkv` weight `[(heads + 2·kv)·hd, …]` or bias.
pub fn cut(wqkv: &HostTensor, part: QkvPart, heads: usize, kv_heads: usize) -> HostTensor {
    let g = heads / kv_heads;
    let rows = wqkv.shape[0];
    let hd = rows / (kv_heads * (g + 2));
    let cols = wqkv.data.len() / rows;
    let (first, count) = match part {
        QkvPart::Q => (0, g),
        QkvPart::K => (g, 1),
        QkvPart::V => (g + 1, 1),
    };
    let mut data = Vec::with_capacity(kv_heads * count * hd * cols);
    for h in 0..kv_heads {
        // [kv, g + 2, hd, cols]: group h's heads first..first + count.
        let start = (h * (g + 2) + first) * hd * cols;
        data.extend_from_slice(&wqkv.data[start..start + count * hd * cols]);
    }
    let mut shape = wqkv.shape.clone();
    shape[0] = kv_heads * count * hd;
    HostTensor::new(shape, data)
}

/// `wqkv` from the q, k and v weights (or biases): the inverse of [`cut`].
pub fn fuse(q: &HostTensor, k: &HostTensor, v: &HostTensor, kv_heads: usize) -> HostTensor {
    let hd = k.shape[0] / kv_heads;
    let cols = k.data.len() / k.shape[0];
    let g = q.shape[0] / (kv_heads * hd);
    let block = hd * cols;
    let mut data = Vec::with_capacity(q.data.len() + k.data.len() + v.data.len());
    for h in 0..kv_heads {
        data.extend_from_slice(&q.data[h * g * block..(h + 1) * g * block]);
        data.extend_from_slice(&k.data[h * block..(h + 1) * block]);
        data.extend_from_slice(&v.data[h * block..(h + 1) * block]);
    }
    let mut shape = q.shape.clone();
    shape[0] = q.shape[0] + k.shape[0] + v.shape[0];
    HostTensor::new(shape, data)
}

/// Every parameter of `model` under InternLM2's key, in PyTorch's layout, q/k/v fused.
pub fn state_dict<B: Backend>(model: &Llama<B>, kv_heads: usize) -> Vec<(String, HostTensor)> {
    // q/k/v first get distinct keys (`…wqkv.weight#Q`), then are fused in table order.
    let state = torch_state_dict(model, |path| {
        key(path).map(|(k, part)| match part {
            Some(part) => format!("{k}#{part:?}"),
            None => k,
        })
    });
    let mut out = Vec::with_capacity(state.len());
    let mut parts: BTreeMap<String, Vec<(String, HostTensor)>> = BTreeMap::new();
    for (k, t) in state {
        let Some((fused, part)) = k.split_once('#') else {
            out.push((k, t));
            continue;
        };
        let slot = parts.entry(fused.to_string()).or_default();
        slot.push((part.to_string(), t));
        if slot.len() == 3 {
            let mut slot = parts.remove(fused).expect("just filled");
            slot.sort_by_key(|(p, _)| ["Q", "K", "V"].iter().position(|x| x == p));
            out.push((
                fused.to_string(),
                fuse(&slot[0].1, &slot[1].1, &slot[2].1, kv_heads),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_inverts_fuse() {
        let (heads, kv, hd, cols) = (6, 2, 2, 3);
        let rows = (heads + 2 * kv) * hd;
        let wqkv = HostTensor::new(
            vec![rows, cols],
            (0..rows * cols).map(|v| v as f32).collect(),
        );
        let [q, k, v] = [QkvPart::Q, QkvPart::K, QkvPart::V].map(|p| cut(&wqkv, p, heads, kv));
        assert_eq!(q.shape, vec![heads * hd, cols]);
        assert_eq!(k.shape, vec![kv * hd, cols]);
        // Group 0 is rows 0..10: three query heads (0..6), its key (6..8), its value (8..10).
        assert_eq!(&k.data[..hd * cols], &wqkv.data[6 * cols..8 * cols]);
        assert_eq!(&v.data[hd * cols..], &wqkv.data[18 * cols..20 * cols]);
        assert_eq!(fuse(&q, &k, &v, kv).data, wqkv.data);
    }

    #[test]
    fn names_follow_internlm2() {
        assert_eq!(
            key("layers.1.attn.k_proj.bias").unwrap(),
            (
                "model.layers.1.attention.wqkv.bias".into(),
                Some(QkvPart::K)
            )
        );
        assert_eq!(
            key("layers.0.mlp.up_proj.weight").unwrap().0,
            "model.layers.0.feed_forward.w3.weight"
        );
        assert_eq!(key("head.lm_head.weight").unwrap().0, "output.weight");
    }
}
