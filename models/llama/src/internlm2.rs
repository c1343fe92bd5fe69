//! InternLM2's checkpoint layout (`model_type = "internlm2"`): LLaMA's block under other names,
//! with q, k and v fused into one grouped `attention.wqkv` — for every key/value head, the rows
//! of its query heads, then its key head, then its value head. Loaded and saved through
//! [`CheckpointLayout`].

use collie_io::HostTensor;

use crate::layout::CheckpointLayout;
use crate::model::ParamPath;

/// InternLM2's names for our module paths inside a block (q/k/v are fused into `wqkv`).
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "attention_norm"),
    ("attn.o_proj", "attention.wo"),
    ("mlp_norm", "ffn_norm"),
    ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.up_proj", "feed_forward.w3"),
    ("mlp.down_proj", "feed_forward.w2"),
];

/// Our q, k and v projections: parts 0, 1 and 2 of `wqkv`.
const QKV: [&str; 3] = ["attn.q_proj", "attn.k_proj", "attn.v_proj"];

/// The layout of a model with `heads` query and `kv_heads` key/value heads.
#[derive(Debug, Clone, Copy)]
pub struct InternLm2 {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (groups of `wqkv`).
    pub kv_heads: usize,
}

impl CheckpointLayout for InternLm2 {
    fn key(&self, path: &str) -> Option<(String, Option<usize>)> {
        let key = match ParamPath::parse(path)? {
            ParamPath::Embed => "model.tok_embeddings.weight".into(),
            ParamPath::FinalNorm(p) => format!("model.norm.{p}"),
            ParamPath::LmHead(p) => format!("output.{p}"),
            ParamPath::Block {
                index,
                module,
                param,
            } => {
                if let Some(part) = QKV.iter().position(|m| *m == module) {
                    let key = format!("model.layers.{index}.attention.wqkv.{param}");
                    return Some((key, Some(part)));
                }
                let (_, name) = BLOCK_NAMES.iter().find(|(m, _)| *m == module)?;
                format!("model.layers.{index}.{name}.{param}")
            }
        };
        Some((key, None))
    }

    /// The rows of q (0), k (1) or v (2) in a fused `wqkv` weight `[(heads + 2·kv)·hd, …]` or
    /// bias.
    fn cut(&self, wqkv: &HostTensor, part: usize) -> HostTensor {
        let (kv, g) = (self.kv_heads, self.heads / self.kv_heads);
        let rows = wqkv.shape[0];
        let hd = rows / (kv * (g + 2));
        let cols = wqkv.data.len() / rows;
        // Query part: the group's g heads; key and value: one head each.
        let (first, count) = match part {
            0 => (0, g),
            1 => (g, 1),
            _ => (g + 1, 1),
        };
        let mut data = Vec::with_capacity(kv * count * hd * cols);
        for h in 0..kv {
            // [kv, g + 2, hd, cols]: group h's heads first..first + count.
            let start = (h * (g + 2) + first) * hd * cols;
            data.extend_from_slice(&wqkv.data[start..start + count * hd * cols]);
        }
        let mut shape = wqkv.shape.clone();
        shape[0] = kv * count * hd;
        HostTensor::new(shape, data)
    }

    /// `wqkv` from the q, k and v weights (or biases): the inverse of [`InternLm2::cut`].
    fn fuse(&self, parts: &[HostTensor]) -> HostTensor {
        let [q, k, v] = parts else {
            unreachable!("wqkv has three parts")
        };
        let kv = self.kv_heads;
        let hd = k.shape[0] / kv;
        let cols = k.data.len() / k.shape[0];
        let g = q.shape[0] / (kv * hd);
        let block = hd * cols;
        let mut data = Vec::with_capacity(q.data.len() + k.data.len() + v.data.len());
        for h in 0..kv {
            data.extend_from_slice(&q.data[h * g * block..(h + 1) * g * block]);
            data.extend_from_slice(&k.data[h * block..(h + 1) * block]);
            data.extend_from_slice(&v.data[h * block..(h + 1) * block]);
        }
        let mut shape = q.shape.clone();
        shape[0] = q.shape[0] + k.shape[0] + v.shape[0];
        HostTensor::new(shape, data)
    }

    fn parts(&self) -> usize {
        QKV.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_inverts_fuse() {
        let (heads, kv, hd, cols) = (6, 2, 2, 3);
        let layout = InternLm2 {
            heads,
            kv_heads: kv,
        };
        let rows = (heads + 2 * kv) * hd;
        let wqkv = HostTensor::new(
            vec![rows, cols],
            (0..rows * cols).map(|v| v as f32).collect(),
        );
        let [q, k, v] = [0, 1, 2].map(|p| layout.cut(&wqkv, p));
        assert_eq!(q.shape, vec![heads * hd, cols]);
        assert_eq!(k.shape, vec![kv * hd, cols]);
        // Group 0 is rows 0..10: three query heads (0..6), its key (6..8), its value (8..10).
        assert_eq!(&k.data[..hd * cols], &wqkv.data[6 * cols..8 * cols]);
        assert_eq!(&v.data[hd * cols..], &wqkv.data[18 * cols..20 * cols]);
        assert_eq!(layout.fuse(&[q, k, v]).data, wqkv.data);
    }

    #[test]
    fn names_follow_internlm2() {
        let layout = InternLm2 {
            heads: 4,
            kv_heads: 2,
        };
        assert_eq!(
            layout.key("layers.1.attn.k_proj.bias").unwrap(),
            ("model.layers.1.attention.wqkv.bias".into(), Some(1))
        );
        assert_eq!(
            layout.key("layers.0.mlp.up_proj.weight").unwrap().0,
            "model.layers.0.feed_forward.w3.weight"
        );
        assert_eq!(
            layout.key("head.lm_head.weight").unwrap().0,
            "output.weight"
        );
    }
}
