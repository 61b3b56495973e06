//! The binary Merkle tree that commits a batch of receipts, and its inclusion proofs.
//!
//! Inner nodes are `tagged_hash("tribute/merkle-node/v1", left || right)`; leaves are already
//! domain-separated 32-byte hashes (a receipt's leaf hash has its own tag), so a node can never
//! be passed off as a leaf. An odd node at the end of a level is **promoted** unchanged to the
//! next level rather than paired with a copy of itself: duplication makes `[a, b, c]` and
//! `[a, b, c, c]` share a root (Bitcoin's CVE-2012-2459), promotion does not. The resulting
//! shape is the same as RFC 6962's (split at the largest power of two below the leaf count).
//!
//! A proof names its leaf index and the tree's leaf count; together they fix exactly which
//! levels need a sibling, so a proof with one sibling too many or too few is refused before any
//! hashing. The root does not commit to the leaf count (leaf 2 of 3 and leaf 1 of 2 take the
//! same path), so whoever signs a root must sign the count with it, and verifiers must check the
//! proof's count against the signed one: with the count fixed, the index is fixed too.

use crate::codec::{DecodeError, Encode, Reader, Writer};
use bitcoin::hashes::{sha256, Hash, HashEngine};
use std::sync::OnceLock;

/// The tag of inner nodes.
pub const NODE_TAG: &str = "tribute/merkle-node/v1";

/// Most leaves one tree may hold (about a million receipts per batch).
pub const MAX_LEAVES: u32 = 1 << 20;

/// Most siblings an encoded proof may declare. Any `u32` leaf count needs at most 32; trees
/// within [`MAX_LEAVES`] need at most 20, and decoding demands the exact number anyway.
const MAX_PROOF_SIBLINGS: usize = 32;

/// Format version of an encoded [`InclusionProof`].
const PROOF_VERSION: u8 = 1;

/// Why a tree could not be built or a proof did not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// A tree needs at least one leaf: an empty batch has no root to sign.
    #[error("a Merkle tree needs at least one leaf")]
    Empty,
    /// More leaves than [`MAX_LEAVES`]; split the batch.
    #[error("more than {MAX_LEAVES} leaves")]
    TooManyLeaves,
    /// The leaf index is not below the leaf count.
    #[error("leaf index out of range")]
    IndexOutOfRange,
    /// The proof does not hold exactly the siblings its index and leaf count require.
    #[error("proof has the wrong number of siblings")]
    BadProofLength,
    /// The recomputed root differs from the expected one: the leaf is not in that tree.
    #[error("recomputed root does not match")]
    RootMismatch,
}

/// A tree built once over its leaves, from which proofs are cut cheaply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleTree {
    /// `levels[0]` are the leaves; the last level holds only the root. Never empty.
    levels: Vec<Vec<[u8; 32]>>,
}

impl MerkleTree {
    /// Builds the tree over `leaves`, in order. Fails on no leaves or more than [`MAX_LEAVES`].
    pub fn new(leaves: Vec<[u8; 32]>) -> Result<Self, MerkleError> {
        check_leaf_count(leaves.len())?;
        let mut levels = vec![leaves];
        while let Some(below) = levels.last().filter(|level| level.len() > 1) {
            let above = next_level(below);
            levels.push(above);
        }
        Ok(MerkleTree { levels })
    }

    /// The root: the value the provider signs.
    pub fn root(&self) -> [u8; 32] {
        // `new` guarantees a last level with exactly one node.
        self.levels.last().and_then(|top| top.first()).copied().unwrap_or_default()
    }

    /// How many leaves the tree holds (1..=[`MAX_LEAVES`]).
    pub fn leaf_count(&self) -> u32 {
        // Bounded by MAX_LEAVES in `new`.
        self.levels.first().map_or(0, |leaves| leaves.len() as u32)
    }

    /// The inclusion proof of leaf `index`.
    pub fn proof(&self, index: u32) -> Result<InclusionProof, MerkleError> {
        let leaf_count = self.leaf_count();
        if index >= leaf_count {
            return Err(MerkleError::IndexOutOfRange);
        }
        let mut siblings = Vec::with_capacity(self.levels.len().saturating_sub(1));
        let mut idx = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            if let Some(sibling) = level.get(idx ^ 1) {
                siblings.push(*sibling);
            }
            idx >>= 1;
        }
        Ok(InclusionProof { leaf_index: index, leaf_count, siblings })
    }
}

