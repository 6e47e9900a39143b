//! Rate limiting: token buckets in tables of bounded size, with O(1) eviction.
//!
//! Four budgets, all token buckets refilled from a *monotonic* clock (milliseconds with any
//! origin, passed in by the caller; a wall-clock step never freezes or refills a bucket):
//!
//! - **requests** per sender *account* (bare JID), so opening more resources buys no more;
//! - **requests** per sender *domain*, so that a server minting local parts cannot walk
//!   around the per-account limit (the caller exempts the implementing client's own
//!   domain, whose accounts the operator creates);
//! - **errors** jat-proxy generates, per account they are sent to, so that an
//!   auto-responder answering each error with a new stanza ends up answered by silence;
//! - **replies** reversed through one token, which bounds how often the implementing client
//!   can replay it within its lifetime (per token, not per recipient: a budget shared by the
//!   tokens of one account would tell the implementing client which tokens name one account,
//!   as soon as the recipient reacts to what it is sent);
//! - **outbound**: every stanza the implementing client starts, one bucket whoever it goes
//!   to, so that no refusal depends on the recipient (a per-recipient budget would tell the
//!   implementing client whether two tokens name one account);
//! - **routed** replies to those stanzas, per peer account, at the outbound rate with twice
//!   its burst: a peer that answers each request once can never run it dry, however the
//!   implementing client spreads its requests over tokens and addresses.
//!
//! The three per-account buckets share one entry of the account table; the token table holds
//! the reply buckets. Each table (accounts,
//! domains) holds at most `max_senders` entries; when a new key arrives at a full table, the
//! least recently used entry is forgotten, in constant time (a hash map into an intrusive
//! doubly linked list). Forgetting an entry gives that key a full bucket when it comes back,
//! as if it had been idle long enough to refill: the least recently used entry is the one
//! closest to that.

use std::collections::HashMap;
use std::sync::Arc;

/// Rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second a sender account may make on average; also its budget of errors
    /// generated for it, and of replies reversed to it.
    pub per_second: f64,
    /// Requests a sender account may make at once after being idle (errors, replies alike).
    pub burst: f64,
    /// Most accounts tracked at once, and most domains.
    pub max_senders: usize,
    /// Requests per second all accounts of one remote domain may make together on average.
    pub per_domain: f64,
    /// Requests all accounts of one remote domain may make at once after being idle.
    pub domain_burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 10.0,
            burst: 50.0,
            max_senders: 10_000,
            per_domain: 100.0,
            domain_burst: 500.0,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The sender's account is over its rate.
    Account,
    /// The sender's domain, all its accounts together, is over its rate.
    Domain,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

