//! Fuzz target: a real mux session fed an arbitrary byte stream as its peer (length-prefixed
//! frames through the codec and the session's state), on a paused-clock runtime. The session
//! opens two streams of its own and accepts, reads and answers the peer's. No panic, the session
//! ends once the peer's input ends, its output stays bounded, and every stream is closed and
//! counted after the end.
#![no_main]

#[path = "../bodies/session.rs"]
mod session;

libfuzzer_sys::fuzz_target!(|data: &[u8]| session::check(data));
