//! Training runs: which datasets a model was trained on, with what weight, signed by the
//! provider (`tribute/training-run/v1`), and the check that every dataset was licensed for
//! training at the run's start.

use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::{DatasetHash, ModelId, RunId, Timestamp};
use crate::keys::{Network, PublicKey};
use crate::licence::{Licence, LicenceProblem, Revocation, Use};
use crate::sign::Message;

const VERSION: u8 = 1;
/// Most datasets one training run may name.
pub const MAX_RUN_DATASETS: usize = 100_000;

/// A training run record, signed by the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingRun {
    /// Network the model's payouts happen on.
    pub network: Network,
    /// The run's id (unique per provider).
    pub run_id: RunId,
    /// The model trained.
    pub model_id: ModelId,
    /// The provider's key, and signer.
    pub provider_key: PublicKey,
    /// When training started: every licence must hold at this moment.
    pub started_at: Timestamp,
    /// When training finished (`>= started_at`).
    pub finished_at: Timestamp,
    /// `(dataset, weight)`, sorted by dataset hash, unique, weights `> 0`.
    pub datasets: Vec<(DatasetHash, u64)>,
}

/// Why a training-run record is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainingRunError {
    /// No datasets, or more than [`MAX_RUN_DATASETS`].
    #[error("a run names 1..={MAX_RUN_DATASETS} datasets")]
    DatasetCount,
    /// Datasets not strictly sorted by hash (duplicates included).
    #[error("datasets must be sorted by hash without duplicates")]
    Unsorted,
    /// A dataset with weight zero.
    #[error("dataset weights must be positive")]
    ZeroWeight,
    /// `finished_at < started_at`.
    #[error("run finished before it started")]
    FinishedBeforeStart,
}

/// A licence as the registry holds it: the licence and its revocation, if any.
#[derive(Clone, Copy, Debug)]
pub struct LicenceRecord<'a> {
    /// The (signature-checked) licence.
    pub licence: &'a Licence,
    /// Its (signature-checked) revocation.
    pub revocation: Option<&'a Revocation>,
}

/// A run refused because some datasets were not licensed for it; each is named with why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} dataset(s) not licensed for this run", offending.len())]
pub struct RunRejected {
    /// The offending datasets, in hash order, each with the problem found.
    pub offending: Vec<(DatasetHash, LicenceProblem)>,
}

impl TrainingRun {
    /// Sorts `datasets` into canonical order (callers may give them in any order).
    pub fn canonicalize(&mut self) {
        self.datasets.sort_unstable_by_key(|d| d.0);
    }

    /// Checks the record's own form.
    pub fn validate(&self) -> Result<(), TrainingRunError> {
        if self.datasets.is_empty() || self.datasets.len() > MAX_RUN_DATASETS {
            return Err(TrainingRunError::DatasetCount);
        }
        if !self.datasets.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(TrainingRunError::Unsorted);
        }
        if self.datasets.iter().any(|(_, w)| *w == 0) {
            return Err(TrainingRunError::ZeroWeight);
        }
        if self.finished_at < self.started_at {
            return Err(TrainingRunError::FinishedBeforeStart);
        }
        Ok(())
    }

    /// Checks that every dataset has a licence that permits training, holds at
    /// `started_at`, was signed by then and is not revoked by then. `licences` gives every
    /// licence registered for a dataset; one that allows the run is enough. Otherwise every
    /// offending dataset is named with the problem of its first licence (or `NotFound`).
    pub fn check_licences<'a, F>(&self, mut licences: F) -> Result<(), RunRejected>
    where
        F: FnMut(&DatasetHash) -> Vec<LicenceRecord<'a>>,
    {
        let offending: Vec<_> = self
            .datasets
            .iter()
            .filter_map(|(hash, _)| {
                let mut first_problem = None;
                for rec in licences(hash) {
                    let verdict = if rec.licence.dataset_hash != *hash {
                        Err(LicenceProblem::NotFound)
                    } else {
                        rec.licence.allows(
                            rec.revocation,
                            self.network,
                            Use::Training,
                            self.started_at,
                        )
                    };
                    match verdict {
                        Ok(()) => return None,
                        Err(p) => {
                            first_problem.get_or_insert(p);
                        }
                    }
                }
                Some((*hash, first_problem.unwrap_or(LicenceProblem::NotFound)))
            })
            .collect();
        if offending.is_empty() {
            Ok(())
        } else {
            Err(RunRejected { offending })
        }
    }
}

impl Encode for TrainingRun {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        self.run_id.encode_into(w);
        self.model_id.encode_into(w);
        self.provider_key.encode_into(w);
        w.u64(self.started_at.0);
        w.u64(self.finished_at.0);
        w.u32(self.datasets.len() as u32);
        for (hash, weight) in &self.datasets {
            w.bytes(&hash.0);
            w.u64(*weight);
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        let network = Network::decode_from(r)?;
        let run_id = RunId::decode_from(r)?;
        let model_id = ModelId::decode_from(r)?;
        let provider_key = PublicKey::decode_from(r)?;
        let started_at = Timestamp(r.u64()?);
        let finished_at = Timestamp(r.u64()?);
        let count = r.u32()? as usize;
        if count == 0 || count > MAX_RUN_DATASETS {
            return Err(DecodeError::InvalidField("datasets"));
        }
        let mut datasets = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            datasets.push((DatasetHash(r.array()?), r.u64()?));
        }
        let run = TrainingRun {
            network,
            run_id,
            model_id,
            provider_key,
            started_at,
            finished_at,
            datasets,
        };
        run.validate().map_err(|e| {
            DecodeError::InvalidField(match e {
                TrainingRunError::FinishedBeforeStart => "finished_at",
                _ => "datasets",
            })
        })?;
        Ok(run)
    }
}

impl Message for TrainingRun {
    const TAG: &'static str = "tribute/training-run/v1";
    fn signer(&self) -> PublicKey {
        self.provider_key
    }
}
