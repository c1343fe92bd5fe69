//! The data formats' labels, token by token: `chat` (only the assistant turns' content and their
//! end token carry labels, rendered with the model's own template) and `tokens` (ids and labels
//! as given; the same training as the text they encode).

mod common;

use collie_data::dataset::{DataFormat, Encoder, JsonlDataset, IGNORE};
use collie_io::tokenizer::TokenizerBundle;
use collie_train::TrainConfig;
use common::*;
use serde_json::{json, Value};

fn tokenizer() -> TokenizerBundle {
    collie_llama::load::<B>(
        fixture("train/model").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap()
    .tokenizer
    .expect("the fixture model has a tokenizer")
}

/// Runs of consecutive labelled tokens, each decoded with its special tokens.
fn labelled_runs(tok: &TokenizerBundle, ids: &[u32], labels: &[i64]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for (&id, &label) in ids.iter().zip(labels) {
        if label == IGNORE {
            if !current.is_empty() {
                runs.push(tok.decode(&current, false).unwrap());
                current.clear();
            }
        } else {
            current.push(id);
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current, false).unwrap());
    }
    runs
}

#[test]
fn chat_labels_only_the_assistant_turns_and_their_end_token() {
    let tok = tokenizer();
    let template = tok.chat_template.clone().expect("chat template");
    assert!(template.contains("<|im_start|>"), "ChatML-style template");
    let encoder = Encoder::new(DataFormat::Chat, Some(tok.clone()), 4096);
    let answers = [
        "Paris is the capital.",
        "About 2.1 million people live there.",
    ];
    let line = json!({"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "How many people live there?"},
        {"role": "assistant", "content": answers[1]},
    ]});
    let ex = encoder.encode(&line).unwrap();
    assert_eq!(ex.input_ids.len(), ex.labels.len());

    // The ids are the rendered conversation's, as the template writes it.
    let rendered = "<|im_start|>system\nYou answer briefly.<|im_end|>\n\
                    <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
                    <|im_start|>assistant\nParis is the capital.<|im_end|>\n\
                    <|im_start|>user\nHow many people live there?<|im_end|>\n\
                    <|im_start|>assistant\nAbout 2.1 million people live there.<|im_end|>\n";
    assert_eq!(ex.input_ids, tok.encode(rendered, false).unwrap());

    // Token by token: a labelled token's label is its own id, and the labelled tokens are
    // exactly each answer followed by `<|im_end|>` (not the header, not the newline after it).
    for (t, (&id, &label)) in ex.input_ids.iter().zip(&ex.labels).enumerate() {
        assert!(
            label == IGNORE || label == id as i64,
            "position {t}: label {label} for token {id}"
        );
    }
    let runs = labelled_runs(&tok, &ex.input_ids, &ex.labels);
    let want: Vec<String> = answers.iter().map(|a| format!("{a}<|im_end|>")).collect();
    assert_eq!(runs, want);
    let end = tok.token_id("<|im_end|>").unwrap();
    let labelled: usize = ex.labels.iter().filter(|&&l| l != IGNORE).count();
    let expected: usize = answers
        .iter()
        .map(|a| tok.encode(a, false).unwrap().len() + 1)
        .sum();
    assert_eq!(labelled, expected, "answer tokens + one end token per turn");
    // Each labelled run ends on the end token, and the token after it (the newline) has none.
    for t in 0..ex.labels.len() {
        if ex.labels[t] != IGNORE && (t + 1 == ex.labels.len() || ex.labels[t + 1] == IGNORE) {
            assert_eq!(ex.input_ids[t], end, "a labelled run ends at position {t}");
        }
    }
    // The system prompt and the user turns never carry a label, whatever their text.
    let unlabelled: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l == IGNORE)
        .map(|(&id, _)| id)
        .collect();
    let text = tok.decode(&unlabelled, false).unwrap();
    for part in [
        "You answer briefly.",
        "What is the capital of France?",
        "How many people live there?",
    ] {
        assert!(
            text.contains(part),
            "{part:?} should be unlabelled: {text:?}"
        );
    }
}

#[test]
fn chat_without_a_system_prompt_gets_the_templates_default_unlabelled() {
    let tok = tokenizer();
    let encoder = Encoder::new(DataFormat::Chat, Some(tok.clone()), 4096);
    let ex = encoder
        .encode(&json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]}))
        .unwrap();
    let all = tok.decode(&ex.input_ids, false).unwrap();
    assert!(all.starts_with("<|im_start|>system\nYou are a tiny test model."));
    assert_eq!(
        labelled_runs(&tok, &ex.input_ids, &ex.labels),
        ["Hello!<|im_end|>"]
    );
}

