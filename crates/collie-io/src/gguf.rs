//! GGUF files (llama.cpp's format): metadata, and tensors dequantized to `f32`.
//!
//! Parsing and dequantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants) come
//! from the `rlx-gguf` crate; this module adds typed metadata access, truncation checks and the
//! [`TensorSource`] view in PyTorch's dimension order. [`GgufOut`] writes GGUF files (tensors in
//! F32 or one of [`crate::quant`]'s types). Mapping tensor names to a model, and llama.cpp's q/k
//! row permutation, is the model adapter's job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use rlx_gguf::MetaValue;
use rlx_gguf::{GgmlType, GgufFile, GgufWriter};

use crate::error::{IoError, Result};
use crate::module::{HostTensor, TensorSource};
use crate::quant::{quantize, QuantType};

/// An open, memory-mapped GGUF file.
pub struct GgufSource {
    path: PathBuf,
    file: GgufFile,
}

impl GgufSource {
    /// Opens and validates `path`: header, metadata, and that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |message: String| IoError::Gguf {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(IoError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let file = GgufFile::from_path_mmap(path)
            .map_err(|e| err(format!("not a readable GGUF file ({e:#})")))?;
        if !(2..=3).contains(&file.version) {
            return Err(err(format!(
                "GGUF version {} is not supported (2 or 3 expected)",
                file.version
            )));
        }
        let mut names: Vec<&String> = file.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &file.tensors[name];
            file.tensor_bytes(t)
                .map_err(|e| err(format!("truncated or corrupt: tensor `{name}`: {e:#}")))?;
        }
        Ok(GgufSource {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, MetaValue> {
        &self.file.metadata
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.file.metadata.get(key)
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    /// An unsigned integer value (any integer width).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            MetaValue::U8(v) => Some(*v as u64),
            MetaValue::U16(v) => Some(*v as u64),
            MetaValue::I8(v) if *v >= 0 => Some(*v as u64),
            MetaValue::I16(v) if *v >= 0 => Some(*v as u64),
            MetaValue::I32(v) if *v >= 0 => Some(*v as u64),
            v => v.as_u64(),
        }
    }

    /// A float value (`f32` values are widened exactly, as Python's reader does).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            MetaValue::F32(v) => Some(*v as f64),
            MetaValue::F64(v) => Some(*v),
            _ => self.get_u64(key).map(|v| v as f64),
        }
    }

    /// A boolean value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(MetaValue::as_str)
            .collect()
    }

    /// An array of integers.
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(|v| match v {
                MetaValue::I8(x) => Some(*x as i64),
                MetaValue::U8(x) => Some(*x as i64),
                MetaValue::I16(x) => Some(*x as i64),
                MetaValue::U16(x) => Some(*x as i64),
                MetaValue::I32(x) => Some(*x as i64),
                MetaValue::U32(x) => Some(*x as i64),
                MetaValue::I64(x) => Some(*x),
                MetaValue::U64(x) => Some(*x as i64),
                _ => None,
            })
            .collect()
    }

    /// An array of floats.
    pub fn get_f64_array(&self, key: &str) -> Option<Vec<f64>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(|v| match v {
                MetaValue::F32(x) => Some(*x as f64),
                MetaValue::F64(x) => Some(*x),
                _ => None,
            })
            .collect()
    }

    /// A required unsigned integer, or an error naming the key.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key).ok_or_else(|| self.missing(key))
    }

    /// A required float, or an error naming the key.
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.get_f64(key).ok_or_else(|| self.missing(key))
    }

    /// A required string, or an error naming the key.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key).ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &str) -> IoError {
        IoError::Gguf {
            path: self.path.clone(),
            message: format!("metadata key `{key}` is missing or has the wrong type"),
        }
    }

    /// Name of the stored type of `key` (`Q4_1`, `F32`, ...).
    pub fn tensor_type(&self, key: &str) -> Option<String> {
        self.file.get(key).map(|t| format!("{:?}", t.dtype))
    }

    /// The `tokenizer.*` metadata keys as stored, by name (what a GGUF writer copies).
    pub fn tokenizer_keys(&self) -> Vec<(String, MetaValue)> {
        let mut keys: Vec<(String, MetaValue)> = self
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys
    }

    /// Storage type, GGML shape (innermost first) and bytes of tensor `key`, as stored.
    pub fn raw(&self, key: &str) -> Result<(GgmlType, Vec<usize>, &[u8])> {
        let err = |message: String| IoError::Gguf {
            path: self.path.clone(),
            message,
        };
        let t = self
            .file
            .get(key)
            .ok_or_else(|| err(format!("no tensor `{key}`")))?;
        let bytes = self
            .file
            .tensor_bytes(t)
            .map_err(|e| err(format!("tensor `{key}`: {e:#}")))?;
        Ok((t.dtype, t.shape.clone(), bytes))
    }

    /// Whether the file stores `key` in a block-quantized type.
    pub fn is_quantized(&self, key: &str) -> bool {
        self.file.get(key).is_some_and(|t| {
            !matches!(
                t.dtype,
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::F64
            )
        })
    }
}

