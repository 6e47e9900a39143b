//! Who may use the proxy: optional allow and deny lists of domains and accounts.

use jid::{BareJid, Jid};

/// One entry of a list: a whole domain, or one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Every address at this domain.
    Domain(String),
    /// This account (any of its resources).
    Account(BareJid),
}

impl Entry {
    /// Parses `example.org` or `user@example.org`; `None` if it is neither.
    pub fn parse(s: &str) -> Option<Entry> {
        let j = BareJid::new(s).ok()?;
        Some(if j.node().is_some() {
            Entry::Account(j)
        } else {
            Entry::Domain(j.domain().to_string())
        })
    }

    fn matches(&self, sender: &Jid) -> bool {
        match self {
            Entry::Domain(d) => sender.domain().as_str() == d,
            // Compared part by part: no bare JID is built per request.
            Entry::Account(a) => sender.node() == a.node() && sender.domain() == a.domain(),
        }
    }
}

/// Allow and deny lists. Deny wins; an empty allow list allows everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// When not empty, only these may send requests.
    pub allow: Vec<Entry>,
    /// These may never send requests.
    pub deny: Vec<Entry>,
}

impl Policy {
    /// Whether `sender` may send requests through the proxy.
    pub fn permits(&self, sender: &Jid) -> bool {
        if self.deny.iter().any(|e| e.matches(sender)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|e| e.matches(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_empty_allow_allows_all() {
        let j = |s: &str| Jid::new(s).unwrap();
        let open = Policy::default();
        assert!(open.permits(&j("a@x/r")));
        let p = Policy {
            allow: vec![Entry::parse("example.org").unwrap()],
            deny: vec![Entry::parse("spam@example.org").unwrap()],
        };
        assert!(p.permits(&j("alice@example.org/phone")));
        assert!(!p.permits(&j("spam@example.org/x")));
        assert!(!p.permits(&j("bob@elsewhere.net/x")));
        assert_eq!(Entry::parse("not a jid@@"), None);
    }
}
