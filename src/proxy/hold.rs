//! Requests that arrive while no resource of the target is known wait here, bounded in count,
//! bytes and time, while the core probes the target; they leave forwarded or refused.
//!
//! So do requests whose pick depends on every resource being known (`balance = "sticky"` or
//! `"priority"`) while a probe round is under way ([`LEARN_MS`] after a (re)connection, or a
//! stream lost or joined): behind a server that spreads a component domain over
//! connections, each presence reaches one instance, and an instance still learning would pick
//! among fewer resources than the others and send one sender's requests elsewhere. They
//! leave when the round ends, picked from what it taught, or when their own hold time
//! (`hold_ms`) runs out, picked from what is known then.
//!
//! A held request is kept as its XML text, not as a tree: a tree costs up to about fifty
//! times the bytes it was read from (a node is about 200 bytes on the heap), so holding
//! trees would let a few large requests cost hundreds of MiB. [`MAX_HELD_BYTES`] bounds the
//! memory held requests take; each is parsed again when it leaves.

use jid::Jid;
use tracing::debug;
use xmpp_parsers::minidom::Element;

use super::{Clock, Outcome, Proxy, Stanza, To, Verdict, bare};
use crate::random::Random;
use crate::stanza::{self, Condition};

/// Bytes of held requests at most (their text, addresses and entries), whatever `max_held`
/// says.
pub const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;

/// While requests are held, the target is probed at most this often: each probe's answer
/// reaches one instance of those serving the domain (ejabberd spreads them), so a held
/// request's instance learns the resources within a few probes — its own or another
/// instance's.
pub const HOLD_PROBE_GAP_MS: u64 = 250;

/// How long a probe round lasts: after the session's first login, a stream lost, or another
/// stream joined, the target is probed every [`HOLD_PROBE_GAP_MS`] for this long (about
/// eight probes). Each probe's answers reach one of the instances serving the domain at
/// random; with two instances probing together, an instance misses a resource in a round
/// with odds of about 2^-16.
pub const LEARN_MS: u64 = 2000;

/// Without held requests (holding disabled or full), a request refused for want of a
/// resource probes the target at most this often.
pub const REFUSE_PROBE_GAP_MS: u64 = 1000;

/// A request waiting for a resource of the target to become known.
#[derive(Debug)]
pub(super) struct Held {
    /// The request as XML text (see the module's doc).
    xml: String,
    /// The byte limit it is read again under: its text's length, or half what its tree held
    /// (a namespace inherited by many elements costs the tree more than the text), so that
    /// it reads back under the limits it was read under the first time.
    read_limit: usize,
    /// Its stanza element without children or other attributes than `from`, `to`, `id`
    /// and `type`: what refusing it takes, without parsing it again.
    head: Element,
    from: Jid,
    to: To,
    until_ms: u64,
}

impl Held {
    /// What one held request costs: its text, its addresses and its entry.
    fn cost_of(xml: &str, head: &Element, from: &Jid, to: &To) -> usize {
        let to = match to {
            To::Bare => 0,
            To::Token(t) => t.len(),
            To::Other(j) => j.as_str().len(),
        };
        let head = head
            .attrs()
            .iter()
            .map(|(_, v)| v.len() + 64)
            .sum::<usize>();
        xml.len() + head + from.as_str().len() + to + std::mem::size_of::<Held>() + 256
    }

    fn cost(&self) -> usize {
        Held::cost_of(&self.xml, &self.head, &self.from, &self.to)
    }

    /// The stanza element of `el` alone (see [`Held::head`]).
    fn head_of(el: &Element) -> Element {
        let mut head = Element::bare(el.name(), el.ns());
        for name in ["from", "to", "id", "type"] {
            if let Some(v) = el.attr(name) {
                stanza::set_attr(&mut head, name, v);
            }
        }
        head
    }

    /// The request as a tree again. It was read within the limits, and what minidom
    /// writes reads back the same.
    fn element(&self) -> Option<Element> {
        let limits = crate::inbound::Limits {
            max_bytes: self.read_limit,
            max_depth: usize::MAX,
            max_nodes: crate::inbound::MAX_NODES,
        };
        match crate::inbound::read_one(self.xml.as_bytes(), limits)? {
            crate::inbound::Inbound::Element(el) => Some(el),
            crate::inbound::Inbound::Oversized(_) => None,
        }
    }
}

