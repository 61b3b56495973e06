//! Exhaustive Merkle checks over every batch size 1..=1000: every leaf's proof verifies, and
//! every kind of tampering with a leaf, index, root, sibling list or leaf count is refused.
//!
//! Leaves are cheap distinct byte patterns (not hashes): the tree only needs them distinct.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use tribute_channels::codec::{DecodeError, Encode};
use tribute_channels::merkle::{merkle_root, InclusionProof, MerkleError, MerkleTree, MAX_LEAVES};
use tribute_channels::sign::tagged_hash;

const MAX_SIZE: u32 = 1000;

fn leaf(i: u32) -> [u8; 32] {
    let mut l = [0xa5; 32];
    l[..4].copy_from_slice(&i.to_be_bytes());
    l[28..].copy_from_slice(&(!i).to_le_bytes());
    l
}

fn leaves(n: u32) -> Vec<[u8; 32]> {
    (0..n).map(leaf).collect()
}

fn flip(mut h: [u8; 32], bit: u32) -> [u8; 32] {
    h[(bit / 8 % 32) as usize] ^= 1 << (bit % 8);
    h
}

/// A small deterministic generator, so samples differ per size but runs repeat.
fn lcg(state: &mut u64) -> u32 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*state >> 33) as u32
}

/// Every index for small trees; for larger ones the edges, the middle and a few random ones.
fn sample_indices(n: u32) -> Vec<u32> {
    if n <= 64 {
        return (0..n).collect();
    }
    let mut seed = u64::from(n);
    let mut v = vec![0, 1, 2, n / 3, n / 2, n / 2 + 1, n - 3, n - 2, n - 1];
    v.extend((0..4).map(|_| lcg(&mut seed) % n));
    v.sort_unstable();
    v.dedup();
    v
}

/// Indices to try in place of `i`: all of them for small trees, otherwise neighbours, the
/// indices one bit away, the edges and a few random ones.
fn other_indices(i: u32, n: u32) -> Vec<u32> {
    let mut v: Vec<u32> = if n <= 64 {
        (0..n).collect()
    } else {
        let mut seed = u64::from(n) << 32 | u64::from(i);
        let mut v = vec![0, 1, n / 2, n - 2, n - 1, i.wrapping_sub(2), i.wrapping_sub(1)];
        v.extend([i + 1, i + 2]);
        v.extend((0..11).map(|k| i ^ (1 << k)));
        v.extend((0..4).map(|_| lcg(&mut seed) % n));
        v
    };
    v.retain(|&j| j < n && j != i);
    v.sort_unstable();
    v.dedup();
    v
}

/// RFC 6962's recursive definition (split at the largest power of two below the count):
/// promotion of the odd node gives the same shape, computed here independently.
fn reference_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = leaves.len().next_power_of_two() / 2;
    let mut msg = [0u8; 64];
    msg[..32].copy_from_slice(&reference_root(&leaves[..k]));
    msg[32..].copy_from_slice(&reference_root(&leaves[k..]));
    tagged_hash("tribute/merkle-node/v1", &msg)
}

#[test]
fn every_leaf_of_every_size_verifies() {
    for n in 1..=MAX_SIZE {
        let tree = MerkleTree::new(leaves(n)).unwrap();
        assert_eq!(tree.leaf_count(), n);
        let root = tree.root();
        let height = 32 - (n - 1).leading_zeros() as usize; // ceil(log2 n)
        for i in 0..n {
            let proof = tree.proof(i).unwrap();
            assert_eq!((proof.leaf_index, proof.leaf_count), (i, n));
            assert!(proof.siblings.len() <= height);
            assert_eq!(proof.verify(&leaf(i), &root), Ok(()), "leaf {i} of {n}");
            assert_eq!(proof.verify(&flip(leaf(i), i), &root), Err(MerkleError::RootMismatch));
        }
        assert_eq!(tree.proof(n), Err(MerkleError::IndexOutOfRange));
    }
}

#[test]
fn every_size_matches_the_reference_shape() {
    for n in 1..=MAX_SIZE {
        let l = leaves(n);
        let root = reference_root(&l);
        assert_eq!(merkle_root(&l), Ok(root), "size {n}");
        assert_eq!(MerkleTree::new(l).unwrap().root(), root, "size {n}");
    }
}

