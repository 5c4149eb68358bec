//! Answers kept as wire bytes. A plain query whose question was answered before (same
//! name, type, EDNS payload size and kind of client) gets those bytes again with its own
//! ID, flags and question (its letter case), without hickory's parse, build and encode,
//! which are most of the cost of a local answer. Addresses are still sent in a new random
//! order each time. Anything else (several questions, EDNS options, other opcodes or
//! classes, a question not seen yet) takes the full path, whose answer says whether it may
//! be kept ([`Reuse`]); the whole store is dropped when the zone or the challenge records
//! change.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use prometheus::IntCounter;

use crate::handler::Reuse;

/// Questions kept at most; beyond, the store starts again empty (a flood of new names
/// costs their full path, never memory).
const CAPACITY: usize = 10_000;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// Reads a plain query: one question of class IN with a name of plain labels, nothing else
/// but an OPT record without options. Writes the store's key for it into `key` (kind of
/// client, EDNS payload size, type, name in lower case) and returns where the question ends.
pub(crate) fn read_query(packet: &[u8], recursion: bool, key: &mut Vec<u8>) -> Option<usize> {
    let header = packet.get(..12)?;
    // A query (QR clear), opcode QUERY, not truncated; one question, no answers or
    // authorities, at most one additional record (the OPT).
    if header[2] & 0xfa != 0 || header[4..10] != [0, 1, 0, 0, 0, 0] || header[10] != 0 || header[11] > 1 {
        return None;
    }
    key.clear();
    key.push(u8::from(recursion));
    key.extend_from_slice(&[0, 0, 0, 0]); // payload size and type, set below
    let mut at = 12;
    loop {
        let len = usize::from(*packet.get(at)?);
        if len == 0 {
            key.push(0);
            at += 1;
            break;
        }
        if len > 63 || key.len() + len > 5 + 255 {
            return None; // a compression pointer, an extended label or too long a name
        }
        key.push(len as u8);
        key.extend(packet.get(at + 1..at + 1 + len)?.iter().map(u8::to_ascii_lowercase));
        at += 1 + len;
    }
    let qtype = packet.get(at..at + 2)?;
    if packet.get(at + 2..at + 4)? != CLASS_IN.to_be_bytes() {
        return None;
    }
    key[3..5].copy_from_slice(qtype);
    let question_end = at + 4;
    let payload = if header[11] == 1 {
        // The OPT record: root name, type, payload size, extended rcode 0, version 0, flags,
        // no options, and nothing after it.
        let opt = packet.get(question_end..)?;
        if opt.len() != 11
            || opt[0] != 0
            || opt[1..3] != TYPE_OPT.to_be_bytes()
            || opt[5..7] != [0, 0]
            || opt[9..11] != [0, 0]
        {
            return None;
        }
        u16::from_be_bytes([opt[3], opt[4]]).clamp(512, 1232)
    } else {
        if packet.len() != question_end {
            return None;
        }
        0
    };
    key[1..3].copy_from_slice(&payload.to_be_bytes());
    Some(question_end)
}

/// One answer kept.
pub(crate) struct Kept {
    bytes: Vec<u8>,
    /// Where the answers start, how long each is and how many: addresses of one type, sent
    /// in a new order each time.
    shuffle: Option<(usize, usize, usize)>,
    /// A forwarded answer: kept until then, and counted as a cache hit.
    until: Option<Instant>,
    /// The query counter of its type and response code.
    pub(crate) counter: Option<IntCounter>,
}

impl Kept {
    pub(crate) fn is_forwarded(&self) -> bool {
        self.until.is_some()
    }

    /// Writes the answer to `query` (whose question ends at `question_end`) into `out`.
    pub(crate) fn answer(&self, query: &[u8], question_end: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        out[..2].copy_from_slice(&query[..2]);
        // The flags a response copies from its query: RD and CD.
        out[2] = (out[2] & !0x01) | (query[2] & 0x01);
        out[3] = (out[3] & !0x10) | (query[3] & 0x10);
        out[12..question_end].copy_from_slice(&query[12..question_end]);
        if let Some((start, size, count)) = self.shuffle {
            for i in (1..count).rev() {
                let j = fastrand::usize(..=i);
                if i != j {
                    let (a, b) = out[start + j * size..start + (i + 1) * size].split_at_mut((i - j) * size);
                    a[..size].swap_with_slice(&mut b[..size]);
                }
            }
        }
    }
}

