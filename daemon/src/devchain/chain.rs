//! The dev chain's state: blocks, the UTXO set, the mempool and mining. Pure: no I/O, no
//! clock reads, no locking — the caller passes the time in and serialises access.
//!
//! What is checked when a transaction enters the mempool: its inputs exist and are unspent
//! (in the chain or in the mempool) and are not spent twice, outputs do not exceed inputs,
//! coinbase maturity, and absolute (nLockTime) and relative (BIP68) lock times. What is
//! *not* checked: scripts, signatures, standardness, sizes, dust. Proof of work is real but
//! trivial (regtest's `0x207fffff` target, about two hashes per block).

use std::collections::{HashMap, HashSet};

use ldk_node::bitcoin::block::{Header, Version as BlockVersion};
use ldk_node::bitcoin::blockdata::constants::genesis_block;
use ldk_node::bitcoin::hashes::{sha256d, Hash};
use ldk_node::bitcoin::opcodes::{all::OP_PUSHNUM_1, OP_0};
use ldk_node::bitcoin::pow::Work;
use ldk_node::bitcoin::script::{Builder, ScriptBuf};
use ldk_node::bitcoin::transaction::Version as TxVersion;
use ldk_node::bitcoin::{
    absolute, Amount, Block, BlockHash, CompactTarget, Network, OutPoint, Sequence, Transaction,
    TxIn, TxMerkleNode, TxOut, Txid, Witness,
};

/// Regtest's proof-of-work limit: every hash below it is valid, so about half of all nonces
/// work.
pub(crate) const REGTEST_BITS: u32 = 0x207f_ffff;
/// Blocks a coinbase output must wait before it can be spent (consensus rule).
pub(crate) const COINBASE_MATURITY_BLOCKS: u32 = 100;
/// Regtest halves the subsidy every 150 blocks.
const SUBSIDY_HALVING_INTERVAL_BLOCKS: u32 = 150;
/// The consensus block weight limit; mempool transactions beyond it wait for the next block.
pub(crate) const MAX_BLOCK_WEIGHT_WU: u64 = 4_000_000;
/// Bound on the mempool, so a runaway client fails loudly instead of growing memory.
pub(crate) const MAX_MEMPOOL_TXS: usize = 10_000;
/// BIP9 version bits with no deployment signalled, as bitcoind mines them.
const BLOCK_VERSION: i32 = 0x2000_0000;
/// Lock-time values below this are block heights, above it unix times (consensus rule).
const LOCKTIME_THRESHOLD: u32 = 500_000_000;

/// Why a transaction was not accepted into the mempool. Each maps to the error code and
/// message bitcoind would give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The transaction is already confirmed.
    #[error("transaction already in block chain")]
    AlreadyInChain,
    /// A coinbase transaction cannot be relayed.
    #[error("coinbase")]
    Coinbase,
    /// No inputs.
    #[error("bad-txns-vin-empty")]
    NoInputs,
    /// No outputs.
    #[error("bad-txns-vout-empty")]
    NoOutputs,
    /// The same outpoint is spent twice by this transaction.
    #[error("bad-txns-inputs-duplicate")]
    DuplicateInputs,
    /// An input is neither in the UTXO set nor created by a mempool transaction.
    #[error("bad-txns-inputs-missingorspent ({0})")]
    MissingOrSpent(OutPoint),
    /// An input is already spent by another mempool transaction (no replacement here).
    #[error("txn-mempool-conflict (spent by {0})")]
    MempoolConflict(Txid),
    /// Outputs are worth more than inputs.
    #[error("bad-txns-in-belowout")]
    ValueOutExceedsValueIn,
    /// A coinbase output younger than 100 blocks.
    #[error("bad-txns-premature-spend-of-coinbase")]
    PrematureCoinbaseSpend,
    /// nLockTime is not yet reached.
    #[error("non-final")]
    NonFinal,
    /// A BIP68 relative lock time is not yet reached.
    #[error("non-BIP68-final")]
    NonBip68Final,
    /// The mempool is full (10 000 transactions).
    #[error("mempool full")]
    MempoolFull,
}

impl RejectReason {
    /// The bitcoind RPC error code for this rejection.
    pub(crate) fn rpc_code(&self) -> i64 {
        match self {
            // RPC_VERIFY_ALREADY_IN_CHAIN
            RejectReason::AlreadyInChain => -27,
            // RPC_VERIFY_ERROR
            RejectReason::MissingOrSpent(_) => -25,
            // RPC_VERIFY_REJECTED
            _ => -26,
        }
    }
}

