//! Fuzz target: arbitrary bytes as a sequence of actions on two multiplexer cores joined by
//! hand-carried frames (opens, accepts, writes, reads, resets, drops, deliveries, time); the
//! harness checks the core's invariants after every step and at rest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tether_mux::fuzzing::run(data);
});
