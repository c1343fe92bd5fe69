//! Packing and activation checkpointing give the same numbers as the plain paths.

mod common;

use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;
use collie_data::dataset::{DataFormat, Encoder, JsonlDataset};
use collie_data::loader::{collate, pack_rows};
use collie_train::eval::batch_nll;
use collie_train::TrainConfig;
use common::*;

#[test]
fn packed_batch_loss_equals_unpacked() {
    let device = Default::default();
    let loaded =
        collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    for (file, format) in [
        ("train/io.jsonl", DataFormat::InputOutput),
        ("train/text.jsonl", DataFormat::Text),
    ] {
        let encoder = Encoder::new(format, loaded.tokenizer.clone(), 48);
        let ds = JsonlDataset::open(&fixture(file), encoder).unwrap();
        let examples: Vec<_> = (0..6).map(|i| ds.get(i).unwrap()).collect();
        let unpacked = collate(&examples);
        // Three documents per row, two rows.
        let rows: Vec<Vec<_>> = examples.chunks(3).map(|c| c.iter().collect()).collect();
        let cols = rows
            .iter()
            .map(|r| r.iter().map(|e| e.input_ids.len()).sum::<usize>())
            .max()
            .unwrap();
        let packed = pack_rows(&rows, cols);
        assert!(packed.packed());
        assert_eq!(packed.target_tokens(), unpacked.target_tokens());
        let (a, n) = batch_nll(&loaded.model, &unpacked, &device);
        let (b, m) = batch_nll(&loaded.model, &packed, &device);
        let (a, b) = (
            a.into_scalar().elem::<f64>() / n as f64,
            b.into_scalar().elem::<f64>() / m as f64,
        );
        assert_within(
            &format!("packing {file}: loss |Δ| packed vs unpacked"),
            (a - b).abs(),
            6e-6,
        );
    }
}

/// Four AdamW steps on `train/io.jsonl` (shuffled): the trainer and its losses.
fn train(checkpointing: bool, pack: bool, out: &std::path::Path) -> (LlamaTrainer, Vec<f64>) {
    let text = format!(
        r#"
[model]
path = "{}"
[data]
train = "{}"
format = "input_output"
seq_len = 48
shuffle = true
pack = {pack}
[train]
max_steps = 4
micro_batch_size = 3
grad_accum_steps = 2
activation_checkpointing = {checkpointing}
[optim]
lr = 1e-3
[output]
dir = "{}"
"#,
        fixture("train/model").display(),
        fixture("train/io.jsonl").display(),
        out.display()
    );
    train_run(TrainConfig::parse(&text, "test", &[]).unwrap(), None)
}

/// [`train`]'s losses and one weight matrix after it.
fn losses(checkpointing: bool, out: &std::path::Path) -> (Vec<f64>, Vec<f32>) {
    let (trainer, losses) = train(checkpointing, false, out);
    let weights = values(
        trainer.model.layers[0]
            .mlp
            .as_ref()
            .unwrap()
            .down_proj
            .weight
            .val()
            .inner(),
    );
    (losses, weights)
}

#[test]
fn activation_checkpointing_matches_the_plain_backward() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, w_plain) = losses(false, &tmp.path().join("plain"));
    let (ckpt, w_ckpt) = losses(true, &tmp.path().join("ckpt"));
    assert_eq!(plain.len(), 4);
    // The recomputed blocks and the head run the same operations in the same order as the plain
    // backward (one head chunk at this size): bit for bit.
    assert_within(
        "activation checkpointing (f32): loss max rel Δ vs the plain backward",
        max_rel_list(&ckpt, &plain),
        0.0,
    );
    assert_within(
        "activation checkpointing (f32): weights after 4 steps max |Δ| vs the plain backward",
        max_abs_diff(&w_ckpt, &w_plain, |_| true),
        0.0,
    );
}

