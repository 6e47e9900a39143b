//! The proxy itself: a pure state machine from (stanza in, time, randomness) to stanza out.
//!
//! No sockets, clocks or entropy live here; the session (`src/session/`) feeds it what the
//! server sends and the time (a [`Clock`]: Unix time for tokens, a monotonic clock for rate
//! limits) and writes out what it returns, and tests and the fuzzer drive it directly.
//! Every input yields one [`Outcome`] — at most one stanza, the input's own answer — which
//! makes "never answers a result or an error" and "never emits anything not derived from a
//! valid token or the target's presence" checkable one stanza at a time. What the core decides
//! to send on its own (probes, held requests released or refused) waits in
//! [`Proxy::poll_transmit`], and when it next needs the time in [`Proxy::poll_timeout`].
//!
//! One file per flow: `request` (a request to the component, forwarded to a resource),
//! `reply` (the implementing client's answer, reversed by its token), `message`, `presence`
//! (the target's, the only state kept), `hold` (requests waiting for a resource to be known),
//! `oversized` (stanzas too large to read whole), and `select` (which resource serves a
//! stanza).
//!
//! The exchange, with component `proxy.example` and target `impl@example`:
//!
//! ```text
//! user -> component:  <iq type='get' id='1234' to='proxy.example' from='user@example/abc'>
//! component -> impl:  <iq type='get' id='1234' to='impl@example/a' from='proxy.example/TOKEN'>
//! impl -> component:  <iq type='result' id='1234' to='proxy.example/TOKEN' from='impl@example/a'>
//! component -> user:  <iq type='result' id='1234' to='user@example/abc' from='proxy.example'>
//! ```

use jid::{BareJid, Jid};
use tracing::{debug, trace};
use xmpp_parsers::minidom::Element;

use crate::inbound::Inbound;
use crate::keys::KeySet;
use crate::policy::Policy;
use crate::random::Random;
use crate::rate::{Limiter, RateLimit};
use crate::stanza::{self, Condition, NS};
use crate::token;

mod hold;
mod message;
mod outbound;
mod oversized;
mod presence;
mod reason;
mod reply;
mod request;
mod select;

use hold::Held;
pub use hold::{HOLD_PROBE_GAP_MS, LEARN_MS, MAX_HELD_BYTES, REFUSE_PROBE_GAP_MS};
pub use message::Messages;
pub use outbound::Outbound;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use outbound::unescape;
pub use reason::{DropReason, Limit};
pub use request::{PSEUDONYM_LEN, Sender, pseudonym};
pub use select::{BadPattern, Balance, Learnt, Pattern, Resources, Selection};

/// What the proxy needs to know about its deployment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The component's domain (`proxy.example`), normalised.
    pub component: String,
    /// The implementing client's account (`impl@example`).
    pub target: BareJid,
    /// Seconds a token stays valid after it is issued.
    pub token_lifetime: u64,
    /// Most resources of the target tracked at once.
    pub max_resources: usize,
    /// Where keepalive pings go (a server domain that answers XEP-0199 or with an error).
    pub keepalive_to: String,
    /// Rate limits: requests per sender account and per remote domain, errors generated
    /// per account, replies per recipient account.
    pub rate: RateLimit,
    /// Who may send requests.
    pub policy: Policy,
    /// How long a request may wait for a resource when none is known (0: refused at once
    /// with `service-unavailable`), in milliseconds.
    pub hold_ms: u64,
    /// How long a probe round lasts after the first login, a stream lost or a stream
    /// joined (0: none; [`LEARN_MS`] outside tests), in milliseconds.
    pub learn_ms: u64,
    /// How many requests may wait at once, and their bytes at most (as serialised).
    pub max_held: usize,
    /// Which resources of the target may be chosen, and how.
    pub selection: Selection,
    /// Whether messages are forwarded or refused.
    pub messages: Messages,
    /// Seconds a message token stays valid after it is issued.
    pub message_token_lifetime: u64,
    /// Which stanzas the implementing client may start.
    pub outbound: Outbound,
    /// What the implementing client learns of who sent a request or message.
    pub sender: Sender,
}

