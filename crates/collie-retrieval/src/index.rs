//! Exact inner-product search (FAISS `IndexFlatIP`, which UDR used): the demonstration vectors in
//! one `[N, d]` tensor on the backend, queries scored in batches by one matmul each, top-k picked
//! per row (ties to the lower index). Saved as a safetensors file.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use collie_io::module::TensorSource;
use collie_io::safetensors::{save_safetensors, SafetensorsSource, SaveDtype};
use collie_io::{HostTensor, IoError};

/// Vectors searchable by inner product.
#[derive(Debug, Clone)]
pub struct DenseIndex<B: Backend> {
    /// `[N, d]`.
    pub vectors: Tensor<B, 2>,
}

/// Key of the vectors in a saved index.
const KEY: &str = "vectors";

impl<B: Backend> DenseIndex<B> {
    /// An index over `rows` (each of the same width).
    pub fn from_rows(rows: &[Vec<f32>], device: &B::Device) -> Self {
        let d = rows.first().map_or(0, Vec::len);
        let data: Vec<f32> = rows.iter().flatten().copied().collect();
        DenseIndex {
            vectors: Tensor::from_data(TensorData::new(data, [rows.len(), d]), device),
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.dims()[0]
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` highest inner products of every query, best first, skipping `exclude[i]` for
    /// query `i` when given (the query's own example).
    ///
    /// # Shapes
    /// - queries: `[M, d]`
    pub fn search(
        &self,
        queries: Tensor<B, 2>,
        k: usize,
        exclude: Option<&[usize]>,
    ) -> Vec<Vec<(usize, f32)>> {
        let [m, _] = queries.dims();
        let n = self.len();
        let mut out = Vec::with_capacity(m);
        // Rows per matmul: keeps the [rows, N] score block near 64 MiB.
        let step = ((1usize << 24) / n.max(1)).clamp(1, m.max(1));
        for start in (0..m).step_by(step) {
            let end = (start + step).min(m);
            let d = queries.dims()[1];
            let block = queries.clone().slice([start..end, 0..d]);
            // [rows, N]
            let scores: Vec<f32> = block
                .matmul(self.vectors.clone().transpose())
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 scores");
            for r in 0..end - start {
                let row = &scores[r * n..(r + 1) * n];
                let skip = exclude.map(|e| e[start + r]);
                out.push(top_k(row, k, skip));
            }
        }
        out
    }

    /// Writes the vectors to `path` (safetensors).
    pub fn save(&self, path: &Path) -> collie_io::Result<()> {
        let t = HostTensor::from_tensor(self.vectors.clone());
        save_safetensors(path, &[(KEY.to_string(), t)], SaveDtype::F32)
    }

    /// Reads an index written by [`DenseIndex::save`].
    pub fn load(path: &Path, device: &B::Device) -> collie_io::Result<Self> {
        let source = SafetensorsSource::open(path)?;
        let t = source
            .read(KEY)
            .map_err(|_| IoError::invalid(path, format!("no `{KEY}` tensor: not a dense index")))?;
        if t.shape.len() != 2 {
            return Err(IoError::invalid(
                path,
                format!("`{KEY}` has shape {:?}", t.shape),
            ));
        }
        Ok(DenseIndex {
            vectors: t.to_tensor(device),
        })
    }
}

/// Indices and values of the `k` largest entries of `row`, largest first, ties to the lower
/// index, `skip` left out.
pub fn top_k(row: &[f32], k: usize, skip: Option<usize>) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).filter(|&i| Some(i) != skip).collect();
    let k = k.min(idx.len());
    let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, row[i])).collect()
}