/// An unspent output in the confirmed UTXO set.
#[derive(Debug, Clone)]
pub(crate) struct Utxo {
    pub(crate) txout: TxOut,
    pub(crate) height: u32,
    pub(crate) is_coinbase: bool,
}

/// A transaction waiting in the mempool.
#[derive(Debug, Clone)]
pub(crate) struct MempoolEntry {
    pub(crate) tx: Transaction,
    pub(crate) fee: Amount,
    /// Unix time it entered the mempool; ldk-node uses it to emit each transaction once.
    pub(crate) time_unix_secs: u64,
    /// Chain height when it entered the mempool.
    pub(crate) height: u32,
    /// Arrival order; mining keeps it so parents precede children.
    seq: u64,
}

/// What `gettxout` reports for an unspent output.
#[derive(Debug, Clone)]
pub(crate) struct TxOutInfo {
    pub(crate) txout: TxOut,
    pub(crate) confirmations: u32,
    pub(crate) is_coinbase: bool,
}

/// A block with the data bitcoind derives for its header RPCs.
#[derive(Debug, Clone)]
pub(crate) struct StoredBlock {
    pub(crate) block: Block,
    pub(crate) hash: BlockHash,
    pub(crate) height: u32,
    /// Total work up to and including this block; lightning-block-sync checks it adds up.
    pub(crate) chainwork: Work,
    /// Median of the last 11 block times including this one (BIP113).
    pub(crate) median_time: u32,
}

/// Where a confirmed transaction sits.
#[derive(Debug, Clone, Copy)]
struct TxLocation {
    height: u32,
    index: usize,
}

/// The whole chain state. Reorgs are not modelled: blocks are only ever appended.
#[derive(Debug)]
pub(crate) struct Chain {
    blocks: Vec<StoredBlock>,
    heights_by_hash: HashMap<BlockHash, u32>,
    confirmed_txs: HashMap<Txid, TxLocation>,
    utxos: HashMap<OutPoint, Utxo>,
    mempool: HashMap<Txid, MempoolEntry>,
    /// Outpoints spent by mempool transactions, for conflict checks and `gettxout`.
    mempool_spends: HashMap<OutPoint, Txid>,
    next_mempool_seq: u64,
    faucet_count: u64,
}

impl Chain {
    /// A chain holding only regtest's genesis block. The genesis must be the real one:
    /// BDK and LDK check the genesis hash against the network.
    pub(crate) fn new() -> Chain {
        let genesis = genesis_block(Network::Regtest);
        let hash = genesis.block_hash();
        let stored = StoredBlock {
            chainwork: genesis.header.work(),
            median_time: genesis.header.time,
            hash,
            height: 0,
            block: genesis,
        };
        let mut chain = Chain {
            blocks: Vec::new(),
            heights_by_hash: HashMap::new(),
            confirmed_txs: HashMap::new(),
            utxos: HashMap::new(),
            mempool: HashMap::new(),
            mempool_spends: HashMap::new(),
            next_mempool_seq: 0,
            faucet_count: 0,
        };
        // As in bitcoind, the genesis coinbase is not in the UTXO set (it cannot be spent).
        chain.heights_by_hash.insert(hash, 0);
        chain.blocks.push(stored);
        chain
    }

    pub(crate) fn tip(&self) -> &StoredBlock {
        // `blocks` always holds at least the genesis block (see `new`).
        &self.blocks[self.blocks.len() - 1]
    }

    pub(crate) fn tip_height(&self) -> u32 {
        self.tip().height
    }

    pub(crate) fn block_at(&self, height: u32) -> Option<&StoredBlock> {
        self.blocks.get(height as usize)
    }

    pub(crate) fn block_by_hash(&self, hash: &BlockHash) -> Option<&StoredBlock> {
        self.heights_by_hash.get(hash).and_then(|h| self.block_at(*h))
    }

    /// Confirmations of a block on the (only) chain: 1 for the tip.
    pub(crate) fn confirmations(&self, height: u32) -> u32 {
        self.tip_height() - height + 1
    }

