//! Fault points of the metering transaction, for tests (issue 7: each step's failure leaves
//! the ledger consistent, and the client's retry with the same request ids completes the
//! work exactly once).
//!
//! A test arms one point for the next ledger started in this process; that ledger's writer
//! stops at that point of the chosen batch as if the process had died there: an open
//! transaction is dropped (rolled back), nothing is installed in memory, nothing more is
//! signed or committed, and every caller waiting on the batch gets `UNAVAILABLE` +
//! `SHUTTING_DOWN`. Arming is taken by the next start, so a restart runs clean. Nothing is
//! armed in production: the writer compares an `Option` at five places per batch (and one
//! more for the test gate, [`WriterHold`]).

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

/// A gate in front of the writer's meter batches (tests). While it is closed (as armed),
/// the writer of the ledger it was armed for stops before each batch of meter requests —
/// the batch's requests admitted, nothing of them written — until it is opened. Lets a
/// test fill the admission bound (`admission`) deterministically, without timing.
#[derive(Clone, Default)]
pub struct WriterHold {
    inner: std::sync::Arc<(Mutex<HoldState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct HoldState {
    open: bool,
    /// Requests in the batch the writer is stopped at now (0: not stopped).
    parked_requests: usize,
}

static HOLD: Mutex<Option<WriterHold>> = Mutex::new(None);

/// Closes a gate in front of the meter batches of the next ledger started in this process
/// (see [`WriterHold`]); the returned handle opens it. Tests only.
pub fn arm_writer_hold() -> WriterHold {
    let hold = WriterHold::default();
    *HOLD.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold.clone());
    hold
}

/// Takes the armed gate (the ledger calls this once when it starts).
pub(crate) fn take_hold() -> Option<WriterHold> {
    HOLD.lock().unwrap_or_else(|p| p.into_inner()).take()
}

impl WriterHold {
    fn state(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate again: the writer stops before its next meter batch.
    pub fn close(&self) {
        self.state().open = false;
    }

    /// Opens the gate: the writer carries on and stops no more until it is closed again.
    pub fn open(&self) {
        self.state().open = true;
        self.inner.1.notify_all();
    }

    /// Blocks until the writer is stopped at the gate with a batch; returns how many
    /// requests that batch holds. (Call from a blocking context.)
    pub fn wait_parked(&self) -> usize {
        let mut s = self.state();
        while s.parked_requests == 0 && !s.open {
            s = self.inner.1.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked_requests
    }

    /// The writer side: stops here with a batch of `requests` until the gate is open.
    pub(crate) fn pass(&self, requests: usize) {
        let mut s = self.state();
        if s.open {
            return;
        }
        s.parked_requests = requests;
        self.inner.1.notify_all();
        while !s.open {
            s = self.inner.1.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked_requests = 0;
    }
}