#[cfg(test)]
impl Settings {
    /// What unit tests start from: `proxy.example` in front of `impl@example`, nothing held,
    /// no probe rounds,
    /// messages refused, senders sealed, 10 requests/s (50 at once) per account, 100 per
    /// remote domain (500 at once), and `spam.example` denied.
    pub(crate) fn example() -> Settings {
        Settings {
            component: "proxy.example".into(),
            target: BareJid::new("impl@example").unwrap(),
            token_lifetime: 300,
            max_resources: 8,
            keepalive_to: "example".into(),
            rate: RateLimit {
                per_second: 10.0,
                burst: 50.0,
                max_senders: 100,
                per_domain: 100.0,
                domain_burst: 500.0,
            },
            policy: Policy {
                allow: vec![],
                deny: vec![crate::policy::Entry::parse("spam.example").unwrap()],
            },
            hold_ms: 0,
            learn_ms: 0,
            max_held: 0,
            selection: Selection::default(),
            messages: Messages::Refuse,
            message_token_lifetime: 3600,
            outbound: Outbound::None,
            sender: Sender::Sealed,
        }
    }
}

/// The time of one stanza, from two clocks read by the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Unix time in milliseconds: tokens carry their issue time in Unix seconds, which every
    /// instance sharing the key file must agree on.
    pub unix_ms: u64,
    /// Milliseconds on a monotonic clock, from any origin: rate limits refill from it, so a
    /// step of the wall clock (backwards or forwards) neither freezes nor refills them.
    pub mono_ms: u64,
}

/// The proxy state machine: the settings, the token keys, the target's presence, and the
/// requests that wait (briefly, bounded) for a resource to become known.
pub struct Proxy {
    settings: Settings,
    target: String,
    keys: KeySet,
    /// [`KeySet::pseudonym_key`] of `keys`, kept: one HMAC less per stanza.
    pseudonym_key: ring::hmac::Key,
    /// What tokens of the revealed form are bound to instead of the component's domain:
    /// `DOMAIN/revealed`, which no domain is, so that they open only as revealed replies and
    /// a token issued in another mode never does (see `reply::revealed`).
    revealed_component: String,
    resources: Resources,
    limiter: Limiter,
    pings: u64,
    held: std::collections::VecDeque<Held>,
    held_bytes: usize,
    /// Stanzas to send besides each input's own answer, each with its verdict: held
    /// requests refused, probes (see [`Proxy::poll_transmit`]). Each has a `transmit`.
    transmit: std::collections::VecDeque<Outcome>,
    last_probe_ms: Option<u64>,
    /// While the target's presence is being (re)learnt, when the probe round ends (see
    /// [`LEARN_MS`]).
    learning_until_ms: Option<u64>,
    /// When the last probe round started.
    learning_since_ms: u64,
    /// A probe went out (without a subscription request after it) since the last
    /// `unsubscribed` of the target: Prosody answers a probe from a non-subscriber with
    /// `unsubscribed` sent as the target, which cancels a subscription request still pending,
    /// so that `unsubscribed` is answered with a new request.
    probed: bool,
}

/// What the core made of one input: the stanza to send in answer, if any, and what the
/// input was (or, from [`Proxy::poll_transmit`], a stanza the core sends on its own, and what
/// it is). The shell sends `transmit` and never looks at `verdict` to decide anything; the
/// verdict is for logs, counters and tests.
#[derive(Debug)]
#[must_use = "the stanza in `transmit` must be sent"]
pub struct Outcome {
    /// The stanza to send, if any.
    pub transmit: Option<Element>,
    /// What the input was.
    pub verdict: Verdict,
    /// Which kind of stanza the input was.
    pub stanza: Stanza,
    /// For a reply reversed: milliseconds from its request's forwarding (the issue time in
    /// its token, on the clock of the instance that forwarded it) to now.
    pub reply_latency_ms: Option<u64>,
}

/// The kind of stanza an input was (for counters: a verdict per kind is a flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stanza {
    /// `<iq/>`.
    Iq,
    /// `<message/>`.
    Message,
    /// `<presence/>`.
    Presence,
    /// Anything else.
    Other,
}

