//! The `fuzz_session` fuzz target's body on stable: its committed seeds and a few thousand
//! deterministic mutants of them, in the normal `cargo test` run (cargo-fuzz needs nightly).

use std::path::Path;

#[path = "../../../fuzz/bodies/mutate.rs"]
mod mutate;
#[path = "../../../fuzz/bodies/session.rs"]
mod session;

/// Mutants per run: each runs a session on its own paused-clock runtime.
const MUTANTS: usize = 2_000;

#[test]
fn session_body_holds_on_the_seeds_and_their_mutants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/fuzz_session");
    let seeds = mutate::read_corpus(&dir);
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let inputs = mutate::inputs(&seeds, MUTANTS, 0x7e7e_0002);
    mutate::run_all("fuzz_session", &inputs, session::check);
}