    /// Mines one block on the tip holding as many mempool transactions as fit, in arrival
    /// order, with the coinbase paying subsidy and fees to `coinbase_script`.
    pub(crate) fn mine_block(
        &mut self,
        coinbase_script: ScriptBuf,
        now_unix_secs: u64,
    ) -> BlockHash {
        let height = self.tip_height() + 1;
        let prev = self.tip();
        let prev_hash = prev.hash;
        let prev_median_time = prev.median_time;

        let mut entries: Vec<&MempoolEntry> = self.mempool.values().collect();
        entries.sort_by_key(|e| e.seq);
        // Room for the header and the coinbase.
        let mut weight_wu: u64 = 4_000;
        let mut fees = Amount::ZERO;
        let mut txdata = Vec::with_capacity(entries.len() + 1);
        for entry in entries {
            let tx_weight_wu = entry.tx.weight().to_wu();
            // Stop at the first that does not fit rather than skipping it, so no child is
            // mined without its parent.
            if weight_wu + tx_weight_wu > MAX_BLOCK_WEIGHT_WU {
                break;
            }
            weight_wu += tx_weight_wu;
            fees += entry.fee;
            txdata.push(entry.tx.clone());
        }

        let coinbase = coinbase_tx(height, subsidy(height) + fees, coinbase_script);
        txdata.insert(0, coinbase);
        // bitcoind's rule is only "later than the median of the last 11"; taking the wall
        // clock otherwise keeps block times from drifting ahead when many blocks are mined
        // at once (LDK checks invoice expiry against the highest block time it has seen).
        let time = u32::try_from(now_unix_secs)
            .unwrap_or(u32::MAX)
            .max(prev_median_time.saturating_add(1));
        let block = build_block(prev_hash, time, txdata);
        self.connect(block)
    }

    /// Appends a block that `build_block` produced.
    fn connect(&mut self, block: Block) -> BlockHash {
        let height = self.tip_height() + 1;
        let hash = block.block_hash();
        for (index, tx) in block.txdata.iter().enumerate() {
            let txid = tx.compute_txid();
            let is_coinbase = index == 0;
            if !is_coinbase {
                for input in &tx.input {
                    // Faucet inputs are made up and were never in the set; removing nothing
                    // is fine.
                    self.utxos.remove(&input.previous_output);
                    self.mempool_spends.remove(&input.previous_output);
                }
            }
            for (vout, txout) in tx.output.iter().enumerate() {
                // Provably unspendable outputs (the witness commitment, OP_RETURN) are not
                // UTXOs, as in bitcoind.
                if txout.script_pubkey.is_op_return() {
                    continue;
                }
                let outpoint = OutPoint { txid, vout: vout as u32 };
                self.utxos.insert(outpoint, Utxo { txout: txout.clone(), height, is_coinbase });
            }
            self.mempool.remove(&txid);
            self.confirmed_txs.insert(txid, TxLocation { height, index });
        }
        let chainwork = self.tip().chainwork + block.header.work();
        let mut times: Vec<u32> = self
            .blocks
            .iter()
            .rev()
            .take(10)
            .map(|b| b.block.header.time)
            .chain(std::iter::once(block.header.time))
            .collect();
        times.sort_unstable();
        let median_time = times[times.len() / 2];
        self.heights_by_hash.insert(hash, height);
        self.blocks.push(StoredBlock { block, hash, height, chainwork, median_time });
        hash
    }

    /// Accepts a transaction into the mempool after the checks listed in the module doc.
    /// A transaction already in the mempool is accepted again (bitcoind returns its txid).
    pub(crate) fn accept_to_mempool(
        &mut self,
        tx: Transaction,
        now_unix_secs: u64,
    ) -> Result<Txid, RejectReason> {
        let txid = tx.compute_txid();
        if self.mempool.contains_key(&txid) {
            return Ok(txid);
        }
        if self.confirmed_txs.contains_key(&txid) {
            return Err(RejectReason::AlreadyInChain);
        }
        if tx.is_coinbase() {
            return Err(RejectReason::Coinbase);
        }
        if tx.input.is_empty() {
            return Err(RejectReason::NoInputs);
        }
        if tx.output.is_empty() {
            return Err(RejectReason::NoOutputs);
        }
        if self.mempool.len() >= MAX_MEMPOOL_TXS {
            return Err(RejectReason::MempoolFull);
        }
        let mut seen = HashSet::with_capacity(tx.input.len());
        if !tx.input.iter().all(|i| seen.insert(i.previous_output)) {
            return Err(RejectReason::DuplicateInputs);
        }
        self.check_final(&tx)?;

        let next_height = self.tip_height() + 1;
        let tip_median_time = self.tip().median_time;
        let mut value_in = Amount::ZERO;
        for input in &tx.input {
            let prevout = input.previous_output;
            if let Some(spender) = self.mempool_spends.get(&prevout) {
                return Err(RejectReason::MempoolConflict(*spender));
            }
            // (value, height the coin counts as confirmed at, median time before that block)
            let (value, coin_height, coin_prev_median_time) =
                if let Some(utxo) = self.utxos.get(&prevout) {
                    if utxo.is_coinbase && next_height - utxo.height < COINBASE_MATURITY_BLOCKS {
                        return Err(RejectReason::PrematureCoinbaseSpend);
                    }
                    let prev_median =
                        self.block_at(utxo.height.saturating_sub(1)).map_or(0, |b| b.median_time);
                    (utxo.txout.value, utxo.height, prev_median)
                } else if let Some(parent) = self.mempool.get(&prevout.txid) {
                    let txout = parent
                        .tx
                        .output
                        .get(prevout.vout as usize)
                        .ok_or(RejectReason::MissingOrSpent(prevout))?;
                    // BIP68 treats an unconfirmed coin as confirming in the next block.
                    (txout.value, next_height, tip_median_time)
                } else {
                    return Err(RejectReason::MissingOrSpent(prevout));
                };
            if !bip68_satisfied(
                &tx,
                input,
                coin_height,
                coin_prev_median_time,
                next_height,
                tip_median_time,
            ) {
                return Err(RejectReason::NonBip68Final);
            }
            value_in += value;
        }
        let value_out = tx
            .output
            .iter()
            .try_fold(Amount::ZERO, |sum, o| sum.checked_add(o.value))
            .ok_or(RejectReason::ValueOutExceedsValueIn)?;
        let fee = value_in.checked_sub(value_out).ok_or(RejectReason::ValueOutExceedsValueIn)?;
        self.insert_mempool(tx, fee, now_unix_secs);
        Ok(txid)
    }

