//! The KNN-Shapley valuator: the closed-form recursion against brute-force Shapley values
//! (every coalition enumerated, the same utility and tie-breaking) on random instances of
//! up to 10 training points, efficiency (Σ values = U(all) − U(∅)), the confidence
//! intervals, determinism across thread counts, and the `tribute provider evaluate
//! knn-shapley` command on fixture files written by NumPy (`tests/fixtures/knn/make.py`).

mod common;

use bitcoin::hashes::{sha256, Hash, HashEngine};
use common::stderr;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tribute_client::valuation::input::InputFile;
use tribute_client::valuation::{
    evaluate, knn_shapley, EvaluationParams, EvaluationRecord, Inputs, KnnOptions, KnnShapley,
    Matrix, TestSet, TrainSet,
};

/// A small instance in plain vectors (integer coordinates: distances are exact in f32 and
/// f64 alike, and ties are frequent).
#[derive(Debug, Clone)]
struct Instance {
    k: usize,
    train: Vec<Vec<f64>>,
    train_labels: Vec<i64>,
    groups: Vec<u32>,
    test: Vec<Vec<f64>>,
    test_labels: Vec<i64>,
}

const GROUPS: usize = 3;

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// U(S): mean over test points of (1/K)·#{k ≤ min(K,|S|): k-th nearest of S has the test
/// label}, nearest = smallest distance, then lowest row. U(∅) = 0.
fn utility(inst: &Instance, subset: u32) -> f64 {
    let mut total = 0.0;
    for (t, y) in inst.test.iter().zip(&inst.test_labels) {
        let mut members: Vec<(f64, usize)> = (0..inst.train.len())
            .filter(|i| subset & (1 << i) != 0)
            .map(|i| (sq_dist(&inst.train[i], t), i))
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let hits = members.iter().take(inst.k).filter(|(_, i)| inst.train_labels[*i] == *y).count();
        total += hits as f64 / inst.k as f64;
    }
    total / inst.test.len() as f64
}

/// φ_i = Σ_{S ⊆ N∖{i}} |S|! (n−|S|−1)! / n! · (U(S ∪ {i}) − U(S)).
fn brute_force_shapley(inst: &Instance) -> Vec<f64> {
    let n = inst.train.len();
    let u: Vec<f64> = (0..1u32 << n).map(|s| utility(inst, s)).collect();
    let fact = |x: usize| (1..=x).map(|v| v as f64).product::<f64>();
    (0..n)
        .map(|i| {
            (0..1u32 << n)
                .filter(|s| s & (1 << i) == 0)
                .map(|s| {
                    let size = s.count_ones() as usize;
                    let weight = fact(size) * fact(n - size - 1) / fact(n);
                    weight * (u[(s | (1 << i)) as usize] - u[s as usize])
                })
                .sum()
        })
        .collect()
}

fn matrix<T: tribute_client::valuation::knn::Element>(
    rows: &[Vec<f64>],
    conv: impl Fn(f64) -> T,
) -> Matrix<T> {
    let cols = rows[0].len();
    Matrix::new(rows.len(), cols, rows.iter().flatten().map(|v| conv(*v)).collect())
        .expect("matrix")
}

fn run<T: tribute_client::valuation::knn::Element>(
    inst: &Instance,
    conv: impl Fn(f64) -> T + Copy,
    threads: usize,
) -> KnnShapley {
    let train = matrix(&inst.train, conv);
    let test = matrix(&inst.test, conv);
    knn_shapley(
        TrainSet {
            embeddings: &train,
            labels: &inst.train_labels,
            group_of: &inst.groups,
            groups: GROUPS,
        },
        TestSet { embeddings: &test, labels: &inst.test_labels },
        KnnOptions { k: inst.k, threads },
        &|_| {},
    )
    .expect("knn_shapley")
}

/// Everything but the timings.
fn same_result(a: &KnnShapley, b: &KnnShapley) -> bool {
    a.k == b.k
        && a.test_points == b.test_points
        && a.values.iter().map(|v| v.to_bits()).eq(b.values.iter().map(|v| v.to_bits()))
        && a.full_score.to_bits() == b.full_score.to_bits()
        && a.groups == b.groups
}