impl Stanza {
    fn of(name: &str) -> Stanza {
        match name {
            "iq" => Stanza::Iq,
            "message" => Stanza::Message,
            "presence" => Stanza::Presence,
            _ => Stanza::Other,
        }
    }
}

impl Outcome {
    fn send(el: Element, verdict: Verdict) -> Outcome {
        Outcome::maybe(Some(el), verdict)
    }

    fn maybe(transmit: Option<Element>, verdict: Verdict) -> Outcome {
        Outcome {
            transmit,
            verdict,
            stanza: Stanza::Other,
            reply_latency_ms: None,
        }
    }

    /// A probe the core sends on its own (see [`Proxy::poll_transmit`]).
    fn probe(el: Element) -> Outcome {
        Outcome {
            stanza: Stanza::Presence,
            ..Outcome::send(el, Verdict::Probe)
        }
    }
}

/// What one stanza was, from the proxy's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A request forwarded to the implementing client.
    Forwarded,
    /// A reply or message forwarded back to the original sender, or a peer's reply routed
    /// back to the implementing client.
    Reversed,
    /// A stanza the implementing client started, sent to its peer.
    Outbound,
    /// A peer's reply to an IQ the implementing client started, routed back to it.
    Routed,
    /// An error sent back to the sender of a stanza.
    Refused(Condition),
    /// A presence change or subscription handled (maybe with an answer).
    Presence,
    /// A request held until a resource of the target is known, or until the probe round
    /// under way ends (see [`LEARN_MS`]); it leaves through [`Proxy::poll_transmit`],
    /// forwarded or refused. The output, if any, is a probe.
    Held,
    /// Nothing sent: the token it was sent to did not open.
    TokenRejected(crate::token::Rejected),
    /// Nothing sent, for this reason.
    Dropped(DropReason),
    /// Only from [`Proxy::poll_transmit`]: a presence probe of the target the core sends on
    /// its own (while requests are held, or after one was refused for want of a resource).
    /// Not a stanza received: not counted.
    Probe,
}

impl Verdict {
    /// The rate limit the stanza was over, if it was refused or dropped for one: a request
    /// answered `resource-constraint`, or a stanza dropped over a limit
    /// ([`DropReason::rate_limit`]).
    pub fn rate_limit(self) -> Option<Limit> {
        match self {
            Verdict::Refused(Condition::ResourceConstraint) => Some(Limit::Request),
            Verdict::Dropped(why) => why.rate_limit(),
            _ => None,
        }
    }
}