#[test]
fn tokens_format_takes_ids_and_labels_as_given() {
    let encoder = Encoder::new(DataFormat::Tokens, None, 5);
    let ex = encoder
        .encode(&json!({"input_ids": [4, 8, 15, 16]}))
        .unwrap();
    assert_eq!(ex.input_ids, [4, 8, 15, 16]);
    assert_eq!(
        ex.labels,
        [4, 8, 15, 16],
        "no labels: every token is a target"
    );
    let ex = encoder
        .encode(&json!({"input_ids": [4, 8, 15, 16, 23, 42, 7], "labels": [-100, -100, 15, 16, 23, 42, 7]}))
        .unwrap();
    assert_eq!(ex.input_ids, [4, 8, 15, 16, 23], "truncated to seq_len");
    assert_eq!(ex.labels, [IGNORE, IGNORE, 15, 16, 23]);
    for (bad, want) in [
        (
            json!({"input_ids": [1, 2], "labels": [1]}),
            "\"labels\" has 1 entries, \"input_ids\" 2",
        ),
        (json!({"input_ids": [1, -2]}), "\"input_ids\""),
        (json!({"ids": [1]}), "\"input_ids\""),
        (json!({"input_ids": [1], "labels": ["a"]}), "\"labels\""),
    ] {
        let e = encoder.encode(&bad).unwrap_err();
        assert!(e.contains(want), "{bad}: {e}");
    }
    // In a file, the error names the line.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.jsonl");
    std::fs::write(
        &path,
        "{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [1], \"labels\": []}\n",
    )
    .unwrap();
    let ds = JsonlDataset::open(&path, encoder).unwrap();
    let e = ds.validate().unwrap_err().to_string();
    assert!(e.contains("t.jsonl:3") && e.contains("\"labels\""), "{e}");
}

/// The losses of a 3-step run on `data` in `format`.
#[test]
fn a_configured_builtin_template_renders_labels_and_checkpoints() {
    // `data.template = "gemma"` replaces the model's own ChatML template: the conversation is
    // rendered in Gemma's turns, the model turn's answer and its end marker carry the labels, and
    // the run's checkpoints carry the template.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    let line = json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]});
    collie_data::dataset::write_jsonl(&data, &[line.clone(), line.clone(), line.clone()]).unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nformat = \"chat\"\ntemplate = \"gemma\"\n\
         seq_len = 48\n[train]\nmax_steps = 1\nmicro_batch_size = 3\n[optim]\nlr = 1e-3\n\
         [output]\ndir = \"{}\"\n",
        fixture("train/model").display(),
        data.display(),
        tmp.path().join("run").display()
    );
    let (trainer, _) = train_run(TrainConfig::parse(&text, "template", &[]).unwrap(), None);
    let tok = trainer.tokenizer.clone().unwrap();
    let gemma = collie_data::chat::BuiltinTemplate::Gemma.source();
    assert_eq!(tok.chat_template.as_deref(), Some(gemma));
    let ex = Encoder::new(DataFormat::Chat, Some(tok.clone()), 4096)
        .encode(&line)
        .unwrap();
    let bos = tok.bos_token.clone().unwrap_or_default();
    let rendered = format!(
        "{bos}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    );
    assert_eq!(ex.input_ids, tok.encode(&rendered, false).unwrap());
    let runs = labelled_runs(&tok, &ex.input_ids, &ex.labels);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs[0].starts_with("Hello!"), "{runs:?}");
    let saved = std::fs::read_to_string(
        tmp.path()
            .join("run/checkpoints/step-1/tokenizer_config.json"),
    )
    .unwrap();
    let saved: Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(saved["chat_template"].as_str(), Some(gemma));
}

fn losses(data: &std::path::Path, format: &str, out: &std::path::Path) -> Vec<f64> {
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = "{}"
format = "{format}"
seq_len = 48
shuffle = false
[train]
max_steps = 3
micro_batch_size = 3
[optim]
lr = 1e-3
[output]
dir = "{}"
"#,
        fixture("train/model").display(),
        data.display(),
        out.display()
    );
    train_run(TrainConfig::parse(&text, "tokens", &[]).unwrap(), None).1
}

#[test]
fn pre_tokenized_data_trains_exactly_like_the_text_it_encodes() {
    // `input_output` lines encoded once and written as `tokens` lines: identical training.
    let tmp = tempfile::tempdir().unwrap();
    let encoder = Encoder::new(DataFormat::InputOutput, Some(tokenizer()), 48);
    let ds = JsonlDataset::open(&fixture("train/io.jsonl"), encoder).unwrap();
    let lines: Vec<Value> = (0..ds.len())
        .map(|i| {
            let ex = ds.get(i).unwrap();
            json!({"input_ids": ex.input_ids, "labels": ex.labels})
        })
        .collect();
    let path = tmp.path().join("tokens.jsonl");
    collie_data::dataset::write_jsonl(&path, &lines).unwrap();
    let a = losses(
        &fixture("train/io.jsonl"),
        "input_output",
        &tmp.path().join("io"),
    );
    let b = losses(&path, "tokens", &tmp.path().join("tokens"));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "tokens vs input_output losses");
}
