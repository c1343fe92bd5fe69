//! Generation: batched (left-padded) greedy decoding gives each prompt the tokens it gets alone,
//! and those tokens are the argmax of a cache-free forward over the growing sequence.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use collie_train::generate::{generate, GenerationConfig};
use common::*;

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn batched_greedy_equals_one_prompt_at_a_time_and_the_full_forward() {
    let device = Default::default();
    for case in ["gqa_tied_theta", "mistral_window", "qwen2_bias"] {
        let model =
            collie_llama::load::<B>(fixture(&format!("llama/{case}")).to_str().unwrap(), &device)
                .unwrap()
                .model;
        let prompts: Vec<Vec<u32>> = vec![
            vec![5, 17, 33, 2, 9, 41, 8],
            vec![12, 3],
            vec![70, 71, 72, 73],
        ];
        let cfg = GenerationConfig {
            max_new_tokens: 9,
            ..Default::default()
        };
        let batched = generate(&model, &prompts, &cfg, &device, |_, _| {}).unwrap();
        assert_eq!(
            batched.len(),
            prompts.len(),
            "{case}: one answer per prompt"
        );
        for (prompt, got) in prompts.iter().zip(&batched) {
            let alone = generate(
                &model,
                std::slice::from_ref(prompt),
                &cfg,
                &device,
                |_, _| {},
            )
            .unwrap();
            assert_eq!(&alone[0], got, "{case}: batch vs alone for {prompt:?}");
            // Recompute every step without a cache.
            let mut seq = prompt.clone();
            for &expected in got {
                let n = seq.len();
                let ids = Tensor::<B, 2, Int>::from_data(
                    TensorData::new(seq.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]),
                    &device,
                );
                let logits = values(model.forward(ids, None));
                let vocab = logits.len() / n;
                assert_eq!(
                    argmax(&logits[(n - 1) * vocab..]),
                    expected,
                    "{case}: step {n}"
                );
                seq.push(expected);
            }
        }
    }
}

#[test]
fn generation_stops_at_eos_and_includes_it() {
    let device = Default::default();
    let model = collie_llama::load::<B>(fixture("llama/mha_untied").to_str().unwrap(), &device)
        .unwrap()
        .model;
    let prompt = vec![vec![5u32, 6, 7]];
    let free = generate(
        &model,
        &prompt,
        &GenerationConfig {
            max_new_tokens: 6,
            ..Default::default()
        },
        &device,
        |_, _| {},
    )
    .unwrap();
    let eos = free[0][2];
    let stop = GenerationConfig {
        max_new_tokens: 6,
        eos_ids: vec![eos],
        ..Default::default()
    };
    let stopped = generate(&model, &prompt, &stop, &device, |_, _| {}).unwrap();
    let first = free[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(stopped[0], free[0][..=first].to_vec());
}

#[test]
fn streamed_blocks_give_each_family_its_own_logits_and_generations() {
    // `Streamed` (evaluation and generation of a model spread over ranks: ZeRO-3, pipeline
    // stages) composes the block contract itself — embedding, layers under one context with
    // their KV caches, head — instead of calling the family's forward. In one process (every
    // block owned here) it must give each family's own logits and greedy tokens.
    use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
    use collie_core::dist::Solo;
    use collie_core::lm::CausalLm;
    use collie_dist::zero::ZeroPlan;
    use collie_train::streamed::Streamed;
    type A = burn::backend::Autodiff<B>;
    struct Ids(std::collections::HashMap<burn::module::ParamId, usize>);
    impl ModuleVisitor<A> for Ids {
        fn visit_float<const D: usize>(&mut self, p: &Param<burn::tensor::Tensor<A, D>>) {
            self.0.insert(p.id, 0);
        }
    }
    let device = Default::default();
    let cases = [
        "llama/gqa_tied_theta",
        "llama/mistral_window",
        "families/gemma3/model",
        "families/glm/model",
        "families/mixtral/model",
    ];
    for case in cases {
        let model = collie_llama::load::<A>(fixture(case).to_str().unwrap(), &device)
            .unwrap()
            .model;
        let mut ids = Ids(Default::default());
        model.visit(&mut ids);
        let plan = ZeroPlan::with_owners(&model, &Solo, &ids.0, Default::default());
        let plain = model.valid();
        let from = collie_train::blockwise::Gather {
            plan: &plan,
            group: &Solo,
        };
        let streamed = Streamed::new(model.valid(), from, device);
        let tokens: Vec<i64> = vec![5, 17, 33, 2, 9, 41, 8, 12, 3, 70];
        let n = tokens.len();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [1, n]), &device);
        let want = plain.logits(input.clone(), None).into_data();
        let got = streamed.logits(input, None).into_data();
        let (want, got) = (
            want.as_slice::<f32>().unwrap().to_vec(),
            got.as_slice::<f32>().unwrap().to_vec(),
        );
        // The same operations in the same order: bit for bit.
        assert_eq!(got, want, "{case}: streamed logits");
        let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 33, 2, 9, 41, 8], vec![12, 3]];
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            ..Default::default()
        };
        let want = generate(&plain, &prompts, &cfg, &device, |_, _| {}).unwrap();
        let got = generate(&streamed, &prompts, &cfg, &device, |_, _| {}).unwrap();
        assert_eq!(
            got, want,
            "{case}: greedy tokens through the streamed blocks"
        );
    }
}

