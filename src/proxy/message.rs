//! Messages to the component.

use xmpp_parsers::minidom::Element;

use super::{Clock, Outcome, Proxy, dropped};
use crate::stanza::Condition;

impl Proxy {
    pub(super) fn message(&mut self, el: &Element, clock: Clock) -> Outcome {
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
}
