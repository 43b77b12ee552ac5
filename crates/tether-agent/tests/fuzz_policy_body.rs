//! The `fuzz_policy` fuzz target's body on stable: its committed seeds and a few thousand
//! deterministic mutants of them, in the normal `cargo test` run (cargo-fuzz needs nightly).

use std::path::Path;

#[path = "../../../fuzz/bodies/mutate.rs"]
mod mutate;
#[path = "../../../fuzz/bodies/policy.rs"]
mod policy;

/// Mutants per run; the body takes microseconds each.
const MUTANTS: usize = 10_000;

#[test]
fn policy_body_holds_on_the_seeds_and_their_mutants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/fuzz_policy");
    let seeds = mutate::read_corpus(&dir);
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let inputs = mutate::inputs(&seeds, MUTANTS, 0x7e7e_0003);
    mutate::run_all("fuzz_policy", &inputs, policy::check);
}
