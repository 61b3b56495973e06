//! `tribute provider evaluate …`: runs a built-in valuator over files and writes the
//! evaluation record as JSON (for `tribute evaluator submit`).

use super::input::InputFile;
use super::record::{evaluate, EvaluationParams, Inputs};
use super::ValuationError;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A progress bar is shown (on a terminal) from this many training × test pairs.
const PROGRESS_MIN_PAIRS: u64 = 20_000_000;

const KNN_HELP: &str = "\
A dataset's score is the SUM of its training points' KNN-Shapley values; the datasets'
scores add up to the full model's score U(all) (the K-nearest-neighbour utility of all
training points). Each value is a mean over the test points; the 95% interval is
value ± 1.96·sd/√m over the m per-test-point dataset sums.

Files (a file starting with the .npy magic is read as .npy, anything else as CSV without
a header row):
  embeddings  2-D float32/float64 .npy (C order), or CSV: one row of numbers per point
  labels      1-D integer .npy, or CSV: one integer per line
  datasets    text: one dataset hash (64 hex) per line, line i = training row i

benchmark_sha256 = `cat TEST_EMBEDDINGS TEST_LABELS | sha256sum`. The evaluation id is a
hash of the inputs, K, model, version and benchmark id: a rerun gives the same record.

Example:
  tribute provider evaluate knn-shapley \\
      --train-embeddings train.npy --train-labels train_labels.npy --train-datasets train_datasets.txt \\
      --test-embeddings test.npy --test-labels test_labels.npy -k 5 \\
      --model llm-a --attribution-version 3 --benchmark-id mmlu-emb-v1 --out eval.json
  tribute evaluator submit eval.json";

/// `tribute provider evaluate`.
#[derive(Debug, Subcommand)]
pub enum EvaluateCommand {
    /// Exact KNN-Shapley values of training points (embeddings + labels), summed per
    /// dataset into an evaluation record.
    #[command(name = "knn-shapley", after_help = KNN_HELP)]
    KnnShapley(KnnShapleyArgs),
}

/// Arguments of `knn-shapley`.
#[derive(Debug, Args)]
pub struct KnnShapleyArgs {
    /// Training embeddings (.npy or CSV).
    #[arg(long, value_name = "FILE")]
    pub train_embeddings: PathBuf,
    /// Training labels (.npy or CSV), one per training point.
    #[arg(long, value_name = "FILE")]
    pub train_labels: PathBuf,
    /// The dataset of each training point: one dataset hash (64 hex) per line.
    #[arg(long, value_name = "FILE")]
    pub train_datasets: PathBuf,
    /// Test embeddings (.npy or CSV): the benchmark.
    #[arg(long, value_name = "FILE")]
    pub test_embeddings: PathBuf,
    /// Test labels (.npy or CSV), one per test point.
    #[arg(long, value_name = "FILE")]
    pub test_labels: PathBuf,
    /// K of the K-nearest-neighbour utility.
    #[arg(short = 'k', long = "k", default_value_t = 5)]
    pub k: usize,
    /// The model the record is about.
    #[arg(long)]
    pub model: String,
    /// The model's attribution version.
    #[arg(long)]
    pub attribution_version: u64,
    /// The benchmark's name.
    #[arg(long)]
    pub benchmark_id: String,
    /// Write the record here (atomically) instead of standard output.
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
    /// Also write every training point's value: CSV `row,dataset,value`.
    #[arg(long, value_name = "FILE.csv")]
    pub values_out: Option<PathBuf>,
    /// Worker threads (default: all cores). The result does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar or summary on standard error.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs an `evaluate` subcommand.
pub fn run(cmd: EvaluateCommand) -> Result<(), ValuationError> {
    match cmd {
        EvaluateCommand::KnnShapley(args) => knn_shapley(args),
    }
}

fn knn_shapley(a: KnnShapleyArgs) -> Result<(), ValuationError> {
    let started = Instant::now();
    let inputs = Inputs {
        train_embeddings: InputFile::read(&a.train_embeddings)?,
        train_labels: InputFile::read(&a.train_labels)?,
        train_datasets: InputFile::read(&a.train_datasets)?,
        test_embeddings: InputFile::read(&a.test_embeddings)?,
        test_labels: InputFile::read(&a.test_labels)?,
    };
    let threads = match a.threads {
        Some(0) => return Err(ValuationError::Argument("--threads must be at least 1".into())),
        Some(t) => t,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let params = EvaluationParams {
        model_id: a.model,
        attribution_version: a.attribution_version,
        benchmark_id: a.benchmark_id,
        k: a.k,
        threads,
    };
    let (train_points, test_points) = sizes(&inputs);
    let bar = if !a.quiet
        && std::io::stderr().is_terminal()
        && train_points.saturating_mul(test_points) >= PROGRESS_MIN_PAIRS
    {
        let bar = ProgressBar::with_draw_target(Some(test_points), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "knn-shapley {wide_bar} {pos}/{len} test points {per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let evaluation = evaluate(&inputs, &params, &|done: usize| bar.inc(done as u64));
    bar.finish_and_clear();
    finish(&a.out, &a.values_out, a.quiet, started, evaluation?)
}

/// (training points, test points), cheaply, to decide on a progress bar: the length of a
/// .npy labels file or the lines of a CSV one (0 when unreadable: parsing reports that).
fn sizes(inputs: &Inputs) -> (u64, u64) {
    let rows = |f: &InputFile| -> u64 {
        if f.bytes.starts_with(b"\x93NUMPY") {
            super::npy::Npy::parse(&f.bytes)
                .ok()
                .and_then(|n| n.shape.first().map(|r| *r as u64))
                .unwrap_or(0)
        } else {
            f.bytes.iter().filter(|b| **b == b'\n').count() as u64
        }
    };
    (rows(&inputs.train_labels), rows(&inputs.test_labels))
}

fn finish(
    out: &Option<PathBuf>,
    values_out: &Option<PathBuf>,
    quiet: bool,
    started: Instant,
    evaluation: super::record::Evaluation,
) -> Result<(), ValuationError> {
    let r = &evaluation.result;
    let mut json = serde_json::to_string_pretty(&evaluation.record)
        .map_err(|e| ValuationError::Argument(format!("JSON: {e}")))?;
    json.push('\n');
    if let Some(path) = values_out {
        write_atomically(path, evaluation.values_csv().as_bytes())?;
    }
    match out {
        Some(path) => write_atomically(path, json.as_bytes())?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(json.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| {
                ValuationError::Output { path: "stdout".into(), detail: e.to_string() }
            })?;
        }
    }
    if !quiet {
        let sum: f64 = r.values.iter().sum();
        eprintln!(
            "knn-shapley: {} training points in {} datasets, {} test points, K = {}",
            r.values.len(),
            evaluation.datasets.len(),
            r.test_points,
            r.k
        );
        eprintln!(
            "full_score U(all) = {}; Σ values = {sum} (= U(all) − U(∅), U(∅) = 0)",
            r.full_score
        );
        eprintln!(
            "evaluation {} in {:.2} s (CPU: distances {:.2} s, ordering {:.2} s, recursion {:.2} s)",
            evaluation.record.evaluation_id,
            started.elapsed().as_secs_f64(),
            r.phases.distance.as_secs_f64(),
            r.phases.rank.as_secs_f64(),
            r.phases.recursion.as_secs_f64()
        );
        if let Some(path) = out {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory: the
/// file is either the old one or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ValuationError> {
    let err = |e: std::io::Error| ValuationError::Output {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}
