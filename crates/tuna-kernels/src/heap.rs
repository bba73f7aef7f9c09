//! The C heap's handling of large blocks, tuned for training loops.
//!
//! A training step frees and reallocates the same activation buffers (megabytes each) every
//! step. glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised
//! dynamically up to 32 MiB as such blocks are freed) with a fresh `mmap`, and gives the top of
//! its heap back to the kernel once more than the trim threshold is free: either way the next
//! step faults in fresh zeroed pages, one 4 KiB page at a time. [`keep_freed_memory`] fixes both
//! thresholds (blocks up to 32 MiB come from the heap, freed memory stays in it), so after the
//! first step a step's buffers reuse the pages of the step before. Measured on MiniLM prompt
//! tuning (32 x 64, `tuna profile`): minor page faults over the run fell 3.5x and the step time
//! by about a tenth; peak resident memory did not change (the README has the numbers).
//!
//! The CPU backend calls it at its first large allocation (so any program training on it gets
//! it); the `tuna` binary calls it at start. Only glibc is tuned (other C libraries and platforms: a no-op returning `false`). Where the
//! user already tunes malloc (`GLIBC_TUNABLES` names `glibc.malloc`), nothing is changed.

use std::sync::OnceLock;

/// glibc's largest allowed mmap threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`): a
/// larger value is refused by `mallopt`. Blocks above it (32 MiB) are still mapped per call.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Keep freed memory in the process's heap for reuse (see the module docs). Idempotent and
/// cheap after the first call; returns whether the heap is tuned (false off glibc, when
/// `GLIBC_TUNABLES` sets malloc's own, or if glibc refused a setting).
pub fn keep_freed_memory() -> bool {
    static DONE: OnceLock<bool> = OnceLock::new();
    *DONE.get_or_init(|| {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc")) {
            return false;
        }
        tune()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    // SAFETY: mallopt only changes malloc's parameters; it is thread-safe (it takes each arena's
    // lock) and these two values are within glibc's documented ranges.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thread_faults() -> i64 {
        // SAFETY: getrusage fills the zeroed struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    /// On glibc the setting takes, and a freed 8 MiB block is handed out again from the heap with
    /// its pages resident: writing a second one faults (almost) nothing, where glibc's defaults
    /// in a fresh process map a new block and fault in all 2,048 pages again (nextest runs each
    /// test in its own process). Off glibc: a no-op that says so.
    #[test]
    fn freed_blocks_are_reused_without_page_faults() {
        let tuned = keep_freed_memory();
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        {
            assert!(!tuned);
            eprintln!("SKIPPED heap::freed_blocks_are_reused_without_page_faults: not glibc");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc")) {
                assert!(!tuned, "GLIBC_TUNABLES sets malloc's parameters: they must be left alone");
                return;
            }
            assert!(tuned, "glibc refused mallopt");
            assert!(keep_freed_memory(), "a second call reports the same");
            let n = 2 << 20; // 8 MiB of f32
            let before = thread_faults();
            drop(std::hint::black_box(vec![1.0f32; n]));
            let first = thread_faults() - before;
            let before = thread_faults();
            let b = std::hint::black_box(vec![2.0f32; n]);
            let second = thread_faults() - before;
            assert_eq!(b[n - 1], 2.0);
            assert!(first >= 1024, "the first 8 MiB block faulted only {first} pages: is the measure broken?");
            assert!(second < 64, "writing a reused 8 MiB block faulted {second} pages (the first: {first})");
        }
    }
}
