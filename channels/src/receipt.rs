//! Receipts: what one metered request paid to whom, and the provider's signed commitment to a
//! batch of them.
//!
//! Each request in a metering batch gets a [`Receipt`]; the batch's receipts, in order, are the
//! leaves of a [`MerkleTree`] (leaf = `tagged_hash("tribute/receipt/v1", canonical bytes)`), and
//! the provider signs the root once per batch as a [`ReceiptBatchRoot`]. A receipt plus its
//! [`InclusionProof`] plus the signed root is checkable by anyone who knows the provider key
//! ([`verify_receipt`]).

use crate::amount::Nsat;
use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::{ModelId, RequestId};
use crate::keys::{Network, PublicKey};
use crate::merkle::{InclusionProof, MerkleError, MerkleTree, MAX_LEAVES};
use crate::sign::{tagged_hash, Message, Signed};
use bitcoin::hashes::{sha256, Hash, HashEngine};

/// The tag of a receipt's leaf hash. Receipts are not signed one by one, only committed to.
pub const RECEIPT_LEAF_TAG: &str = "tribute/receipt/v1";

/// `sha256(tag) || sha256(tag)` of [`RECEIPT_LEAF_TAG`] as a SHA-256 midstate (one block),
/// computed at compile time: the leaf hash starts from it instead of hashing the tag twice.
const RECEIPT_LEAF_MIDSTATE: sha256::Midstate =
    sha256::Midstate::hash_tag(RECEIPT_LEAF_TAG.as_bytes());

/// Most shares one receipt may list: the split's bound, so every split fits in a receipt.
const MAX_RECEIPT_SHARES: usize = crate::split::MAX_SPLIT_PARTIES;

/// Format version of an encoded [`Receipt`].
const RECEIPT_VERSION: u8 = 1;
/// Format version of an encoded [`ReceiptBatchRoot`].
const BATCH_ROOT_VERSION: u8 = 1;

/// Why a receipt is malformed or does not check against a signed batch root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// Shares must be sorted by key, strictly ascending (so each key appears once).
    #[error("shares are not sorted by key or repeat a key")]
    UnsortedShares,
    /// More shares than one receipt may list.
    #[error("more than {MAX_RECEIPT_SHARES} shares")]
    TooManyShares,
    /// The shares add up to more than `u128` nanosatoshis.
    #[error("shares overflow")]
    SharesOverflow,
    /// The shares do not add up to the pool exactly.
    #[error("shares add up to {shares_nsat}, pool is {pool_nsat}")]
    SumMismatch {
        /// The receipt's pool.
        pool_nsat: Nsat,
        /// What the shares add up to.
        shares_nsat: Nsat,
    },
    /// The batch root's signature is not the provider's.
    #[error("bad batch root signature")]
    BadSignature,
    /// The proof is for a tree of a different size than the signed batch.
    #[error("proof is for {proof_leaf_count} leaves, the batch has {receipt_count}")]
    CountMismatch {
        /// The proof's leaf count.
        proof_leaf_count: u32,
        /// The signed batch's receipt count.
        receipt_count: u32,
    },
    /// The inclusion proof does not lead to the signed root.
    #[error("inclusion proof: {0}")]
    Proof(#[from] MerkleError),
}

/// What one metered request paid to whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The request (the provider's idempotency key).
    pub request_id: RequestId,
    /// The model that served it.
    pub model_id: ModelId,
    /// The version of the model's attribution vector the split used.
    pub attribution_version: u64,
    /// What the request put into the contributor pool.
    pub pool_nsat: Nsat,
    /// Each contributor's share, sorted by key strictly ascending; they add up to the pool.
    pub shares: Vec<(PublicKey, Nsat)>,
}

impl Receipt {
    /// A receipt whose shares are sorted by key (strictly ascending) and add up to
    /// `pool_nsat` exactly. The caller sorts; this only checks.
    pub fn new(
        request_id: RequestId,
        model_id: ModelId,
        attribution_version: u64,
        pool_nsat: Nsat,
        shares: Vec<(PublicKey, Nsat)>,
    ) -> Result<Self, ReceiptError> {
        let receipt = Receipt { request_id, model_id, attribution_version, pool_nsat, shares };
        receipt.check()?;
        Ok(receipt)
    }

