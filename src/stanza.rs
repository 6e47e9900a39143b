//! Building and readdressing raw stanzas of the component stream.
//!
//! Stanzas are handled as [`Element`]s rather than typed structs: what the proxy forwards must
//! reach the other side byte-for-byte in meaning (payload, unknown attributes, `xml:lang`),
//! and what hostile senders produce must not need to parse as anything in particular.

use xmpp_parsers::minidom::Element;

/// Namespace of stanzas on a component stream (XEP-0114).
pub const NS: &str = "jabber:component:accept";
/// Namespace of the stream element and stream errors (RFC 6120 §4).
pub const STREAM_NS: &str = "http://etherx.jabber.org/streams";
/// Namespace of stanza error conditions (RFC 6120 §8.3).
pub const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// XEP-0199 ping.
pub const PING_NS: &str = "urn:xmpp:ping";

/// The stanza error conditions jat-proxy sends, with their RFC 6120 error types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Malformed request: unknown IQ type, not exactly one payload, no id.
    BadRequest,
    /// Messages, and requests from the implementing client.
    FeatureNotImplemented,
    /// The sender's address does not fit in a token.
    NotAcceptable,
    /// Over a size or depth limit.
    PolicyViolation,
    /// The sender is not allowed to use the proxy (allow/deny lists).
    Forbidden,
    /// The sender is over its rate limit: retry later.
    ResourceConstraint,
    /// No resource of the implementing client is available.
    ServiceUnavailable,
    /// The implementing client wrote to an address that names nobody (any more).
    ItemNotFound,
}

impl Condition {
    /// The element name of the condition.
    pub fn name(self) -> &'static str {
        match self {
            Condition::BadRequest => "bad-request",
            Condition::FeatureNotImplemented => "feature-not-implemented",
            Condition::NotAcceptable => "not-acceptable",
            Condition::PolicyViolation => "policy-violation",
            Condition::ServiceUnavailable => "service-unavailable",
            Condition::Forbidden => "forbidden",
            Condition::ResourceConstraint => "resource-constraint",
            Condition::ItemNotFound => "item-not-found",
        }
    }

    /// The `type` of the `<error/>` element (RFC 6120 §8.3.2).
    pub fn error_type(self) -> &'static str {
        match self {
            Condition::BadRequest | Condition::NotAcceptable | Condition::PolicyViolation => {
                "modify"
            }
            Condition::FeatureNotImplemented
            | Condition::ServiceUnavailable
            | Condition::ItemNotFound => "cancel",
            Condition::Forbidden => "auth",
            Condition::ResourceConstraint => "wait",
        }
    }
}

/// Sets (or replaces) an unqualified attribute.
pub fn set_attr(el: &mut Element, name: &str, value: impl Into<String>) {
    let name = rxml::NcName::try_from(name).expect("attribute names used here are valid");
    el.attrs_mut()
        .insert(rxml::Namespace::NONE, name, value.into());
}

fn with_attrs(mut el: Element, attrs: &[(&str, Option<&str>)]) -> Element {
    for (name, value) in attrs {
        if let Some(value) = value {
            set_attr(&mut el, name, *value);
        }
    }
    el
}

/// An error reply to a stanza of kind `name` (`iq` or `message`) that came `from` a sender
/// `to` an address of the component: it goes back from that address.
pub fn error_reply(
    name: &str,
    from: &str,
    to: &str,
    id: Option<&str>,
    condition: Condition,
    text: &str,
) -> Element {
    let error = Element::builder("error", NS)
        .append(Element::bare(condition.name(), STANZAS_NS))
        .append(Element::builder("text", STANZAS_NS).append(text).build())
        .build();
    let mut error = error;
    set_attr(&mut error, "type", condition.error_type());
    let mut reply = Element::builder(name, NS).append(error).build();
    reply = with_attrs(
        reply,
        &[
            ("type", Some("error")),
            ("id", id),
            ("from", Some(from)),
            ("to", Some(to)),
        ],
    );
    reply
}

/// A presence stanza of `type_` (None: available) from the component to `to`.
pub fn presence(type_: Option<&str>, from: &str, to: &str) -> Element {
    with_attrs(
        Element::bare("presence", NS),
        &[("type", type_), ("from", Some(from)), ("to", Some(to))],
    )
}

/// An XEP-0199 ping: the keepalive that also proves the server still answers.
pub fn ping(from: &str, to: &str, id: &str) -> Element {
    let iq = Element::builder("iq", NS)
        .append(Element::bare("ping", PING_NS))
        .build();
    with_attrs(
        iq,
        &[
            ("type", Some("get")),
            ("id", Some(id)),
            ("from", Some(from)),
            ("to", Some(to)),
        ],
    )
}

/// Number of child elements.
pub fn child_count(el: &Element) -> usize {
    el.children().take(2).count()
}

/// The error condition of an error stanza, for logs.
pub fn error_condition(el: &Element) -> Option<String> {
    el.children()
        .find(|c| c.name() == "error")?
        .children()
        .find(|c| c.ns() == STANZAS_NS && c.name() != "text")
        .map(|c| c.name().to_owned())
}

/// Serialises an element, for tests.
#[cfg(test)]
pub fn to_xml(el: &Element) -> String {
    String::from(el)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_shape() {
        let e = error_reply(
            "iq",
            "proxy.example",
            "user@example/abc",
            Some("1234"),
            Condition::ServiceUnavailable,
            "no resource",
        );
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(e.attr("id"), Some("1234"));
        assert_eq!(e.attr("from"), Some("proxy.example"));
        assert_eq!(e.attr("to"), Some("user@example/abc"));
        let err = e.get_child("error", NS).unwrap();
        assert_eq!(err.attr("type"), Some("cancel"));
        assert!(err.has_child("service-unavailable", STANZAS_NS));
        assert_eq!(error_condition(&e).as_deref(), Some("service-unavailable"));
    }
}