/// The answers kept, for the zone and challenge records in force.
#[derive(Default)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    generation: u64,
    kept: HashMap<Vec<u8>, Kept>,
}

impl Inner {
    /// The answer kept for `key`, if it still holds at `now`.
    pub(crate) fn get(&self, key: &[u8], now: Instant) -> Option<&Kept> {
        self.kept.get(key).filter(|k| k.until.is_none_or(|until| now < until))
    }
}

impl Store {
    /// Held for a batch of queries.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("dns answer store lock")
    }

    /// Which zone an answer about to be made belongs to.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The zone or the challenge records changed: nothing kept holds any more.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.kept.clear();
    }

    /// Keeps `bytes`, the answer to the query whose `key` and question end are given, made
    /// while `generation` was in force, if `reuse` allows it.
    pub(crate) fn keep(
        &self,
        generation: u64,
        key: Vec<u8>,
        question_end: usize,
        bytes: Vec<u8>,
        reuse: Reuse,
        counter: Option<IntCounter>,
    ) {
        let (shuffle, until) = match reuse {
            Reuse::Never => return,
            Reuse::WhileZoneHolds { shuffle } => (shuffle, None),
            Reuse::Until(until) => (false, Some(until)),
        };
        if bytes.len() < question_end {
            return;
        }
        let (bytes, shuffle) = if shuffle {
            match shuffleable(&bytes, question_end) {
                Some((bytes, layout)) => (bytes, Some(layout)),
                None => return,
            }
        } else {
            (bytes, None)
        };
        let mut inner = self.lock();
        if inner.generation != generation {
            return; // made on a zone no longer in force
        }
        if inner.kept.len() >= CAPACITY {
            inner.kept.clear();
        }
        inner.kept.insert(key, Kept { bytes, shuffle, until, counter });
    }
}