    /// Checks the invariants [`Receipt::new`] establishes; the fields are public, so a value
    /// built by hand (or mutated) may not hold them.
    pub fn check(&self) -> Result<(), ReceiptError> {
        if self.shares.len() > MAX_RECEIPT_SHARES {
            return Err(ReceiptError::TooManyShares);
        }
        if self.shares.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(ReceiptError::UnsortedShares);
        }
        let mut sum = Nsat::ZERO;
        for (_, share) in &self.shares {
            sum = sum.checked_add(*share).map_err(|_| ReceiptError::SharesOverflow)?;
        }
        if sum != self.pool_nsat {
            return Err(ReceiptError::SumMismatch { pool_nsat: self.pool_nsat, shares_nsat: sum });
        }
        Ok(())
    }

    /// The receipt's Merkle leaf: `tagged_hash("tribute/receipt/v1", canonical bytes)`.
    pub fn leaf_hash(&self) -> [u8; 32] {
        tagged_hash(RECEIPT_LEAF_TAG, &self.encode())
    }

    /// The wire fields, without the well-formedness assertion (tests encode malformed values).
    fn encode_fields(&self, w: &mut Writer) {
        w.u8(RECEIPT_VERSION);
        self.request_id.encode_into(w);
        self.model_id.encode_into(w);
        w.u64(self.attribution_version);
        w.u128(self.pool_nsat.0);
        // Over-long share lists are invalid already; saturating keeps them undecodable.
        w.u32(u32::try_from(self.shares.len()).unwrap_or(u32::MAX));
        for (key, share) in &self.shares {
            key.encode_into(w);
            w.u128(share.0);
        }
    }

    /// What this request paid `key`; zero if `key` has no share. Relies on the sort order.
    pub fn share_of(&self, key: &PublicKey) -> Nsat {
        match self.shares.binary_search_by(|(k, _)| k.cmp(key)) {
            Ok(i) => self.shares[i].1,
            Err(_) => Nsat::ZERO,
        }
    }
}

/// Wire form: version 1, request id, model id, `u64` attribution version, `u128` pool,
/// `u32` share count, then each share as 32-byte key and `u128` amount. Decoding refuses
/// shares out of key order, repeated keys, and shares that do not add up to the pool.
impl Encode for Receipt {
    fn encode_into(&self, w: &mut Writer) {
        // Only a well-formed receipt has a canonical form (and may become a leaf).
        debug_assert!(self.check().is_ok(), "encoding a malformed receipt");
        self.encode_fields(w);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(RECEIPT_VERSION)?;
        let request_id = RequestId::decode_from(r)?;
        let model_id = ModelId::decode_from(r)?;
        let attribution_version = r.u64()?;
        let pool_nsat = Nsat(r.u128()?);
        let count = r.u32()? as usize;
        if count > MAX_RECEIPT_SHARES {
            return Err(DecodeError::TooLong("shares"));
        }
        // The count is untrusted: grow as bytes actually arrive.
        let mut shares: Vec<(PublicKey, Nsat)> = Vec::with_capacity(count.min(1024));
        let mut sum = Nsat::ZERO;
        for _ in 0..count {
            let key = PublicKey::decode_from(r)?;
            let share = Nsat(r.u128()?);
            if shares.last().is_some_and(|(prev, _)| *prev >= key) {
                return Err(DecodeError::InvalidField("shares"));
            }
            sum = sum.checked_add(share).map_err(|_| DecodeError::InvalidField("shares"))?;
            shares.push((key, share));
        }
        if sum != pool_nsat {
            return Err(DecodeError::InvalidField("pool_nsat"));
        }
        Ok(Receipt { request_id, model_id, attribution_version, pool_nsat, shares })
    }
}

