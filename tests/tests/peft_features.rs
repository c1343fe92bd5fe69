//! PEFT beyond parity: merging, composition with the block-wise backward (activation
//! checkpointing, LOMO), exact resume from an adapter checkpoint, and errors on bad input.

mod common;

use burn::module::Module;
use burn::tensor::Tensor;
use collie_core::lm::CausalLm;
use collie_core::nn::Adaptable;
use collie_io::module::TensorSource;
use collie_io::safetensors::SafetensorsSource;
use collie_peft::{adapter_io, lora, PeftConfig, PeftKind, TargetModules};
use collie_train::TrainConfig;
use common::*;

fn base() -> collie_llama::Llama<B> {
    collie_llama::load::<B>(
        fixture("train/model").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap()
    .model
}

fn batch() -> (
    Tensor<B, 2, burn::tensor::Int>,
    Tensor<B, 2, burn::tensor::Int>,
) {
    let g = read_golden(&fixture("peft/lora/golden.safetensors"));
    let d = Default::default();
    (
        g["input_ids"].int2::<B>(&d),
        g["attention_mask"].int2::<B>(&d),
    )
}

#[test]
fn merge_folds_lora_and_ia3_into_the_weights_and_unmerge_restores_them() {
    let (ids, mask) = batch();
    for case in ["lora", "lora_rslora_all_linear", "ia3"] {
        let device = Default::default();
        let (mut model, _) =
            adapter_io::load(base(), &fixture(&format!("peft/{case}")), &device).unwrap();
        let before = values(model.logits(ids.clone(), Some(&mask)));
        let weights = values(model.layers[0].attn.v_proj.as_ref().unwrap().weight.val());
        lora::merge(&mut model);
        let merged = values(model.logits(ids.clone(), Some(&mask)));
        assert_within(
            &format!("peft {case}: merged logits max |Δ| vs the adapter at run time"),
            max_abs_diff(&merged, &before, |_| true),
            2.5e-5,
        );
        assert_ne!(
            values(model.layers[0].attn.v_proj.as_ref().unwrap().weight.val()),
            weights
        );
        lora::unmerge(&mut model);
        let back = values(model.layers[0].attn.v_proj.as_ref().unwrap().weight.val());
        assert_within(
            &format!("peft {case}: unmerged weight max |Δ| vs the original"),
            max_abs_diff(&back, &weights, |_| true),
            2.5e-7,
        );
        lora::merge_and_unload(&mut model);
        assert!(model
            .named_linears()
            .iter()
            .all(|(_, l)| l.adapter.is_none()));
        let plain = values(model.logits(ids.clone(), Some(&mask)));
        assert_within(
            &format!("peft {case}: merged-and-unloaded logits max |Δ| vs the adapter"),
            max_abs_diff(&plain, &before, |_| true),
            2.5e-5,
        );
    }
}

#[test]
fn activation_checkpointing_walks_adapters_and_virtual_tokens_like_the_plain_backward() {
    // The block-wise walk carries prompt tuning's virtual positions and prefix tuning's per-layer
    // keys/values as block inputs; the losses must not change.
    for case in ["lora", "prefix_projection", "ptuning", "ia3"] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, plain) = train_run(peft_steps_config(case, "", a.path()), None);
        let (_, ckpt) = train_run(
            peft_steps_config(case, "activation_checkpointing = true", b.path()),
            None,
        );
        // The same operations in the same order as the plain backward: bit for bit.
        assert_within(
            &format!("peft {case}: checkpointed loss max rel Δ vs the plain backward"),
            max_rel_list(&ckpt, &plain),
            0.0,
        );
    }
}

#[test]
fn lomo_updates_only_the_adapter() {
    for case in ["lora", "prefix"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = peft_steps_config(case, "", tmp.path());
        c.optim.name = collie_train::config::OptimName::Lomo;
        c.optim.lr = 0.05;
        c.optim.weight_decay = Some(0.0);
        let (trainer, losses) = train_run(c, None);
        assert!(losses.last().unwrap().is_finite());
        // The base stays the pretrained one.
        let original = base();
        fn up<Bk: burn::tensor::backend::Backend>(
            m: &collie_llama::Llama<Bk>,
        ) -> burn::tensor::Tensor<Bk, 2> {
            let mlp = m.layers[1].mlp.as_ref().unwrap();
            mlp.up_proj.as_ref().unwrap().weight.val()
        }
        let a = values(up(&trainer.model));
        let b: Vec<f64> = values(up(&original)).into_iter().map(f64::from).collect();
        assert_eq!(
            max_abs_diff(&a, &b, |_| true),
            0.0,
            "{case}: base weight moved"
        );
        // The adapter moved away from the fixture's weights.
        let saved = SafetensorsSource::open(&tmp.path().join("checkpoints/step-5")).ok();
        assert!(
            saved.is_none(),
            "an adapter checkpoint has no model.safetensors"
        );
        let ours = SafetensorsSource::open(
            &tmp.path()
                .join("checkpoints/step-5")
                .join(adapter_io::WEIGHTS_FILE),
        )
        .unwrap();
        let theirs = SafetensorsSource::open(&fixture(&format!(
            "peft/{case}/{}",
            adapter_io::WEIGHTS_FILE
        )))
        .unwrap();
        let key = &theirs.keys()[0];
        let (x, y) = (ours.read(key).unwrap(), theirs.read(key).unwrap());
        assert_ne!(x.data, y.data, "{case}: LOMO did not update {key}");
        println!("{case} + lomo: losses {losses:?}");
    }
}

