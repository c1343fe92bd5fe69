//! Language-model feedback: the mean token NLL of a target after a prompt (UDR scores a candidate
//! demonstration `z` for an example `(x, y)` by the NLL of `y` after `"{z_x}\t{z_y}\n{x}\t"`),
//! batched, with an on-disk cache that makes scoring resumable and refuses scores made by another
//! model.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use collie_core::lm::CausalLm;
use collie_io::tokenizer::TokenizerBundle;
use serde_json::{json, Value};

use crate::RetrievalError;

/// Prompt tokens (with the tokenizer's special tokens) and target tokens, the prompt cut from
/// the left so that both fit in `max_len`.
pub fn tokenize_pair(
    tok: &TokenizerBundle,
    prompt: &str,
    target: &str,
    max_len: usize,
) -> Result<(Vec<u32>, Vec<u32>), RetrievalError> {
    let mut p = tok.encode(prompt, true)?;
    let mut t = tok.encode(target, false)?;
    t.truncate(max_len.saturating_sub(1).max(1));
    let room = max_len.saturating_sub(t.len()).max(1);
    if p.len() > room {
        p.drain(..p.len() - room);
    }
    Ok((p, t))
}

/// The mean NLL of each target given its prompt, `batch` pairs per forward pass. Pairs are
/// batched by length (less padding) and left-padded, so every target ends its row and the LM head
/// runs only on the last positions; results come back in the order of `pairs`.
pub fn mean_nll<B: Backend, M: CausalLm<B>>(
    model: &M,
    tok: &TokenizerBundle,
    pairs: &[(String, String)],
    batch: usize,
    max_len: usize,
    device: &B::Device,
) -> Result<Vec<f64>, RetrievalError> {
    let rows = pairs
        .iter()
        .map(|(p, t)| tokenize_pair(tok, p, t, max_len))
        .collect::<Result<Vec<_>, _>>()?;
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].0.len() + rows[i].1.len());
    let mut out = vec![0.0; rows.len()];
    for chunk in order.chunks(batch.max(1)) {
        let group: Vec<&(Vec<u32>, Vec<u32>)> = chunk.iter().map(|&i| &rows[i]).collect();
        for (&i, v) in chunk.iter().zip(nll_rows(model, &group, device)) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Mean NLL of each row's target tokens (left padding, one forward pass).
fn nll_rows<B: Backend, M: CausalLm<B>>(
    model: &M,
    rows: &[&(Vec<u32>, Vec<u32>)],
    device: &B::Device,
) -> Vec<f64> {
    let b = rows.len();
    let s = rows
        .iter()
        .map(|(p, t)| p.len() + t.len())
        .max()
        .unwrap_or(1);
    // Positions that predict a target token: the last `t` of each row, plus the one before.
    let tail = rows.iter().map(|(_, t)| t.len()).max().unwrap_or(1) + 1;
    let tail = tail.min(s);
    let (mut ids, mut mask) = (vec![0i64; b * s], vec![0i64; b * s]);
    let (mut next, mut weight) = (vec![0i64; b * tail], vec![0f32; b * tail]);
    let mut counts = Vec::with_capacity(b);
    for (r, (p, t)) in rows.iter().enumerate() {
        let seq: Vec<u32> = p.iter().chain(t.iter()).copied().collect();
        let pad = s - seq.len();
        for (c, &id) in seq.iter().enumerate() {
            ids[r * s + pad + c] = id as i64;
            mask[r * s + pad + c] = 1;
        }
        // Row position c (of the tail window starting at s − tail) predicts token c + 1; the
        // target tokens are seq[p.len()..] (an empty prompt leaves the first one unpredicted).
        let first = pad + p.len().max(1);
        let mut n = 0;
        for c in first..s {
            let w = c - 1 - (s - tail);
            next[r * tail + w] = seq[c - pad] as i64;
            weight[r * tail + w] = 1.0;
            n += 1;
        }
        counts.push(n);
    }
    let int = |v: Vec<i64>, cols: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, cols]), device)
    };
    let logits = model.logits_tail(int(ids, s), Some(&int(mask, s)), tail);
    // [b, tail, vocab] -> log-probability of each next token: [b, tail]
    let logp = log_softmax(logits, 2)
        .gather(2, int(next, tail).reshape([b, tail, 1]))
        .reshape([b, tail]);
    let w = Tensor::<B, 2>::from_data(TensorData::new(weight, [b, tail]), device);
    let sums: Vec<f32> = (logp * w)
        .sum_dim(1)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");
    sums.iter()
        .zip(counts)
        .map(|(sum, n)| -(*sum as f64) / n.max(1) as f64)
        .collect()
}

/// A short, stable fingerprint of `parts` (FNV-1a, 64 bits, hex).
pub fn fingerprint(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Scores already computed, keyed by `(query id, candidate id)`, backed by a JSONL file whose
/// first line names the scoring model's fingerprint. New scores are appended as they come, so
/// an interrupted run keeps them.
#[derive(Debug)]
pub struct ScoreCache {
    path: PathBuf,
    scores: HashMap<(usize, usize), f64>,
}

impl ScoreCache {
    /// Opens (or starts) the cache at `path` for the model `fingerprint`; a cache written by
    /// another model is an error.
    pub fn open(path: &Path, fingerprint: &str) -> Result<Self, RetrievalError> {
        let mut scores = HashMap::new();
        if path.is_file() {
            let file = std::fs::File::open(path).map_err(|e| RetrievalError::io(path, e))?;
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| RetrievalError::io(path, e))?;
                if line.trim().is_empty() {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    // A line cut by an interrupted write: the pair is scored again.
                    continue;
                };
                if n == 0 {
                    let theirs = v["fingerprint"].as_str().unwrap_or("none");
                    if theirs != fingerprint {
                        return Err(RetrievalError::Config(format!(
                            "{}: these scores come from another model (fingerprint {theirs}, this \
                             run's LM is {fingerprint}); delete the file or score into another \
                             directory",
                            path.display()
                        )));
                    }
                    continue;
                }
                if let (Some(q), Some(c), Some(s)) =
                    (v["q"].as_u64(), v["c"].as_u64(), v["nll"].as_f64())
                {
                    scores.insert((q as usize, c as usize), s);
                }
            }
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| RetrievalError::io(dir, e))?;
            }
            std::fs::write(path, format!("{}\n", json!({ "fingerprint": fingerprint })))
                .map_err(|e| RetrievalError::io(path, e))?;
        }
        Ok(ScoreCache {
            path: path.to_path_buf(),
            scores,
        })
    }

    /// The score of `(query, candidate)`, if computed.
    pub fn get(&self, query: usize, candidate: usize) -> Option<f64> {
        self.scores.get(&(query, candidate)).copied()
    }

    /// Number of scores held.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether nothing is scored yet.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// Records new scores (appended to the file at once).
    pub fn extend(&mut self, new: &[((usize, usize), f64)]) -> Result<(), RetrievalError> {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| RetrievalError::io(&self.path, e))?;
        let mut text = String::new();
        for &((q, c), s) in new {
            text.push_str(&format!("{}\n", json!({"q": q, "c": c, "nll": s})));
            self.scores.insert((q, c), s);
        }
        file.write_all(text.as_bytes())
            .map_err(|e| RetrievalError::io(&self.path, e))
    }
}
