//! Sharded checkpoints: every rank of a parallel run writes only the tensors it owns, and one
//! manifest says where each tensor's pieces are.
//!
//! A checkpoint directory holds `params-rank-{r}.safetensors` and `optimizer-rank-{r}.safetensors`
//! for the ranks that own something, and `manifest.json` ([`Manifest`]): for every tensor its
//! whole shape and its pieces — one file, or one file per tensor-parallel rank with the block
//! layout that puts the pieces back together ([`collie_core::dist::join_blocks`]). Tensors are
//! named by parameter path (`layers.3.attn.q_proj.weight`, in the model's own layout) and
//! optimizer state by its key (`{path}.{slot}`). Each rank describes its files in
//! `rank-{r}.json` ([`RankWriter`]); once every rank has written, one process [`merge`]s them
//! into the manifest, checking that every tensor is complete and written once.
//!
//! [`ShardedSource`] reads a tensor back whole, assembling its pieces, so a run at any layout
//! (or `collie convert`) loads it through the ordinary loaders.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoError, Result};
use crate::json::{read_json, write_json};
use crate::module::{HostTensor, TensorSource};
use crate::safetensors::{write_safetensors_with, SafetensorsSource, SaveDtype};

/// File name of the manifest; its presence marks a sharded checkpoint.
pub const MANIFEST: &str = "manifest.json";

/// Version of the manifest layout this crate writes and reads.
pub const FORMAT: u32 = 1;

/// What the parameters of a sharded checkpoint are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every parameter of the model.
    Model,
    /// Only the trainable parameters of a PEFT adapter (the base comes from
    /// `adapter_config.json`'s `base_model_name_or_path`).
    Adapter,
}

/// Which tensors of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Model parameters.
    Params,
    /// Optimizer state.
    Optimizer,
}

impl Part {
    fn file(self, rank: usize) -> String {
        match self {
            Part::Params => format!("params-rank-{rank}.safetensors"),
            Part::Optimizer => format!("optimizer-rank-{rank}.safetensors"),
        }
    }
}

/// How a tensor-parallel piece fits into its whole tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// The dimension split.
    pub dim: usize,
    /// Consecutive parts of that dimension each split on its own (fused gate|up: 2).
    pub parts: usize,
    /// This piece's index among the pieces.
    pub index: usize,
    /// Number of pieces.
    pub count: usize,
    /// The shape of one piece as a block of the whole (the parameter shard's shape; optimizer
    /// state stores it flattened).
    pub block: Vec<usize>,
}

/// One stored piece of a tensor, named as the tensor in `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The safetensors file, relative to the checkpoint directory.
    pub file: String,
    /// `None`: the piece is the whole tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// A tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The whole tensor's shape.
    pub shape: Vec<usize>,
    /// Its pieces (one, or one per tensor-parallel rank in index order).
    pub pieces: Vec<Piece>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// What the parameters are.
    pub kind: Kind,
    /// Processes of the run that wrote it.
    pub world_size: usize,
    /// Model parameters by path.
    pub params: BTreeMap<String, Entry>,
    /// Optimizer state by key.
    pub optimizer: BTreeMap<String, Entry>,
}

