//! Every optimizer against its reference implementation (`collie_tests::suite::optim`): on the
//! CPU and, with `--features collie-tests/wgpu`, on wgpu.

use collie_tests::suite::{assert_all, optim};

#[test]
fn optimizers_match_reference_implementations_on_cpu() {
    assert_all(
        "cpu",
        &optim::reference::<collie_core::device::Cpu>(&Default::default()),
    );
}

#[cfg(feature = "wgpu")]
#[test]
fn optimizers_match_reference_implementations_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    assert_all(
        "wgpu",
        &optim::reference::<collie_core::device::Wgpu>(&device),
    );
}
