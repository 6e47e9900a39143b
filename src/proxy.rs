//! The proxy itself: a pure state machine from (stanza in, time, randomness) to stanza out.
//!
//! No sockets, clocks or entropy live here; the session (`session.rs`) feeds it what the
//! server sends and the time (a [`Clock`]: Unix time for tokens, a monotonic clock for rate
//! limits) and writes out what it returns, and tests and the fuzzer drive it directly.
//! Every input yields at most one output, which makes "never answers a result or an error"
//! and "never emits anything not derived from a valid token or the target's presence"
//! checkable one stanza at a time.
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
use tracing::{debug, trace, warn};
use xmpp_parsers::minidom::Element;

use crate::inbound::{Inbound, Oversized};
use crate::keys::KeySet;
use crate::policy::Policy;
use crate::presence::Resources;
use crate::random::Random;
use crate::rate::{Limiter, Over, RateLimit};
use crate::stanza::{self, Condition, NS};
use crate::token::{self, Binding, Contents, SALT_LEN};

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
    /// How many requests may wait at once, and their bytes at most (as serialised).
    pub max_held: usize,
}

/// Bytes of held requests at most, whatever `max_held` says.
pub const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;

/// While requests are held, the target is probed at most this often: each probe's answer
/// reaches one instance of those serving the domain (ejabberd spreads them), so a held
/// request's instance learns the resources within a few probes — its own or another
/// instance's.
pub const HOLD_PROBE_GAP_MS: u64 = 250;

/// Without held requests (holding disabled or full), a request refused for want of a
/// resource probes the target at most this often.
pub const REFUSE_PROBE_GAP_MS: u64 = 1000;

/// A request waiting for a resource of the target to become known.
#[derive(Debug)]
struct Held {
    el: Element,
    from: Jid,
    to: To,
    until_ms: u64,
    bytes: usize,
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
    resources: Resources,
    limiter: Limiter,
    pings: u64,
    held: std::collections::VecDeque<Held>,
    held_bytes: usize,
    /// Stanzas to send besides each input's own answer: held requests released or refused,
    /// probes (see [`Proxy::poll_transmit`]).
    transmit: std::collections::VecDeque<Element>,
    last_probe_ms: Option<u64>,
}

/// What one stanza was, from the proxy's point of view; kept only for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A request forwarded to the implementing client.
    Forwarded,
    /// A reply forwarded back to the original sender.
    Reversed,
    /// An error sent back to the sender of a stanza.
    Refused(Condition),
    /// A presence change or subscription handled (maybe with an answer).
    Presence,
    /// A request held until a resource of the target is known (it leaves through
    /// [`Proxy::poll_transmit`], forwarded or refused); the output, if any, is a probe.
    Held,
    /// A reply dropped: its token did not open.
    TokenRejected(token::Rejected),
    /// Nothing sent.
    Dropped(&'static str),
}

impl Proxy {
    /// A proxy with no known resources.
    pub fn new(settings: Settings, keys: KeySet) -> Proxy {
        let target = settings.target.to_string();
        let resources = Resources::new(settings.max_resources);
        let limiter = Limiter::new(settings.rate);
        Proxy {
            settings,
            target,
            keys,
            resources,
            limiter,
            pings: 0,
            held: std::collections::VecDeque::new(),
            held_bytes: 0,
            transmit: std::collections::VecDeque::new(),
            last_probe_ms: None,
        }
    }

    /// The next stanza to send that is not the direct answer to an input: a held request
    /// forwarded (a resource became known) or refused (its time ran out), or a probe. Take
    /// them all after every [`Proxy::handle`] and [`Proxy::handle_timeout`].
    pub fn poll_transmit(&mut self) -> Option<Element> {
        self.transmit.pop_front()
    }

