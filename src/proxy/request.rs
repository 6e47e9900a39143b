//! A request to the component, forwarded to a resource of the implementing client with the
//! sender sealed into the token it comes from.

use base64::Engine as _;
use jid::Jid;
use ring::hmac;
use tracing::debug;
use xmpp_parsers::minidom::Element;

use super::{Clock, Outcome, Proxy, To, Verdict, bare, join};
use crate::random::Random;
use crate::rate::Over;
use crate::stanza::{self, Condition};
use crate::token::{self, Binding, Contents, SALT_LEN};

/// What the implementing client learns of who sent a request or message (`[proxy] sender`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sender {
    /// Nothing: the resource it sees is a token, different for every stanza.
    #[default]
    Sealed,
    /// A stable pseudonym of the sender's account before the token
    /// (`proxy.example/PSEUDONYM.TOKEN`, see [`pseudonym`]): one account's stanzas can be told
    /// apart from another's, not who the account is.
    Pseudonym,
    /// The sender's full JID in clear as the resource (`proxy.example/user@example/abc`), as
    /// mod_client_proxy writes it, for services that authorize by it (Jitsi's jicofo). The
    /// return path stays authenticated: a request's id becomes `ID.TOKEN` (see
    /// [`revealed_id`]); only a reply with such an id, to the address its token names, is
    /// reversed, with the original id. Messages keep the sealed form.
    Revealed,
}

/// The id a request is forwarded with in the revealed mode: the original id, a `.`, and the
/// token bound to that id (a token holds no `.`).
pub fn revealed_id(id: &str, token: &str) -> String {
    let mut s = String::with_capacity(id.len() + 1 + token.len());
    s.push_str(id);
    s.push('.');
    s.push_str(token);
    s
}

/// An id of the revealed form split into the original id and the token, if it is one.
pub(super) fn split_revealed_id(id: &str) -> Option<(&str, &str)> {
    let (original, token) = id.rsplit_once('.')?;
    (!token.is_empty()
        && token.len() <= token::MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then_some((original, token))
}

/// Characters of a pseudonym: 12 bytes (96 bits) of HMAC-SHA256 in base64url.
pub const PSEUDONYM_LEN: usize = 16;

/// The pseudonym of the account `bare` under `key` ([`crate::keys::KeySet::pseudonym_key`]):
/// the first 12 bytes of HMAC-SHA256(key, bare JID), in base64url without padding.
pub fn pseudonym(key: &hmac::Key, bare: &str) -> String {
    let tag = hmac::sign(key, bare.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..PSEUDONYM_LEN / 4 * 3])
}

/// The token of a token resource: the resource itself, or what follows a pseudonym and a
/// `.` (`PSEUDONYM.TOKEN`). The pseudonym is not checked: the token alone, authenticated,
/// decides where a stanza goes, and replies to either form are reversed in every mode (so
/// that changing `sender` loses nothing in flight).
pub(super) fn without_pseudonym(resource: &str) -> &str {
    let b = resource.as_bytes();
    if b.len() > PSEUDONYM_LEN + 1
        && b[PSEUDONYM_LEN] == b'.'
        && b[..PSEUDONYM_LEN]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        &resource[PSEUDONYM_LEN + 1..]
    } else {
        resource
    }
}

