//! Example order, batching and packing.
//!
//! The loader's whole state is one counter — examples consumed — so a checkpoint stores a number
//! and a resumed run reads exactly what the uninterrupted run would have read. Each epoch is a
//! seeded permutation of the file (or file order without shuffling); data-parallel rank `r` of
//! `w` takes every `w`-th example of it.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::dataset::{DataError, Example, JsonlDataset, IGNORE};

/// Which example comes `k`-th.
#[derive(Debug, Clone)]
pub struct Order {
    n: usize,
    seed: u64,
    shuffle: bool,
    rank: usize,
    world: usize,
    cache: Option<(u64, Vec<u32>)>,
}

impl Order {
    /// Order over `n` examples for data-parallel `rank` of `world`.
    pub fn new(n: usize, seed: u64, shuffle: bool, rank: usize, world: usize) -> Self {
        assert!(
            world >= 1 && rank < world && n >= world,
            "rank/world/n out of range"
        );
        Order {
            n,
            seed,
            shuffle,
            rank,
            world,
            cache: None,
        }
    }

    /// Examples per epoch on this rank.
    pub fn local_len(&self) -> usize {
        (self.n - self.rank).div_ceil(self.world)
    }

    /// Dataset index of the `k`-th example this rank consumes.
    pub fn index(&mut self, k: u64) -> usize {
        let local = self.local_len() as u64;
        let (epoch, within) = (k / local, (k % local) as usize);
        let pos = within * self.world + self.rank;
        if !self.shuffle {
            return pos;
        }
        if self.cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<u32> = (0..self.n as u32).collect();
            // One stream per epoch: (seed, epoch) → permutation, independent of earlier epochs.
            let mut rng =
                StdRng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            perm.shuffle(&mut rng);
            self.cache = Some((epoch, perm));
        }
        self.cache.as_ref().expect("cached").1[pos] as usize
    }
}

/// A micro-batch ready for the model, row-major `[rows, cols]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids (padding: 0).
    pub input_ids: Vec<i64>,
    /// Targets (`-100` = none), HF-aligned: position `t − 1` predicts `labels[t]`.
    pub labels: Vec<i64>,
    /// Document of each token: 1, 2, … within a row; 0 = padding.
    pub segments: Vec<i64>,
    /// Position of each token inside its document.
    pub positions: Vec<i64>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl Batch {
    /// The labels a causal LM predicts, `labels[:, 1:]` row by row (`rows · (cols − 1)` values).
    pub fn shifted_labels(&self) -> impl Iterator<Item = i64> + '_ {
        (0..self.rows).flat_map(|r| {
            self.labels[r * self.cols + 1..(r + 1) * self.cols]
                .iter()
                .copied()
        })
    }

    /// Tokens that carry loss (labels other than `-100` after the first column).
    pub fn target_tokens(&self) -> usize {
        self.shifted_labels().filter(|&l| l != IGNORE).count()
    }

    /// Non-padding tokens.
    pub fn real_tokens(&self) -> usize {
        self.segments.iter().filter(|&&s| s != 0).count()
    }

    /// Whether any row holds more than one document.
    pub fn packed(&self) -> bool {
        self.segments.iter().any(|&s| s > 1)
    }

    /// Whether any token is padding.
    pub fn padded(&self) -> bool {
        self.segments.contains(&0)
    }
}

/// One row per example, right-padded to the longest (pad id 0, label `-100`).
pub fn collate(examples: &[Example]) -> Batch {
    let rows: Vec<Vec<&Example>> = examples.iter().map(|e| vec![e]).collect();
    pack_rows(
        &rows,
        examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0),
    )
}

/// Rows of one or more documents each, right-padded to `cols`. Within a row, each document gets
/// its own segment id and positions from 0, and its first label is dropped: in the unpacked
/// batch nothing predicts a document's first token either.
pub fn pack_rows(rows: &[Vec<&Example>], cols: usize) -> Batch {
    let n = rows.len() * cols;
    let mut b = Batch {
        input_ids: vec![0; n],
        labels: vec![IGNORE; n],
        segments: vec![0; n],
        positions: vec![0; n],
        rows: rows.len(),
        cols,
    };
    for (r, docs) in rows.iter().enumerate() {
        let mut t = r * cols;
        for (d, ex) in docs.iter().enumerate() {
            for (p, (&id, &label)) in ex.input_ids.iter().zip(&ex.labels).enumerate() {
                b.input_ids[t] = id as i64;
                b.labels[t] = if p == 0 && d > 0 { IGNORE } else { label };
                b.segments[t] = d as i64 + 1;
                b.positions[t] = p as i64;
                t += 1;
            }
        }
    }
    b
}

