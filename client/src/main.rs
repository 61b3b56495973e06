//! `tribute` entry point.

fn main() {
    println!("tribute {}", env!("CARGO_PKG_VERSION"));
}
