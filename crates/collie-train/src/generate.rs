//! Autoregressive generation over any [`CausalLm`].
//!
//! Prompts are left-padded into one batch, prefilled in a single forward pass, then decoded one
//! token per step through the model's KV cache. Greedy decoding takes the first maximum (as
//! `torch.argmax` does); sampling applies temperature, then top-k, then top-p, in the order of
//! HF's logits processors.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use collie_core::lm::CausalLm;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    /// Upper bound on new tokens per prompt.
    pub max_new_tokens: usize,
    /// Sampling temperature; `None` (or ≤ 0) means greedy.
    pub temperature: Option<f32>,
    /// Keep only the `k` most likely tokens when sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` when sampling.
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end a sequence (included in its output, as HF does).
    pub eos_ids: Vec<u32>,
    /// Token fed to finished rows and used for padding.
    pub pad_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 32,
            temperature: None,
            top_k: None,
            top_p: None,
            seed: 0,
            eos_ids: Vec::new(),
            pad_id: 0,
        }
    }
}

/// Generation errors.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A prompt with no tokens.
    #[error("prompt {0} is empty: nothing to condition on")]
    EmptyPrompt(usize),
    /// A bad sampling parameter.
    #[error("invalid sampling parameter: {0}")]
    InvalidParameter(String),
}

impl GenerationConfig {
    fn greedy(&self) -> bool {
        self.temperature.is_none_or(|t| t <= 0.0)
    }

    /// Checks the sampling parameters (`top_p` in (0, 1], `top_k` ≥ 1).
    pub fn validate(&self) -> Result<(), GenerateError> {
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(GenerateError::InvalidParameter(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(GenerateError::InvalidParameter(
                "top_k must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Index of the first maximum.
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from one row of logits.
pub fn pick(logits: &[f32], cfg: &GenerationConfig, rng: &mut StdRng) -> u32 {
    if cfg.greedy() {
        return argmax(logits) as u32;
    }
    let t = cfg.temperature.unwrap_or(1.0);
    let mut scores: Vec<f32> = logits.iter().map(|l| l / t).collect();
    if let Some(k) = cfg.top_k.filter(|k| *k < scores.len()) {
        // Keep everything at least as large as the k-th largest score (ties survive, as in HF).
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k - 1];
        scores
            .iter_mut()
            .filter(|s| **s < threshold)
            .for_each(|s| *s = f32::NEG_INFINITY);
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = cfg.top_p.filter(|p| *p < 1.0) {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut cum = 0.0;
        let mut keep = vec![false; probs.len()];
        for &i in &order {
            keep[i] = true;
            cum += probs[i];
            if cum >= top_p {
                break;
            }
        }
        let mut kept = 0.0;
        for (p, k) in probs.iter_mut().zip(&keep) {
            if !*k {
                *p = 0.0;
            }
            kept += *p;
        }
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    let mut u: f32 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    argmax(&probs) as u32
}

/// `[rows, cols]` ids or mask as an int tensor.
pub(crate) fn int_tensor<B: Backend>(
    values: Vec<i64>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Prompts left-padded to the longest (every row's last token in the last column): the ids, the
/// HF attention mask (`1` = token, `0` = padding), both `[rows, width]` row-major, and the width.
pub(crate) fn left_pad<'p>(
    prompts: impl ExactSizeIterator<Item = &'p [u32]> + Clone,
    pad_id: u32,
) -> (Vec<i64>, Vec<i64>, usize) {
    let width = prompts.clone().map(<[u32]>::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut mask = Vec::with_capacity(prompts.len() * width);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(pad_id as i64, pad).chain(p.iter().map(|&t| t as i64)));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
    }
    (ids, mask, width)
}

/// The `[rows, width]` mask with a new last column of ones: every row attends to its new token.
pub(crate) fn with_token_column(mask: &[i64], rows: usize) -> Vec<i64> {
    let width = mask.len() / rows;
    (0..rows)
        .flat_map(|r| mask[r * width..(r + 1) * width].iter().copied().chain([1]))
        .collect()
}

/// Generates a continuation of each prompt; returns the new tokens of each (EOS included when
/// reached). `on_token(row, id)` is called as each token is chosen, for streaming.
pub fn generate<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>, GenerateError> {
    cfg.validate()?;
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(GenerateError::EmptyPrompt(i));
    }
    let batch = prompts.len();
    let mut outputs = vec![Vec::new(); batch];
    if batch == 0 || cfg.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (ids, mut mask, width) = left_pad(prompts.iter().map(Vec::as_slice), cfg.pad_id);
    let padded = mask.contains(&0);
    let mut cache = model.new_cache();
    let mut input = int_tensor::<B>(ids, [batch, width], device);
    let mut done = vec![false; batch];
    for _ in 0..cfg.max_new_tokens {
        let padding =
            padded.then(|| int_tensor::<B>(mask.clone(), [batch, mask.len() / batch], device));
        let logits = model.logits_cached(input, padding.as_ref(), &mut cache);
        let [_, s, vocab] = logits.dims();
        // [batch, s, vocab] -> [batch, vocab] at the last position
        let last = logits.slice([0..batch, s - 1..s]).reshape([batch, vocab]);
        let host = collie_core::host::to_host(last);
        let mut next = Vec::with_capacity(batch);
        for row in 0..batch {
            if done[row] {
                next.push(cfg.pad_id);
                continue;
            }
            let token = pick(&host[row * vocab..(row + 1) * vocab], cfg, &mut rng);
            outputs[row].push(token);
            on_token(row, token);
            if cfg.eos_ids.contains(&token) {
                done[row] = true;
            }
            next.push(token);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        mask = with_token_column(&mask, batch);
        input = int_tensor::<B>(
            next.into_iter().map(i64::from).collect(),
            [batch, 1],
            device,
        );
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: Option<f32>, top_k: Option<usize>, top_p: Option<f32>) -> GenerationConfig {
        GenerationConfig {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            pick(&[0.1, 3.0, 3.0, -1.0], &cfg(None, None, None), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            assert_eq!(
                pick(
                    &[0.1, 2.0, 1.9, -1.0],
                    &cfg(Some(1.5), Some(1), None),
                    &mut rng
                ),
                1
            );
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // probabilities ≈ [0.64, 0.24, 0.09, 0.03]: p = 0.8 keeps the first two.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[pick(&logits, &cfg(Some(1.0), None, Some(0.8)), &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        let ratio = seen[0] as f64 / seen[1] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.4, "{seen:?}");
    }

    #[test]
    fn sampling_is_seeded() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| pick(&logits, &cfg(Some(1.0), None, None), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }
}
