//! Why a stanza was dropped ([`DropReason`]), and which rate limit a verdict was over
//! ([`Limit`]): typed, so that counting them never matches text.
//!
//! Each reason's [`DropReason::label`] is the `reason` label value of
//! `jat_proxy_stanzas_dropped_total` and the text of the debug logs: operators' dashboards and
//! alerts depend on it, so it never changes with a variant's name.

/// Why the core dropped a stanza: nothing was sent for it. One variant per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// An element not in the component stream's namespace.
    NotComponentStanza,
    /// A top-level element that is not `<iq/>`, `<message/>` or `<presence/>`.
    UnknownElement,
    /// An IQ whose `from` or `to` is missing or invalid (or `to` not at the component, or
    /// `from` at it).
    IqAddresses,
    /// An error reply was due, but the stanza lacks the addresses to send it to.
    CannotAnswer,
    /// An error reply was due, but its recipient's error budget is spent (a rate limit:
    /// [`Limit::Error`]).
    OverErrorBudget,
    /// A message whose `from` or `to` is missing or invalid.
    MessageAddresses,
    /// A message of type `error` jat-proxy has nowhere to send (never answered either).
    MessageError,
    /// A headline message that would have been refused (RFC 6121 §5.2.2: never answered
    /// with an error).
    Headline,
    /// A presence whose `from` or `to` is missing or invalid.
    PresenceAddresses,
    /// A presence from outside the implementing client's account.
    PresenceFromOutside,
    /// A reply sent to the bare component address (no token to reverse it by).
    BareComponentAddress,
    /// A reply sent to an address at the component that is not a token address.
    NotATokenAddress,
    /// A reply without an `id`.
    ReplyWithoutId,
    /// A reply from outside the implementing client's account (outbound stanzas off), or a
    /// peer's reply whose id is not a route that opens for it.
    ReplyFromOutside,
    /// A token that opened to an address that is not a JID.
    TokenInvalidAddress,
    /// A token that opened to an address at the component itself.
    TokenToComponent,
    /// A token that opened to the implementing client's own account.
    TokenNamesTarget,
    /// A token whose original address (where its stanza was sent) is not at the component.
    TokenOriginalNotAtComponent,
    /// A token that did not open (counted by why in `jat_proxy_tokens_rejected_total` when
    /// the verdict is [`crate::proxy::Verdict::TokenRejected`]), or an outbound stanza's
    /// token past its own kind's lifetime.
    TokenRejected,
    /// A reply in the revealed form (`proxy.example/SENDER`, the token in its id) whose token
    /// opened to another sender than the address names.
    RevealedMismatch,
    /// A reply or message to a sender over its token's reply budget (a rate limit:
    /// [`Limit::Reply`]).
    OverReplyRate,
    /// A message the implementing client starts, over its outbound rate (a rate limit:
    /// [`Limit::Outbound`]).
    OverOutboundRate,
    /// An outbound stanza to an escaped address while `outbound` is not `any`.
    EscapedNeedsAny,
    /// An outbound stanza to an escaped address with a resource.
    EscapedWithResource,
    /// An outbound stanza to an address whose node is not a JID escaped as XEP-0106 says.
    NotEscaped,
    /// An outbound stanza to an escaped address at the component or the implementing
    /// client's account.
    EscapedInside,
    /// An outbound stanza whose peer is not a JID.
    NotAnAddress,
    /// An outbound stanza to a peer `[policy]` refuses.
    PeerRefusedByPolicy,
    /// A peer's reply, the peer being refused by `[policy]`.
    ReplyFromRefusedPeer,
    /// A peer's reply over the peer's routed-reply rate (a rate limit: [`Limit::Routed`]).
    OverRoutedRate,
    /// A peer's reply whose route holds an invalid address.
    RouteInvalidAddress,
    /// A peer's reply whose route leads outside the implementing client's account or the
    /// component.
    RouteOutside,
    /// An oversized element not in the component stream's namespace.
    OversizedElement,
    /// An oversized stanza whose `from` or `to` is missing or invalid.
    OversizedAddresses,
    /// An oversized IQ whose `id` could not be read.
    OversizedIqWithoutId,
    /// Any other oversized stanza (one never answered with an error).
    OversizedStanza,
}