fn load_llama(case: &str) -> collie_llama::Llama<B> {
    collie_llama::load::<B>(fixture(case).to_str().unwrap(), &Default::default())
        .unwrap()
        .model
}

/// What a sequence of the continuous batch sent: its tokens and how it finished.
type Received = std::sync::Arc<std::sync::Mutex<(Vec<u32>, Option<collie_train::batcher::Finish>)>>;

/// A request whose sink records into the returned cell, and stops reading after `read_limit`
/// tokens (a client that goes away).
fn request(
    prompt: &[u32],
    config: &GenerationConfig,
    read_limit: Option<usize>,
) -> (collie_train::batcher::Request, Received) {
    use collie_train::batcher::{Event, Request};
    let got: Received = Default::default();
    let cell = got.clone();
    let sink = Box::new(move |e: Event| {
        let mut g = cell.lock().unwrap();
        match e {
            Event::Token(t) => g.0.push(t),
            Event::Finished(f) => g.1 = Some(f),
        }
        read_limit.is_none_or(|n| g.0.len() < n)
    });
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let req = Request {
        id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        prompt: prompt.to_vec(),
        config: config.clone(),
        sink,
    };
    (req, got)
}

#[test]
fn continuous_batching_gives_each_sequence_its_tokens_alone() {
    // Sequences join a running batch at different steps (their caches left-padded to the
    // batch's, or the batch's to theirs), leave it at EOS, at their limit or when their reader
    // goes, and each still gets the tokens `generate` gives it alone: greedy, and sampled with
    // its own seed. Prefix tuning checks padding goes behind the cached virtual tokens.
    use collie_train::batcher::{Batcher, Finish};
    let device = Default::default();
    let peft = |name: &str| {
        let base = collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device)
            .unwrap()
            .model;
        collie_peft::adapter_io::load(base, &fixture(&format!("peft/{name}")), &device)
            .unwrap()
            .0
    };
    let models = [
        ("gqa_tied_theta", load_llama("llama/gqa_tied_theta")),
        ("mistral_window", load_llama("llama/mistral_window")),
        ("prefix", peft("prefix")),
        ("prompt", peft("prompt")),
    ];
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 33, 2, 9, 41, 8],
        vec![12, 3],
        vec![70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80],
        vec![40, 41, 42],
        vec![9],
    ];
    for (case, model) in &models {
        let greedy = GenerationConfig {
            max_new_tokens: 7,
            ..Default::default()
        };
        let sampled = |seed| GenerationConfig {
            temperature: Some(1.3),
            seed,
            max_new_tokens: 6,
            ..Default::default()
        };
        let configs = [
            greedy.clone(),
            sampled(3),
            GenerationConfig {
                max_new_tokens: 12,
                ..greedy.clone()
            },
            sampled(8),
            greedy.clone(),
        ];
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&configs)
            .map(|(p, c)| generate(model, std::slice::from_ref(p), c, &device, |_, _| {}))
            .map(|r| r.unwrap().remove(0))
            .collect();
        let mut batch = Batcher::new(model, device, 0);
        let mut got = Vec::new();
        let admit = |batch: &mut Batcher<_, _>, which: &[usize], limit: Option<usize>| {
            let (reqs, cells): (Vec<_>, Vec<_>) = which
                .iter()
                .map(|&i| request(&prompts[i], &configs[i], limit))
                .unzip();
            batch.admit(reqs);
            cells
        };
        // 0 alone, 1 and 2 join after two steps (2 is longer than the batch), 3 after four more
        // (shorter), 4 reads three tokens and goes.
        got.extend(admit(&mut batch, &[0], None));
        batch.step();
        batch.step();
        got.extend(admit(&mut batch, &[1, 2], None));
        assert_eq!(batch.len(), 3, "{case}");
        for _ in 0..4 {
            batch.step();
        }
        got.extend(admit(&mut batch, &[3], None));
        let gone = admit(&mut batch, &[4], Some(3)).remove(0);
        while !batch.is_empty() {
            batch.step();
        }
        for (i, cell) in got.iter().enumerate() {
            let (tokens, finish) = cell.lock().unwrap().clone();
            assert_eq!(tokens, alone[i], "{case}: sequence {i}");
            assert_eq!(finish, Some(Finish::Length), "{case}: sequence {i}");
        }
        let (tokens, finish) = gone.lock().unwrap().clone();
        assert_eq!(tokens, alone[4][..3], "{case}: the reader that left");
        assert_eq!(
            finish, None,
            "{case}: nothing is sent after the reader left"
        );
    }
}

