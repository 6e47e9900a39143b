//! What the implementing client sends to a token address — a reply to a forwarded request,
//! or a message in a conversation — reversed by decrypting the token alone.

use jid::Jid;
use tracing::{debug, trace};
use xmpp_parsers::minidom::Element;

use super::{Clock, DropReason, Outbound, Outcome, Proxy, To, Verdict, dropped};
use crate::stanza;
use crate::token::{self, Binding, Opened};

/// Why a token address led nowhere.
pub(super) enum NotOpened {
    /// The token was rejected.
    Token(token::Rejected),
    /// It opened, to nothing jat-proxy may send to.
    Other(DropReason),
}

impl NotOpened {
    /// The outcome of a stanza dropped for it.
    pub(super) fn dropped(self) -> Outcome {
        match self {
            NotOpened::Token(r) => Outcome::maybe(None, Verdict::TokenRejected(r)),
            NotOpened::Other(why) => dropped(why),
        }
    }

    /// Why, as a reason a stanza is dropped for (a rejected token: [`DropReason::TokenRejected`]).
    pub(super) fn why(&self) -> DropReason {
        match self {
            NotOpened::Token(_) => DropReason::TokenRejected,
            NotOpened::Other(why) => *why,
        }
    }
}

/// A token that opened, and where the reversed stanza goes and comes from.
pub(super) struct Reversal {
    pub(super) sender: String,
    pub(super) reply_from: String,
    pub(super) kind: token::Kind,
    pub(super) issued_ms: u64,
    /// The key of the token's reply budget: its last characters, which encode (part of) its
    /// authentication tag, unique to the token.
    pub(super) budget: String,
}

/// Characters of a token that key its reply budget (a 16-byte tag is 22 in base64url).
const BUDGET_KEY_CHARS: usize = 22;