fn instance(
    max_train: usize,
    max_test: usize,
    dims: usize,
    max_k: usize,
) -> impl Strategy<Value = Instance> {
    (1..=max_train, 2..=max_test, 1..=dims, 1..=max_k).prop_flat_map(|(n, m, d, k)| {
        let point = || prop::collection::vec((-2i8..=2).prop_map(f64::from), d);
        (
            Just(k),
            prop::collection::vec(point(), n),
            prop::collection::vec(0i64..3, n),
            prop::collection::vec(0u32..GROUPS as u32, n),
            prop::collection::vec(point(), m),
            prop::collection::vec(0i64..3, m),
        )
            .prop_map(|(k, train, train_labels, groups, test, test_labels)| Instance {
                k,
                train,
                train_labels,
                groups,
                test,
                test_labels,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The acceptance criterion: within 1e-9 of brute force, with ties and K > N, and the
    /// values sum to U(all) − U(∅).
    #[test]
    fn recursion_equals_brute_force_shapley(inst in instance(10, 4, 3, 12)) {
        let got = run(&inst, |v| v, 1);
        let want = brute_force_shapley(&inst);
        for (i, (g, w)) in got.values.iter().zip(&want).enumerate() {
            prop_assert!((g - w).abs() <= 1e-9, "point {i}: recursion {g}, brute force {w}");
        }
        let all = utility(&inst, (1u32 << inst.train.len()) - 1);
        let empty = utility(&inst, 0);
        prop_assert_eq!(empty, 0.0);
        prop_assert!((got.full_score - all).abs() <= 1e-12, "U(all) {} vs {all}", got.full_score);
        let sum: f64 = got.values.iter().sum();
        prop_assert!((sum - (all - empty)).abs() <= 1e-9, "Σ values {sum} vs U(all) {all}");
        // A group's score is the sum of its points' values.
        for g in 0..GROUPS {
            let want: f64 = want.iter().zip(&inst.groups).filter(|(_, h)| **h as usize == g).map(|(v, _)| v).sum();
            prop_assert!((got.groups[g].value - want).abs() <= 1e-9);
            prop_assert_eq!(got.groups[g].samples, inst.test.len() as u64);
        }
        // Exact inputs: f32 gives the same bits; so do more threads.
        prop_assert!(same_result(&got, &run(&inst, |v| v as f32, 1)));
        prop_assert!(same_result(&got, &run(&inst, |v| v, 3)));
    }
}

/// Test point j's group sums, taken alone (a test set of two copies of it has that mean
/// and no spread).
fn per_test_group_sums(inst: &Instance) -> Vec<Vec<f64>> {
    (0..inst.test.len())
        .map(|j| {
            let alone = Instance {
                test: vec![inst.test[j].clone(); 2],
                test_labels: vec![inst.test_labels[j]; 2],
                ..inst.clone()
            };
            let r = run(&alone, |v| v, 1);
            assert!(r.groups.iter().all(|g| g.sd == 0.0), "two equal test points have no spread");
            r.groups.iter().map(|g| g.value).collect()
        })
        .collect()
}

fn lcg(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

fn random_instance(seed: u64, n: usize, m: usize, d: usize, k: usize) -> Instance {
    let mut s = seed;
    let point = |s: &mut u64| (0..d).map(|_| (lcg(s) % 41) as f64 - 20.0).collect::<Vec<_>>();
    let train = (0..n).map(|_| point(&mut s)).collect();
    let test = (0..m).map(|_| point(&mut s)).collect();
    Instance {
        k,
        train,
        train_labels: (0..n).map(|_| (lcg(&mut s) % 4) as i64).collect(),
        groups: (0..n).map(|_| (lcg(&mut s) % GROUPS as u64) as u32).collect(),
        test,
        test_labels: (0..m).map(|_| (lcg(&mut s) % 4) as i64).collect(),
    }
}

#[test]
fn the_interval_is_mean_plus_minus_1_96_sd_over_root_m_of_the_per_test_point_sums() {
    let inst = random_instance(7, 60, 9, 3, 4);
    let r = run(&inst, |v| v, 2);
    let sums = per_test_group_sums(&inst);
    let m = inst.test.len() as f64;
    for g in 0..GROUPS {
        let xs: Vec<f64> = sums.iter().map(|s| s[g]).collect();
        let mean = xs.iter().sum::<f64>() / m;
        let sd = (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (m - 1.0)).sqrt();
        let got = r.groups[g];
        assert!(sd > 1e-3, "the instance should have spread (group {g}: {sd})");
        assert!((got.value - mean).abs() <= 1e-12, "group {g}: {} vs {mean}", got.value);
        assert!((got.sd - sd).abs() <= 1e-9, "group {g}: sd {} vs {sd}", got.sd);
        let half = 1.96 * sd / m.sqrt();
        assert!((got.ci_low - (mean - half)).abs() <= 1e-9);
        assert!((got.ci_high - (mean + half)).abs() <= 1e-9);
        assert_eq!(got.samples, 9);
    }
}

#[test]
fn the_result_is_bit_identical_for_any_thread_count_and_efficiency_holds() {
    let inst = random_instance(42, 3000, 53, 16, 5);
    let one = run(&inst, |v| v as f32, 1);
    for threads in [2, 3, 8] {
        assert!(same_result(&one, &run(&inst, |v| v as f32, threads)), "{threads} threads");
    }
    let sum: f64 = one.values.iter().sum();
    assert!((sum - one.full_score).abs() <= 1e-9, "Σ values {sum} vs U(all) {}", one.full_score);
    let group_sum: f64 = one.groups.iter().map(|g| g.value).sum();
    assert!((group_sum - one.full_score).abs() <= 1e-9);
    assert!(one.full_score > 0.0 && one.values.iter().any(|v| *v < 0.0), "a non-trivial instance");
}

#[test]
fn k_at_least_n_gives_each_point_its_match_rate_over_k() {
    // With K ≥ N the utility is additive: φ_i = mean_j 1[y_i = y_j] / K.
    let inst = random_instance(3, 7, 5, 2, 9);
    let r = run(&inst, |v| v, 1);
    for (i, v) in r.values.iter().enumerate() {
        let matches = inst.test_labels.iter().filter(|y| **y == inst.train_labels[i]).count();
        let want = matches as f64 / 5.0 / 9.0;
        assert!((v - want).abs() <= 1e-15, "point {i}: {v} vs {want}");
    }
}

#[test]
fn inputs_that_do_not_fit_are_refused() {
    let inst = random_instance(1, 5, 3, 2, 2);
    let train = matrix(&inst.train, |v| v);
    let test = matrix(&inst.test, |v| v);
    let one_test = matrix(&inst.test[..1], |v| v);
    let wide = matrix(&[vec![0.0; 3], vec![1.0; 3]], |v| v);
    let ts = TrainSet {
        embeddings: &train,
        labels: &inst.train_labels,
        group_of: &inst.groups,
        groups: GROUPS,
    };
    let case = |train: TrainSet<'_, f64>, test: TestSet<'_, f64>, k: usize| {
        knn_shapley(train, test, KnnOptions { k, threads: 1 }, &|_| {})
            .expect_err("refused")
            .to_string()
    };
    let tl = &inst.test_labels;
    assert!(case(ts, TestSet { embeddings: &test, labels: tl }, 0).contains("K must be at least 1"));
    assert!(case(ts, TestSet { embeddings: &one_test, labels: &tl[..1] }, 2).contains("at least 2"));
    assert!(case(ts, TestSet { embeddings: &wide, labels: &tl[..2] }, 2).contains("columns"));
    assert!(case(ts, TestSet { embeddings: &test, labels: &tl[..2] }, 2)
        .contains("2 test labels for 3"));
    let short = TrainSet { labels: &inst.train_labels[..4], ..ts };
    assert!(case(short, TestSet { embeddings: &test, labels: tl }, 2).contains("4 training labels"));
    let bad_group = [0, 1, 2, 3, 0];
    let out_of_range = TrainSet { group_of: &bad_group, ..ts };
    assert!(case(out_of_range, TestSet { embeddings: &test, labels: tl }, 2).contains("row 3"));
}

// ---- the command line, on fixtures written by NumPy ----

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/knn")
}

fn tribute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tribute"))
        .args(["provider", "evaluate", "knn-shapley"])
        .args(args)
        .env_remove("TRIBUTE_CLI_CONFIG")
        .output()
        .expect("runs")
}

struct Files {
    train: PathBuf,
    train_labels: PathBuf,
    train_datasets: PathBuf,
    test: PathBuf,
    test_labels: PathBuf,
}

impl Files {
    fn npy() -> Files {
        let f = fixtures();
        Files {
            train: f.join("train.f32.npy"),
            train_labels: f.join("train_labels.npy"),
            train_datasets: f.join("train_datasets.txt"),
            test: f.join("test.f32.npy"),
            test_labels: f.join("test_labels.npy"),
        }
    }

    fn csv() -> Files {
        let f = fixtures();
        Files {
            train: f.join("train.csv"),
            train_labels: f.join("train_labels.csv"),
            train_datasets: f.join("train_datasets.txt"),
            test: f.join("test.csv"),
            test_labels: f.join("test_labels.csv"),
        }
    }

    fn args(&self) -> Vec<String> {
        let p = |x: &Path| x.display().to_string();
        vec![
            "--train-embeddings".into(),
            p(&self.train),
            "--train-labels".into(),
            p(&self.train_labels),
            "--train-datasets".into(),
            p(&self.train_datasets),
            "--test-embeddings".into(),
            p(&self.test),
            "--test-labels".into(),
            p(&self.test_labels),
            "-k".into(),
            "3".into(),
            "--model".into(),
            "llm-a".into(),
            "--attribution-version".into(),
            "2".into(),
            "--benchmark-id".into(),
            "fixture-bench".into(),
        ]
    }

    fn library(&self) -> tribute_client::valuation::Evaluation {
        let read = |p: &Path| InputFile::read(p).expect("read");
        let inputs = Inputs {
            train_embeddings: read(&self.train),
            train_labels: read(&self.train_labels),
            train_datasets: read(&self.train_datasets),
            test_embeddings: read(&self.test),
            test_labels: read(&self.test_labels),
        };
        let params = EvaluationParams {
            model_id: "llm-a".into(),
            attribution_version: 2,
            benchmark_id: "fixture-bench".into(),
            k: 3,
            threads: 1,
        };
        evaluate(&inputs, &params, &|_| {}).expect("evaluate")
    }
}

/// The record as the CLI writes it.
fn json(record: &EvaluationRecord) -> String {
    serde_json::to_string_pretty(record).expect("json") + "\n"
}

/// Runs the CLI with `files` (+ `extra`), expects success, returns the record and the
/// per-point CSV.
fn cli_run(
    files: &Files,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (EvaluationRecord, String, Vec<u8>) {
    let out = dir.join(format!("{name}.json"));
    let values = dir.join(format!("{name}.csv"));
    let mut args = files.args();
    args.extend(["--out".into(), out.display().to_string()]);
    args.extend(["--values-out".into(), values.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tribute(&args);
    assert!(o.status.success(), "tribute failed: {}", stderr(&o));
    let bytes = std::fs::read(&out).expect("record written");
    let record: EvaluationRecord = serde_json::from_slice(&bytes).expect("record parses");
    (record, std::fs::read_to_string(&values).expect("values written"), bytes)
}

#[test]
fn the_cli_writes_the_library_result_for_npy_and_csv_fixtures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let npy = Files::npy();
    let csv = Files::csv();
    let (record, values, bytes) = cli_run(&npy, dir.path(), "npy", &[]);
    let lib = npy.library();
    // Byte for byte (serde_json's default float parser may be one ulp off, its printer is
    // exact, so records are compared as the text written).
    assert_eq!(String::from_utf8_lossy(&bytes), json(&lib.record));
    assert_eq!(values, lib.values_csv());

    // The record's shape and its invariants.
    let parsed: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let keys: Vec<&str> = parsed.as_object().expect("object").keys().map(String::as_str).collect();
    let mut want_keys = vec![
        "evaluation_id",
        "model_id",
        "attribution_version",
        "benchmark_id",
        "benchmark_sha256",
        "metric",
        "higher_is_better",
        "full_score",
        "datasets",
    ];
    want_keys.sort();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort();
    assert_eq!(keys_sorted, want_keys);
    assert_eq!(record.metric, "knn-utility");
    assert!(record.higher_is_better);
    assert_eq!(record.model_id, "llm-a");
    assert_eq!(record.attribution_version, 2);
    assert_eq!(record.evaluation_id.len(), 64);
    let datasets: Vec<&str> = record.datasets.iter().map(|d| d.dataset.as_str()).collect();
    assert_eq!(datasets, ["11".repeat(32), "22".repeat(32), "33".repeat(32)]);
    let sum: f64 = record.datasets.iter().map(|d| d.value.expect("value")).sum();
    assert!((sum - record.full_score).abs() <= 1e-12, "Σ dataset scores {sum} vs U(all)");
    for d in &record.datasets {
        assert_eq!(d.method, "knn-shapley");
        assert_eq!(d.samples, Some(5));
        assert!(d.ci_low <= d.value && d.value <= d.ci_high, "{d:?}");
        assert!(d.ci_low.is_some() && d.ablation_score.is_none(), "{d:?}");
    }
    // benchmark_sha256 = `cat TEST_EMBEDDINGS TEST_LABELS | sha256sum`.
    let mut e = sha256::Hash::engine();
    e.input(&std::fs::read(&npy.test).expect("read"));
    e.input(&std::fs::read(&npy.test_labels).expect("read"));
    assert_eq!(record.benchmark_sha256, hex::encode(sha256::Hash::from_engine(e).to_byte_array()));

    // The same points as CSV (f64) give the same values; only the file hashes differ.
    let (from_csv, csv_values, csv_bytes) = cli_run(&csv, dir.path(), "csv", &["--quiet"]);
    assert_eq!(String::from_utf8_lossy(&csv_bytes), json(&csv.library().record));
    assert_eq!(csv_values, values);
    assert_eq!(from_csv.datasets, record.datasets);
    assert_eq!(from_csv.full_score, record.full_score);
    assert_ne!(from_csv.evaluation_id, record.evaluation_id);
    assert_ne!(from_csv.benchmark_sha256, record.benchmark_sha256);

    // float64 .npy training embeddings with float32 test ones: the same values again.
    let mixed = Files { train: fixtures().join("train.f64.npy"), ..Files::npy() };
    let (from_mixed, _, _) = cli_run(&mixed, dir.path(), "mixed", &["--quiet"]);
    assert_eq!(from_mixed.datasets, record.datasets);

    // A rerun, on one thread, writes the same bytes: idempotent resubmission.
    let (_, _, again) = cli_run(&npy, dir.path(), "again", &["--threads", "1", "--quiet"]);
    assert_eq!(again, bytes);
}

#[test]
fn the_cli_prints_the_record_to_stdout_without_out() {
    let args = Files::npy().args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--quiet");
    let o = tribute(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "--quiet: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), json(&Files::npy().library().record));
}

/// Runs the CLI with one file replaced by `content`; expects failure naming that file and
/// `want`, and no record written.
fn refused(which: &str, content: &[u8], want: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join(which);
    std::fs::write(&bad, content).expect("write");
    let mut files = Files::npy();
    match which {
        "train.csv" | "train.npy" => files.train = bad.clone(),
        "train_labels.csv" => files.train_labels = bad.clone(),
        "train_datasets.txt" => files.train_datasets = bad.clone(),
        "test.csv" | "test.npy" => files.test = bad.clone(),
        "test_labels.csv" => files.test_labels = bad.clone(),
        other => panic!("unknown fixture {other}"),
    }
    let out = dir.path().join("out.json");
    let mut args = files.args();
    args.extend(["--out".into(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tribute(&args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{which}: accepted");
    assert!(err.contains(&bad.display().to_string()), "{which}: {err} should name the file");
    for w in want {
        assert!(err.contains(w), "{which}: {err} should say {w:?}");
    }
    assert!(!out.exists(), "{which}: nothing written");
}

fn f32_npy(rows: usize, cols: usize, v: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    tribute_client::valuation::npy::write(&[rows, cols], "<f4", &data)
}

#[test]
fn bad_input_is_refused_naming_the_file_and_row() {
    let labels = std::fs::read_to_string(fixtures().join("train_labels.csv")).expect("read");
    let mut lines: Vec<&str> = labels.lines().collect();
    lines[2] = "two";
    refused(
        "train_labels.csv",
        lines.join("\n").as_bytes(),
        &["line 3", "\"two\" is not an integer label"],
    );
    refused("train_labels.csv", b"1\n2\n", &["2 labels", "has 12 rows"]);
    refused("train_labels.csv", b"1,2\n", &["line 1", "2 columns"]);

    let datasets = std::fs::read_to_string(fixtures().join("train_datasets.txt")).expect("read");
    let mut lines: Vec<&str> = datasets.lines().collect();
    lines[4] = "not-a-hash";
    refused("train_datasets.txt", lines.join("\n").as_bytes(), &["line 5", "not a dataset hash"]);
    let short: String = datasets.lines().take(11).map(|l| format!("{l}\n")).collect();
    refused("train_datasets.txt", short.as_bytes(), &["11 dataset lines", "has 12 rows"]);

    refused("test.csv", b"1,2,3,4\n1,2,3\n", &["line 2", "3 columns, the first row has 4"]);
    refused("test.csv", b"1,2,3,4\n1,2,nan,4\n", &["line 2, column 3", "not a finite number"]);
    refused("test.csv", b"a,b,c,d\n1,2,3,4\n", &["line 1", "no header row"]);
    refused("test.csv", b"", &["empty file"]);
    refused("test.csv", b"1,2,3\n1,2,3\n1,2,3\n1,2,3\n1,2,3\n", &["3 dimensions", "has 4"]);
    refused("test.csv", b"1,2,3,4\n", &["labels", "has 1 rows"]);

    let mut v = vec![0.0f32; 12 * 4];
    v[4 * 7 + 2] = f32::INFINITY;
    refused(
        "train.npy",
        &f32_npy(12, 4, &v),
        &["row 7 (0-based), column 2", "not a finite number"],
    );
    let ints = tribute_client::valuation::npy::write(&[12, 4], "<i8", &[0u8; 12 * 4 * 8]);
    refused("train.npy", &ints, &["float32 or float64"]);
    refused("train.npy", &f32_npy(12, 4, &[0.0; 47]), &["needs 192 data bytes, the file has 188"]);
    let one_d = tribute_client::valuation::npy::write(&[48], "<f4", &[0u8; 48 * 4]);
    refused("train.npy", &one_d, &["2-D"]);
    let big_endian = tribute_client::valuation::npy::write(&[12, 4], ">f4", &[0u8; 48 * 4]);
    refused("train.npy", &big_endian, &["not little-endian"]);
    refused("test.npy", &f32_npy(5, 3, &[0.0; 15]), &["3 dimensions"]);
}

#[test]
fn k_zero_and_bad_arguments_are_refused() {
    let args = Files::npy().args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let k = args.iter().position(|a| *a == "-k").expect("-k") + 1;
    args[k] = "0";
    let o = tribute(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("K must be at least 1"), "{}", stderr(&o));
    args[k] = "3";
    args.extend(["--threads", "0"]);
    let o = tribute(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--threads must be at least 1"), "{}", stderr(&o));
}