    /// A transaction paying `amount` to `script_pubkey`, spending a made-up outpoint that no
    /// block ever created. It is accepted only because nothing here validates inputs' scripts
    /// or existence for faucet transactions; a real node would reject it.
    pub(crate) fn faucet(
        &mut self,
        script_pubkey: ScriptBuf,
        amount: Amount,
        now_unix_secs: u64,
    ) -> Result<Txid, RejectReason> {
        if self.mempool.len() >= MAX_MEMPOOL_TXS {
            return Err(RejectReason::MempoolFull);
        }
        self.faucet_count += 1;
        let mut preimage = b"tribute-devchain-faucet".to_vec();
        preimage.extend_from_slice(&self.faucet_count.to_le_bytes());
        let made_up =
            OutPoint { txid: Txid::from_raw_hash(sha256d::Hash::hash(&preimage)), vout: 0 };
        let tx = Transaction {
            version: TxVersion::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: made_up,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut { value: amount, script_pubkey }],
        };
        let txid = tx.compute_txid();
        // The made-up input's value equals the output, so the fee is zero.
        self.insert_mempool(tx, Amount::ZERO, now_unix_secs);
        Ok(txid)
    }

    fn insert_mempool(&mut self, tx: Transaction, fee: Amount, now_unix_secs: u64) {
        let txid = tx.compute_txid();
        for input in &tx.input {
            self.mempool_spends.insert(input.previous_output, txid);
        }
        let entry = MempoolEntry {
            tx,
            fee,
            time_unix_secs: now_unix_secs,
            height: self.tip_height(),
            seq: self.next_mempool_seq,
        };
        self.next_mempool_seq += 1;
        self.mempool.insert(txid, entry);
    }

    /// nLockTime finality for inclusion in the next block (BIP113: time locks compare with
    /// the tip's median time).
    fn check_final(&self, tx: &Transaction) -> Result<(), RejectReason> {
        let lock = tx.lock_time.to_consensus_u32();
        if lock == 0 || tx.input.iter().all(|i| i.sequence == Sequence::MAX) {
            return Ok(());
        }
        let reached = if lock < LOCKTIME_THRESHOLD {
            lock < self.tip_height() + 1
        } else {
            lock < self.tip().median_time
        };
        if reached {
            Ok(())
        } else {
            Err(RejectReason::NonFinal)
        }
    }

    /// `gettxout`: the output if it is unspent. With `include_mempool`, outputs spent by
    /// mempool transactions are reported spent and mempool outputs unspent (0
    /// confirmations), as bitcoind does.
    pub(crate) fn txout(&self, outpoint: &OutPoint, include_mempool: bool) -> Option<TxOutInfo> {
        if include_mempool && self.mempool_spends.contains_key(outpoint) {
            return None;
        }
        if let Some(utxo) = self.utxos.get(outpoint) {
            return Some(TxOutInfo {
                txout: utxo.txout.clone(),
                confirmations: self.confirmations(utxo.height),
                is_coinbase: utxo.is_coinbase,
            });
        }
        if include_mempool {
            let entry = self.mempool.get(&outpoint.txid)?;
            let txout = entry.tx.output.get(outpoint.vout as usize)?;
            return Some(TxOutInfo { txout: txout.clone(), confirmations: 0, is_coinbase: false });
        }
        None
    }

    /// A transaction from the mempool or the chain (as bitcoind with `-txindex`), with the
    /// block holding it if confirmed.
    pub(crate) fn transaction(&self, txid: &Txid) -> Option<(&Transaction, Option<&StoredBlock>)> {
        if let Some(entry) = self.mempool.get(txid) {
            return Some((&entry.tx, None));
        }
        let loc = self.confirmed_txs.get(txid)?;
        let block = self.block_at(loc.height)?;
        let tx = block.block.txdata.get(loc.index)?;
        Some((tx, Some(block)))
    }

    pub(crate) fn mempool_entry(&self, txid: &Txid) -> Option<&MempoolEntry> {
        self.mempool.get(txid)
    }

    /// Mempool txids in arrival order.
    pub(crate) fn mempool_txids(&self) -> Vec<Txid> {
        let mut entries: Vec<(&Txid, &MempoolEntry)> = self.mempool.iter().collect();
        entries.sort_by_key(|(_, e)| e.seq);
        entries.into_iter().map(|(txid, _)| *txid).collect()
    }

    pub(crate) fn mempool_len(&self) -> usize {
        self.mempool.len()
    }

    /// Parents of a mempool transaction that are themselves in the mempool.
    pub(crate) fn mempool_parents(&self, entry: &MempoolEntry) -> Vec<Txid> {
        let mut parents: Vec<Txid> = entry
            .tx
            .input
            .iter()
            .map(|i| i.previous_output.txid)
            .filter(|txid| self.mempool.contains_key(txid))
            .collect();
        parents.sort();
        parents.dedup();
        parents
    }

    /// (transaction count, total virtual size in vbytes, total fees) of the mempool.
    pub(crate) fn mempool_totals(&self) -> (usize, u64, Amount) {
        self.mempool.values().fold((0, 0, Amount::ZERO), |(n, vsize, fee), e| {
            (n + 1, vsize + e.tx.vsize() as u64, fee + e.fee)
        })
    }
}

