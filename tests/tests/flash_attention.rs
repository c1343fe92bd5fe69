//! Memory-efficient attention against the naive path (`collie_tests::suite::flash`), on the
//! CPU (chunked tensor-op kernels) and, with `--features collie-tests/wgpu`, on wgpu (the CubeCL
//! kernels; lavapipe in CI).

use collie_tests::suite::{assert_all, flash};

/// The wgpu tests of this binary take turns on the one device: run concurrently (the test
/// harness's threads), the kernel test's results came out wrong by O(1) in a different case each
/// run once the other test's model load changed its timing (lazy reads), while each alone, or
/// both with `--test-threads=1`, match the naive path to 1e-7. Not understood yet (two threads'
/// streams on one lavapipe device); kept apart so that each test checks its own kernels.
#[cfg(feature = "wgpu")]
static WGPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let _turn = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all("wgpu", &flash::op::<collie_core::device::Wgpu>(&device));
}

#[cfg(feature = "wgpu")]
#[test]
fn llama_with_flash_attention_equals_naive_on_wgpu() {
    let _turn = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all("wgpu", &flash::llama::<collie_core::device::Wgpu>(&device));
}
