//! The `memplane` command line (in progress).
fn main() {}
