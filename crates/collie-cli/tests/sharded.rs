//! `collie convert` of a parallel run's sharded checkpoint: the HF directory it writes holds the
//! very weights the ranks wrote, and a manifest naming a missing or truncated shard is one
//! `error:` line naming the file, leaving the output as it was.

use std::collections::HashSet;
use std::path::Path;

use burn::module::ParamId;
use collie_core::model::BlockModel;
use collie_io::family::ModelFiles;
use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_io::sharded::{merge, Kind};
use collie_optim::OptimizerState;
use collie_train::checkpoint::{param_ids, write_rank, RankShare};

mod common;

use common::fixtures;

type B = collie_core::device::Cpu;

/// The fixture model written as two pipeline stages would write it: rank 0 the embedding and
/// layer 0, rank 1 everything else.
fn sharded_fixture(dir: &Path) {
    let device = Default::default();
    let spec = fixtures().join("train/model");
    let loaded = collie_llama::Llama::<B>::load(spec.to_str().unwrap(), &device).unwrap();
    let model = &loaded.model;
    let all = param_ids(model);
    let mut first = param_ids(model.embed());
    first.extend(param_ids(&model.layers()[0]));
    let second: HashSet<ParamId> = all.difference(&first).copied().collect();
    std::fs::create_dir_all(dir).unwrap();
    for (rank, stage) in [&first, &second].into_iter().enumerate() {
        let share = RankShare {
            rank,
            stage,
            split: &Default::default(),
            tp: (0, 1),
            params: true,
            state: true,
            trainable_only: false,
        };
        write_rank(dir, model, &OptimizerState::default().into(), &share).unwrap();
    }
    merge(dir, 2, Kind::Model).unwrap();
    collie_io::json::write_json(&dir.join("config.json"), &loaded.config).unwrap();
    loaded.tokenizer.as_ref().unwrap().save(dir).unwrap();
}

fn convert(input: &Path, output: &Path) -> std::process::Output {
    common::run(&[
        "convert",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ])
}

#[test]
fn a_sharded_checkpoint_converts_to_the_hf_directory_it_was_made_from() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("step-1");
    sharded_fixture(&ckpt);
    assert!(ckpt.join("params-rank-1.safetensors").is_file());
    let out = tmp.path().join("hf");
    let run = convert(&ckpt, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let want = SafetensorsSource::open(&fixtures().join("train/model")).unwrap();
    let got = SafetensorsSource::open(&out).unwrap();
    assert_eq!(got.keys(), want.keys());
    for key in want.keys() {
        let (a, b) = (got.read(&key).unwrap(), want.read(&key).unwrap());
        assert_eq!(a.shape, b.shape, "{key}");
        assert!(a.data == b.data, "{key}: values differ");
    }
    assert!(out.join("tokenizer.json").is_file());

    // A truncated shard, then a missing one: one error line naming it; `out` as it was.
    let shard = ckpt.join("params-rank-1.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    for case in ["truncated", "missing"] {
        let run = convert(&ckpt, &out);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{case}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{case}: {stderr}");
        assert!(
            errors[0].contains("params-rank-1.safetensors"),
            "{case}: {}",
            errors[0]
        );
        assert!(!stderr.contains("panicked"), "{case}: {stderr}");
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            before
        );
        std::fs::remove_file(&shard).unwrap_or_default();
    }
}
