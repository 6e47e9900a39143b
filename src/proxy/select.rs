//! The only state jat-proxy keeps — which resources of the implementing client are
//! available, with their presence priority — and the choice of one of them for a stanza.
//!
//! Which resources may ever be chosen is decided when their presence arrives: a resource whose
//! name matches none of the configured patterns is not tracked at all, and one with a negative
//! priority is tracked (so that a reply from it does not make it eligible) but never chosen —
//! RFC 6121 §4.7.2.3: a negative priority says the resource does not want unsolicited
//! traffic.

use ring::hmac;

use crate::random::Random;

/// How a resource is chosen among the eligible ones (`[proxy] balance`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Uniformly at random: mod_client_proxy's choice, and the default.
    #[default]
    Random,
    /// The same sender account goes to the same resource while that resource is online:
    /// rendezvous (highest random weight) hashing, keyed by the key file's selection secret,
    /// of the sender's bare JID over the eligible resources. Every instance computes the same
    /// choice from the same resources, and when a resource leaves only its own senders move.
    Sticky,
    /// The highest presence priority, at random among equals.
    Priority,
}

impl Balance {
    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Balance::Random => "random",
            Balance::Sticky => "sticky",
            Balance::Priority => "priority",
        }
    }
}

/// A resource name pattern (`[proxy] resources`): an exact name, or a prefix followed by `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    prefix: bool,
}

/// A pattern that is empty or has a `*` elsewhere than at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPattern;

impl std::fmt::Display for BadPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a resource pattern is an exact name or a prefix followed by one `*`")
    }
}

impl std::error::Error for BadPattern {}

impl Pattern {
    /// Parses `name` or `prefix*`.
    pub fn new(pattern: &str) -> Result<Pattern, BadPattern> {
        let (text, prefix) = match pattern.strip_suffix('*') {
            Some(p) => (p, true),
            None => (pattern, false),
        };
        if (text.is_empty() && !prefix) || text.contains('*') {
            return Err(BadPattern);
        }
        Ok(Pattern {
            text: text.to_owned(),
            prefix,
        })
    }

    /// Whether `resource` matches.
    pub fn matches(&self, resource: &str) -> bool {
        if self.prefix {
            resource.starts_with(&self.text)
        } else {
            resource == self.text
        }
    }
}

/// Which resources may be chosen and how (`[proxy] balance` and `resources`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// How one is chosen.
    pub balance: Balance,
    /// Names that may be chosen; empty: every name.
    pub patterns: Vec<Pattern>,
}

impl Selection {
    /// Whether a resource of this name may ever be chosen.
    pub fn admits(&self, resource: &str) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(resource))
    }
}

#[derive(Debug, Clone)]
struct Resource {
    name: String,
    priority: i8,
}

/// What became of an available presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learnt {
    /// Tracked (new or updated).
    Tracked,
    /// Its name matches no pattern: not tracked.
    Excluded,
    /// New, and the set is full: not tracked (those already known keep being served).
    Full,
}

/// Available resources of the target account, in arrival order, bounded.
#[derive(Debug, Clone)]
pub struct Resources {
    list: Vec<Resource>,
    max: usize,
    selection: Selection,
    /// Keys the sticky choice (see [`crate::keys::KeySet::selection_key`]).
    sticky_key: hmac::Key,
}

impl Resources {
    /// An empty set that holds at most `max` resources and chooses as `selection` says,
    /// sticky choices keyed by `sticky_key`.
    pub fn new(max: usize, selection: Selection, sticky_key: hmac::Key) -> Self {
        Resources {
            list: Vec::new(),
            max,
            selection,
            sticky_key,
        }
    }

    /// Keys sticky choices by `key` from now on (the key file was read again).
    pub fn set_sticky_key(&mut self, key: hmac::Key) {
        self.sticky_key = key;
    }

    /// Marks `resource` available with presence priority `priority`.
    pub fn available(&mut self, resource: &str, priority: i8) -> Learnt {
        if !self.selection.admits(resource) {
            self.unavailable(resource);
            return Learnt::Excluded;
        }
        if let Some(r) = self.list.iter_mut().find(|r| r.name == resource) {
            r.priority = priority;
            return Learnt::Tracked;
        }
        if self.list.len() >= self.max {
            return Learnt::Full;
        }
        self.list.push(Resource {
            name: resource.to_owned(),
            priority,
        });
        Learnt::Tracked
    }

    /// A genuine reply came from `resource`, so it is online: tracked with priority 0 if it
    /// was not (its presence went to another instance); a known priority is kept.
    pub fn answered(&mut self, resource: &str) {
        if !self.list.iter().any(|r| r.name == resource) {
            self.available(resource, 0);
        }
    }

    /// Marks `resource` unavailable.
    pub fn unavailable(&mut self, resource: &str) {
        self.list.retain(|r| r.name != resource);
    }

    /// Forgets every resource (the session was lost, or the target became unavailable as a
    /// whole).
    pub fn clear(&mut self) {
        self.list.clear();
    }