#[test]
fn resume_from_an_adapter_checkpoint_is_exact() {
    for case in ["lora", "ptuning"] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, full) = train_run(peft_steps_config(case, "", a.path()), None);
        let mut first = peft_steps_config(case, "save_every = 2", b.path());
        first.train.max_steps = 2;
        train_run(first, None);
        let (_, resumed) = train_run(
            peft_steps_config(case, "save_every = 2", b.path()),
            Some("latest".into()),
        );
        assert_eq!(resumed.len(), 5);
        for (i, (x, y)) in zip_eq(case, &full[..], &resumed[..]).enumerate() {
            assert_eq!(x, y, "{case} step {}: resumed loss differs", i + 1);
        }
    }
}

#[test]
fn fresh_adapters_start_at_the_base_model_and_report_trainable_parameters() {
    let (ids, mask) = batch();
    let device = Default::default();
    let reference = values(base().logits(ids.clone(), Some(&mask)));
    let r64: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
    type AD = burn::backend::Autodiff<B>;
    for kind in [PeftKind::Lora, PeftKind::Ia3] {
        let mut c = PeftConfig::new(kind);
        c.target_modules = Some(TargetModules::Pattern("all-linear".into()));
        c.feedforward_modules = Some(vec!["down_proj".into(), "up_proj".into()]);
        let model = collie_peft::apply(base(), &c, None, &device).unwrap();
        let got = values(model.logits(ids.clone(), Some(&mask)));
        // LoRA's B starts at zero and IA3's vectors at one: the added term is exactly zero.
        assert_eq!(
            max_abs_diff(&got, &r64, |_| true),
            0.0,
            "{kind:?} fresh adapter: logits vs the base"
        );
        let ad = collie_llama::load::<AD>(fixture("train/model").to_str().unwrap(), &device)
            .unwrap()
            .model;
        let total = ad.num_params();
        let ad = collie_peft::apply(ad, &c, None, &device).unwrap();
        let report = collie_peft::TrainableReport::of(&ad);
        let (h, i, kv, layers, vocab) = (64, 128, 32, 2, 512);
        let expected = match kind {
            // r = 8 on q, k, v, o, gate, up, down (not lm_head)
            PeftKind::Lora => {
                layers * 8 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
            }
            // outputs of q, k, v, o, gate; inputs of up, down
            _ => layers * (h + kv + kv + h + i + h + i),
        };
        assert_eq!(report.trainable, expected, "{kind:?}");
        assert_eq!(report.total, total + expected, "{kind:?}");
        let _ = vocab;
        println!("{kind:?}: {report}");
    }
}

