//! Reconnection backoff: exponential, with full jitter, so agents that
//! lost the server together do not come back together; and, for the same
//! reason, when a session's periodic full reports begin.

use std::time::Duration;

use rand::Rng as _;

/// When a session's first periodic full report is due: at a random point
/// between half a period and one and a half, then every period. Agents
/// that connected together (every one of them, after the server
/// restarts) would otherwise report together for ever after, each round
/// a burst of whole reports on the server at one instant, which delayed
/// claims by tens of milliseconds with ten nodes of 6,000 containers.
pub fn first_full_report(period: Duration) -> Duration {
    let half = period / 2;
    half + Duration::from_millis(rand::rng().random_range(0..=period.as_millis() as u64))
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never waits more than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next wait: uniform in [0, min(cap, base × 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    /// After a healthy session, start again from the bottom.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_full_reports_spread_over_a_whole_period() {
        let period = Duration::from_secs(30);
        let draws: Vec<Duration> = (0..400).map(|_| first_full_report(period)).collect();
        assert!(
            draws
                .iter()
                .all(|d| *d >= period / 2 && *d <= period * 3 / 2),
            "a draw outside [15s, 45s]: {draws:?}"
        );
        // Spread over the period, not bunched: each third of it is drawn.
        for third in 0..3 {
            let from = period / 2 + period * third / 3;
            let to = from + period / 3;
            assert!(
                draws.iter().any(|d| *d >= from && *d < to),
                "nothing drawn in [{from:?}, {to:?})"
            );
        }
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_respects_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..30 {
            let d = b.next_delay();
            let ceiling =
                Duration::from_millis(100 * (1u64 << attempt.min(20))).min(Duration::from_secs(2));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
        // Full jitter: over many draws at the cap, waits spread widely.
        let draws: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(500)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(1500)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
