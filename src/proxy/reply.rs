//! A reply of the implementing client to a forwarded request, reversed by its token.

use jid::Jid;
use tracing::{debug, trace};
use xmpp_parsers::minidom::Element;

use super::{Clock, Outcome, Proxy, To, Verdict, bare, dropped};
use crate::stanza;
use crate::token::{self, Binding};

impl Proxy {
    pub(super) fn reply(&mut self, mut el: Element, from: &Jid, to: &To, clock: Clock) -> Outcome {
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
                return dropped("token rejected");
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
        // The implementing client may replay a genuine reply as often as it likes within the
        // token's lifetime: bounded per recipient account.
        if !self.limiter.reply(bare(&sender), clock.mono_ms) {
            debug!(id, "reply dropped: over the recipient's rate limit");
            return dropped("over the recipient's reply rate limit");
        }
        debug!(id, sender = %opened.sender, key = opened.key_id, "reply reversed");
        stanza::set_attr(&mut el, "from", reply_from);
        stanza::set_attr(&mut el, "to", opened.sender);
        Outcome::send(el, Verdict::Reversed)
    }
}