impl Manifest {
    /// Reads `dir/manifest.json`, checking its format version.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let manifest: Manifest = read_json(&path)?;
        if manifest.format != FORMAT {
            return Err(IoError::invalid(
                &path,
                format!(
                    "manifest format {} (this build reads {FORMAT})",
                    manifest.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// The tensors of `part`.
    pub fn entries(&self, part: Part) -> &BTreeMap<String, Entry> {
        match part {
            Part::Params => &self.params,
            Part::Optimizer => &self.optimizer,
        }
    }
}

/// Whether `dir` is a sharded checkpoint.
pub fn is_sharded(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// A tensor one rank writes: its stored values' shape, the whole tensor's shape, and how the
/// piece fits in when it is a tensor-parallel shard.
#[derive(Debug, Clone)]
pub struct ShardTensor {
    /// Parameter path or optimizer-state key.
    pub name: String,
    /// Shape of the values stored.
    pub shape: Vec<usize>,
    /// The whole tensor's shape.
    pub whole: Vec<usize>,
    /// `None` when the stored values are the whole tensor.
    pub split: Option<Split>,
}

/// `rank-{r}.json`: what one rank wrote, merged into the manifest.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RankPart {
    tensors: BTreeMap<Part, BTreeMap<String, Entry>>,
    /// The caller's per-rank data (optimizer step counters), handed back by [`merge`].
    meta: serde_json::Value,
}

/// One rank's files of a sharded checkpoint.
pub struct RankWriter {
    dir: PathBuf,
    rank: usize,
    part: RankPart,
}

impl RankWriter {
    /// A writer of rank `rank` into the (partial) checkpoint directory `dir`.
    pub fn new(dir: &Path, rank: usize) -> Self {
        RankWriter {
            dir: dir.to_path_buf(),
            rank,
            part: RankPart::default(),
        }
    }

    /// Writes this rank's file of `part` (nothing when `tensors` is empty), asking `data` for
    /// tensor `i`'s values when it is written (see [`write_safetensors_with`]).
    pub fn write(
        &mut self,
        part: Part,
        tensors: &[ShardTensor],
        data: impl FnMut(usize) -> Result<Vec<f32>>,
    ) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let file = part.file(self.rank);
        let layout: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        write_safetensors_with(&self.dir.join(&file), &layout, SaveDtype::F32, data)?;
        let entries = self.part.tensors.entry(part).or_default();
        for t in tensors {
            let piece = Piece {
                file: file.clone(),
                split: t.split.clone(),
            };
            entries.insert(
                t.name.clone(),
                Entry {
                    shape: t.whole.clone(),
                    pieces: vec![piece],
                },
            );
        }
        Ok(())
    }

    /// Writes `rank-{r}.json` with `meta` beside the files: this rank is done.
    pub fn finish(mut self, meta: serde_json::Value) -> Result<()> {
        self.part.meta = meta;
        write_json(
            &self.dir.join(format!("rank-{}.json", self.rank)),
            &self.part,
        )
    }
}

/// Merges the `rank-{r}.json` of ranks `0..world_size` in `dir` into `manifest.json` (and removes
/// them), checking that each tensor was written exactly once, or once per tensor-parallel piece
/// with every piece present. Returns the manifest and each rank's `meta`.
pub fn merge(
    dir: &Path,
    world_size: usize,
    kind: Kind,
) -> Result<(Manifest, Vec<serde_json::Value>)> {
    let mut manifest = Manifest {
        format: FORMAT,
        kind,
        world_size,
        params: BTreeMap::new(),
        optimizer: BTreeMap::new(),
    };
    let mut metas = Vec::with_capacity(world_size);
    for r in 0..world_size {
        let path = dir.join(format!("rank-{r}.json"));
        let part: RankPart = read_json(&path)?;
        for (which, tensors) in part.tensors {
            let all = match which {
                Part::Params => &mut manifest.params,
                Part::Optimizer => &mut manifest.optimizer,
            };
            for (name, entry) in tensors {
                match all.get_mut(&name) {
                    None => {
                        all.insert(name, entry);
                    }
                    Some(have) if have.shape == entry.shape => have.pieces.extend(entry.pieces),
                    Some(have) => {
                        return Err(IoError::invalid(
                            &path,
                            format!(
                                "`{name}` has whole shape {:?} here and {:?} from another rank",
                                entry.shape, have.shape
                            ),
                        ))
                    }
                }
            }
        }
        metas.push(part.meta);
    }
    for entries in [&mut manifest.params, &mut manifest.optimizer] {
        for (name, entry) in entries.iter_mut() {
            entry
                .pieces
                .sort_by_key(|p| p.split.as_ref().map_or(0, |s| s.index));
            check_pieces(name, entry).map_err(|m| IoError::invalid(dir, m))?;
        }
    }
    write_json(&dir.join(MANIFEST), &manifest)?;
    for r in 0..world_size {
        let path = dir.join(format!("rank-{r}.json"));
        std::fs::remove_file(&path).map_err(|e| IoError::io(&path, e))?;
    }
    Ok((manifest, metas))
}

/// Whether `entry`'s pieces (sorted by index) make up the whole tensor exactly once.
fn check_pieces(name: &str, entry: &Entry) -> std::result::Result<(), String> {
    let files = || {
        entry
            .pieces
            .iter()
            .map(|p| p.file.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let whole: usize = entry.shape.iter().product();
    match entry.pieces.first().and_then(|p| p.split.as_ref()) {
        None if entry.pieces.len() == 1 => Ok(()),
        None => Err(format!("`{name}` was written more than once ({})", files())),
        Some(first) => {
            let n: usize = first.block.iter().product();
            let ok = entry.pieces.len() == first.count
                && n * first.count == whole
                && entry.pieces.iter().enumerate().all(|(i, p)| {
                    p.split.as_ref().is_some_and(|s| {
                        s.index == i
                            && s.count == first.count
                            && s.block == first.block
                            && (s.dim, s.parts) == (first.dim, first.parts)
                    })
                });
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "`{name}`: the pieces in {} do not make up one whole tensor of shape {:?}",
                    files(),
                    entry.shape
                ))
            }
        }
    }
}

/// The tensors of one part of a sharded checkpoint, each read whole (its pieces joined).
///
/// Opening checks the manifest against the files: every file it names exists and is a complete
/// safetensors file holding every piece with the right number of values, so a missing or
/// truncated shard is an error naming it before anything is loaded.
pub struct ShardedSource {
    dir: PathBuf,
    entries: BTreeMap<String, Entry>,
    files: HashMap<String, SafetensorsSource>,
}

impl ShardedSource {
    /// Opens `part` of the sharded checkpoint `dir`.
    pub fn open(dir: &Path, part: Part) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let entries = manifest.entries(part).clone();
        let mut files = HashMap::new();
        for (name, entry) in &entries {
            check_pieces(name, entry).map_err(|m| IoError::invalid(dir.join(MANIFEST), m))?;
            for piece in &entry.pieces {
                if !files.contains_key(&piece.file) {
                    let source = SafetensorsSource::open(&dir.join(&piece.file))?;
                    files.insert(piece.file.clone(), source);
                }
                let stored = files[&piece.file].shape(name);
                let want = piece.split.as_ref().map_or(&entry.shape, |s| &s.block);
                let size = |s: &[usize]| s.iter().product::<usize>();
                if stored.as_ref().is_none_or(|s| size(s) != size(want)) {
                    return Err(IoError::invalid(
                        dir.join(&piece.file),
                        format!(
                            "{MANIFEST} puts `{name}` ({} values) here, but the file has {}",
                            size(want),
                            stored.map_or("no such tensor".into(), |s| format!("{s:?}"))
                        ),
                    ));
                }
                files[&piece.file].check(name)?;
            }
        }
        Ok(ShardedSource {
            dir: dir.to_path_buf(),
            entries,
            files,
        })
    }
}

impl TensorSource for ShardedSource {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.entries.get(key).map(|e| e.shape.clone())
    }

