//! Learning-rate schedules with transformers' semantics (`get_*_schedule_with_warmup`): the
//! learning rate of optimizer step `k` (counted from 0) is `base · λ(k)`.

use serde::{Deserialize, Serialize};

/// Schedule shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// λ = 1 after warm-up.
    #[default]
    Constant,
    /// λ falls linearly to 0 at `total_steps`.
    Linear,
    /// λ follows half a cosine to 0 at `total_steps`.
    Cosine,
}

/// A schedule over `total_steps` optimizer steps with linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Shape after warm-up.
    pub kind: ScheduleKind,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: u64,
    /// Total optimizer steps.
    pub total_steps: u64,
}

impl Schedule {
    /// λ(k).
    pub fn factor(&self, step: u64) -> f64 {
        let (k, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return k / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - k) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (k - w) / (t - w).max(1.0);
                // num_cycles = 0.5
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
            }
        }
    }

    /// `base · λ(step)`.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        base * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_formulas() {
        let s = |kind| Schedule {
            kind,
            warmup_steps: 3,
            total_steps: 10,
        };
        // Warm-up: 0, 1/3, 2/3.
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            assert_eq!(s(kind).factor(0), 0.0);
            assert!((s(kind).factor(2) - 2.0 / 3.0).abs() < 1e-15);
            assert_eq!(s(kind).factor(3), 1.0);
        }
        assert!((s(ScheduleKind::Linear).factor(5) - 5.0 / 7.0).abs() < 1e-15);
        assert_eq!(s(ScheduleKind::Linear).factor(10), 0.0);
        let c = 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 7.0).cos());
        assert!((s(ScheduleKind::Cosine).factor(7) - c).abs() < 1e-15);
        assert_eq!(s(ScheduleKind::Constant).factor(9), 1.0);
    }
}
