//! Fuzz target: arbitrary text as server.yaml or agent.yaml through the loaders (strict parse
//! and validation, and the collecting parser behind `check-config`); no panics, and the two
//! loaders agree on whether a file is valid.
#![no_main]

#[path = "../bodies/config.rs"]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config::check(data));