    /// Whether some tracked resource may be chosen.
    pub fn any_eligible(&self) -> bool {
        self.eligible().next().is_some()
    }

    fn eligible(&self) -> impl Iterator<Item = &Resource> + Clone {
        self.list.iter().filter(|r| r.priority >= 0)
    }

    /// The resource for a stanza from the account `sender` (a bare JID), if any is eligible.
    pub fn pick(&self, sender: &str, rng: &mut dyn Random) -> Option<&str> {
        let chosen = match self.selection.balance {
            Balance::Random => nth_random(self.eligible(), rng),
            Balance::Priority => {
                let top = self.eligible().map(|r| r.priority).max()?;
                nth_random(self.eligible().filter(|r| r.priority == top), rng)
            }
            Balance::Sticky => self.sticky(sender),
        };
        chosen.map(|r| r.name.as_str())
    }

    /// The resource for a message from the account `sender`: as [`Resources::pick`], except
    /// that `random` is sticky here, so that a conversation stays on one resource.
    pub fn pick_conversation(&self, sender: &str, rng: &mut dyn Random) -> Option<&str> {
        if self.selection.balance == Balance::Random {
            return self.sticky(sender).map(|r| r.name.as_str());
        }
        self.pick(sender, rng)
    }

    /// The tracked resources (eligible or not), in arrival order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|r| r.name.as_str())
    }

    /// The resources that may be chosen, in arrival order.
    pub fn eligible_names(&self) -> impl Iterator<Item = &str> {
        self.eligible().map(|r| r.name.as_str())
    }

    /// How many resources are tracked.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether no resource is tracked.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

impl Resources {
    /// Rendezvous hashing: the eligible resource of highest weight for `sender` (ties, which
    /// need a 64-bit collision, go to the smaller name).
    fn sticky(&self, sender: &str) -> Option<&Resource> {
        let seed = sticky_seed(&self.sticky_key, sender);
        self.eligible()
            .max_by_key(|r| (sticky_weight(seed, &r.name), std::cmp::Reverse(&r.name)))
    }
}

fn nth_random<'a>(
    items: impl Iterator<Item = &'a Resource> + Clone,
    rng: &mut dyn Random,
) -> Option<&'a Resource> {
    let n = items.clone().count();
    if n == 0 {
        return None;
    }
    items.into_iter().nth(rng.below(n))
}

// Rendezvous hashing must give the same weights in every instance and every build that may
// share a domain (a rolling upgrade mixes builds), so the hash is spelt out here and pinned by
// a test rather than taken from std (whose hasher may change between releases). The sender's
// bare JID is first hashed under the key file's selection secret (HMAC-SHA256, first 8 bytes
// big-endian: the seed), then each resource name is hashed from that seed with FNV-1a,
// finished with MurmurHash3's 64-bit mixer. The implementing client names its resources and
// sees which one a stanza reaches, so what it can learn is at most bits of the seed: a PRF
// output of the sender under a secret it does not have, which says nothing of who the
// sender is (only that two stanzas had one sender, which stickiness is for).

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

fn sticky_seed(key: &hmac::Key, sender: &str) -> u64 {
    let tag = hmac::sign(key, sender.as_bytes());
    u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"))
}

