//! Memory-efficient attention against the naive path (`collie_tests::suite::flash`), on the
//! CPU (chunked tensor-op kernels) and, with `--features collie-tests/wgpu`, on wgpu (the CubeCL
//! kernels; lavapipe in CI).

use collie_tests::suite::{assert_all, flash};

#[test]
fn flash_attention_equals_naive_on_cpu() {
    assert_all(
        "cpu",
        &flash::op::<collie_core::device::Cpu>(&Default::default()),
    );
}

#[test]
fn llama_with_flash_attention_equals_naive_on_cpu() {
    assert_all(
        "cpu",
        &flash::llama::<collie_core::device::Cpu>(&Default::default()),
    );
}

#[cfg(feature = "wgpu")]
#[test]
fn flash_attention_equals_naive_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all("wgpu", &flash::op::<collie_core::device::Wgpu>(&device));
}

#[cfg(feature = "wgpu")]
#[test]
fn llama_with_flash_attention_equals_naive_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all("wgpu", &flash::llama::<collie_core::device::Wgpu>(&device));
}
