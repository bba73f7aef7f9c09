//! A dependency-free progress line on stderr, redrawn in place with `\r` at most ten times a second:
//! `[#####...............] 12/100 loss 2.345 1.2k tok/s ETA 1m05s`. Off when stderr is not a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::metrics::{human_duration, tokens_per_s};

const BAR: usize = 20;
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The progress line of one run.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    enabled: bool,
    /// The first step seen and when: the ETA is measured from there, so a resumed run's is right.
    origin: Option<(u64, Instant)>,
    last_draw: Option<Instant>,
    drawn: bool,
}

/// The line for `step` of `total` (no `\r`), with the ETA if known.
pub fn render(step: u64, total: u64, loss: f64, tokens_per_sec: f64, eta: Option<Duration>) -> String {
    let filled = if total == 0 { BAR } else { ((step.min(total) as u128 * BAR as u128) / total as u128) as usize };
    let mut line = format!(
        "[{}{}] {step}/{total} loss {loss:.3} {}",
        "#".repeat(filled),
        ".".repeat(BAR - filled),
        tokens_per_s(tokens_per_sec)
    );
    if let Some(eta) = eta {
        line.push_str(" ETA ");
        line.push_str(&human_duration(eta));
    }
    line
}

impl Progress {
    /// `enabled` = false (e.g. `--quiet`) or a stderr that is not a terminal turns drawing off.
    pub fn new(total_steps: u64, enabled: bool) -> Progress {
        Progress::with_terminal(total_steps, enabled && std::io::stderr().is_terminal())
    }

    /// Like `new` without the terminal check (for tests and for callers that know better).
    pub fn with_terminal(total_steps: u64, enabled: bool) -> Progress {
        Progress { total: total_steps, enabled, origin: None, last_draw: None, drawn: false }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Redraws the line after `step` (1-based count of finished steps) unless the last draw was under
    /// 100 ms ago; the final step always draws.
    pub fn update(&mut self, step: u64, loss: f64, tokens_per_s: f64) {
        if let Some(line) = self.line_at(step, loss, tokens_per_s, Instant::now()) {
            let mut err = std::io::stderr().lock();
            // A failed write to stderr has nowhere to be reported; progress is cosmetic.
            let _ = write!(err, "\r{line}\x1b[K");
            let _ = err.flush();
            self.drawn = true;
        }
    }

    /// The line to draw at `now`, or `None` when disabled or throttled; records the draw.
    pub fn line_at(&mut self, step: u64, loss: f64, tokens_per_s: f64, now: Instant) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let (first, t0) = *self.origin.get_or_insert((step, now));
        let last = step >= self.total;
        if !last && self.last_draw.is_some_and(|t| now.duration_since(t) < MIN_INTERVAL) {
            return None;
        }
        self.last_draw = Some(now);
        let done = step.saturating_sub(first);
        let eta =
            (done > 0).then(|| now.duration_since(t0).mul_f64(self.total.saturating_sub(step) as f64 / done as f64));
        Some(render(step, self.total, loss, tokens_per_s, eta))
    }

    /// Prints a message on its own line (e.g. an eval result) without garbling the progress line; the
    /// next `update` redraws it.
    pub fn println(&mut self, msg: &str) {
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[K");
            self.drawn = false;
        }
        let _ = writeln!(err, "{msg}");
        self.last_draw = None;
    }

    /// Ends the line with a newline so later output starts clean.
    pub fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bar_counts_loss_rate_and_eta() {
        let l = render(12, 100, 2.3449, 1234.0, Some(Duration::from_secs(65)));
        assert_eq!(l, "[##..................] 12/100 loss 2.345 1.2k tok/s ETA 1m05s");
        assert_eq!(render(100, 100, 0.5, 10.0, None), "[####################] 100/100 loss 0.500 10 tok/s");
        assert!(render(150, 100, 0.5, 1.0, None).starts_with("[####################] 150/100"));
        assert!(render(0, 0, 0.5, 1.0, None).starts_with("[####################] 0/0"));
    }

    #[test]
    fn throttles_to_ten_per_second_and_estimates_from_the_first_step_seen() {
        let mut p = Progress::with_terminal(100, true);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(p.line_at(40, 1.0, 1.0, at(0)).is_some_and(|l| !l.contains("ETA")), "resumed at 40: no rate yet");
        assert!(p.line_at(41, 1.0, 1.0, at(50)).is_none(), "throttled");
        let l = p.line_at(50, 1.0, 1.0, at(1000)).expect("drawn");
        assert!(l.ends_with("ETA 5.0s"), "10 steps/s from step 40, 50 left: {l}");
        assert!(p.line_at(100, 1.0, 1.0, at(1001)).is_some(), "the last step always draws");
        let mut off = Progress::with_terminal(100, false);
        assert!(off.line_at(1, 1.0, 1.0, at(0)).is_none());
        assert!(!off.enabled());
    }
}
