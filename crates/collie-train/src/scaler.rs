//! Dynamic loss scaling for f16 training: the loss is multiplied by a scale so small gradients
//! survive the half range; a step whose gradients overflow is skipped and the scale backs off;
//! after `growth_interval` good steps it doubles. The scale and the good-step count live in the
//! checkpointed [`TrainerState`] so a resumed run continues with them.

use crate::checkpoint::TrainerState;

/// A loss-scaling policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    /// The scale of the first step.
    pub initial: f64,
    /// Good steps before the scale doubles.
    pub growth_interval: u64,
    /// The scale never falls below this.
    pub min_scale: f64,
}

impl LossScaler {
    /// `torch.cuda.amp.GradScaler`'s defaults (2¹⁶, doubling every 2000 steps, no floor).
    pub fn torch() -> Self {
        LossScaler {
            initial: 65536.0,
            growth_interval: 2000,
            min_scale: 0.0,
        }
    }

    /// lomo-optim's `DynamicLossScaler` defaults (2³², window 1000, floor 1).
    pub fn lomo() -> Self {
        LossScaler {
            initial: 4294967296.0,
            growth_interval: 1000,
            min_scale: 1.0,
        }
    }

    /// Sets up `state` for a fresh run.
    pub fn start(&self, state: &mut TrainerState) {
        state.loss_scale = self.initial;
        state.scale_good_steps = 0;
    }

    /// An overflowing step: skipped, the scale halved.
    pub fn overflow(&self, state: &mut TrainerState) {
        state.skipped_steps += 1;
        state.loss_scale = (state.loss_scale * 0.5).max(self.min_scale);
        state.scale_good_steps = 0;
    }

    /// A step that updated: every `growth_interval` of them the scale doubles.
    pub fn good_step(&self, state: &mut TrainerState) {
        state.scale_good_steps += 1;
        if state.scale_good_steps >= self.growth_interval {
            state.loss_scale *= 2.0;
            state.scale_good_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_and_grows_like_the_references() {
        let mut s = TrainerState::default();
        let lomo = LossScaler::lomo();
        lomo.start(&mut s);
        for _ in 0..40 {
            lomo.overflow(&mut s);
        }
        assert_eq!(s.loss_scale, 1.0, "lomo-optim's scale stops at 1");
        assert_eq!(s.skipped_steps, 40);
        let torch = LossScaler::torch();
        torch.start(&mut s);
        torch.overflow(&mut s);
        assert_eq!(s.loss_scale, 32768.0);
        for _ in 0..1999 {
            torch.good_step(&mut s);
        }
        assert_eq!(s.loss_scale, 32768.0);
        torch.good_step(&mut s);
        assert_eq!((s.loss_scale, s.scale_good_steps), (65536.0, 0));
    }
}
