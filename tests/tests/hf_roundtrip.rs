//! Saving HF directories: what collie-rs writes is what transformers wrote (tensor for tensor) and
//! loads back to identical logits (transformers loading what collie-rs writes: `interop.rs`).
//! Fixtures: `scripts/fixtures/llama_hf.py`.

mod common;

use std::path::Path;

use collie_io::module::TensorSource;
use collie_io::safetensors::{SafetensorsSource, SaveDtype};
use common::*;
use serde_json::Value;

fn save(case: &str, out: &Path) -> collie_llama::LoadedModel<B> {
    let loaded = collie_llama::load::<B>(
        fixture(&format!("llama/{case}")).to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    collie_llama::hf::save_hf_dir(&loaded.model, &loaded.config, None, out, SaveDtype::F32)
        .unwrap();
    loaded
}

#[test]
fn saved_tensors_equal_the_transformers_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for case in LLAMA_CASES {
        let out = tmp.path().join(case);
        save(case, &out);
        let original =
            SafetensorsSource::open(&fixture(&format!("llama/{case}/model.safetensors"))).unwrap();
        let saved = SafetensorsSource::open(&out).unwrap();
        assert_eq!(saved.keys(), original.keys(), "{case}: tensor names");
        for key in original.keys() {
            assert_eq!(
                saved.read(&key).unwrap(),
                original.read(&key).unwrap(),
                "{case}: {key}"
            );
        }
        // The config keeps what transformers needs to rebuild the same model.
        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (a, b) = (
            read(&out.join("config.json")),
            read(&fixture(&format!("llama/{case}/config.json"))),
        );
        for key in [
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "rope_parameters",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "sliding_window",
            "architectures",
            // CodeGen's own names.
            "n_embd",
            "n_inner",
            "n_layer",
            "n_head",
            "n_positions",
            "layer_norm_epsilon",
            "activation_function",
            "rotary_dim",
        ] {
            // `null` and an absent key mean the same to transformers.
            let get = |v: &Value| v.get(key).filter(|x| !x.is_null()).cloned();
            assert_eq!(get(&a), get(&b), "{case}: config key {key}");
        }
    }
}

#[test]
fn saved_directory_reloads_to_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    for case in LLAMA_CASES {
        let out = tmp.path().join(case);
        let loaded = save(case, &out);
        let back = collie_llama::load::<B>(out.to_str().unwrap(), &device).unwrap();
        let golden = read_golden(&fixture(&format!("llama/{case}/golden.safetensors")));
        let ids = golden["ids_left"].int2::<B>(&device);
        let mask = golden["mask_left"].int2::<B>(&device);
        let a = values(loaded.model.forward(ids.clone(), Some(&mask)));
        let b: Vec<f64> = values(back.model.forward(ids, Some(&mask)))
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(max_abs_diff(&a, &b, |_| true), 0.0, "{case}");
    }
}

#[test]
fn an_existing_directory_is_replaced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("stale.bin"), b"old").unwrap();
    save("mha_untied", &out);
    assert!(!out.join("stale.bin").exists());
    assert!(out.join("model.safetensors").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "staging directories left behind: {leftovers:?}"
    );
}

