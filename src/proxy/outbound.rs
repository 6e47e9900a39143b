//! Stanzas the implementing client starts (`[proxy] outbound`), and the replies to its IQs.
//!
//! * `known`: an IQ get/set or a message to `component/TOKEN`, any token the implementing
//!   client was given (an IQ token too: no id is compared for a new stanza), goes to the
//!   sender the token names, from the address that sender wrote to. The implementing client
//!   never learns who that is.
//! * `any`: also to `ESCAPED@component`, ESCAPED a JID escaped as XEP-0106 says, from the
//!   bare component.
//!
//! The id of an IQ sent so is a route (see [`crate::token`]): the implementing client's
//! resource, the address it wrote to and its own id, sealed and bound to the peer the IQ went
//! to. The peer's result or error is routed back by opening it: no table. A forged, expired
//! or foreign id, or one offered by another peer, goes nowhere.

use jid::Jid;
use tracing::debug;
use xmpp_parsers::minidom::Element;

use super::reply::token_of;
use super::{Clock, DropReason, Outcome, Proxy, To, Verdict, bare, dropped};
use crate::random::Random;
use crate::stanza::{self, Condition};
use crate::token::{self, Binding, Kind, Route, SALT_LEN};

/// Which stanzas the implementing client may start (`[proxy] outbound`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outbound {
    /// None: its requests are refused with `feature-not-implemented`, its messages reach only
    /// a message token (mod_client_proxy's behaviour, and the default).
    #[default]
    None,
    /// To the sender of any token it was given, within the token's lifetime.
    Known,
    /// Also to any address, written as `ESCAPED@component` (XEP-0106).
    Any,
}

/// Who a stanza the implementing client starts goes to, and from which address.
pub(super) struct Peer {
    pub(super) to: String,
    pub(super) from: String,
}

impl Proxy {
    /// The peer that `to` (as written: `raw_to`) names for a stanza the implementing client
    /// starts, or why none. The peer must pass `[policy]` as a sender would.
    pub(super) fn peer_of(&self, to: &To, raw_to: &str, clock: Clock) -> Result<Peer, DropReason> {
        let peer = self.peer_named(to, raw_to, clock)?;
        let Ok(jid) = Jid::new(&peer.to) else {
            return Err(DropReason::NotAnAddress);
        };
        if !self.settings.policy.permits(&jid) {
            return Err(DropReason::PeerRefusedByPolicy);
        }
        Ok(peer)
    }

    fn peer_named(&self, to: &To, raw_to: &str, clock: Clock) -> Result<Peer, DropReason> {
        if let To::Other(j) = to
            && j.node().is_some()
        {
            if self.settings.outbound != Outbound::Any {
                return Err(DropReason::EscapedNeedsAny);
            }
            if j.resource().is_some() {
                return Err(DropReason::EscapedWithResource);
            }
            // The node as written, before JID preparation case-folds it (a resource is
            // case-sensitive). The server may have folded it already: see docs/behaviour.md.
            let node = raw_to.split_once('@').map_or("", |(n, _)| n);
            let peer = unescape(node)
                .and_then(|s| Jid::new(&s).ok())
                .ok_or(DropReason::NotEscaped)?;
            if peer.domain().as_str() == self.settings.component || self.is_target(&peer) {
                return Err(DropReason::EscapedInside);
            }
            return Ok(Peer {
                to: peer.to_string(),
                from: self.settings.component.clone(),
            });
        }
        let token = token_of(to)?;
        let iq_life = self.settings.token_lifetime;
        let lifetime = iq_life.max(self.settings.message_token_lifetime);
        let binding = Binding::Peer {
            component: &self.settings.component,
        };
        // A token of the revealed form (an IQ's, from its id) too: its sender is no secret
        // from the implementing client, which saw the address.
        let revealed = Binding::Peer {
            component: &self.revealed_component,
        };
        let reversal = self
            .open_token(&[binding, revealed], token, lifetime, clock)
            .map_err(|not| not.why())?;
        // Opened under the longer lifetime; each kind then lives its own.
        let own = match reversal.kind {
            Kind::Iq => iq_life,
            _ => self.settings.message_token_lifetime,
        };
        if clock.unix_ms >= reversal.issued_ms.saturating_add(own * 1000) {
            debug!("outbound stanza dropped: token expired");
            return Err(DropReason::TokenRejected);
        }
        Ok(Peer {
            to: reversal.sender,
            from: reversal.reply_from,
        })
    }

