//! The process layout: how `dp · tp · pp` ranks map onto the world.

use crate::error::DistError;

/// Data-, tensor- and pipeline-parallel degrees of a run, validated against the world size.
///
/// Ranks follow Megatron's order, tensor-parallel fastest:
/// `rank = pp_rank · (dp · tp) + dp_rank · tp + tp_rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelDims {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Tensor-parallel shards of each layer.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
}

/// Where one rank sits in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    /// Data-parallel rank.
    pub dp: usize,
    /// Tensor-parallel rank.
    pub tp: usize,
    /// Pipeline stage.
    pub pp: usize,
}

impl ParallelDims {
    /// The layout of `world` processes with the given degrees; `dp = None` takes what is left,
    /// `world / (tp · pp)`. Every factor must be at least 1 and their product the world size.
    pub fn new(world: usize, dp: Option<usize>, tp: usize, pp: usize) -> Result<Self, DistError> {
        for (name, v) in [
            ("parallel.tp", Some(tp)),
            ("parallel.pp", Some(pp)),
            ("parallel.dp", dp),
        ] {
            if v == Some(0) {
                return Err(DistError::Layout(format!(
                    "{name} must be at least 1, got 0"
                )));
            }
        }
        let dp = match dp {
            Some(dp) => dp,
            None if world.is_multiple_of(tp * pp) => world / (tp * pp),
            None => {
                return Err(DistError::Layout(format!(
                    "parallel.tp ({tp}) × parallel.pp ({pp}) = {} does not divide the {world} \
                     processes of the world (mpirun -np {world})",
                    tp * pp
                )))
            }
        };
        if dp * tp * pp != world {
            return Err(DistError::Layout(format!(
                "parallel.dp ({dp}) × parallel.tp ({tp}) × parallel.pp ({pp}) = {}, but the world \
                 has {world} process{} (mpirun -np {world})",
                dp * tp * pp,
                if world == 1 { "" } else { "es" }
            )));
        }
        Ok(ParallelDims { dp, tp, pp })
    }

    /// One process, no parallelism.
    pub fn single() -> Self {
        ParallelDims {
            dp: 1,
            tp: 1,
            pp: 1,
        }
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// Where global `rank` sits.
    pub fn coords(&self, rank: usize) -> Coords {
        Coords {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        }
    }

    /// The global rank at `c`.
    pub fn rank(&self, c: Coords) -> usize {
        c.pp * (self.dp * self.tp) + c.dp * self.tp + c.tp
    }
}

impl std::fmt::Display for ParallelDims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dp={} tp={} pp={}", self.dp, self.tp, self.pp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_order_round_trips() {
        let d = ParallelDims::new(8, None, 2, 2).unwrap();
        assert_eq!(d.dp, 2);
        // rank = pp·4 + dp·2 + tp
        assert_eq!(
            d.coords(5),
            Coords {
                pp: 1,
                dp: 0,
                tp: 1
            }
        );
        assert_eq!(
            d.coords(2),
            Coords {
                pp: 0,
                dp: 1,
                tp: 0
            }
        );
        for r in 0..8 {
            assert_eq!(d.rank(d.coords(r)), r);
        }
    }

    #[test]
    fn mismatch_names_every_factor() {
        let e = ParallelDims::new(4, Some(2), 2, 2).unwrap_err().to_string();
        assert!(
            e.contains("parallel.dp (2)") && e.contains("parallel.tp (2)"),
            "{e}"
        );
        assert!(
            e.contains("parallel.pp (2) = 8") && e.contains("4 processes"),
            "{e}"
        );
        let e = ParallelDims::new(3, None, 2, 1).unwrap_err().to_string();
        assert!(e.contains("does not divide the 3 processes"), "{e}");
        let e = ParallelDims::new(2, None, 0, 1).unwrap_err().to_string();
        assert!(e.contains("parallel.tp must be at least 1"), "{e}");
    }
}
