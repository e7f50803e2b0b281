//! Sequence-number arithmetic, the retransmission timer estimator (RFC 6298)
//! and initial sequence numbers (RFC 6528).
//!
//! Sequence numbers are plain `u32`s compared modulo 2³² (RFC 793 §3.3): `a`
//! is before `b` when `b - a`, wrapping, is below 2³¹. Nothing here panics.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

/// `a` comes before `b`.
pub(super) fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` comes before or is `b`.
pub(super) fn le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// Bytes from `from` up to `to` (wrapping).
pub(super) fn dist(from: u32, to: u32) -> u32 {
    to.wrapping_sub(from)
}

/// Lower bound of the RTO. RFC 6298 says 1 s; 200 ms is what Linux uses,
/// and suits a tunnel whose round trips are short.
pub(super) const MIN_RTO: Duration = Duration::from_millis(200);
/// Upper bound of the RTO, backoff included.
pub(super) const MAX_RTO: Duration = Duration::from_secs(60);
/// RTO before the first measurement (RFC 6298 §2.1).
const INITIAL_RTO: Duration = Duration::from_secs(1);

/// Smoothed round-trip time and the retransmission timeout (RFC 6298).
#[derive(Debug, Clone, Copy)]
pub(super) struct Rto {
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
}

impl Rto {
    pub(super) fn new() -> Self {
        Rto {
            srtt: None,
            rttvar: Duration::ZERO,
            rto: INITIAL_RTO,
        }
    }

    /// The current timeout.
    pub(super) fn get(&self) -> Duration {
        self.rto
    }

    /// A round-trip sample from a segment that was not retransmitted (Karn).
    pub(super) fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = self.rttvar * 3 / 4 + delta / 4;
                self.srtt = Some(srtt * 7 / 8 + rtt / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(rtt);
        self.rto = (srtt + (self.rttvar * 4).max(Duration::from_millis(1))).clamp(MIN_RTO, MAX_RTO);
    }

    /// Doubles the timeout after it expired (RFC 6298 §5.5).
    pub(super) fn backoff(&mut self) {
        self.rto = (self.rto * 2).min(MAX_RTO);
    }
}

/// An initial sequence number as RFC 6528 computes it: a clock ticking every
/// 4 µs plus a keyed hash of the connection's addresses, so that numbers
/// are unpredictable to anyone without `secret`, and a new connection on
/// the same addresses starts above the previous one.
///
/// The hash is std's SipHash-1-3 over the secret and the addresses; the
/// secret makes it keyed.
pub(super) fn isn(
    secret: &[u8; 16],
    clock: Duration,
    local: SocketAddr,
    remote: SocketAddr,
) -> u32 {
    let mut hasher = std::hash::DefaultHasher::new();
    secret.hash(&mut hasher);
    local.hash(&mut hasher);
    remote.hash(&mut hasher);
    let ticks = (clock.as_micros() / 4) as u32;
    (hasher.finish() as u32).wrapping_add(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_wrap() {
        assert!(lt(u32::MAX - 1, 3));
        assert!(!lt(3, u32::MAX - 1));
        assert!(le(5, 5) && !lt(5, 5));
        assert_eq!(dist(u32::MAX - 1, 3), 5);
    }

    #[test]
    fn rto_follows_rfc_6298_and_is_bounded() {
        let mut rto = Rto::new();
        assert_eq!(rto.get(), Duration::from_secs(1));
        rto.sample(Duration::from_millis(100));
        // srtt 100, rttvar 50: 100 + 4*50.
        assert_eq!(rto.get(), Duration::from_millis(300));
        for _ in 0..20 {
            rto.sample(Duration::from_millis(1));
        }
        assert_eq!(rto.get(), MIN_RTO);
        for _ in 0..20 {
            rto.backoff();
        }
        assert_eq!(rto.get(), MAX_RTO);
    }

    #[test]
    fn isn_depends_on_secret_addresses_and_clock() {
        let (a, b) = (
            "10.0.0.2:1000".parse().unwrap(),
            "1.2.3.4:80".parse().unwrap(),
        );
        let c = "10.0.0.2:1001".parse().unwrap();
        let t = Duration::from_secs(1);
        let base = isn(&[1; 16], t, a, b);
        assert_eq!(base, isn(&[1; 16], t, a, b));
        assert_ne!(base, isn(&[2; 16], t, a, b));
        assert_ne!(base, isn(&[1; 16], t, c, b));
        assert_eq!(
            isn(&[1; 16], t + Duration::from_micros(400), a, b),
            base.wrapping_add(100)
        );
    }
}