impl DropReason {
    /// Every reason, each at its index (`reason as usize`).
    pub const ALL: [DropReason; 36] = [
        DropReason::NotComponentStanza,
        DropReason::UnknownElement,
        DropReason::IqAddresses,
        DropReason::CannotAnswer,
        DropReason::OverErrorBudget,
        DropReason::MessageAddresses,
        DropReason::MessageError,
        DropReason::Headline,
        DropReason::PresenceAddresses,
        DropReason::PresenceFromOutside,
        DropReason::BareComponentAddress,
        DropReason::NotATokenAddress,
        DropReason::ReplyWithoutId,
        DropReason::ReplyFromOutside,
        DropReason::TokenInvalidAddress,
        DropReason::TokenToComponent,
        DropReason::TokenNamesTarget,
        DropReason::TokenOriginalNotAtComponent,
        DropReason::TokenRejected,
        DropReason::RevealedMismatch,
        DropReason::OverReplyRate,
        DropReason::OverOutboundRate,
        DropReason::EscapedNeedsAny,
        DropReason::EscapedWithResource,
        DropReason::NotEscaped,
        DropReason::EscapedInside,
        DropReason::NotAnAddress,
        DropReason::PeerRefusedByPolicy,
        DropReason::ReplyFromRefusedPeer,
        DropReason::OverRoutedRate,
        DropReason::RouteInvalidAddress,
        DropReason::RouteOutside,
        DropReason::OversizedElement,
        DropReason::OversizedAddresses,
        DropReason::OversizedIqWithoutId,
        DropReason::OversizedStanza,
    ];

    /// The reason in words: the `reason` label value of `jat_proxy_stanzas_dropped_total`
    /// and the text of the logs. Operators depend on these: never reword one.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NotComponentStanza => "not a stanza of the component stream",
            DropReason::UnknownElement => "unknown top-level element",
            DropReason::IqAddresses => "iq with missing or invalid addresses",
            DropReason::CannotAnswer => "cannot answer a stanza without addresses",
            DropReason::OverErrorBudget => "over the sender's error budget",
            DropReason::MessageAddresses => "message with missing or invalid addresses",
            DropReason::MessageError => "message error",
            DropReason::Headline => "headline message",
            DropReason::PresenceAddresses => "presence with missing or invalid addresses",
            DropReason::PresenceFromOutside => "presence from outside the target account",
            DropReason::BareComponentAddress => "sent to the bare component address",
            DropReason::NotATokenAddress => "sent to an address that is not a token",
            DropReason::ReplyWithoutId => "reply without id",
            DropReason::ReplyFromOutside => "reply from outside the target account",
            DropReason::TokenInvalidAddress => "token holds an invalid address",
            DropReason::TokenToComponent => "token addressed to the component itself",
            DropReason::TokenNamesTarget => "token names the implementing client",
            DropReason::TokenOriginalNotAtComponent => {
                "token's original address is not at the component"
            }
            DropReason::TokenRejected => "token rejected",
            DropReason::OverReplyRate => "over the recipient's reply rate limit",
            DropReason::OverOutboundRate => "over the implementing client's outbound rate limit",
            DropReason::EscapedNeedsAny => "an escaped address needs outbound = \"any\"",
            DropReason::EscapedWithResource => "an escaped address has no resource",
            DropReason::NotEscaped => "not a JID escaped as XEP-0106 says",
            DropReason::EscapedInside => {
                "not an address outside the component and the implementing client"
            }
            DropReason::NotAnAddress => "not an address",
            DropReason::PeerRefusedByPolicy => "refused by policy",
            DropReason::ReplyFromRefusedPeer => "reply from a peer refused by policy",
            DropReason::OverRoutedRate => "over the peer's rate limit",
            DropReason::RouteInvalidAddress => "route holds an invalid address",
            DropReason::RouteOutside => "route outside the target account or the component",
            DropReason::OversizedElement => "oversized element",
            DropReason::OversizedAddresses => "oversized stanza with missing or invalid addresses",
            DropReason::OversizedIqWithoutId => "oversized iq without a readable id",
            DropReason::OversizedStanza => "oversized stanza",
            DropReason::RevealedMismatch => "token names another sender than the address",
        }
    }

    /// The rate limit a stanza dropped for this reason was over, if it was one.
    pub fn rate_limit(self) -> Option<Limit> {
        match self {
            DropReason::OverErrorBudget => Some(Limit::Error),
            DropReason::OverReplyRate => Some(Limit::Reply),
            DropReason::OverOutboundRate => Some(Limit::Outbound),
            DropReason::OverRoutedRate => Some(Limit::Routed),
            _ => None,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A rate limit a stanza was refused or dropped by (the `limit` label of
/// `jat_proxy_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A request answered `resource-constraint`: a sender over its (or its domain's) rate,
    /// or the implementing client over its outbound rate.
    Request,
    /// An error not sent: its recipient's error budget is spent.
    Error,
    /// A reply or message dropped: over its token's reply budget.
    Reply,
    /// A message the implementing client starts, dropped over its outbound rate.
    Outbound,
    /// A peer's reply dropped over its routed-reply rate.
    Routed,
}

impl Limit {
    /// Every limit, each at its index (`limit as usize`).
    pub const ALL: [Limit; 5] = [
        Limit::Request,
        Limit::Error,
        Limit::Reply,
        Limit::Outbound,
        Limit::Routed,
    ];

    /// The `limit` label value of `jat_proxy_rate_limited_total`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Request => "request",
            Limit::Error => "error",
            Limit::Reply => "reply",
            Limit::Outbound => "outbound",
            Limit::Routed => "routed",
        }
    }
}