impl Proxy {
    /// A proxy with no known resources.
    pub fn new(settings: Settings, keys: KeySet) -> Proxy {
        let target = settings.target.to_string();
        let resources = Resources::new(
            settings.max_resources,
            settings.selection.clone(),
            keys.selection_key(),
        );
        let limiter = Limiter::new(settings.rate);
        let pseudonym_key = keys.pseudonym_key();
        let revealed_component = format!("{}/revealed", settings.component);
        Proxy {
            settings,
            target,
            pseudonym_key,
            revealed_component,
            keys,
            resources,
            limiter,
            pings: 0,
            held: std::collections::VecDeque::new(),
            held_bytes: 0,
            transmit: std::collections::VecDeque::new(),
            last_probe_ms: None,
            learning_until_ms: None,
            learning_since_ms: 0,
            probed: false,
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The token keys in use.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Replaces the token keys (after a rotation on disk).
    pub fn set_keys(&mut self, keys: KeySet) {
        self.resources.set_sticky_key(keys.selection_key());
        self.pseudonym_key = keys.pseudonym_key();
        self.keys = keys;
    }

    /// Resources of the target currently believed available, with their priorities.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// Stanzas to send right after the component authenticated: presence is relearnt from
    /// scratch (probe, for the current state; subscribe, so the target's server lets it
    /// through), since nothing from a previous session can be trusted. A probe round starts
    /// (see [`LEARN_MS`]).
    ///
    /// The probe goes first: Prosody answers a probe from a non-subscriber with
    /// `unsubscribed` sent *as the target*, which cancels a subscription request that is
    /// still pending — after a subscribe, the request would be lost. (Later probes are
    /// followed by a new request when their `unsubscribed` arrives: see `presence`.)
    pub fn connected(&mut self, clock: Clock) -> Vec<Element> {
        self.resources.clear();
        self.joined(clock)
    }

    /// Another stream came up beside those already up (the session's servers are the nodes
    /// of one cluster): the probe and subscription request of [`Proxy::connected`] on it
    /// too, so that neither depends on one stream's server, and nothing is forgotten; and a
    /// probe round, since presence this instance missed may come through it now.
    pub fn joined(&mut self, clock: Clock) -> Vec<Element> {
        self.learn(clock);
        let from = &self.settings.component;
        vec![
            stanza::presence(Some("probe"), from, &self.target),
            stanza::presence(Some("subscribe"), from, &self.target),
        ]
    }

    /// A periodic probe of the target's presence. With one instance it only refreshes what
    /// presence broadcasts already said. With several instances behind a server that
    /// spreads a component domain over connections (ejabberd), each presence stanza of the
    /// target reaches *one* instance; periodic probes are how every instance learns every
    /// resource.
    pub fn probe(&mut self) -> Element {
        self.probed = true;
        stanza::presence(Some("probe"), &self.settings.component, &self.target)
    }

    /// The stream was handed over by an in-place upgrade: the resources the previous process
    /// could choose are still online as far as the server is concerned (nothing was sent or
    /// lost in between), so they are served at once instead of relearnt. The handover does
    /// not carry priorities: the returned probe relearns them (until its answers arrive, the
    /// resources count as priority 0).
    pub fn resumed(&mut self, resources: &[String]) -> Vec<Element> {
        self.resources.clear();
        for r in resources {
            self.resources.available(r, 0);
        }
        vec![self.probe()]
    }

    /// One of the session's streams was lost while others are up: the presence learnt
    /// through it may be stale (on an ejabberd cluster, a resource's presence comes through
    /// the stream to its node, which may be gone with it), so nothing is assumed; the
    /// returned probe relearns what is online, and a probe round starts. Held requests wait
    /// on; requests that arrive meanwhile are held (see [`Settings::hold_ms`]).
    pub fn stream_lost(&mut self, clock: Clock) -> Element {
        self.resources.clear();
        self.learn(clock);
        self.probe()
    }

    /// The session lost its stream: nothing is known about presence any more, and nothing
    /// queued can be sent (what was held is lost with the stream, as what was in it).
    pub fn disconnected(&mut self) {
        self.resources.clear();
        self.held.clear();
        self.held_bytes = 0;
        self.transmit.clear();
        self.last_probe_ms = None;
        self.learning_until_ms = None;
        self.probed = false;
    }

    /// A keepalive ping for an idle stream.
    pub fn keepalive(&mut self) -> Element {
        self.pings += 1;
        stanza::ping(
            &self.settings.component,
            &self.settings.keepalive_to,
            &format!("jat-ping-{}", self.pings),
        )
    }

    /// The rate limiter's tables (each bounded by `rate.max_senders`).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Accounts currently tracked by the rate limiter (bounded by `rate.max_senders`).
    pub fn tracked_senders(&self) -> usize {
        self.limiter.len()
    }

    /// Handles one stanza from the server at time `clock`.
    pub fn handle(&mut self, inbound: Inbound, clock: Clock, rng: &mut dyn Random) -> Outcome {
        let out = match inbound {
            Inbound::Oversized(o) => {
                let stanza = Stanza::of(&o.name);
                Outcome {
                    stanza,
                    ..self.oversized(o, clock)
                }
            }
            Inbound::Element(el) => {
                if !el.has_ns(NS) {
                    return dropped(DropReason::NotComponentStanza);
                }
                let stanza = Stanza::of(el.name());
                let out = match stanza {
                    Stanza::Iq => self.iq(el, clock, rng),
                    Stanza::Message => self.message(el, clock, rng),
                    Stanza::Presence => self.presence(&el),
                    Stanza::Other => dropped(DropReason::UnknownElement),
                };
                Outcome { stanza, ..out }
            }
        };

        // Held requests whose time ran out are refused (if a presence or a result made a
        // resource known, they leave through `poll_transmit` instead).
        if !self.held.is_empty() {
            self.settle_held(clock);
        }
        out
    }

    fn iq(&mut self, el: Element, clock: Clock, rng: &mut dyn Random) -> Outcome {
        let Some((from, to)) = self.addresses(el.attr("from"), el.attr("to")) else {
            return dropped(DropReason::IqAddresses);
        };
        match el.attr("type") {
            Some("get") | Some("set") => self.request(el, from, to, clock, rng),
            Some("result") | Some("error") => self.reply(el, &from, &to, clock),
            // RFC 6120 §8.3.3.1: an unrecognised 'type' is a <bad-request/>.
            _ => self.refuse(&el, &from, Condition::BadRequest, "unknown IQ type", clock),
        }
    }

    /// An error reply to the request or message `el` from `sender`, from the address it was
    /// sent to — if `sender`'s account has not spent its budget of generated errors; else
    /// nothing, so that an auto-responder answering every error ends up answered by silence.
    fn refuse(
        &mut self,
        el: &Element,
        sender: &Jid,
        condition: Condition,
        text: &str,
        clock: Clock,
    ) -> Outcome {
        let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
            return dropped(DropReason::CannotAnswer);
        };
        if !self.limiter.error(bare(sender), clock.mono_ms) {
            return over_error_budget(condition);
        }
        let reply = stanza::error_reply(el.name(), to, from, el.attr("id"), condition, text);
        Outcome::send(reply, Verdict::Refused(condition))
    }

    /// Whether `jid` is (a resource of) the target account; no allocation.
    fn is_target(&self, jid: &Jid) -> bool {
        jid.domain() == self.settings.target.domain() && jid.node() == self.settings.target.node()
    }

    /// Parses `from` and `to`; `None` unless both are valid, `to` is at the component's
    /// domain and `from` is not (the proxy never talks to itself).
    fn addresses(&self, from: Option<&str>, to: Option<&str>) -> Option<(Jid, To)> {
        let from = Jid::new(from?).ok()?;
        let ours = self.settings.component.as_str();
        if from.domain().as_str() == ours {
            return None;
        }
        let raw = to?;
        if raw == ours {
            return Some((from, To::Bare));
        }
        // Every reply goes to `domain/TOKEN`, and a base64url resource is already in the
        // canonical form JID preparation would give it: skip that work on the hot path.
        if let Some(r) = raw.strip_prefix(ours).and_then(|r| r.strip_prefix('/'))
            && !r.is_empty()
            && r.len() <= token::MAX_TOKEN_LEN
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Some((from, To::Token(r.to_owned())));
        }
        let to = Jid::new(raw).ok()?;
        if to.domain().as_str() != ours {
            return None;
        }
        Some((
            from,
            if to.node().is_none() && to.resource().is_none() {
                To::Bare
            } else {
                To::Other(to)
            },
        ))
    }
}

