//! The `tether` binary: parses flags, loads config, binds listeners and calls the daemon libraries.

fn main() {}
