//! Golden fixtures: where they are, and reading them.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// The tiny HF checkpoints of `tests/fixtures/llama/` (generator: `scripts/fixtures/llama_hf.py`).
pub const LLAMA_CASES: &[&str] = &[
    "mha_untied",
    "gqa_tied_theta",
    "mqa_llama3",
    "llama_bias",
    "qwen2_bias",
    "mistral_window",
    "qwen3_qknorm",
    "gemma3_local",
    "glm_partial_rotary",
    "mixtral_moe",
    "qwen3_moe_sparse",
    "codegen_parallel",
];

/// `tests/fixtures/<rel>`; `COLLIE_FIXTURES` points elsewhere (a prebuilt binary run on another
/// machine, `scripts/gpu-check.sh`).
pub fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("COLLIE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
        .join(rel)
}

/// A tensor from a golden file: shape and values (ints widened to f64 exactly).
pub struct Golden {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f64>,
}

/// Reads every tensor of a safetensors file (f32, f64, i64 or u8).
pub fn read_golden(path: &std::path::Path) -> HashMap<String, Golden> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::U8 => data.iter().map(|&b| b as f64).collect(),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            (
                name,
                Golden {
                    shape: view.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

impl Golden {
    /// As an int tensor of rank 2.
    pub fn int2<Bk: Backend>(&self, device: &Bk::Device) -> Tensor<Bk, 2, Int> {
        let data: Vec<i64> = self.values.iter().map(|v| *v as i64).collect();
        Tensor::from_data(
            TensorData::new(data, [self.shape[0], self.shape[1]]),
            device,
        )
    }
}
