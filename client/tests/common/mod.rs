//! Shared by the CLI tests: a daemon configuration on loopback, and reading what `tribute`
//! printed.
#![allow(dead_code)]

use std::path::Path;
use std::process::Output;
use tribute_daemon::config::Config;

/// A daemon on an ephemeral loopback port with its data in `dir`, no metrics listener.
pub fn daemon_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        ..Config::default()
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Stdout of a run that must have succeeded.
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", stderr(o), stdout(o));
    stdout(o)
}

/// The value of the `name: value` line in `out`.
pub fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
        .trim()
        .to_owned()
}