impl Proxy {
    /// The next stanza to send that is not the direct answer to an input, always in
    /// `transmit`, with what it is: a held request forwarded (a resource became known:
    /// [`Verdict::Forwarded`]) or refused (its time ran out, or it cannot be forwarded:
    /// [`Verdict::Refused`]), both of [`Stanza::Iq`]; or a probe ([`Verdict::Probe`], of
    /// [`Stanza::Presence`]). A held request whose refusal is not sent (its sender's error
    /// budget is spent) leaves no outcome. Take them all after every [`Proxy::handle`] and
    /// [`Proxy::handle_timeout`]. Held requests are released here one at a time, so that at
    /// most one of them is a tree at once.
    pub fn poll_transmit(&mut self, clock: Clock, rng: &mut dyn Random) -> Option<Outcome> {
        loop {
            if let Some(out) = self.transmit.pop_front() {
                return Some(out);
            }
            if !self.resources.any_eligible() {
                return None;
            }
            // Held for the probe round: they wait for it to end, or for their own time.
            if self.round_pending(clock.mono_ms)
                && self
                    .held
                    .front()
                    .is_some_and(|h| h.until_ms > clock.mono_ms)
            {
                return None;
            }
            let h = self.pop_held()?;
            let resource = self
                .resources
                .pick(bare(&h.from), rng)
                .map(str::to_owned)
                .expect("a resource is eligible");
            let Some(el) = h.element() else {
                // Written by minidom, read by rxml: a namespace binding the writer cannot
                // reproduce could make it fail. Refused, not lost.
                debug!(id = h.head.attr("id"), "held request does not read back");
                self.refuse_one_held(h, clock);
                continue;
            };
            debug!(id = el.attr("id"), "held request released");
            let stanza = Stanza::of(el.name());
            let out = self.forward(el, &h.from, &h.to, &resource, clock, rng);
            if out.transmit.is_some() {
                return Some(Outcome { stanza, ..out });
            }
        }
    }

