//! Properties that must hold for *any* input, checked by panicking. The cargo-fuzz targets in
//! `fuzz/` call these functions on arbitrary bytes, `cargo test` replays the committed fuzz
//! corpora through them, and the property tests drive them with generated stanzas — so the
//! fuzzer, the stable test suite and proptest check the very same statements.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jid::{BareJid, Jid};
use xmpp_parsers::minidom::Element;

use crate::inbound::{Inbound, Limits, read_one};
use crate::keys::KeySet;
use crate::policy::{Entry, Policy};
use crate::proxy::{Clock, Proxy, Settings, Verdict};
use crate::random::SeededRandom;
use crate::rate::{Limiter, RateLimit};
use crate::token::{self, Binding, Contents};

/// The component the harnesses run as.
pub const COMPONENT: &str = "proxy.example";
/// The target account the harnesses serve.
pub const TARGET: &str = "impl@example";
/// The fixed clock of the token harness (Unix seconds).
pub const NOW: u64 = 1_790_000_000;
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
    let binding = Binding {
        component: COMPONENT,
        iq_id: &id,
    };
    let keys = keys();
    if let Ok(opened) = token::open(&keys, binding, &text, NOW, 300) {
        let raw = URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .expect("opened, so base64");
        let issued = u64::from_be_bytes(raw[5..13].try_into().unwrap());
        let salt: [u8; token::SALT_LEN] = raw[13..token::HEADER_LEN].try_into().unwrap();
        let single = key_alone(opened.key_id).expect("opened with a known key");
        let contents = Contents {
            sender: &opened.sender,
            original_to: opened.original_to.as_deref(),
        };
        let resealed =
            token::seal(&single, binding, &contents, issued, salt).expect("what was sealed fits");
        assert_eq!(
            resealed, text,
            "an accepted token must be exactly the keys' output"
        );
    }
    // Roundtrip with the input as the sender's address.
    if !text.contains('\0') {
        let contents = Contents {
            sender: &text,
            original_to: None,
        };
        match token::seal(&keys, binding, &contents, NOW, [7; token::SALT_LEN]) {
            Ok(t) => {
                assert!(t.len() <= token::MAX_TOKEN_LEN);
                let opened = token::open(&keys, binding, &t, NOW, 300).expect("roundtrip");
                assert_eq!(opened.sender, text.as_ref());
                assert_eq!(opened.original_to, None);
                let other = Binding {
                    component: COMPONENT,
                    iq_id: &format!("{id}x"),
                };
                assert!(token::open(&keys, other, &t, NOW, 300).is_err());
            }
            Err(e) => assert!(e.len > token::MAX_PLAINTEXT_LEN),
        }
    }
}

/// Configuration parser: never panics, and what it accepts is within the documented ranges.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = crate::config::parse(Path::new("fuzz.toml"), &text) {
        assert!((10..=86400).contains(&c.token_lifetime));
        assert!((1..=4096).contains(&c.max_resources));
        assert!(c.limits.max_depth >= 4 && c.limits.max_bytes >= 4096);
        assert!(c.rate.per_second > 0.0 && c.rate.burst >= 1.0 && c.rate.max_senders >= 1);
        assert!(c.rate.per_domain > 0.0 && c.rate.domain_burst >= 1.0);
        assert!(c.target.node().is_some());
        assert!(BareJid::new(&c.jid).is_ok_and(|j| j.node().is_none()));
        assert_ne!(c.target.domain().as_str(), c.jid);
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
    }
}

