//! Deterministic inputs for the stable tests that run the fuzz bodies: the committed seeds,
//! then mutants of them (bit flips, byte changes, inserted, repeated and deleted runs, splices
//! of two seeds, truncations) from a fixed-seed generator, so that a failure replays exactly.
//! Shared by path (`#[path]`) between the fuzz crates and the workspace's tests.

#![allow(dead_code)]

use std::path::Path;

/// The files of a corpus folder, in name order (none when the folder is missing).
pub(crate) fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// SplitMix64: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that matter to the parsers: boundaries, separators, YAML and frame markers.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7F, 0x80, 0xFF, b' ', b'\n', b':', b'-', b'{', b'}', b'[', b']', b'"', b'.',
    b'/', b'*', b'0', b'9', b'#', b'&',
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = input.len();
    match rng.below(8) {
        0 if len > 0 => {
            let at = rng.below(len);
            input[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            input[at] = if rng.below(2) == 0 {
                INTERESTING[rng.below(INTERESTING.len())]
            } else {
                rng.next() as u8
            };
        }
        2 => {
            let at = rng.below(len + 1);
            let run: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
            input.splice(at..at, run);
        }
        3 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(32)).min(len);
            input.drain(at..end);
        }
        4 if len > 0 => {
            // Repeat a run (frames and lines twice, nested structures deeper).
            let at = rng.below(len);
            let end = (at + 1 + rng.below(64)).min(len);
            let run = input[at..end].to_vec();
            input.splice(end..end, run);
        }
        5 if !seeds.is_empty() => {
            // Splice: the head of this input with the tail of another seed.
            let other = &seeds[rng.below(seeds.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        6 if len > 0 => input.truncate(rng.below(len)),
        _ => {
            let at = rng.below(len + 1);
            let byte = INTERESTING[rng.below(INTERESTING.len())];
            input.insert(at, byte);
        }
    }
}

/// The seeds, then `count` mutants of them (one to four mutations each, a few from nothing),
/// from generator state `seed`.
pub(crate) fn inputs(seeds: &[Vec<u8>], count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    let mut out = seeds.to_vec();
    for _ in 0..count {
        let mut input = if seeds.is_empty() || rng.below(16) == 0 {
            Vec::new()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut input, seeds);
        }
        out.push(input);
    }
    out
}

/// Runs `body` over every input; on a panic, prints which input it was (index and bytes in
/// hex, to save as a file and replay with the fuzz target) before failing.
pub(crate) fn run_all(name: &str, inputs: &[Vec<u8>], body: impl Fn(&[u8])) {
    for (i, input) in inputs.iter().enumerate() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(input)));
        if let Err(panic) = outcome {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!(
                "{name}: input {i} of {} failed; its bytes: {hex}",
                inputs.len()
            );
            std::panic::resume_unwind(panic);
        }
    }
}
