//! Messages, in both directions (`[proxy] messages`).
//!
//! With `messages = "forward"`, a message to any address at the component goes to a resource
//! of the implementing client chosen for its sender's account — sticky under the default
//! `balance = "random"` too, so that a conversation stays on one resource — from
//! `component/TOKEN`, a message token (bound to messages and the component, its own lifetime).
//! The implementing client's messages to that address go back to the sender, from the
//! address the sender wrote to. Everything inside a message passes untouched.
//!
//! Nothing is kept, so an error about a message jat-proxy delivered to a sender (their
//! server's bounce) cannot be routed back to the implementing client, and is dropped; errors
//! the implementing client sends to a token address are reversed like IQ errors. Nothing
//! ever answers an error with an error. A message that arrives while no resource is known is
//! refused with `service-unavailable` at once (requests are held a moment; messages are not).

use jid::Jid;
use tracing::{debug, trace};
use xmpp_parsers::minidom::Element;

use super::reply::token_of;
use super::{Clock, DropReason, Outbound, Outcome, Proxy, To, bare, dropped};
use crate::random::Random;
use crate::stanza::Condition;
use crate::token::Binding;

/// What happens to messages (`[proxy] messages`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Messages {
    /// Refused with `feature-not-implemented`, both ways (mod_client_proxy's behaviour).
    #[default]
    Refuse,
    /// Forwarded to the implementing client and reversed by token.
    Forward,
}

impl Proxy {
    pub(super) fn message(&mut self, el: Element, clock: Clock, rng: &mut dyn Random) -> Outcome {
        let Some((from, to)) = self.addresses(el.attr("from"), el.attr("to")) else {
            return dropped(DropReason::MessageAddresses);
        };
        let error = el.attr("type") == Some("error");
        // A message the implementing client starts (`outbound`) is not one it is sent:
        // `messages` does not govern it.
        if self.is_target(&from)
            && self.settings.outbound != Outbound::None
            && !error
            && !matches!(to, To::Bare)
        {
            let raw_to = el.attr("to").unwrap_or_default().to_owned();
            return self.outbound_message(el, &to, &raw_to, clock);
        }
        if self.settings.messages == Messages::Refuse {
            return if error {
                dropped(DropReason::MessageError)
            } else {
                self.refuse_message(&el, &from, "this address does not accept messages", clock)
            };
        }
        if self.is_target(&from) {
            return self.message_from_target(el, &from, &to, clock);
        }
        if error {
            // A bounce of a message delivered to a sender: nothing says which resource of the
            // implementing client wrote it.
            trace!("message error from outside the target account dropped");
            return dropped(DropReason::MessageError);
        }
        if let Some(out) = self.admit(&el, &from, clock) {
            return out;
        }
        let Some(resource) = self
            .resources
            .pick_conversation(bare(&from), rng)
            .map(str::to_owned)
        else {
            // Not held: a message has no id to tell held ones apart by, and a conversation's
            // sender can write again.
            return self.unavailable(&el, &from, clock);
        };
        self.forward(el, &from, &to, &resource, clock, rng)
    }

    /// A message of the implementing client: to a message token, reversed to the sender it
    /// names; anywhere else at the component, refused (errors dropped).
    fn message_from_target(&mut self, el: Element, from: &Jid, to: &To, clock: Clock) -> Outcome {
        let token = match token_of(to) {
            Ok(t) => t,
            Err(why) => {
                if el.attr("type") == Some("error") {
                    return dropped(DropReason::MessageError);
                }
                debug!(
                    why = why.label(),
                    "message of the implementing client refused"
                );
                return self.refuse_message(
                    &el,
                    from,
                    "messages go to the address of a conversation (component/TOKEN)",
                    clock,
                );
            }
        };
        let binding = Binding::message(&self.settings.component);
        match self.open_token(
            &[binding],
            token,
            self.settings.message_token_lifetime,
            clock,
        ) {
            Ok(reversal) => self.deliver(el, reversal, clock),
            Err(not) => not.dropped(),
        }
    }

    /// `feature-not-implemented` for a message, except a headline (RFC 6121 §5.2.2: never
    /// answered with an error).
    fn refuse_message(&mut self, el: &Element, from: &Jid, text: &str, clock: Clock) -> Outcome {
        if el.attr("type") == Some("headline") {
            return dropped(DropReason::Headline);
        }
        // RFC 6121 §5.2.2: a message of unknown type is treated as 'normal'.
        self.refuse(el, from, Condition::FeatureNotImplemented, text, clock)
    }
}
