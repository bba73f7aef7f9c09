//! The emulated device's launch log, for the test command's report of which kernels ran: with
//! `TUNA_EMU_LAUNCH_LOG=<file>` every process appends one line per launch configuration it has
//! not launched before (`<kernel> block=XxYxZ smem=N`; tests run in many processes, so the
//! report deduplicates), and writes the list of every tuna kernel compiled in to `<file>.kernels`.

use cudarc::driver::LaunchConfig;
use std::collections::HashSet;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the log file.
pub const LOG_ENV: &str = "TUNA_EMU_LAUNCH_LOG";

/// Note a launch of `kernel` with `cfg` (no-op unless `TUNA_EMU_LAUNCH_LOG` is set). Logging
/// failures are ignored: the log serves a report, never a result.
pub(crate) fn launched(kernel: &str, cfg: &LaunchConfig) {
    static PATH: OnceLock<Option<String>> = OnceLock::new();
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let Some(path) = PATH.get_or_init(|| std::env::var(LOG_ENV).ok().filter(|p| !p.is_empty())) else { return };
    let b = cfg.block_dim;
    let line = format!("{kernel} block={}x{}x{} smem={}", b.0, b.1, b.2, cfg.shared_mem_bytes);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let first = seen.is_none();
    if !seen.get_or_insert_with(HashSet::new).insert(line.clone()) {
        return;
    }
    if first {
        write_kernel_list(path);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// `<path>.kernels`: every kernel compiled in, one per line (written whole, then renamed, so a
/// reader never sees half of it).
fn write_kernel_list(path: &str) {
    // tuna's kernels: the emulator's own test kernels (emu/test_kernels.cu, `emu_test_*`) are
    // launched directly by its tests, never through a launcher.
    let mut names: Vec<String> = super::emu::kernels().into_iter().filter(|n| !n.starts_with("emu_test_")).collect();
    names.sort();
    let tmp = format!("{path}.kernels.{}", std::process::id());
    if std::fs::write(&tmp, names.join("\n") + "\n").is_ok() {
        let _ = std::fs::rename(&tmp, format!("{path}.kernels"));
    }
}
