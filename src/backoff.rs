//! Reconnection delays: capped exponential backoff with jitter, so that a server restart is
//! noticed within seconds while a long outage costs almost nothing, and several instances do
//! not reconnect in lockstep.

use std::time::Duration;

use crate::random::Random;

/// Delays for successive failed attempts: `min * 2^n`, capped at `max`, of which a random
/// half is jitter ("equal jitter").
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `min`, never waits more than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self, rng: &mut dyn Random) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.failures.min(20));
        let ceiling = exp.min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = rng.below(half.as_millis().max(1) as usize) as u64;
        half + Duration::from_millis(jitter_ms)
    }

    /// After a session that lasted: start again from `min`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRandom;

    #[test]
    fn grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut rng = SeededRandom::new(9);
        let delays: Vec<_> = (0..10).map(|_| b.next_delay(&mut rng)).collect();
        assert!(delays[0] >= Duration::from_millis(250) && delays[0] < Duration::from_millis(500));
        for d in &delays {
            assert!(*d <= Duration::from_secs(10));
        }
        assert!(delays[9] >= Duration::from_secs(5), "capped, not shrinking");
        let distinct: std::collections::HashSet<_> = delays[6..].iter().collect();
        assert!(distinct.len() > 1, "jittered");
        b.reset();
        assert!(b.next_delay(&mut rng) < Duration::from_millis(500));
    }
}
