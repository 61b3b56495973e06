//! Receipt verification on arbitrary receipts and inclusion proofs against a real signed
//! batch root of four receipts: nothing panics, and only the four receipts that are in the
//! batch ever verify (a proof for anything else would be a forgery).
#![no_main]

use bitcoin::secp256k1::{Keypair, SecretKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tribute_channels::codec::Encode;
use tribute_channels::merkle::InclusionProof;
use tribute_channels::receipt::{build_batch, verify_receipt, Receipt, ReceiptBatchRoot};
use tribute_channels::{sign::secp, ModelId, Network, Nsat, PublicKey, RequestId, Signed};

struct Batch {
    receipts: Vec<Receipt>,
    /// Each receipt's inclusion proof, encoded.
    proofs: Vec<Vec<u8>>,
    root: Signed<ReceiptBatchRoot>,
}

fn batch() -> &'static Batch {
    static BATCH: OnceLock<Batch> = OnceLock::new();
    BATCH.get_or_init(|| {
        let key = |n: u8| {
            let kp =
                Keypair::from_secret_key(secp(), &SecretKey::from_slice(&[n; 32]).expect("valid"));
            (kp, PublicKey::from(kp.x_only_public_key().0))
        };
        let (provider, provider_key) = key(1);
        let mut contributors = [key(2).1, key(3).1];
        contributors.sort();
        let receipts: Vec<Receipt> = (0..4u128)
            .map(|i| {
                Receipt::new(
                    RequestId::new(format!("req-{i}")).expect("id"),
                    ModelId::new("model").expect("id"),
                    1,
                    Nsat(1000 + i),
                    vec![(contributors[0], Nsat(400)), (contributors[1], Nsat(600 + i))],
                )
                .expect("receipt")
            })
            .collect();
        let tree = build_batch(&receipts).expect("tree");
        let root = ReceiptBatchRoot::for_tree(Network::Regtest, provider_key, 7, &tree);
        let proofs = (0..4).map(|i| tree.proof(i).expect("proof").encode()).collect();
        Batch { receipts, proofs, root: Signed::sign(root, &provider, &[0; 32]).expect("sign") }
    })
}

fuzz_target!(|data: &[u8]| {
    // Starts from receipt `data[0] % 4` and its real proof, so most inputs decode; the rest
    // of the input is edits (position, xor) on their bytes, and one byte that moves the
    // border between receipt and proof.
    let b = batch();
    let Some((&pick, edits)) = data.split_first() else { return };
    let i = usize::from(pick % 4);
    let receipt_bytes = b.receipts[i].encode();
    let mut bytes = receipt_bytes.clone();
    bytes.extend_from_slice(&b.proofs[i]);
    let mut border = receipt_bytes.len();
    let mut pairs = edits.chunks_exact(2);
    for pair in &mut pairs {
        let at = usize::from(pair[0]) % bytes.len();
        bytes[at] ^= pair[1];
    }
    if let [shift] = pairs.remainder() {
        border = (border + usize::from(*shift)).saturating_sub(128).min(bytes.len());
    }
    let (r, p) = bytes.split_at(border);
    let (Ok(receipt), Ok(proof)) = (Receipt::decode(r), InclusionProof::decode(p)) else {
        return;
    };
    if verify_receipt(&receipt, &proof, &b.root).is_ok() {
        assert!(b.receipts.contains(&receipt), "a receipt outside the batch verified");
    }
});
