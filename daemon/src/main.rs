//! `tributed` entry point.

fn main() {
    println!("tributed {}", env!("CARGO_PKG_VERSION"));
}
