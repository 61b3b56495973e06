//! Every decoder: the first byte picks the type, the rest is decoded. Nothing may panic, and
//! whatever decodes must re-encode to exactly the input (one canonical form per value).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tribute_channels::auth::AuthChallenge;
use tribute_channels::channel::ChannelState;
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, Revocation};
use tribute_channels::merkle::InclusionProof;
use tribute_channels::receipt::{Receipt, ReceiptBatchRoot};
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::training::TrainingRun;
use tribute_channels::Signed;

fn canonical<T: Encode>(bytes: &[u8]) {
    if let Ok(v) = T::decode(bytes) {
        assert_eq!(v.encode(), bytes, "decoded value re-encodes differently");
    }
}

fn signed<T: tribute_channels::Message>(bytes: &[u8]) {
    canonical::<T>(bytes);
    canonical::<Signed<T>>(bytes);
    if let Ok(s) = Signed::<T>::decode(bytes) {
        let _ = s.verify();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 9 {
        0 => signed::<ChannelState>(bytes),
        1 => signed::<Licence>(bytes),
        2 => signed::<Revocation>(bytes),
        3 => signed::<ContributorRegistration>(bytes),
        4 => signed::<TrainingRun>(bytes),
        5 => signed::<ReceiptBatchRoot>(bytes),
        6 => signed::<AuthChallenge>(bytes),
        7 => canonical::<Receipt>(bytes),
        _ => canonical::<InclusionProof>(bytes),
    }
});