/// BIP68: an input with a relative lock time (tx version ≥ 2, disable flag clear) may only
/// be included once its coin is old enough in blocks or in median time.
fn bip68_satisfied(
    tx: &Transaction,
    input: &TxIn,
    coin_height: u32,
    coin_prev_median_time: u32,
    block_height: u32,
    tip_median_time: u32,
) -> bool {
    const DISABLE_FLAG: u32 = 1 << 31;
    const TYPE_FLAG: u32 = 1 << 22;
    const MASK: u32 = 0x0000_ffff;
    const GRANULARITY_SHIFT: u32 = 9;
    let seq = input.sequence.to_consensus_u32();
    if tx.version.0 < 2 || seq & DISABLE_FLAG != 0 {
        return true;
    }
    let value = seq & MASK;
    if seq & TYPE_FLAG != 0 {
        let min_time =
            i64::from(coin_prev_median_time) + (i64::from(value) << GRANULARITY_SHIFT) - 1;
        min_time < i64::from(tip_median_time)
    } else {
        let min_height = i64::from(coin_height) + i64::from(value) - 1;
        min_height < i64::from(block_height)
    }
}

/// The block subsidy at `height` on regtest.
pub(crate) fn subsidy(height: u32) -> Amount {
    let halvings = height / SUBSIDY_HALVING_INTERVAL_BLOCKS;
    if halvings >= 64 {
        return Amount::ZERO;
    }
    Amount::from_sat((50 * 100_000_000) >> halvings)
}

/// A segwit coinbase: BIP34 height in the script sig, the 32-byte witness reserved value
/// in its witness. The witness commitment output is added by [`build_block`].
fn coinbase_tx(height: u32, value: Amount, script_pubkey: ScriptBuf) -> Transaction {
    let script_sig = Builder::new()
        .push_int(i64::from(height))
        // bitcoind requires 2..=100 bytes of script sig; heights 1..=16 push as one opcode.
        .push_opcode(OP_0)
        .into_script();
    Transaction {
        version: TxVersion::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig,
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[[0u8; 32]]),
        }],
        output: vec![TxOut { value, script_pubkey }],
    }
}

