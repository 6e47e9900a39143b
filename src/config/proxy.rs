//! `[proxy]`: the sans-IO core's own settings (the target, tokens, resources, requests held,
//! messages, outbound stanzas).

use jid::BareJid;
use serde::Deserialize;

use super::error::Invalid;
use super::range;
use crate::policy::Policy;
use crate::proxy::{Balance, Messages, Outbound, Pattern, Selection, Sender, Settings};
use crate::rate::RateLimit;

/// `[proxy]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    // First: toml's list of expected keys, shown for an unknown one, starts with it.
    pub(super) target_address: String,
    #[serde(default = "d_lifetime")]
    token_lifetime_secs: u64,
    #[serde(default = "d_max_resources")]
    max_resources: usize,
    /// Deprecated here: `[component] probe_interval_secs` (read by the component section).
    pub(super) probe_interval_secs: Option<u64>,
    #[serde(default = "d_hold_ms")]
    hold_ms: u64,
    #[serde(default = "d_max_held")]
    max_held: usize,
    #[serde(default)]
    balance: Balance,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    messages: Messages,
    #[serde(default = "d_message_lifetime")]
    message_token_lifetime_secs: u64,
    #[serde(default)]
    outbound: Outbound,
    #[serde(default)]
    sender: Sender,
}

/// The token lifetimes of `[proxy]`, all the key commands read of it (its other keys are
/// ignored here: the full parse checks them).
#[derive(Deserialize)]
pub(super) struct RawLifetimes {
    #[serde(default = "d_lifetime")]
    token_lifetime_secs: u64,
    #[serde(default)]
    messages: Messages,
    #[serde(default = "d_message_lifetime")]
    message_token_lifetime_secs: u64,
}

impl Default for RawLifetimes {
    fn default() -> Self {
        RawLifetimes {
            token_lifetime_secs: d_lifetime(),
            messages: Messages::default(),
            message_token_lifetime_secs: d_message_lifetime(),
        }
    }
}

/// Five minutes: longer than the IQ timeouts of common clients and libraries (30–120 s), so
/// a slow but legitimate answer still arrives, and short enough that a captured reply can
/// only be replayed, and an old key must be kept, for a few minutes.
fn d_lifetime() -> u64 {
    300
}
/// A day: a conversation goes on longer than an IQ waits for its answer.
fn d_message_lifetime() -> u64 {
    86400
}
/// Thirty days.
const MAX_MESSAGE_LIFETIME: u64 = 30 * 86400;
fn d_max_resources() -> usize {
    64
}
/// Long enough for a few probes and their answers on a busy server (each answer reaches one
/// of the instances behind ejabberd), short against any client's IQ timeout.
fn d_hold_ms() -> u64 {
    2000
}
fn d_max_held() -> usize {
    256
}

/// `[proxy]`, validated: [`Settings`] but for what other sections give.
pub(super) struct Proxy {
    target: BareJid,
    token_lifetime: u64,
    /// `max_resources`, a term of the memory bound.
    pub(super) max_resources: usize,
    hold_ms: u64,
    max_held: usize,
    selection: Selection,
    messages: Messages,
    message_token_lifetime: u64,
    outbound: Outbound,
    sender: Sender,
    /// The longest lifetime of the tokens sealed (see [`RawLifetimes::longest`]).
    pub(super) longest_lifetime: u64,
}

/// `target_address`: an account, not at the component's own domain (`jid`).
pub(super) fn target(address: &str, jid: &str) -> Result<BareJid, Invalid> {
    const KEY: &str = "proxy.target_address";
    let target = BareJid::new(address)
        .ok()
        .filter(|j| j.node().is_some())
        .ok_or_else(|| {
            Invalid::new(
                KEY,
                "not an account address (expected e.g. \"impl@example\")",
            )
        })?;
    if target.domain().as_str() == jid {
        return Err(Invalid::new(
            KEY,
            "must not be at the component's own domain",
        ));
    }
    Ok(target)
}