/// Splits a checkpoint into two shards with an index, as `save_pretrained(max_shard_size=...)` does.
fn shard(dir: &Path, out: &Path) {
    use collie_io::safetensors::save_safetensors;
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(dir.join("config.json"), out.join("config.json")).unwrap();
    let source = SafetensorsSource::open(dir).unwrap();
    let keys = source.keys();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in keys.chunks(keys.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let tensors: Vec<_> = part
            .iter()
            .map(|k| (k.clone(), source.read(k).unwrap()))
            .collect();
        save_safetensors(&out.join(&file), &tensors, SaveDtype::F32).unwrap();
        for k in part {
            weight_map.insert(k.clone(), Value::from(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    for case in ["mha_untied", "qwen2_bias"] {
        let out = tmp.path().join(case);
        shard(&fixture(&format!("llama/{case}")), &out);
        let single =
            collie_llama::load::<B>(fixture(&format!("llama/{case}")).to_str().unwrap(), &device)
                .unwrap();
        let sharded = collie_llama::load::<B>(out.to_str().unwrap(), &device).unwrap();
        let golden = read_golden(&fixture(&format!("llama/{case}/golden.safetensors")));
        let ids = golden["ids_right"].int2::<B>(&device);
        let a = values(single.model.forward(ids.clone(), None));
        let b: Vec<f64> = values(sharded.model.forward(ids, None))
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(max_abs_diff(&a, &b, |_| true), 0.0, "{case}");
    }
    // An index that names a shard without the tensor is an error naming the index.
    let out = tmp.path().join("mha_untied");
    let index = out.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("model-00001-of-00002", "model-00002-of-00002");
    std::fs::write(&index, text).unwrap();
    let err = collie_llama::load::<B>(out.to_str().unwrap(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("does not contain"),
        "{err}"
    );
}

#[test]
fn half_precision_checkpoints_load_as_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let f32_model =
        collie_llama::load::<B>(fixture("llama/llama_bias").to_str().unwrap(), &device).unwrap();
    let original = SafetensorsSource::open(&fixture("llama/llama_bias")).unwrap();
    for (dtype, round) in [
        (
            SaveDtype::F16,
            (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (SaveDtype::BF16, |v: f32| half::bf16::from_f32(v).to_f32()),
    ] {
        let out = tmp.path().join(format!("{dtype:?}"));
        collie_llama::hf::save_hf_dir(&f32_model.model, &f32_model.config, None, &out, dtype)
            .unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["torch_dtype"], dtype.torch_name());
        let reloaded = SafetensorsSource::open(&out).unwrap();
        for key in original.keys() {
            let expected: Vec<f32> = original
                .read(&key)
                .unwrap()
                .data
                .into_iter()
                .map(round)
                .collect();
            assert_eq!(
                reloaded.read(&key).unwrap().data,
                expected,
                "{dtype:?} {key}"
            );
        }
        // And the model loads from it.
        collie_llama::load::<B>(out.to_str().unwrap(), &device).unwrap();
    }
}

#[test]
fn lazy_loading_reads_each_weight_when_first_used() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    use collie_io::family::ModelFiles;
    // Counts the parameters whose value is read yet.
    struct Read(usize, usize);
    impl ModuleVisitor<B> for Read {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0 += p.is_initialized() as usize;
            self.1 += 1;
        }
    }
    let read = |m: &collie_llama::Llama<B>| {
        let mut v = Read(0, 0);
        m.visit(&mut v);
        (v.0, v.1)
    };
    let device = Default::default();
    for case in LLAMA_CASES {
        let path = fixture(&format!("llama/{case}"));
        let path = path.to_str().unwrap();
        let eager = collie_llama::load::<B>(path, &device).unwrap().model;
        let lazy = <collie_llama::Llama<B> as ModelFiles<B>>::load_lazy(path, &device)
            .unwrap()
            .model;
        let (_, total) = read(&eager);
        assert_eq!(read(&eager).0, total, "{case}: load reads every weight");
        // (Parts cut out of a fused checkpoint tensor, InternLM2's wqkv, would be read at load;
        // these cases store every weight as the model holds it.)
        assert_eq!(read(&lazy).0, 0, "{case}: weights read by load_lazy");
        collie_io::module::materialize(&lazy);
        assert_eq!(read(&lazy).0, total, "{case}: materialized");
        let (a, b) = (
            collie_io::module::collect_params(&lazy),
            collie_io::module::collect_params(&eager),
        );
        assert_eq!(a.len(), b.len());
        for ((ia, ta), (_, tb)) in a.iter().zip(&b) {
            assert_eq!(ta, tb, "{case}: {}", ia.path);
        }
    }
}
