//! Backend selection: which Burn backends this build has, and the `--device` flag.
//!
//! Binaries parse `--device cpu|wgpu[:N|:cpu]|cuda[:N]` into a [`DeviceSpec`] and call [`dispatch`]
//! once, at the top, with a [`BackendTask`]: a value whose `run` method is generic over
//! `B: AutodiffBackend`. Everything below that call is backend-agnostic code.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::AutodiffBackend;

use crate::error::{CoreError, Result};

/// Burn's Flex backend: pure-Rust CPU, multi-threaded with rayon, SIMD kernels.
#[cfg(feature = "cpu")]
pub type Cpu = burn::backend::Flex;
/// Burn's wgpu backend with kernel fusion (Vulkan, Metal, DX12; Mesa lavapipe in CI).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;
/// Burn's CUDA backend with kernel fusion (kernels compiled at run time through NVRTC).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `cpu`: the Flex backend.
    Cpu,
    /// `wgpu` (the default adapter), `wgpu:N` (the N-th discrete GPU) or `wgpu:cpu` (a software
    /// adapter such as lavapipe).
    Wgpu(WgpuAdapter),
    /// `cuda` or `cuda:N`.
    Cuda(usize),
}

/// Which wgpu adapter a [`DeviceSpec::Wgpu`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// The best adapter wgpu finds.
    Default,
    /// The N-th discrete GPU.
    Discrete(usize),
    /// A CPU (software) adapter.
    Cpu,
}

impl FromStr for DeviceSpec {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || CoreError::InvalidDevice(s.to_string());
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (s, None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("wgpu", None) => Ok(DeviceSpec::Wgpu(WgpuAdapter::Default)),
            ("wgpu", Some("cpu")) => Ok(DeviceSpec::Wgpu(WgpuAdapter::Cpu)),
            ("wgpu", Some(i)) => Ok(DeviceSpec::Wgpu(WgpuAdapter::Discrete(
                i.parse().map_err(|_| bad())?,
            ))),
            ("cuda", None) => Ok(DeviceSpec::Cuda(0)),
            ("cuda", Some(i)) => Ok(DeviceSpec::Cuda(i.parse().map_err(|_| bad())?)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Default) => write!(f, "wgpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Cpu) => write!(f, "wgpu:cpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Discrete(i)) => write!(f, "wgpu:{i}"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Work to run on whichever backend a [`DeviceSpec`] selects.
///
/// Implement it for a struct holding the task's arguments; [`dispatch`] calls `run` with the
/// concrete autodiff backend. Inference code uses `B::InnerBackend`.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs the task on backend `B` and `device`.
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the backend named by `spec`, or fails if this build lacks that backend.
pub fn dispatch<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    match spec {
        DeviceSpec::Cpu => run_cpu(task),
        DeviceSpec::Wgpu(adapter) => run_wgpu(task, adapter),
        DeviceSpec::Cuda(index) => run_cuda(task, index),
    }
}

/// What backend `I`'s custom ops need before a model runs on `I` or `Autodiff<I>`: the
/// tensor-parallel collectives ([`crate::dist::register_autodiff`]), memory-efficient attention
/// ([`crate::flash::register`]; CubeCL kernels on wgpu and CUDA, the chunked tensor-op kernels
/// elsewhere) and, on the CPU, the fused element-wise kernels ([`crate::fused::register`]).
/// [`dispatch`] calls it; code that builds a backend itself (tests) calls it too.
pub trait RegisterOps: burn::tensor::backend::Backend {
    /// Registers this backend's custom ops (idempotent).
    fn register_ops();
}

#[cfg(feature = "cpu")]
impl RegisterOps for Cpu {
    fn register_ops() {
        crate::dist::register_autodiff::<Cpu>();
        crate::nn::quant::register::<Cpu>();
        crate::flash::register::<Cpu, crate::flash::Chunked>();
        crate::fused::register::<Cpu, crate::fused::FlexKernels>();
    }
}

#[cfg(feature = "wgpu")]
impl RegisterOps for Wgpu {
    fn register_ops() {
        crate::dist::register_autodiff::<Wgpu>();
        crate::nn::quant::register::<Wgpu>();
        crate::nn::quant::cube::register::<Wgpu>();
        crate::flash::register::<Wgpu, crate::flash::cube::Cube>();
    }
}

#[cfg(feature = "cuda")]
impl RegisterOps for Cuda {
    fn register_ops() {
        crate::dist::register_autodiff::<Cuda>();
        crate::nn::quant::register::<Cuda>();
        crate::nn::quant::cube::register::<Cuda>();
        crate::flash::register::<Cuda, crate::flash::cube::Cube>();
    }
}

/// Registers backend `I`'s custom ops ([`RegisterOps`]).
pub fn register<I: RegisterOps>() {
    I::register_ops();
}

#[cfg(feature = "cpu")]
fn run_cpu<T: BackendTask>(task: T) -> Result<T::Output> {
    register::<Cpu>();
    Ok(task.run::<burn::backend::Autodiff<Cpu>>(Default::default()))
}

#[cfg(not(feature = "cpu"))]
fn run_cpu<T: BackendTask>(_task: T) -> Result<T::Output> {
    Err(not_compiled(DeviceSpec::Cpu, "cpu"))
}

#[cfg(feature = "wgpu")]
fn run_wgpu<T: BackendTask>(task: T, adapter: WgpuAdapter) -> Result<T::Output> {
    use burn::backend::wgpu::WgpuDevice;
    let device = match adapter {
        WgpuAdapter::Default => WgpuDevice::DefaultDevice,
        WgpuAdapter::Discrete(i) => WgpuDevice::DiscreteGpu(i),
        WgpuAdapter::Cpu => WgpuDevice::Cpu,
    };
    register::<Wgpu>();
    Ok(task.run::<burn::backend::Autodiff<Wgpu>>(device))
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<T: BackendTask>(_task: T, adapter: WgpuAdapter) -> Result<T::Output> {
    Err(not_compiled(DeviceSpec::Wgpu(adapter), "wgpu"))
}

#[cfg(feature = "cuda")]
fn run_cuda<T: BackendTask>(task: T, index: usize) -> Result<T::Output> {
    register::<Cuda>();
    Ok(task.run::<burn::backend::Autodiff<Cuda>>(burn::backend::cuda::CudaDevice::new(index)))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(_task: T, index: usize) -> Result<T::Output> {
    Err(not_compiled(DeviceSpec::Cuda(index), "cuda"))
}

#[allow(dead_code)]
fn not_compiled(spec: DeviceSpec, feature: &'static str) -> CoreError {
    CoreError::BackendNotCompiled {
        device: spec.to_string(),
        feature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(
            "wgpu:cpu".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Wgpu(WgpuAdapter::Cpu)
        );
        assert_eq!(
            "wgpu:1".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Wgpu(WgpuAdapter::Discrete(1))
        );
        for bad in ["gpu", "cuda:x", "cpu:0", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("invalid device"), "{bad}: {err}");
        }
    }
}
