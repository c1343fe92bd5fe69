//! What a training step sees: the candidates of each query (UDR's `EPRDataset.get_entry`) and the
//! task of each batch (√-size weighting).

use rand::seq::SliceRandom;
use rand::Rng;

/// How many candidates a step takes from a query's LM-sorted list, and from where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CandidateSampling {
    /// Candidates per query per step (UDR: 8).
    pub per_query: usize,
    /// Size of the top and bottom windows (UDR: 5).
    pub window: usize,
    /// Candidates drawn from the top window (UDR: 1; 2 for semantic parsing tasks).
    pub from_top: usize,
}

impl Default for CandidateSampling {
    fn default() -> Self {
        CandidateSampling {
            per_query: 8,
            window: 5,
            from_top: 1,
        }
    }
}

impl CandidateSampling {
    /// Positions (into a list of `n` candidates sorted best first) for one step, ascending, so
    /// the first is the in-batch positive and the order is the LM ranking: `from_top` from the
    /// first `window`, one from the last `window`, the rest from the middle. Lists too short for
    /// that give all their positions (shorter than `per_query` only when `n < per_query`).
    pub fn sample(&self, n: usize, rng: &mut impl Rng) -> Vec<usize> {
        let l = self.per_query;
        if n <= l {
            return (0..n).collect();
        }
        let w = self.window;
        let middle_len = n.saturating_sub(2 * w);
        let from_middle = l.saturating_sub(self.from_top + 1);
        if n < 2 * w || middle_len < from_middle {
            // Not enough room for the three windows: an even draw without replacement.
            let mut all: Vec<usize> = (0..n).collect();
            all.shuffle(rng);
            all.truncate(l);
            all.sort_unstable();
            return all;
        }
        let mut top: Vec<usize> = (0..w).collect();
        top.shuffle(rng);
        let mut mid: Vec<usize> = (w..n - w).collect();
        mid.shuffle(rng);
        let bottom = rng.random_range(n - w..n);
        let mut out: Vec<usize> = top[..self.from_top.min(w)]
            .iter()
            .chain(&mid[..from_middle])
            .copied()
            .collect();
        out.push(bottom);
        out.sort_unstable();
        out
    }
}

/// Sampling weights of tasks of sizes `sizes`: `√n_i / Σ √n_j` (the paper's α = 0.5; the
/// scripts' per-task rates come to the same).
pub fn task_weights(sizes: &[usize]) -> Vec<f64> {
    let roots: Vec<f64> = sizes.iter().map(|&n| (n as f64).sqrt()).collect();
    let total: f64 = roots.iter().sum();
    roots
        .iter()
        .map(|r| r / total.max(f64::MIN_POSITIVE))
        .collect()
}

/// An epoch's sequence of batch tasks: task `i` gets `round(batches · w_i)` batches (at least
/// one when it has data), in shuffled order.
pub fn batch_schedule(sizes: &[usize], batches: usize, rng: &mut impl Rng) -> Vec<usize> {
    let w = task_weights(sizes);
    let mut out = Vec::new();
    for (i, (&n, wi)) in sizes.iter().zip(&w).enumerate() {
        if n == 0 {
            continue;
        }
        let k = ((batches as f64 * wi).round() as usize).max(1);
        out.extend(std::iter::repeat_n(i, k));
    }
    out.shuffle(rng);
    out
}
