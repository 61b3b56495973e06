//! The manifest format against its committed fixture, the shell pipeline documented in
//! docs/MANIFEST.md, and the cases it refuses or defines.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use tribute_client::manifest::{Manifest, ManifestError, NoProgress};

/// The fixture's dataset hash, computed once with the documented pipeline.
const FIXTURE_DATASET_HASH: &str =
    "636cb2d8992bf57568dadbced1d059ef47c541580dbdf4588187546f32f13bca";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dataset")
}

/// The `sh` block under "Reproduce it with a shell" in docs/MANIFEST.md.
fn documented_pipeline() -> String {
    let doc = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/MANIFEST.md"))
        .expect("docs/MANIFEST.md");
    let section = doc.split("## Reproduce it with a shell").nth(1).expect("section");
    let block = section.split("```sh\n").nth(1).expect("sh block");
    block.split("```").next().expect("block end").to_owned()
}

/// Runs the documented pipeline on `dataset`; returns (manifest bytes, printed hash).
fn run_pipeline(dataset: &Path) -> (Vec<u8>, String) {
    let work = tempfile::tempdir().expect("tempdir");
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(documented_pipeline())
        .env("DATASET", dataset)
        .env_remove("LC_ALL")
        .env("LANG", "en_US.UTF-8")
        .current_dir(work.path())
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "pipeline failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let hash = printed.strip_suffix("  -\n").expect("sha256sum output").to_owned();
    (fs::read(work.path().join("manifest.txt")).expect("manifest.txt"), hash)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).expect("copy");
        }
    }
}

#[test]
fn fixture_hash_is_the_committed_value() {
    let m = Manifest::build(&fixture(), &mut NoProgress).expect("builds");
    assert_eq!(m.dataset_hash().to_hex(), FIXTURE_DATASET_HASH);
    assert_eq!(m.entries().len(), 11);
    // The manifest re-parses to itself.
    assert_eq!(Manifest::parse(&m.to_bytes()).expect("parses"), m);
}

#[test]
fn documented_shell_pipeline_reproduces_manifest_and_hash() {
    let m = Manifest::build(&fixture(), &mut NoProgress).expect("builds");
    let (bytes, hash) = run_pipeline(&fixture());
    assert_eq!(String::from_utf8_lossy(&bytes), String::from_utf8_lossy(&m.to_bytes()));
    assert_eq!(hash, FIXTURE_DATASET_HASH);
}

#[test]
fn pipeline_agrees_on_a_generated_dataset_with_tricky_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("ds");
    for (i, name) in
        ["a", "a.b", "a-b", "a/b", "a/b/c", "A", "Z", "_", "~", "é", "e", "a b/c d", "0/1/2/3"]
            .iter()
            .enumerate()
    {
        // Files cannot share a path with a directory: put each one under its own leaf.
        let p = root.join(name).join(format!("f{i}"));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, format!("{i}").repeat(i * 1000)).expect("write");
    }
    let m = Manifest::build(&root, &mut NoProgress).expect("builds");
    let (bytes, hash) = run_pipeline(&root);
    assert_eq!(bytes, m.to_bytes());
    assert_eq!(hash, m.dataset_hash().to_hex());
}

#[test]
fn empty_directories_do_not_change_the_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("ds");
    copy_dir(&fixture(), &copy);
    fs::create_dir_all(copy.join("empty/deeper/still")).expect("mkdir");
    fs::create_dir(copy.join(".empty-hidden")).expect("mkdir");
    let m = Manifest::build(&copy, &mut NoProgress).expect("builds");
    assert_eq!(m.dataset_hash().to_hex(), FIXTURE_DATASET_HASH);
    // Moving a byte changes it.
    fs::write(copy.join("a.txt"), "alpha!\n").expect("write");
    let changed = Manifest::build(&copy, &mut NoProgress).expect("builds");
    assert_ne!(changed.dataset_hash().to_hex(), FIXTURE_DATASET_HASH);
}

#[test]
fn the_named_directory_may_be_a_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(fixture(), &link).expect("symlink");
    let m = Manifest::build(&link, &mut NoProgress).expect("builds");
    assert_eq!(m.dataset_hash().to_hex(), FIXTURE_DATASET_HASH);
}

#[test]
fn refused_cases_name_the_path() {
    type Setup = fn(&Path);
    let cases: Vec<(&str, Setup)> = vec![
        ("symlink to a file", |d| {
            std::os::unix::fs::symlink(d.join("a.txt"), d.join("docs/link")).expect("symlink")
        }),
        ("symlink to a directory", |d| {
            std::os::unix::fs::symlink(d.join("docs"), d.join("nested/dirlink")).expect("symlink")
        }),
        ("non-UTF-8 name", |d| {
            let name = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
            fs::write(d.join("docs").join(name), "x").expect("write")
        }),
        ("newline in a name", |d| fs::write(d.join("line\nbreak"), "x").expect("write")),
        ("tab in a name", |d| fs::write(d.join("nested/tab\there"), "x").expect("write")),
        ("backslash in a name", |d| fs::write(d.join("back\\slash"), "x").expect("write")),
        ("top-level dash", |d| fs::write(d.join("-"), "x").expect("write")),
        ("fifo", |d| {
            let ok = Command::new("mkfifo").arg(d.join("pipe")).status().expect("mkfifo");
            assert!(ok.success());
        }),
    ];
    for (why, setup) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("ds");
        copy_dir(&fixture(), &copy);
        setup(&copy);
        let err = Manifest::build(&copy, &mut NoProgress).expect_err(why);
        assert!(
            matches!(
                err,
                ManifestError::Symlink { .. }
                    | ManifestError::UnsupportedName { .. }
                    | ManifestError::SpecialFile { .. }
            ),
            "{why}: {err}"
        );
        assert!(err.to_string().contains(&copy.display().to_string()), "{why}: {err}");
    }
    // A dash below the top level is fine: sha256sum sees `sub/-`.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("sub")).expect("mkdir");
    fs::write(dir.path().join("sub/-"), "x").expect("write");
    let m = Manifest::build(dir.path(), &mut NoProgress).expect("builds");
    assert_eq!(run_pipeline(dir.path()).0, m.to_bytes());
}

#[test]
fn cli_prints_the_hash_and_writes_a_manifest_it_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("fixture.manifest");
    let bin = env!("CARGO_BIN_EXE_tribute");
    let out = Command::new(bin)
        .args(["contributor", "manifest"])
        .arg(fixture())
        .arg("--output")
        .arg(&out_file)
        .env("TRIBUTE_CLI_HOME", dir.path())
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), FIXTURE_DATASET_HASH);
    let (pipeline_bytes, _) = run_pipeline(&fixture());
    assert_eq!(fs::read(&out_file).expect("written"), pipeline_bytes);
    // The manifest file is accepted where a directory is.
    let again = Command::new(bin)
        .args(["contributor", "manifest"])
        .arg(&out_file)
        .env("TRIBUTE_CLI_HOME", dir.path())
        .output()
        .expect("runs");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), FIXTURE_DATASET_HASH);
    // Not overwritten; a non-manifest file is refused with a clear message.
    let refused = Command::new(bin)
        .args(["contributor", "manifest"])
        .arg(fixture())
        .arg("--output")
        .arg(&out_file)
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    let junk = Command::new(bin)
        .args(["contributor", "manifest"])
        .arg(fixture().join("README.txt"))
        .output()
        .expect("runs");
    assert!(!junk.status.success());
    let msg = String::from_utf8_lossy(&junk.stderr);
    assert!(msg.contains("read as a manifest"), "{msg}");
}