/// The root over `leaves` without keeping the tree (same result as [`MerkleTree::root`]).
pub fn merkle_root(leaves: &[[u8; 32]]) -> Result<[u8; 32], MerkleError> {
    check_leaf_count(leaves.len())?;
    let mut level = next_level(leaves);
    while level.len() > 1 {
        level = next_level(&level);
    }
    // A single leaf is its own root: `next_level` of one leaf returns it unchanged.
    level.first().copied().ok_or(MerkleError::Empty)
}

/// A proof that one leaf sits at `leaf_index` in a tree of `leaf_count` leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InclusionProof {
    /// The leaf's position, counted from 0.
    pub leaf_index: u32,
    /// How many leaves the tree has; it fixes the tree's shape.
    pub leaf_count: u32,
    /// Sibling hashes from the leaf's level upward, one for each level where the path node is
    /// not the promoted last node.
    pub siblings: Vec<[u8; 32]>,
}

impl InclusionProof {
    /// Checks that `leaf` at this proof's index hashes up to `root`: the index must be below
    /// the count, the sibling count must be exactly what that position needs, and the
    /// recomputed root must match. The caller must also check `leaf_count` against a count
    /// committed alongside the root (the root alone does not fix it).
    pub fn verify(&self, leaf: &[u8; 32], root: &[u8; 32]) -> Result<(), MerkleError> {
        check_position(self.leaf_index, self.leaf_count)?;
        if self.siblings.len() != required_siblings(self.leaf_index, self.leaf_count) {
            return Err(MerkleError::BadProofLength);
        }
        let mut node = *leaf;
        let mut siblings = self.siblings.iter();
        let mut idx = self.leaf_index;
        let mut len = self.leaf_count;
        while len > 1 {
            if (idx ^ 1) < len {
                let sibling = siblings.next().ok_or(MerkleError::BadProofLength)?;
                node = if idx & 1 == 0 {
                    node_hash(&node, sibling)
                } else {
                    node_hash(sibling, &node)
                };
            }
            idx >>= 1;
            len = len.div_ceil(2);
        }
        if &node == root {
            Ok(())
        } else {
            Err(MerkleError::RootMismatch)
        }
    }
}

/// Wire form: version 1, `u32` index, `u32` count, `u8` sibling count, the siblings. Decoding
/// accepts only a position inside a tree of at most [`MAX_LEAVES`] leaves and exactly the
/// number of siblings that position needs.
impl Encode for InclusionProof {
    fn encode_into(&self, w: &mut Writer) {
        debug_assert!(self.siblings.len() <= MAX_PROOF_SIBLINGS);
        w.u8(PROOF_VERSION);
        w.u32(self.leaf_index);
        w.u32(self.leaf_count);
        // An over-long in-memory proof is already invalid; saturating keeps it undecodable.
        w.u8(u8::try_from(self.siblings.len()).unwrap_or(u8::MAX));
        for sibling in &self.siblings {
            w.bytes(sibling);
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(PROOF_VERSION)?;
        let leaf_index = r.u32()?;
        let leaf_count = r.u32()?;
        match check_position(leaf_index, leaf_count) {
            Ok(()) => {}
            Err(MerkleError::IndexOutOfRange) => {
                return Err(DecodeError::InvalidField("leaf_index"))
            }
            Err(_) => return Err(DecodeError::InvalidField("leaf_count")),
        }
        let n = usize::from(r.u8()?);
        if n > MAX_PROOF_SIBLINGS {
            return Err(DecodeError::TooLong("siblings"));
        }
        if n != required_siblings(leaf_index, leaf_count) {
            return Err(DecodeError::InvalidField("siblings"));
        }
        let mut siblings = Vec::with_capacity(n);
        for _ in 0..n {
            siblings.push(r.array()?);
        }
        Ok(InclusionProof { leaf_index, leaf_count, siblings })
    }
}

fn check_leaf_count(len: usize) -> Result<(), MerkleError> {
    if len == 0 {
        return Err(MerkleError::Empty);
    }
    if len > MAX_LEAVES as usize {
        return Err(MerkleError::TooManyLeaves);
    }
    Ok(())
}

/// A proof's position must lie inside a tree that could have been built.
fn check_position(index: u32, count: u32) -> Result<(), MerkleError> {
    if count > MAX_LEAVES {
        return Err(MerkleError::TooManyLeaves);
    }
    if index >= count {
        return Err(MerkleError::IndexOutOfRange);
    }
    Ok(())
}

/// How many siblings the path from leaf `index` in a tree of `count` leaves needs: one per
/// level where the path node has a partner (it is not the promoted odd last node).
fn required_siblings(index: u32, count: u32) -> usize {
    let mut n = 0;
    let mut idx = index;
    let mut len = count;
    while len > 1 {
        if (idx ^ 1) < len {
            n += 1;
        }
        idx >>= 1;
        len = len.div_ceil(2);
    }
    n
}

/// The level above `level`: pairs hashed left to right, an odd last node promoted as is.
fn next_level(level: &[[u8; 32]]) -> Vec<[u8; 32]> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [left, right] => node_hash(left, right),
            [single] => *single,
            _ => unreachable!("chunks(2) yields one or two nodes"),
        })
        .collect()
}

