//! Learning-rate schedule: linear warmup to the peak, then cosine, linear or no decay to a floor.
//!
//! Steps are 0-based optimizer updates: `lr(s)` is the rate used by update `s`.
//! - Warmup (`s < warmup_steps`): `peak * (s + 1) / warmup_steps`, so update 0 uses `peak / warmup_steps`
//!   (never 0, which would waste an update) and update `warmup_steps - 1` uses the peak.
//! - Decay (`warmup_steps <= s`): progress `p = (s - warmup) / (total - warmup)` goes from 0 at the end of
//!   warmup to 1 at `total_steps`, where the rate reaches `min_lr = peak * min_lr_ratio`; later steps stay
//!   there. The last update of a run (`total_steps - 1`) is thus one decay step above the floor.
//! - `Constant` keeps the peak after warmup and ignores `min_lr_ratio`.

use std::str::FromStr;

/// The shape of the decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

impl FromStr for Decay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Decay::Cosine),
            "linear" => Ok(Decay::Linear),
            "constant" => Ok(Decay::Constant),
            _ => Err(format!("unknown schedule {s:?}: expected cosine, linear or constant")),
        }
    }
}

/// Warmup then decay; see the module doc for the exact formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    /// The floor as a fraction of the peak, in [0, 1].
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// Checks the settings; the CLI calls this before training so `lr` never sees nonsense.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.peak_lr.is_finite() && self.peak_lr > 0.0) {
            return Err(format!("learning rate {} must be a positive number", self.peak_lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!("min lr ratio {} must be in [0, 1]", self.min_lr_ratio));
        }
        if self.total_steps == 0 {
            return Err("total steps must be at least 1".into());
        }
        if self.warmup_steps > self.total_steps {
            return Err(format!("warmup steps {} exceed total steps {}", self.warmup_steps, self.total_steps));
        }
        Ok(())
    }

    /// The floor the decay reaches at `total_steps`.
    pub fn min_lr(&self) -> f64 {
        self.peak_lr * self.min_lr_ratio
    }

    /// The learning rate of update `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.decay == Decay::Constant {
            return self.peak_lr;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        if span == 0 {
            return self.min_lr();
        }
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let factor = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Decay::Linear => 1.0 - p,
            Decay::Constant => 1.0,
        };
        self.min_lr() + (self.peak_lr - self.min_lr()) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> Schedule {
        Schedule { peak_lr: 1e-3, warmup_steps: 10, total_steps: 110, decay, min_lr_ratio: 0.1 }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 + 1e-12 * b.abs()
    }

    #[test]
    fn endpoints() {
        for d in [Decay::Cosine, Decay::Linear] {
            let s = sched(d);
            assert!(close(s.lr(0), 1e-4), "{d:?} step 0: {}", s.lr(0));
            assert!(close(s.lr(9), 1e-3), "{d:?} last warmup step reaches the peak");
            assert!(close(s.lr(10), 1e-3), "{d:?} decay starts at the peak");
            assert!(close(s.lr(110), 1e-4), "{d:?} floor at total_steps: {}", s.lr(110));
            assert!(close(s.lr(10_000), 1e-4), "{d:?} stays at the floor");
            assert!(s.lr(109) > 1e-4);
        }
        assert!(close(sched(Decay::Cosine).lr(60), 0.55e-3), "cosine midpoint is the mean of peak and floor");
        assert!(close(sched(Decay::Linear).lr(35), 1e-3 - 0.9e-3 / 4.0));
        let c = sched(Decay::Constant);
        assert!(close(c.lr(10), 1e-3) && close(c.lr(500), 1e-3));
        let no_warmup = Schedule { warmup_steps: 0, ..sched(Decay::Linear) };
        assert!(close(no_warmup.lr(0), 1e-3));
        let all_warmup = Schedule { warmup_steps: 110, ..sched(Decay::Cosine) };
        assert!(close(all_warmup.lr(109), 1e-3) && close(all_warmup.lr(110), 1e-4));
    }

    #[test]
    fn monotone_up_then_down() {
        for d in [Decay::Cosine, Decay::Linear, Decay::Constant] {
            let s = sched(d);
            for t in 1..10 {
                assert!(s.lr(t) > s.lr(t - 1), "{d:?} warmup rises at {t}");
            }
            for t in 11..=120 {
                assert!(s.lr(t) <= s.lr(t - 1), "{d:?} decay never rises at {t}");
                assert!(s.lr(t) >= s.min_lr() * (1.0 - 1e-12), "{d:?} above the floor at {t}");
            }
        }
    }

    #[test]
    fn validation() {
        assert!(sched(Decay::Cosine).validate().is_ok());
        assert!(Schedule { warmup_steps: 111, ..sched(Decay::Cosine) }.validate().is_err());
        assert!(Schedule { peak_lr: 0.0, ..sched(Decay::Cosine) }.validate().is_err());
        assert!(Schedule { peak_lr: f64::NAN, ..sched(Decay::Cosine) }.validate().is_err());
        assert!(Schedule { min_lr_ratio: 1.5, ..sched(Decay::Cosine) }.validate().is_err());
        assert!(Schedule { total_steps: 0, warmup_steps: 0, ..sched(Decay::Cosine) }.validate().is_err());
        assert_eq!("linear".parse::<Decay>(), Ok(Decay::Linear));
        assert!("step".parse::<Decay>().is_err());
    }
}
