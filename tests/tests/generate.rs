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