/// Limits of the proxy harness.
pub const LIMITS: Limits = Limits {
    max_bytes: 8192,
    max_depth: 8,
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
    let settings = settings();
    let mut budgets = Budgets::new(settings.rate);
    let mut proxy = Proxy::new(settings, keys());
    let mut rng = SeededRandom::new(data.len() as u64);
    let mut clock = Clock {
        unix_ms: NOW * 1000,
        mono_ms: 0,
    };
    let target = BareJid::new(TARGET).unwrap();
    for out in proxy.connected() {
        assert_eq!(out.attr("to"), Some(TARGET));
    }
    let mut last_token: Vec<u8> = b"none".to_vec();
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
        let h = header(&inbound);
        let resources_before = proxy.resources().to_vec();
        let (out, verdict) = proxy.handle(inbound, clock, &mut rng);
        assert!(proxy.resources().len() <= 4);
        assert!(proxy.tracked_senders() <= 8);
        assert!(proxy.limiter().domains() <= 8);
        budgets.evictions(proxy.limiter());
        let Some(out) = out else {
            continue;
        };
        if let Some(t) = check_output(
            &h,
            &out,
            verdict,
            &resources_before,
            &target,
            clock.unix_ms / 1000,
        ) {
            last_token = t.into_bytes();
        }
        budgets.charge(&h, &out, verdict, &target, clock.mono_ms);
    }
}

/// Checks one output against its input; returns the token if a request was forwarded.
fn check_output(
    h: &Header,
    out: &Element,
    verdict: Verdict,
    resources_before: &[String],
    target: &BareJid,
    now: u64,
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
    let token_of = |id: &str| {
        let t = in_to.resource()?.as_str().to_owned();
        let binding = Binding {
            component: COMPONENT,
            iq_id: id,
        };
        token::open(&keys(), binding, &t, now, 300).ok()
    };

    if h.name == "iq" && is_reply(&h.type_) {
        // A result or error is never answered: the only output is its reversal, to the
        // address its (valid) token holds, sent by the target's account.
        assert_eq!(
            in_from.to_bare(),
            *target,
            "reversed a reply from outside: {xml}"
        );
        let opened = token_of(h.id.as_deref().expect("a reversed reply has an id"))
            .unwrap_or_else(|| panic!("reversed without a valid token: {xml}"));
        assert_eq!(out_to, jid(Some(&opened.sender)).unwrap(), "{xml}");
        match &opened.original_to {
            Some(a) => assert_eq!(Some(&out_from), jid(Some(a)).as_ref(), "{xml}"),
            None => assert_eq!(out.attr("from"), Some(COMPONENT), "{xml}"),
        }
        assert_eq!(out.attr("id"), h.id.as_deref());
        assert!(is_reply(&out.attr("type").map(str::to_owned)), "{xml}");
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
            assert_eq!(h.name, "iq");
            assert!(matches!(h.type_.as_deref(), Some("get") | Some("set")));
            assert_ne!(
                in_from.to_bare(),
                *target,
                "the target's own requests are refused"
            );
            assert_eq!(out_to.to_bare(), *target, "{xml}");
            let res = out_to.resource().expect("to a resource").as_str();
            assert!(
                resources_before.iter().any(|r| r == res),
                "to an available resource"
            );
            let id = h.id.as_deref().expect("forwarded requests have ids");
            assert_eq!(out.attr("id"), Some(id));
            let t = out_from
                .resource()
                .expect("from a token")
                .as_str()
                .to_owned();
            let opened = token::open(
                &keys(),
                Binding {
                    component: COMPONENT,
                    iq_id: id,
                },
                &t,
                now,
                300,
            )
            .expect("a fresh token opens");
            assert_eq!(
                jid(Some(&opened.sender)).unwrap(),
                in_from,
                "token holds the sender"
            );
            Some(t)
        }
        Verdict::Presence => {
            assert_eq!(out.name(), "presence");
            assert_eq!(
                in_from.to_bare(),
                *target,
                "presence answers go to the target only"
            );
            assert_eq!(out.attr("to"), Some(TARGET));
            None
        }
        Verdict::Reversed | Verdict::Dropped(_) => panic!("unexpected output {verdict:?}: {xml}"),
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
        match verdict {
            _ if reply => self.count("replies", bare(out.attr("to")), self.account, now_ms),
            Verdict::Refused(_) => self.count("errors", bare(out.attr("to")), self.account, now_ms),
            Verdict::Forwarded => {
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
            _ => {}
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
            Binding {
                component: COMPONENT,
                iq_id: "abc",
            },
            &Contents {
                sender: "u@example/r",
                original_to: None,
            },
            NOW,
            [3; token::SALT_LEN],
        )
        .unwrap();
        let mut input = b"abc\0".to_vec();
        input.extend_from_slice(t.as_bytes());
        token(&input);
    }
}
