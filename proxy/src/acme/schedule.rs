//! When to renew, and how long to wait after a failure. Pure arithmetic, so it is tested
//! without a clock.

use std::time::{Duration, SystemTime};

/// When a certificate valid from `not_before` to `not_after` is renewed: when `renew_before`
/// is left (default: a third of its lifetime, so at two thirds), minus up to 1/30 of the
/// lifetime (at most an hour) of jitter, so that certificates issued together are not
/// renewed in one burst. `jitter` is a random number in `[0, 1)`.
#[must_use]
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Option<Duration>,
    jitter: f64,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let window = renew_before.unwrap_or(lifetime / 3).min(lifetime);
    let spread = (lifetime / 30).min(Duration::from_secs(3600)).mul_f64(jitter.clamp(0.0, 1.0));
    not_after.checked_sub(window + spread).map_or(not_before, |t| t.max(not_before))
}

/// A point in a renewal window the CA suggested (ACME Renewal Information, RFC 9773 §4.2:
/// "a uniformly random point" between start and end).
#[must_use]
pub fn in_window(start: SystemTime, end: SystemTime, jitter: f64) -> SystemTime {
    start + end.duration_since(start).unwrap_or_default().mul_f64(jitter.clamp(0.0, 1.0))
}

/// Capped exponential backoff after failed orders, honouring the CA's `Retry-After`.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    #[must_use]
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, failures: 0 }
    }

    /// The wait after one more failure: `base`, doubling per failure in a row up to `max`,
    /// but never shorter than the CA asked for with `Retry-After`.
    pub fn failed(&mut self, retry_after: Option<SystemTime>, now: SystemTime) -> Duration {
        let exp = self.base.saturating_mul(1 << self.failures.min(20)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let asked = retry_after.and_then(|t| t.duration_since(now).ok()).unwrap_or_default();
        exp.max(asked)
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn renews_at_two_thirds_with_bounded_jitter() {
        let start = SystemTime::UNIX_EPOCH + DAY * 1000;
        let end = start + DAY * 90;
        assert_eq!(renewal_time(start, end, None, 0.0), start + DAY * 60);
        let jittered = renewal_time(start, end, None, 0.999);
        assert!(jittered < start + DAY * 60 && jittered >= start + DAY * 60 - Duration::from_secs(3600));
        // A configured window wins; one longer than the lifetime renews at once.
        assert_eq!(renewal_time(start, end, Some(DAY * 30), 0.0), start + DAY * 60);
        assert_eq!(renewal_time(start, end, Some(DAY * 365), 0.5), start);
        // A 30 s certificate: renewed at 20 s, jitter at most 1 s.
        let short = renewal_time(start, start + Duration::from_secs(30), None, 0.999);
        assert!(short > start + Duration::from_secs(18) && short <= start + Duration::from_secs(20));
    }

    #[test]
    fn window_points_stay_inside() {
        let s = SystemTime::UNIX_EPOCH + DAY;
        assert_eq!(in_window(s, s + DAY, 0.0), s);
        assert_eq!(in_window(s, s + DAY, 0.5), s + DAY / 2);
        assert_eq!(in_window(s + DAY, s, 0.5), s + DAY, "a reversed window is its start");
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let now = SystemTime::UNIX_EPOCH + DAY;
        let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(3600));
        let waits: Vec<u64> = (0..9).map(|_| b.failed(None, now).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        // A rate limit that says "come back in two hours" is honoured past the cap.
        assert_eq!(b.failed(Some(now + Duration::from_secs(7200)), now), Duration::from_secs(7200));
        // A Retry-After in the past changes nothing.
        assert_eq!(b.failed(Some(now - Duration::from_secs(5)), now), Duration::from_secs(3600));
        b.succeeded();
        assert_eq!(b.failed(None, now), Duration::from_secs(30));
    }
}
