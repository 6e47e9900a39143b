//! Properties that must hold for *any* input, checked by panicking. The cargo-fuzz targets in
//! `fuzz/` call these functions on arbitrary bytes, `cargo test` replays the committed fuzz
//! corpora through them, and the property tests drive them with generated stanzas — so the
//! fuzzer, the stable test suite and proptest check the very same statements.

use std::collections::HashMap;
use std::path::Path;

use jid::{BareJid, Jid};
use xmpp_parsers::minidom::Element;

use crate::inbound::{Inbound, Limits};
use crate::keys::KeySet;
use crate::policy::{Entry, Policy};
use crate::proxy::{
    Balance, Clock, Messages, Outbound, Outcome, PSEUDONYM_LEN, Proxy, Selection, Sender, Settings,
    Stanza, Verdict,
};

/// What the core binds tokens of the revealed form to (`[proxy] sender = "revealed"`).
const REVEALED: &str = "proxy.example/revealed";

/// The message token lifetime of the harness, in seconds.
const MESSAGE_LIFETIME: u64 = 3600;
use crate::random::Random;
use crate::rate::{Limiter, RateLimit};
use crate::stream::{Frame, ReadError, Reader, Writer};
use crate::token::{self, Binding, Contents};

// What the tests and benchmarks use besides the harnesses: the one-stanza reader (the
// header it reads under) and the deterministic randomness.
pub use crate::inbound::{TEST_HEADER, read_one};
pub use crate::random::SeededRandom;

/// The component the harnesses run as.
pub const COMPONENT: &str = "proxy.example";
/// The target account the harnesses serve.
pub const TARGET: &str = "impl@example";
/// The fixed clock of the token harness (Unix seconds).
pub const NOW: u64 = 1_790_000_000;
/// [`NOW`] in Unix milliseconds, as tokens take it.
pub const NOW_MS: u64 = NOW * 1000;
/// Separates stanzas in a proxy fuzz input (0xFF never occurs in UTF-8).
pub const SEPARATOR: u8 = 0xFF;
/// In a proxy fuzz input, replaced by the resource of the last request forwarded, so that
/// the fuzzer reaches the reply path with genuine tokens.
pub const TOKEN_PLACEHOLDER: &[u8] = b"TOKEN";

const SECRETS: [(u32, [u8; 32]); 2] = [(1, [0x11; 32]), (2, [0x22; 32])];

/// The key set of the harnesses: keys 1 and 2, 2 current.
pub fn keys() -> KeySet {
    KeySet::from_secrets(&SECRETS.map(|(id, s)| (id, 0, s))).expect("fixed keys")
}

fn key_alone(id: u32) -> Option<KeySet> {
    let (_, secret) = SECRETS.iter().find(|(i, _)| *i == id)?;
    KeySet::from_secrets(&[(id, 0, *secret)])
}

/// Token codec: never panics; whatever opens is byte-for-byte what sealing its contents
/// produces (nothing but the keys' own output is accepted); and sealing then opening
/// returns the contents.
///
/// Input: IQ id, a NUL byte, then the token text.
pub fn token(data: &[u8]) {
    let (id, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let id = String::from_utf8_lossy(id);
    let text = String::from_utf8_lossy(rest);
    let binding = Binding::iq(COMPONENT, &id);
    let keys = keys();
    let message = Binding::message(COMPONENT);
    // As an IQ token, a message token, and a route (for one peer): only the keys' own output
    // opens, for one kind only, a route for its peer only.
    const PEER: &str = "peer@example/r";
    let route = Binding::Route {
        component: COMPONENT,
        peer: PEER,
    };
    let other_peer = Binding::Route {
        component: COMPONENT,
        peer: "peer@example/s",
    };
    for (b, lifetime, other) in [
        (binding, 300, message),
        (message, MESSAGE_LIFETIME, binding),
        (route, 300, other_peer),
    ] {
        if let Ok(opened) = token::open(&keys, b, &text, NOW_MS, lifetime) {
            assert_eq!(Some(opened.kind), b.kind());
            let single = key_alone(opened.key_id).expect("opened with a known key");
            let resealed = token::reseal(&single, b, &opened)
                .expect("the key is in the set")
                .expect("what was sealed fits");
            assert_eq!(
                resealed, text,
                "an accepted token must be exactly the keys' output"
            );
            assert!(token::open(&keys, other, &text, NOW_MS, lifetime).is_err());
        }
    }
    // As a token a new stanza is sent to: only IQ and message tokens of version 2.
    let peer = Binding::Peer {
        component: COMPONENT,
    };
    if let Ok(opened) = token::open(&keys, peer, &text, NOW_MS, MESSAGE_LIFETIME) {
        assert!(matches!(
            opened.kind,
            token::Kind::Iq | token::Kind::Message
        ));
        assert_eq!(
            opened.version,
            token::VERSION,
            "version 1 tokens only answer"
        );
    }
    if !text.contains('\0') && !id.contains('\0') {
        let r = token::Route {
            client: "impl@example/a".into(),
            client_to: format!("{COMPONENT}/x"),
            id: id.to_string(),
        };
        if let Ok(sealed) = token::seal_route(&keys, COMPONENT, &text, &r, NOW_MS, [3; 16]) {
            let open = |component: &str, peer: &str, now: u64| {
                token::open_route(&keys, component, peer, &sealed, now, 300)
            };
            assert_eq!(open(COMPONENT, &text, NOW_MS).as_ref(), Ok(&r));
            assert!(open(COMPONENT, &format!("{text}x"), NOW_MS).is_err());
            assert!(open("other.example", &text, NOW_MS).is_err());
            assert_eq!(
                open(COMPONENT, &text, NOW_MS + 300_000),
                Err(token::Rejected::Expired)
            );
            for b in [binding, message, peer] {
                assert!(token::open(&keys, b, &sealed, NOW_MS, MESSAGE_LIFETIME).is_err());
            }
        }
    }
    // Roundtrip with the input as the sender's address.
    if !text.contains('\0') {
        let contents = Contents {
            sender: &text,
            original_to: None,
        };
        match token::seal(&keys, binding, &contents, NOW * 1000, [7; token::SALT_LEN]) {
            Ok(t) => {
                assert!(t.len() <= token::MAX_TOKEN_LEN);
                let opened = token::open(&keys, binding, &t, NOW * 1000, 300).expect("roundtrip");
                assert_eq!(opened.sender, text.as_ref());
                assert_eq!(opened.original_to, None);
                let other_id = format!("{id}x");
                let other = Binding::iq(COMPONENT, &other_id);
                assert!(token::open(&keys, other, &t, NOW * 1000, 300).is_err());
                assert!(token::open(&keys, message, &t, NOW * 1000, 300).is_err());
            }
            Err(e) => assert!(
                matches!(e, token::SealError::TooLong { len } if len > token::MAX_PLAINTEXT_LEN)
            ),
        }
    }
}

/// Configuration parser: never panics, and what it accepts is within the documented ranges.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = crate::config::parse(Path::new("fuzz.toml"), &text) {
        let p = &c.proxy;
        assert!((10..=86400).contains(&p.token_lifetime));
        assert!((10..=30 * 86400).contains(&p.message_token_lifetime));
        assert!(c.keys.token_lifetime >= p.token_lifetime);
        assert!((1..=4096).contains(&p.max_resources));
        assert!(c.limits.max_depth >= 4 && c.limits.max_bytes >= 4096);
        assert!(p.rate.per_second > 0.0 && p.rate.burst >= 1.0 && p.rate.max_senders >= 1);
        assert!(p.rate.per_domain > 0.0 && p.rate.domain_burst >= 1.0);
        assert!(p.target.node().is_some());
        assert!(BareJid::new(&p.component).is_ok_and(|j| j.node().is_none()));
        assert_eq!(p.component, c.component.jid);
        assert_ne!(p.target.domain().as_str(), p.component);
    }
}