/// Completes a block: appends the BIP141 witness commitment to the coinbase (which must be
/// `txdata[0]`, carrying the 32-byte reserved value in its witness), sets the merkle root and
/// grinds the nonce until the header meets the regtest target.
pub(crate) fn build_block(
    prev_blockhash: BlockHash,
    time: u32,
    mut txdata: Vec<Transaction>,
) -> Block {
    let mut block = Block {
        header: Header {
            version: BlockVersion::from_consensus(BLOCK_VERSION),
            prev_blockhash,
            merkle_root: TxMerkleNode::all_zeros(),
            time,
            bits: CompactTarget::from_consensus(REGTEST_BITS),
            nonce: 0,
        },
        txdata: Vec::new(),
    };
    // The witness root treats the coinbase's wtxid as zero, so it does not depend on the
    // commitment output added below.
    block.txdata = std::mem::take(&mut txdata);
    if let Some(witness_root) = block.witness_root() {
        let commitment = Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
        // OP_RETURN, push 36 bytes, BIP141 header 0xaa21a9ed, commitment.
        let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
        script.extend_from_slice(commitment.as_byte_array());
        if let Some(coinbase) = block.txdata.first_mut() {
            coinbase
                .output
                .push(TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::from_bytes(script) });
        }
    }
    block.header.merkle_root = block.compute_merkle_root().unwrap_or_else(TxMerkleNode::all_zeros);
    let target = block.header.target();
    while block.header.validate_pow(target).is_err() {
        // Half of all nonces succeed at 0x207fffff, so this loop runs about twice; should the
        // nonce space ever run out, a later time gives a fresh one.
        match block.header.nonce.checked_add(1) {
            Some(nonce) => block.header.nonce = nonce,
            None => {
                block.header.nonce = 0;
                block.header.time = block.header.time.saturating_add(1);
            }
        }
    }
    block
}

