//! Heap accounting: a global allocator that counts the bytes live now and at peak, so a run can
//! say where its memory went (the memory plan, `tuna train`'s summary, `tuna profile`).
//!
//! The binary installs [`Counting`] as its `#[global_allocator]`; a program that does not sees
//! [`installed`] false and every count as `None`. The counts are of live allocations (what the
//! program holds), which the resident set (`VmHWM`) exceeds by the binary, the allocator's free
//! lists and pages touched once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static MAX: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live bytes (two relaxed atomic updates per call).
pub struct Counting;

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
    MAX.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator, whose contract the caller meets.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc` for `ptr`; the new layout is valid by the caller's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Mark the counting allocator as the program's (call once at start from the binary that
/// installed it): until then the counts read `None`.
pub fn mark_installed() {
    INSTALLED.store(true, Relaxed);
}

/// Whether the program counts its heap.
pub fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// Bytes allocated and not yet freed.
pub fn live() -> Option<u64> {
    installed().then(|| LIVE.load(Relaxed) as u64)
}

/// The most [`live`] has been since the start or the last [`reset_peak`].
pub fn peak() -> Option<u64> {
    installed().then(|| PEAK.load(Relaxed) as u64)
}

/// The most [`live`] has been since the start ([`reset_peak`] does not change it).
pub fn max() -> Option<u64> {
    installed().then(|| MAX.load(Relaxed) as u64)
}

/// Start a new peak from what is live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// With `TUNA_MEM_TRACE` set, print the live and peak heap after `what` on stderr (a debugging
/// aid for where a run's memory goes).
pub fn trace(what: &str) {
    if std::env::var_os("TUNA_MEM_TRACE").is_some() {
        if let (Some(l), Some(p)) = (live(), peak()) {
            eprintln!(
                "memory: {what}: live {}, peak {} ({l} / {p} bytes)",
                crate::human_bytes(l),
                crate::human_bytes(p)
            );
        }
    }
}
