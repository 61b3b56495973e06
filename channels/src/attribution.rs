//! Attribution vectors: how a model's contributor pool is divided.
//!
//! A model's vector is derived from its accepted training runs, applied in acceptance
//! order; each run adds its dataset weights and bumps the version, so every accrual and
//! receipt can name the exact vector it used. Per-request attribution (retrieval citations,
//! influence scores) goes through the same mapping from datasets to contributors.

use crate::ids::{DatasetHash, ModelId};
use crate::keys::PublicKey;
use crate::split::{SplitError, Weights};
use crate::training::TrainingRun;
use std::collections::BTreeMap;

/// Why a vector could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributionError {
    /// The run is for another model.
    #[error("training run is for model {0}")]
    WrongModel(ModelId),
    /// A dataset has no known owner (no licence).
    #[error("dataset {0} has no registered owner")]
    UnknownDataset(DatasetHash),
    /// Summed weights exceed `u64`.
    #[error("attribution weights overflow")]
    WeightOverflow,
    /// The per-request attribution names a dataset twice.
    #[error("dataset {0} named twice")]
    DuplicateDataset(DatasetHash),
    /// The weights cannot be split (empty, all zero, too many parties).
    #[error(transparent)]
    Split(#[from] SplitError),
}

/// One dataset's weight in a vector, with its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatasetWeight {
    /// The dataset.
    pub dataset_hash: DatasetHash,
    /// Its owner (from its licence).
    pub contributor_key: PublicKey,
    /// Summed weight over the runs.
    pub weight: u64,
}

/// A model's versioned attribution vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributionVector {
    /// The model.
    pub model_id: ModelId,
    /// 0 before any run; +1 per applied run.
    pub version: u64,
    /// Datasets sorted by hash.
    pub datasets: Vec<DatasetWeight>,
}

impl AttributionVector {
    /// The empty vector (version 0) of a model.
    pub fn empty(model_id: ModelId) -> Self {
        AttributionVector { model_id, version: 0, datasets: Vec::new() }
    }

    /// The next version: this vector plus `run`'s weights. `owner` maps a dataset to its
    /// licensed contributor.
    pub fn with_run<F>(&self, run: &TrainingRun, mut owner: F) -> Result<Self, AttributionError>
    where
        F: FnMut(&DatasetHash) -> Option<PublicKey>,
    {
        if run.model_id != self.model_id {
            return Err(AttributionError::WrongModel(run.model_id.clone()));
        }
        let mut by_hash: BTreeMap<DatasetHash, DatasetWeight> =
            self.datasets.iter().map(|d| (d.dataset_hash, *d)).collect();
        for (hash, weight) in &run.datasets {
            let contributor_key = owner(hash).ok_or(AttributionError::UnknownDataset(*hash))?;
            let entry = by_hash.entry(*hash).or_insert(DatasetWeight {
                dataset_hash: *hash,
                contributor_key,
                weight: 0,
            });
            entry.weight =
                entry.weight.checked_add(*weight).ok_or(AttributionError::WeightOverflow)?;
        }
        Ok(AttributionVector {
            model_id: self.model_id.clone(),
            version: self.version + 1,
            datasets: by_hash.into_values().collect(),
        })
    }

    /// Derives a vector from runs in acceptance order.
    pub fn derive<'r, F>(
        model_id: ModelId,
        runs: impl IntoIterator<Item = &'r TrainingRun>,
        mut owner: F,
    ) -> Result<Self, AttributionError>
    where
        F: FnMut(&DatasetHash) -> Option<PublicKey>,
    {
        runs.into_iter().try_fold(Self::empty(model_id), |v, run| v.with_run(run, &mut owner))
    }

    /// Per-contributor weights: each contributor's datasets summed.
    pub fn contributor_weights(&self) -> Result<Weights, AttributionError> {
        sum_by_contributor(self.datasets.iter().map(|d| (d.contributor_key, d.weight)))
    }
}

/// Per-contributor weights for a per-request attribution `[(dataset, weight)]`. `owner`
/// maps a dataset to its owner if (and only if) its licence permits this use now.
pub fn request_weights<F>(
    attribution: &[(DatasetHash, u64)],
    mut owner: F,
) -> Result<Weights, AttributionError>
where
    F: FnMut(&DatasetHash) -> Option<PublicKey>,
{
    let mut seen = std::collections::BTreeSet::new();
    let mut parts = Vec::with_capacity(attribution.len());
    for (hash, weight) in attribution {
        if !seen.insert(*hash) {
            return Err(AttributionError::DuplicateDataset(*hash));
        }
        parts.push((owner(hash).ok_or(AttributionError::UnknownDataset(*hash))?, *weight));
    }
    sum_by_contributor(parts)
}

fn sum_by_contributor(
    parts: impl IntoIterator<Item = (PublicKey, u64)>,
) -> Result<Weights, AttributionError> {
    let mut sums: BTreeMap<PublicKey, u64> = BTreeMap::new();
    for (key, weight) in parts {
        let s = sums.entry(key).or_insert(0);
        *s = s.checked_add(weight).ok_or(AttributionError::WeightOverflow)?;
    }
    Ok(Weights::new(sums)?)
}