/// Streams micro-batches from a dataset in [`Order`].
pub struct DataLoader {
    dataset: JsonlDataset,
    order: Order,
    /// Examples consumed so far (the loader's whole state).
    pub consumed: u64,
    micro_batch_size: usize,
    pack_to: Option<usize>,
}

impl DataLoader {
    /// A loader of `micro_batch_size` rows; with `pack_to = Some(seq_len)` each row is filled with
    /// as many whole documents as fit in `seq_len` tokens.
    pub fn new(
        dataset: JsonlDataset,
        order: Order,
        micro_batch_size: usize,
        pack_to: Option<usize>,
    ) -> Self {
        DataLoader {
            dataset,
            order,
            consumed: 0,
            micro_batch_size,
            pack_to,
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &JsonlDataset {
        &self.dataset
    }

    fn example(&mut self, k: u64) -> Result<Example, DataError> {
        let i = self.order.index(k);
        self.dataset.get(i)
    }

    /// The next micro-batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let Some(cols) = self.pack_to else {
            let mut examples = Vec::with_capacity(self.micro_batch_size);
            for _ in 0..self.micro_batch_size {
                examples.push(self.example(self.consumed)?);
                self.consumed += 1;
            }
            return Ok(collate(&examples));
        };
        let mut rows: Vec<Vec<Example>> = vec![Vec::new()];
        let mut used = 0;
        loop {
            let ex = self.example(self.consumed)?;
            let len = ex.input_ids.len();
            if used + len > cols && used > 0 {
                if rows.len() == self.micro_batch_size {
                    // Does not fit: it opens the next micro-batch (not consumed yet).
                    break;
                }
                rows.push(Vec::new());
                used = 0;
            }
            used += len;
            rows.last_mut().expect("a row").push(ex);
            self.consumed += 1;
        }
        let refs: Vec<Vec<&Example>> = rows.iter().map(|r| r.iter().collect()).collect();
        Ok(pack_rows(&refs, cols))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshuffled_order_wraps_in_file_order() {
        let mut o = Order::new(5, 0, false, 0, 1);
        let idx: Vec<usize> = (0..7).map(|k| o.index(k)).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 0, 1]);
    }

    #[test]
    fn shuffled_epochs_are_permutations_and_seeded() {
        let mut a = Order::new(50, 7, true, 0, 1);
        let mut b = Order::new(50, 7, true, 0, 1);
        let e0: Vec<usize> = (0..50).map(|k| a.index(k)).collect();
        let e1: Vec<usize> = (50..100).map(|k| a.index(k)).collect();
        assert_eq!(e0, (0..50).map(|k| b.index(k)).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(e0, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_split_an_epoch() {
        let mut r0 = Order::new(7, 3, true, 0, 2);
        let mut r1 = Order::new(7, 3, true, 1, 2);
        let mut all: Vec<usize> = (0..r0.local_len() as u64).map(|k| r0.index(k)).collect();
        all.extend((0..r1.local_len() as u64).map(|k| r1.index(k)));
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn packing_restarts_positions_and_drops_first_labels() {
        let a = Example {
            input_ids: vec![5, 6, 7],
            labels: vec![5, 6, 7],
        };
        let b = Example {
            input_ids: vec![8, 9],
            labels: vec![-100, 9],
        };
        let batch = pack_rows(&[vec![&a, &b]], 6);
        assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 9, 0]);
        assert_eq!(batch.segments, vec![1, 1, 1, 2, 2, 0]);
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 1, 0]);
        assert_eq!(batch.labels, vec![5, 6, 7, -100, 9, -100]);
        assert_eq!(batch.target_tokens(), 3);
        assert_eq!(collate(&[a, b]).target_tokens(), 3);
    }
}