#[test]
fn packed_training_learns() {
    // The model after 4 packed steps fits the training examples better than before: the mean
    // NLL of the first 12 examples (unpacked, every target) falls.
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let before =
        collie_llama::load::<B>(fixture("train/model").to_str().unwrap(), &device).unwrap();
    let (trainer, losses) = train(false, true, tmp.path());
    assert_eq!(losses.len(), 4);
    assert_finite("packed losses", &losses);
    let encoder = Encoder::new(DataFormat::InputOutput, before.tokenizer.clone(), 48);
    let ds = JsonlDataset::open(&fixture("train/io.jsonl"), encoder).unwrap();
    let examples: Vec<_> = (0..12).map(|i| ds.get(i).unwrap()).collect();
    let batch = collate(&examples);
    let nll = |model: &collie_llama::Llama<B>| {
        let (sum, n) = batch_nll(model, &batch, &device);
        sum.into_scalar().elem::<f64>() / n as f64
    };
    let trained = trainer.model.valid();
    let (a, b) = (nll(&before.model), nll(&trained));
    println!("packed training: NLL of the training examples {a:.4} -> {b:.4}; losses {losses:?}");
    assert!(
        b < a - 0.05,
        "NLL {a} -> {b}: packed training did not learn"
    );
}

fn run_dtype(dtype: &str, checkpointing: bool, out: &std::path::Path) -> Vec<f64> {
    let text = format!(
        r#"
[model]
path = "{}"
dtype = "{dtype}"
[data]
train = "{}"
format = "input_output"
seq_len = 48
shuffle = false
[train]
max_steps = 6
micro_batch_size = 3
grad_accum_steps = 2
activation_checkpointing = {checkpointing}
[optim]
lr = 3e-3
[output]
dir = "{}"
"#,
        fixture("train/model").display(),
        fixture("train/io.jsonl").display(),
        out.display()
    );
    let config = TrainConfig::parse(&text, "test", &[]).unwrap();
    let (trainer, losses) = train_run(config, None);
    // Master weights stay f32.
    assert_eq!(
        trainer.model.embed.weight.val().dtype(),
        burn::tensor::DType::F32
    );
    losses
}

#[test]
fn reduced_precision_tracks_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_losses = run_dtype("f32", false, &tmp.path().join("f32"));
    for dtype in ["bf16", "f16"] {
        let losses = run_dtype(dtype, false, &tmp.path().join(dtype));
        println!("{dtype}: {losses:?}\nf32: {f32_losses:?}");
        // bf16 rounds to 8 significant bits (2^-8 ≈ 0.4 %); f16 to 11.
        assert_within(
            &format!("{dtype}: loss max rel Δ vs f32 (6 steps)"),
            max_rel_list(&losses, &f32_losses),
            0.004,
        );
        assert!(
            losses.last().unwrap() < losses.first().unwrap(),
            "{dtype}: loss did not fall"
        );
    }
    // Block recomputation in bf16. The recomputed blocks run the same operations in the same
    // dtype as the plain forward (the naive attention's softmax is spelled out, so no fused CPU
    // kernel differs from burn-autodiff's decomposition): the first step's loss, a forward of the
    // same weights, is identical. The backward then sums the gradient contributions of a block in
    // bf16 in another grouping than the whole-model graph does; a different rounding (2^-8
    // relative) of some update elements shows in the losses from step 5 on (4.1e-4 after 6
    // steps). The bound is bf16's precision, 2^-8 ≈ 3.9e-3.
    let plain = run_dtype("bf16", false, &tmp.path().join("bf16-plain"));
    let ckpt = run_dtype("bf16", true, &tmp.path().join("bf16-ckpt"));
    assert_eq!(
        ckpt[0], plain[0],
        "bf16 checkpointing: the first step's forward"
    );
    assert_within(
        "bf16 activation checkpointing: loss max rel Δ vs the plain bf16 backward",
        max_rel_list(&ckpt, &plain),
        4e-3,
    );
}
