//! The target's presence: the only state the proxy keeps.

use tracing::{debug, warn};
use xmpp_parsers::minidom::Element;

use super::{DropReason, Learnt, Outcome, Proxy, Verdict, dropped};
use crate::stanza;

impl Proxy {
    pub(super) fn presence(&mut self, el: &Element) -> Outcome {
        let Some((from, _)) = self.addresses(el.attr("from"), el.attr("to")) else {
            return dropped(DropReason::PresenceAddresses);
        };
        if !self.is_target(&from) {
            return dropped(DropReason::PresenceFromOutside);
        }
        let resource = from.resource().map(|r| r.as_str());
        let component = &self.settings.component;
        let answer = |t: Option<&str>| Some(stanza::presence(t, component, &self.target));
        let out = match (el.attr("type"), resource) {
            (None, Some(r)) => {
                let priority = priority(el);
                match self.resources.available(r, priority) {
                    Learnt::Tracked => {
                        debug!(
                            resource = r,
                            priority, "implementing client resource available"
                        );
                    }
                    Learnt::Excluded => {
                        debug!(
                            resource = r,
                            "resource ignored: matches no `resources` pattern"
                        );
                    }
                    Learnt::Full => warn!(
                        max = self.settings.max_resources,
                        "too many resources of the implementing client; ignoring one"
                    ),
                }
                None
            }
            (Some("unavailable") | Some("error"), Some(r)) => {
                debug!(resource = r, "implementing client resource unavailable");
                self.resources.unavailable(r);
                None
            }
            (Some("unsubscribed"), None) if self.probed => {
                // Most likely the answer to a probe (Prosody's, to a non-subscriber), which
                // cancelled the subscription request that was still pending: asked again,
                // once per probe sent, so that it waits for the implementing client however
                // often the target is probed. (One that denies every request gets one
                // request per probe, never a loop.)
                debug!("implementing client unsubscribed: asking for the subscription again");
                self.probed = false;
                self.resources.clear();
                answer(Some("subscribe"))
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
        Outcome::maybe(out, Verdict::Presence)
    }
}

/// The presence's `<priority/>` (RFC 6121 §4.7.2.3): an integer from -128 to 127 (one out
/// of range is clamped into it, keeping its sign), 0 when absent or not an integer.
fn priority(el: &Element) -> i8 {
    el.get_child("priority", stanza::NS)
        .and_then(|p| p.text().trim().parse::<i64>().ok())
        .map_or(0, |p| p.clamp(-128, 127) as i8)
}
