//! Counters that make the tape's economy visible: bytes of saved activations (now and at peak)
//! and backward kernels launched, by kind; and, when profiling is on, wall time per op kind,
//! forward and backward. Per thread, like the tape itself.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// Calls and total wall time of one op kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpTime {
    pub calls: u64,
    pub nanos: u64,
}

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
    /// With [`set_profiling`] on: forward time by op kind, each op charged the wall time since the
    /// previous op finished (or since [`mark`]), so host work between ops lands on the next op.
    pub forward_time: BTreeMap<&'static str, OpTime>,
    /// With profiling on: each backward closure's wall time, by the op kind that recorded it.
    pub backward_time: BTreeMap<&'static str, OpTime>,
    /// With profiling on: the saved bytes each op kind held when `peak_saved_bytes` was reached
    /// (who holds the step's peak of saved activations).
    pub saved_at_peak: BTreeMap<&'static str, usize>,
    /// With profiling on: floating-point operations the forward of each op kind did (matrix
    /// products and attention; 2 per multiply-add), for its achieved GFLOP/s.
    pub forward_flops: BTreeMap<&'static str, u64>,
    /// Likewise for the backward closures, by the op kind that recorded them.
    pub backward_flops: BTreeMap<&'static str, u64>,
    /// Saved bytes held now, by the op kind that saved them.
    saved_by_kind: BTreeMap<&'static str, usize>,
    profiling: bool,
    last_mark: Option<Instant>,
    /// Inside [`composite`]: the ops run there charge neither time nor FLOPs of their own.
    composite_depth: u32,
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

/// Zero the launch, record and time counters and set the peak to the bytes held now.
pub fn reset() {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        s.backward_launches.clear();
        s.recorded.clear();
        s.forward_time.clear();
        s.backward_time.clear();
        s.forward_flops.clear();
        s.backward_flops.clear();
        s.peak_saved_bytes = s.saved_bytes;
        s.saved_at_peak = s.saved_by_kind.clone();
    })
}

/// Switch per-op timing on or off (off by default: it reads the clock twice per op). Times are
/// host wall time: exact on the CPU; on CUDA they are launch times unless the device synchronizes.
pub fn set_profiling(on: bool) {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        s.profiling = on;
        s.last_mark = on.then(Instant::now);
    })
}

/// Start the clock the next op's forward time is measured from (call before a forward pass).
pub fn mark() {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        if s.profiling {
            s.last_mark = Some(Instant::now());
        }
    })
}

fn add(map: &mut BTreeMap<&'static str, OpTime>, kind: &'static str, nanos: u64) {
    let t = map.entry(kind).or_default();
    t.calls += 1;
    t.nanos += nanos;
}

/// Runs `f`, an op built of other ops (the fused head and loss), so that the ops inside charge
/// nothing: their time and FLOPs go to the op that records itself after `f` (which counts its
/// own FLOPs).
pub(crate) fn composite<T>(f: impl FnOnce() -> T) -> T {
    /// Lowers the depth again however `f` ends (a panic unwinding through it included), so a
    /// failed composite does not silence the later ops' timings.
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            STATS.with(|s| s.borrow_mut().composite_depth -= 1);
        }
    }
    STATS.with(|s| s.borrow_mut().composite_depth += 1);
    let _depth = Depth;
    f()
}

/// An op of `kind` has just produced its output: charge it the time since the last mark.
pub(crate) fn forward_done(kind: &'static str) {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        if !s.profiling || s.composite_depth > 0 {
            return;
        }
        let now = Instant::now();
        let ns = s.last_mark.map_or(0, |m| (now - m).as_nanos() as u64);
        add(&mut s.forward_time, kind, ns);
        s.last_mark = Some(now);
    })
}

/// Whether per-op timing is on.
pub(crate) fn profiling() -> bool {
    STATS.with(|s| s.borrow().profiling)
}

/// A backward closure of an op of `kind` took `nanos`.
pub(crate) fn backward_done(kind: &'static str, nanos: u64) {
    STATS.with(|s| add(&mut s.borrow_mut().backward_time, kind, nanos))
}

/// With profiling on, an op of `kind` did `n` floating-point operations in its forward (or, with
/// `backward`, in a backward closure).
pub(crate) fn flops(kind: &'static str, backward: bool, n: f64) {
    STATS.with(|s| {
        let mut s = s.borrow_mut();
        if s.profiling && s.composite_depth == 0 {
            let map = if backward { &mut s.backward_flops } else { &mut s.forward_flops };
            *map.entry(kind).or_default() += n as u64;
        }
    })
}

pub(crate) fn launched(kind: &'static str) {
    STATS.with(|s| *s.borrow_mut().backward_launches.entry(kind).or_default() += 1)
}

pub(crate) fn recorded(kind: &'static str) {
    STATS.with(|s| *s.borrow_mut().recorded.entry(kind).or_default() += 1)
}

thread_local! {
    /// The kind of the op whose backward is being built (what its saved bytes are charged to).
    static SAVING_KIND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("other") };
}

/// Run `f` (an op's backward being built) with the bytes it saves charged to `kind`.
pub(crate) fn saving_as<T>(kind: &'static str, f: impl FnOnce() -> T) -> T {
    let outer = SAVING_KIND.with(|k| k.replace(kind));
    let out = f();
    SAVING_KIND.with(|k| k.set(outer));
    out
}

/// Held by whatever keeps bytes alive for a backward pass; counts them until dropped.
#[derive(Debug)]
pub(crate) struct SavedBytes(usize, &'static str);

impl SavedBytes {
    pub(crate) fn new(bytes: usize) -> Self {
        let kind = SAVING_KIND.with(|k| k.get());
        STATS.with(|s| {
            let mut s = s.borrow_mut();
            s.saved_bytes += bytes;
            *s.saved_by_kind.entry(kind).or_default() += bytes;
            if s.saved_bytes > s.peak_saved_bytes {
                s.peak_saved_bytes = s.saved_bytes;
                if s.profiling {
                    s.saved_at_peak = s.saved_by_kind.clone();
                }
            }
        });
        SavedBytes(bytes, kind)
    }
}

impl Drop for SavedBytes {
    fn drop(&mut self) {
        STATS.with(|s| {
            let mut s = s.borrow_mut();
            s.saved_bytes -= self.0;
            if let Some(b) = s.saved_by_kind.get_mut(self.1) {
                *b -= self.0;
            }
        })
    }
}
