//! Pipeline parallelism: which decoder layers each stage runs, and the 1F1B schedule.
//!
//! A stage is a contiguous run of blocks of the block contract (docs/architecture.md): the first stage also
//! runs the embedding, the last the head (final norm, LM head, loss). Partition methods follow
//! CoLLiE's: `uniform` (layers split as evenly as possible), `parameters` (balanced parameter
//! counts, embedding and head included), `type:<regex>` (balanced counts of the blocks whose path
//! — `embed`, `layers.N`, `head` — matches); each the cut whose heaviest stage is lightest.

use std::ops::Range;

use crate::error::DistError;

/// The layers of each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    /// `layers[s]`: the decoder layers of stage `s`.
    pub layers: Vec<Range<usize>>,
}

impl Stages {
    /// Splits `n_layers` decoder layers into `pp` stages by `method`; `block_params` gives the
    /// parameter count of each block in order `embed, layers.0 .. layers.N-1, head`.
    pub fn partition(method: &str, pp: usize, block_params: &[usize]) -> Result<Stages, DistError> {
        let n_layers = block_params.len().saturating_sub(2);
        if pp > n_layers {
            return Err(DistError::Layout(format!(
                "parallel.pp = {pp} stages for a model of {n_layers} decoder layers (at most one stage per layer)"
            )));
        }
        let names: Vec<String> = std::iter::once("embed".to_string())
            .chain((0..n_layers).map(|i| format!("layers.{i}")))
            .chain(std::iter::once("head".to_string()))
            .collect();
        // Weight of each block; stage boundaries fall between layers.
        let weights: Vec<f64> = match method {
            "uniform" => names
                .iter()
                .map(|n| if n.starts_with("layers.") { 1.0 } else { 0.0 })
                .collect(),
            "parameters" => block_params.iter().map(|&p| p as f64).collect(),
            m if m.starts_with("type:") => {
                let re = regex::Regex::new(&m[5..])
                    .map_err(|e| DistError::Layout(format!("parallel.partition `{m}`: {e}")))?;
                let w: Vec<f64> = names
                    .iter()
                    .map(|n| if re.is_match(n) { 1.0 } else { 0.0 })
                    .collect();
                if w.iter().sum::<f64>() == 0.0 {
                    return Err(DistError::Layout(format!(
                        "parallel.partition `{m}` matches none of embed, layers.N, head"
                    )));
                }
                w
            }
            other => {
                return Err(DistError::Layout(format!(
                    "parallel.partition `{other}` (expected uniform, parameters or type:<regex>)"
                )))
            }
        };
        let cuts = lightest_heaviest_stage(&weights, pp);
        let layers = cuts.windows(2).map(|w| w[0]..w[1]).collect();
        Ok(Stages { layers })
    }
}

/// The stage boundaries `0 = c_0 < c_1 < … < c_pp = n` over `n` layers that make the heaviest
/// stage as light as possible (DeepSpeed's balanced partition), with `weights` = embedding,
/// layers, head: stage `s` weighs its layers, plus the embedding on the first and the head on the
/// last. Ties go to the later cut, so earlier stages take the extra layer.
fn lightest_heaviest_stage(weights: &[f64], pp: usize) -> Vec<usize> {
    let n = weights.len() - 2;
    let mut prefix = vec![0.0; n + 1];
    for j in 0..n {
        prefix[j + 1] = prefix[j] + weights[j + 1];
    }
    let stage_weight = |s: usize, a: usize, b: usize| {
        let mut w = prefix[b] - prefix[a];
        if s == 0 {
            w += weights[0];
        }
        if s == pp - 1 {
            w += weights[n + 1];
        }
        w
    };
    // best[s][j]: the lightest heaviest stage when stages 0..=s hold layers 0..j (each at least
    // one); start[s][j]: where stage s begins in it.
    let mut best = vec![vec![f64::INFINITY; n + 1]; pp];
    let mut start = vec![vec![0usize; n + 1]; pp];
    for (j, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = stage_weight(0, 0, j);
    }
    for s in 1..pp {
        for j in s + 1..=n {
            for i in s..j {
                let w = best[s - 1][i].max(stage_weight(s, i, j));
                if w <= best[s][j] {
                    best[s][j] = w;
                    start[s][j] = i;
                }
            }
        }
    }
    let mut cuts = vec![n];
    for s in (1..pp).rev() {
        let j = *cuts.last().expect("a cut");
        cuts.push(start[s][j]);
    }
    cuts.push(0);
    cuts.reverse();
    cuts
}