fn sticky_weight(seed: u64, resource: &str) -> u64 {
    fmix64(fnv(seed, resource.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRandom;

    /// The selection secret 0, 1, ..., 31.
    fn test_key() -> hmac::Key {
        let secret: Vec<u8> = (0..32).collect();
        hmac::Key::new(hmac::HMAC_SHA256, &secret)
    }

    fn set(balance: Balance, patterns: &[&str]) -> Resources {
        let patterns = patterns.iter().map(|p| Pattern::new(p).unwrap()).collect();
        Resources::new(8, Selection { balance, patterns }, test_key())
    }

    #[test]
    fn add_remove_pick() {
        let mut r = Resources::new(2, Selection::default(), test_key());
        let mut rng = SeededRandom::new(5);
        assert_eq!(r.pick("u@x", &mut rng), None);
        assert_eq!(r.available("a", 0), Learnt::Tracked);
        assert_eq!(r.available("a", 0), Learnt::Tracked);
        assert_eq!(r.available("b", 0), Learnt::Tracked);
        assert_eq!(r.available("c", 0), Learnt::Full, "bounded");
        assert_eq!(r.names().collect::<Vec<_>>(), ["a", "b"]);
        let picks: std::collections::HashSet<_> = (0..64)
            .map(|_| r.pick("u@x", &mut rng).unwrap().to_owned())
            .collect();
        assert_eq!(picks.len(), 2, "both resources are used");
        r.unavailable("a");
        assert_eq!(r.pick("u@x", &mut rng), Some("b"));
        r.clear();
        assert_eq!(r.pick("u@x", &mut rng), None);
    }

    #[test]
    fn patterns() {
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("a*b").is_err());
        assert!(Pattern::new("**").is_err());
        let any = Pattern::new("*").unwrap();
        assert!(any.matches("") && any.matches("x"));
        let mut r = set(Balance::Random, &["focus", "worker-*"]);
        let mut rng = SeededRandom::new(1);
        assert_eq!(r.available("phone", 0), Learnt::Excluded);
        assert_eq!(r.available("focus2", 0), Learnt::Excluded);
        r.answered("phone");
        assert_eq!(r.pick("u@x", &mut rng), None, "excluded even when alone");
        assert_eq!(r.available("worker-1", 0), Learnt::Tracked);
        assert_eq!(r.available("focus", 0), Learnt::Tracked);
        for _ in 0..32 {
            let p = r.pick("u@x", &mut rng).unwrap();
            assert!(p == "focus" || p == "worker-1", "{p}");
        }
    }

    #[test]
    fn negative_priority_is_never_chosen() {
        let mut r = set(Balance::Random, &[]);
        let mut rng = SeededRandom::new(2);
        r.available("idle", -1);
        assert!(!r.any_eligible());
        assert_eq!(r.pick("u@x", &mut rng), None);
        // A reply from it does not make it eligible again.
        r.answered("idle");
        assert_eq!(r.pick("u@x", &mut rng), None);
        r.available("idle", 0);
        assert_eq!(r.pick("u@x", &mut rng), Some("idle"));
        for balance in [Balance::Sticky, Balance::Priority] {
            let mut r = set(balance, &[]);
            r.available("idle", -5);
            assert_eq!(r.pick("u@x", &mut rng), None, "{balance:?}");
        }
    }

    #[test]
    fn priority_picks_the_highest_at_random_among_equals() {
        let mut r = set(Balance::Priority, &[]);
        let mut rng = SeededRandom::new(3);
        r.available("low", 1);
        r.available("high-a", 5);
        r.available("high-b", 5);
        let picks: std::collections::HashSet<_> = (0..64)
            .map(|_| r.pick("u@x", &mut rng).unwrap().to_owned())
            .collect();
        assert_eq!(picks, ["high-a", "high-b"].map(String::from).into());
        r.available("high-a", 0);
        r.available("high-b", 0);
        assert_eq!(r.pick("u@x", &mut rng), Some("low"));
    }

    #[test]
    fn sticky_is_stable_and_moves_only_the_departed_resources_senders() {
        let mut rng = SeededRandom::new(4);
        let names = ["a", "b", "c", "d"];
        let senders: Vec<String> = (0..400).map(|i| format!("user{i}@example")).collect();
        let mut r = set(Balance::Sticky, &[]);
        for n in names {
            r.available(n, 0);
        }
        // Another instance that learnt them in another order picks the same.
        let mut other = set(Balance::Sticky, &[]);
        for n in names.iter().rev() {
            other.available(n, 3);
        }
        let before: Vec<String> = senders
            .iter()
            .map(|s| r.pick(s, &mut rng).unwrap().to_owned())
            .collect();
        for (s, b) in senders.iter().zip(&before) {
            assert_eq!(other.pick(s, &mut rng), Some(b.as_str()));
        }
        for n in names {
            let share = before.iter().filter(|b| *b == n).count();
            assert!((60..=140).contains(&share), "{n}: {share} of 400");
        }
        r.unavailable("b");
        for (s, b) in senders.iter().zip(&before) {
            let now = r.pick(s, &mut rng).unwrap();
            if b != "b" {
                assert_eq!(now, b, "{s} moved although its resource stayed");
            }
        }
    }

    #[test]
    fn sticky_weights_are_pinned() {
        // Instances of different builds share a domain during a rolling upgrade: the weights
        // are part of the protocol between them and must never change. (Values computed by an
        // independent implementation of the documented function, in Python: hmac, hashlib.)
        let key = test_key();
        let seed = sticky_seed(&key, "user@example");
        assert_eq!(seed, 0xb55e_a688_66e5_58a9);
        assert_eq!(sticky_weight(seed, "a"), 0xdacc_28d7_6dbc_a451);
        assert_eq!(sticky_weight(seed, "worker-1"), 0x9db3_4b92_584f_766a);
        let seed = sticky_seed(&key, "alice@example.org");
        assert_eq!(sticky_weight(seed, "a"), 0x4f69_11f4_3dde_53a4);
        assert_eq!(sticky_weight(seed, "worker-1"), 0x80e0_d0c7_ec96_3960);
    }

    #[test]
    fn sticky_choices_depend_on_the_secret() {
        // A client that knows the algorithm but not the secret cannot tell where a sender
        // lands: under two secrets, about half of 400 senders land elsewhere of 2 resources.
        let mut rng = SeededRandom::new(1);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let mut a = set(Balance::Sticky, &[]);
        let mut b = Resources::new(
            8,
            Selection {
                balance: Balance::Sticky,
                patterns: vec![],
            },
            other,
        );
        for r in [&mut a, &mut b] {
            r.available("x", 0);
            r.available("y", 0);
        }
        let moved = (0..400)
            .map(|i| format!("user{i}@example"))
            .filter(|s| a.pick(s, &mut rng) != b.pick(s, &mut rng))
            .count();
        assert!((140..=260).contains(&moved), "{moved} of 400 differ");
    }
}
