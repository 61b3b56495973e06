//! The built-in data valuator, for providers without their own pipeline: exact
//! KNN-Shapley values ([`knn`]) of training points given as embedding vectors and labels
//! in files ([`input`], [`npy`]), summed per dataset into an evaluation record
//! ([`record`]) that `tribute evaluator submit` signs and submits. The command-line side
//! is [`cli`] (`tribute provider evaluate knn-shapley`).
//!
//! **A dataset's score is the sum of its training points' KNN-Shapley values.** Values are
//! additive (efficiency): the datasets' scores add up to the full model's score `U(all)`,
//! since `U(∅) = 0`.

pub mod cli;
pub mod input;
pub mod knn;
pub mod npy;
pub mod record;

pub use knn::{knn_shapley, KnnError, KnnOptions, KnnShapley, Matrix, TestSet, TrainSet};
pub use record::{evaluate, Evaluation, EvaluationParams, EvaluationRecord, Inputs};

/// Why a valuation failed.
#[derive(Debug, thiserror::Error)]
pub enum ValuationError {
    /// An input file is unreadable or malformed; `detail` names the row where one is at
    /// fault.
    #[error("{path}: {detail}")]
    Input {
        /// The file.
        path: String,
        /// What is wrong (and where).
        detail: String,
    },
    /// The inputs do not fit together (counts, dimensions, K).
    #[error(transparent)]
    Knn(#[from] KnnError),
    /// An argument is not usable.
    #[error("{0}")]
    Argument(String),
    /// An output file could not be written.
    #[error("{path}: {detail}")]
    Output {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
}