#[test]
fn bad_peft_input_gets_clear_errors() {
    let device = Default::default();
    let err = |c: PeftConfig| match collie_peft::apply(base(), &c, None, &device) {
        Ok(_) => panic!("accepted {c:?}"),
        Err(e) => e.to_string(),
    };
    let mut c = PeftConfig::new(PeftKind::Lora);
    c.target_modules = Some(TargetModules::Names(vec!["query".into()]));
    let e = err(c);
    assert!(
        e.contains("peft.target_modules")
            && e.contains("matches no linear layer")
            && e.contains("q_proj"),
        "{e}"
    );
    let mut c = PeftConfig::new(PeftKind::Lora);
    c.target_modules = Some(TargetModules::Pattern("q_proj".into()));
    assert!(err(c).contains("matches no linear layer"));
    let mut c = PeftConfig::new(PeftKind::Lora);
    c.r = 0;
    let e = err(c);
    assert!(e.contains("peft.r") && e.contains("at least 1"), "{e}");
    let mut c = PeftConfig::new(PeftKind::Ia3);
    c.feedforward_modules = Some(vec!["gate_proj".into()]);
    assert!(err(c).contains("feedforward_modules"));

    // An adapter for another base: shapes differ.
    let tmp = tempfile::tempdir().unwrap();
    for f in [adapter_io::CONFIG_FILE, adapter_io::WEIGHTS_FILE] {
        std::fs::copy(fixture(&format!("peft/lora/{f}")), tmp.path().join(f)).unwrap();
    }
    let other = collie_llama::load::<B>(fixture("llama/mha_untied").to_str().unwrap(), &device)
        .unwrap()
        .model;
    let e = adapter_io::load(other, tmp.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("another base model"),
        "{e}"
    );

    // Unknown peft type.
    let cfg = tmp.path().join(adapter_io::CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"LORA\"", "\"LOHA\"");
    std::fs::write(&cfg, text).unwrap();
    let e = adapter_io::load(base(), tmp.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("LOHA") && e.contains("not supported"),
        "{e}"
    );

    // LoRA on parameters (peft's target_parameters, e.g. stacked MoE experts).
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"LOHA\"", "\"LORA\"")
        .replace(
            "\"target_parameters\": null",
            "\"target_parameters\": [\"gate_up_proj\"]",
        );
    assert!(
        text.contains("[\"gate_up_proj\"]"),
        "peft writes target_parameters"
    );
    std::fs::write(&cfg, text).unwrap();
    let e = adapter_io::load(base(), tmp.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target_parameters") && e.contains("gate_up_proj"),
        "{e}"
    );

    // Not an adapter directory.
    let e = adapter_io::load(base(), &fixture("train"), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no adapter_config.json"), "{e}");

    // Config-level checks name the key.
    let text = |peft: &str| {
        format!(
            "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[train]\nmax_steps = 1\n[optim]\nlr = 1e-3\n[output]\ndir = \"o\"\n[peft]\n{peft}\n"
        )
    };
    let e = TrainConfig::parse(&text("kind = \"lora\"\nr = 0"), "c.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("peft.r"), "{e}");
    let e = TrainConfig::parse(
        &text("kind = \"lora\"\ndropout = 0.1"),
        "c.toml",
        &["train.activation_checkpointing=true".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("peft.dropout") && e.contains("activation_checkpointing"),
        "{e}"
    );
    let e = TrainConfig::parse(&text("kind = \"loha\""), "c.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("peft") && e.contains("loha"), "{e}");
    let e = TrainConfig::parse(
        &text("kind = \"lora\"\ntarget_modules = \"(\""),
        "c.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("peft.target_modules") && e.contains("regex"),
        "{e}"
    );
}

#[test]
fn every_optimizer_trains_only_the_adapter() {
    let mut by_optim = std::collections::HashMap::new();
    for optim in ["adamw", "sgd", "lion", "adan", "sophiag", "lomo", "adalomo"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = peft_steps_config("lora", "", tmp.path());
        c.train.max_steps = 3;
        c.optim.name = optim.parse().unwrap();
        c.optim.lr = if optim == "lion" { 1e-4 } else { 1e-3 };
        c.optim.hessian_interval = 1;
        let (trainer, losses) = train_run(c, None);
        assert_eq!(losses.len(), 3, "{optim}");
        assert!(losses.iter().all(|l| l.is_finite()), "{optim}: {losses:?}");
        let original = base();
        for (a, b) in [
            (
                &trainer.model.layers[0].attn.q_proj.as_ref().unwrap().weight,
                &original.layers[0].attn.q_proj.as_ref().unwrap().weight,
            ),
            (&trainer.model.embed.weight, &original.embed.weight),
        ] {
            let b: Vec<f64> = values(b.val()).into_iter().map(f64::from).collect();
            assert_eq!(
                max_abs_diff(&values(a.val()), &b, |_| true),
                0.0,
                "{optim}: base moved"
            );
        }
        // Optimizer state exists for adapter parameters only.
        let opt =
            SafetensorsSource::open(&tmp.path().join("checkpoints/step-3/optimizer.safetensors"))
                .unwrap();
        assert!(
            opt.keys().iter().all(|k| k.contains("adapter")),
            "{optim}: state for a frozen parameter: {:?}",
            opt.keys()
        );
        println!("{optim} + lora: {losses:?}");
        by_optim.insert(optim, losses);
    }
    // LOMO without momentum is SGD: the fused block-wise update over the adapters (with its
    // two-pass clipping) equals the plain backward followed by SGD. The same arithmetic per
    // element (p − lr·clip·g); the block-wise backward's gemms may sum in another order than the
    // whole graph's on some CPUs (one f32 ulp on step 3 here, bit-equal on an earlier machine).
    assert_within(
        "peft lora: LOMO vs SGD losses, 3 steps, max rel Δ",
        max_rel_list(&by_optim["lomo"], &by_optim["sgd"]),
        1e-6,
    );
}

#[test]
fn reduced_precision_trains_adapters_and_virtual_tokens() {
    for case in ["lora", "prefix_projection", "prompt"] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, f32_losses) = train_run(peft_steps_config(case, "", a.path()), None);
        for dtype in ["bf16", "f16"] {
            let mut c = peft_steps_config(case, "", b.path());
            c.model.dtype = dtype.parse().unwrap();
            c.output.dir = b.path().join(dtype);
            let (trainer, losses) = train_run(c, None);
            assert_within(
                &format!("peft {case} {dtype}: loss max rel Δ vs f32 (5 steps)"),
                max_rel_list(&losses, &f32_losses),
                1e-2,
            );
            // Master weights stay f32.
            let v = trainer.model.virtual_tokens.as_ref();
            let dt = match v {
                Some(v) => v.embedding.val().dtype(),
                None => trainer.model.layers[0]
                    .attn
                    .q_proj
                    .as_ref()
                    .unwrap()
                    .weight
                    .val()
                    .dtype(),
            };
            assert_eq!(dt, burn::tensor::DType::F32, "{case} {dtype}");
        }
    }
}