/// The Merkle leaf of the receipt with these fields, byte-identical to building the
/// [`Receipt`] and calling [`Receipt::leaf_hash`], but streamed: the canonical encoding goes
/// straight into the hash engine, with no receipt, share vector or byte buffer allocated.
/// This is the metering hot path (one leaf per request, every share of the split in it).
///
/// `shares` must be what [`Receipt::new`] accepts: sorted by key strictly ascending and
/// adding up to `pool_nsat` (a split's output is). As with [`Receipt::leaf_hash`], only
/// debug builds check that; a malformed receipt has no canonical form.
pub fn leaf_hash_of<'a, I>(
    request_id: &RequestId,
    model_id: &ModelId,
    attribution_version: u64,
    pool_nsat: Nsat,
    shares: I,
) -> [u8; 32]
where
    I: IntoIterator<Item = (&'a PublicKey, Nsat)>,
    I::IntoIter: ExactSizeIterator,
{
    let shares = shares.into_iter();
    let count = shares.len();
    let mut engine = sha256::HashEngine::from_midstate(RECEIPT_LEAF_MIDSTATE, 64);
    // The fixed fields, exactly as `Receipt::encode_fields` writes them.
    let mut head = Writer::with_capacity(2 + 2 * crate::ids::MAX_ID_LEN + 8 + 16 + 4);
    head.u8(RECEIPT_VERSION);
    request_id.encode_into(&mut head);
    model_id.encode_into(&mut head);
    head.u64(attribution_version);
    head.u128(pool_nsat.0);
    head.u32(u32::try_from(count).unwrap_or(u32::MAX));
    engine.input(&head.finish());
    #[cfg(debug_assertions)]
    let (mut previous, mut sum): (Option<&PublicKey>, Nsat) = (None, Nsat::ZERO);
    let mut written = 0usize;
    let mut share_bytes = [0u8; 48];
    for (key, share) in shares {
        #[cfg(debug_assertions)]
        {
            debug_assert!(previous.is_none_or(|p| p < key), "shares out of key order");
            previous = Some(key);
            sum = sum.checked_add(share).unwrap_or(Nsat(u128::MAX));
        }
        share_bytes[..32].copy_from_slice(&key.to_bytes());
        share_bytes[32..].copy_from_slice(&share.0.to_be_bytes());
        engine.input(&share_bytes);
        written += 1;
    }
    debug_assert_eq!(written, count, "share iterator lied about its length");
    #[cfg(debug_assertions)]
    debug_assert_eq!(sum, pool_nsat, "shares do not add up to the pool");
    sha256::Hash::from_engine(engine).to_byte_array()
}

/// The provider's signed commitment to one batch of receipts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptBatchRoot {
    /// The network the provider runs on.
    pub network: Network,
    /// The provider's state-signing key: the signer.
    pub provider_key: PublicKey,
    /// The batch's sequence number, per provider.
    pub batch_seq: u64,
    /// How many receipts the batch holds (1..=[`MAX_LEAVES`]); fixes the tree's shape.
    pub receipt_count: u32,
    /// The root of the batch's receipt tree.
    pub merkle_root: [u8; 32],
}

impl ReceiptBatchRoot {
    /// The commitment to `tree`, the tree of batch `batch_seq` (see [`build_batch`]).
    pub fn for_tree(
        network: Network,
        provider_key: PublicKey,
        batch_seq: u64,
        tree: &MerkleTree,
    ) -> Self {
        ReceiptBatchRoot {
            network,
            provider_key,
            batch_seq,
            receipt_count: tree.leaf_count(),
            merkle_root: tree.root(),
        }
    }

    /// Checks that `receipt` is in this batch, without checking any signature: use it when
    /// the signed root was verified once and many receipts are checked against it.
    pub fn check_receipt(
        &self,
        receipt: &Receipt,
        proof: &InclusionProof,
    ) -> Result<(), ReceiptError> {
        receipt.check()?;
        if proof.leaf_count != self.receipt_count {
            return Err(ReceiptError::CountMismatch {
                proof_leaf_count: proof.leaf_count,
                receipt_count: self.receipt_count,
            });
        }
        proof.verify(&receipt.leaf_hash(), &self.merkle_root)?;
        Ok(())
    }
}

impl Message for ReceiptBatchRoot {
    const TAG: &'static str = "tribute/receipt-batch/v1";

    fn signer(&self) -> PublicKey {
        self.provider_key
    }
}

/// Wire form, fixed width (78 bytes): version 1, network byte, 32-byte provider key, `u64`
/// batch sequence, `u32` receipt count (1..=[`MAX_LEAVES`]), 32-byte root.
impl Encode for ReceiptBatchRoot {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(BATCH_ROOT_VERSION);
        self.network.encode_into(w);
        self.provider_key.encode_into(w);
        w.u64(self.batch_seq);
        w.u32(self.receipt_count);
        w.bytes(&self.merkle_root);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(BATCH_ROOT_VERSION)?;
        let network = Network::decode_from(r)?;
        let provider_key = PublicKey::decode_from(r)?;
        let batch_seq = r.u64()?;
        let receipt_count = r.u32()?;
        if receipt_count == 0 || receipt_count > MAX_LEAVES {
            return Err(DecodeError::InvalidField("receipt_count"));
        }
        let merkle_root = r.array()?;
        Ok(ReceiptBatchRoot { network, provider_key, batch_seq, receipt_count, merkle_root })
    }
}

