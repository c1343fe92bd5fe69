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
