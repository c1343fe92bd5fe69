//! HF safetensors checkpoints: one file, or shards listed by `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{IoError, Result};
use crate::json::read_json;
use crate::module::{HostTensor, TensorSource};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    data_start: usize,
}

/// A safetensors checkpoint, read tensor by tensor: each read copies that tensor's bytes from the
/// file (not through a memory map, whose pages would count in the process's resident memory for
/// as long as the checkpoint is open).
pub struct SafetensorsSource {
    desc: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsSource {
    /// Opens `path`: a `.safetensors` file, an index `.json`, or a directory holding either.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            let single = path.join(SINGLE_FILE);
            return if index.is_file() {
                Self::open_index(&index)
            } else if single.is_file() {
                Self::open_files(&single, std::slice::from_ref(&single))
            } else {
                Err(IoError::invalid(
                    path,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
                ))
            };
        }
        if path.extension().is_some_and(|e| e == "json") {
            Self::open_index(path)
        } else {
            Self::open_files(path, &[path.to_path_buf()])
        }
    }

    fn open_index(index: &Path) -> Result<Self> {
        let parsed: Index = read_json(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        let source = Self::open_files(index, &files)?;
        for (key, file) in &parsed.weight_map {
            match source.tensors.get(key) {
                Some((i, _)) if source.shards[*i].path == dir.join(file) => {}
                _ => {
                    return Err(IoError::invalid(
                        index,
                        format!("the index puts `{key}` in {file}, which does not contain it"),
                    ))
                }
            }
        }
        Ok(source)
    }

    fn open_files(desc: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| IoError::io(path, e))?;
            // SAFETY: read-only map of a file we do not modify; a checkpoint changed underneath a
            // running load is outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| IoError::io(path, e))?;
            let bad = |e: safetensors::SafeTensorError| IoError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            };
            // `deserialize` checks that the header's offsets cover exactly the bytes present,
            // which is what catches a truncated download.
            SafeTensors::deserialize(&map).map_err(bad)?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(bad)?;
            for (name, info) in metadata.tensors() {
                tensors.insert(name, (i, info.clone()));
            }
            shards.push(Shard {
                path: path.clone(),
                data_start: 8 + header_len,
            });
        }
        Ok(SafetensorsSource {
            desc: desc.to_path_buf(),
            shards,
            tensors,
        })
    }
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        self.desc.display().to_string()
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.tensors.keys().cloned().collect();
        keys.sort();
        keys
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|(_, info)| info.shape.clone())
    }

    fn read(&self, key: &str) -> Result<HostTensor> {
        let (shard, info) = self.entry(key)?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        let read = |bytes: &mut [u8]| -> std::io::Result<()> {
            let mut file = std::fs::File::open(&shard.path)?;
            file.seek(SeekFrom::Start((shard.data_start + start) as u64))?;
            file.read_exact(bytes)
        };
        read(&mut bytes).map_err(|e| IoError::io(&shard.path, e))?;
        let data = decode(&bytes, info.dtype).expect("dtype checked by entry");
        Ok(HostTensor::new(info.shape.clone(), data))
    }

    fn check(&self, key: &str) -> Result<()> {
        self.entry(key).map(|_| ())
    }

    fn reads_blocks(&self) -> bool {
        true
    }

    /// Reads only the byte ranges of the block: whole rows for dimension 0, each row's pieces
    /// for dimension 1 (positioned reads, the file's other bytes never read).
    fn read_block(&self, key: &str, dim: usize, ranges: &[Range<usize>]) -> Result<HostTensor> {
        use std::os::unix::fs::FileExt;
        let (shard, info) = self.entry(key)?;
        let shape = &info.shape;
        let (rows, cols) = match shape.len() {
            1 => (shape[0], 1),
            2 => (shape[0], shape[1]),
            n => {
                return Err(IoError::invalid(
                    &shard.path,
                    format!("a slice of `{key}` asked of a {n}-D tensor"),
                ))
            }
        };
        let size = info.dtype.bitsize() / 8;
        let base = (shard.data_start + info.data_offsets.0) as u64;
        // (first element, element count) of every run of bytes to read, in order.
        let runs: Vec<(usize, usize)> = match dim {
            0 => ranges
                .iter()
                .map(|r| (r.start * cols, r.len() * cols))
                .collect(),
            _ => (0..rows)
                .flat_map(|row| ranges.iter().map(move |r| (row * cols + r.start, r.len())))
                .collect(),
        };
        let file = std::fs::File::open(&shard.path).map_err(|e| IoError::io(&shard.path, e))?;
        let mut bytes = vec![0u8; runs.iter().map(|r| r.1).sum::<usize>() * size];
        let mut at = 0;
        for (first, count) in runs {
            let n = count * size;
            file.read_exact_at(&mut bytes[at..at + n], base + (first * size) as u64)
                .map_err(|e| IoError::io(&shard.path, e))?;
            at += n;
        }
        let data = decode(&bytes, info.dtype).expect("dtype checked by entry");
        let mut shape = shape.clone();
        shape[dim] = ranges.iter().map(|r| r.len()).sum();
        Ok(HostTensor::new(shape, data))
    }
}