/// Checks a receipt against a signed batch root: the provider's signature, the proof's leaf
/// count against the signed receipt count, and the proof from the receipt's leaf to the root.
pub fn verify_receipt(
    receipt: &Receipt,
    proof: &InclusionProof,
    root: &Signed<ReceiptBatchRoot>,
) -> Result<(), ReceiptError> {
    root.message.check_receipt(receipt, proof)?;
    root.verify().map_err(|_| ReceiptError::BadSignature)
}

/// The Merkle tree of a batch: leaf `i` is `receipts[i].leaf_hash()`.
pub fn build_batch(receipts: &[Receipt]) -> Result<MerkleTree, MerkleError> {
    MerkleTree::new(receipts.iter().map(Receipt::leaf_hash).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::sign::secp;
    use bitcoin::secp256k1::{Keypair, SecretKey};
    use proptest::prelude::*;

    fn keypair(seed: u64) -> Keypair {
        let mut sk = [0x11u8; 32];
        sk[24..].copy_from_slice(&seed.to_be_bytes());
        Keypair::from_secret_key(secp(), &SecretKey::from_slice(&sk).unwrap())
    }

    fn key(seed: u64) -> PublicKey {
        PublicKey::from(keypair(seed).x_only_public_key().0)
    }

    fn receipt(request: &str, shares: &[(u64, u128)]) -> Receipt {
        let mut shares: Vec<(PublicKey, Nsat)> =
            shares.iter().map(|&(s, a)| (key(s), Nsat(a))).collect();
        shares.sort_by_key(|(k, _)| *k);
        let pool = shares.iter().map(|(_, a)| a.0).sum();
        Receipt::new(
            RequestId::new(request).unwrap(),
            ModelId::new("llama-3-8b").unwrap(),
            7,
            Nsat(pool),
            shares,
        )
        .unwrap()
    }

    fn batch(n: u64) -> Vec<Receipt> {
        (0..n)
            .map(|i| receipt(&format!("req-{i}"), &[(1, 1000 + u128::from(i)), (2, 5), (3, 0)]))
            .collect()
    }

    fn signed_root(tree: &MerkleTree, seq: u64) -> Signed<ReceiptBatchRoot> {
        let kp = keypair(99);
        let root = ReceiptBatchRoot::for_tree(Network::Regtest, key(99), seq, tree);
        Signed::sign(root, &kp, &[7; 32]).unwrap()
    }

    #[test]
    fn new_checks_order_and_sum() {
        let r = receipt("r1", &[(1, 10), (2, 20), (3, 30)]);
        let mk = |pool: u128, shares: Vec<(PublicKey, Nsat)>| {
            Receipt::new(r.request_id.clone(), r.model_id.clone(), 1, Nsat(pool), shares)
        };
        assert!(mk(60, r.shares.clone()).is_ok());
        let mut swapped = r.shares.clone();
        swapped.swap(0, 1);
        assert_eq!(mk(60, swapped), Err(ReceiptError::UnsortedShares));
        let mut dup = r.shares.clone();
        dup[1].0 = dup[0].0;
        assert_eq!(mk(60, dup), Err(ReceiptError::UnsortedShares));
        assert_eq!(
            mk(61, r.shares.clone()),
            Err(ReceiptError::SumMismatch { pool_nsat: Nsat(61), shares_nsat: Nsat(60) })
        );
        let mut big = r.shares.clone();
        big[0].1 = Nsat(u128::MAX);
        assert_eq!(mk(0, big), Err(ReceiptError::SharesOverflow));
        // No shares and an empty pool is a valid (if dull) receipt.
        assert!(mk(0, vec![]).is_ok());
    }

    #[test]
    fn a_split_makes_a_valid_receipt() {
        // The split's output (key order, exact sum, zero shares allowed) is a receipt as is.
        let weights: Vec<(PublicKey, u64)> = (0..40).map(|i| (key(i), i % 3)).collect();
        let pool = Nsat(1_000_000_007);
        let shares = crate::split::split(pool, &weights).unwrap();
        let r = Receipt::new(
            RequestId::new("req").unwrap(),
            ModelId::new("m").unwrap(),
            1,
            pool,
            shares,
        )
        .unwrap();
        assert_eq!(Receipt::decode(&r.encode()), Ok(r.clone()));
        assert_eq!(r.share_of(&key(0)), Nsat::ZERO);
    }

    #[test]
    fn share_of_finds_shares_and_defaults_to_zero() {
        let r = receipt("r1", &[(1, 10), (2, 20), (3, 30)]);
        for (k, a) in &r.shares {
            assert_eq!(r.share_of(k), *a);
        }
        assert_eq!(r.share_of(&key(4)), Nsat::ZERO);
    }

    #[test]
    fn receipt_known_layout() {
        let r = receipt("ab", &[(1, 5)]);
        let bytes = r.encode();
        let model = b"llama-3-8b";
        let mut want = vec![1, 2, b'a', b'b', model.len() as u8];
        want.extend_from_slice(model);
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&5u128.to_be_bytes());
        want.extend_from_slice(&1u32.to_be_bytes());
        want.extend_from_slice(&key(1).to_bytes());
        want.extend_from_slice(&5u128.to_be_bytes());
        assert_eq!(bytes, want);
        assert_eq!(r.leaf_hash(), tagged_hash("tribute/receipt/v1", &want));
    }

    #[test]
    fn streamed_leaf_hash_is_byte_identical() {
        // A split's output over 100 keys, as the daemon meters it, and the edge cases.
        let weights: Vec<(PublicKey, u64)> =
            (0..100).map(|i| (key(i), 1 + (i * 7919) % 997)).collect();
        let pool = Nsat(1_234_567_891);
        let shares = crate::split::split(pool, &weights).unwrap();
        let cases = [
            Receipt::new(
                RequestId::new("req-0").unwrap(),
                ModelId::new("bench-model").unwrap(),
                3,
                pool,
                shares,
            )
            .unwrap(),
            receipt("x", &[]),
            receipt(&"i".repeat(64), &[(1, u128::MAX / 2), (2, u128::MAX / 2)]),
        ];
        for r in &cases {
            let streamed = leaf_hash_of(
                &r.request_id,
                &r.model_id,
                r.attribution_version,
                r.pool_nsat,
                r.shares.iter().map(|(k, s)| (k, *s)),
            );
            assert_eq!(streamed, r.leaf_hash());
            assert_eq!(streamed, tagged_hash(RECEIPT_LEAF_TAG, &r.encode()));
        }
    }

    #[test]
    fn receipt_count_bound() {
        let r = receipt("r", &[]);
        let mut bytes = r.encode();
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&(MAX_RECEIPT_SHARES as u32 + 1).to_be_bytes());
        assert_eq!(Receipt::decode(&bytes), Err(DecodeError::TooLong("shares")));
        // A huge but allowed count with no bytes behind it fails fast without allocating it.
        bytes[at..].copy_from_slice(&(MAX_RECEIPT_SHARES as u32).to_be_bytes());
        assert_eq!(Receipt::decode(&bytes), Err(DecodeError::Truncated));
    }

    #[test]
    fn batch_root_round_trips_signs_and_verifies() {
        let tree = build_batch(&batch(5)).unwrap();
        let signed = signed_root(&tree, 42);
        assert_eq!(signed.verify(), Ok(()));
        let msg_bytes = signed.message.encode();
        assert_eq!(msg_bytes.len(), 78);
        assert_eq!(ReceiptBatchRoot::decode(&msg_bytes), Ok(signed.message.clone()));

        let bytes = signed.encode();
        assert_eq!(bytes.len(), 78 + 64);
        assert_eq!(Signed::<ReceiptBatchRoot>::decode(&bytes), Ok(signed.clone()));
        assert_eq!(Signed::<ReceiptBatchRoot>::decode_verified(&bytes), Ok(signed.clone()));
        for k in 0..bytes.len() {
            assert!(Signed::<ReceiptBatchRoot>::decode(&bytes[..k]).is_err());
        }
        // Any flipped bit either fails to decode or fails to verify.
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(Signed::<ReceiptBatchRoot>::decode_verified(&b).is_err(), "byte {i}");
            }
        }
        // Signing with a key that is not the provider key is refused.
        assert!(Signed::sign(signed.message.clone(), &keypair(1), &[0; 32]).is_err());
    }

    #[test]
    fn batch_root_decode_is_strict() {
        let tree = build_batch(&batch(3)).unwrap();
        let bytes = signed_root(&tree, 1).message.encode();
        let with = |at: usize, v: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + v.len()].copy_from_slice(v);
            ReceiptBatchRoot::decode(&b)
        };
        assert_eq!(with(0, &[2]), Err(DecodeError::UnknownVersion(2)));
        assert_eq!(with(1, &[9]), Err(DecodeError::InvalidField("network")));
        let count_at = 1 + 1 + 32 + 8;
        assert_eq!(
            with(count_at, &0u32.to_be_bytes()),
            Err(DecodeError::InvalidField("receipt_count"))
        );
        assert_eq!(
            with(count_at, &(MAX_LEAVES + 1).to_be_bytes()),
            Err(DecodeError::InvalidField("receipt_count"))
        );
        // An x coordinate off the curve (x = 5 has no point on secp256k1).
        let mut off_curve = [0u8; 32];
        off_curve[31] = 5;
        assert!(PublicKey::from_bytes(off_curve).is_err());
        assert_eq!(with(2, &off_curve), Err(DecodeError::InvalidField("public key")));
    }

    #[test]
    fn verify_receipt_accepts_members_and_refuses_the_rest() {
        let receipts = batch(11);
        let tree = build_batch(&receipts).unwrap();
        let signed = signed_root(&tree, 3);
        for (i, r) in receipts.iter().enumerate() {
            let proof = tree.proof(i as u32).unwrap();
            assert_eq!(verify_receipt(r, &proof, &signed), Ok(()));
            // Another receipt of the batch at this position.
            let other = &receipts[(i + 1) % receipts.len()];
            assert_eq!(
                verify_receipt(other, &proof, &signed),
                Err(ReceiptError::Proof(MerkleError::RootMismatch))
            );
        }
        let r = &receipts[4];
        let proof = tree.proof(4).unwrap();

        // A receipt whose content changed (shares moved between contributors).
        let mut altered = r.clone();
        let rich = (0..altered.shares.len()).max_by_key(|&k| altered.shares[k].1).unwrap();
        let poor = (rich + 1) % altered.shares.len();
        altered.shares[rich].1 = Nsat(altered.shares[rich].1 .0 - 1);
        altered.shares[poor].1 = Nsat(altered.shares[poor].1 .0 + 1);
        assert_eq!(altered.check(), Ok(()));
        assert_eq!(
            verify_receipt(&altered, &proof, &signed),
            Err(ReceiptError::Proof(MerkleError::RootMismatch))
        );
        // A malformed receipt is refused before any hashing.
        let mut unsorted = r.clone();
        unsorted.shares.swap(0, 1);
        assert_eq!(verify_receipt(&unsorted, &proof, &signed), Err(ReceiptError::UnsortedShares));

        // The proof claims a different tree size.
        let mut wrong_count = proof.clone();
        wrong_count.leaf_count = 12;
        assert_eq!(
            verify_receipt(r, &wrong_count, &signed),
            Err(ReceiptError::CountMismatch { proof_leaf_count: 12, receipt_count: 11 })
        );

        // The root was changed after signing.
        let mut forged = signed.clone();
        forged.message.batch_seq += 1;
        assert_eq!(verify_receipt(r, &proof, &forged), Err(ReceiptError::BadSignature));
        let mut forged = signed.clone();
        forged.message.merkle_root[0] ^= 1;
        assert!(verify_receipt(r, &proof, &forged).is_err());

        // The same tree signed by someone who is not the named provider.
        let mut impostor = signed.clone();
        impostor.message.provider_key = key(1);
        assert_eq!(verify_receipt(r, &proof, &impostor), Err(ReceiptError::BadSignature));
    }

    #[test]
    fn build_batch_uses_leaf_hashes_in_order() {
        let receipts = batch(4);
        let tree = build_batch(&receipts).unwrap();
        let leaves: Vec<_> = receipts.iter().map(Receipt::leaf_hash).collect();
        assert_eq!(tree.root(), crate::merkle::merkle_root(&leaves).unwrap());
        assert_eq!(build_batch(&[]).unwrap_err(), MerkleError::Empty);
        let mut reordered = receipts.clone();
        reordered.swap(0, 1);
        assert_ne!(build_batch(&reordered).unwrap().root(), tree.root());
    }

    // Keys are costly to derive; proptest picks among a fixed pool.
    fn key_pool() -> &'static [PublicKey] {
        use std::sync::OnceLock;
        static POOL: OnceLock<Vec<PublicKey>> = OnceLock::new();
        POOL.get_or_init(|| {
            let mut keys: Vec<_> = (0..64).map(key).collect();
            keys.sort();
            keys
        })
    }

    fn id_strategy() -> impl Strategy<Value = String> {
        "[!-~]{1,64}"
    }

    fn receipt_strategy() -> impl Strategy<Value = Receipt> {
        (
            id_strategy(),
            id_strategy(),
            any::<u64>(),
            proptest::sample::subsequence((0..64usize).collect::<Vec<_>>(), 0..=12),
            proptest::collection::vec(0..=u128::MAX / 16, 12),
        )
            .prop_map(|(req, model, version, picks, amounts)| {
                let shares: Vec<(PublicKey, Nsat)> =
                    picks.iter().zip(&amounts).map(|(&i, &a)| (key_pool()[i], Nsat(a))).collect();
                let pool = shares.iter().map(|(_, a)| a.0).sum();
                Receipt::new(
                    RequestId::new(req).unwrap(),
                    ModelId::new(model).unwrap(),
                    version,
                    Nsat(pool),
                    shares,
                )
                .unwrap()
            })
    }

    proptest! {
        #[test]
        fn receipt_round_trips(r in receipt_strategy()) {
            let bytes = r.encode();
            prop_assert_eq!(Receipt::decode(&bytes), Ok(r.clone()));
            prop_assert_eq!(Receipt::decode(&bytes).map(|d| d.encode()), Ok(bytes.clone()));
            let mut long = bytes.clone();
            long.push(0);
            prop_assert_eq!(Receipt::decode(&long), Err(DecodeError::TrailingBytes(1)));
        }

        #[test]
        fn streamed_leaf_hash_matches(r in receipt_strategy()) {
            let streamed = leaf_hash_of(
                &r.request_id,
                &r.model_id,
                r.attribution_version,
                r.pool_nsat,
                r.shares.iter().map(|(k, s)| (k, *s)),
            );
            prop_assert_eq!(streamed, r.leaf_hash());
        }

        #[test]
        fn receipt_truncations_are_refused(r in receipt_strategy()) {
            let bytes = r.encode();
            for k in 0..bytes.len() {
                prop_assert!(Receipt::decode(&bytes[..k]).is_err(), "prefix of {} bytes", k);
            }
        }

        #[test]
        fn receipt_unsorted_or_duplicate_shares_are_refused(
            r in receipt_strategy().prop_filter("two shares", |r| r.shares.len() >= 2),
            at in any::<prop::sample::Index>(),
        ) {
            let i = at.index(r.shares.len() - 1);
            let mut swapped = r.clone();
            swapped.shares.swap(i, i + 1);
            prop_assert_eq!(Receipt::decode(&swapped.encode_unchecked()), Err(DecodeError::InvalidField("shares")));
            prop_assert_eq!(swapped.check(), Err(ReceiptError::UnsortedShares));

            let mut dup = r.clone();
            dup.shares[i + 1].0 = dup.shares[i].0;
            prop_assert_eq!(Receipt::decode(&dup.encode_unchecked()), Err(DecodeError::InvalidField("shares")));
            prop_assert_eq!(dup.check(), Err(ReceiptError::UnsortedShares));
        }

        #[test]
        fn receipt_sum_mismatch_is_refused(r in receipt_strategy(), up in any::<bool>()) {
            let mut bad = r.clone();
            bad.pool_nsat = if up || r.pool_nsat.is_zero() {
                Nsat(r.pool_nsat.0 + 1)
            } else {
                Nsat(r.pool_nsat.0 - 1)
            };
            prop_assert_eq!(Receipt::decode(&bad.encode_unchecked()), Err(DecodeError::InvalidField("pool_nsat")));
            let refused = matches!(bad.check(), Err(ReceiptError::SumMismatch { .. }));
            prop_assert!(refused);
        }
    }

    impl Receipt {
        /// The encoding of a receipt that may break its invariants.
        fn encode_unchecked(&self) -> Vec<u8> {
            let mut w = Writer::default();
            self.encode_fields(&mut w);
            w.finish()
        }
    }
}