/// The settings of the proxy harness: small bounds, so the fuzzer reaches them.
pub fn settings() -> Settings {
    Settings {
        component: COMPONENT.into(),
        target: BareJid::new(TARGET).unwrap(),
        token_lifetime: 300,
        max_resources: 4,
        keepalive_to: "example".into(),
        rate: RateLimit {
            per_second: 5.0,
            burst: 10.0,
            max_senders: 8,
            per_domain: 8.0,
            domain_burst: 15.0,
        },
        policy: Policy {
            allow: vec![],
            deny: vec![Entry::parse("spam.example").unwrap()],
        },
        hold_ms: 2000,
        learn_ms: crate::proxy::LEARN_MS,
        max_held: 4,
        selection: Selection::default(),
        messages: Messages::Forward,
        message_token_lifetime: MESSAGE_LIFETIME,
        outbound: Outbound::Any,
        sender: Sender::Sealed,
    }
}

/// Limits of the proxy harness.
pub const LIMITS: Limits = Limits {
    max_bytes: 8192,
    max_depth: 8,
    max_nodes: 512,
};

struct Header {
    name: String,
    type_: Option<String>,
    from: Option<String>,
    to: Option<String>,
    id: Option<String>,
}

fn header(inbound: &Inbound) -> Header {
    match inbound {
        Inbound::Element(e) => Header {
            name: e.name().to_owned(),
            type_: e.attr("type").map(str::to_owned),
            from: e.attr("from").map(str::to_owned),
            to: e.attr("to").map(str::to_owned),
            id: e.attr("id").map(str::to_owned),
        },
        Inbound::Oversized(o) => Header {
            name: o.name.clone(),
            type_: o.type_.clone(),
            from: o.from.clone(),
            to: o.to.clone(),
            id: o.id.clone(),
        },
    }
}

fn jid(s: Option<&str>) -> Option<Jid> {
    Jid::new(s?).ok()
}

/// The sans-IO proxy: never panics, and for every stanza in, what comes out (if anything) is
/// one of: an error back to the sender of a request or message; the request forwarded to an
/// available resource of the target with a token that opens to its sender; a reply reversed
/// to the address its token holds, from the component's domain; a presence answer to the
/// target. Never an answer to a result or an error, never a stanza to the component itself.
/// Memory stays bounded. Over any stretch of (monotonic) time without an eviction from the
/// rate limiter's tables, the requests forwarded per sender account and per remote domain,
/// the errors sent per account and the replies reversed per recipient account stay within
/// their token buckets — whatever the wall clock does.
///
/// Input: stanzas separated by [`SEPARATOR`]; a stanza starting with `0xFE n` first
/// advances both clocks by `n` seconds, one starting with `0xFD n` steps the wall clock
/// back by `n` seconds (the monotonic clock does not move); [`TOKEN_PLACEHOLDER`] stands for
/// the last token issued.
pub fn proxy(data: &[u8]) {
    // Which flows are on varies with the input's length, so that every combination is run.
    let mut settings = settings();
    (settings.messages, settings.outbound) = match data.len() % 4 {
        0 => (Messages::Forward, Outbound::Any),
        1 => (Messages::Forward, Outbound::Known),
        2 => (Messages::Refuse, Outbound::None),
        _ => (Messages::Refuse, Outbound::Known),
    };
    settings.sender = match (data.len() / 4) % 3 {
        0 => Sender::Sealed,
        1 => Sender::Pseudonym,
        _ => Sender::Revealed,
    };
    // Sticky and priority picks wait for the probe round after the login (2 s).
    settings.selection.balance = match (data.len() / 12) % 3 {
        0 => Balance::Random,
        1 => Balance::Sticky,
        _ => Balance::Priority,
    };
    // Half the inputs without the round, so that inputs which never advance the clock past
    // it still reach the reply paths under every balance.
    if (data.len() / 36) % 2 == 1 {
        settings.learn_ms = 0;
    }
    let mut budgets = Budgets::new(settings.rate);
    let mut proxy = Proxy::new(settings, keys());
    let mut rng = SeededRandom::new(data.len() as u64);
    let mut clock = Clock {
        unix_ms: NOW * 1000,
        mono_ms: 0,
    };
    let target = BareJid::new(TARGET).unwrap();
    for out in proxy.connected(clock) {
        assert_eq!(out.attr("to"), Some(TARGET));
    }
    let mut last_token: Vec<u8> = b"none".to_vec();
    let hold_ms = proxy.settings().hold_ms;
    let mut held = HeldRequests::default();
    for chunk in data.split(|&b| b == SEPARATOR) {
        let chunk = match chunk {
            [0xFE, n, rest @ ..] => {
                clock.unix_ms += u64::from(*n) * 1000;
                clock.mono_ms += u64::from(*n) * 1000;
                rest
            }
            [0xFD, n, rest @ ..] => {
                clock.unix_ms = clock.unix_ms.saturating_sub(u64::from(*n) * 1000);
                rest
            }
            _ => chunk,
        };
        let chunk = replace(chunk, TOKEN_PLACEHOLDER, &last_token);
        let Some(inbound) = read_one(&chunk, LIMITS) else {
            continue;
        };
        // The shell's timer: the core is given the time when it asked for it.
        if proxy.poll_timeout().is_some_and(|t| t <= clock.mono_ms) {
            proxy.handle_timeout(clock);
            drain(
                &mut proxy,
                &mut held,
                &mut budgets,
                &target,
                clock,
                &mut rng,
            );
            // Whatever was due is done: no timer is left at or before now (a busy loop).
            assert!(
                proxy.poll_timeout().is_none_or(|t| t > clock.mono_ms),
                "a timer still due at {} ms",
                clock.mono_ms
            );
        }
        held.settled(proxy.held(), hold_ms, clock.mono_ms);
        let h = header(&inbound);
        let resources_before = eligible(&proxy);
        let Outcome {
            transmit: out,
            verdict,
            ..
        } = proxy.handle(inbound, clock, &mut rng);
        assert!(proxy.resources().len() <= 4);
        assert!(proxy.tracked_senders() <= 8);
        assert!(proxy.limiter().domains() <= 8);
        assert!(proxy.held() <= 4);
        budgets.evictions(proxy.limiter());
        if verdict == Verdict::Held {
            held.held(&h, clock.mono_ms);
            budgets.request(&h, &target, clock.mono_ms);
        }
        if let Some(t) = drain(
            &mut proxy,
            &mut held,
            &mut budgets,
            &target,
            clock,
            &mut rng,
        ) {
            last_token = t.into_bytes();
        }
        let Some(out) = out else {
            continue;
        };
        let flows = proxy.settings();
        if let Some(t) = check_output(
            &h,
            &out,
            verdict,
            &resources_before,
            (&target, flows.messages, flows.outbound, flows.sender),
            clock.unix_ms,
        ) {
            last_token = t.into_bytes();
        }
        budgets.charge(&h, &out, verdict, &target, clock.mono_ms);
    }
}

