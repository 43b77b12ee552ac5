//! The `fuzz_frame_decode` fuzz target's body on stable: its committed seeds and a few thousand
//! deterministic mutants of them, in the normal `cargo test` run (cargo-fuzz needs nightly).

use std::path::Path;

#[path = "../fuzz/bodies/frame_decode.rs"]
mod frame_decode;
#[path = "../../../fuzz/bodies/mutate.rs"]
mod mutate;

/// Mutants per run; the body takes microseconds each.
const MUTANTS: usize = 20_000;

#[test]
fn frame_decode_body_holds_on_the_seeds_and_their_mutants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/fuzz_frame_decode");
    let seeds = mutate::read_corpus(&dir);
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let inputs = mutate::inputs(&seeds, MUTANTS, 0x7e7e_0001);
    mutate::run_all("fuzz_frame_decode", &inputs, frame_decode::check);
}
