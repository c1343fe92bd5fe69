//! Evaluation: token NLL / perplexity, classification by lowest candidate loss, and generation
//! scored by exact match, BLEU-4 and ROUGE-L.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use collie_core::lm::CausalLm;
use collie_core::loss::cross_entropy_sum_sharded;
use collie_data::chat::{render, BuiltinTemplate, ChatMessage, TemplateTokens};
use collie_data::dataset::{DataError, Example, IGNORE};
use collie_data::loader::{collate, Batch};
use collie_io::tokenizer::TokenizerBundle;
use serde_json::Value;

use crate::generate::{generate, GenerationConfig};
use crate::textmetrics::{corpus_bleu, exact_match, rouge_l};

/// A `[rows, cols]` integer tensor from row-major values.
pub(crate) fn int2<B: Backend>(
    v: &[i64],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
}

/// Summed NLL of a batch's target tokens (a `[1]` tensor, differentiable on an autodiff backend)
/// and their number. Position `t` predicts `labels[t + 1]`.
pub fn batch_nll<B: Backend, M: CausalLm<B>>(
    model: &M,
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 1>, usize) {
    let logits = shifted_logits(model, batch, device);
    (
        target_nll(model, logits, batch, device),
        batch.target_tokens(),
    )
}

/// [`batch_nll`]'s sum and the model's auxiliary loss of the same pass
/// ([`CausalLm::logits_packed_aux`]), unweighted.
pub fn batch_nll_aux<B: Backend, M: CausalLm<B>>(
    model: &M,
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    let (ids, segments, positions) = packed_inputs::<B>(batch, device);
    let (logits, aux) = model.logits_packed_aux(ids, &segments, positions);
    let logits = shift(logits, batch);
    (target_nll(model, logits, batch, device), aux)
}

/// Summed NLL of the shifted labels under `logits` (`[rows · (cols − 1), vocab]`; under tensor
/// parallelism this rank's vocabulary columns).
fn target_nll<B: Backend, M: CausalLm<B>>(
    model: &M,
    logits: Tensor<B, 2>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    let targets: Vec<i64> = batch.shifted_labels().collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
    cross_entropy_sum_sharded(logits, targets, model.vocab_shard()).0
}

/// The ids, segments and positions of a batch as `[rows, cols]` tensors.
fn packed_inputs<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let (r, c) = (batch.rows, batch.cols);
    (
        int2::<B>(&batch.input_ids, r, c, device),
        int2::<B>(&batch.segments, r, c, device),
        int2::<B>(&batch.positions, r, c, device),
    )
}

/// The logits of the positions that predict a label.
///
/// # Shapes
/// - logits: `[rows, cols, vocab]` → `[rows · (cols − 1), vocab]`
fn shift<B: Backend>(logits: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 2> {
    let (r, c) = (batch.rows, batch.cols);
    let vocab = logits.dims()[2];
    logits.slice([0..r, 0..c - 1]).reshape([r * (c - 1), vocab])
}

/// The logits of every position that predicts a label of [`Batch::shifted_labels`].
///
/// # Shapes
/// - returns `[rows · (cols − 1), vocab]`
pub fn shifted_logits<B: Backend, M: CausalLm<B>>(
    model: &M,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 2> {
    let (ids, segments, positions) = packed_inputs::<B>(batch, device);
    shift(model.logits_packed(ids, &segments, positions), batch)
}

/// Summed NLL of every token after the first in each sequence, and how many tokens that is.
/// Sequences shorter than two tokens contribute nothing.
pub fn sequence_nll<B: Backend, M: CausalLm<B>>(
    model: &M,
    sequences: &[Vec<u32>],
    device: &B::Device,
) -> (f64, usize) {
    let examples: Vec<Example> = sequences
        .iter()
        .filter(|s| s.len() >= 2)
        .map(|s| Example {
            input_ids: s.clone(),
            labels: s.iter().map(|&t| t as i64).collect(),
        })
        .collect();
    if examples.is_empty() {
        return (0.0, 0);
    }
    let (sum, count) = batch_nll(model, &collate(&examples), device);
    (sum.into_scalar().elem::<f64>(), count)
}

/// Corpus NLL over examples in batches of `batch_size`: `(sum, tokens)`.
pub fn corpus_nll<B: Backend, M: CausalLm<B>>(
    model: &M,
    examples: &[Example],
    batch_size: usize,
    device: &B::Device,
) -> (f64, usize) {
    let (mut sum, mut count) = (0.0, 0);
    for chunk in examples.chunks(batch_size.max(1)) {
        let batch = collate(chunk);
        if batch.cols < 2 {
            continue;
        }
        let (s, c) = batch_nll(model, &batch, device);
        sum += s.into_scalar().elem::<f64>();
        count += c;
    }
    (sum, count)
}

/// Reads a JSONL evaluation file, with `file:line` errors.
pub fn read_jsonl(path: &Path) -> Result<Vec<(u64, Value)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|cause| DataError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| DataError::Line {
            path: path.to_path_buf(),
            line: i as u64 + 1,
            message: format!("invalid JSON ({e})"),
        })?;
        out.push((i as u64 + 1, value));
    }
    Ok(out)
}

fn line_error(path: &Path, line: u64, message: &str) -> DataError {
    DataError::Line {
        path: path.to_path_buf(),
        line,
        message: message.to_string(),
    }
}

