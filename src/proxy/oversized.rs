//! Stanzas too large to read whole: answered from what the reader kept of their start.

use tracing::debug;

use super::{Clock, DropReason, Outcome, Proxy, Verdict, bare, dropped, over_error_budget};
use crate::inbound::Oversized;
use crate::stanza::{self, Condition, NS};

impl Proxy {
    pub(super) fn oversized(&mut self, o: Oversized, clock: Clock) -> Outcome {
        debug!(name = %o.name, exceeded = %o.exceeded, "oversized stanza");
        if o.ns != NS {
            return dropped(DropReason::OversizedElement);
        }
        let Some((from, to)) = self.addresses(o.from.as_deref(), o.to.as_deref()) else {
            return dropped(DropReason::OversizedAddresses);
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
            Outcome::send(el, Verdict::Refused(Condition::PolicyViolation))
        };
        if o.name == "iq" && o.id.is_none() {
            // An error without the request's id answers nothing (its id alone may have been
            // what was too long).
            return dropped(DropReason::OversizedIqWithoutId);
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
                    Outcome {
                        transmit: Some(out),
                        ..
                    } => Outcome::send(out, Verdict::Refused(Condition::PolicyViolation)),
                    dropped => dropped,
                }
            }
            ("message", t) if t != Some("error") => error_to_sender("message"),
            _ => dropped(DropReason::OversizedStanza),
        }
    }
}
