//! Where the CPU went during a phase: this process's threads grouped by role (from their
//! names: the daemon's tokio workers, the client's, the ledger writer, the signer), and how
//! busy the whole machine was (other work on it included), from `/proc`.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of `/proc` times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// A snapshot of CPU times.
pub struct Snapshot {
    at: Instant,
    /// Ticks (user + system) per role.
    roles: BTreeMap<&'static str, u64>,
    /// Machine: (busy ticks, all ticks) over every CPU.
    machine: (u64, u64),
    /// Context switches of this process's threads: (voluntary, involuntary).
    switches: (u64, u64),
}

/// CPU used between two snapshots.
pub struct Usage {
    /// Seconds of CPU per role.
    pub roles: BTreeMap<&'static str, f64>,
    /// Wall seconds.
    pub wall: f64,
    /// Fraction of the whole machine that was busy (all processes), 0..=1.
    pub machine_busy: f64,
    /// Context switches of this process's threads: (voluntary, involuntary). A voluntary
    /// one is a thread going to sleep (parking, blocking I/O); each costs a wake-up later.
    pub switches: (u64, u64),
}

fn role(comm: &str) -> &'static str {
    if comm.starts_with("daemon-worker") {
        "daemon workers"
    } else if comm.starts_with("client-worker") {
        "client workers"
    } else if comm.starts_with("tribute-ledger") {
        "ledger writer"
    } else if comm.starts_with("tribute-signer") {
        "signer"
    } else {
        "other"
    }
}

/// utime + stime of a `/proc/.../stat` line (fields 14 and 15, after the `(comm)`).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a `/proc/.../status`.
fn status_switches(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("voluntary_ctxt_switches:"), field("nonvoluntary_ctxt_switches:"))
}

fn machine() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else { return (0, 0) };
    let Some(line) = s.lines().next() else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (all.saturating_sub(idle), all)
}

/// Reads the CPU times of every thread of this process and of the machine.
pub fn snapshot() -> Snapshot {
    let mut roles = BTreeMap::new();
    let mut switches = (0, 0);
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for task in dir.flatten() {
            let path = task.path();
            let (v, i) =
                status_switches(&std::fs::read_to_string(path.join("status")).unwrap_or_default());
            switches = (switches.0 + v, switches.1 + i);
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let Some(ticks) =
                std::fs::read_to_string(path.join("stat")).ok().as_deref().and_then(stat_ticks)
            else {
                continue;
            };
            *roles.entry(role(comm.trim())).or_insert(0) += ticks;
        }
    }
    Snapshot { at: Instant::now(), roles, machine: machine(), switches }
}

impl Snapshot {
    /// CPU used from `self` to `later`. Threads that ended in between are not counted.
    pub fn until(&self, later: &Snapshot) -> Usage {
        let roles = later
            .roles
            .iter()
            .map(|(r, t)| {
                let before = self.roles.get(r).copied().unwrap_or(0);
                (*r, t.saturating_sub(before) as f64 / TICKS_PER_SEC)
            })
            .collect();
        let busy = later.machine.0.saturating_sub(self.machine.0) as f64;
        let all = later.machine.1.saturating_sub(self.machine.1) as f64;
        Usage {
            roles,
            wall: (later.at - self.at).as_secs_f64(),
            machine_busy: if all > 0.0 { busy / all } else { 0.0 },
            switches: (
                later.switches.0.saturating_sub(self.switches.0),
                later.switches.1.saturating_sub(self.switches.1),
            ),
        }
    }
}

impl Usage {
    /// The CPU of two windows together (the machine's busy share weighted by wall time).
    pub fn merge(self, other: Usage) -> Usage {
        let mut roles = self.roles;
        for (r, s) in other.roles {
            *roles.entry(r).or_insert(0.0) += s;
        }
        let wall = self.wall + other.wall;
        Usage {
            roles,
            wall,
            machine_busy: if wall > 0.0 {
                (self.machine_busy * self.wall + other.machine_busy * other.wall) / wall
            } else {
                0.0
            },
            switches: (self.switches.0 + other.switches.0, self.switches.1 + other.switches.1),
        }
    }

    /// Total CPU seconds of this process.
    pub fn total(&self) -> f64 {
        self.roles.values().sum()
    }

    /// "µs of CPU per request by role", for `requests` requests.
    pub fn per_request(&self, requests: u64) -> String {
        let n = requests.max(1) as f64;
        let mut parts: Vec<String> = self
            .roles
            .iter()
            .filter(|(_, s)| **s > 0.0)
            .map(|(r, s)| format!("{r} {:.1}", s * 1e6 / n))
            .collect();
        parts.push(format!("total {:.1} µs", self.total() * 1e6 / n));
        format!(
            "{} (process {:.2} cores, machine {:.0}% busy; context switches per call {:.2} voluntary, {:.2} involuntary)",
            parts.join(", "),
            self.total() / self.wall,
            self.machine_busy * 100.0,
            self.switches.0 as f64 / n,
            self.switches.1 as f64 / n,
        )
    }
}