/// Accuracy of picking, for each `{"input", "candidates", "label"}`, the candidate with the
/// lowest summed NLL after the input (lm-evaluation-harness's `acc`). Candidate sequences are
/// scored `batch_size` at a time (every row's sum from one forward pass).
pub fn classification<B: Backend, M: CausalLm<B>>(
    model: &M,
    tokenizer: &TokenizerBundle,
    path: &Path,
    batch_size: usize,
    device: &B::Device,
) -> Result<f64, crate::error::TrainError> {
    let rows = read_jsonl(path)?;
    // Every candidate of every row, flattened; `answers[i]` holds row i's candidates' span of
    // `examples` and the right one's index.
    let (mut examples, mut answers) = (Vec::new(), Vec::new());
    for (line, v) in &rows {
        let input = v
            .get("input")
            .and_then(Value::as_str)
            .ok_or_else(|| line_error(path, *line, "expected a string \"input\""))?;
        let candidates: Vec<String> = serde_json::from_value(
            v.get("candidates").cloned().unwrap_or(Value::Null),
        )
        .map_err(|_| line_error(path, *line, "expected \"candidates\": a list of strings"))?;
        let label = v
            .get("label")
            .and_then(Value::as_u64)
            .filter(|&l| (l as usize) < candidates.len())
            .ok_or_else(|| {
                line_error(
                    path,
                    *line,
                    "expected \"label\": the index of the right candidate",
                )
            })?;
        let prefix = tokenizer.encode(input, true)?;
        answers.push((
            examples.len()..examples.len() + candidates.len(),
            label as usize,
        ));
        for c in &candidates {
            let cont = tokenizer.encode(c, false)?;
            examples.push(Example {
                labels: std::iter::repeat_n(IGNORE, prefix.len())
                    .chain(cont.iter().map(|&t| t as i64))
                    .collect(),
                input_ids: [prefix.clone(), cont].concat(),
            });
        }
    }
    let mut losses = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        losses.extend(row_nll(model, &collate(chunk), device));
    }
    let correct = answers
        .into_iter()
        .filter(|(span, label)| {
            let best = losses[span.clone()]
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            best == Some(*label)
        })
        .count();
    Ok(correct as f64 / rows.len().max(1) as f64)
}

/// Each row's summed NLL of its target tokens, from one forward pass over the batch.
fn row_nll<B: Backend, M: CausalLm<B>>(model: &M, batch: &Batch, device: &B::Device) -> Vec<f64> {
    let logits = shifted_logits(model, batch, device);
    let targets: Vec<i64> = batch.shifted_labels().collect();
    // Row i's positions are i·(cols − 1) .. (i + 1)·(cols − 1) of the shifted logits.
    let width = batch.cols - 1;
    (0..batch.rows)
        .map(|i| {
            let range = i * width..(i + 1) * width;
            let t = Tensor::<B, 1, Int>::from_data(
                TensorData::new(targets[range.clone()].to_vec(), [width]),
                device,
            );
            cross_entropy_sum_sharded(logits.clone().slice([range]), t, model.vocab_shard())
                .0
                .into_scalar()
                .elem::<f64>()
        })
        .collect()
}

/// Scores of generation evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationScores {
    /// Fraction of outputs equal to the reference (whitespace-trimmed).
    pub exact_match: f64,
    /// Corpus BLEU-4 on whitespace tokens, in [0, 1].
    pub bleu: f64,
    /// Mean ROUGE-L F1 on whitespace tokens.
    pub rouge_l: f64,
    /// What was generated for each example, in file order.
    pub predictions: Vec<Prediction>,
}

/// One example's generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// The prompt.
    pub input: String,
    /// The reference output.
    pub output: String,
    /// The generated text.
    pub generated: String,
    /// Its token ids.
    pub generated_ids: Vec<u32>,
}

/// Greedy generation for each `{"input", "output"}`, scored against `output`.
pub fn generation<B: Backend, M: CausalLm<B>>(
    model: &M,
    tokenizer: &TokenizerBundle,
    path: &Path,
    chat: bool,
    cfg: &GenerationConfig,
    device: &B::Device,
) -> Result<GenerationScores, crate::error::TrainError> {
    let rows = read_jsonl(path)?;
    let template = tokenizer
        .chat_template
        .clone()
        .unwrap_or_else(|| BuiltinTemplate::ChatMl.source().to_string());
    let tokens = TemplateTokens {
        bos_token: tokenizer.bos_token.clone(),
        eos_token: tokenizer.eos_token.clone(),
    };
    let (mut preds, mut refs, mut predictions) = (Vec::new(), Vec::new(), Vec::new());
    for (line, v) in &rows {
        let input = v
            .get("input")
            .and_then(Value::as_str)
            .ok_or_else(|| line_error(path, *line, "expected a string \"input\""))?;
        let output = v
            .get("output")
            .and_then(Value::as_str)
            .ok_or_else(|| line_error(path, *line, "expected a string \"output\""))?;
        let ids = if chat {
            let text = render(&template, &[ChatMessage::new("user", input)], true, &tokens)
                .map_err(|e| crate::error::TrainError::Invalid(e.to_string()))?;
            tokenizer.encode(&text, false)?
        } else {
            tokenizer.encode(input, true)?
        };
        let new = generate(model, &[ids], cfg, device, |_, _| {})?.remove(0);
        let text = tokenizer.decode(&new, true)?;
        predictions.push(Prediction {
            input: input.to_string(),
            output: output.to_string(),
            generated: text.clone(),
            generated_ids: new,
        });
        preds.push(text);
        refs.push(output.to_string());
    }
    let n = preds.len().max(1) as f64;
    Ok(GenerationScores {
        exact_match: preds
            .iter()
            .zip(&refs)
            .filter(|(p, r)| exact_match(p, r))
            .count() as f64
            / n,
        bleu: corpus_bleu(&preds, &refs),
        rouge_l: preds
            .iter()
            .zip(&refs)
            .map(|(p, r)| rouge_l(p, r))
            .sum::<f64>()
            / n,
        predictions,
    })
}
