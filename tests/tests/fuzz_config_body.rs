//! The `fuzz_config` fuzz target's body on stable: its committed seeds and a few thousand
//! deterministic mutants of them, in the normal `cargo test` run (cargo-fuzz needs nightly).

use std::path::Path;

#[path = "../../fuzz/bodies/config.rs"]
mod config;
#[path = "../../fuzz/bodies/mutate.rs"]
mod mutate;

/// Mutants per run: each is parsed by three loaders.
const MUTANTS: usize = 2_000;

#[test]
fn config_body_holds_on_the_seeds_and_their_mutants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/fuzz_config");
    let seeds = mutate::read_corpus(&dir);
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let inputs = mutate::inputs(&seeds, MUTANTS, 0x7e7e_0004);
    mutate::run_all("fuzz_config", &inputs, config::check);
}