/// Takes and checks what the core sends besides its answers; returns the last token of a
/// released request.
fn drain(
    proxy: &mut Proxy,
    held: &mut HeldRequests,
    budgets: &mut Budgets,
    target: &BareJid,
    clock: Clock,
    rng: &mut dyn Random,
) -> Option<String> {
    let mut token = None;
    while let Some(out) = proxy.poll_transmit(clock, rng) {
        let t = held.transmitted(&out, &eligible(proxy), target, clock.unix_ms);
        if let Verdict::Refused(_) = out.verdict {
            let out = out.transmit.as_ref().expect("checked by `transmitted`");
            let to = jid(out.attr("to")).map(|j| j.to_bare().to_string());
            budgets.count("errors", to, budgets.account, clock.mono_ms);
        }
        token = t.or(token);
    }
    token
}

/// A token resource split into its pseudonym, if it has one (`PSEUDONYM.TOKEN`: 16 base64url
/// characters and a `.`, which no token holds), and its token. Written here apart from the
/// core's own reading.
fn split_pseudonym(resource: &str) -> (Option<&str>, &str) {
    match resource.split_once('.') {
        Some((p, t))
            if p.len() == PSEUDONYM_LEN
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            (Some(p), t)
        }
        _ => (None, resource),
    }
}

/// A pseudonym the core wrote is the one of the sender's account, under the key file's
/// pseudonym key.
fn check_pseudonym(pseudonym: Option<&str>, sender: &Jid) {
    if let Some(p) = pseudonym {
        let bare = sender.to_bare().to_string();
        assert_eq!(p, crate::proxy::pseudonym(&keys().pseudonym_key(), &bare));
    }
}