/// Where a stanza was sent, at the component's domain.
#[derive(Debug)]
enum To {
    /// The bare domain.
    Bare,
    /// `domain/RESOURCE`, with a base64url resource (every token is one).
    Token(String),
    /// Any other address at the domain.
    Other(Jid),
}

impl To {
    /// The address as a string.
    fn address(&self, component: &str) -> String {
        match self {
            To::Bare => component.to_owned(),
            To::Token(r) => join(component, r),
            To::Other(j) => j.to_string(),
        }
    }
}

/// `bare/resource`.
fn join(bare: &str, resource: &str) -> String {
    let mut s = String::with_capacity(bare.len() + 1 + resource.len());
    s.push_str(bare);
    s.push('/');
    s.push_str(resource);
    s
}

fn dropped(why: DropReason) -> Outcome {
    trace!(why = why.label(), "stanza dropped");
    Outcome::maybe(None, Verdict::Dropped(why))
}

fn over_error_budget(condition: Condition) -> Outcome {
    debug!(
        condition = condition.name(),
        "error not sent: the sender's error budget is spent"
    );
    Outcome::maybe(None, Verdict::Dropped(DropReason::OverErrorBudget))
}

/// The bare JID of `jid` as a slice of its text; no allocation.
fn bare(jid: &Jid) -> &str {
    let s = jid.as_str();
    match jid.resource() {
        Some(r) => &s[..s.len() - r.as_str().len() - 1],
        None => s,
    }
}

#[cfg(test)]
mod tests;