impl Proxy {
    /// An IQ result or error of the implementing client.
    pub(super) fn reply(&mut self, el: Element, from: &Jid, to: &To, clock: Clock) -> Outcome {
        if !self.is_target(from) {
            if self.settings.outbound != Outbound::None {
                return self.outbound_reply(el, from, clock);
            }
            debug!("reply from outside the target account dropped");
            return dropped(DropReason::ReplyFromOutside);
        }
        // The revealed form (`[proxy] sender = "revealed"`): to `proxy.example/SENDER`, with
        // the id `ID.TOKEN` it was forwarded with; decided by the id, whose token opens only
        // if it was issued in that form (bound to `revealed_component`), so a reply naming a
        // guessed address in another mode learns nothing. Reversed in every mode, so that
        // changing the mode loses nothing in flight.
        let (reversal, restore) = if let Some(found) = self.revealed(to, &el, clock) {
            let (reversal, original) = match found {
                Ok(r) => r,
                Err(why) => return dropped(why),
            };
            (reversal, Some(original))
        } else {
            let token = match token_of(to) {
                Ok(t) => t,
                Err(why) => {
                    trace!(id = el.attr("id"), why = why.label(), "reply dropped");
                    return dropped(why);
                }
            };
            let Some(id) = el.attr("id") else {
                return dropped(DropReason::ReplyWithoutId);
            };
            let binding = Binding::iq(&self.settings.component, id);
            match self.open_token(&[binding], token, self.settings.token_lifetime, clock) {
                Ok(r) => (r, None),
                Err(not) => return not.dropped(),
            }
        };
        let mut el = el;
        if let Some(original) = restore {
            stanza::set_attr(&mut el, "id", original);
        }
        // A genuine reply also says whether its resource is online: a result proves it is;
        // the server's bounce of a request to a resource that went away
        // (service-unavailable from that full JID) proves it is not — this instance may not
        // have seen the unavailable presence, which went to another instance.
        if let Some(res) = from.resource() {
            match el.attr("type") {
                Some("result") => {
                    self.resources.answered(res.as_str());
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
        let issued_ms = reversal.issued_ms;
        let mut out = self.deliver(el, reversal, clock);
        if out.verdict == Verdict::Reversed {
            out.reply_latency_ms = Some(clock.unix_ms.saturating_sub(issued_ms));
        }
        out
    }

    /// A reply of the revealed form: its id is `ID.TOKEN` and TOKEN opens as a revealed token
    /// bound to ID. Then `Ok` with the reversal and ID if the token names the sender the
    /// address does (its resource, byte for byte), else why it is dropped; `None` if it is
    /// not one (the other forms are tried).
    fn revealed(
        &self,
        to: &To,
        el: &Element,
        clock: Clock,
    ) -> Option<Result<(Reversal, String), DropReason>> {
        let (original, token) = super::request::split_revealed_id(el.attr("id")?)?;
        let binding = Binding::iq(&self.revealed_component, original);
        let life = self.settings.token_lifetime;
        // Quietly: most ids with a `.` are not of this form, and their replies are not dropped.
        let opened = token::open(&self.keys, binding, token, clock.unix_ms, life).ok()?;
        let reversal = match self.reversal(opened, token) {
            Ok(r) => r,
            Err(not) => return Some(Err(not.why())),
        };
        let addressed = match to {
            To::Token(r) => Some(r.as_str()),
            To::Other(j) if j.node().is_none() => j.resource().map(|r| r.as_str()),
            _ => None,
        };
        // The token authenticates the id, not the address: it must name the sender the
        // address does, or a genuine id could be replayed to anybody.
        if addressed != Some(reversal.sender.as_str()) {
            debug!(
                id = el.attr("id"),
                "reply dropped: its token names another sender"
            );
            return Some(Err(DropReason::RevealedMismatch));
        }
        Some(Ok((reversal, original.to_owned())))
    }

    /// Opens `token` for the first of `bindings` it opens for; on success, where the reversed
    /// stanza goes and comes from; else why the stanza is dropped (the first binding's reason).
    pub(super) fn open_token(
        &self,
        bindings: &[Binding<'_>],
        token: &str,
        lifetime: u64,
        clock: Clock,
    ) -> Result<Reversal, NotOpened> {
        let mut first = None;
        for &binding in bindings {
            match token::open(&self.keys, binding, token, clock.unix_ms, lifetime) {
                Ok(opened) => return self.reversal(opened, token),
                Err(reason) => {
                    first.get_or_insert((binding, reason));
                }
            }
        }
        let (binding, reason) = first.expect("at least one binding");
        match binding {
            Binding::Iq { id, .. } => debug!(id, %reason, "reply dropped"),
            _ => debug!(%reason, "message dropped"),
        }
        Err(NotOpened::Token(reason))
    }

    /// Where the stanza of an opened `token` goes and comes from, or why it may not.
    fn reversal(&self, opened: Opened, token: &str) -> Result<Reversal, NotOpened> {
        let Ok(sender) = Jid::new(&opened.sender) else {
            return Err(NotOpened::Other(DropReason::TokenInvalidAddress));
        };
        if sender.domain().as_str() == self.settings.component {
            return Err(NotOpened::Other(DropReason::TokenToComponent));
        }
        // Only senders other than the target are ever sealed; a token naming the target would
        // loop its stanza back to it.
        if self.is_target(&sender) {
            return Err(NotOpened::Other(DropReason::TokenNamesTarget));
        }
        // The answer comes from where the stanza went: an address at the component, never
        // anything else, whatever a token may hold.
        let reply_from = match opened.original_to.as_deref() {
            None => self.settings.component.clone(),
            Some(a) => match Jid::new(a) {
                Ok(j) if j.domain().as_str() == self.settings.component => j.to_string(),
                _ => {
                    debug!("token's original address is not at the component");
                    return Err(NotOpened::Other(DropReason::TokenOriginalNotAtComponent));
                }
            },
        };
        trace!(key = opened.key_id, "token opened");
        Ok(Reversal {
            sender: opened.sender,
            reply_from,
            kind: opened.kind,
            issued_ms: opened.issued_ms,
            budget: token[token.len().saturating_sub(BUDGET_KEY_CHARS)..].to_owned(),
        })
    }

    /// Sends `el` back to the sender a token named, within the token's reply budget: the
    /// implementing client may replay a genuine stanza as often as it likes within the
    /// token's lifetime, bounded per token (not per recipient: see `src/rate.rs`).
    pub(super) fn deliver(&mut self, mut el: Element, r: Reversal, clock: Clock) -> Outcome {
        let iq = el.name() == "iq";
        if !self.limiter.reply(&r.budget, clock.mono_ms) {
            if iq {
                debug!(
                    id = el.attr("id"),
                    "reply dropped: over the recipient's rate limit"
                );
            } else {
                debug!(
                    id = el.attr("id"),
                    "message dropped: over the recipient's rate limit"
                );
            }
            return dropped(DropReason::OverReplyRate);
        }
        if iq {
            debug!(id = el.attr("id"), sender = %r.sender, "reply reversed");
        } else {
            debug!(id = el.attr("id"), sender = %r.sender, "message reversed");
        }
        stanza::set_attr(&mut el, "from", r.reply_from);
        stanza::set_attr(&mut el, "to", r.sender);
        Outcome::send(el, Verdict::Reversed)
    }
}

/// The token of a token address (`domain/TOKEN`), or why there is none.
pub(super) fn token_of(to: &To) -> Result<&str, DropReason> {
    match to {
        To::Token(t) => Ok(t.as_str()),
        To::Other(j) if j.node().is_none() && j.resource().is_some() => Ok(
            super::request::without_pseudonym(j.resource().expect("checked").as_str()),
        ),
        To::Other(_) => Err(DropReason::NotATokenAddress),
        To::Bare => Err(DropReason::BareComponentAddress),
    }
}