/// Checks one output against its input; returns the token if a request or message was
/// forwarded.
fn check_output(
    h: &Header,
    out: &Element,
    verdict: Verdict,
    resources_before: &[String],
    (target, messages, outbound, sender): (&BareJid, Messages, Outbound, Sender),
    now_ms: u64,
) -> Option<String> {
    let xml = String::from(out);
    let out_to = jid(out.attr("to")).unwrap_or_else(|| panic!("output without valid to: {xml}"));
    let out_from =
        jid(out.attr("from")).unwrap_or_else(|| panic!("output without valid from: {xml}"));
    assert_ne!(
        out_to.domain().as_str(),
        COMPONENT,
        "never to itself: {xml}"
    );
    assert_eq!(
        out_from.domain().as_str(),
        COMPONENT,
        "always from the component: {xml}"
    );
    let in_from = jid(h.from.as_deref()).expect("an output needs a valid sender");
    let in_to = jid(h.to.as_deref()).expect("an output needs a valid recipient");
    assert_eq!(in_to.domain().as_str(), COMPONENT);
    let is_reply = |t: &Option<String>| matches!(t.as_deref(), Some("result") | Some("error"));
    let from_target = in_from.to_bare() == *target;
    let opened_in = |binding: Binding<'_>, lifetime: u64| {
        let (_, t) = split_pseudonym(in_to.resource()?.as_str());
        token::open(&keys(), binding, t, now_ms, lifetime).ok()
    };
    let reversed = |opened: token::Opened| {
        assert_eq!(out_to, jid(Some(&opened.sender)).unwrap(), "{xml}");
        match &opened.original_to {
            Some(a) => assert_eq!(Some(&out_from), jid(Some(a)).as_ref(), "{xml}"),
            None => assert_eq!(out.attr("from"), Some(COMPONENT), "{xml}"),
        }
        assert_eq!(out.name(), h.name, "{xml}");
        assert_eq!(out.attr("id"), h.id.as_deref(), "{xml}");
    };

    if h.name == "iq" && is_reply(&h.type_) && !from_target {
        // A peer's reply to an IQ the target started: its id is a route that opens for this
        // peer; it goes back to the resource that asked, with its own id, from the address
        // it wrote to.
        let id = h.id.as_deref().expect("a routed reply has an id");
        let route = token::open_route(&keys(), COMPONENT, in_from.as_str(), id, now_ms, 300)
            .unwrap_or_else(|e| panic!("routed without a valid route ({e}): {xml}"));
        assert_eq!(out_to, jid(Some(&route.client)).unwrap(), "{xml}");
        assert_eq!(out_to.to_bare(), *target, "{xml}");
        assert_eq!(
            Some(&out_from),
            jid(Some(&route.client_to)).as_ref(),
            "{xml}"
        );
        assert_eq!(out.attr("id"), Some(route.id.as_str()), "{xml}");
        assert!(is_reply(&out.attr("type").map(str::to_owned)), "{xml}");
        return None;
    }
    if h.name == "iq" && is_reply(&h.type_) {
        // A result or error is never answered: the only output is its reversal, to the
        // address its (valid) token holds, sent by the target's account.
        let id = h.id.as_deref().expect("a reversed reply has an id");
        // The revealed form: `ID.TOKEN` as id, TOKEN a revealed token (bound to
        // `component/revealed`, which only that form opens) for ID, naming the sender the
        // address's resource is; the sender gets ID back, from where the request went.
        if let Some((original, t)) = id.rsplit_once('.')
            && let Ok(opened) =
                token::open(&keys(), Binding::iq(REVEALED, original), t, now_ms, 300)
        {
            assert_eq!(
                in_to.resource().map(|r| r.as_str()),
                Some(opened.sender.as_str()),
                "a revealed token names the address: {xml}"
            );
            assert_eq!(out_to, jid(Some(&opened.sender)).unwrap(), "{xml}");
            match &opened.original_to {
                Some(a) => assert_eq!(Some(&out_from), jid(Some(a)).as_ref(), "{xml}"),
                None => assert_eq!(out.attr("from"), Some(COMPONENT), "{xml}"),
            }
            assert_eq!(out.name(), h.name, "{xml}");
            assert_eq!(out.attr("id"), Some(original), "{xml}");
            assert!(is_reply(&out.attr("type").map(str::to_owned)), "{xml}");
            return None;
        }
        let opened = opened_in(Binding::iq(COMPONENT, id), 300)
            .unwrap_or_else(|| panic!("reversed without a valid IQ token: {xml}"));
        reversed(opened);
        // An oversized reply is reversed as an error in its place.
        assert!(is_reply(&out.attr("type").map(str::to_owned)), "{xml}");
        return None;
    }
    if verdict == Verdict::Outbound {
        // A stanza the target started, to the peer its token names or its escaped address,
        // from the component; an IQ's id is a route back to the target's resource.
        assert!(from_target, "only the target starts stanzas: {xml}");
        assert_ne!(out_to.to_bare(), *target, "{xml}");
        assert!(
            outbound != Outbound::None,
            "started with outbound = none: {xml}"
        );
        let (peer, peer_from) = match in_to.node() {
            Some(_) => {
                assert_eq!(outbound, Outbound::Any, "escaped needs `any`: {xml}");
                // The node as written (the core reads it before JID preparation folds it).
                let raw =
                    h.to.as_deref()
                        .and_then(|t| t.split_once('@'))
                        .map(|(n, _)| n);
                let peer = jid(raw.and_then(crate::proxy::unescape).as_deref())
                    .expect("an escaped address");
                (peer, COMPONENT.to_owned())
            }
            None => {
                let opened = opened_in(
                    Binding::Peer {
                        component: COMPONENT,
                    },
                    MESSAGE_LIFETIME,
                )
                .unwrap_or_else(|| panic!("started without a valid token: {xml}"));
                // An IQ token names its peer only within the IQ lifetime.
                if opened.kind == token::Kind::Iq {
                    assert!(
                        now_ms < opened.issued_ms + 300_000,
                        "expired IQ token: {xml}"
                    );
                }
                let from = opened.original_to.unwrap_or_else(|| COMPONENT.to_owned());
                (jid(Some(&opened.sender)).unwrap(), from)
            }
        };
        assert_eq!(out_to, peer, "{xml}");
        assert_eq!(Some(&out_from), jid(Some(&peer_from)).as_ref(), "{xml}");
        assert!(
            !out_to.domain().as_str().ends_with("spam.example"),
            "a peer refused by policy: {xml}"
        );
        assert_eq!(out.name(), h.name, "{xml}");
        if h.name == "iq" {
            let route_id = out.attr("id").expect("a routed IQ has an id");
            let route =
                token::open_route(&keys(), COMPONENT, out_to.as_str(), route_id, now_ms, 300)
                    .expect("a fresh route opens for its peer");
            assert_eq!(jid(Some(&route.client)).as_ref(), Some(&in_from), "{xml}");
            assert_eq!(jid(Some(&route.client_to)).as_ref(), Some(&in_to), "{xml}");
            assert_eq!(Some(route.id.as_str()), h.id.as_deref(), "{xml}");
            // The route stands in for TOKEN next, so a replayed (or another peer's) reply
            // carrying it is tried.
            return Some(route_id.to_owned());
        }
        return None;
    }
    if h.name == "message" && verdict == Verdict::Reversed {
        assert_eq!(messages, Messages::Forward, "reversed a message: {xml}");
        // The target's message to a message token (an error too), to the sender it holds.
        assert!(from_target, "reversed a message from outside: {xml}");
        let opened = opened_in(Binding::message(COMPONENT), MESSAGE_LIFETIME)
            .unwrap_or_else(|| panic!("reversed without a valid message token: {xml}"));
        reversed(opened);
        assert_eq!(out.attr("type"), h.type_.as_deref(), "{xml}");
        return None;
    }
    if h.name == "message" && h.type_.as_deref() == Some("error") {
        panic!("answered a message error: {xml}");
    }
    match verdict {
        Verdict::Refused(_) => {
            assert_eq!(out.attr("type"), Some("error"), "{xml}");
            assert_eq!(out_to, in_from, "errors go back to the sender: {xml}");
            assert_eq!(out.name(), h.name);
            assert_eq!(out.attr("id"), h.id.as_deref());
            None
        }
        Verdict::Forwarded => {
            let binding = match h.name.as_str() {
                "iq" => {
                    assert!(matches!(h.type_.as_deref(), Some("get") | Some("set")));
                    let id = h.id.as_deref().expect("forwarded requests have ids");
                    Binding::iq(COMPONENT, id)
                }
                "message" => {
                    assert_eq!(messages, Messages::Forward, "forwarded a message: {xml}");
                    Binding::message(COMPONENT)
                }
                other => panic!("forwarded a {other}: {xml}"),
            };
            assert!(!from_target, "the target's own stanzas are not forwarded");
            assert_eq!(out_to.to_bare(), *target, "{xml}");
            let res = out_to.resource().expect("to a resource").as_str();
            assert!(
                resources_before.iter().any(|r| r == res),
                "to an available resource"
            );
            assert_eq!(out.name(), h.name);
            let resource = out_from.resource().expect("from a token").as_str();
            if sender == Sender::Revealed && h.name == "iq" {
                // The sender in clear as the resource; the token in the id, after the
                // original one.
                assert_eq!(resource, in_from.as_str(), "{xml}");
                let (original, t) = out
                    .attr("id")
                    .and_then(|i| i.rsplit_once('.'))
                    .unwrap_or_else(|| panic!("ID.TOKEN: {xml}"));
                assert_eq!(Some(original), h.id.as_deref());
                let binding = Binding::iq(REVEALED, original);
                let opened = token::open(&keys(), binding, t, now_ms, 300).expect("a fresh token");
                assert_eq!(jid(Some(&opened.sender)).unwrap(), in_from);
                // Revealed tokens open only as revealed replies: never as a token address.
                assert!(
                    token::open(&keys(), Binding::iq(COMPONENT, original), t, now_ms, 300).is_err()
                );
                return Some(out.attr("id").expect("checked").to_owned());
            }
            assert_eq!(out.attr("id"), h.id.as_deref());
            let (pseudonym, t) = split_pseudonym(resource);
            assert_eq!(
                pseudonym.is_some(),
                sender == Sender::Pseudonym,
                "a pseudonym where, and only where, configured: {xml}"
            );
            let lifetime = if h.name == "message" {
                MESSAGE_LIFETIME
            } else {
                300
            };
            let opened =
                token::open(&keys(), binding, t, now_ms, lifetime).expect("a fresh token opens");
            assert_eq!(
                jid(Some(&opened.sender)).unwrap(),
                in_from,
                "token holds the sender"
            );
            check_pseudonym(pseudonym, &in_from);
            Some(resource.to_owned())
        }
        Verdict::Presence => {
            assert_eq!(out.name(), "presence");
            assert!(from_target, "presence answers go to the target only");
            assert_eq!(out.attr("to"), Some(TARGET));
            None
        }
        Verdict::Held => {
            assert_probe(out);
            None
        }
        Verdict::Reversed
        | Verdict::Outbound
        | Verdict::Routed
        | Verdict::TokenRejected(_)
        | Verdict::Dropped(_)
        | Verdict::Probe => {
            panic!("unexpected output {verdict:?}: {xml}")
        }
    }
}

fn assert_probe(out: &Element) {
    let xml = String::from(out);
    assert_eq!(out.name(), "presence", "{xml}");
    assert_eq!(out.attr("type"), Some("probe"), "{xml}");
    assert_eq!(out.attr("to"), Some(TARGET), "{xml}");
    assert_eq!(out.attr("from"), Some(COMPONENT), "{xml}");
}

/// The requests the core holds while no resource is known, seen from the outside: each
/// leaves exactly once — forwarded to an available resource with a token that opens to its
/// sender, or refused with `service-unavailable` (or dropped, once the sender's error budget
/// is spent) — and none waits past the hold time once the core was given the time.
#[derive(Default)]
struct HeldRequests {
    /// (id, sender, held since in monotonic ms).
    waiting: Vec<(String, Jid, u64)>,
}

impl HeldRequests {
    fn held(&mut self, h: &Header, mono_ms: u64) {
        let from = jid(h.from.as_deref()).expect("a held request has a valid sender");
        let id = h.id.clone().expect("a held request has an id");
        self.waiting.push((id, from, mono_ms));
    }