    /// When [`Proxy::handle_timeout`] is next due (monotonic milliseconds), if ever: the
    /// first held request's time, the end of a probe round, the next probe while either
    /// waits.
    pub fn poll_timeout(&self) -> Option<u64> {
        let held = self.held.front().map(|h| h.until_ms);
        if held.is_none() && self.learning_until_ms.is_none() {
            return None;
        }
        let probe = self.next_probe_ms();
        [held, self.learning_until_ms, Some(probe)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Time passed: held requests whose time ran out are refused (or released, once a
    /// resource is known: [`Proxy::poll_transmit`]), a probe round that is over ends, and the
    /// target is probed again while requests wait or a round is under way.
    pub fn handle_timeout(&mut self, clock: Clock) {
        self.settle_held(clock);
        if self.learning_until_ms.is_some_and(|t| t <= clock.mono_ms) {
            debug!("probe round over");
            self.learning_until_ms = None;
        }
        if (!self.held.is_empty() || self.learning_until_ms.is_some())
            && self.next_probe_ms() <= clock.mono_ms
            && let Some(p) = self.probe_due(clock.mono_ms, HOLD_PROBE_GAP_MS)
        {
            self.transmit.push_back(Outcome::probe(p));
        }
    }

    /// A probe round starts now (its first probe is sent by the caller): see [`LEARN_MS`].
    pub(super) fn learn(&mut self, clock: Clock) {
        if self.settings.learn_ms == 0 {
            return;
        }
        self.learning_since_ms = clock.mono_ms;
        self.learning_until_ms = Some(clock.mono_ms + self.settings.learn_ms);
    }

    /// When the next probe is due while requests are held or a round is under way: a gap
    /// after the last probe the core sent, and after the one the round started with (sent
    /// by the caller of [`Proxy::learn`], so not in `last_probe_ms`, which says when the core
    /// may answer a refusal with a probe at once).
    fn next_probe_ms(&self) -> u64 {
        let last = self.last_probe_ms.map_or(0, |t| t + HOLD_PROBE_GAP_MS);
        match self.learning_until_ms {
            Some(_) => last.max(self.learning_since_ms + HOLD_PROBE_GAP_MS),
            None => last,
        }
    }

    /// Whether a request's pick waits for the probe round under way: only while one is, only
    /// where the pick depends on every resource being known (`sticky`, `priority`; a `random`
    /// pick is as good among fewer), and only where requests may be held at all.
    pub(super) fn round_pending(&self, now_ms: u64) -> bool {
        self.learning_until_ms.is_some_and(|t| now_ms < t)
            && self.settings.hold_ms > 0
            && self.settings.selection.balance != super::Balance::Random
    }

    /// How many requests wait for a resource.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The stream is about to close: every held request leaves now (queued for
    /// [`Proxy::poll_transmit`]) rather than being lost with the stream — refused, or, if a
    /// resource is known (they waited for the probe round), forwarded to the pick of what is
    /// known.
    pub fn settle_held_at_close(&mut self, clock: Clock) {
        self.learning_until_ms = None;
        if self.resources.any_eligible() {
            return;
        }
        while let Some(h) = self.pop_held() {
            self.refuse_one_held(h, clock);
        }
    }

    /// The XML text of every request held, oldest first: what an in-place upgrade hands to
    /// the new process to read again (they are held there anew).
    pub fn held_xml(&self) -> impl Iterator<Item = &str> {
        self.held.iter().map(|h| h.xml.as_str())
    }

    pub(super) fn pop_held(&mut self) -> Option<Held> {
        let h = self.held.pop_front()?;
        self.held_bytes -= h.cost();
        Some(h)
    }

    pub(super) fn refuse_one_held(&mut self, h: Held, clock: Clock) {
        debug!(
            id = h.head.attr("id"),
            "held request refused: no resource became known"
        );
        let out = self.refuse(
            &h.head,
            &h.from,
            Condition::ServiceUnavailable,
            "the service is not available",
            clock,
        );
        // Not sent (the sender's error budget is spent): nothing to transmit, as before.
        if out.transmit.is_some() {
            self.transmit.push_back(Outcome {
                stanza: Stanza::of(h.head.name()),
                ..out
            });
        }
    }

    /// Refuses the held requests whose time ran out while no resource is known (once one
    /// is, [`Proxy::poll_transmit`] releases them).
    pub(super) fn settle_held(&mut self, clock: Clock) {
        if self.resources.any_eligible() {
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
    pub(super) fn probe_due(&mut self, now_ms: u64, gap_ms: u64) -> Option<Element> {
        if self.last_probe_ms.is_some_and(|t| now_ms < t + gap_ms) {
            return None;
        }
        self.last_probe_ms = Some(now_ms);
        Some(self.probe())
    }

    /// A request (checked and charged to its limits) arrived while no resource of the
    /// target is known: held for a while, with a probe, or refused.
    pub(super) fn no_resource(&mut self, el: Element, from: Jid, to: To, clock: Clock) -> Outcome {
        match self.hold(el, from, to, clock) {
            Ok(out) => out,
            Err((el, from, _)) => self.unavailable(&el, &from, clock),
        }
    }

    /// Holds a request (checked and charged to its limits) until a resource is known or the
    /// probe round under way ends, with a probe if one is due; or gives it back if holding is
    /// off or full.
    #[allow(clippy::result_large_err)]
    pub(super) fn hold(
        &mut self,
        el: Element,
        from: Jid,
        to: To,
        clock: Clock,
    ) -> Result<Outcome, (Element, Jid, To)> {
        if self.settings.hold_ms == 0 || self.held.len() >= self.settings.max_held {
            return Err((el, from, to));
        }
        let xml = String::from(&el);
        let read_limit = xml.len().max(crate::inbound::tree_strings(&el).div_ceil(2));
        let head = Held::head_of(&el);
        let cost = Held::cost_of(&xml, &head, &from, &to);
        if self.held_bytes + cost > MAX_HELD_BYTES {
            return Err((el, from, to));
        }
        if self.resources.any_eligible() {
            debug!(
                id = el.attr("id"),
                "request held for the probe round under way"
            );
        } else {
            debug!(
                id = el.attr("id"),
                "no resource known: request held while the target is probed"
            );
        }
        drop(el);
        self.held_bytes += cost;
        self.held.push_back(Held {
            xml,
            read_limit,
            head,
            from,
            to,
            until_ms: clock.mono_ms + self.settings.hold_ms,
        });
        Ok(Outcome::maybe(
            self.probe_due(clock.mono_ms, HOLD_PROBE_GAP_MS),
            Verdict::Held,
        ))
    }

    /// `service-unavailable` for a stanza no resource can take now (a message, which is not
    /// held, or a request that cannot be), with a probe: maybe this instance just
    /// (re)connected and the target's presence went to another one. Ask now rather than at
    /// the next periodic probe.
    pub(super) fn unavailable(&mut self, el: &Element, from: &Jid, clock: Clock) -> Outcome {
        if let Some(p) = self.probe_due(clock.mono_ms, REFUSE_PROBE_GAP_MS) {
            self.transmit.push_back(Outcome::probe(p));
        }
        self.refuse(
            el,
            from,
            Condition::ServiceUnavailable,
            "the service is not available",
            clock,
        )
    }
}
