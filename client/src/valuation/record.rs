//! From input files to an evaluation record: the JSON body that `tribute evaluator submit`
//! signs (`docs/VALUATION.md` describes every field).
//!
//! - `evaluation_id`: hex SHA-256 over the tag `tribute/knn-shapley/v1` and the
//!   length-prefixed model id, attribution version, benchmark id, K and the SHA-256 of
//!   each of the five input files. The same inputs give the same id and (the computation
//!   being bit-deterministic) the same record, so a rerun resubmits idempotently; the tag
//!   changes whenever the computation does.
//! - `benchmark_sha256`: SHA-256 of the test embeddings file's bytes followed by the test
//!   labels file's bytes: `cat TEST_EMBEDDINGS TEST_LABELS | sha256sum`.

use super::input::{self, Embeddings, InputFile};
use super::knn::{knn_shapley, KnnOptions, KnnShapley, TestSet, TrainSet};
use super::ValuationError;
use crate::reputation::DatasetInput;
use bitcoin::hashes::{sha256, Hash, HashEngine};
use std::collections::BTreeMap;
use tribute_channels::DatasetHash;

/// Tag of the evaluation id; bump it when the computation changes.
pub const EVALUATION_ID_TAG: &str = "tribute/knn-shapley/v1";
/// The record's `metric`: the K-nearest-neighbour utility (fraction of the K nearest
/// training points with the test point's label, averaged over test points).
pub const METRIC: &str = "knn-utility";
/// The per-dataset `method`.
pub const METHOD: &str = "knn-shapley";

/// The unsigned evaluation record the valuator writes: the shape `tribute evaluator submit
/// FILE.json` reads, with `full_score` = `U(all)` and, per dataset, the KNN-Shapley `value`
/// (the sum of its points' values), the test points it is a mean over (`samples`) and the
/// 95% interval (`ci_low`/`ci_high` = `value ∓ 1.96·sd/√samples`).
pub use crate::reputation::EvaluationInput as EvaluationRecord;

/// The five input files.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Training embeddings.
    pub train_embeddings: InputFile,
    /// Training labels.
    pub train_labels: InputFile,
    /// The dataset of each training point.
    pub train_datasets: InputFile,
    /// Test embeddings (with the test labels: the benchmark).
    pub test_embeddings: InputFile,
    /// Test labels.
    pub test_labels: InputFile,
}

/// What the record is about, and K.
#[derive(Debug, Clone)]
pub struct EvaluationParams {
    /// The model.
    pub model_id: String,
    /// Its attribution version.
    pub attribution_version: u64,
    /// The benchmark's name.
    pub benchmark_id: String,
    /// K.
    pub k: usize,
    /// Worker threads (does not change the result).
    pub threads: usize,
}

/// A finished evaluation: the record, the values behind it, and each training row's
/// dataset.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The record to submit.
    pub record: EvaluationRecord,
    /// The values per training point and per dataset.
    pub result: KnnShapley,
    /// The datasets, in group order (sorted by hash).
    pub datasets: Vec<DatasetHash>,
    /// Each training row's index into `datasets`.
    pub group_of: Vec<u32>,
}

fn absorb(engine: &mut sha256::HashEngine, bytes: &[u8]) {
    engine.input(&(bytes.len() as u64).to_be_bytes());
    engine.input(bytes);
}

/// The evaluation id (see the module docs).
pub fn evaluation_id(inputs: &Inputs, params: &EvaluationParams) -> String {
    let mut e = sha256::Hash::engine();
    absorb(&mut e, EVALUATION_ID_TAG.as_bytes());
    absorb(&mut e, params.model_id.as_bytes());
    absorb(&mut e, &params.attribution_version.to_be_bytes());
    absorb(&mut e, params.benchmark_id.as_bytes());
    absorb(&mut e, &(params.k as u64).to_be_bytes());
    for f in [
        &inputs.train_embeddings,
        &inputs.train_labels,
        &inputs.train_datasets,
        &inputs.test_embeddings,
        &inputs.test_labels,
    ] {
        absorb(&mut e, &f.sha256);
    }
    hex::encode(sha256::Hash::from_engine(e).to_byte_array())
}

/// `sha256(test embeddings bytes ‖ test labels bytes)`.
pub fn benchmark_sha256(test_embeddings: &InputFile, test_labels: &InputFile) -> [u8; 32] {
    let mut e = sha256::Hash::engine();
    e.input(&test_embeddings.bytes);
    e.input(&test_labels.bytes);
    sha256::Hash::from_engine(e).to_byte_array()
}

fn count_error(
    file: &InputFile,
    what: &str,
    got: usize,
    other: &InputFile,
    want: usize,
) -> ValuationError {
    ValuationError::Input {
        path: file.path.display().to_string(),
        detail: format!("{got} {what}, but {} has {want} rows", other.path.display()),
    }
}