impl SafetensorsSource {
    /// The shard and header entry of `key`, whose dtype [`decode`] reads.
    fn entry(&self, key: &str) -> Result<(&Shard, &TensorInfo)> {
        let (i, info) = self
            .tensors
            .get(key)
            .ok_or_else(|| IoError::invalid(&self.desc, format!("no tensor `{key}`")))?;
        let shard = &self.shards[*i];
        match decode(&[], info.dtype) {
            Some(_) => Ok((shard, info)),
            None => Err(IoError::UnsupportedDtype {
                key: key.to_string(),
                path: shard.path.clone(),
                dtype: format!("{:?}", info.dtype),
            }),
        }
    }
}

/// Little-endian bytes of `dtype` → `f32`; `None` for non-float dtypes.
fn decode(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

/// Storage dtype of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    /// 32-bit floats (lossless for our `f32` parameters).
    #[default]
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl SaveDtype {
    /// The name HF uses in `config.json` (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::BF16 => "bfloat16",
        }
    }

    fn encode(self, data: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            SaveDtype::F32 => (
                Dtype::F32,
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            SaveDtype::F16 => (
                Dtype::F16,
                data.iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            SaveDtype::BF16 => (
                Dtype::BF16,
                data.iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

/// Writes `tensors` to `path` as one safetensors file with `{"format": "pt"}` metadata.
///
/// The file is written next to its destination and renamed into place.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: SaveDtype,
) -> Result<()> {
    let layout: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.shape.clone()))
        .collect();
    write_safetensors_with(path, &layout, dtype, |i| Ok(tensors[i].1.data.clone()))
}

/// [`save_safetensors`] of tensors read one at a time as the writer reaches them.
pub fn save_safetensors_lazy(
    path: &Path,
    tensors: &[crate::module::LazyTensor],
    dtype: SaveDtype,
) -> Result<()> {
    let layout: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    write_safetensors_with(path, &layout, dtype, |i| Ok(tensors[i].read().data))
}

/// Writes a safetensors file of the tensors `layout` names (in that order), asking `data` for
/// the values of tensor `i` only when its turn comes: a writer holds one tensor at a time, not
/// the file. `{"format": "pt"}` metadata; written next to `path` and renamed into place.
pub fn write_safetensors_with(
    path: &Path,
    layout: &[(String, Vec<usize>)],
    dtype: SaveDtype,
    mut data: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    use std::io::Write;
    let width = match dtype {
        SaveDtype::F32 => 4,
        SaveDtype::F16 | SaveDtype::BF16 => 2,
    };
    let name = match dtype {
        SaveDtype::F32 => "F32",
        SaveDtype::F16 => "F16",
        SaveDtype::BF16 => "BF16",
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (key, shape) in layout {
        let end = offset + shape.iter().product::<usize>() * width;
        let entry =
            serde_json::json!({ "dtype": name, "shape": shape, "data_offsets": [offset, end] });
        if header.insert(key.clone(), entry).is_some() {
            return Err(IoError::invalid(
                path,
                format!("tensor `{key}` given twice"),
            ));
        }
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
    // The data starts 8-byte aligned, as the safetensors writer pads it.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let tmp = path.with_extension("safetensors.partial");
    let mut write = || -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| IoError::io(&tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        let io = |e| IoError::io(&tmp, e);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&header).map_err(io)?;
        for (i, (key, shape)) in layout.iter().enumerate() {
            let values = data(i)?;
            if values.len() != shape.iter().product::<usize>() {
                return Err(IoError::invalid(
                    path,
                    format!(
                        "tensor `{key}` of shape {shape:?} has {} values",
                        values.len()
                    ),
                ));
            }
            out.write_all(&dtype.encode(&values).1).map_err(io)?;
        }
        out.into_inner()
            .map_err(|e| IoError::io(&tmp, e.into_error()))?
            .sync_all()
            .map_err(io)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| IoError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::TensorSource;

    #[test]
    fn blocks_read_from_the_file_equal_blocks_of_the_whole_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        // A bf16 [6, 8] matrix and an f32 vector of 10.
        let m: Vec<u8> = (0..48)
            .flat_map(|i| bf16::from_f32(i as f32 * 0.5 - 3.0).to_le_bytes())
            .collect();
        let v: Vec<u8> = (0..10)
            .flat_map(|i| (i as f32 * 1.5).to_le_bytes())
            .collect();
        let views = [
            (
                "m",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![6, 8], &m).unwrap(),
            ),
            (
                "v",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![10], &v).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let source = SafetensorsSource::open(&path).unwrap();
        assert!(source.reads_blocks());
        let ranges = [1..3, 4..6];
        for (key, dims) in [("m", &[0, 1][..]), ("v", &[0][..])] {
            let whole = source.read(key).unwrap();
            for &dim in dims {
                let block = source.read_block(key, dim, &ranges).unwrap();
                let want = whole.block(dim, &ranges);
                assert_eq!(block.shape, want.shape, "{key} dim {dim}");
                assert_eq!(block.data, want.data, "{key} dim {dim}");
            }
        }
        // Columns 1, 2, 4, 5 of row 1 of m: elements 9, 10, 12, 13.
        let cols = source.read_block("m", 1, &ranges).unwrap();
        assert_eq!(cols.shape, vec![6, 4]);
        let row1: Vec<f32> = [9, 10, 12, 13]
            .iter()
            .map(|&i| i as f32 * 0.5 - 3.0)
            .collect();
        assert_eq!(cols.data[4..8], row1[..]);
        assert!(source.read_block("nope", 0, &ranges).is_err());
    }
}