#[test]
fn tampering_is_refused_for_every_size() {
    for n in 1..=MAX_SIZE {
        let tree = MerkleTree::new(leaves(n)).unwrap();
        let root = tree.root();
        for i in sample_indices(n) {
            let proof = tree.proof(i).unwrap();
            let l = leaf(i);
            assert_eq!(proof.verify(&l, &root), Ok(()));
            let mismatch = Err(MerkleError::RootMismatch);

            // The leaf: a flipped bit, and every other leaf of the tree in its place.
            for bit in [0, 7, 100, 255] {
                assert_eq!(proof.verify(&flip(l, bit), &root), mismatch);
            }
            if n <= 64 {
                for j in (0..n).filter(|&j| j != i) {
                    assert_eq!(proof.verify(&leaf(j), &root), mismatch);
                }
            }

            // The root.
            for bit in [0, 131, 255] {
                assert_eq!(proof.verify(&l, &flip(root, bit)), mismatch);
            }

            // The index: other valid indices fail (wrong length or wrong root), out of range
            // ones fail as such.
            for j in other_indices(i, n) {
                let moved = InclusionProof { leaf_index: j, ..proof.clone() };
                let got = moved.verify(&l, &root);
                assert!(
                    got == Err(MerkleError::BadProofLength) || got == mismatch,
                    "index {i} -> {j} of {n}: {got:?}"
                );
            }
            for j in [n, n + 1, u32::MAX] {
                let moved = InclusionProof { leaf_index: j, ..proof.clone() };
                assert_eq!(moved.verify(&l, &root), Err(MerkleError::IndexOutOfRange));
            }

            // Each sibling altered, dropped, or one added anywhere.
            for s in 0..proof.siblings.len() {
                let mut p = proof.clone();
                p.siblings[s] = flip(p.siblings[s], s as u32 * 11);
                assert_eq!(p.verify(&l, &root), mismatch);
                let mut p = proof.clone();
                p.siblings.remove(s);
                assert_eq!(p.verify(&l, &root), Err(MerkleError::BadProofLength));
            }
            for s in 0..=proof.siblings.len() {
                let mut p = proof.clone();
                p.siblings.insert(s, root);
                assert_eq!(p.verify(&l, &root), Err(MerkleError::BadProofLength));
            }

            // The leaf count: out of range, or a shape that needs a different path. A count
            // whose path happens to match may verify (see
            // `leaf_count_is_bound_by_the_signed_batch_not_the_root`).
            for c in [0, i, MAX_LEAVES + 1, u32::MAX] {
                let p = InclusionProof { leaf_count: c, ..proof.clone() };
                assert!(p.verify(&l, &root).is_err(), "count {c} for {i} of {n}");
            }
            for c in [n - 1, n + 1, n * 2, (n + 1).next_power_of_two(), MAX_LEAVES] {
                if c == n || c <= i {
                    continue;
                }
                let p = InclusionProof { leaf_count: c, ..proof.clone() };
                let tree_c_proof_len = {
                    // Siblings a real proof at (i, c) has, from a tree of that size's shape.
                    let mut len = 0;
                    let (mut idx, mut width) = (i, c);
                    while width > 1 {
                        len += usize::from((idx ^ 1) < width);
                        idx >>= 1;
                        width = width.div_ceil(2);
                    }
                    len
                };
                if tree_c_proof_len != proof.siblings.len() {
                    assert_eq!(p.verify(&l, &root), Err(MerkleError::BadProofLength));
                }
            }

            // The canonical encoding round-trips.
            let bytes = proof.encode();
            assert_eq!(InclusionProof::decode(&bytes), Ok(proof.clone()));
        }
    }
}

#[test]
fn leaf_count_is_bound_by_the_signed_batch_not_the_root() {
    // The root alone does not commit to the leaf count: leaf 2 of 3 and leaf 1 of 2 take the
    // same path (promoted, then right child). This is why `ReceiptBatchRoot` signs
    // `receipt_count` and `verify_receipt` requires `proof.leaf_count` to equal it; with the
    // count fixed, the index is fixed too (checked exhaustively above).
    let tree = MerkleTree::new(leaves(3)).unwrap();
    let proof = tree.proof(2).unwrap();
    let reread = InclusionProof { leaf_index: 1, leaf_count: 2, ..proof };
    assert_eq!(reread.verify(&leaf(2), &tree.root()), Ok(()));
}

#[test]
fn decoding_refuses_proofs_of_the_wrong_shape() {
    let tree = MerkleTree::new(leaves(MAX_SIZE)).unwrap();
    for i in sample_indices(MAX_SIZE) {
        let proof = tree.proof(i).unwrap();
        let mut longer = proof.clone();
        longer.siblings.push([0; 32]);
        assert_eq!(
            InclusionProof::decode(&longer.encode()),
            Err(DecodeError::InvalidField("siblings"))
        );
        let mut shorter = proof.clone();
        shorter.siblings.pop();
        assert_eq!(
            InclusionProof::decode(&shorter.encode()),
            Err(DecodeError::InvalidField("siblings"))
        );
    }
}