#[test]
fn continuous_batching_stops_at_eos_and_refuses_bad_settings() {
    use collie_train::batcher::{Batcher, Finish};
    let device = Default::default();
    let model = load_llama("llama/mha_untied");
    let free = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let tokens = generate(&model, &[vec![5, 6, 7]], &free, &device, |_, _| {}).unwrap();
    let eos = tokens[0][2];
    let first = tokens[0].iter().position(|&t| t == eos).unwrap();
    let stop = GenerationConfig {
        eos_ids: vec![eos],
        ..free.clone()
    };
    let mut batch = Batcher::new(&model, device, 0);
    let (req, got) = request(&[5, 6, 7], &stop, None);
    let (bad, refused) = request(
        &[5],
        &GenerationConfig {
            top_p: Some(1.5),
            ..free.clone()
        },
        None,
    );
    let (empty, nothing) = request(&[], &free, None);
    batch.admit(vec![req, bad, empty]);
    while !batch.is_empty() {
        batch.step();
    }
    let (t, f) = got.lock().unwrap().clone();
    assert_eq!(t, tokens[0][..=first]);
    assert_eq!(f, Some(Finish::Eos));
    for cell in [refused, nothing] {
        let (t, f) = cell.lock().unwrap().clone();
        assert!(t.is_empty());
        assert!(matches!(f, Some(Finish::Invalid(_))), "{f:?}");
    }
}

#[test]
fn a_cancelled_sequence_leaves_and_the_others_keep_their_tokens() {
    use collie_train::batcher::Batcher;
    let device = Default::default();
    let model = load_llama("llama/gqa_tied_theta");
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let prompts = [vec![5u32, 17, 33, 2], vec![12, 3, 40, 41, 42, 43]];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate(&model, std::slice::from_ref(p), &cfg, &device, |_, _| {}))
        .map(|r| r.unwrap().remove(0))
        .collect();
    let mut batch = Batcher::new(&model, device, 0);
    let (a, got_a) = request(&prompts[0], &cfg, None);
    let (b, got_b) = request(&prompts[1], &cfg, None);
    let (id_a, id_b) = (a.id, b.id);
    batch.admit(vec![a, b]);
    batch.step();
    batch.step();
    assert_eq!(batch.ids(), [id_a, id_b]);
    // The longer prompt's row leaves: the shorter one's padding columns go with it.
    batch.cancel(&[id_b, 999]);
    assert_eq!(batch.ids(), [id_a]);
    assert_eq!(batch.width(), prompts[0].len() + 2);
    while !batch.is_empty() {
        batch.step();
    }
    assert_eq!(got_a.lock().unwrap().0, alone[0]);
    let (tokens, finish) = got_b.lock().unwrap().clone();
    assert_eq!(tokens, alone[1][..3], "three tokens before the cancel");
    assert_eq!(finish, None);
}
