//! Fuzz target: arbitrary bytes through `decode` and `decode_prefixed`; no panics, stable round trips.
#![no_main]

#[path = "../bodies/frame_decode.rs"]
mod frame_decode;

libfuzzer_sys::fuzz_target!(|data: &[u8]| frame_decode::check(data));