impl TensorSource for GgufSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.file.keys().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// GGML lists dimensions innermost first; this returns them outermost first, as PyTorch does.
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.file
            .get(key)
            .map(|t| t.shape.iter().rev().copied().collect())
    }

    fn read(&self, key: &str) -> Result<HostTensor> {
        let (data, ggml_shape) = self.file.dequant_f32(key).map_err(|e| IoError::Gguf {
            path: self.path.clone(),
            message: format!("cannot dequantize tensor `{key}`: {e:#}"),
        })?;
        Ok(HostTensor::new(
            ggml_shape.into_iter().rev().collect(),
            data,
        ))
    }
}

/// A GGUF file being assembled: metadata and tensors, written at once by [`GgufOut::write`].
pub struct GgufOut {
    writer: GgufWriter,
}

impl GgufOut {
    /// An empty file of architecture `arch` (`general.architecture`).
    pub fn new(arch: &str) -> Self {
        let mut writer = GgufWriter::new();
        writer.set_arch(arch);
        GgufOut { writer }
    }

    /// Sets metadata `key`.
    pub fn set(&mut self, key: &str, value: MetaValue) {
        self.writer.set_meta(key, value);
    }

    /// Sets a string-array key (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn set_strings<S: AsRef<str>>(&mut self, key: &str, items: &[S]) {
        let items = items
            .iter()
            .map(|s| MetaValue::String(s.as_ref().to_string()))
            .collect();
        self.set(key, MetaValue::Array(items));
    }

    /// Adds tensor `name` of PyTorch shape `shape` (outermost first) holding `data`, stored as
    /// `ty` (F32 when `None`). Rows (the innermost dimension) must be a whole number of the
    /// type's blocks.
    pub fn add(
        &mut self,
        name: &str,
        shape: &[usize],
        data: &[f32],
        ty: Option<QuantType>,
    ) -> Result<()> {
        let err = |message: String| IoError::Gguf {
            path: PathBuf::from(name),
            message,
        };
        if shape.iter().product::<usize>() != data.len() {
            return Err(err(format!(
                "shape {shape:?} does not hold {} values",
                data.len()
            )));
        }
        let row = shape.last().copied().unwrap_or(1);
        let (dtype, bytes) = match ty {
            None => (
                GgmlType::F32,
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Some(ty) => {
                if row % ty.block_len() != 0 {
                    return Err(err(format!(
                        "rows of {row} values cannot be stored as {} (blocks of {})",
                        ty.name(),
                        ty.block_len()
                    )));
                }
                (ty.ggml(), quantize(data, ty))
            }
        };
        let ggml_shape = shape.iter().rev().copied().collect();
        self.writer
            .add_tensor_bytes(name, ggml_shape, dtype, bytes)
            .map_err(|e| err(format!("{e:#}")))
    }

    /// Writes the file to `path`: into a temporary file beside it, renamed into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let name = path
            .file_name()
            .map_or_else(|| "out.gguf".into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.partial"));
        let result = self.writer.write_to_path(&tmp).map_err(|e| IoError::Gguf {
            path: path.to_path_buf(),
            message: format!("cannot write: {e:#}"),
        });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(|e| IoError::io(path, e))
    }
}
