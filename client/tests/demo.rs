//! The README's first command: `tribute demo` runs the whole system (dev chain, tributed and
//! its ldk-node, contributors' ldk-nodes and receiving nodes), prints its summary, and every
//! figure it prints is re-derived from the daemon's database by `reconcile`.

use std::path::Path;
use std::process::Command;
use tribute_client::keys::ContributorKey;
use tribute_daemon::reconcile::{self, Options};

/// One printed row of the summary table.
#[derive(Debug)]
struct Row {
    name: String,
    weight: u64,
    accrued_nsat: u128,
    paid_msat: u64,
    payouts: u64,
    outstanding_nsat: u128,
    verified: String,
}

/// `1,234.567890` (msat, six decimals) → nsat.
fn nsat(s: &str) -> u128 {
    let (whole, frac) = s.split_once('.').unwrap_or_else(|| panic!("no decimals in {s}"));
    assert_eq!(frac.len(), 6, "{s}");
    whole.replace(',', "").parse::<u128>().expect("msat") * 1_000_000
        + frac.parse::<u128>().expect("nsat")
}

fn rows(stdout: &str, names: &[&str]) -> Vec<Row> {
    names
        .iter()
        .map(|name| {
            let line = stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("no row for {name} in\n{stdout}"));
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 7, "{line}");
            Row {
                name: f[0].to_owned(),
                weight: f[1].split_once('/').expect("w/total").0.parse().expect("weight"),
                accrued_nsat: nsat(f[2]),
                paid_msat: f[3].replace(',', "").parse().expect("paid"),
                payouts: f[4].parse().expect("payouts"),
                outstanding_nsat: nsat(f[5]),
                verified: f[6].to_owned(),
            }
        })
        .collect()
}

#[test]
fn the_demo_completes_and_reconcile_rederives_its_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_tribute"))
        .args(["demo", "--quiet", "--requests", "3000", "--rounds", "2", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("Metered 3000 requests"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.matches("[ok]").count() >= 5, "{stdout}");

    let names = ["ada", "grace", "alan"];
    let printed = rows(&stdout, &names);
    assert_eq!(printed.iter().map(|r| r.weight).collect::<Vec<_>>(), [5, 3, 2]);

    // Re-derive from the raw records, pinning the provider key from the daemon's key file.
    let db = data.join("daemon").join("tribute.sqlite");
    let report = reconcile::reconcile_file_with(&db, &Options::default()).expect("reconcile runs");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.checked.meter_events, 3000);
    for row in &printed {
        let key = ContributorKey::load(&data.join(&row.name).join("contributor.key")).expect("key");
        let c = report
            .channels
            .iter()
            .find(|c| c.contributor_key == key.public().to_string())
            .unwrap_or_else(|| panic!("no channel for {}", row.name));
        assert_eq!(c.accrued_nsat, row.accrued_nsat, "{} accrued", row.name);
        assert_eq!(c.settled_msat, row.paid_msat, "{} paid", row.name);
        assert_eq!(c.outstanding_nsat, row.outstanding_nsat, "{} outstanding", row.name);
        assert_eq!(c.settlements, row.payouts, "{} payouts", row.name);
        assert_eq!(row.verified, "yes");
        // Two rounds, each paying the whole msat; only the sub-msat remainder is left.
        assert!(row.outstanding_nsat < 1_000_000);
    }
    let printed_accrued: u128 = printed.iter().map(|r| r.accrued_nsat).sum();
    assert_eq!(report.totals.pools_nsat, printed_accrued);
    assert_eq!(report.totals.accrued_nsat, printed_accrued);
    assert_eq!(
        u128::from(report.totals.settled_msat) * 1_000_000 + report.totals.outstanding_nsat,
        printed_accrued
    );
    // (A payout may fail and be retried under a new settlement; none is left pending.)
    assert_eq!(report.totals.settlements_pending, 0);
    assert!(Path::new(&db).exists());
}