impl Proxy {
    pub(super) fn request(
        &mut self,
        el: Element,
        from: Jid,
        to: To,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> Outcome {
        if self.is_target(&from) {
            return self.outbound_request(el, &from, &to, clock, rng);
        }
        if el.attr("id").is_none() {
            return self.refuse(&el, &from, Condition::BadRequest, "IQ without id", clock);
        }
        if stanza::child_count(&el) != 1 {
            return self.refuse(
                &el,
                &from,
                Condition::BadRequest,
                "a get or set IQ must have exactly one payload element",
                clock,
            );
        }
        if let Some(out) = self.admit(&el, &from, clock) {
            return out;
        }
        // While a probe round is under way, a pick that depends on every resource being
        // known waits for it (see `hold`); and a request never overtakes one held before it
        // (the round may have ended a moment before the timer that releases them).
        let (el, from, to) = if self.round_pending(clock.mono_ms) || !self.held.is_empty() {
            match self.hold(el, from, to, clock) {
                Ok(out) => return out,
                Err(back) => back,
            }
        } else {
            (el, from, to)
        };
        let Some(resource) = self.resources.pick(bare(&from), rng).map(str::to_owned) else {
            return self.no_resource(el, from, to, clock);
        };
        self.forward(el, &from, &to, &resource, clock, rng)
    }

    /// The checks every stanza a sender starts passes (a request, a message): the policy, then
    /// its rate limits, which it is charged to. `None` if admitted, else the refusal.
    pub(super) fn admit(&mut self, el: &Element, from: &Jid, clock: Clock) -> Option<Outcome> {
        let id = el.attr("id");
        if !self.settings.policy.permits(from) {
            debug!(id, "refused by policy");
            return Some(self.refuse(
                el,
                from,
                Condition::Forbidden,
                "you may not use this service",
                clock,
            ));
        }
        // Accounts at the implementing client's own domain are the operator's: only remote
        // domains, which can mint local parts at will, are also limited as a whole.
        let domain =
            (from.domain() != self.settings.target.domain()).then(|| from.domain().as_str());
        match self.limiter.request(bare(from), domain, clock.mono_ms) {
            Ok(()) => None,
            Err(over) => {
                debug!(id, ?over, "request over its rate limit");
                let text = match over {
                    Over::Account => "too many requests: slow down",
                    Over::Domain => "too many requests from your domain: slow down",
                };
                Some(self.refuse(el, from, Condition::ResourceConstraint, text, clock))
            }
        }
    }

    /// Seals the sender into a token (an IQ token bound to the request's id, or a message
    /// token) and sends the stanza to `resource`.
    pub(super) fn forward(
        &mut self,
        mut el: Element,
        from: &Jid,
        to: &To,
        resource: &str,
        clock: Clock,
        rng: &mut dyn Random,
    ) -> Outcome {
        let id = el.attr("id");
        let revealed = self.settings.sender == Sender::Revealed && el.name() == "iq";
        let binding = match (el.name(), id) {
            ("message", _) => Binding::message(&self.settings.component),
            (_, Some(id)) if revealed => Binding::iq(&self.revealed_component, id),
            (_, Some(id)) => Binding::iq(&self.settings.component, id),
            (_, None) => {
                return self.refuse(&el, from, Condition::BadRequest, "IQ without id", clock);
            }
        };
        let sender = from.to_string();
        let original_to = match to {
            To::Bare => None,
            _ => Some(to.address(&self.settings.component)),
        };
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt);
        let contents = Contents {
            sender: &sender,
            original_to: original_to.as_deref(),
        };
        let token = match token::seal(&self.keys, binding, &contents, clock.unix_ms, salt) {
            Ok(t) => t,
            Err(e) => {
                let text = match e {
                    token::SealError::TooLong { len } => format!(
                        "sender address too long to be proxied ({len} bytes, at most {})",
                        token::MAX_PLAINTEXT_LEN
                    ),
                    token::SealError::OpenOnly => "the request cannot be proxied".to_owned(),
                };
                return self.refuse(&el, from, Condition::NotAcceptable, &text, clock);
            }
        };
        if el.name() == "message" {
            debug!(id, resource, "message forwarded");
        } else {
            debug!(id, resource, "request forwarded");
        }
        // The address the implementing client sees the stanza come from.
        let new_from = match self.settings.sender {
            Sender::Revealed if revealed => {
                // The reply comes back to `component/SENDER`, which must be a valid address
                // whose resource is SENDER byte for byte: a JID whose parts pass preparation
                // one by one may not as one resource (a mix of left-to-right and
                // right-to-left scripts), and its reply could never be matched.
                let address = join(&self.settings.component, &sender);
                if Jid::new(&address)
                    .ok()
                    .is_none_or(|j| j.resource().map(|r| r.as_str()) != Some(sender.as_str()))
                {
                    return self.refuse(
                        &el,
                        from,
                        Condition::NotAcceptable,
                        "this address cannot be shown as a resource",
                        clock,
                    );
                }
                let new_id = revealed_id(el.attr("id").unwrap_or_default(), &token);
                stanza::set_attr(&mut el, "id", new_id);
                address
            }
            Sender::Pseudonym => {
                // A resource is at most 1023 bytes (RFC 7622), the token included.
                if PSEUDONYM_LEN + 1 + token.len() > token::MAX_TOKEN_LEN {
                    let text = format!(
                        "sender address too long to be proxied ({} bytes)",
                        sender.len()
                    );
                    return self.refuse(&el, from, Condition::NotAcceptable, &text, clock);
                }
                let mut r = pseudonym(&self.pseudonym_key, bare(from));
                r.push('.');
                r.push_str(&token);
                join(&self.settings.component, &r)
            }
            // Messages keep the sealed form in the revealed mode.
            Sender::Sealed | Sender::Revealed => join(&self.settings.component, &token),
        };
        let dest = join(&self.target, resource);
        stanza::set_attr(&mut el, "from", new_from);
        stanza::set_attr(&mut el, "to", dest);
        Outcome::send(el, Verdict::Forwarded)
    }
}