/// The script coinbases pay to when no address is given: a bare `OP_TRUE`, anyone can
/// spend it after maturity.
pub(crate) fn anyone_can_spend_script() -> ScriptBuf {
    ScriptBuf::from_bytes(vec![OP_PUSHNUM_1.to_u8()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldk_node::bitcoin::consensus::encode::{deserialize, serialize};

    const NOW: u64 = 1_700_000_000;

    fn p2wpkh_like_script(tag: u8) -> ScriptBuf {
        let mut bytes = vec![0x00, 0x14];
        bytes.extend_from_slice(&[tag; 20]);
        ScriptBuf::from_bytes(bytes)
    }

    /// A segwit spend of `prevout` paying `value` to a fresh script.
    fn spend(prevout: OutPoint, value: Amount, tag: u8) -> Transaction {
        Transaction {
            version: TxVersion::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: prevout,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                // A fake signature and key: nothing checks them, but a non-empty witness
                // makes the block need a witness commitment.
                witness: Witness::from_slice(&[vec![0x30; 71], vec![0x02; 33]]),
            }],
            output: vec![TxOut { value, script_pubkey: p2wpkh_like_script(tag) }],
        }
    }

    fn mined_chain(blocks: u32) -> Chain {
        let mut chain = Chain::new();
        for _ in 0..blocks {
            chain.mine_block(anyone_can_spend_script(), NOW);
        }
        chain
    }

    #[test]
    fn genesis_is_regtest_genesis() {
        let chain = Chain::new();
        assert_eq!(chain.tip_height(), 0);
        assert_eq!(chain.tip().hash, genesis_block(Network::Regtest).block_hash());
    }

    #[test]
    fn mined_blocks_have_valid_merkle_root_witness_commitment_and_pow() {
        let mut chain = mined_chain(1);
        let funding = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(100_000), NOW).unwrap();
        chain.mine_block(anyone_can_spend_script(), NOW);
        let child = spend(OutPoint { txid: funding, vout: 0 }, Amount::from_sat(99_000), 2);
        let child_txid = chain.accept_to_mempool(child, NOW).unwrap();
        let hash = chain.mine_block(anyone_can_spend_script(), NOW);

        let stored = chain.block_by_hash(&hash).unwrap();
        let block = &stored.block;
        assert_eq!(block.txdata.len(), 2);
        assert_eq!(block.txdata[1].compute_txid(), child_txid);
        assert!(!block.txdata[1].input[0].witness.is_empty());
        assert!(block.check_merkle_root());
        assert!(block.check_witness_commitment());
        assert_eq!(block.header.validate_pow(block.header.target()).unwrap(), hash);
        // BIP34 as bitcoind checks it: the script sig starts with `CScript() << height`.
        let height_push = Builder::new().push_int(3).into_script();
        assert!(block.txdata[0].input[0].script_sig.as_bytes().starts_with(height_push.as_bytes()));
        // The coinbase gets the fee on top of the subsidy.
        assert_eq!(block.txdata[0].output[0].value, subsidy(3) + Amount::from_sat(1_000));
        // A round trip through the wire encoding keeps the commitment valid.
        let decoded: Block = deserialize(&serialize(block)).unwrap();
        assert!(decoded.check_witness_commitment());
        // Chainwork adds up block by block.
        let prev = chain.block_at(2).unwrap();
        assert_eq!(stored.chainwork, prev.chainwork + block.header.work());
        assert_eq!(block.header.prev_blockhash, prev.hash);
    }

    #[test]
    fn tampered_witness_fails_the_commitment_check() {
        let mut chain = mined_chain(1);
        let funding = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(50_000), NOW).unwrap();
        chain.mine_block(anyone_can_spend_script(), NOW);
        chain
            .accept_to_mempool(
                spend(OutPoint { txid: funding, vout: 0 }, Amount::from_sat(40_000), 3),
                NOW,
            )
            .unwrap();
        let hash = chain.mine_block(anyone_can_spend_script(), NOW);
        let mut block = chain.block_by_hash(&hash).unwrap().block.clone();
        block.txdata[1].input[0].witness = Witness::from_slice(&[vec![0x31; 71]]);
        assert!(!block.check_witness_commitment());
    }

    #[test]
    fn gettxout_tracks_unspent_spent_and_unknown_outputs() {
        let mut chain = mined_chain(101);
        let txid = chain.faucet(p2wpkh_like_script(7), Amount::from_sat(250_000), NOW).unwrap();
        let out = OutPoint { txid, vout: 0 };

        // In the mempool: visible only with include_mempool.
        assert_eq!(chain.txout(&out, true).unwrap().confirmations, 0);
        assert!(chain.txout(&out, false).is_none());

        chain.mine_block(anyone_can_spend_script(), NOW);
        let info = chain.txout(&out, false).unwrap();
        assert_eq!(info.txout.value, Amount::from_sat(250_000));
        assert_eq!(info.confirmations, 1);
        assert!(!info.is_coinbase);
        chain.mine_block(anyone_can_spend_script(), NOW);
        assert_eq!(chain.txout(&out, false).unwrap().confirmations, 2);

        // Unknown vout and unknown txid: null.
        assert!(chain.txout(&OutPoint { txid, vout: 1 }, true).is_none());
        assert!(chain.txout(&OutPoint { txid: Txid::all_zeros(), vout: 0 }, true).is_none());

        // Spent in the mempool: spent with include_mempool, still unspent without.
        let child = chain.accept_to_mempool(spend(out, Amount::from_sat(249_000), 8), NOW).unwrap();
        assert!(chain.txout(&out, true).is_none());
        assert!(chain.txout(&out, false).is_some());

        // Spent in a block: gone for good; the child's output is the new UTXO.
        chain.mine_block(anyone_can_spend_script(), NOW);
        assert!(chain.txout(&out, true).is_none());
        assert!(chain.txout(&out, false).is_none());
        assert!(chain.txout(&OutPoint { txid: child, vout: 0 }, false).is_some());

        // The witness commitment output is not a UTXO; the coinbase output is.
        let tip = chain.tip().block.clone();
        let coinbase_txid = tip.txdata[0].compute_txid();
        assert!(
            chain.txout(&OutPoint { txid: coinbase_txid, vout: 0 }, false).unwrap().is_coinbase
        );
        assert!(chain.txout(&OutPoint { txid: coinbase_txid, vout: 1 }, false).is_none());
    }

    #[test]
    fn mempool_rejects_double_spends_missing_inputs_and_overspends() {
        let mut chain = mined_chain(1);
        let txid = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(10_000), NOW).unwrap();
        let out = OutPoint { txid, vout: 0 };
        chain.accept_to_mempool(spend(out, Amount::from_sat(9_000), 2), NOW).unwrap();
        let conflicting = spend(out, Amount::from_sat(8_000), 3);
        assert!(matches!(
            chain.accept_to_mempool(conflicting, NOW),
            Err(RejectReason::MempoolConflict(_))
        ));
        let unknown = OutPoint { txid: Txid::all_zeros(), vout: 5 };
        assert_eq!(
            chain.accept_to_mempool(spend(unknown, Amount::from_sat(1), 4), NOW),
            Err(RejectReason::MissingOrSpent(unknown))
        );
        let txid2 = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(10_000), NOW).unwrap();
        assert_eq!(
            chain.accept_to_mempool(
                spend(OutPoint { txid: txid2, vout: 0 }, Amount::from_sat(10_001), 5),
                NOW
            ),
            Err(RejectReason::ValueOutExceedsValueIn)
        );
        chain.mine_block(anyone_can_spend_script(), NOW);
        assert_eq!(chain.mempool_len(), 0);
        let confirmed = chain.block_at(2).unwrap().block.txdata[1].clone();
        assert_eq!(chain.accept_to_mempool(confirmed, NOW), Err(RejectReason::AlreadyInChain));
    }

    #[test]
    fn coinbase_outputs_mature_after_100_blocks() {
        let mut chain = mined_chain(1);
        let coinbase = chain.block_at(1).unwrap().block.txdata[0].compute_txid();
        let out = OutPoint { txid: coinbase, vout: 0 };
        for _ in 0..98 {
            chain.mine_block(anyone_can_spend_script(), NOW);
        }
        // Tip 99: the next block is 100, only 99 blocks after the coinbase.
        assert_eq!(
            chain.accept_to_mempool(spend(out, Amount::from_sat(1_000), 1), NOW),
            Err(RejectReason::PrematureCoinbaseSpend)
        );
        chain.mine_block(anyone_can_spend_script(), NOW);
        chain.accept_to_mempool(spend(out, Amount::from_sat(1_000), 1), NOW).unwrap();
    }

    #[test]
    fn lock_times_are_enforced() {
        let mut chain = mined_chain(10);
        let txid = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(10_000), NOW).unwrap();
        chain.mine_block(anyone_can_spend_script(), NOW); // tip 11
        let out = OutPoint { txid, vout: 0 };

        let mut absolute_locked = spend(out, Amount::from_sat(9_000), 2);
        absolute_locked.lock_time = absolute::LockTime::from_consensus(13);
        assert_eq!(
            chain.accept_to_mempool(absolute_locked.clone(), NOW),
            Err(RejectReason::NonFinal)
        );
        chain.mine_block(anyone_can_spend_script(), NOW); // tip 12, next 13: 13 < 13 fails
        assert_eq!(
            chain.accept_to_mempool(absolute_locked.clone(), NOW),
            Err(RejectReason::NonFinal)
        );
        chain.mine_block(anyone_can_spend_script(), NOW); // next 14
        chain.accept_to_mempool(absolute_locked, NOW).unwrap();

        // Relative: the coin confirmed at 11; a 5-block CSV lock allows block 16 onwards.
        let txid = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(10_000), NOW).unwrap();
        chain.mine_block(anyone_can_spend_script(), NOW); // tip 14, coin at 14
        let mut relative_locked = spend(OutPoint { txid, vout: 0 }, Amount::from_sat(9_000), 3);
        relative_locked.input[0].sequence = Sequence::from_height(3);
        assert_eq!(
            chain.accept_to_mempool(relative_locked.clone(), NOW),
            Err(RejectReason::NonBip68Final)
        );
        chain.mine_block(anyone_can_spend_script(), NOW); // next 16: 14 + 3 - 1 = 16 < 16 fails
        assert_eq!(
            chain.accept_to_mempool(relative_locked.clone(), NOW),
            Err(RejectReason::NonBip68Final)
        );
        chain.mine_block(anyone_can_spend_script(), NOW); // next 17
        chain.accept_to_mempool(relative_locked, NOW).unwrap();
    }

    #[test]
    fn block_times_never_fall_behind_the_median_and_follow_the_clock() {
        let mut chain = Chain::new();
        for _ in 0..30 {
            chain.mine_block(anyone_can_spend_script(), NOW);
        }
        for h in 1..=30 {
            let block = chain.block_at(h).unwrap();
            let prev = chain.block_at(h - 1).unwrap();
            assert!(block.block.header.time > prev.median_time);
        }
        // Many blocks at one instant drift only slowly ahead of the clock.
        assert!(u64::from(chain.tip().block.header.time) < NOW + 30);
    }

    #[test]
    fn subsidy_halves_every_150_blocks() {
        assert_eq!(subsidy(1), Amount::from_btc(50.0).unwrap());
        assert_eq!(subsidy(150), Amount::from_btc(25.0).unwrap());
        assert_eq!(subsidy(150 * 64), Amount::ZERO);
    }

    #[test]
    fn mining_keeps_parents_before_children() {
        let mut chain = mined_chain(1);
        let parent = chain.faucet(p2wpkh_like_script(1), Amount::from_sat(10_000), NOW).unwrap();
        let child = chain
            .accept_to_mempool(
                spend(OutPoint { txid: parent, vout: 0 }, Amount::from_sat(9_000), 2),
                NOW,
            )
            .unwrap();
        assert_eq!(chain.mempool_txids(), vec![parent, child]);
        let hash = chain.mine_block(anyone_can_spend_script(), NOW);
        let block = &chain.block_by_hash(&hash).unwrap().block;
        assert_eq!(block.txdata[1].compute_txid(), parent);
        assert_eq!(block.txdata[2].compute_txid(), child);
    }
}
