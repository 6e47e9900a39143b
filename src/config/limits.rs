//! `[limits]`: one section for two layers, kept apart once read: the stream reader's limits
//! on a stanza ([`inbound::Limits`]) and the core's rate limits ([`RateLimit`]).

use std::ops::Bound;

use serde::Deserialize;

use super::error::Invalid;
use super::range;
use crate::inbound;
use crate::rate::RateLimit;

/// `[limits]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    max_stanza_bytes: usize,
    max_depth: usize,
    rate_per_sender: f64,
    rate_burst: f64,
    max_senders: usize,
    rate_per_domain: f64,
    domain_burst: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        let stanza = inbound::Limits::default();
        let rate = RateLimit::default();
        RawLimits {
            max_stanza_bytes: stanza.max_bytes,
            max_depth: stanza.max_depth,
            rate_per_sender: rate.per_second,
            rate_burst: rate.burst,
            max_senders: rate.max_senders,
            rate_per_domain: rate.per_domain,
            domain_burst: rate.domain_burst,
        }
    }
}

/// `[limits]`, validated, in its two parts.
pub(super) struct Limits {
    /// For the stream reader ([`Config::limits`](super::Config::limits)).
    pub(super) stanza: inbound::Limits,
    /// For the core ([`Settings::rate`](crate::proxy::Settings::rate)).
    pub(super) rate: RateLimit,
}

/// Requests per second: more than none, at most a million.
const RATE: (Bound<f64>, Bound<f64>) = (Bound::Excluded(0.0), Bound::Included(1e6));

impl RawLimits {
    /// The validated section.
    pub(super) fn validate(&self) -> Result<Limits, Invalid> {
        // At most 16 MiB: the parser sizes its buffers by this limit (and reallocates one
        // at every entity reference), which must stay a heap allocation, not an mmap per
        // reference.
        let max_bytes = range::check(
            "limits.max_stanza_bytes",
            self.max_stanza_bytes,
            4096..=16 * 1024 * 1024,
        )?;
        let max_depth = range::check("limits.max_depth", self.max_depth, 4..=1024)?;
        Ok(Limits {
            stanza: inbound::Limits {
                max_bytes,
                max_depth,
                max_nodes: inbound::MAX_NODES,
            },
            rate: RateLimit {
                per_second: range::check("limits.rate_per_sender", self.rate_per_sender, RATE)?,
                burst: range::check("limits.rate_burst", self.rate_burst, 1.0..=1e6)?,
                max_senders: range::check("limits.max_senders", self.max_senders, 1..=10_000_000)?,
                per_domain: range::check("limits.rate_per_domain", self.rate_per_domain, RATE)?,
                domain_burst: range::check("limits.domain_burst", self.domain_burst, 1.0..=1e6)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GOOD, parse_str};

    #[test]
    fn no_error_shows_a_configured_value() {
        for (extra, key) in [
            ("rate_per_domain = 7654321.5", "limits.rate_per_domain"),
            ("domain_burst = 7654321.5", "limits.domain_burst"),
            ("rate_per_sender = 7654321.5", "limits.rate_per_sender"),
            ("rate_burst = 7654321.5", "limits.rate_burst"),
            ("max_senders = 7654321000", "limits.max_senders"),
            ("max_stanza_bytes = 7654321000", "limits.max_stanza_bytes"),
        ] {
            let e = parse_str(&format!("{GOOD}\n[limits]\n{extra}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key));
            assert!(!e.to_string().contains("7654321"), "{e}");
        }
    }

    #[test]
    fn the_defaults_are_the_layers_own() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.limits, crate::inbound::Limits::default());
        assert_eq!(c.proxy.rate, crate::rate::RateLimit::default());
    }
}
