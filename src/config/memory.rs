//! The bound on jat-proxy's memory that the limits of several sections make together
//! (SECURITY.md, "Memory"), checked once every section is read.

use super::error::Invalid;

/// The most memory the limits may let remote senders make jat-proxy use: what
/// [`MemoryBound::bytes`] may reach; the shipped unit's `MemoryMax=256M` less room for the
/// process's own allocator slack.
pub const MEMORY_CEILING: u64 = 224 << 20;

/// What bounds jat-proxy's memory whatever remote senders send (SECURITY.md, "Memory"): the
/// settings in the formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBound {
    /// Streams (`component.server` entries).
    pub servers: usize,
    /// `limits.max_stanza_bytes`.
    pub max_stanza_bytes: usize,
    /// `limits.max_senders`.
    pub max_senders: usize,
    /// `proxy.max_resources`.
    pub max_resources: usize,
}

impl MemoryBound {
    /// The process itself: code, runtime, buffers of its own (measured about 12 MiB).
    pub const BASE: u64 = 16 << 20;
    /// Heap bytes one node of a parsed tree takes at most (measured about 190).
    pub const NODE: u64 = 256;
    /// Output waiting on one stream: the stream is given up past 8 MiB; one more read
    /// (64 KiB) is handled before that is looked at again.
    pub const UNSENT: u64 = 9 << 20;
    /// One rate-limiter entry for an account (a bare JID of up to 2047 bytes and its
    /// buckets), one for its domain (up to 1023 bytes) and one for a token's reply budget,
    /// with the tables' overhead.
    pub const SENDER: u64 = 2048 + 1024 + 768;
    /// One resource of the target (up to 1023 bytes) and its entry.
    pub const RESOURCE: u64 = 1024 + 256;

    /// `BASE + servers × (3 × max_stanza_bytes + UNSENT)` (each stream's partial stanza, its
    /// parser's buffers, sized by the byte limit, and its output) `+ 3 × max_stanza_bytes +
    /// MAX_NODES × NODE` (the one stanza being handled: its bytes, and its tree of at most
    /// twice as many bytes of strings and `MAX_NODES` nodes) `+ MAX_HELD_BYTES` (held
    /// requests, as text) `+ max_senders × SENDER + max_resources × RESOURCE` (the tables).
    pub fn bytes(&self) -> u64 {
        let m = self.max_stanza_bytes as u64;
        Self::BASE
            + self.servers as u64 * (3 * m + Self::UNSENT)
            + 3 * m
            + crate::inbound::MAX_NODES as u64 * Self::NODE
            + crate::proxy::MAX_HELD_BYTES as u64
            + self.max_senders as u64 * Self::SENDER
            + self.max_resources as u64 * Self::RESOURCE
    }

    /// Within [`MEMORY_CEILING`], or an error at the key of the largest term.
    pub(super) fn check(&self) -> Result<(), Invalid> {
        if self.bytes() <= MEMORY_CEILING {
            return Ok(());
        }
        Err(Invalid::new(
            self.largest_key(),
            format!(
                "these limits let remote senders make jat-proxy use up to {} MiB, over the {} MiB \
                 it may use under the shipped unit's MemoryMax=256M (SECURITY.md, \"Memory\"): \
                 lower limits.max_senders, limits.max_stanza_bytes or the number of servers",
                self.bytes() >> 20,
                MEMORY_CEILING >> 20
            ),
        ))
    }

    /// The key of the setting whose term is the largest.
    fn largest_key(&self) -> &'static str {
        let m = self.max_stanza_bytes as u64;
        let streams = self.servers as u64 * Self::UNSENT;
        let stanzas = (3 * self.servers as u64 + 3) * m;
        let senders = self.max_senders as u64 * Self::SENDER;
        if senders >= stanzas && senders >= streams {
            "limits.max_senders"
        } else if stanzas >= streams {
            "limits.max_stanza_bytes"
        } else {
            "component.server"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GOOD, parse_str};
    use super::*;

    #[test]
    fn limits_that_would_let_senders_past_memory_max_are_refused() {
        // The defaults: well within, with room for the process (SECURITY.md's figure).
        let c = parse_str(GOOD).unwrap();
        let defaults = MemoryBound {
            servers: c.component.servers.len(),
            max_stanza_bytes: c.limits.max_bytes,
            max_senders: c.proxy.rate.max_senders,
            max_resources: c.proxy.max_resources,
        };
        assert_eq!(defaults.bytes() >> 20, 72, "SECURITY.md states it");
        // Each of the largest terms alone.
        let e = parse_str(&format!("{GOOD}\n[limits]\nmax_senders = 10000000\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_senders"));
        assert!(e.reason.contains("MemoryMax"), "{}", e.reason);
        let servers = |n: usize, extra: &str| {
            let list: Vec<String> = (0..n)
                .map(|i| format!("\"127.0.0.1:{}\"", 5000 + i))
                .collect();
            let text = GOOD.replace(
                "server = \"127.0.0.1:5347\"",
                &format!("server = [{}]", list.join(", ")),
            );
            parse_str(&format!("{text}\n[limits]\n{extra}\n"))
        };
        // The largest stanzas on one stream, or the default on twelve: allowed.
        parse_str(&format!("{GOOD}\n[limits]\nmax_stanza_bytes = 16777216\n")).unwrap();
        servers(12, "").unwrap();
        let e = servers(16, "").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("component.server"));
        let e = servers(4, "max_stanza_bytes = 16777216").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_stanza_bytes"));
        let e = servers(16, "max_stanza_bytes = 1048576").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("component.server"));
        // What the default allows at most, and one more.
        let most = (MEMORY_CEILING
            - MemoryBound {
                max_senders: 0,
                ..defaults
            }
            .bytes())
            / MemoryBound::SENDER;
        parse_str(&format!("{GOOD}\n[limits]\nmax_senders = {most}\n")).unwrap();
        parse_str(&format!("{GOOD}\n[limits]\nmax_senders = {}\n", most + 1)).unwrap_err();
    }
}
