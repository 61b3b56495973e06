//! `tribute report …`: accountants' statements and the journal, from a ledger database
//! file (a backup), as text, CSV or JSON.

use crate::amounts::msat_decimal;
use crate::error::ClientError;
use crate::time::{format_time, parse_time, unix_now};
use clap::{Subcommand, ValueEnum};
use std::path::PathBuf;
use tribute_channels::PublicKey;
use tribute_daemon::report::{self, JournalEntry, Statement};

/// `tribute report` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// A contributor's statement for a period: opening balance, accruals by day,
    /// settlements (payment hash, preimage, fee), closing balance.
    #[command(
        after_help = "Example:\n  tribute report statement ledger.sqlite --contributor 3f2a…(64 hex) --from 2026-11-01 --until 2026-12-01 --format csv"
    )]
    Statement {
        /// The database file (a backup; read-only).
        db: PathBuf,
        /// The contributor key (64 hex digits).
        #[arg(long, value_name = "HEX")]
        contributor: String,
        /// Period start (inclusive): now, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long, default_value = "0")]
        from: String,
        /// Period end (exclusive), same forms.
        #[arg(long, default_value = "now")]
        until: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Every balance change of every channel (credits per receipt batch, debits per
    /// settlement) with the running outstanding balance.
    #[command(
        after_help = "Example:\n  tribute report journal ledger.sqlite --format csv > journal.csv"
    )]
    Journal {
        /// The database file (a backup; read-only).
        db: PathBuf,
        /// Output format (text is CSV).
        #[arg(long, value_enum, default_value_t = Format::Csv)]
        format: Format,
    },
    /// Every dataset's and contributor's reputation, recomputed from the signed evaluation
    /// records in the file (signatures checked again) at `--as-of`.
    #[command(
        after_help = "Example:\n  tribute report reputation ledger.sqlite --as-of 2026-12-01 --format json"
    )]
    Reputation {
        /// The database file (a backup; read-only).
        db: PathBuf,
        /// Reference time for the decay: now, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long, default_value = "now")]
        as_of: String,
        /// Output format (text or JSON; CSV is not offered).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// RFC 4180 CSV with a header row.
    Csv,
    /// JSON (nanosat amounts as decimal strings).
    Json,
}

fn failed(e: impl std::fmt::Display) -> ClientError {
    ClientError::Config(e.to_string())
}

/// Runs one `tribute report` command, printing to stdout.
pub fn run(cmd: ReportCommand) -> Result<(), ClientError> {
    match cmd {
        ReportCommand::Statement { db, contributor, from, until, format } => {
            let key = PublicKey::from_hex(contributor.trim())
                .map_err(|e| ClientError::Config(format!("--contributor: {e}")))?;
            let now = unix_now();
            let time = |name: &str, s: &str| {
                parse_time(s, now)
                    .map(|t| t.0)
                    .map_err(|e| ClientError::Config(format!("--{name}: {e}")))
            };
            let st =
                report::statement_of_file(&db, &key, time("from", &from)?, time("until", &until)?)
                    .map_err(failed)?;
            match format {
                Format::Json => print_json(&st),
                Format::Csv => statement_csv(&st, std::io::stdout().lock()),
                Format::Text => {
                    print!("{}", statement_text(&st));
                    Ok(())
                }
            }
        }
        ReportCommand::Reputation { db, as_of, format } => {
            let as_of = parse_time(&as_of, unix_now())
                .map_err(|e| ClientError::Config(format!("--as-of: {e}")))?;
            let (r, _) = tribute_daemon::reputation::report_of_file(
                &db,
                as_of,
                &tribute_channels::reputation::Params::DEFAULT,
            )
            .map_err(failed)?;
            match format {
                Format::Json => print_json(&crate::reputation::report_json(&r)),
                Format::Csv | Format::Text => {
                    print!("{}", crate::reputation::report_text(&r));
                    Ok(())
                }
            }
        }
        ReportCommand::Journal { db, format } => {
            let entries = report::journal_of_file(&db).map_err(failed)?;
            match format {
                Format::Json => print_json(&entries),
                Format::Csv | Format::Text => journal_csv(&entries, std::io::stdout().lock()),
            }
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), ClientError> {
    println!("{}", serde_json::to_string_pretty(v).map_err(failed)?);
    Ok(())
}

fn day_text(day: u64) -> String {
    format_time(day * 86_400)[..10].to_owned()
}

/// The statement for people.
pub fn statement_text(st: &Statement) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "Statement for contributor {}", st.contributor_key);
    let _ = writeln!(s, "Period {} to {} (exclusive)", format_time(st.from), format_time(st.until));
    let _ = writeln!(s, "Channels {}", st.channels.join(", "));
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<24} {:>24} {:>24}", "", "msat", "outstanding msat");
    let _ = writeln!(
        s,
        "{:<24} {:>24} {:>24}",
        "opening (accrued)",
        msat_decimal(st.opening.accrued_nsat),
        msat_decimal(st.opening.outstanding_nsat)
    );
    for d in &st.accruals {
        let _ = writeln!(
            s,
            "{:<24} {:>24}   ({} batches)",
            format!("accrued {}", day_text(d.day)),
            msat_decimal(d.nsat),
            d.batches
        );
    }
    for p in &st.settlements {
        let _ = writeln!(
            s,
            "{:<24} {:>24}   #{} {} fee {} msat hash {} preimage {}",
            format!("paid {}", &format_time(p.at)[..10]),
            format!("-{}", msat_decimal(u128::from(p.amount_msat) * 1_000_000)),
            p.settlement_id,
            p.method,
            p.fee_msat.map_or_else(|| "-".to_owned(), |f| f.to_string()),
            p.payment_hash,
            p.preimage
        );
    }
    let _ = writeln!(
        s,
        "{:<24} {:>24} {:>24}",
        "closing (accrued)",
        msat_decimal(st.closing.accrued_nsat),
        msat_decimal(st.closing.outstanding_nsat)
    );
    let _ = writeln!(
        s,
        "\nIn the period: accrued {} msat, paid {} msat in {} settlement(s) (fees {} msat, paid by the provider).",
        msat_decimal(st.accrued_nsat),
        st.settled_msat,
        st.settlements.len(),
        st.fees_msat
    );
    s
}

