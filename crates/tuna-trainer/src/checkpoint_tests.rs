//! Tests of checkpoints: roundtrip, pruning, falling back past corrupt ones, leftover tmp dirs.

use super::*;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-ckpt-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

fn metrics(loss: f64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("eval_loss".into(), Value::from(loss));
    m
}

fn save(c: &Checkpoints, step: u64, loss: f64) -> PathBuf {
    let weights = vec![step as u8; 1000 + step as usize];
    let cursor = format!("{{\"epoch\":0,\"index\":{step}}}");
    c.save(step, &[("weights.bin", &weights), ("cursor.json", cursor.as_bytes())], &metrics(loss)).expect("save")
}

#[test]
fn fnv1a64_reference_values() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn roundtrip() {
    let d = tmpdir("roundtrip");
    let c = Checkpoints::open(&d, 3, None).expect("open");
    let path = save(&c, 123, 1.5);
    assert_eq!(path, d.join("step-000123"));
    let found = c.latest_valid().expect("scan");
    assert!(found.warnings.is_empty());
    let l = found.checkpoint.expect("a checkpoint");
    assert_eq!(l.step(), 123);
    assert_eq!(l.file("weights.bin").expect("weights"), vec![123u8; 1123].as_slice());
    assert_eq!(l.file("cursor.json").expect("cursor"), b"{\"epoch\":0,\"index\":123}");
    assert!(matches!(l.file("optimizer.bin"), Err(CheckpointError::NoFile { .. })));
    assert_eq!(l.manifest.metrics, metrics(1.5));
    assert_eq!(l.manifest.format, FORMAT);
    let names: Vec<&str> = l.manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["weights.bin", "cursor.json"]);
    // Saving the same step again replaces it.
    c.save(123, &[("weights.bin", b"new")], &Map::new()).expect("resave");
    assert_eq!(c.load(123).expect("load").file("weights.bin").expect("weights"), b"new");
    assert_eq!(c.steps().expect("steps"), [123]);
    for bad in ["", "a/b", ".hidden", "manifest.json"] {
        assert!(matches!(c.save(1, &[(bad, b"x")], &Map::new()), Err(CheckpointError::BadName { .. })), "{bad:?}");
    }
    assert!(matches!(c.save(1, &[("a", b"x"), ("a", b"y")], &Map::new()), Err(CheckpointError::BadName { .. })));
    let _ = fs::remove_dir_all(&d);
}