    /// Checks one stanza the core sent besides an answer, and that its verdict says what it
    /// is (a probe, or a held request forwarded or refused: an IQ); returns the token of a
    /// released request.
    fn transmitted(
        &mut self,
        outcome: &Outcome,
        resources: &[String],
        target: &BareJid,
        now_ms: u64,
    ) -> Option<String> {
        let out = outcome
            .transmit
            .as_ref()
            .expect("poll_transmit always transmits");
        let xml = String::from(out);
        assert_eq!(outcome.reply_latency_ms, None, "{xml}");
        if outcome.verdict == Verdict::Probe {
            assert_eq!(outcome.stanza, Stanza::Presence, "{xml}");
            assert_probe(out);
            return None;
        }
        assert_eq!(outcome.stanza, Stanza::Iq, "{xml}");
        assert_eq!(out.name(), "iq", "{xml}");
        let id = out.attr("id").expect("held requests have ids").to_owned();
        let out_to = jid(out.attr("to")).expect("valid to");
        match out.attr("type") {
            Some("get") | Some("set") => {
                assert_eq!(outcome.verdict, Verdict::Forwarded, "{xml}");
                assert_eq!(out_to.to_bare(), *target, "{xml}");
                let res = out_to.resource().expect("to a resource").as_str();
                assert!(
                    resources.iter().any(|r| r == res),
                    "to an available resource"
                );
                let out_from = jid(out.attr("from")).expect("valid from");
                assert_eq!(out_from.domain().as_str(), COMPONENT, "{xml}");
                let resource = out_from.resource().expect("from a token").as_str();
                // The revealed form: `ID.TOKEN` as id, the sender in clear as the resource.
                if let Some((original, t)) = id.rsplit_once('.')
                    && let Ok(opened) =
                        token::open(&keys(), Binding::iq(REVEALED, original), t, now_ms, 300)
                {
                    assert_eq!(opened.sender, resource, "{xml}");
                    let sender = jid(Some(&opened.sender)).expect("a valid sender");
                    self.leave(original, &sender, &xml);
                    return Some(id.clone());
                }
                let (pseudonym, t) = split_pseudonym(resource);
                let binding = Binding::iq(COMPONENT, &id);
                let opened = token::open(&keys(), binding, t, now_ms, 300).expect("a fresh token");
                let sender = jid(Some(&opened.sender)).expect("a valid sender");
                check_pseudonym(pseudonym, &sender);
                self.leave(&id, &sender, &xml);
                Some(resource.to_owned())
            }
            Some("error") => {
                // From the address the request was sent to: any at the component's domain
                // (`svc@proxy.example/x` too; found by the fuzzer).
                assert_eq!(
                    jid(out.attr("from")).map(|f| f.domain().as_str() == COMPONENT),
                    Some(true),
                    "{xml}"
                );
                // Its time ran out (service-unavailable), or it was released but its sender's
                // address is too long to seal (not-acceptable; found by the fuzzer).
                let condition = crate::stanza::error_condition(out);
                assert!(
                    matches!(
                        condition.as_deref(),
                        Some("service-unavailable" | "not-acceptable")
                    ),
                    "{xml}"
                );
                assert!(
                    matches!(outcome.verdict, Verdict::Refused(c) if Some(c.name()) == condition.as_deref()),
                    "{:?}: {xml}",
                    outcome.verdict
                );
                self.leave(&id, &out_to, &xml);
                None
            }
            _ => panic!("unexpected stanza sent: {xml}"),
        }
    }

    fn leave(&mut self, id: &str, sender: &Jid, xml: &str) {
        let at = self
            .waiting
            .iter()
            .position(|(i, f, _)| i == id && f == sender)
            .unwrap_or_else(|| panic!("sent, but never held (or sent twice): {xml}"));
        self.waiting.remove(at);
    }

    /// After the core was given the time `mono_ms`: held requests either wait within the
    /// hold time, or were dropped with the sender's error budget spent (checked by the
    /// caller through `held()`), never more than the core says it holds.
    fn settled(&mut self, held_by_core: usize, hold_ms: u64, mono_ms: u64) {
        // Refusals dropped for the error budget leave no trace: forget the oldest.
        while self.waiting.len() > held_by_core {
            self.waiting.remove(0);
        }
        for (id, _, since) in &self.waiting {
            assert!(
                mono_ms < since + hold_ms,
                "request {id} held since {since} ms, still held at {mono_ms} ms"
            );
        }
    }
}

/// What the rate limiter's buckets allow, checked from the outside: per key, the outputs
/// counted since the first one must fit in a bucket that was at most full then.
struct Budgets {
    account: (f64, f64),
    domain: (f64, f64),
    evictions: (u64, u64),
    /// (kind, key) -> (first output, in monotonic ms; outputs since).
    seen: HashMap<(&'static str, String), (u64, u64)>,
}

impl Budgets {
    fn new(rate: RateLimit) -> Budgets {
        Budgets {
            account: (rate.per_second, rate.burst),
            domain: (rate.per_domain, rate.domain_burst),
            evictions: (0, 0),
            seen: HashMap::new(),
        }
    }

    /// A forgotten bucket comes back full: start counting afresh for every key of that table
    /// (the bound holds for any stretch of time, so restarting it is always sound).
    fn evictions(&mut self, limiter: &Limiter) {
        let now = (limiter.account_evictions(), limiter.domain_evictions());
        if now.0 != self.evictions.0 {
            self.seen.retain(|(kind, _), _| *kind == "domain");
        }
        if now.1 != self.evictions.1 {
            self.seen.retain(|(kind, _), _| *kind != "domain");
        }
        self.evictions = now;
    }

    fn charge(
        &mut self,
        h: &Header,
        out: &Element,
        verdict: Verdict,
        target: &BareJid,
        now_ms: u64,
    ) {
        let bare = |s: Option<&str>| jid(s).map(|j| j.to_bare().to_string());
        let reply = h.name == "iq" && matches!(h.type_.as_deref(), Some("result" | "error"));
        let from_target = jid(h.from.as_deref()).is_some_and(|j| j.to_bare() == *target);
        match verdict {
            // A peer's reply routed to the target: charged to the peer's routed budget (the
            // outbound rate, twice its burst).
            _ if reply && !from_target => {
                let routed = (self.account.0, 2.0 * self.account.1);
                self.count("routed", bare(h.from.as_deref()), routed, now_ms)
            }
            // Replies reversed: charged to the token they went through.
            _ if reply => self.count("replies", budget_key(h), self.account, now_ms),
            Verdict::Reversed if h.name == "message" => {
                self.count("replies", budget_key(h), self.account, now_ms)
            }
            // One budget for everything the implementing client starts, whoever it names.
            Verdict::Outbound => {
                self.count("outbound", Some(target.to_string()), self.account, now_ms)
            }
            Verdict::Refused(_) => self.count("errors", bare(out.attr("to")), self.account, now_ms),
            Verdict::Forwarded => self.request(h, target, now_ms),
            _ => {}
        }
    }

    /// A request let through the rate limits (forwarded, or held: charged on arrival).
    fn request(&mut self, h: &Header, target: &BareJid, now_ms: u64) {
        let from = jid(h.from.as_deref()).expect("forwarded from a valid sender");
        self.count(
            "requests",
            Some(from.to_bare().to_string()),
            self.account,
            now_ms,
        );
        if from.domain() != target.domain() {
            let d = from.domain().to_string();
            self.count("domain", Some(d), self.domain, now_ms);
        }
    }

