//! In-context learning with retrieved demonstrations, as UDR evaluates: the demonstrations most
//! similar last (right before the test input), `"{x_1}\t{y_1}\n…\n{x_k}\t{y_k}\n{x}\t"`;
//! classification picks the label whose verbalization has the lowest mean token NLL (the prompt's
//! KV cache is computed once and shared by every label), generation decodes greedily until a
//! newline. Scores: accuracy, ROUGE-L, with 95 % bootstrap intervals.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use collie_core::lm::CausalLm;
use collie_io::tokenizer::TokenizerBundle;
use rand::{Rng, SeedableRng};

use crate::tasks::{Example, Task};
use crate::RetrievalError;

/// The ICL prompt for `test` after `demos` (given most similar first; written most similar
/// last), with as many of the most similar demonstrations as fit in `max_tokens` prompt tokens.
pub fn build_prompt(
    task: &Task,
    demos: &[&Example],
    test: &Example,
    tok: &TokenizerBundle,
    max_tokens: usize,
) -> Result<String, RetrievalError> {
    let tail = format!("{}\t", test.input);
    let mut blocks: Vec<String> = demos.iter().map(|d| task.prompt_block(d)).collect();
    loop {
        let text: String = blocks
            .iter()
            .rev()
            .map(|b| format!("{b}\n"))
            .chain(std::iter::once(tail.clone()))
            .collect();
        if blocks.is_empty() || tok.encode(&text, true)?.len() <= max_tokens {
            return Ok(text);
        }
        // Drop the least similar demonstration.
        blocks.pop();
    }
}

/// Next-token log-probabilities of `ids` (positions `0..n`) run after `cache`.
///
/// # Shapes
/// - returns `[n, vocab]`
fn step<B: Backend, M: CausalLm<B>>(
    model: &M,
    ids: &[u32],
    cache: &mut M::Cache,
    device: &B::Device,
) -> Tensor<B, 2> {
    let n = ids.len();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]),
        device,
    );
    let logits = model.logits_cached(input, None, cache);
    let vocab = logits.dims()[2];
    log_softmax(logits.reshape([n, vocab]), 1)
}

/// The mean NLL of each choice after `prompt`, and the index of the lowest. The prompt runs
/// once; every choice continues from a copy of its KV cache.
pub fn classify<B: Backend, M: CausalLm<B>>(
    model: &M,
    tok: &TokenizerBundle,
    prompt: &str,
    choices: &[String],
    device: &B::Device,
) -> Result<(usize, Vec<f64>), RetrievalError>
where
    M::Cache: Clone,
{
    let p = tok.encode(prompt, true)?;
    let mut cache = model.new_cache();
    let first = step(model, &p, &mut cache, device);
    let [n, vocab] = first.dims();
    // [vocab]: the distribution of the first choice token.
    let last = collie_core::host::to_host(first.slice([n - 1..n, 0..vocab]));
    let mut losses = Vec::with_capacity(choices.len());
    for choice in choices {
        let c = tok.encode(choice, false)?;
        if c.is_empty() {
            return Err(RetrievalError::Data(format!(
                "the choice {choice:?} encodes to no tokens"
            )));
        }
        let mut nll = -(last[c[0] as usize] as f64);
        if c.len() > 1 {
            let mut cont = cache.clone();
            let lp = collie_core::host::to_host(step(model, &c[..c.len() - 1], &mut cont, device));
            for (i, &t) in c[1..].iter().enumerate() {
                nll -= lp[i * vocab + t as usize] as f64;
            }
        }
        losses.push(nll / c.len() as f64);
    }
    let best = losses
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    Ok((best, losses))
}

