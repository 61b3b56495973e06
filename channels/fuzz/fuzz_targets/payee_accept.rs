//! The payee side on arbitrary signed-state bytes: decoding and `accept` never panic, and
//! nothing that was not signed by the provider is ever accepted.
#![no_main]

use bitcoin::secp256k1::{Keypair, SecretKey};
use libfuzzer_sys::fuzz_target;
use tribute_channels::channel::{ChannelParams, ChannelState, PayeeChannel};
use tribute_channels::codec::Encode;
use tribute_channels::{sign::secp, Network, PublicKey, Signed};

fn key(n: u8) -> PublicKey {
    let sk = SecretKey::from_slice(&[n; 32]).expect("valid");
    PublicKey::from(Keypair::from_secret_key(secp(), &sk).x_only_public_key().0)
}

fuzz_target!(|data: &[u8]| {
    let params = ChannelParams {
        network: Network::Regtest,
        provider_key: key(1),
        contributor_key: key(2),
        nonce: [3; 32],
    };
    let payee = PayeeChannel::new(&params);
    if let Ok(state) = Signed::<ChannelState>::decode(data) {
        if let Ok(next) = payee.accept(state) {
            // Accepting implies a valid provider signature; a random input finding one
            // would be a forgery.
            assert!(state.verify().is_ok());
            assert_eq!(next.latest().map(|s| s.encode()), Some(data.to_vec()));
        }
    }
});
