//! The same tiny LLaMA forward on `wgpu` and on `cpu` (Flex): logits within 1e-4.
//! CI runs it on Mesa lavapipe (`mesa-vulkan-drivers`); build with `--features collie-tests/wgpu`.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::wgpu::WgpuDevice;
use common::*;

type W = collie_core::device::Wgpu;

#[test]
fn tiny_llama_on_wgpu_equals_cpu() {
    let wgpu = WgpuDevice::DefaultDevice;
    for case in ["gqa_tied_theta", "qwen2_bias"] {
        let dir = fixture(&format!("llama/{case}"));
        let cpu_model = collie_llama::load::<B>(dir.to_str().unwrap(), &Default::default())
            .unwrap()
            .model;
        let gpu_model = collie_llama::load::<W>(dir.to_str().unwrap(), &wgpu)
            .unwrap()
            .model;
        let golden = read_golden(&dir.join("golden.safetensors"));
        let mask_g = &golden["mask_left"];
        let cpu = values(cpu_model.forward(
            golden["ids_left"].int2::<B>(&Default::default()),
            Some(&mask_g.int2::<B>(&Default::default())),
        ));
        let gpu = values(gpu_model.forward(
            golden["ids_left"].int2::<W>(&wgpu),
            Some(&mask_g.int2::<W>(&wgpu)),
        ));
        let cpu: Vec<f64> = cpu.into_iter().map(f64::from).collect();
        let vocab = golden["logits_left"].shape[2];
        let diff = max_abs_diff(&gpu, &cpu, |i| mask_g.values[i / vocab] == 1.0);
        println!("{case}: max |Δlogit| wgpu vs cpu = {diff:.2e}");
        assert!(diff < 1e-4, "{case}: wgpu differs from cpu by {diff:.3e}");
    }
}
