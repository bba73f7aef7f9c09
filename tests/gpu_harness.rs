//! The GPU harness's plan, checked without a GPU: `scripts/gpu/check.sh <out> --dry-run` lists
//! nvidia-smi and every CUDA test binary with the exact commands and environment, writes nothing,
//! and exits 0 even with no bundle (reporting the missing files by name); `--strict` makes a
//! missing bundle an error. Runs no cargo build and no test binary: it takes well under a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TEST_BINARIES: [&str; 4] =
    ["tuna-kernels-lib", "tuna-autograd-cuda", "tuna-models-cuda_models", "tuna-trainer-cuda_train"];

fn check_sh(out: &Path, bundle: &Path, extra: &[&str]) -> Output {
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/check.sh"))
        .arg(out)
        .arg("--dry-run")
        .args(extra)
        .env("TUNA_GPU_BUNDLE", bundle)
        .output()
        .expect("run bash scripts/gpu/check.sh")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-gpu-harness-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn dry_run_lists_the_whole_plan_without_a_bundle() {
    let tmp = scratch("plan");
    let (out, bundle) = (tmp.join("out"), tmp.join("no-bundle"));
    let r = check_sh(&out, &bundle, &[]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "dry run must exit 0 without a bundle: {:?}\n{stdout}{}",
        r.status,
        String::from_utf8_lossy(&r.stderr)
    );

    let steps: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("$ ")).collect();
    assert!(steps.iter().any(|l| l.contains("nvidia-smi")), "no nvidia-smi step:\n{stdout}");
    for bin in TEST_BINARIES {
        // each test binary from the bundle: the kernels' whole (many of its CUDA tests are in
        // modules not named cuda), the others filtered to the CUDA tests
        let filter = if bin == "tuna-kernels-lib" { "" } else { " cuda" };
        let want = format!("{}/tests/{bin}{filter} --test-threads=4", bundle.display());
        assert!(steps.iter().any(|l| l.contains(&want)), "no step runs `{want}`:\n{stdout}");
    }
    assert!(steps.iter().any(|l| l.contains("/bin/tuna generate") && l.contains("--device cuda")), "{stdout}");
    // the attention benchmark, SDPA at the same shapes, and the table, after every test
    let pos = |needle: &str| steps.iter().position(|l| l.contains(needle));
    let (tests_end, tuna, sdpa, table) =
        (pos("tuna-trainer-cuda_train"), pos("bin/cuda_attention"), pos("attn_sdpa.py"), pos("attn_table.py"));
    assert!(tests_end < tuna && tuna < sdpa && sdpa < table && tests_end.is_some(), "{stdout}");
    assert!(steps.iter().any(|l| l.contains("logs.tar.gz")), "the logs are packed (8-file limit):\n{stdout}");
    // the training-step benchmark, both sides, on CUDA, then its table
    let (tuna_train, peft_train, train_table) =
        (pos("bin/train_step --device cuda"), pos("train_step.py --device cuda"), pos("train_table.py"));
    assert!(table < tuna_train && tuna_train < peft_train && peft_train < train_table, "{stdout}");
    // bf16 rows: tuna's mixed precision beside PyTorch's autocast, for both methods.
    for m in ["full", "prompt"] {
        let method = format!("--method {m} ");
        let has =
            |side: &str, flag: &str| steps.iter().any(|l| l.contains(side) && l.contains(&method) && l.ends_with(flag));
        assert!(has("bin/train_step --device cuda", "--precision bf16"), "no tuna bf16 {m} row:\n{stdout}");
        assert!(has("train_step.py --device cuda", "--autocast bf16"), "no PyTorch bf16 {m} row:\n{stdout}");
    }
    // Every step's cap together stays under one device call's 600 s.
    let caps: u64 = stdout
        .lines()
        .filter_map(|l| {
            l.split_once("(cap ").and_then(|(_, r)| r.split_once('s')).and_then(|(n, _)| n.parse::<u64>().ok())
        })
        .sum();
    assert!(caps > 0 && caps <= 590, "the plan's caps sum to {caps} s:\n{stdout}");
    for var in [
        "TUNA_REQUIRE_CUDA=1".to_string(),
        format!("TUNA_KERNEL_CACHE={}/kernel-cache", out.display()),
        format!("TUNA_FIXTURES_DIR={}/fixtures", bundle.display()),
        "LD_LIBRARY_PATH=".to_string(),
    ] {
        assert!(stdout.contains(&format!("export {var}")), "the plan does not set {var}:\n{stdout}");
    }
    assert!(stdout.contains("bundle: MISSING"), "{stdout}");
    // check.sh names a missing file relative to the repository when it lies inside it (as the
    // scratch folder does under scripts/test.sh's TMPDIR, target/test-tmp), else in full.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shown = bundle.strip_prefix(root).unwrap_or(&bundle).display().to_string();
    for bin in TEST_BINARIES {
        assert!(stdout.contains(&format!("missing: {shown}/tests/{bin}")), "{bin} not reported missing:\n{stdout}");
    }
    assert!(!out.exists(), "the dry run must write nothing");
}

#[test]
fn strict_dry_run_fails_on_an_incomplete_bundle_and_passes_on_a_complete_one() {
    let tmp = scratch("strict");
    let bundle = tmp.join("bundle");
    let r = check_sh(&tmp.join("out"), &bundle, &["--strict"]);
    assert_eq!(r.status.code(), Some(1), "{}", String::from_utf8_lossy(&r.stdout));

    // the files check.sh needs, empty: the plan is then complete
    let mut files = vec![
        "bin/tuna".to_string(),
        "bin/cuda_attention".into(),
        "bin/train_step".into(),
        "scripts/attn_sdpa.py".into(),
        "scripts/attn_table.py".into(),
        "scripts/train_step.py".into(),
        "scripts/train_table.py".into(),
        "fixtures/gpt2/config.json".into(),
        "fixtures/llama/config.json".into(),
    ];
    files.extend(TEST_BINARIES.iter().map(|b| format!("tests/{b}")));
    for f in &files {
        let p = bundle.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"").unwrap();
    }
    let r = check_sh(&tmp.join("out"), &bundle, &["--strict"]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{stdout}");
    assert!(stdout.contains("bundle: complete") && !stdout.contains("missing:"), "{stdout}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/check.sh");
    for args in [&[][..], &["--bogus"][..], &["/tmp/x", "--strict"][..]] {
        let r = Command::new("bash").arg(&script).args(args).output().unwrap();
        assert_eq!(r.status.code(), Some(2), "{args:?}");
    }
}
