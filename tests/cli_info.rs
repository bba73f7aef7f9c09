//! `tuna info` runs without a GPU, says so plainly, and lists the embedded kernels.

use std::process::Command;

#[test]
fn info_reports_devices_and_kernels() {
    let out = Command::new(env!("CARGO_BIN_EXE_tuna")).arg("info").output().expect("run tuna info");
    assert!(out.status.success(), "tuna info failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("cpu:"), "{s}");
    assert!(s.contains("cuda"), "{s}");
    assert!(s.contains("gelu"), "kernel list missing: {s}");
    if tuna_kernels::cuda::probe().is_err() {
        assert!(s.contains("cuda: none") && s.contains("default device (auto): cpu"), "{s}");
    }
}
