//! Evaluators and checkpoint callbacks: classification picks the lowest-loss candidate,
//! generation scores exact match / BLEU / ROUGE-L, `keep_last` / `keep_best` prune checkpoints,
//! early stopping ends a run whose eval metric stops improving.

mod common;

use std::path::Path;

use burn::tensor::ElementConversion;
use collie_data::dataset::{Example, IGNORE};
use collie_data::loader::collate;
use collie_train::checkpoint;
use collie_train::eval::{batch_nll, classification, generation};
use collie_train::generate::{generate, GenerationConfig};
use collie_train::{RunOptions, TrainConfig, Trainer};
use common::*;
use serde_json::json;

type A = burn::backend::Autodiff<B>;

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn classification_picks_the_lowest_loss_candidate() {
    let device = Default::default();
    let loaded =
        collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("2 + 2 =", ["4", "5", "four"]),
        ("The capital of Italy is", ["Rome.", "Paris.", "a city"]),
    ];
    // The candidate each case should pick, scored independently here.
    let mut expected = Vec::new();
    let mut lines = Vec::new();
    for (i, (input, candidates)) in cases.iter().enumerate() {
        let prefix = tok.encode(input, true).unwrap();
        let losses: Vec<f64> = candidates
            .iter()
            .map(|c| {
                let cont = tok.encode(c, false).unwrap();
                let ex = Example {
                    labels: std::iter::repeat_n(IGNORE, prefix.len())
                        .chain(cont.iter().map(|&t| t as i64))
                        .collect(),
                    input_ids: [prefix.clone(), cont].concat(),
                };
                batch_nll(&loaded.model, &collate(&[ex]), &device)
                    .0
                    .into_scalar()
                    .elem::<f64>()
            })
            .collect();
        let best = (0..3)
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .unwrap();
        // Label the best candidate for case 0 and a worse one for case 1: accuracy 0.5.
        let label = if i == 0 { best } else { (best + 1) % 3 };
        expected.push(label == best);
        lines.push(json!({"input": input, "candidates": candidates, "label": label}));
    }
    let path = tmp.path().join("cls.jsonl");
    write_lines(&path, &lines);
    // One candidate per pass, chunks across the cases' boundary, and all six (padded) in one.
    for batch_size in [1, 4, 6] {
        let acc = classification(&loaded.model, tok, &path, batch_size, &device).unwrap();
        assert_eq!(acc, 0.5, "batch size {batch_size}");
    }
}

#[test]
fn generation_scores_its_own_output_perfectly() {
    let device = Default::default();
    let loaded =
        collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        eos_ids: vec![2],
        ..Default::default()
    };
    let own = |input: &str| {
        let ids = tok.encode(input, true).unwrap();
        let new = generate(&loaded.model, &[ids], &cfg, &device, |_, _| {})
            .unwrap()
            .remove(0);
        tok.decode(&new, true).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gen.jsonl");
    write_lines(
        &path,
        &[
            json!({"input": "2 + 2 =", "output": own("2 + 2 =")}),
            json!({"input": "Largest planet:", "output": own("Largest planet:")}),
        ],
    );
    let s = generation(&loaded.model, tok, &path, false, &cfg, &device).unwrap();
    assert_eq!((s.exact_match, s.rouge_l), (1.0, 1.0));
    write_lines(
        &path,
        &[json!({"input": "2 + 2 =", "output": "nothing like it"})],
    );
    let s = generation(&loaded.model, tok, &path, false, &cfg, &device).unwrap();
    assert_eq!(s.exact_match, 0.0);
}

fn config(out: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        r#"
[model]
path = "{}"
[data]
train = "{}"
eval = "{}"
format = "input_output"
seq_len = 48
[train]
max_steps = 8
micro_batch_size = 3
{extra}
[optim]
lr = 2e-3
[output]
dir = "{}"
"#,
        fixture("train/model").display(),
        fixture("train/io.jsonl").display(),
        fixture("train/io.jsonl").display(),
        out.display()
    );
    TrainConfig::parse(&text, "test", &[]).unwrap()
}

fn run(config: TrainConfig) -> collie_train::Summary {
    let options = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let mut trainer =
        Trainer::<A, collie_llama::Llama<A>>::new(config, &options, &Default::default()).unwrap();
    trainer.run(&options).unwrap()
}

#[test]
fn keep_last_and_keep_best_prune_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Evaluate and save every 2 steps; a rising learning rate would not matter: whatever the
    // metric does, the best step must survive pruning along with the last two.
    let summary = run(config(
        &out,
        "eval_every = 2\nsave_every = 2\nkeep_last = 2\nkeep_best = 1",
    ));
    let kept = checkpoint::list(&out);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/step-8/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let evals = state["evals"].as_array().unwrap();
    let best = evals
        .iter()
        .filter(|e| e[0].as_u64().unwrap() % 2 == 0 && e[0].as_u64().unwrap() > 0)
        .min_by(|a, b| {
            a[1]["eval_loss"]
                .as_f64()
                .unwrap()
                .total_cmp(&b[1]["eval_loss"].as_f64().unwrap())
        })
        .map(|e| e[0].as_u64().unwrap())
        .unwrap();
    let mut expected = vec![6, 8, best];
    expected.sort();
    expected.dedup();
    assert_eq!(kept, expected, "summary: {summary:?}");
}

#[test]
fn early_stopping_ends_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    // A huge learning rate makes the eval loss climb after the first evaluation.
    let mut c = config(
        &tmp.path().join("run"),
        "eval_every = 1\nearly_stopping_patience = 2\nmax_grad_norm = 0.0",
    );
    c.optim.lr = 0.5;
    c.train.max_steps = 20;
    let summary = run(c);
    assert!(summary.stopped_early, "{summary:?}");
    assert!(summary.steps < 20);
}
