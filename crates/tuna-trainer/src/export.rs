//! What a run leaves: the final export (a PEFT adapter folder, or a Hugging Face folder of a fully
//! fine-tuned model), and the process's peak memory for the summary.

use crate::error::Result;
use crate::model::{Backend, Model};
use std::path::{Path, PathBuf};
use tuna_models::adapt::peft;

/// Write the final export: a PEFT adapter folder, or for full fine-tuning a Hugging Face folder of
/// the trained model. Returns its path and the bytes of its weights file.
pub fn export<B: Backend>(model: &Model<B>, out: &Path) -> Result<(PathBuf, u64)> {
    // A killed export's temporary files: the run holds the folder's lock, so they are stale.
    for d in [out.join("model"), out.join("adapter")] {
        tuna_models::io::remove_stale_temps(&d);
    }
    // Full fine-tuning: nothing but (perhaps) a task head in the adaptation.
    let (dir, file) = if model.adapt().is_empty() {
        let d = out.join("model");
        model.save_merged(&d)?;
        (d.clone(), d.join("model.safetensors"))
    } else {
        let d = out.join("adapter");
        let base = model.name.clone().unwrap_or_else(|| model.source.display().to_string());
        model.save_adapter(&d, &base)?;
        (d.clone(), d.join(peft::WEIGHTS))
    };
    let extra = std::fs::metadata(dir.join(peft::EXTRA)).map(|m| m.len()).unwrap_or(0);
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) + extra;
    Ok((dir, bytes))
}

/// This process's peak resident set (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// This process's resident set now (VmRSS), 0 where /proc is unavailable.
pub fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

fn status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
