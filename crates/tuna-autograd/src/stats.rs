//! Counters that make the tape's economy visible: bytes of saved activations (now and at peak)
//! and backward kernels launched, by kind. Per thread, like the tape itself.

use std::cell::RefCell;
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Bytes currently held by backward closures for later use.
    pub saved_bytes: usize,
    /// The most `saved_bytes` has been since the last [`reset`].
    pub peak_saved_bytes: usize,
    /// Backward kernels launched, by kind (e.g. `matmul.dW`, `matmul.dX`, `attention.bwd`).
    pub backward_launches: BTreeMap<&'static str, u64>,
    /// Ops recorded on the tape, by kind.
    pub recorded: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Launches of one kind (0 if none).
    pub fn launches(&self, kind: &str) -> u64 {
        self.backward_launches.get(kind).copied().unwrap_or(0)
    }
    /// Total ops recorded.
    pub fn recorded_total(&self) -> u64 {
        self.recorded.values().sum()
    }
}

thread_local! {
    static STATS: RefCell<Stats> = RefCell::new(Stats::default());
}

/// A snapshot of this thread's counters.
pub fn snapshot() -> Stats {
    STATS.with(|s| s.borrow().clone())
}

/// Zero the launch and record counters and set the peak to the bytes held now.
pub fn reset() {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        s.backward_launches.clear();
        s.recorded.clear();
        s.peak_saved_bytes = s.saved_bytes;
    })
}

pub(crate) fn launched(kind: &'static str) {
    STATS.with(|s| *s.borrow_mut().backward_launches.entry(kind).or_default() += 1)
}

pub(crate) fn recorded(kind: &'static str) {
    STATS.with(|s| *s.borrow_mut().recorded.entry(kind).or_default() += 1)
}

/// Held by whatever keeps bytes alive for a backward pass; counts them until dropped.
#[derive(Debug)]
pub(crate) struct SavedBytes(usize);

impl SavedBytes {
    pub(crate) fn new(bytes: usize) -> Self {
        STATS.with(|s| {
            let mut s = s.borrow_mut();
            s.saved_bytes += bytes;
            s.peak_saved_bytes = s.peak_saved_bytes.max(s.saved_bytes);
        });
        SavedBytes(bytes)
    }
}

impl Drop for SavedBytes {
    fn drop(&mut self) {
        STATS.with(|s| s.borrow_mut().saved_bytes -= self.0);
    }
}
