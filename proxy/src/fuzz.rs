//! Seeded random inputs for the parsers' tests (property-based fuzzing on stable Rust): each
//! input is made from the seed and its number, so a failing one is replayed exactly, and
//! its text is in the failure. `FUZZ_INPUTS` sets how many each test tries (1,000 by
//! default; `tests/fuzz.sh` runs a million).

use std::panic::{catch_unwind, AssertUnwindSafe};

/// How many inputs each fuzz test tries.
#[must_use]
pub fn inputs() -> u64 {
    std::env::var("FUZZ_INPUTS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000)
}

/// Runs `check` on `inputs()` inputs made by `make` from a seeded generator; a panic is
/// reported with the input's number and text.
pub fn run<T: std::fmt::Debug>(
    name: &str,
    mut make: impl FnMut(&mut fastrand::Rng) -> T,
    mut check: impl FnMut(&T),
) {
    let started = std::time::Instant::now();
    for i in 0..inputs() {
        let mut rng = fastrand::Rng::with_seed(0x6d65_7368 ^ i);
        let input = make(&mut rng);
        let survived = catch_unwind(AssertUnwindSafe(|| check(&input))).is_ok();
        assert!(survived, "{name}: input {i} failed: {input:?}");
    }
    eprintln!("fuzz {name}: {} inputs in {:?}", inputs(), started.elapsed());
}

/// Text made of `pieces` and random characters: near-valid input for a parser.
#[must_use]
pub fn text(rng: &mut fastrand::Rng, pieces: &[&str], max: usize) -> String {
    let mut out = String::new();
    for _ in 0..rng.usize(0..max) {
        if rng.u8(..) < 200 {
            out.push_str(pieces[rng.usize(..pieces.len())]);
        } else {
            out.push(rng.char(..));
        }
    }
    out
}

/// `valid` with a few random edits (bytes flipped, cut, doubled): input a parser must refuse
/// or take, never crash on.
#[must_use]
pub fn mutated(rng: &mut fastrand::Rng, valid: &str) -> String {
    let mut bytes = valid.as_bytes().to_vec();
    for _ in 0..rng.usize(1..6) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.usize(..bytes.len());
        match rng.u8(..4) {
            0 => bytes[at] = rng.u8(..),
            1 => {
                bytes.remove(at);
            }
            2 => bytes.insert(at, rng.u8(..)),
            _ => {
                let end = (at + rng.usize(1..20)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