/// The statement as CSV: one row for the opening balance, one per accrual day, one per
/// settlement, one for the closing balance; `balance_nsat` is the running outstanding
/// balance.
pub fn statement_csv(st: &Statement, out: impl std::io::Write) -> Result<(), ClientError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "line",
        "date",
        "reference",
        "credit_nsat",
        "debit_nsat",
        "balance_nsat",
        "payment_hash",
        "preimage",
        "fee_msat",
    ])
    .map_err(failed)?;
    let mut balance = st.opening.outstanding_nsat;
    let row = |w: &mut csv::Writer<_>, cells: [String; 9]| w.write_record(&cells).map_err(failed);
    row(
        &mut w,
        [
            "opening".into(),
            format_time(st.from),
            String::new(),
            String::new(),
            String::new(),
            balance.to_string(),
            String::new(),
            String::new(),
            String::new(),
        ],
    )?;
    // Accruals and settlements in time order (a day's accruals before its settlements).
    let mut lines: Vec<(u64, bool, [String; 9])> = Vec::new();
    for d in &st.accruals {
        lines.push((
            d.day * 86_400,
            false,
            [
                "accrual".into(),
                day_text(d.day),
                format!("{} batches", d.batches),
                d.nsat.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        ));
    }
    for p in &st.settlements {
        lines.push((
            p.at,
            true,
            [
                "settlement".into(),
                format_time(p.at),
                p.settlement_id.to_string(),
                String::new(),
                (u128::from(p.amount_msat) * 1_000_000).to_string(),
                String::new(),
                p.payment_hash.clone(),
                p.preimage.clone(),
                p.fee_msat.map(|f| f.to_string()).unwrap_or_default(),
            ],
        ));
    }
    lines.sort_by_key(|(at, settlement, _)| (*at / 86_400, *settlement, *at));
    for (_, _, mut cells) in lines {
        let credit: u128 = cells[3].parse().unwrap_or(0);
        let debit: u128 = cells[4].parse().unwrap_or(0);
        balance = (balance + credit).saturating_sub(debit);
        cells[5] = balance.to_string();
        row(&mut w, cells)?;
    }
    row(
        &mut w,
        [
            "closing".into(),
            format_time(st.until),
            String::new(),
            String::new(),
            String::new(),
            st.closing.outstanding_nsat.to_string(),
            String::new(),
            String::new(),
            String::new(),
        ],
    )?;
    w.flush().map_err(failed)
}

/// The journal as CSV.
pub fn journal_csv(entries: &[JournalEntry], out: impl std::io::Write) -> Result<(), ClientError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "at",
        "kind",
        "contributor_key",
        "channel_id",
        "reference",
        "credit_nsat",
        "debit_nsat",
        "balance_nsat",
        "payment_hash",
        "preimage",
        "fee_msat",
    ])
    .map_err(failed)?;
    for e in entries {
        w.write_record([
            format_time(e.at),
            format!("{:?}", e.kind).to_ascii_lowercase(),
            e.contributor_key.clone(),
            e.channel_id.clone(),
            e.reference.to_string(),
            e.credit_nsat.to_string(),
            e.debit_nsat.to_string(),
            e.balance_nsat.to_string(),
            e.payment_hash.clone(),
            e.preimage.clone(),
            e.fee_msat.map(|f| f.to_string()).unwrap_or_default(),
        ])
        .map_err(failed)?;
    }
    w.flush().map_err(failed)
}
