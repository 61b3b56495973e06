//! The client side of Tribute: the provider SDK, the contributor receiving node and the
//! `tribute` command-line tool.

pub use tribute_channels as channels;