impl RawProxy {
    /// The validated section, `target` being [`target`]'s answer for it.
    pub(super) fn validate(self, target: BareJid) -> Result<Proxy, Invalid> {
        let token_lifetime = token_lifetime(self.token_lifetime_secs)?;
        let max_resources = range::check("proxy.max_resources", self.max_resources, 1..=4096)?;
        let hold_ms = range::check("proxy.hold_ms", self.hold_ms, 0..=30_000)?;
        let max_held = range::check("proxy.max_held", self.max_held, 0..=65_536)?;
        if self.resources.len() > 256 {
            return Err(Invalid::new("proxy.resources", "more than 256 patterns"));
        }
        let patterns = self
            .resources
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Pattern::new(p)
                    .map_err(|e| Invalid::new(format!("proxy.resources[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let message_token_lifetime = message_lifetime(self.message_token_lifetime_secs)?;
        Ok(Proxy {
            target,
            token_lifetime,
            max_resources,
            hold_ms,
            max_held,
            selection: Selection {
                balance: self.balance,
                patterns,
            },
            messages: self.messages,
            message_token_lifetime,
            outbound: self.outbound,
            sender: self.sender,
            longest_lifetime: longest(self.messages, token_lifetime, message_token_lifetime),
        })
    }
}

impl Proxy {
    /// The core's settings: this section's, and what the others give it (`component`, the
    /// component's domain, and `keepalive_to` from `[component]`; `rate` from `[limits]`;
    /// `policy` from `[policy]`).
    pub(super) fn into_settings(
        self,
        component: String,
        keepalive_to: String,
        rate: RateLimit,
        policy: Policy,
    ) -> Settings {
        Settings {
            component,
            target: self.target,
            token_lifetime: self.token_lifetime,
            max_resources: self.max_resources,
            keepalive_to,
            rate,
            policy,
            hold_ms: self.hold_ms,
            learn_ms: crate::proxy::LEARN_MS,
            max_held: self.max_held,
            selection: self.selection,
            messages: self.messages,
            message_token_lifetime: self.message_token_lifetime,
            outbound: self.outbound,
            sender: self.sender,
        }
    }
}

impl RawLifetimes {
    /// The longest lifetime of the tokens instances seal, in seconds: the IQ token
    /// lifetime, or the message token lifetime when messages are forwarded.
    pub(super) fn longest(&self) -> Result<u64, Invalid> {
        let iq = token_lifetime(self.token_lifetime_secs)?;
        // The message lifetime is checked only where it counts (the key commands read no
        // more than they need).
        let message = match self.messages {
            Messages::Refuse => 0,
            Messages::Forward => message_lifetime(self.message_token_lifetime_secs)?,
        };
        Ok(longest(self.messages, iq, message))
    }
}

fn longest(messages: Messages, iq: u64, message: u64) -> u64 {
    match messages {
        Messages::Refuse => iq,
        Messages::Forward => iq.max(message),
    }
}

fn token_lifetime(v: u64) -> Result<u64, Invalid> {
    range::check("proxy.token_lifetime_secs", v, 10..=86400)
}

fn message_lifetime(v: u64) -> Result<u64, Invalid> {
    range::check(
        "proxy.message_token_lifetime_secs",
        v,
        10..=MAX_MESSAGE_LIFETIME,
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GOOD, parse_str};
    use crate::proxy::{Balance, Selection, Sender};

    #[test]
    fn selection() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.proxy.selection, Selection::default());
        let text = GOOD.replace(
            "[proxy]",
            "[proxy]\nbalance = \"sticky\"\nresources = [\"focus\", \"worker-*\"]",
        );
        let c = parse_str(&text).unwrap();
        assert_eq!(c.proxy.selection.balance, Balance::Sticky);
        assert!(c.proxy.selection.admits("focus") && c.proxy.selection.admits("worker-7"));
        assert!(!c.proxy.selection.admits("phone") && !c.proxy.selection.admits("focus2"));
    }

    #[test]
    fn sender() {
        assert_eq!(parse_str(GOOD).unwrap().proxy.sender, Sender::Sealed);
        let with = |v: &str| GOOD.replace("[proxy]", &format!("[proxy]\nsender = \"{v}\""));
        let c = parse_str(&with("pseudonym")).unwrap();
        assert_eq!(c.proxy.sender, Sender::Pseudonym);
        let c = parse_str(&with("revealed")).unwrap();
        assert_eq!(c.proxy.sender, Sender::Revealed);
        // Anything else is refused, with the modes there are.
        let e = parse_str(&with("clear")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.sender"), "{e}");
        let shown = e.to_string();
        assert!(
            shown.contains("sealed") && shown.contains("revealed"),
            "{shown}"
        );
        assert!(e.line.is_some(), "{e}");
    }
}
