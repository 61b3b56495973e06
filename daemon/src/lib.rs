//! `tributed`, the payer-side daemon. It owns everything that does I/O on the provider's
//! side: storage, the metering pipeline, the channel manager, settlement and Lightning.
//! The protocol rules themselves live in `tribute-channels`.

pub use tribute_channels as channels;