/// Greedy continuation of `prompt` up to the first newline (excluded), an EOS token, or
/// `max_new` tokens.
pub fn generate_line<B: Backend, M: CausalLm<B>>(
    model: &M,
    tok: &TokenizerBundle,
    prompt: &str,
    max_new: usize,
    eos: &[u32],
    device: &B::Device,
) -> Result<String, RetrievalError> {
    let p = tok.encode(prompt, true)?;
    let mut cache = model.new_cache();
    let mut lp = step(model, &p, &mut cache, device);
    let mut new = Vec::new();
    for _ in 0..max_new {
        let [n, vocab] = lp.dims();
        let row = collie_core::host::to_host(lp.slice([n - 1..n, 0..vocab]));
        // The first maximum, as torch.argmax.
        let next = row
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32;
        if eos.contains(&next) {
            break;
        }
        new.push(next);
        let text = tok.decode(&new, true)?;
        if let Some(cut) = text.find('\n') {
            return Ok(py_strip(&text[..cut]).to_string());
        }
        lp = step(model, &[next], &mut cache, device);
    }
    Ok(py_strip(&tok.decode(&new, true)?).to_string())
}

/// Python's `str.strip()`: Unicode white space and also the information separators
/// U+001C–U+001F, which Python counts as white space and Rust's `trim` does not.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The average over tasks of each task's mean score (`b`: minus the mean of a second method
/// scored on the same examples), with its 95 % percentile-bootstrap interval: every draw
/// resamples each task's examples independently — the same indices for `a` and `b`, so a paired
/// difference keeps the pairing — and the tasks stay fixed.
pub fn bootstrap_task_average(
    a: &[Vec<f64>],
    b: Option<&[Vec<f64>]>,
    resamples: usize,
    seed: u64,
) -> (f64, f64, f64) {
    let tasks = a.len();
    if tasks == 0 || a.iter().any(|t| t.is_empty()) {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    if let Some(b) = b {
        assert_eq!(b.len(), tasks, "the same tasks for both methods");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.len(), y.len(), "the same examples for both methods");
        }
    }
    let value = |t: usize, i: usize| a[t][i] - b.map_or(0.0, |b| b[t][i]);
    let point = (0..tasks)
        .map(|t| (0..a[t].len()).map(|i| value(t, i)).sum::<f64>() / a[t].len() as f64)
        .sum::<f64>()
        / tasks as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut draws: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            (0..tasks)
                .map(|t| {
                    let n = a[t].len();
                    (0..n)
                        .map(|_| value(t, rng.random_range(0..n)))
                        .sum::<f64>()
                        / n as f64
                })
                .sum::<f64>()
                / tasks as f64
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * (draws.len() - 1) as f64).round() as usize).min(draws.len() - 1)];
    (point, at(0.025), at(0.975))
}

/// The mean of `scores` and its 95 % percentile-bootstrap interval (`resamples` draws, seeded).
pub fn bootstrap_ci(scores: &[f64], resamples: usize, seed: u64) -> (f64, f64, f64) {
    let n = scores.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = scores.iter().sum::<f64>() / n as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| scores[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (mean, at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_average_and_paired_difference() {
        let a = vec![vec![1.0, 0.0, 1.0, 1.0], vec![0.5; 3]];
        let (m, lo, hi) = bootstrap_task_average(&a, None, 2000, 3);
        // (0.75 + 0.5) / 2; the constant task adds no spread.
        assert!((m - 0.625).abs() < 1e-12);
        assert!(lo <= m && m <= hi && lo >= 0.25 && hi <= 0.75, "{lo} {hi}");
        // A method against itself: exactly zero, every draw.
        assert_eq!(
            bootstrap_task_average(&a, Some(&a), 500, 3),
            (0.0, 0.0, 0.0)
        );
        // Paired: b is a shifted by a constant on every example → the difference is that constant.
        let b: Vec<Vec<f64>> = a
            .iter()
            .map(|t| t.iter().map(|v| v - 0.25).collect())
            .collect();
        let (d, dlo, dhi) = bootstrap_task_average(&a, Some(&b), 500, 3);
        assert!(
            (d - 0.25).abs() < 1e-12 && (dlo - 0.25).abs() < 1e-12 && (dhi - 0.25).abs() < 1e-12
        );
        // One task: the same point as bootstrap_ci.
        let (one, _, _) = bootstrap_task_average(&a[..1], None, 100, 0);
        assert!((one - bootstrap_ci(&a[0], 100, 0).0).abs() < 1e-12);
    }
}
