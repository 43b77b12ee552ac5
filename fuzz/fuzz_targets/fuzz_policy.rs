//! Fuzz target: the agent's target parser and dial policy. Arbitrary strings as targets, CIDRs,
//! host patterns and ports; arbitrary addresses. No panics, and the classification is stable
//! under every spelling of one address.
#![no_main]

#[path = "../bodies/policy.rs"]
mod policy;

libfuzzer_sys::fuzz_target!(|data: &[u8]| policy::check(data));