/// `bytes` with its answer section rewritten so that its records can trade places: each
/// address record (of one type, named as the question) named by a pointer to the question;
/// with the records' start, size and count. `None` when the answers are anything else or
/// something after them could point into them.
fn shuffleable(bytes: &[u8], start: usize) -> Option<(Vec<u8>, (usize, usize, usize))> {
    let count = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
    if count < 2 {
        return Some((bytes.to_vec(), (start, 0, count)));
    }
    // No authorities; additionals: at most the OPT record (a root name, no pointer).
    if bytes[8..10] != [0, 0] || bytes[10] != 0 || bytes[11] > 1 {
        return None;
    }
    let question = &bytes[12..start - 4];
    let mut out = bytes[..start].to_vec();
    let (mut at, mut first_owner, mut kind) = (start, None, None);
    for _ in 0..count {
        let owner = at;
        let byte = *bytes.get(at)?;
        if byte >= 0xc0 {
            let target = usize::from(u16::from_be_bytes([byte, *bytes.get(at + 1)?]) & 0x3fff);
            if target != 12 && Some(target) != first_owner {
                return None;
            }
            at += 2;
        } else {
            let name = bytes.get(at..at + question.len())?;
            if !name.eq_ignore_ascii_case(question) {
                return None;
            }
            first_owner.get_or_insert(owner);
            at += question.len();
        }
        let fixed = bytes.get(at..at + 10)?;
        let data = match u16::from_be_bytes([fixed[0], fixed[1]]) {
            TYPE_A => 4,
            TYPE_AAAA => 16,
            _ => return None,
        };
        if *kind.get_or_insert(fixed[0..4].to_vec()) != fixed[0..4] || fixed[8..10] != [0, data as u8] {
            return None;
        }
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(bytes.get(at..at + 10 + data)?);
        at += 10 + data;
    }
    let size = (out.len() - start) / count;
    out.extend_from_slice(&bytes[at..]);
    Some((out, (start, size, count)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], qtype: u16, opt: Option<u16>) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())];
        q.extend_from_slice(name);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = opt {
            q.extend_from_slice(&[0, 0, 41]);
            q.extend_from_slice(&size.to_be_bytes());
            q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        q
    }

    #[test]
    fn plain_queries_are_read_in_lower_case_and_the_rest_left_to_the_full_path() {
        let mut key = Vec::new();
        let q = query(b"\x03Web\x00", TYPE_A, Some(4096));
        assert_eq!(read_query(&q, true, &mut key), Some(12 + 5 + 4));
        assert_eq!(key, [1, 0x04, 0xd0, 0, 1, 3, b'w', b'e', b'b', 0]);
        // The same question without EDNS, or from a client without recursion: another key.
        let mut other = Vec::new();
        read_query(&query(b"\x03web\x00", TYPE_A, None), true, &mut other).unwrap();
        assert_ne!(key, other);
        read_query(&q, false, &mut other).unwrap();
        assert_ne!(key, other);

        let mut response = q.clone();
        response[2] |= 0x80;
        let mut two = q.clone();
        two[5] = 2;
        let mut options = q.clone();
        options[q.len() - 1] = 4;
        options.extend_from_slice(&[0, 10, 0, 0]);
        let mut trailing = query(b"\x03web\x00", TYPE_A, None);
        trailing.push(0);
        let mut chaos = query(b"\x03web\x00", TYPE_A, None);
        let at = chaos.len() - 1;
        chaos[at] = 3;
        for (what, packet) in [
            ("a response", response),
            ("two questions", two),
            ("an EDNS option", options),
            ("a byte after the question", trailing),
            ("class CH", chaos),
            ("a compression pointer", query(b"\xc0\x0c", TYPE_A, None)),
            ("cut short", q[..q.len() - 3].to_vec()),
            ("a header only", q[..12].to_vec()),
        ] {
            assert_eq!(read_query(&packet, true, &mut key), None, "{what}");
        }
    }

    #[test]
    fn a_kept_answer_takes_the_query_id_flags_and_case_and_shuffles_its_addresses() {
        let q = query(b"\x03web\x00", TYPE_A, None);
        let end = q.len();
        let mut bytes = q.clone();
        bytes[..4].copy_from_slice(&[0, 0, 0x85, 0x80]); // response, AA, RD, RA
        bytes[7] = 3;
        // As hickory writes them: the first owner name written out, the others pointing to it.
        bytes.extend_from_slice(&[3, b'w', b'e', b'b', 0, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 1]);
        for last in 2..=3u8 {
            bytes.extend_from_slice(&[0xc0, end as u8, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, last]);
        }
        let store = Store::default();
        let mut key = Vec::new();
        read_query(&q, true, &mut key).unwrap();
        let generation = store.generation();
        store.keep(generation, key.clone(), end, bytes, Reuse::WhileZoneHolds { shuffle: true }, None);

        let mut asked = query(b"\x03WeB\x00", TYPE_A, None);
        asked[..4].copy_from_slice(&[0xbe, 0xef, 0x00, 0x10]); // RD clear, CD set
        let mut lasts = std::collections::HashSet::new();
        let mut out = Vec::new();
        for _ in 0..200 {
            store.lock().get(&key, Instant::now()).expect("kept").answer(&asked, end, &mut out);
            assert_eq!(out[..4], [0xbe, 0xef, 0x84, 0x90]);
            assert_eq!(out[12..end], asked[12..end]);
            let mut seen: Vec<u8> = out[end..].chunks(16).map(|r| r[15]).collect();
            lasts.insert(seen[0]);
            seen.sort_unstable();
            assert_eq!(seen, [1, 2, 3]);
        }
        assert_eq!(lasts.len(), 3, "each address comes first sometimes");
        // Records named otherwise, or of two types, cannot trade places.
        assert_eq!(shuffleable(&out, end).map(|s| s.1), Some((end, 16, 3)));
        let mut other = out.clone();
        other[end + 1] = 30;
        assert_eq!(shuffleable(&other, end), None);
        other.clone_from(&out);
        other[end + 16 + 3] = 28;
        assert_eq!(shuffleable(&other, end), None);

        // A new zone: nothing kept holds, and an answer made on the old one is not kept.
        store.clear();
        assert!(store.lock().get(&key, Instant::now()).is_none());
        store.keep(generation, key.clone(), end, q.clone(), Reuse::WhileZoneHolds { shuffle: false }, None);
        assert!(store.lock().get(&key, Instant::now()).is_none());
        // A forwarded answer holds until its instant.
        let now = Instant::now();
        let until = now + std::time::Duration::from_secs(1);
        store.keep(store.generation(), key.clone(), end, q, Reuse::Until(until), None);
        assert!(store.lock().get(&key, now).is_some_and(Kept::is_forwarded));
        assert!(store.lock().get(&key, until).is_none());
    }
}