/// Reads the inputs, computes the values, and builds the record. `progress` gets the
/// number of test points finished (from worker threads).
pub fn evaluate(
    inputs: &Inputs,
    params: &EvaluationParams,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Evaluation, ValuationError> {
    for (name, v) in [("model id", &params.model_id), ("benchmark id", &params.benchmark_id)] {
        if v.trim().is_empty() {
            return Err(ValuationError::Argument(format!("the {name} is empty")));
        }
    }
    let train = input::embeddings(&inputs.train_embeddings)?;
    let train_labels = input::labels(&inputs.train_labels)?;
    let train_datasets = input::datasets(&inputs.train_datasets)?;
    let test = input::embeddings(&inputs.test_embeddings)?;
    let test_labels = input::labels(&inputs.test_labels)?;
    let n = train.rows();
    if train_labels.len() != n {
        return Err(count_error(
            &inputs.train_labels,
            "labels",
            train_labels.len(),
            &inputs.train_embeddings,
            n,
        ));
    }
    if train_datasets.len() != n {
        return Err(count_error(
            &inputs.train_datasets,
            "dataset lines",
            train_datasets.len(),
            &inputs.train_embeddings,
            n,
        ));
    }
    if test_labels.len() != test.rows() {
        return Err(count_error(
            &inputs.test_labels,
            "labels",
            test_labels.len(),
            &inputs.test_embeddings,
            test.rows(),
        ));
    }
    let dims = |e: &Embeddings| match e {
        Embeddings::F32(m) => m.cols(),
        Embeddings::F64(m) => m.cols(),
    };
    if dims(&train) != dims(&test) {
        return Err(ValuationError::Input {
            path: inputs.test_embeddings.path.display().to_string(),
            detail: format!(
                "{} dimensions, but {} has {}",
                dims(&test),
                inputs.train_embeddings.path.display(),
                dims(&train)
            ),
        });
    }

    // Datasets in hash order; each row's index into that order.
    let index: BTreeMap<DatasetHash, u32> =
        train_datasets.iter().map(|d| (*d, 0)).collect::<BTreeMap<_, _>>();
    let datasets: Vec<DatasetHash> = index.keys().copied().collect();
    let index: BTreeMap<DatasetHash, u32> =
        datasets.iter().enumerate().map(|(i, d)| (*d, i as u32)).collect();
    let group_of: Vec<u32> = train_datasets.iter().map(|d| index[d]).collect();

    let options = KnnOptions { k: params.k, threads: params.threads };
    let result = match (train, test) {
        (Embeddings::F32(train), Embeddings::F32(test)) => knn_shapley(
            TrainSet {
                embeddings: &train,
                labels: &train_labels,
                group_of: &group_of,
                groups: datasets.len(),
            },
            TestSet { embeddings: &test, labels: &test_labels },
            options,
            progress,
        ),
        (train, test) => {
            let (train, test) = (train.into_f64(), test.into_f64());
            knn_shapley(
                TrainSet {
                    embeddings: &train,
                    labels: &train_labels,
                    group_of: &group_of,
                    groups: datasets.len(),
                },
                TestSet { embeddings: &test, labels: &test_labels },
                options,
                progress,
            )
        }
    }?;

    let record = EvaluationRecord {
        evaluation_id: evaluation_id(inputs, params),
        model_id: params.model_id.clone(),
        attribution_version: params.attribution_version,
        benchmark_id: params.benchmark_id.clone(),
        benchmark_sha256: hex::encode(benchmark_sha256(
            &inputs.test_embeddings,
            &inputs.test_labels,
        )),
        metric: METRIC.into(),
        higher_is_better: true,
        full_score: result.full_score,
        evaluated_at: None,
        datasets: datasets
            .iter()
            .zip(&result.groups)
            .map(|(d, g)| DatasetInput {
                dataset: d.to_hex(),
                method: METHOD.into(),
                ablation_score: None,
                value: Some(g.value),
                samples: Some(g.samples),
                ci_low: Some(g.ci_low),
                ci_high: Some(g.ci_high),
            })
            .collect(),
    };
    Ok(Evaluation { record, result, datasets, group_of })
}

impl Evaluation {
    /// The per-point values as CSV: `row,dataset,value` (row 0-based, in input order), with
    /// a header line.
    pub fn values_csv(&self) -> String {
        let mut out = String::from("row,dataset,value\n");
        for (row, (v, g)) in self.result.values.iter().zip(&self.group_of).enumerate() {
            out.push_str(&format!("{row},{},{v:?}\n", self.datasets[*g as usize].to_hex()));
        }
        out
    }
}
