//! The C heap's handling of large blocks, tuned for training loops.
//!
//! A training step frees and reallocates the same activation buffers (megabytes each) every
//! step. glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised
//! dynamically up to 32 MiB as such blocks are freed) with a fresh `mmap`, and gives the top of
//! its heap back to the kernel once more than the trim threshold is free: either way the next
//! step faults in fresh zeroed pages, one 4 KiB page at a time. [`keep_freed_memory`] fixes both
//! thresholds (blocks up to 32 MiB come from the heap, freed memory stays in it), so after the
//! first step a step's buffers reuse the pages of the step before. Measured on MiniLM prompt
//! tuning (32 x 64, `tuna profile`, README "Training steps vs PyTorch + PEFT"): minor page faults
//! over the run fell 3.5x and the step time by about a sixth; peak resident memory did not change.
//!
//! What it costs: memory a program frees stays resident (in the arena that freed it) until the
//! program ends or calls [`release_free_memory`]; glibc still unmaps a thread arena's extra heap
//! once all of it is free. So it is for training processes, not long-lived servers: the trainer
//! (`tuna_trainer`'s train, profile and multi-task setup) and the `tuna` binary's training
//! commands call it; a program training on the lower crates should call it first thing in
//! `main`. Only glibc is tuned (elsewhere a no-op returning `false`), and nothing is changed where
//! the user set either threshold (`GLIBC_TUNABLES` with `mmap_threshold` / `trim_threshold`, or
//! `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`).

use std::sync::OnceLock;

/// glibc's largest allowed mmap threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`): a
/// larger value is refused by `mallopt`. Blocks above it (32 MiB) are still mapped per call.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Keep freed memory in the process's heap for reuse (see the module docs). Idempotent and
/// cheap after the first call; returns whether the heap is tuned (false off glibc, where the user
/// set a threshold, or if glibc refused a setting). Call it early, before other threads allocate:
/// glibc's `mallopt` is not thread-safe against concurrent allocation (a later call is a no-op).
pub fn keep_freed_memory() -> bool {
    static DONE: OnceLock<bool> = OnceLock::new();
    *DONE.get_or_init(|| !user_tuned() && tune())
}

/// Whether the environment sets glibc's mmap or trim threshold itself.
fn user_tuned() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some();
    set("MALLOC_MMAP_THRESHOLD_")
        || set("MALLOC_TRIM_THRESHOLD_")
        || std::env::var("GLIBC_TUNABLES")
            .is_ok_and(|t| t.contains("glibc.malloc.mmap_threshold") || t.contains("glibc.malloc.trim_threshold"))
}

/// Give the heap's free memory back to the kernel now (glibc `malloc_trim(0)`: the free top of
/// every arena and the free pages inside it), e.g. before reading the resident size to tell the
/// heap's live bytes from memory outside it. A no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes each arena's lock; it only returns free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    // SAFETY: mallopt changes malloc's parameters (the values are within glibc's documented
    // ranges); glibc marks it MT-unsafe, so the caller runs it before other threads allocate (a
    // race would only let one allocation see a half-updated threshold pair).
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

    const CHILD: &str = "TUNA_HEAP_TEST_CHILD";

    /// On glibc the setting takes, and a freed 8 MiB block is handed out again from the heap with
    /// its pages resident: writing a second one faults (almost) nothing, where glibc's defaults
    /// map a new block and fault in all 2,048 pages again. The measurement runs in a fresh child
    /// process (this test binary re-run on this test alone), so no earlier test has warmed the
    /// heap whatever the runner, with transparent huge pages off (they would fault 2 MiB at once).
    /// Off glibc: a no-op that says so.
    #[test]
    fn freed_blocks_are_reused_without_page_faults() {
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        {
            assert!(!keep_freed_memory());
            eprintln!("SKIPPED heap::freed_blocks_are_reused_without_page_faults: not glibc");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let Some(mode) = std::env::var_os(CHILD) else {
                // (child mode, extra environment, what its output must say)
                let runs = [
                    ("measure", None, "faults: first"),
                    // a threshold the user set is left alone
                    ("user", Some(("MALLOC_TRIM_THRESHOLD_", "1000000")), "left alone"),
                    ("user", Some(("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")), "left alone"),
                ];
                for (mode, env, says) in runs {
                    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
                    cmd.args(["--exact", "heap::tests::freed_blocks_are_reused_without_page_faults", "--nocapture"])
                        .args(["--test-threads", "1"])
                        .env(CHILD, mode)
                        .env_remove("GLIBC_TUNABLES")
                        .env_remove("MALLOC_MMAP_THRESHOLD_")
                        .env_remove("MALLOC_TRIM_THRESHOLD_");
                    if let Some((k, v)) = env {
                        cmd.env(k, v);
                    }
                    let out = cmd.output().unwrap();
                    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
                    assert!(out.status.success() && text.contains("1 passed"), "the {mode} child failed:\n{text}");
                    assert!(text.contains(says), "the {mode} child did not say {says:?}:\n{text}");
                }
                return;
            };
            if mode == "user" {
                assert!(!keep_freed_memory(), "a user-set threshold was overridden");
                println!("left alone");
                return;
            }
            // SAFETY: prctl(PR_SET_THP_DISABLE) only changes this (child) process's THP policy.
            assert_eq!(unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) }, 0);
            assert!(keep_freed_memory(), "glibc refused mallopt");
            assert!(keep_freed_memory(), "a second call reports the same");
            let n = 2 << 20; // 8 MiB of f32
            let before = thread_faults();
            drop(std::hint::black_box(vec![1.0f32; n]));
            let first = thread_faults() - before;
            let before = thread_faults();
            let b = std::hint::black_box(vec![2.0f32; n]);
            let second = thread_faults() - before;
            assert_eq!(b[n - 1], 2.0);
            println!("faults: first {first}, second {second}");
            assert!(first >= 1024, "the first 8 MiB block faulted only {first} pages: is the measure broken?");
            assert!(second < 64, "writing a reused 8 MiB block faulted {second} pages (the first: {first})");
        }
    }
}