/// One step of a stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forward pass of micro-batch `i`.
    Forward(usize),
    /// Backward pass of micro-batch `i`.
    Backward(usize),
}

/// The 1F1B (PipeDream-flush) order of stage `stage` of `pp` over `m` micro-batches: `pp − stage − 1`
/// warm-up forwards, then one forward and one backward in turn, then the remaining backwards. At
/// most `pp − stage` micro-batches' activations are alive at once.
pub fn one_f_one_b(stage: usize, pp: usize, m: usize) -> Vec<Op> {
    let warmup = (pp - stage - 1).min(m);
    let mut ops: Vec<Op> = (0..warmup).map(Op::Forward).collect();
    let mut next_b = 0;
    for f in warmup..m {
        ops.push(Op::Forward(f));
        ops.push(Op::Backward(next_b));
        next_b += 1;
    }
    ops.extend((next_b..m).map(Op::Backward));
    ops
}

/// The idle fraction of an ideal 1F1B pipeline (equal stage times): `(pp − 1) / (m + pp − 1)`.
pub fn ideal_bubble(pp: usize, m: usize) -> f64 {
    (pp - 1) as f64 / (m + pp - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions() {
        // embed, 4 layers, head
        let p = [100, 10, 10, 10, 10, 100];
        let u = Stages::partition("uniform", 2, &p).unwrap();
        assert_eq!(u.layers, vec![0..2, 2..4]);
        let t = Stages::partition("type:layers", 4, &p).unwrap();
        assert_eq!(t.layers, vec![0..1, 1..2, 2..3, 3..4]);
        // Heavy embedding and head: the first and last stages take fewer layers... but at least one.
        let w = Stages::partition("parameters", 2, &[10, 10, 10, 10, 10, 50]).unwrap();
        assert_eq!(w.layers, vec![0..3, 3..4]);
        // The heaviest stage as light as it can be: a 45-weight head with 24 layers of 10 puts
        // 14 layers on the first stage (140 vs 145), not 15 (150 vs 135).
        let mut tied = vec![0];
        tied.extend([10; 24]);
        tied.push(45);
        let t = Stages::partition("parameters", 2, &tied).unwrap();
        assert_eq!(t.layers, vec![0..14, 14..24]);
        // Equal weights: earlier stages take the extra layer.
        let u = Stages::partition("uniform", 3, &[0, 1, 1, 1, 1, 0]).unwrap();
        assert_eq!(u.layers, vec![0..2, 2..3, 3..4]);
        let u = Stages::partition("uniform", 2, &[0, 1, 1, 1, 1, 1, 0]).unwrap();
        assert_eq!(u.layers, vec![0..3, 3..5]);
        let e = Stages::partition("uniform", 5, &p).unwrap_err().to_string();
        assert!(
            e.contains("parallel.pp = 5 stages for a model of 4 decoder layers"),
            "{e}"
        );
        assert!(Stages::partition("type:(", 2, &p).is_err());
    }

    #[test]
    fn one_f_one_b_runs_every_pass_once_in_order() {
        for (pp, m) in [(2, 4), (4, 4), (4, 2), (3, 5)] {
            for s in 0..pp {
                let ops = one_f_one_b(s, pp, m);
                assert_eq!(ops.len(), 2 * m);
                let mut f = 0;
                let mut b = 0;
                for op in &ops {
                    match *op {
                        Op::Forward(i) => {
                            assert_eq!(i, f);
                            f += 1;
                        }
                        Op::Backward(i) => {
                            assert_eq!(i, b);
                            assert!(i < f, "backward before its forward");
                            b += 1;
                        }
                    }
                    assert!(f - b <= pp - s, "too many live activations");
                }
            }
        }
        assert_eq!(
            one_f_one_b(0, 2, 4)[..3],
            [Op::Forward(0), Op::Forward(1), Op::Backward(0)]
        );
        assert!((ideal_bubble(2, 4) - 0.2).abs() < 1e-12);
    }
}
