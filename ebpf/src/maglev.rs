//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend fills the lookup
//! table along its own permutation, in turns, so every backend gets an equal share of the
//! slots and adding or removing one moves little more than its own share.

/// 64-bit FNV-1a with a seed: stable across runs and nodes, so every agent builds the same
/// table from the same backends (a flow lands on the same task whichever node it enters).
fn hash(seed: u64, name: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in name {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The lookup table of size `m` (a prime) for `names` (the backends' stable names): entry
/// `i` is the index in `names` of the backend that serves hash bucket `i`. Empty when there
/// is no backend.
#[must_use]
pub fn table(names: &[String], m: u32) -> Vec<u32> {
    if names.is_empty() {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|n| (hash(0x5eed_0001, n.as_bytes()) % m64, hash(0x5eed_0002, n.as_bytes()) % (m64 - 1) + 1))
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn shares_are_even() {
        let t = table(&names(7), 1021);
        let mut counts = [0u32; 7];
        for e in &t {
            counts[*e as usize] += 1;
        }
        assert!(counts.iter().all(|c| (145..=147).contains(c)), "{counts:?}");
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        let before = table(&names(10), 1021);
        let mut fewer = names(10);
        fewer.remove(3);
        let after = table(&fewer, 1021);
        let name_of = |t: &[u32], set: &[String], i: usize| set[t[i] as usize].clone();
        let all = names(10);
        let moved = (0..1021).filter(|&i| name_of(&before, &all, i) != name_of(&after, &fewer, i)).count();
        let own = before.iter().filter(|&&e| e == 3).count();
        assert!(moved >= own && moved < own * 2, "moved {moved}, its own share {own}");
    }

    #[test]
    fn no_backend_no_table_and_one_backend_everything() {
        assert!(table(&[], 1021).is_empty());
        assert!(table(&names(1), 13).iter().all(|&e| e == 0));
    }
}