    fn read(&self, key: &str) -> Result<HostTensor> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| IoError::invalid(&self.dir, format!("no tensor `{key}`")))?;
        let first = &entry.pieces[0];
        let Some(split) = &first.split else {
            let t = self.files[&first.file].read(key)?;
            return Ok(HostTensor::new(entry.shape.clone(), t.data));
        };
        let mut all = Vec::with_capacity(entry.shape.iter().product());
        for piece in &entry.pieces {
            all.extend(self.files[&piece.file].read(key)?.data);
        }
        let whole = collie_core::dist::join_blocks(
            &all,
            &split.block,
            (split.dim, split.parts),
            split.count,
        );
        Ok(HostTensor::new(entry.shape.clone(), whole))
    }

    fn check(&self, key: &str) -> Result<()> {
        match self.entries.contains_key(key) {
            true => Ok(()),
            false => Err(IoError::invalid(&self.dir, format!("no tensor `{key}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[usize], whole: &[usize], split: Option<Split>) -> ShardTensor {
        ShardTensor {
            name: name.into(),
            shape: shape.to_vec(),
            whole: whole.to_vec(),
            split,
        }
    }

    #[test]
    fn pieces_written_by_two_ranks_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        // A [2, 4] weight split by columns over two ranks, and a bias only rank 0 writes.
        let whole: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let split = |index| Split {
            dim: 1,
            parts: 1,
            index,
            count: 2,
            block: vec![2, 2],
        };
        for r in 0..2 {
            let part = collie_core::dist::split_block(&whole, &[2, 2], (1, 1), r, 2);
            let mut tensors = vec![tensor("w", &[2, 2], &[2, 4], Some(split(r)))];
            let mut data = vec![part];
            if r == 0 {
                tensors.push(tensor("b", &[3], &[3], None));
                data.push(vec![1.0, 2.0, 3.0]);
            }
            let mut w = RankWriter::new(dir.path(), r);
            w.write(Part::Params, &tensors, |i| Ok(data[i].clone()))
                .unwrap();
            w.finish(serde_json::json!({ "rank": r })).unwrap();
        }
        let (manifest, metas) = merge(dir.path(), 2, Kind::Model).unwrap();
        assert_eq!(manifest.params["w"].pieces.len(), 2);
        assert_eq!(metas[1]["rank"], 1);
        let source = ShardedSource::open(dir.path(), Part::Params).unwrap();
        assert_eq!(source.keys(), ["b", "w"]);
        let w = source.read("w").unwrap();
        assert_eq!((w.shape, w.data), (vec![2, 4], whole));
        assert_eq!(source.read("b").unwrap().data, [1.0, 2.0, 3.0]);
        assert!(ShardedSource::open(dir.path(), Part::Optimizer)
            .unwrap()
            .keys()
            .is_empty());
    }

    #[test]
    fn a_tensor_written_twice_or_a_missing_piece_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for r in 0..2 {
            let mut w = RankWriter::new(dir.path(), r);
            let t = [tensor("b", &[2], &[2], None)];
            w.write(Part::Params, &t, |_| Ok(vec![0.0; 2])).unwrap();
            w.finish(serde_json::Value::Null).unwrap();
        }
        let err = merge(dir.path(), 2, Kind::Model).unwrap_err().to_string();
        assert!(err.contains("`b` was written more than once"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let mut w = RankWriter::new(dir.path(), 0);
        let split = Split {
            dim: 0,
            parts: 1,
            index: 0,
            count: 2,
            block: vec![1],
        };
        let t = [tensor("b", &[1], &[2], Some(split))];
        w.write(Part::Params, &t, |_| Ok(vec![0.0])).unwrap();
        w.finish(serde_json::Value::Null).unwrap();
        let err = merge(dir.path(), 1, Kind::Model).unwrap_err().to_string();
        assert!(err.contains("do not make up one whole tensor"), "{err}");
    }

    #[test]
    fn a_missing_or_truncated_shard_is_named_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        for r in 0..2 {
            let mut w = RankWriter::new(dir.path(), r);
            let t = [tensor(&format!("t{r}"), &[64], &[64], None)];
            w.write(Part::Params, &t, |_| Ok(vec![1.0; 64])).unwrap();
            w.finish(serde_json::Value::Null).unwrap();
        }
        merge(dir.path(), 2, Kind::Model).unwrap();
        let file = dir.path().join("params-rank-1.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
        let err = ShardedSource::open(dir.path(), Part::Params)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("params-rank-1.safetensors"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = ShardedSource::open(dir.path(), Part::Params)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("params-rank-1.safetensors"), "{err}");
    }
}
