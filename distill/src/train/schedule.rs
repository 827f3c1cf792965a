//! Learning-rate schedule: linear warm-up from 0 to the peak, then cosine decay to a floor.
//!
//! `lr(step) = peak * (step + 1) / warmup` for `step < warmup`, then
//! `floor + (peak - floor) * (1 + cos(pi * t)) / 2` with `t = (step - warmup) / (total - warmup)`
//! clamped to 1 (the floor holds after `total` steps).

/// Warm-up + cosine decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    /// Learning rate at the end of warm-up.
    pub peak: f64,
    /// Learning rate the decay ends at.
    pub floor: f64,
    /// Warm-up steps (optimizer steps, not micro-batches).
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

impl CosineSchedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.floor + (self.peak - self.floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_the_floor() {
        let s = CosineSchedule { peak: 1e-3, floor: 1e-5, warmup: 10, total: 110 };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12, "decay starts at the peak");
        assert!((s.lr(60) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-12, "half way is the midpoint");
        assert!((s.lr(110) - 1e-5).abs() < 1e-12);
        assert!((s.lr(500) - 1e-5).abs() < 1e-12, "the floor holds afterwards");
        assert!((10..110).all(|i| s.lr(i + 1) <= s.lr(i)), "monotone decay");
    }
}