    fn count(&mut self, kind: &'static str, key: Option<String>, rate: (f64, f64), now_ms: u64) {
        let key = key.expect("outputs go to valid addresses");
        let (first, n) = self.seen.entry((kind, key.clone())).or_insert((now_ms, 0));
        *n += 1;
        let (per_second, burst) = rate;
        let bound = burst + per_second * (now_ms - *first) as f64 / 1000.0;
        assert!(
            *n as f64 <= bound + 1e-6,
            "{n} {kind} for {key} within {} ms: over the bucket ({bound})",
            now_ms - *first
        );
    }
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Limits of the byte-path harness: small, so the fuzzer reaches them.
pub const WIRE_LIMITS: Limits = Limits {
    max_bytes: 16 * 1024,
    max_depth: 12,
    max_nodes: 1024,
};

/// The stream header the byte-path harness reads first: what Prosody sends a component.
pub const WIRE_HEADER: &[u8] = b"<?xml version='1.0'?><stream:stream \
    xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' \
    from='proxy.example' id='s1'>";

/// The real byte path, from raw bytes: the stream reader, the core and the writer, as the
/// session runs them. Ill-formed input may end the session; short of that, every stanza
/// read is checked as [`proxy`] checks it, the reader never holds more than the byte
/// limit, and everything written re-parses as well-formed XML.
///
/// Input: one byte that picks the chunk size the bytes arrive in, then what the server
/// sends after its stream header.
pub fn wire_raw(data: &[u8]) {
    let (chunk, rest) = match data {
        [c, rest @ ..] => (usize::from(*c) + 1, rest),
        [] => (1, data),
    };
    let mut session = Wire::new();
    session
        .feed(WIRE_HEADER)
        .expect("the header is well-formed");
    for c in rest.chunks(chunk) {
        if session.feed(c).is_err() {
            break;
        }
    }
    session.finish();
}

/// The real byte path, from well-formed stanzas generated from `data` (every stanza kind
/// and type, long tokens, many attributes, deep trees, odd namespaces, comments, CDATA,
/// genuine and forged tokens): on top of [`wire_raw`]'s checks, **no well-formed stanza
/// ends the session**, each one is read as exactly one stanza, and it is skipped as
/// oversized exactly when it is over [`WIRE_LIMITS`].
pub fn wire_structured(data: &[u8]) {
    let mut u = arbitrary::Unstructured::new(data);
    let chunk = u.int_in_range(1..=4096usize).unwrap_or(64);
    let mut generated = Vec::new();
    while !u.is_empty() && generated.len() < 24 {
        match generate::stanza(&mut u) {
            Ok(s) => generated.push(s),
            Err(_) => break,
        }
    }
    let mut bytes = WIRE_HEADER.to_vec();
    for s in &generated {
        bytes.extend_from_slice(b"\n ");
        bytes.extend_from_slice(&s.xml);
    }
    let mut session = Wire::new();
    for c in bytes.chunks(chunk) {
        if let Err(e) = session.feed(c) {
            panic!("a well-formed stanza ended the session: {e}");
        }
    }
    assert_eq!(session.oversized.len(), generated.len(), "one stanza each");
    for (s, oversized) in generated.iter().zip(&session.oversized) {
        let mut over = s.xml.len() > WIRE_LIMITS.max_bytes
            || s.depth > WIRE_LIMITS.max_depth
            || lexed_nodes(&s.xml) > WIRE_LIMITS.max_nodes;
        let mut nodes = None;
        if !over {
            // Its nodes, counted on the tree read without a node limit.
            let unlimited = Limits {
                max_nodes: usize::MAX,
                ..WIRE_LIMITS
            };
            match read_one(&s.xml, unlimited) {
                Some(Inbound::Element(el)) => {
                    let (n, strings) = (count_nodes(&el), crate::inbound::tree_strings(&el));
                    over = n > WIRE_LIMITS.max_nodes || strings > WIRE_LIMITS.tree_bytes();
                    nodes = Some((n, strings));
                }
                other => panic!("a stanza within the limits reads whole: {other:?}"),
            }
        }
        assert_eq!(
            *oversized,
            over,
            "{} bytes, depth {}, (nodes, string bytes) {nodes:?}",
            s.xml.len(),
            s.depth
        );
    }
    session.finish();
}

/// The key of the reply budget of the token a reply was sent to: its last 22 characters.
fn budget_key(h: &Header) -> Option<String> {
    let to = h.to.as_deref()?;
    let token = to.split_once('/')?.1;
    let start = token.len().saturating_sub(22);
    Some(token.get(start..).unwrap_or(token).to_owned())
}

/// Elements, attributes and text nodes of a tree, as the reader counts them.
fn count_nodes(el: &Element) -> usize {
    1 + el.attrs().len()
        + el.nodes()
            .map(|n| match n {
                xmpp_parsers::minidom::Node::Element(c) => count_nodes(c),
                xmpp_parsers::minidom::Node::Text(_) => 1,
            })
            .sum::<usize>()
}

/// Start tags and quoted attribute values (namespace declarations included) of an element
/// as written, as the framer counts them: a lexer of its own, for markup the generator
/// writes (comments, CDATA and processing instructions hold `<` and quotes that count for
/// nothing).
fn lexed_nodes(xml: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    let find = |from: usize, pat: &[u8]| {
        xml[from..]
            .windows(pat.len())
            .position(|w| w == pat)
            .map_or(xml.len(), |p| from + p + pat.len())
    };
    while i < xml.len() {
        if xml[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &xml[i..];
        if rest.starts_with(b"<!--") {
            i = find(i + 4, b"-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = find(i + 9, b"]]>");
        } else if rest.starts_with(b"<?") {
            i = find(i + 2, b"?>");
        } else if rest.starts_with(b"</") {
            i = find(i + 2, b">");
        } else {
            // A start tag: its quoted values, up to its `>`.
            n += 1;
            i += 1;
            while i < xml.len() && xml[i] != b'>' {
                if xml[i] == b'\'' || xml[i] == b'"' {
                    let q = xml[i];
                    n += 1;
                    i += 1;
                    while i < xml.len() && xml[i] != q {
                        i += 1;
                    }
                }
                i += 1;
            }
            i += 1;
        }
    }
    n
}

/// One session of the byte-path harness.
struct Wire {
    reader: Reader,
    writer: Writer,
    out: Vec<u8>,
    written: usize,
    proxy: Proxy,
    rng: SeededRandom,
    target: BareJid,
    /// Per stanza read: whether it was over a limit.
    oversized: Vec<bool>,
    held: HeldRequests,
}

impl Wire {
    fn new() -> Wire {
        let mut proxy = Proxy::new(settings(), keys());
        let _ = proxy.connected(Clock {
            unix_ms: NOW * 1000,
            mono_ms: 0,
        });
        Wire {
            reader: Reader::new(WIRE_LIMITS),
            writer: Writer::resumed(),
            out: Vec::new(),
            written: 0,
            proxy,
            rng: SeededRandom::new(7),
            target: BareJid::new(TARGET).unwrap(),
            oversized: Vec::new(),
            held: HeldRequests::default(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<(), ReadError> {
        self.reader.feed(bytes)?;
        assert!(
            self.reader.held() <= WIRE_LIMITS.max_bytes,
            "the reader holds {} bytes",
            self.reader.held()
        );
        while let Some(frame) = self.reader.next_frame()? {
            let Frame::Stanza(inbound) = frame else {
                continue;
            };
            self.oversized
                .push(matches!(inbound, Inbound::Oversized(_)));
            let h = header(&inbound);
            let resources_before = eligible(&self.proxy);
            let clock = Clock {
                unix_ms: NOW * 1000,
                mono_ms: 0,
            };
            let Outcome {
                transmit: out,
                verdict,
                ..
            } = self.proxy.handle(inbound, clock, &mut self.rng);
            assert!(self.proxy.resources().len() <= 4);
            assert!(self.proxy.tracked_senders() <= 8);
            assert!(self.proxy.limiter().domains() <= 8);
            if verdict == Verdict::Held {
                self.held.held(&h, 0);
            }
            if let Some(out) = out {
                let flows = self.proxy.settings();
                check_output(
                    &h,
                    &out,
                    verdict,
                    &resources_before,
                    (&self.target, flows.messages, flows.outbound, flows.sender),
                    NOW * 1000,
                );
                self.write(&out);
                self.written += 1;
            }
            while let Some(out) = self.proxy.poll_transmit(clock, &mut self.rng) {
                self.held
                    .transmitted(&out, &eligible(&self.proxy), &self.target, NOW * 1000);
                let out = out.transmit.expect("poll_transmit always transmits");
                self.write(&out);
                self.written += 1;
            }
        }
        Ok(())
    }

    /// Writes `out` as the session does, and checks that the writer's direct path wrote
    /// exactly what rxml's encoder writes.
    fn write(&mut self, out: &Element) {
        let before = self.out.len();
        self.writer
            .element(out, &mut self.out)
            .expect("everything the core emits serialises");
        let mut encoded = Vec::new();
        Writer::resumed()
            .element_by_encoder(out, &mut encoded)
            .expect("everything the core emits serialises");
        assert_eq!(
            String::from_utf8_lossy(&self.out[before..]),
            String::from_utf8_lossy(&encoded),
            "the direct writer and the encoder differ"
        );
    }

    /// Everything written re-parses as well-formed XML, one element per stanza written.
    fn finish(self) {
        let mut header = Vec::new();
        Writer::new().header(&[("to", COMPONENT)], &mut header);
        // Nothing written can be longer than all of it (and the parser's buffer is sized
        // by this limit: no larger than needed).
        let mut r = Reader::new(Limits {
            max_bytes: self.out.len().max(4096),
            max_depth: 1 << 16,
            max_nodes: crate::inbound::MAX_NODES,
        });
        r.feed(&header).expect("our header is well-formed");
        r.feed(&self.out).expect("our output is well-formed");
        let mut n = 0;
        while let Some(f) = r.next_frame().expect("our output is well-formed") {
            if let Frame::Stanza(Inbound::Element(_)) = f {
                n += 1;
            }
        }
        assert_eq!(n, self.written, "every stanza written reads back");
    }
}

/// The generator of well-formed stanzas for [`wire_structured`].
mod generate {
    use arbitrary::{Result, Unstructured};

    use super::{COMPONENT, NOW, keys};
    use crate::token::{self, Binding, Contents};

    /// A generated stanza: its bytes and its depth (the stanza element is level 1).
    pub struct Stanza {
        pub xml: Vec<u8>,
        pub depth: usize,
    }

    const SENDERS: &[&str] = &[
        "u@example/r",
        "v@example/phone",
        "impl@example/a",
        "impl@example/b",
        "impl@example",
        "x@spam.example/y",
        "proxy.example",
        "@@bad",
        "example",
    ];

    pub fn stanza(u: &mut Unstructured<'_>) -> Result<Stanza> {
        let name = *u.choose(&["iq", "iq", "iq", "message", "presence", "other"])?;
        let type_ = *u.choose(&[
            "get",
            "set",
            "result",
            "error",
            "weird",
            "",
            "probe",
            "subscribe",
            "subscribed",
            "unavailable",
            "chat",
            "normal",
            "groupchat",
            "headline",
            "-",
        ])?;
        let from = *u.choose(SENDERS)?;
        let id = match u.int_in_range(0..=5u8)? {
            0 => None,
            1 => Some(String::new()),
            2 => Some("x".repeat(u.int_in_range(1000..=20_000usize)?)),
            _ => Some(text(u, 12)?),
        };
        let to = match u.int_in_range(0..=6u8)? {
            0 => None,
            1 | 2 => {
                // A genuine token for a sender of the pool and this id (or another one).
                let sender = *u.choose(SENDERS)?;
                let bound = if u.ratio(1, 8)? {
                    "other".to_owned()
                } else {
                    id.clone().unwrap_or_default()
                };
                // Mostly IQ tokens; a message token now and then (the message flow's, and
                // offered for an IQ reply: the wrong kind).
                let binding = if u.ratio(1, 4)? {
                    Binding::message(COMPONENT)
                } else {
                    Binding::iq(COMPONENT, &bound)
                };
                let contents = Contents {
                    sender,
                    original_to: None,
                };
                let salt = u.arbitrary()?;
                let t = token::seal(&keys(), binding, &contents, NOW * 1000, salt).expect("fits");
                Some(format!("{COMPONENT}/{t}"))
            }
            3 => Some(COMPONENT.to_owned()),
            4 => Some(format!("svc@{COMPONENT}/{}", text(u, 8)?)),
            5 => Some(format!("{COMPONENT}/{}", text(u, 30)?)),
            _ => Some("impl@example/a".to_owned()),
        };
        let mut xml = Vec::new();
        let el_name = if name == "other" {
            self::name(u)?
        } else {
            name.to_owned()
        };
        xml.extend_from_slice(b"<");
        xml.extend_from_slice(el_name.as_bytes());
        if name == "other" && u.ratio(1, 2)? {
            xml.extend_from_slice(b" xmlns='urn:other'");
        }
        for (k, v) in [
            (
                "type",
                (!type_.is_empty() || u.ratio(1, 4)?).then(|| type_.to_owned()),
            ),
            ("from", Some(from.to_owned())),
            ("to", to),
            ("id", id),
        ] {
            if let Some(v) = v {
                attr(u, &mut xml, k, &v)?;
            }
        }
        let mut depth = 1;
        if u.ratio(1, 6)? {
            xml.extend_from_slice(b"/>");
        } else {
            xml.extend_from_slice(b">");
            let n = u.int_in_range(0..=3u8)?;
            for _ in 0..n {
                depth = depth.max(1 + child(u, &mut xml, 1)?);
            }
            xml.extend_from_slice(b"</");
            xml.extend_from_slice(el_name.as_bytes());
            xml.extend_from_slice(b">");
        }
        Ok(Stanza { xml, depth })
    }

    /// A payload element at `level` (the stanza is level 1); returns the depth below and
    /// including it.
    fn child(u: &mut Unstructured<'_>, xml: &mut Vec<u8>, level: usize) -> Result<usize> {
        match u.int_in_range(0..=9u8)? {
            0 => {
                escaped_text(u, xml)?;
                return Ok(0);
            }
            1 => {
                xml.extend_from_slice(b"<![CDATA[");
                xml.extend_from_slice(text(u, 40)?.replace("]]>", "").as_bytes());
                xml.extend_from_slice(b"]]>");
                return Ok(0);
            }
            2 => {
                xml.extend_from_slice(b"<!--");
                xml.extend_from_slice(text(u, 20)?.replace('-', "").as_bytes());
                xml.extend_from_slice(b"-->");
                return Ok(0);
            }
            3 => {
                xml.extend_from_slice(b"<?pi ");
                xml.extend_from_slice(text(u, 20)?.replace('?', "").as_bytes());
                xml.extend_from_slice(b"?>");
                return Ok(0);
            }
            _ => {}
        }
        let prefixed = u.ratio(1, 4)?;
        let local = name(u)?;
        let qname = if prefixed {
            format!("p:{local}")
        } else {
            local
        };
        xml.push(b'<');
        xml.extend_from_slice(qname.as_bytes());
        if prefixed {
            xml.extend_from_slice(b" xmlns:p='urn:p'");
        } else if level == 1 || u.ratio(1, 4)? {
            xml.extend_from_slice(b" xmlns='urn:x:");
            xml.extend_from_slice(u.int_in_range(0..=9u8)?.to_string().as_bytes());
            xml.push(b'\'');
        }
        let n_attrs = match u.int_in_range(0..=20u8)? {
            0 => u.int_in_range(100..=3000usize)?,
            n => usize::from(n % 4),
        };
        for i in 0..n_attrs {
            let v = text(u, 16)?;
            attr(u, xml, &format!("a{i}"), &v)?;
        }
        if u.ratio(1, 12)? {
            let v = "v".repeat(u.int_in_range(1000..=40_000usize)?);
            attr(u, xml, "long", &v)?;
        }
        if u.ratio(1, 5)? {
            xml.extend_from_slice(b"/>");
            return Ok(1);
        }
        xml.push(b'>');
        let mut below = 0;
        // Chains deeper than the limit, sometimes.
        let n = if level < 20 {
            u.int_in_range(0..=3u8)?
        } else {
            0
        };
        for _ in 0..n {
            below = below.max(child(u, xml, level + 1)?);
        }
        xml.extend_from_slice(b"</");
        xml.extend_from_slice(qname.as_bytes());
        xml.push(b'>');
        Ok(1 + below)
    }

    /// An element name: short, or long.
    fn name(u: &mut Unstructured<'_>) -> Result<String> {
        let first = *u.choose(&["q", "query", "x", "body", "n\u{e9}", "\u{1F980}", "_a"])?;
        let mut n = first.to_owned();
        if u.ratio(1, 10)? {
            n.push_str(&"n".repeat(u.int_in_range(100..=10_000usize)?));
        } else {
            for _ in 0..u.int_in_range(0..=6u8)? {
                n.push(*u.choose(&['a', 'z', '0', '-', '.', '_', '\u{e9}'])?);
            }
        }
        Ok(n)
    }

    /// Up to `max` characters of every kind a stanza may hold (no `\r`, which parsers
    /// normalise; no characters XML forbids).
    fn text(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
        let len = u.int_in_range(0..=max)?;
        let mut s = String::with_capacity(len);
        for _ in 0..len {
            let c = match u.int_in_range(0..=9u8)? {
                0 => *u.choose(&['<', '>', '&', '\'', '"', '\t', '\n', ' ', ']'])?,
                1 => char::from_u32(u.int_in_range(0x1_0000..=0x10_FFFDu32)?).unwrap_or('x'),
                2 => char::from_u32(u.int_in_range(0xA0..=0xD7FFu32)?).unwrap_or('y'),
                _ => char::from(u.int_in_range(b'!'..=b'~')?),
            };
            s.push(c);
        }
        Ok(s)
    }

    fn escaped_text(u: &mut Unstructured<'_>, xml: &mut Vec<u8>) -> Result<()> {
        let t = if u.ratio(1, 10)? {
            "t".repeat(u.int_in_range(1000..=40_000usize)?)
        } else {
            text(u, 40)?
        };
        escape(u, xml, &t, 0)
    }

    fn attr(u: &mut Unstructured<'_>, xml: &mut Vec<u8>, name: &str, value: &str) -> Result<()> {
        let quote = if u.ratio(1, 2)? { b'\'' } else { b'"' };
        xml.push(b' ');
        xml.extend_from_slice(name.as_bytes());
        xml.push(b'=');
        xml.push(quote);
        escape(u, xml, value, quote)?;
        xml.push(quote);
        Ok(())
    }

    /// Escapes what must be, and sometimes more, by entity or character reference.
    fn escape(u: &mut Unstructured<'_>, xml: &mut Vec<u8>, s: &str, quote: u8) -> Result<()> {
        let by_ref = u.ratio(1, 8)?;
        for c in s.chars() {
            match c {
                '<' => xml.extend_from_slice(b"&lt;"),
                '&' => xml.extend_from_slice(b"&amp;"),
                '>' => xml.extend_from_slice(b"&gt;"),
                '\'' if quote == b'\'' => xml.extend_from_slice(b"&apos;"),
                '"' if quote == b'"' => xml.extend_from_slice(b"&quot;"),
                c if by_ref && !c.is_ascii() => {
                    xml.extend_from_slice(format!("&#x{:X};", c as u32).as_bytes())
                }
                c => {
                    let mut b = [0u8; 4];
                    xml.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
        Ok(())
    }
}

/// The resources the proxy may choose now: every stanza it forwards must go to one of them.
fn eligible(proxy: &Proxy) -> Vec<String> {
    proxy
        .resources()
        .eligible_names()
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scripted_session_satisfies_the_invariants() {
        let script = [
            "<presence from='impl@example/a' to='proxy.example'/>",
            "<iq type='get' id='1' from='u@example/r' to='proxy.example'><q xmlns='x'/></iq>",
            "<iq type='result' id='1' from='impl@example/a' to='proxy.example/TOKEN'/>",
            "<iq type='result' id='2' from='impl@example/a' to='proxy.example/TOKEN'/>",
            "<message from='u@example/r' to='proxy.example'/>",
            "<iq type='bogus' id='3' from='u@example/r' to='proxy.example'/>",
            "<presence type='subscribe' from='impl@example' to='proxy.example'/>",
        ];
        let bytes = script.map(str::as_bytes).join(&SEPARATOR);
        proxy(&bytes);
    }

    /// Floods of every kind the rate limiter bounds, within the invariants (which count what
    /// comes out against the buckets: without the domain bucket, the error budget or the
    /// per-recipient limit, this script breaks them).
    #[test]
    fn a_scripted_flood_stays_within_the_buckets() {
        let mut script = vec!["<presence from='impl@example/a' to='proxy.example'/>".to_owned()];
        script.push(
            "<iq type='get' id='1' from='u@example/r' to='proxy.example'><q xmlns='x'/></iq>"
                .into(),
        );
        for _ in 0..30 {
            script.push(
                "<iq type='result' id='1' from='impl@example/a' to='proxy.example/TOKEN'/>".into(),
            );
        }
        for _ in 0..30 {
            script.push("<iq type='get' id='2' from='bot@example/r' to='proxy.example'/>".into());
        }
        for i in 0..7 {
            for j in 0..4 {
                script.push(format!(
                    "<iq type='get' id='{j}' from='a{i}@remote.example/r' to='proxy.example'><q xmlns='x'/></iq>"
                ));
            }
        }
        let bytes = script
            .iter()
            .map(|s| s.as_bytes())
            .collect::<Vec<_>>()
            .join(&SEPARATOR);
        proxy(&bytes);
    }

    #[test]
    fn token_harness_accepts_a_genuine_token() {
        let keys = keys();
        let t = token::seal(
            &keys,
            Binding::iq(COMPONENT, "abc"),
            &Contents {
                sender: "u@example/r",
                original_to: None,
            },
            NOW * 1000,
            [3; token::SALT_LEN],
        )
        .unwrap();
        let mut input = b"abc\0".to_vec();
        input.extend_from_slice(t.as_bytes());
        token(&input);
    }
}
