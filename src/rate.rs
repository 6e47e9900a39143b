//! Per-sender rate limiting: a token bucket per sender account, in a table of bounded size.
//!
//! Senders are counted by bare JID, so opening more resources buys no more requests. The
//! table never holds more than `max_senders` entries: when it is full, buckets that have
//! refilled completely are forgotten first (forgetting them changes nothing: a new bucket
//! starts full), then the least recently used one.

use std::collections::HashMap;

/// Rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second a sender may make on average.
    pub per_second: f64,
    /// Requests a sender may make at once after being idle.
    pub burst: f64,
    /// Most senders tracked at once.
    pub max_senders: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 10.0,
            burst: 50.0,
            max_senders: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

/// The table of buckets.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    buckets: HashMap<String, Bucket>,
}

impl Limiter {
    /// An empty table.
    pub fn new(limit: RateLimit) -> Self {
        Limiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Number of senders tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no sender is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes one token for `sender` at `now_ms`; false if it has none left.
    pub fn allow(&mut self, sender: &str, now_ms: u64) -> bool {
        let limit = self.limit;
        if let Some(b) = self.buckets.get_mut(sender) {
            refill(b, limit, now_ms);
            return take(b);
        }
        if self.buckets.len() >= limit.max_senders {
            self.evict(now_ms);
        }
        let mut b = Bucket {
            tokens: limit.burst,
            updated_ms: now_ms,
        };
        let ok = take(&mut b);
        self.buckets.insert(sender.to_owned(), b);
        ok
    }

    fn evict(&mut self, now_ms: u64) {
        let limit = self.limit;
        self.buckets.retain(|_, b| {
            let mut projected = *b;
            refill(&mut projected, limit, now_ms);
            projected.tokens < limit.burst
        });
        if self.buckets.len() >= limit.max_senders
            && let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.updated_ms)
                .map(|(k, _)| k.clone())
        {
            self.buckets.remove(&oldest);
        }
    }
}

fn refill(b: &mut Bucket, limit: RateLimit, now_ms: u64) {
    let elapsed = now_ms.saturating_sub(b.updated_ms) as f64 / 1000.0;
    b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
    b.updated_ms = b.updated_ms.max(now_ms);
}

fn take(b: &mut Bucket) -> bool {
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max_senders: usize) -> RateLimit {
        RateLimit {
            per_second: 2.0,
            burst: 4.0,
            max_senders,
        }
    }

    #[test]
    fn burst_then_steady_rate() {
        let mut l = Limiter::new(limit(10));
        let allowed = (0..10).filter(|_| l.allow("a@x", 0)).count();
        assert_eq!(allowed, 4);
        assert!(!l.allow("a@x", 100));
        assert!(l.allow("a@x", 500), "one token after 0.5 s at 2/s");
        assert!(!l.allow("a@x", 500));
        assert!(l.allow("b@x", 500), "others unaffected");
    }

    #[test]
    fn table_is_bounded() {
        let mut l = Limiter::new(limit(100));
        for i in 0..10_000u64 {
            l.allow(&format!("u{i}@x"), i);
            assert!(l.len() <= 100);
        }
    }

    #[test]
    fn eviction_prefers_idle_senders() {
        let mut l = Limiter::new(limit(2));
        l.allow("idle@x", 0);
        for _ in 0..4 {
            l.allow("busy@x", 1000);
        }
        // At 1.5 s idle@x has refilled (forgetting it changes nothing); busy@x has one token.
        l.allow("new@x", 1500);
        assert_eq!(l.len(), 2);
        assert!(l.allow("busy@x", 1500));
        assert!(
            !l.allow("busy@x", 1500),
            "the busy sender's bucket was kept"
        );
    }
}
