//! Response rate limiting over UDP (as BIND's RRL with `slip 1`): a client (an IPv4 address,
//! an IPv6 /64) gets so many answers a second; beyond that each answer goes out empty with TC
//! set, about the size of the query: a real client asks again over TCP at once (which a
//! forged source address cannot complete), a forged one gains nothing. A full UDP answer can
//! be dozens of times its query: without a limit, anyone who can forge a source address that
//! mesh-dns answers turns the node into an amplifier against that address. Nothing is
//! dropped (a dropped answer costs a real client its resolver's timeout, seconds), and TCP
//! is never limited.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Clients remembered at most; beyond, those quiet for a second are forgotten first.
const CLIENTS: usize = 65_536;

/// What to do with one UDP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Send it empty with TC set.
    Slip,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Answers per second per client (0: no limit), with a burst of as many.
pub struct RateLimit {
    per_second: u32,
    clients: Mutex<Clients>,
}

#[derive(Default)]
struct Clients {
    buckets: HashMap<IpAddr, Bucket>,
    /// When the full table was last swept of quiet clients: at most once a second, so a
    /// flood from as many forged addresses costs a sweep a second, not one a packet.
    swept: Option<Instant>,
}

impl RateLimit {
    #[must_use]
    pub fn new(per_second: u32) -> Self {
        Self { per_second, clients: Mutex::default() }
    }

    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        if self.per_second == 0 {
            return Verdict::Answer;
        }
        let rate = f64::from(self.per_second);
        let key = match client {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 @ IpAddr::V4(_) => v4,
        };
        let mut clients = self.clients.lock().expect("rate limit lock");
        let Clients { buckets, swept } = &mut *clients;
        if buckets.len() >= CLIENTS && !buckets.contains_key(&key) {
            if swept.is_none_or(|at| now.duration_since(at).as_secs() >= 1) {
                buckets.retain(|_, b| now.duration_since(b.at).as_secs_f64() < 1.0);
                *swept = Some(now);
            }
            if buckets.len() >= CLIENTS {
                // Flooded from as many addresses: everything new slips (never open).
                return Verdict::Slip;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: rate, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Verdict::Answer
        } else {
            Verdict::Slip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_client_over_its_rate_gets_its_answers_slipped_until_tokens_come_back() {
        let limit = RateLimit::new(10);
        let (client, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..14).map(|_| limit.check(client, t0)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Answer), "{verdicts:?}");
        assert_eq!(verdicts[10..], [Verdict::Slip; 4]);
        assert_eq!(limit.check(other, t0), Verdict::Answer, "another client has its own rate");
        assert_eq!(
            limit.check(client, t0 + Duration::from_millis(100)),
            Verdict::Answer,
            "a token back after 1/10 s"
        );
        assert_eq!(RateLimit::new(0).check(client, t0), Verdict::Answer);
    }

    #[test]
    fn a_full_table_slips_new_clients_and_is_swept_at_most_once_a_second() {
        let limit = RateLimit::new(5);
        let t0 = Instant::now();
        for i in 0..CLIENTS as u32 {
            assert_eq!(limit.check(IpAddr::V4(i.into()), t0), Verdict::Answer);
        }
        let newcomer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(limit.check(newcomer, t0), Verdict::Slip, "nobody quiet yet: a new client slips");
        assert_eq!(
            limit.check(newcomer, t0 + Duration::from_millis(1500)),
            Verdict::Answer,
            "the quiet were swept"
        );
        assert_eq!(limit.check(IpAddr::V4(1.into()), t0 + Duration::from_millis(1500)), Verdict::Answer);
    }

    #[test]
    fn an_ipv6_64_is_one_client() {
        let limit = RateLimit::new(1);
        let t0 = Instant::now();
        assert_eq!(limit.check("fd00::1".parse().unwrap(), t0), Verdict::Answer);
        assert_eq!(limit.check("fd00::2".parse().unwrap(), t0), Verdict::Slip);
        assert_eq!(limit.check("fd00:0:0:1::1".parse().unwrap(), t0), Verdict::Answer);
    }
}