/// A loaded checkpoint holds no file's bytes: each read checks them against the manifest again, so
/// a file changed after it verified is an error naming it.
#[test]
fn a_file_changed_after_it_verified_reads_as_an_error_naming_it() {
    let d = tmpdir("changed");
    let c = Checkpoints::open(&d, 0, None).expect("open");
    save(&c, 7, 1.0);
    let l = c.load(7).expect("load");
    let path = d.join("step-000007/weights.bin");
    let err = |l: &Loaded| l.file("weights.bin").expect_err("changed").to_string();
    fs::write(&path, vec![8u8; 1007]).unwrap();
    let e = err(&l);
    assert!(e.contains(&path.display().to_string()) && e.contains("checksum"), "{e}");
    fs::write(&path, vec![7u8; 1000]).unwrap();
    let e = err(&l);
    assert!(e.contains("weights.bin") && e.contains("ends before byte 1007"), "{e}");
    fs::write(&path, vec![7u8; 1008]).unwrap();
    assert!(err(&l).contains("longer than the 1007 bytes"), "{}", err(&l));
    fs::write(&path, vec![7u8; 1007]).unwrap();
    assert_eq!(l.file("weights.bin").expect("as saved"), vec![7u8; 1007]);
    // In pieces: the checksum is checked at the end.
    let mut r = l.reader("weights.bin").expect("reader");
    let mut n = 0;
    r.read_chunks(1007, |c| n += c.len()).expect("read");
    assert_eq!((n, r.position(), r.size()), (1007, 1007, 1007));
    r.finish().expect("whole and unchanged");
    let mut r = l.reader("weights.bin").expect("reader");
    let mut buf = [0u8; 10];
    r.read_exact(&mut buf).expect("the start");
    assert!(r.finish().expect_err("not read whole").to_string().contains("10 of its 1007 bytes read"));
    let mut r = l.reader("weights.bin").expect("reader");
    assert!(r.read_chunks(1008, |_| ()).expect_err("past the end").to_string().contains("past the 1007 bytes"));
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn pruning_keeps_the_last_k_and_the_best() {
    let d = tmpdir("prune");
    let c = Checkpoints::open(&d, 2, Some(("eval_loss", Direction::Min))).expect("open");
    for (step, loss) in [(100, 3.0), (200, 1.0), (300, 2.0), (400, 2.5), (500, 1.2)] {
        save(&c, step, loss);
    }
    assert_eq!(c.steps().expect("steps"), [200, 400, 500]);
    assert_eq!(c.best_step().expect("best"), Some(200));
    let c = Checkpoints::open(&d, 1, Some(("eval_loss", Direction::Max))).expect("open");
    save(&c, 600, f64::NAN); // NaN is stored as null and never wins
    assert_eq!(c.steps().expect("steps"), [400, 600], "best by max is 400 (2.5)");
    let c = Checkpoints::open(&d, 0, None).expect("open");
    save(&c, 700, 0.0);
    assert_eq!(c.steps().expect("steps"), [400, 600, 700], "keep_last 0 keeps all");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn corrupt_newest_falls_back_with_warnings_and_stays_on_disk() {
    let d = tmpdir("corrupt");
    let c = Checkpoints::open(&d, 0, None).expect("open");
    for step in [1, 2, 3, 4] {
        save(&c, step, 0.0);
    }
    // 4: a truncated file; 3: one garbled byte, same size; 2: a torn manifest.
    let w4 = d.join("step-000004/weights.bin");
    let bytes = fs::read(&w4).expect("read");
    fs::write(&w4, &bytes[..10]).expect("truncate");
    let w3 = d.join("step-000003/weights.bin");
    let mut bytes = fs::read(&w3).expect("read");
    bytes[500] ^= 0x40;
    fs::write(&w3, &bytes).expect("garble");
    let m2 = d.join("step-000002/manifest.json");
    let text = fs::read_to_string(&m2).expect("read");
    fs::write(&m2, &text[..text.len() / 2]).expect("tear");

    let found = c.latest_valid().expect("scan");
    assert_eq!(found.checkpoint.expect("step 1 survives").step(), 1);
    assert_eq!(found.warnings.len(), 3, "{:?}", found.warnings);
    assert!(found.warnings[0].contains("step 4") && found.warnings[0].contains("10 bytes, manifest says 1004"));
    assert!(found.warnings[1].contains("step 3") && found.warnings[1].contains("checksum"));
    assert!(found.warnings[2].contains("step 2") && found.warnings[2].contains("bad manifest"));
    assert_eq!(c.steps().expect("steps"), [1, 2, 3, 4], "corrupt checkpoints are never deleted");

    // A resumed run saving step 4 again moves the corrupt one aside rather than deleting it.
    save(&c, 4, 0.0);
    assert_eq!(c.latest_valid().expect("scan").checkpoint.expect("new step 4").step(), 4);
    let kept = fs::read_dir(&d)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("corrupt-step-000004"));
    assert_eq!(kept.count(), 1);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn leftover_tmp_dirs_are_ignored_then_cleaned() {
    let d = tmpdir("tmp");
    let c = Checkpoints::open(&d, 0, None).expect("open");
    save(&c, 10, 0.0);
    let leftover = d.join(".tmp-step-000020");
    fs::create_dir_all(&leftover).expect("mkdir");
    fs::write(leftover.join("weights.bin"), b"half").expect("write");
    assert_eq!(c.steps().expect("steps"), [10]);
    assert_eq!(c.latest_valid().expect("scan").checkpoint.expect("step 10").step(), 10);
    save(&c, 30, 0.0);
    assert!(!leftover.exists(), "the next save cleans leftovers");
    assert_eq!(c.latest_valid().expect("scan").checkpoint.expect("step 30").step(), 30);
    let empty = Checkpoints::open(&tmpdir("empty"), 1, None).expect("open");
    let none = empty.latest_valid().expect("scan");
    assert!(none.checkpoint.is_none() && none.warnings.is_empty());
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn write_atomic_replaces_whole_files() {
    let d = tmpdir("atomic");
    fs::create_dir_all(&d).expect("mkdir");
    let p = d.join("summary.json");
    write_atomic(&p, b"first version, long").expect("write");
    write_atomic(&p, b"second").expect("rewrite");
    assert_eq!(fs::read(&p).expect("read"), b"second");
    let names: Vec<_> = fs::read_dir(&d).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "no temporary left: {names:?}");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn pruning_ignores_folders_that_are_not_valid_checkpoints() {
    // An empty `step-000099` (or one whose file is short) must not displace the valid checkpoints.
    let d = tmpdir("prune-invalid");
    let c = Checkpoints::open(&d, 1, None).expect("open");
    save(&c, 1, 1.0);
    fs::create_dir_all(d.join("step-000099")).expect("stray folder");
    save(&c, 2, 1.0);
    assert_eq!(c.steps().expect("steps"), [2, 99], "the valid step 2 is kept, the stray folder left alone");
    assert!(c.looks_valid(2) && !c.looks_valid(99));
    // A checkpoint whose file was truncated does not count either.
    save(&c, 150, 1.0);
    let f = d.join("step-000150/weights.bin");
    fs::write(&f, b"short").expect("truncate");
    save(&c, 3, 1.0);
    assert_eq!(c.steps().expect("steps"), [3, 99, 150]);
    assert_eq!(c.latest_valid().expect("scan").checkpoint.expect("one").step(), 3);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn pruning_after_a_resume_never_deletes_the_checkpoint_just_saved() {
    // Steps 400 (good) and 500 (right sizes, wrong checksum): a resume passes 500 over and saves
    // 450; pruning to one must keep 450 (and 400 or not), never leave only the corrupt 500.
    let d = tmpdir("prune-after-resume");
    let c = Checkpoints::open(&d, 1, Some(("eval_loss", Direction::Min))).expect("open");
    save(&c, 400, 2.0);
    let c0 = Checkpoints::open(&d, 0, None).expect("open");
    save(&c0, 500, 0.1); // the best metric, then corrupted in place
    let f = d.join("step-000500/weights.bin");
    let mut bytes = fs::read(&f).expect("read");
    bytes[0] ^= 0xff;
    fs::write(&f, bytes).expect("write");
    assert_eq!(c.latest_valid().expect("scan").checkpoint.expect("one").step(), 400);
    save(&c, 450, 3.0);
    let steps = c.steps().expect("steps");
    assert!(steps.contains(&450), "{steps:?}");
    assert!(steps.contains(&500), "the corrupt newer one is left to inspect: {steps:?}");
    assert_eq!(c.latest_valid().expect("scan").checkpoint.expect("one").step(), 450);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn pruning_deletes_a_checkpoints_files_but_not_yours() {
    let d = tmpdir("prune-yours");
    let c = Checkpoints::open(&d, 1, None).expect("open");
    save(&c, 1, 1.0);
    fs::write(d.join("step-000001/notes.txt"), b"mine").expect("write");
    save(&c, 2, 1.0);
    assert_eq!(fs::read(d.join("step-000001/notes.txt")).expect("kept"), b"mine");
    assert!(!d.join("step-000001/weights.bin").exists() && !d.join("step-000001/manifest.json").exists());
    save(&c, 3, 1.0);
    assert!(!d.join("step-000002").exists(), "an emptied folder goes too");
    let _ = fs::remove_dir_all(&d);
}