impl Bucket {
    fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket {
            tokens: rate.burst,
            updated_ms: now_ms,
        }
    }

    /// Whether a token is available at `now_ms` (after refilling up to then).
    fn ready(&mut self, rate: Rate, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated_ms = self.updated_ms.max(now_ms);
        self.tokens >= 1.0
    }

    /// Takes a token at `now_ms`; false if none is available.
    fn take(&mut self, rate: Rate, now_ms: u64) -> bool {
        let ok = self.ready(rate, now_ms);
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

/// The buckets of one account.
#[derive(Debug, Clone, Copy)]
struct Account {
    requests: Bucket,
    errors: Bucket,
    routed: Bucket,
}

/// The tables of buckets.
#[derive(Debug)]
pub struct Limiter {
    account: Rate,
    domain: Rate,
    accounts: Lru<Account>,
    domains: Lru<Bucket>,
    /// Replies reversed, by token.
    tokens: Lru<Bucket>,
    /// Stanzas the implementing client starts (see the module's doc); full at first.
    outbound: Option<Bucket>,
}

impl Limiter {
    /// Empty tables.
    pub fn new(limit: RateLimit) -> Self {
        Limiter {
            account: Rate {
                per_second: limit.per_second,
                burst: limit.burst,
            },
            domain: Rate {
                per_second: limit.per_domain,
                burst: limit.domain_burst,
            },
            accounts: Lru::new(limit.max_senders),
            domains: Lru::new(limit.max_senders),
            tokens: Lru::new(limit.max_senders),
            outbound: None,
        }
    }

    /// The rate of routed replies per peer: the outbound rate, twice its burst.
    fn routed_rate(&self) -> Rate {
        Rate {
            per_second: self.account.per_second,
            burst: 2.0 * self.account.burst,
        }
    }

    /// Number of accounts tracked.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Whether no account is tracked.
    pub fn is_empty(&self) -> bool {
        self.accounts.len() == 0
    }

    /// Number of domains tracked.
    pub fn domains(&self) -> usize {
        self.domains.len()
    }

    /// Accounts forgotten so far to make room for others.
    pub fn account_evictions(&self) -> u64 {
        self.accounts.evictions
    }

    /// Domains forgotten so far to make room for others.
    pub fn domain_evictions(&self) -> u64 {
        self.domains.evictions
    }

    /// Charges one request of `account` (a bare JID) at `now_ms` (monotonic), and to
    /// `domain` if given. Nothing is charged unless both have a token: a request refused
    /// for its account costs its domain nothing.
    pub fn request(
        &mut self,
        account: &str,
        domain: Option<&str>,
        now_ms: u64,
    ) -> Result<(), Over> {
        let rate = self.account;
        let a = self
            .accounts
            .get_or_insert_with(account, || Account::full(rate, now_ms));
        if !a.requests.ready(rate, now_ms) {
            return Err(Over::Account);
        }
        if let Some(d) = domain {
            let drate = self.domain;
            let b = self
                .domains
                .get_or_insert_with(d, || Bucket::full(drate, now_ms));
            if !b.take(drate, now_ms) {
                return Err(Over::Domain);
            }
        }
        a.requests.tokens -= 1.0;
        Ok(())
    }

    /// Charges one error generated for `account` (a bare JID); false if its budget is spent.
    pub fn error(&mut self, account: &str, now_ms: u64) -> bool {
        let rate = self.account;
        self.accounts
            .get_or_insert_with(account, || Account::full(rate, now_ms))
            .errors
            .take(rate, now_ms)
    }

    /// Charges one stanza the implementing client starts, whoever it goes to; false if
    /// over the rate (of one sender account).
    pub fn outbound(&mut self, now_ms: u64) -> bool {
        let rate = self.account;
        self.outbound
            .get_or_insert_with(|| Bucket::full(rate, now_ms))
            .take(rate, now_ms)
    }

    /// Charges one reply of `peer` (a bare JID) to a stanza the implementing client
    /// started; false if over its rate.
    pub fn routed(&mut self, peer: &str, now_ms: u64) -> bool {
        let (rate, routed) = (self.account, self.routed_rate());
        self.accounts
            .get_or_insert_with(peer, || Account::full(rate, now_ms))
            .routed
            .take(routed, now_ms)
    }

    /// Charges one reply reversed through the token whose key is `token` (see
    /// `Reversal::budget`); false if over its rate.
    pub fn reply(&mut self, token: &str, now_ms: u64) -> bool {
        let rate = self.account;
        self.tokens
            .get_or_insert_with(token, || Bucket::full(rate, now_ms))
            .take(rate, now_ms)
    }
}

impl Account {
    fn full(rate: Rate, now_ms: u64) -> Account {
        let b = Bucket::full(rate, now_ms);
        Account {
            requests: b,
            errors: b,
            routed: Bucket {
                tokens: 2.0 * rate.burst,
                updated_ms: now_ms,
            },
        }
    }
}

const NIL: usize = usize::MAX;

#[derive(Debug)]
struct Node<V> {
    key: Arc<str>,
    value: V,
    /// Towards the most recently used end.
    newer: usize,
    /// Towards the least recently used end.
    older: usize,
}

/// A map of at most `capacity` entries that forgets its least recently used one to make room:
/// every operation is one hash lookup plus a constant number of link updates.
#[derive(Debug)]
struct Lru<V> {
    index: HashMap<Arc<str>, usize>,
    nodes: Vec<Node<V>>,
    /// Most recently used node.
    newest: usize,
    /// Least recently used node: the next to go.
    oldest: usize,
    capacity: usize,
    evictions: u64,
}

impl<V> Lru<V> {
    fn new(capacity: usize) -> Self {
        Lru {
            index: HashMap::new(),
            nodes: Vec::new(),
            newest: NIL,
            oldest: NIL,
            capacity: capacity.max(1),
            evictions: 0,
        }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The entry of `key`, now the most recently used; created with `make` if absent, in
    /// place of the least recently used one if the map is full.
    fn get_or_insert_with(&mut self, key: &str, make: impl FnOnce() -> V) -> &mut V {
        if let Some(&i) = self.index.get(key) {
            if i != self.newest {
                self.unlink(i);
                self.push_newest(i);
            }
            return &mut self.nodes[i].value;
        }
        let key: Arc<str> = Arc::from(key);
        let i = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                key: key.clone(),
                value: make(),
                newer: NIL,
                older: NIL,
            });
            self.nodes.len() - 1
        } else {
            let i = self.oldest;
            self.unlink(i);
            let node = &mut self.nodes[i];
            let old = std::mem::replace(&mut node.key, key.clone());
            node.value = make();
            self.index.remove(&old);
            self.evictions += 1;
            i
        };
        self.index.insert(key, i);
        self.push_newest(i);
        &mut self.nodes[i].value
    }

    fn unlink(&mut self, i: usize) {
        let (newer, older) = (self.nodes[i].newer, self.nodes[i].older);
        match newer {
            NIL => self.newest = older,
            n => self.nodes[n].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.nodes[o].newer = newer,
        }
    }

    fn push_newest(&mut self, i: usize) {
        self.nodes[i].newer = NIL;
        self.nodes[i].older = self.newest;
        match self.newest {
            NIL => self.oldest = i,
            n => self.nodes[n].newer = i,
        }
        self.newest = i;
    }

    /// Keys from the least to the most recently used (tests).
    #[cfg(test)]
    fn keys_oldest_first(&self) -> Vec<&str> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut i = self.oldest;
        while i != NIL {
            out.push(&*self.nodes[i].key);
            i = self.nodes[i].newer;
        }
        out
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
            per_domain: 3.0,
            domain_burst: 6.0,
        }
    }

    fn allow(l: &mut Limiter, sender: &str, now_ms: u64) -> bool {
        l.request(sender, None, now_ms).is_ok()
    }

    #[test]
    fn burst_then_steady_rate() {
        let mut l = Limiter::new(limit(10));
        let allowed = (0..10).filter(|_| allow(&mut l, "a@x", 0)).count();
        assert_eq!(allowed, 4);
        assert!(!allow(&mut l, "a@x", 100));
        assert!(allow(&mut l, "a@x", 500), "one token after 0.5 s at 2/s");
        assert!(!allow(&mut l, "a@x", 500));
        assert!(allow(&mut l, "b@x", 500), "others unaffected");
    }

    #[test]
    fn table_is_bounded() {
        let mut l = Limiter::new(limit(100));
        for i in 0..10_000u64 {
            let _ = l.request(&format!("u{i}@d{i}"), Some(&format!("d{i}")), i);
            l.error(&format!("e{i}@x"), i);
            l.reply(&format!("r{i}@x"), i);
            assert!(l.len() <= 100 && l.domains() <= 100);
        }
    }

    #[test]
    fn eviction_prefers_idle_senders() {
        let mut l = Limiter::new(limit(2));
        allow(&mut l, "idle@x", 0);
        for _ in 0..4 {
            allow(&mut l, "busy@x", 1000);
        }
        // At 1.5 s idle@x has refilled (forgetting it changes nothing); busy@x has one token.
        allow(&mut l, "new@x", 1500);
        assert_eq!(l.len(), 2);
        assert!(allow(&mut l, "busy@x", 1500));
        assert!(
            !allow(&mut l, "busy@x", 1500),
            "the busy sender's bucket was kept"
        );
    }

    /// Failed before the LRU: a full table then dropped *every* refilled bucket at once (one
    /// O(n) pass per new sender), so its size collapsed.
    #[test]
    fn a_full_table_forgets_exactly_one_entry_per_new_sender() {
        let mut l = Limiter::new(limit(100));
        for i in 0..100 {
            allow(&mut l, &format!("u{i}@x"), 0);
        }
        // Ten seconds later every bucket has refilled.
        allow(&mut l, "new@x", 10_000);
        assert_eq!(l.len(), 100);
        assert_eq!(l.account_evictions(), 1);
        assert_eq!(l.accounts.keys_oldest_first()[0], "u1@x", "u0@x went");
    }

    /// Failed before the LRU: with equal timestamps the old minimum scan forgot an arbitrary
    /// entry (hash order), not the least recently used one.
    #[test]
    fn a_full_table_forgets_the_least_recently_used_entry() {
        let n = 1000;
        let mut l = Limiter::new(limit(n));
        for i in 0..n {
            for _ in 0..4 {
                allow(&mut l, &format!("u{i}@x"), 0);
            }
        }
        // u0 is used again, so u1 is now the least recently used; every bucket is empty.
        assert!(!allow(&mut l, "u0@x", 0));
        assert!(allow(&mut l, "new@x", 0));
        assert!(
            allow(&mut l, "u1@x", 0),
            "u1 was forgotten: a full bucket again"
        );
        assert!(!allow(&mut l, "u0@x", 0), "u0 was kept, still empty");
        assert!(!allow(&mut l, "u3@x", 0), "u3 was kept, still empty");
    }

    /// The cost of a new sender at a full table does not depend on the table's size: every
    /// step forgets exactly the oldest entry, found at the end of the list rather than by a
    /// scan. Timings are printed for the curious (`--nocapture`), never asserted; the
    /// structural facts are.
    #[test]
    fn a_new_sender_at_a_full_table_costs_the_same_at_any_size() {
        for size in [1_000usize, 100_000] {
            let mut l = Limiter::new(limit(size));
            for i in 0..size {
                allow(&mut l, &format!("old{i}@x"), 0);
            }
            let started = std::time::Instant::now();
            for i in 0..10_000 {
                allow(&mut l, &format!("new{i}@x"), 1);
            }
            let took = started.elapsed();
            eprintln!("10000 new senders at a full table of {size}: {took:?}");
            assert_eq!(l.len(), size);
            assert_eq!(l.account_evictions(), 10_000);
            let keys = l.accounts.keys_oldest_first();
            assert_eq!(keys.len(), size);
            assert_eq!(*keys.last().unwrap(), "new9999@x");
            if size > 10_000 {
                assert_eq!(keys[0], "old10000@x", "the 10000 oldest went, in order");
            } else {
                assert_eq!(keys[0], format!("new{}@x", 10_000 - size));
            }
        }
    }

    /// The list and the index agree with a naive model (a vector in recency order) over a
    /// pseudo-random sequence of uses.
    #[test]
    fn lru_matches_a_naive_model() {
        let mut lru: Lru<u32> = Lru::new(7);
        let mut model: Vec<String> = Vec::new();
        let mut x: u32 = 12345;
        for step in 0..20_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let key = format!("k{}", (x >> 16) % 13);
            *lru.get_or_insert_with(&key, || 0) += 1;
            if let Some(p) = model.iter().position(|k| *k == key) {
                model.remove(p);
            } else if model.len() == 7 {
                model.remove(0);
            }
            model.push(key);
            assert_eq!(lru.keys_oldest_first(), model, "step {step}");
            assert_eq!(lru.index.len(), lru.len());
        }
    }

    #[test]
    fn a_domain_is_limited_as_a_group_and_costs_nothing_for_refused_accounts() {
        let mut l = Limiter::new(limit(100));
        let ok = (0..20)
            .filter(|i| l.request(&format!("u{i}@d"), Some("d"), 0).is_ok())
            .count();
        assert_eq!(ok, 6, "domain burst");
        assert_eq!(l.request("u99@d", Some("d"), 0), Err(Over::Domain));
        assert!(
            l.request("v@e", Some("e"), 0).is_ok(),
            "other domains unaffected"
        );
        assert!(
            l.request("local@x", None, 0).is_ok(),
            "no domain: not charged"
        );
        // An account over its own limit does not drain its domain.
        for _ in 0..4 {
            assert!(l.request("w@f", Some("f"), 0).is_ok());
        }
        for _ in 0..10 {
            assert_eq!(l.request("w@f", Some("f"), 0), Err(Over::Account));
        }
        assert!(l.request("z@f", Some("f"), 0).is_ok());
        assert!(l.request("y@f", Some("f"), 0).is_ok());
        assert_eq!(l.request("x@f", Some("f"), 0), Err(Over::Domain));
        // 1 s at 3/s.
        assert!(l.request("u50@d", Some("d"), 1000).is_ok());
    }

    #[test]
    fn errors_and_replies_have_their_own_budgets() {
        let mut l = Limiter::new(limit(100));
        assert_eq!((0..10).filter(|_| l.error("a@x", 0)).count(), 4);
        assert_eq!((0..10).filter(|_| l.reply("a@x", 0)).count(), 4);
        assert!(allow(&mut l, "a@x", 0), "requests untouched");
        assert!(l.error("b@x", 0), "others unaffected");
        assert!(l.error("a@x", 500), "refilled at the same rate");
        assert!(l.reply("a@x", 500));
    }

    /// The `[limits]` keys of the domain bucket (kept here rather than in config.rs, whose
    /// error reporting is being reworked).
    #[test]
    fn config_reads_and_checks_the_domain_keys() {
        let good = "[component]\njid = \"proxy.localhost\"\nserver = \"127.0.0.1:5347\"\nsecret = \"s\"\n\n[proxy]\ntarget_address = \"impl@localhost\"\n\n[keys]\nfile = \"/k.toml\"\n";
        let parse = |t: &str| crate::config::parse(std::path::Path::new("t.toml"), t);
        let c = parse(good).unwrap();
        assert_eq!(c.proxy.rate, RateLimit::default());
        assert_eq!(
            (c.proxy.rate.per_domain, c.proxy.rate.domain_burst),
            (100.0, 500.0)
        );
        let c = parse(&format!(
            "{good}[limits]\nrate_per_domain = 2.5\ndomain_burst = 7\n"
        ))
        .unwrap();
        assert_eq!(
            (c.proxy.rate.per_domain, c.proxy.rate.domain_burst),
            (2.5, 7.0)
        );
        for (text, key) in [
            ("rate_per_domain = 0.0", "limits.rate_per_domain"),
            ("rate_per_domain = -1.0", "limits.rate_per_domain"),
            ("rate_per_domain = nan", "limits.rate_per_domain"),
            ("rate_per_domain = 1e7", "limits.rate_per_domain"),
            ("domain_burst = 0", "limits.domain_burst"),
            ("domain_burst = inf", "limits.domain_burst"),
            ("domain_burst = 1e7", "limits.domain_burst"),
        ] {
            let e = parse(&format!("{good}[limits]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
