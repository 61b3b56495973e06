//! `tributed` as a child process: the binary located beside the test's own (the `tests`
//! crate cannot use `CARGO_BIN_EXE_tributed`, which only the daemon crate's own tests get,
//! and cannot build it either: `cargo test` holds the target dir's lock while tests run),
//! started on a config file with its log appended to a file, and stopped with SIGKILL — a
//! crash, not a shutdown.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::SystemTime;

/// The `tributed` binary of the profile this test was built with. `cargo test --workspace`
/// builds it; alone, build it first (`cargo build -p tribute-daemon --bin tributed`, with
/// `--release` for a release test). Refuses a binary older than the daemon's sources, so a
/// test never runs yesterday's daemon.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let release = if profile_dir.ends_with("release") { " --release" } else { "" };
    let build = format!("cargo build --locked -p tribute-daemon --bin tributed{release}");
    let bin = profile_dir.join("tributed");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("no {}: run `{build}` first", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let sources = ["daemon/src", "daemon/Cargo.toml", "channels/src", "proto"];
    let newest = sources.iter().map(|s| newest_mtime(&root.join(s))).max().flatten();
    if let Some(newest) = newest {
        assert!(
            newest <= built,
            "{} is older than the daemon's sources: run `{build}` first",
            bin.display()
        );
    }
    bin
}

/// The newest modification time under `path` (a file or a directory tree).
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// One `tributed` process.
pub struct Tributed {
    child: Child,
}

impl Tributed {
    /// `tributed --config <config> run`, stdout and stderr appended to `log`.
    pub fn spawn(bin: &Path, config: &Path, log: &Path) -> Tributed {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn tributed");
        Tributed { child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL, then reap it: no drain, no flush, no destructor runs.
    pub fn kill(mut self) {
        // `Child::kill` sends SIGKILL on Unix.
        self.child.kill().expect("SIGKILL tributed");
        self.child.wait().expect("reap tributed");
    }
}

impl Drop for Tributed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tributed --config <config> token create --role <role>`: the new bearer secret.
pub fn create_token(bin: &Path, config: &Path, role: &str) -> String {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["token", "create", "--role", role, "--label", "crash-loop"])
        .output()
        .expect("tributed token create");
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("token:").map(|t| t.trim().to_owned()))
        .unwrap_or_else(|| panic!("no token in {stdout}"))
}

/// The last `lines` lines of a log file (for failure messages).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