    /// An IQ get/set of the implementing client.
    pub(super) fn outbound_request(
        &mut self,
        mut el: Element,
        from: &Jid,
        to: &To,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> Outcome {
        if self.settings.outbound == Outbound::None {
            return self.refuse(
                &el,
                from,
                Condition::FeatureNotImplemented,
                "the implementing client cannot send requests through the proxy",
                clock,
            );
        }
        // One budget for every stanza the implementing client starts, whoever it names:
        // a refusal tells it its own rate, nothing about recipients.
        if !self.limiter.outbound(clock.mono_ms) {
            return self.refuse(
                &el,
                from,
                Condition::ResourceConstraint,
                "the implementing client's outbound rate limit is reached; try again later",
                clock,
            );
        }
        let Some(id) = el.attr("id").map(str::to_owned) else {
            return self.refuse(&el, from, Condition::BadRequest, "IQ without id", clock);
        };
        if stanza::child_count(&el) != 1 {
            return self.refuse(
                &el,
                from,
                Condition::BadRequest,
                "a get or set IQ must have exactly one payload element",
                clock,
            );
        }
        let raw_to = el.attr("to").unwrap_or_default().to_owned();
        let peer = match self.peer_of(to, &raw_to, clock) {
            Ok(p) => p,
            Err(why) => {
                debug!(id, why = why.label(), "outbound request refused");
                return self.refuse(
                    &el,
                    from,
                    Condition::ItemNotFound,
                    "no such address, or its time is over",
                    clock,
                );
            }
        };
        // The reply comes from the address exactly as the implementing client wrote it.
        let route = Route {
            client: from.to_string(),
            client_to: raw_to,
            id,
        };
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt);
        let sealed = match token::seal_route(
            &self.keys,
            &self.settings.component,
            &peer.to,
            &route,
            clock.unix_ms,
            salt,
        ) {
            Ok(s) => s,
            Err(_) => {
                return self.refuse(
                    &el,
                    from,
                    Condition::NotAcceptable,
                    "the request's id and addresses are too long to be routed",
                    clock,
                );
            }
        };
        debug!(id = route.id, "outbound request sent");
        stanza::set_attr(&mut el, "id", sealed);
        stanza::set_attr(&mut el, "from", peer.from);
        stanza::set_attr(&mut el, "to", peer.to);
        Outcome::send(el, Verdict::Outbound)
    }

    /// A message of the implementing client to a token or escaped address, with outbound
    /// stanzas allowed.
    pub(super) fn outbound_message(
        &mut self,
        mut el: Element,
        to: &To,
        raw_to: &str,
        clock: Clock,
    ) -> Outcome {
        // The budget of every stanza the implementing client starts (see outbound_request).
        if !self.limiter.outbound(clock.mono_ms) {
            debug!("outbound message dropped: over the outbound rate limit");
            return dropped(DropReason::OverOutboundRate);
        }
        let peer = match self.peer_of(to, raw_to, clock) {
            Ok(p) => p,
            Err(why) => {
                debug!(why = why.label(), "outbound message dropped");
                return dropped(why);
            }
        };
        debug!(id = el.attr("id"), "outbound message sent");
        stanza::set_attr(&mut el, "from", peer.from);
        stanza::set_attr(&mut el, "to", peer.to);
        Outcome::send(el, Verdict::Outbound)
    }

    /// A result or error from outside the target account: the reply to an IQ the
    /// implementing client started, if its id is a route that opens for this peer.
    pub(super) fn outbound_reply(&mut self, mut el: Element, from: &Jid, clock: Clock) -> Outcome {
        let Some(id) = el.attr("id") else {
            return dropped(DropReason::ReplyWithoutId);
        };
        if !self.settings.policy.permits(from) {
            return dropped(DropReason::ReplyFromRefusedPeer);
        }
        // Charged to the peer's routed-reply budget before any key derivation: a flood of
        // forged routes, or replays of a genuine reply, is bounded per account. Not to its
        // request budget or its domain's, which others share: a peer answering each of the
        // implementing client's requests once never runs it dry (src/rate.rs), so no drop
        // here tells the implementing client which tokens or addresses name one account.
        if !self.limiter.routed(bare(from), clock.mono_ms) {
            debug!("reply from outside the target account dropped: over the peer's rate limit");
            return dropped(DropReason::OverRoutedRate);
        }
        let route = match token::open_route(
            &self.keys,
            &self.settings.component,
            from.as_str(),
            id,
            clock.unix_ms,
            self.settings.token_lifetime,
        ) {
            Ok(r) => r,
            Err(reason) => {
                debug!(%reason, "reply from outside the target account dropped");
                return dropped(DropReason::ReplyFromOutside);
            }
        };
        let (Ok(client), Ok(client_to)) = (Jid::new(&route.client), Jid::new(&route.client_to))
        else {
            return dropped(DropReason::RouteInvalidAddress);
        };
        if !self.is_target(&client) || client_to.domain().as_str() != self.settings.component {
            return dropped(DropReason::RouteOutside);
        }
        debug!(id = route.id, "outbound reply routed");
        stanza::set_attr(&mut el, "id", route.id);
        stanza::set_attr(&mut el, "from", route.client_to);
        stanza::set_attr(&mut el, "to", route.client);
        Outcome::send(el, Verdict::Routed)
    }
}

/// XEP-0106: `\20` space, `\22` `"`, `\26` `&`, `\27` `'`, `\2f` `/`, `\3a` `:`, `\3c` `<`,
/// `\3e` `>`, `\40` `@`, `\5c` `\`; any other backslash stays as it is. `None` if nothing
/// readable remains.
pub fn unescape(node: &str) -> Option<String> {
    let mut out = String::with_capacity(node.len());
    let mut rest = node;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3).map(str::to_ascii_lowercase);
        let ch = match code.as_deref() {
            Some("20") => Some(' '),
            Some("22") => Some('"'),
            Some("26") => Some('&'),
            Some("27") => Some('\''),
            Some("2f") => Some('/'),
            Some("3a") => Some(':'),
            Some("3c") => Some('<'),
            Some("3e") => Some('>'),
            Some("40") => Some('@'),
            Some("5c") => Some('\\'),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[i + 3..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}