/// `tagged_hash(NODE_TAG, left || right)`, resuming from the engine state after the tag prefix
/// (the two tag-hash blocks are the same for every node; this halves the hashing).
fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    static PREFIX: OnceLock<sha256::HashEngine> = OnceLock::new();
    let mut engine = PREFIX
        .get_or_init(|| {
            let tag = sha256::Hash::hash(NODE_TAG.as_bytes());
            let mut engine = sha256::Hash::engine();
            engine.input(tag.as_ref());
            engine.input(tag.as_ref());
            engine
        })
        .clone();
    engine.input(left);
    engine.input(right);
    sha256::Hash::from_engine(engine).to_byte_array()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::sign::tagged_hash;

    /// The definition [`node_hash`] must agree with.
    fn node_hash_reference(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
        let mut msg = [0u8; 64];
        msg[..32].copy_from_slice(left);
        msg[32..].copy_from_slice(right);
        tagged_hash(NODE_TAG, &msg)
    }

    fn leaf(i: u32) -> [u8; 32] {
        let mut l = [0x5a; 32];
        l[..4].copy_from_slice(&i.to_be_bytes());
        l
    }

    fn leaves(n: u32) -> Vec<[u8; 32]> {
        (0..n).map(leaf).collect()
    }

    #[test]
    fn node_hash_is_the_tagged_hash() {
        let (a, b) = (leaf(1), leaf(2));
        assert_eq!(node_hash(&a, &b), node_hash_reference(&a, &b));
        assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
    }

    #[test]
    fn known_answer_vector() {
        // Independently computed (Python hashlib) for leaves [0x00;32], [0x01;32], [0x02;32]:
        // root = node(node(l0, l1), l2).
        let tree = MerkleTree::new(vec![[0; 32], [1; 32], [2; 32]]).unwrap();
        assert_eq!(
            hex::encode(tree.root()),
            "f470663ed9677e5983da0ae0e1f97ca6f20c3b7a2123da55b06e8d43e8e6ed1e"
        );
    }

    #[test]
    fn small_shapes() {
        let l = leaves(5);
        assert_eq!(MerkleTree::new(vec![]), Err(MerkleError::Empty));
        assert_eq!(merkle_root(&[]), Err(MerkleError::Empty));
        assert_eq!(merkle_root(&l[..1]), Ok(l[0]));
        let one = MerkleTree::new(l[..1].to_vec()).unwrap();
        assert_eq!(one.root(), l[0]);
        assert_eq!(one.leaf_count(), 1);
        let p = one.proof(0).unwrap();
        assert!(p.siblings.is_empty());
        assert_eq!(p.verify(&l[0], &l[0]), Ok(()));

        let n = node_hash_reference;
        assert_eq!(merkle_root(&l[..2]), Ok(n(&l[0], &l[1])));
        // Promotion, not duplication.
        let r3 = n(&n(&l[0], &l[1]), &l[2]);
        assert_eq!(merkle_root(&l[..3]), Ok(r3));
        assert_ne!(merkle_root(&[l[0], l[1], l[2], l[2]]), Ok(r3));
        let r5 = n(&n(&n(&l[0], &l[1]), &n(&l[2], &l[3])), &l[4]);
        assert_eq!(merkle_root(&l), Ok(r5));
        // The promoted leaf 4 needs one sibling only.
        let tree = MerkleTree::new(l.clone()).unwrap();
        assert_eq!(tree.proof(4).unwrap().siblings.len(), 1);
        assert_eq!(tree.proof(0).unwrap().siblings.len(), 3);
        assert_eq!(tree.proof(5), Err(MerkleError::IndexOutOfRange));
    }

    #[test]
    fn tree_and_streaming_root_agree() {
        for n in 1..=70 {
            let l = leaves(n);
            assert_eq!(MerkleTree::new(l.clone()).unwrap().root(), merkle_root(&l).unwrap());
        }
    }

    #[test]
    fn too_many_leaves() {
        let l = vec![[0u8; 32]; MAX_LEAVES as usize + 1];
        assert_eq!(merkle_root(&l), Err(MerkleError::TooManyLeaves));
        assert_eq!(MerkleTree::new(l).unwrap_err(), MerkleError::TooManyLeaves);
        let p = InclusionProof { leaf_index: 0, leaf_count: MAX_LEAVES + 1, siblings: vec![] };
        assert_eq!(p.verify(&[0; 32], &[0; 32]), Err(MerkleError::TooManyLeaves));
    }

    #[test]
    fn required_siblings_matches_built_proofs() {
        for n in 1..=40 {
            let tree = MerkleTree::new(leaves(n)).unwrap();
            for i in 0..n {
                assert_eq!(tree.proof(i).unwrap().siblings.len(), required_siblings(i, n));
            }
        }
        assert_eq!(required_siblings(0, MAX_LEAVES), 20);
        assert_eq!(required_siblings(0, u32::MAX), 32);
        // The last leaf of 2^32 - 1 is promoted once, then paired at every level above.
        assert_eq!(required_siblings(u32::MAX - 1, u32::MAX), 31);
        // The last leaf of 2^k + 1 is promoted all the way to the top.
        assert_eq!(required_siblings(1 << 10, (1 << 10) + 1), 1);
    }

    #[test]
    fn proof_encoding_round_trips_and_is_strict() {
        let tree = MerkleTree::new(leaves(13)).unwrap();
        for i in 0..13 {
            let p = tree.proof(i).unwrap();
            let bytes = p.encode();
            assert_eq!(bytes.len(), 1 + 4 + 4 + 1 + 32 * p.siblings.len());
            assert_eq!(InclusionProof::decode(&bytes), Ok(p.clone()));
            for k in 0..bytes.len() {
                assert_eq!(InclusionProof::decode(&bytes[..k]), Err(DecodeError::Truncated));
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(InclusionProof::decode(&long), Err(DecodeError::TrailingBytes(1)));
        }
        let p = tree.proof(4).unwrap();
        let bytes = p.encode();
        let with = |at: usize, v: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + v.len()].copy_from_slice(v);
            InclusionProof::decode(&b)
        };
        assert_eq!(with(0, &[2]), Err(DecodeError::UnknownVersion(2)));
        assert_eq!(with(1, &13u32.to_be_bytes()), Err(DecodeError::InvalidField("leaf_index")));
        assert_eq!(with(5, &4u32.to_be_bytes()), Err(DecodeError::InvalidField("leaf_index")));
        assert_eq!(
            with(5, &(MAX_LEAVES + 1).to_be_bytes()),
            Err(DecodeError::InvalidField("leaf_count"))
        );
        // Index 12 of 13 is promoted at every level but the top: 1 sibling, not 4.
        assert_eq!(with(1, &12u32.to_be_bytes()), Err(DecodeError::InvalidField("siblings")));
        assert_eq!(with(9, &[33]), Err(DecodeError::TooLong("siblings")));
        assert_eq!(with(9, &[3]), Err(DecodeError::InvalidField("siblings")));
    }
}
