//! Pipeline parallelism: which decoder layers each stage runs, and the 1F1B schedule.
//!
//! A stage is a contiguous run of blocks of the block contract (docs/architecture.md): the first stage also
//! runs the embedding, the last the head (final norm, LM head, loss). Partition methods follow
//! CoLLiE's: `uniform` (layers split as evenly as possible), `parameters` (balanced parameter
//! counts, embedding and head included), `type:<regex>` (balanced counts of the blocks whose path
//! — `embed`, `layers.N`, `head` — matches).

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
        let total: f64 = weights.iter().sum();
        // Cut after layer j when the running weight (embedding first) passes s/pp of the total;
        // every stage keeps at least one layer.
        let mut cuts = vec![0usize];
        let mut running = weights[0];
        for j in 0..n_layers {
            running += weights[j + 1];
            let stage = cuts.len();
            let left = n_layers - (j + 1);
            let stages_left = pp - stage;
            if stage < pp
                && left >= stages_left
                && (running >= total * stage as f64 / pp as f64 || left == stages_left)
            {
                cuts.push(j + 1);
            }
        }
        cuts.truncate(pp);
        cuts.push(n_layers);
        let layers = cuts.windows(2).map(|w| w[0]..w[1]).collect();
        Ok(Stages { layers })
    }
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