    /// When [`Proxy::handle_timeout`] is next due (monotonic milliseconds), if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        let first = self.held.front()?;
        let probe = self.last_probe_ms.map_or(0, |t| t + HOLD_PROBE_GAP_MS);
        Some(first.until_ms.min(probe))
    }

    /// Time passed: held requests whose time ran out are refused, and the target is probed
    /// again while requests wait.
    pub fn handle_timeout(&mut self, clock: Clock, rng: &mut dyn Random) {
        self.settle_held(clock, rng);
        if !self.held.is_empty()
            && let Some(p) = self.probe_due(clock.mono_ms, HOLD_PROBE_GAP_MS)
        {
            self.transmit.push_back(p);
        }
    }

    /// How many requests wait for a resource.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The stream is about to close: every held request is refused now (queued for
    /// [`Proxy::poll_transmit`]) rather than lost with the stream.
    pub fn refuse_held(&mut self, clock: Clock) {
        while let Some(h) = self.pop_held() {
            self.refuse_one_held(h, clock);
        }
    }

    fn pop_held(&mut self) -> Option<Held> {
        let h = self.held.pop_front()?;
        self.held_bytes -= h.bytes;
        Some(h)
    }

    fn refuse_one_held(&mut self, h: Held, clock: Clock) {
        debug!(
            id = h.el.attr("id"),
            "held request refused: no resource became known"
        );
        if let (Some(out), _) = self.refuse(
            &h.el,
            &h.from,
            Condition::ServiceUnavailable,
            "the service is not available",
            clock,
        ) {
            self.transmit.push_back(out);
        }
    }

    /// Forwards every held request if a resource is known; otherwise refuses those whose
    /// time ran out.
    fn settle_held(&mut self, clock: Clock, rng: &mut dyn Random) {
        if self.held.is_empty() {
            return;
        }
        if !self.resources.list().is_empty() {
            while let Some(h) = self.pop_held() {
                let Some(resource) = self.resources.pick(rng).map(str::to_owned) else {
                    break;
                };
                debug!(id = h.el.attr("id"), "held request released");
                if let (Some(out), _) = self.forward(h.el, &h.from, &h.to, &resource, clock, rng) {
                    self.transmit.push_back(out);
                }
            }
            return;
        }
        while self
            .held
            .front()
            .is_some_and(|h| h.until_ms <= clock.mono_ms)
        {
            let h = self.pop_held().expect("checked");
            self.refuse_one_held(h, clock);
        }
    }

    /// A probe of the target if none was sent in the last `gap_ms`.
    fn probe_due(&mut self, now_ms: u64, gap_ms: u64) -> Option<Element> {
        if self.last_probe_ms.is_some_and(|t| now_ms < t + gap_ms) {
            return None;
        }
        self.last_probe_ms = Some(now_ms);
        Some(self.probe())
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
        self.keys = keys;
    }

    /// Resources of the target currently believed available.
    pub fn resources(&self) -> &[String] {
        self.resources.list()
    }

    /// Stanzas to send right after the component authenticated: presence is relearnt from
    /// scratch (probe, for the current state; subscribe, so the target's server lets it
    /// through), since nothing from a previous session can be trusted.
    ///
    /// The probe goes first: Prosody answers a probe from a non-subscriber with
    /// `unsubscribed` sent *as the target*, which cancels a subscription request that is
    /// still pending — after a subscribe, the request would be lost.
    pub fn connected(&mut self) -> Vec<Element> {
        self.resources.clear();
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
    pub fn probe(&self) -> Element {
        stanza::presence(Some("probe"), &self.settings.component, &self.target)
    }

    /// The stream was handed over by an in-place upgrade: the resources the previous process
    /// knew are still online as far as the server is concerned (nothing was sent or lost in
    /// between), so they are served at once instead of relearnt; the periodic probe goes on
    /// refreshing them. Nothing is sent.
    pub fn resumed(&mut self, resources: &[String]) {
        self.resources.clear();
        for r in resources {
            self.resources.available(r);
        }
    }

    /// The session lost its stream: nothing is known about presence any more, and nothing
    /// queued can be sent (what was held is lost with the stream, as what was in it).
    pub fn disconnected(&mut self) {
        self.resources.clear();
        self.held.clear();
        self.held_bytes = 0;
        self.transmit.clear();
        self.last_probe_ms = None;
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
    pub fn handle(
        &mut self,
        inbound: Inbound,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> (Option<Element>, Verdict) {
        let out = match inbound {
            Inbound::Oversized(o) => self.oversized(o, clock),
            Inbound::Element(el) => {
                if !el.has_ns(NS) {
                    return dropped("not a stanza of the component stream");
                }
                match el.name() {
                    "iq" => self.iq(el, clock, rng),
                    "message" => self.message(&el, clock),
                    "presence" => self.presence(&el),
                    _ => dropped("unknown top-level element"),
                }
            }
        };
        // A presence or a result may have made a resource known to held requests.
        if !self.held.is_empty() {
            self.settle_held(clock, rng);
        }
        out
    }

    fn iq(
        &mut self,
        el: Element,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> (Option<Element>, Verdict) {
        let Some((from, to)) = self.addresses(el.attr("from"), el.attr("to")) else {
            return dropped("iq with missing or invalid addresses");
        };
        match el.attr("type") {
            Some("get") | Some("set") => self.request(el, from, to, clock, rng),
            Some("result") | Some("error") => self.reply(el, &from, &to, clock),
            // RFC 6120 §8.3.3.1: an unrecognised 'type' is a <bad-request/>.
            _ => self.refuse(&el, &from, Condition::BadRequest, "unknown IQ type", clock),
        }
    }

    fn request(
        &mut self,
        el: Element,
        from: Jid,
        to: To,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> (Option<Element>, Verdict) {
        if self.is_target(&from) {
            return self.refuse(
                &el,
                &from,
                Condition::FeatureNotImplemented,
                "the implementing client cannot send requests through the proxy",
                clock,
            );
        }
        let Some(id) = el.attr("id") else {
            return self.refuse(&el, &from, Condition::BadRequest, "IQ without id", clock);
        };
        if stanza::child_count(&el) != 1 {
            return self.refuse(
                &el,
                &from,
                Condition::BadRequest,
                "a get or set IQ must have exactly one payload element",
                clock,
            );
        }
        if !self.settings.policy.permits(&from) {
            debug!(id, "request refused by policy");
            return self.refuse(
                &el,
                &from,
                Condition::Forbidden,
                "you may not use this service",
                clock,
            );
        }
        // Accounts at the implementing client's own domain are the operator's: only remote
        // domains, which can mint local parts at will, are also limited as a whole.
        let domain =
            (from.domain() != self.settings.target.domain()).then(|| from.domain().as_str());
        match self.limiter.request(bare(&from), domain, clock.mono_ms) {
            Ok(()) => {}
            Err(over) => {
                debug!(id, ?over, "request over its rate limit");
                let text = match over {
                    Over::Account => "too many requests: slow down",
                    Over::Domain => "too many requests from your domain: slow down",
                };
                return self.refuse(&el, &from, Condition::ResourceConstraint, text, clock);
            }
        }
        let Some(resource) = self.resources.pick(rng).map(str::to_owned) else {
            return self.no_resource(el, from, to, clock);
        };
        self.forward(el, &from, &to, &resource, clock, rng)
    }

    /// A request (checked and charged to its limits) arrived while no resource of the
    /// target is known: held for a while, with a probe, or refused.
    fn no_resource(
        &mut self,
        el: Element,
        from: Jid,
        to: To,
        clock: Clock,
    ) -> (Option<Element>, Verdict) {
        if self.settings.hold_ms > 0 && self.held.len() < self.settings.max_held {
            let bytes = String::from(&el).len();
            if self.held_bytes + bytes <= MAX_HELD_BYTES {
                debug!(
                    id = el.attr("id"),
                    "no resource known: request held while the target is probed"
                );
                self.held_bytes += bytes;
                self.held.push_back(Held {
                    el,
                    from,
                    to,
                    until_ms: clock.mono_ms + self.settings.hold_ms,
                    bytes,
                });
                return (
                    self.probe_due(clock.mono_ms, HOLD_PROBE_GAP_MS),
                    Verdict::Held,
                );
            }
        }
        // No resource known: maybe this instance just (re)connected and the target's
        // presence went to another one. Ask now rather than at the next periodic probe.
        if let Some(p) = self.probe_due(clock.mono_ms, REFUSE_PROBE_GAP_MS) {
            self.transmit.push_back(p);
        }
        self.refuse(
            &el,
            &from,
            Condition::ServiceUnavailable,
            "the service is not available",
            clock,
        )
    }

    /// Seals the sender into a token and sends the request to `resource`.
    fn forward(
        &mut self,
        mut el: Element,
        from: &Jid,
        to: &To,
        resource: &str,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> (Option<Element>, Verdict) {
        let now = clock.unix_ms / 1000;
        let Some(id) = el.attr("id") else {
            return self.refuse(&el, from, Condition::BadRequest, "IQ without id", clock);
        };
        let sender = from.to_string();
        let original_to = match to {
            To::Bare => None,
            _ => Some(to.address(&self.settings.component)),
        };
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt);
        let binding = Binding {
            component: &self.settings.component,
            iq_id: id,
        };
        let contents = Contents {
            sender: &sender,
            original_to: original_to.as_deref(),
        };
        let token = match token::seal(&self.keys, binding, &contents, now, salt) {
            Ok(t) => t,
            Err(e) => {
                let text = format!(
                    "sender address too long to be proxied ({} bytes, at most {})",
                    e.len,
                    token::MAX_PLAINTEXT_LEN
                );
                return self.refuse(&el, from, Condition::NotAcceptable, &text, clock);
            }
        };
        let dest = join(&self.target, resource);
        debug!(id, resource, "request forwarded");
        let new_from = join(&self.settings.component, &token);
        stanza::set_attr(&mut el, "from", new_from);
        stanza::set_attr(&mut el, "to", dest);
        (Some(el), Verdict::Forwarded)
    }

    fn reply(
        &mut self,
        mut el: Element,
        from: &Jid,
        to: &To,
        clock: Clock,
    ) -> (Option<Element>, Verdict) {
        let now = clock.unix_ms / 1000;
        let token = match to {
            To::Token(t) => t.as_str(),
            To::Other(j) if j.node().is_none() && j.resource().is_some() => {
                j.resource().expect("checked").as_str()
            }
            To::Other(_) => return dropped("reply to an address that is not a token"),
            To::Bare => {
                trace!(id = el.attr("id"), "reply to the bare component address");
                return dropped("reply to the bare component address");
            }
        };
        if !self.is_target(from) {
            debug!("reply to a token from outside the target account dropped");
            return dropped("reply from outside the target account");
        }
        let Some(id) = el.attr("id") else {
            return dropped("reply without id");
        };
        let binding = Binding {
            component: &self.settings.component,
            iq_id: id,
        };
        let opened = match token::open(
            &self.keys,
            binding,
            token,
            now,
            self.settings.token_lifetime,
        ) {
            Ok(o) => o,
            Err(reason) => {
                debug!(id, %reason, "reply dropped");
                return (None, Verdict::TokenRejected(reason));
            }
        };
        let Ok(sender) = Jid::new(&opened.sender) else {
            return dropped("token holds an invalid address");
        };
        if sender.domain().as_str() == self.settings.component {
            return dropped("token addressed to the component itself");
        }
        // The reply comes from where the request went: an address at the component, never
        // anything else, whatever a token may hold.
        let reply_from = match opened.original_to.as_deref() {
            None => self.settings.component.clone(),
            Some(a) => match Jid::new(a) {
                Ok(j) if j.domain().as_str() == self.settings.component => j.to_string(),
                _ => {
                    debug!(id, "token's original address is not at the component");
                    return dropped("token's original address is not at the component");
                }
            },
        };
        // A genuine reply also says whether its resource is online: a result proves it is;
        // the server's bounce of a request to a resource that went away
        // (service-unavailable from that full JID) proves it is not — this instance may not
        // have seen the unavailable presence, which went to another instance.
        if let Some(res) = from.resource() {
            match el.attr("type") {
                Some("result") => {
                    self.resources.available(res.as_str());
                }
                Some("error")
                    if stanza::error_condition(&el).as_deref() == Some("service-unavailable") =>
                {
                    debug!(
                        resource = res.as_str(),
                        "request bounced: resource forgotten"
                    );
                    self.resources.unavailable(res.as_str());
                }
                _ => {}
            }
        }
        // The implementing client may replay a genuine reply as often as it likes within the
        // token's lifetime: bounded per recipient account.
        if !self.limiter.reply(bare(&sender), clock.mono_ms) {
            debug!(id, "reply dropped: over the recipient's rate limit");
            return dropped("over the recipient's reply rate limit");
        }
        debug!(id, sender = %opened.sender, key = opened.key_id, "reply reversed");
        stanza::set_attr(&mut el, "from", reply_from);
        stanza::set_attr(&mut el, "to", opened.sender);
        (Some(el), Verdict::Reversed)
    }

    fn message(&mut self, el: &Element, clock: Clock) -> (Option<Element>, Verdict) {
        if el.attr("type") == Some("error") {
            return dropped("message error");
        }
        let Some((from, _)) = self.addresses(el.attr("from"), el.attr("to")) else {
            return dropped("message with missing or invalid addresses");
        };
        // RFC 6121 §5.2.2: a message of unknown type is treated as 'normal'.
        self.refuse(
            el,
            &from,
            Condition::FeatureNotImplemented,
            "this address does not accept messages",
            clock,
        )
    }

    fn presence(&mut self, el: &Element) -> (Option<Element>, Verdict) {
        let Some((from, _)) = self.addresses(el.attr("from"), el.attr("to")) else {
            return dropped("presence with missing or invalid addresses");
        };
        if !self.is_target(&from) {
            return dropped("presence from outside the target account");
        }
        let resource = from.resource().map(|r| r.as_str());
        let component = &self.settings.component;
        let answer = |t: Option<&str>| Some(stanza::presence(t, component, &self.target));
        let out = match (el.attr("type"), resource) {
            (None, Some(r)) => {
                if self.resources.available(r) {
                    debug!(resource = r, "implementing client resource available");
                } else {
                    warn!(
                        max = self.settings.max_resources,
                        "too many resources of the implementing client; ignoring one"
                    );
                }
                None
            }
            (Some("unavailable") | Some("error"), Some(r)) => {
                debug!(resource = r, "implementing client resource unavailable");
                self.resources.unavailable(r);
                None
            }
            (Some("unavailable") | Some("error") | Some("unsubscribed"), None)
            | (Some("unsubscribed"), Some(_)) => {
                debug!("implementing client unavailable or unsubscribed");
                self.resources.clear();
                None
            }
            (Some("subscribe"), _) => answer(Some("subscribed")),
            (Some("unsubscribe"), _) => answer(Some("unsubscribed")),
            (Some("probe"), _) => answer(None),
            _ => None,
        };
        (out, Verdict::Presence)
    }

    fn oversized(&mut self, o: Oversized, clock: Clock) -> (Option<Element>, Verdict) {
        debug!(name = %o.name, exceeded = %o.exceeded, "oversized stanza");
        if o.ns != NS {
            return dropped("oversized element");
        }
        let Some((from, to)) = self.addresses(o.from.as_deref(), o.to.as_deref()) else {
            return dropped("oversized stanza with missing or invalid addresses");
        };
        let text = o.exceeded.to_string();
        let mut error_to_sender = |name: &str| {
            if !self.limiter.error(bare(&from), clock.mono_ms) {
                return over_error_budget(Condition::PolicyViolation);
            }
            let el = stanza::error_reply(
                name,
                &to.address(&self.settings.component),
                &from.to_string(),
                o.id.as_deref(),
                Condition::PolicyViolation,
                &text,
            );
            (Some(el), Verdict::Refused(Condition::PolicyViolation))
        };
        if o.name == "iq" && o.id.is_none() {
            // An error without the request's id answers nothing (its id alone may have been
            // what was too long).
            return dropped("oversized iq without a readable id");
        }
        match (o.name.as_str(), o.type_.as_deref()) {
            ("iq", Some("get" | "set")) => error_to_sender("iq"),
            ("iq", Some("result" | "error")) => {
                // A reply too large to forward: its sender must not wait for ever, so the
                // original sender gets an error instead (if the token is valid).
                let stub = stanza::error_reply(
                    "iq",
                    "",
                    "",
                    o.id.as_deref(),
                    Condition::PolicyViolation,
                    &text,
                );
                let mut stub = stub;
                stanza::set_attr(&mut stub, "from", from.to_string());
                stanza::set_attr(&mut stub, "to", to.address(&self.settings.component));
                // Charged to the recipient as a reply (it is one), not to an error budget.
                match self.reply(stub, &from, &to, clock) {
                    (Some(out), _) => (Some(out), Verdict::Refused(Condition::PolicyViolation)),
                    (None, v) => (None, v),
                }
            }
            ("message", t) if t != Some("error") => error_to_sender("message"),
            _ => dropped("oversized stanza"),
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
    ) -> (Option<Element>, Verdict) {
        let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
            return dropped("cannot answer a stanza without addresses");
        };
        if !self.limiter.error(bare(sender), clock.mono_ms) {
            return over_error_budget(condition);
        }
        let reply = stanza::error_reply(el.name(), to, from, el.attr("id"), condition, text);
        (Some(reply), Verdict::Refused(condition))
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

fn dropped(why: &'static str) -> (Option<Element>, Verdict) {
    trace!(why, "stanza dropped");
    (None, Verdict::Dropped(why))
}

fn over_error_budget(condition: Condition) -> (Option<Element>, Verdict) {
    debug!(
        condition = condition.name(),
        "error not sent: the sender's error budget is spent"
    );
    (None, Verdict::Dropped("over the sender's error budget"))
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
