//! Fault points of the metering transaction, for tests (issue 7: each step's failure leaves
//! the ledger consistent, and the client's retry with the same request ids completes the
//! work exactly once).
//!
//! A test arms one point for the next ledger started in this process; that ledger's writer
//! stops at that point of the chosen batch as if the process had died there: an open
//! transaction is dropped (rolled back), nothing is installed in memory, nothing more is
//! signed or committed, and every caller waiting on the batch gets `UNAVAILABLE` +
//! `SHUTTING_DOWN`. Arming is taken by the next start, so a restart runs clean. Nothing is
//! armed in production: the writer compares an `Option` at five places per batch.

use std::sync::Mutex;

/// A step of the writer's batch transaction (`ledger::Writer::commit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeterFault {
    /// The batch is built (shares summed, receipt root signed); nothing written yet.
    BeforeTransaction,
    /// Inside the transaction: the batch's meter events are inserted.
    AfterEvents,
    /// Inside the transaction: the receipt batch row is inserted too.
    AfterBatchRow,
    /// Inside the transaction: new channel rows and pending signed states written; not
    /// committed.
    BeforeCommit,
    /// Committed and durable; nothing installed in memory, no caller answered.
    AfterCommit,
}

/// Every fault point, in the order the writer reaches them.
pub const ALL_METER_FAULTS: [MeterFault; 5] = [
    MeterFault::BeforeTransaction,
    MeterFault::AfterEvents,
    MeterFault::AfterBatchRow,
    MeterFault::BeforeCommit,
    MeterFault::AfterCommit,
];

static ARMED: Mutex<Option<(MeterFault, u64)>> = Mutex::new(None);

/// Arms `fault` at batch `batch_seq` (1-based) of the next ledger started in this process.
/// Tests only; a test binary that arms faults should run one daemon at a time.
pub fn arm_meter_fault(fault: MeterFault, batch_seq: u64) {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fault, batch_seq));
}

/// Takes the armed fault (the ledger calls this once when it starts).
pub(crate) fn take_armed() -> Option<(MeterFault, u64)> {
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).take()
}
