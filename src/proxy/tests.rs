//! The proxy driven stanza by stanza, as in the exchange of mod_client_proxy's README.

use super::*;
use crate::inbound::{Inbound, Limits, read_one};
use crate::random::SeededRandom;
use crate::token::{Binding, Contents, SALT_LEN};

const NOW: u64 = 1_790_000_000;

struct World {
    proxy: Proxy,
    rng: SeededRandom,
    clock: Clock,
}

impl World {
    fn new() -> World {
        World::holding(0, 0)
    }

    /// A world whose proxy holds up to `max_held` requests for `hold_ms` when no resource
    /// is known.
    fn holding(hold_ms: u64, max_held: usize) -> World {
        World::with(|s| {
            s.hold_ms = hold_ms;
            s.max_held = max_held;
        })
    }

    /// A world whose proxy forwards messages.
    fn messaging() -> World {
        World::with(|s| s.messages = Messages::Forward)
    }

    /// A world whose proxy forwards messages and lets the implementing client start stanzas.
    fn starting(outbound: Outbound) -> World {
        World::with(|s| {
            s.messages = Messages::Forward;
            s.outbound = outbound;
        })
    }

    /// A world whose proxy chooses resources as `selection` says.
    fn selecting(balance: Balance, patterns: &[&str]) -> World {
        let patterns = patterns.iter().map(|p| Pattern::new(p).unwrap()).collect();
        World::with(|s| s.selection = Selection { balance, patterns })
    }

    fn with(change: impl FnOnce(&mut Settings)) -> World {
        let mut settings = Settings::example();
        change(&mut settings);
        let keys = KeySet::from_secrets(&[(1, 0, [7; 32])]).unwrap();
        let mut w = World {
            proxy: Proxy::new(settings, keys),
            rng: SeededRandom::new(42),
            // The monotonic clock's origin is arbitrary: far from the Unix time, so that a
            // test mixing them up fails.
            clock: Clock {
                unix_ms: NOW * 1000,
                mono_ms: 5_000_000,
            },
        };
        w.proxy.connected(w.clock);
        w
    }

    fn online(mut self, resources: &[&str]) -> World {
        for r in resources {
            assert_eq!(
                self.send(&format!(
                    "<presence from='impl@example/{r}' to='proxy.example'/>"
                )),
                None
            );
        }
        self
    }

    fn send(&mut self, xml: &str) -> Option<Element> {
        self.send_verdict(xml).0
    }

    fn send_verdict(&mut self, xml: &str) -> (Option<Element>, Verdict) {
        let inbound = read_one(xml.as_bytes(), Limits::default()).expect("test XML");
        let out = self.proxy.handle(inbound, self.clock, &mut self.rng);
        (out.transmit, out.verdict)
    }

    /// The resources the proxy tracks.
    fn resources(&self) -> Vec<&str> {
        self.proxy.resources().names().collect()
    }

    /// Time passes, on both clocks.
    fn advance(&mut self, ms: u64) {
        self.clock.unix_ms += ms;
        self.clock.mono_ms += ms;
    }
}

fn attr<'a>(el: &'a Element, name: &'a str) -> &'a str {
    el.attr(name)
        .unwrap_or_else(|| panic!("no {name} in {}", stanza::to_xml(el)))
}

fn condition(el: &Element) -> String {
    assert_eq!(el.attr("type"), Some("error"), "{}", stanza::to_xml(el));
    stanza::error_condition(el).unwrap()
}

#[test]
fn request_and_result_round_trip() {
    let mut w = World::new().online(&["a"]);
    // user -> component
    let fwd = w
        .send("<iq type='get' id='1234' to='proxy.example' from='user@example/abc'><query xmlns='urn:x'/></iq>")
        .unwrap();
    // component -> impl
    assert_eq!(attr(&fwd, "to"), "impl@example/a");
    assert_eq!(attr(&fwd, "id"), "1234");
    assert_eq!(attr(&fwd, "type"), "get");
    let from = attr(&fwd, "from").to_owned();
    let token = from.strip_prefix("proxy.example/").unwrap();
    assert!(
        !token.contains("user"),
        "the implementing client never sees the sender"
    );
    assert!(fwd.has_child("query", "urn:x"));
    // impl -> component
    let back = w
        .send(&format!(
            "<iq type='result' id='1234' to='{from}' from='impl@example/a'><answer xmlns='urn:x'>42</answer></iq>"
        ))
        .unwrap();
    // component -> user
    assert_eq!(attr(&back, "to"), "user@example/abc");
    assert_eq!(attr(&back, "from"), "proxy.example");
    assert_eq!(attr(&back, "type"), "result");
    assert_eq!(back.get_child("answer", "urn:x").unwrap().text(), "42");
}

#[test]
fn error_replies_keep_their_condition() {
    let mut w = World::new().online(&["a"]);
    let fwd = w
        .send(
            "<iq type='set' id='e1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        )
        .unwrap();
    let back = w
        .send(&format!(
            "<iq type='error' id='e1' to='{}' from='impl@example/a'><error type='auth'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
            attr(&fwd, "from")
        ))
        .unwrap();
    assert_eq!(attr(&back, "to"), "u@example/r");
    assert_eq!(condition(&back), "forbidden");
}

#[test]
fn reply_comes_from_the_address_the_request_went_to() {
    let mut w = World::new().online(&["a"]);
    let fwd = w.send("<iq type='get' id='x' to='svc@proxy.example/z' from='u@example/r'><q xmlns='urn:x'/></iq>").unwrap();
    let back = w
        .send(&format!(
            "<iq type='result' id='x' to='{}' from='impl@example/a'/>",
            attr(&fwd, "from")
        ))
        .unwrap();
    assert_eq!(attr(&back, "from"), "svc@proxy.example/z");
}

#[test]
fn both_resources_are_used_and_presence_is_tracked() {
    let mut w = World::new().online(&["a", "b"]);
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let fwd = w.send(&format!("<iq type='get' id='{i}' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>")).unwrap();
        seen.insert(attr(&fwd, "to").to_owned());
    }
    assert_eq!(seen.len(), 2);
    w.send("<presence type='unavailable' from='impl@example/a' to='proxy.example'/>");
    assert_eq!(w.resources(), ["b"]);
    // Presence from anyone else does not touch the set.
    w.send("<presence from='mallory@example/a' to='proxy.example'/>");
    w.send("<presence type='unavailable' from='mallory@example/b' to='proxy.example'/>");
    assert_eq!(w.resources(), ["b"]);
    w.send("<presence type='error' from='impl@example/b' to='proxy.example'/>");
    assert!(w.resources().is_empty());
}

#[test]
fn no_resource_means_service_unavailable() {
    let mut w = World::new();
    let e = w
        .send("<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>")
        .unwrap();
    assert_eq!(condition(&e), "service-unavailable");
    assert_eq!(attr(&e, "to"), "u@example/r");
    assert_eq!(attr(&e, "id"), "1");
    assert_eq!(
        e.get_child("error", NS).unwrap().attr("type"),
        Some("cancel")
    );
}

#[test]
fn forged_foreign_and_misdirected_replies_go_nowhere() {
    let mut w = World::new().online(&["a"]);
    let fwd = w.send("<iq type='get' id='1234' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>").unwrap();
    let to = attr(&fwd, "from").to_owned();
    let mut tampered = to.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for xml in [
        // Another id.
        format!("<iq type='result' id='1235' to='{to}' from='impl@example/a'/>"),
        // Another account.
        format!("<iq type='result' id='1234' to='{to}' from='mallory@example/a'/>"),
        // Tampered token.
        format!("<iq type='result' id='1234' to='{tampered}' from='impl@example/a'/>"),
        // Garbage, empty, bare.
        "<iq type='result' id='1234' to='proxy.example/garbage' from='impl@example/a'/>".into(),
        "<iq type='result' id='1234' to='proxy.example' from='impl@example/a'/>".into(),
        "<iq type='error' id='1234' to='proxy.example/user@example' from='impl@example/a'/>".into(),
    ] {
        let (out, verdict) = w.send_verdict(&xml);
        assert_eq!(out, None, "{xml}");
        assert!(
            matches!(verdict, Verdict::Dropped(_) | Verdict::TokenRejected(_)),
            "{xml}"
        );
    }
    // A token from another component's key.
    let other = KeySet::from_secrets(&[(1, 0, [8; 32])]).unwrap();
    let forged = token::seal(
        &other,
        Binding::iq("proxy.example", "1"),
        &Contents {
            sender: "victim@example/r",
            original_to: None,
        },
        NOW * 1000,
        [0; SALT_LEN],
    )
    .unwrap();
    assert_eq!(
        w.send(&format!(
            "<iq type='result' id='1' to='proxy.example/{forged}' from='impl@example/a'/>"
        )),
        None
    );
}

#[test]
fn expired_token_is_dropped() {
    let mut w = World::new().online(&["a"]);
    let fwd = w
        .send("<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>")
        .unwrap();
    w.advance(300_000);
    let xml = format!(
        "<iq type='result' id='1' to='{}' from='impl@example/a'/>",
        attr(&fwd, "from")
    );
    assert_eq!(w.send(&xml), None);
}

#[test]
fn results_and_errors_are_never_answered() {
    let mut w = World::new().online(&["a"]);
    for xml in [
        "<iq type='result' id='1' to='proxy.example' from='u@example/r'/>",
        "<iq type='error' id='1' to='proxy.example/x' from='u@example/r'/>",
        "<message type='error' to='proxy.example' from='u@example/r'/>",
        "<iq type='result' to='proxy.example/x' from='impl@example/a'/>",
    ] {
        assert_eq!(w.send(xml), None, "{xml}");
    }
}

#[test]
fn limitations_of_the_module_are_kept() {
    let mut w = World::new().online(&["a"]);
    let e = w
        .send("<message to='proxy.example' from='u@example/r' id='m'><body>hi</body></message>")
        .unwrap();
    assert_eq!(e.name(), "message");
    assert_eq!(condition(&e), "feature-not-implemented");
    let e = w
        .send("<message type='weird' to='proxy.example' from='u@example/r'/>")
        .unwrap();
    assert_eq!(condition(&e), "feature-not-implemented");
    let e = w.send("<iq type='get' id='t' to='proxy.example' from='impl@example/a'><q xmlns='urn:x'/></iq>").unwrap();
    assert_eq!(condition(&e), "feature-not-implemented");
    assert_eq!(attr(&e, "to"), "impl@example/a");
}

#[test]
fn malformed_requests_get_bad_request() {
    let mut w = World::new().online(&["a"]);
    for xml in [
        "<iq type='weird' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        "<iq id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        "<iq type='get' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        "<iq type='get' id='1' to='proxy.example' from='u@example/r'/>",
        "<iq type='set' id='1' to='proxy.example' from='u@example/r'><q xmlns='a'/><q xmlns='b'/></iq>",
    ] {
        let e = w.send(xml).unwrap_or_else(|| panic!("no answer to {xml}"));
        assert_eq!(condition(&e), "bad-request", "{xml}");
    }
}

#[test]
fn too_long_sender_gets_not_acceptable() {
    let mut w = World::new().online(&["a"]);
    let resource = "r".repeat(token::MAX_PLAINTEXT_LEN);
    let xml = format!(
        "<iq type='get' id='1' to='proxy.example' from='u@example/{resource}'><q xmlns='urn:x'/></iq>"
    );
    let e = w.send(&xml).unwrap();
    assert_eq!(condition(&e), "not-acceptable");
}

#[test]
fn subscription_and_probe_are_answered() {
    let mut w = World::new();
    let first = w.proxy.connected(w.clock);
    assert_eq!(attr(&first[0], "type"), "probe");
    assert_eq!(attr(&first[0], "to"), "impl@example");
    assert_eq!(attr(&first[1], "type"), "subscribe");
    let s = w
        .send("<presence type='subscribe' from='impl@example' to='proxy.example'/>")
        .unwrap();
    assert_eq!(attr(&s, "type"), "subscribed");
    assert_eq!(
        w.send("<presence type='subscribe' from='mallory@example' to='proxy.example'/>"),
        None
    );
    let p = w
        .send("<presence type='probe' from='impl@example' to='proxy.example'/>")
        .unwrap();
    assert_eq!(p.attr("type"), None);
}

#[test]
fn never_talks_to_itself() {
    let mut w = World::new().online(&["a"]);
    assert_eq!(w.send("<iq type='get' id='1' to='proxy.example' from='proxy.example/x'><q xmlns='urn:x'/></iq>"), None);
    let t = token::seal(
        w.proxy.keys(),
        Binding::iq("proxy.example", "1"),
        &Contents {
            sender: "proxy.example/loop",
            original_to: None,
        },
        NOW * 1000,
        [3; SALT_LEN],
    )
    .unwrap();
    assert_eq!(
        w.send(&format!(
            "<iq type='result' id='1' to='proxy.example/{t}' from='impl@example/a'/>"
        )),
        None
    );
}

#[test]
fn oversized_requests_are_refused_and_oversized_replies_become_errors() {
    let mut w = World::new().online(&["a"]);
    let deep = format!(
        "<iq type='get' id='d' to='proxy.example' from='u@example/r'>{}{}</iq>",
        "<a xmlns='urn:x'>".repeat(100),
        "</a>".repeat(100)
    );
    let e = w.send(&deep).unwrap();
    assert_eq!(condition(&e), "policy-violation");
    let fwd = w
        .send(
            "<iq type='get' id='big' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        )
        .unwrap();
    let big = format!(
        "<iq type='result' id='big' to='{}' from='impl@example/a'>{}{}</iq>",
        attr(&fwd, "from"),
        "<a xmlns='urn:x'>".repeat(100),
        "</a>".repeat(100)
    );
    let back = w.send(&big).unwrap();
    assert_eq!(attr(&back, "to"), "u@example/r");
    assert_eq!(condition(&back), "policy-violation");
}

#[test]
fn policy_and_rate_limit() {
    let mut w = World::new().online(&["a"]);
    let e = w.send("<iq type='get' id='1' to='proxy.example' from='x@spam.example/r'><q xmlns='urn:x'/></iq>").unwrap();
    assert_eq!(condition(&e), "forbidden");
    let mut refused = 0;
    for i in 0..80 {
        let out = w.send(&format!("<iq type='get' id='{i}' to='proxy.example' from='flood@example/r{i}'><q xmlns='urn:x'/></iq>")).unwrap();
        if out.attr("type") == Some("error") {
            assert_eq!(condition(&out), "resource-constraint");
            assert_eq!(
                out.get_child("error", NS).unwrap().attr("type"),
                Some("wait")
            );
            refused += 1;
        }
    }
    assert_eq!(
        refused, 30,
        "burst of 50, all resources of one account count together"
    );
    let ok = w.send("<iq type='get' id='o' to='proxy.example' from='other@example/r'><q xmlns='urn:x'/></iq>").unwrap();
    assert_eq!(attr(&ok, "to"), "impl@example/a", "others still served");
    w.advance(1000);
    let again = w.send("<iq type='get' id='z' to='proxy.example' from='flood@example/r'><q xmlns='urn:x'/></iq>").unwrap();
    assert_eq!(attr(&again, "type"), "get", "refilled after a second");
}

#[test]
fn replies_teach_presence_an_instance_did_not_see() {
    // Another instance saw impl/b come online; this one learns it from b's result.
    let mut w = World::new().online(&["a"]);
    let fwd = w
        .send("<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>")
        .unwrap();
    let back = w.send(&format!(
        "<iq type='result' id='1' to='{}' from='impl@example/b'/>",
        attr(&fwd, "from")
    ));
    assert!(back.is_some());
    assert_eq!(w.resources(), ["a", "b"]);
    // The server bounces a request to a resource that went away: forgotten, and the
    // sender still gets the error.
    let fwd = w
        .send("<iq type='get' id='2' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>")
        .unwrap();
    let gone = attr(&fwd, "to").rsplit('/').next().unwrap().to_owned();
    let bounce = w
        .send(&format!(
            "<iq type='error' id='2' to='{}' from='impl@example/{gone}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
            attr(&fwd, "from")
        ))
        .unwrap();
    assert_eq!(attr(&bounce, "to"), "u@example/r");
    assert_eq!(condition(&bounce), "service-unavailable");
    assert!(!w.resources().contains(&gone.as_str()));
    assert_eq!(w.proxy.probe().attr("type"), Some("probe"));
}

fn get(id: &str, from: &str) -> String {
    format!("<iq type='get' id='{id}' to='proxy.example' from='{from}'><q xmlns='urn:x'/></iq>")
}

/// Failed before the monotonic clock: the limiter refilled from the Unix time, so a step
/// forward refilled every bucket and a step back froze them.
#[test]
fn a_wall_clock_step_does_not_touch_the_rate_limit() {
    let mut w = World::new().online(&["a"]);
    for i in 0..50 {
        assert_eq!(
            w.send_verdict(&get(&i.to_string(), "flood@example/r")).1,
            Verdict::Forwarded
        );
    }
    let limited = Verdict::Refused(Condition::ResourceConstraint);
    assert_eq!(w.send_verdict(&get("x", "flood@example/r")).1, limited);
    // The wall clock jumps an hour ahead; no time passed: nothing refilled.
    w.clock.unix_ms += 3_600_000;
    assert_eq!(w.send_verdict(&get("y", "flood@example/r")).1, limited);
    // One second passes while the wall clock is stepped two hours back: 10 tokens at 10/s.
    w.clock.unix_ms -= 7_200_000;
    w.clock.mono_ms += 1000;
    let served = (0..20)
        .filter(|i| {
            w.send_verdict(&get(&format!("z{i}"), "flood@example/r")).1 == Verdict::Forwarded
        })
        .count();
    assert_eq!(served, 10);
    // Tokens, on the other hand, live on Unix time: an hour on the monotonic clock alone
    // does not expire one, 300 s of Unix time does.
    let fwd = w.send(&get("t", "u@example/r")).unwrap();
    let reply = format!(
        "<iq type='result' id='t' to='{}' from='impl@example/a'/>",
        attr(&fwd, "from")
    );
    w.clock.mono_ms += 3_600_000;
    assert_eq!(w.send_verdict(&reply).1, Verdict::Reversed);
    w.clock.unix_ms += 300_000;
    assert_eq!(
        w.send_verdict(&reply).1,
        Verdict::TokenRejected(crate::token::Rejected::Expired)
    );
}

/// Failed before the per-domain bucket: every one of the 1000 accounts was served.
#[test]
fn a_remote_domain_is_limited_as_a_group_and_local_accounts_are_not() {
    let mut w = World::new().online(&["a"]);
    let limited = Verdict::Refused(Condition::ResourceConstraint);
    let tally = |w: &mut World, who: &dyn Fn(usize) -> String, n: usize| {
        let (mut served, mut refused) = (0, 0);
        for i in 0..n {
            match w.send_verdict(&get(&i.to_string(), &who(i))) {
                (Some(_), Verdict::Forwarded) => served += 1,
                (Some(e), v) if v == limited => {
                    assert_eq!(attr(&e, "to"), who(i));
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        (served, refused)
    };
    // 1000 accounts minted at one remote server, one request each: the domain's burst.
    let remote = |i| format!("u{i}@remote.example/r");
    assert_eq!(tally(&mut w, &remote, 1000), (500, 500));
    // Another remote domain is unaffected.
    let other = |i| format!("u{i}@other.example/r");
    assert_eq!(tally(&mut w, &other, 10), (10, 0));
    // 1000 accounts at the implementing client's own domain: not limited as a group.
    let local = |i| format!("local{i}@example/r");
    assert_eq!(tally(&mut w, &local, 1000), (1000, 0));
    // A second later the remote domain has 100 more (100/s).
    w.advance(1000);
    let fresh = |i| format!("v{i}@remote.example/r");
    assert_eq!(tally(&mut w, &fresh, 200), (100, 100));
}

/// Failed before the error budget: every bad request and every message was answered.
#[test]
fn generated_errors_stop_at_the_senders_error_budget() {
    let mut w = World::new().online(&["a"]);
    let bad = "<iq type='get' id='b' to='proxy.example' from='bot@example/r'/>";
    let (mut errors, mut silent) = (0, 0);
    for _ in 0..200 {
        match w.send_verdict(bad) {
            (Some(e), Verdict::Refused(Condition::BadRequest)) => {
                assert_eq!(silent, 0, "errors stop only once the budget is spent");
                assert_eq!(condition(&e), "bad-request");
                errors += 1;
            }
            (None, Verdict::Dropped(DropReason::OverErrorBudget)) => silent += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((errors, silent), (50, 150), "the burst, then nothing");
    // Every error jat-proxy generates draws on the same budget: messages, oversized
    // stanzas, the target's own requests...
    let message = "<message from='bot@example/r' to='proxy.example'><body>auto</body></message>";
    assert_eq!(w.send(message), None);
    let deep = format!(
        "<iq type='get' id='d' to='proxy.example' from='bot@example/other'>{}{}</iq>",
        "<a xmlns='urn:x'>".repeat(100),
        "</a>".repeat(100)
    );
    assert_eq!(
        w.send_verdict(&deep),
        (None, Verdict::Dropped(DropReason::OverErrorBudget))
    );
    // ...but its requests are a budget of their own.
    assert_eq!(
        w.send_verdict(&get("ok", "bot@example/r")).1,
        Verdict::Forwarded
    );
    // Another sender is unaffected.
    let e = w
        .send("<iq type='get' id='b' to='proxy.example' from='human@example/r'/>")
        .unwrap();
    assert_eq!(condition(&e), "bad-request");
    // The budget refills at the request rate: 10 more errors a second later.
    w.advance(1000);
    let errors = (0..20).filter(|_| w.send(bad).is_some()).count();
    assert_eq!(errors, 10);

    // An auto-responder that answers each error with a message, and jat-proxy that answers
    // each message with an error: the loop ends after the budget.
    let mut w = World::new();
    let mut exchanges = 0;
    while let Some(e) = w.send(
        "<message id='auto' from='echo@example/bot' to='proxy.example'><body>?</body></message>",
    ) {
        assert_eq!(condition(&e), "feature-not-implemented");
        exchanges += 1;
        assert!(exchanges <= 50, "the loop does not end");
    }
    assert_eq!(exchanges, 50);
    // The implementing client's own requests are charged to it alike.
    let mut w = World::new().online(&["a"]);
    let own = (0..60)
        .filter(|i| w.send(&get(&i.to_string(), "impl@example/a")).is_some())
        .count();
    assert_eq!(own, 50);
}

/// Failed before the per-recipient limit: all 1000 replays were delivered.
#[test]
fn replaying_one_reply_is_limited_per_token() {
    let mut w = World::new().online(&["a"]);
    let fwd = w.send(&get("r", "u@example/r")).unwrap();
    let reply = format!(
        "<iq type='result' id='r' to='{}' from='impl@example/a'/>",
        attr(&fwd, "from")
    );
    let start = w.clock.mono_ms;
    let mut delivered = 0u64;
    for i in 0..1000 {
        if i > 0 {
            w.advance(10);
        }
        match w.send_verdict(&reply) {
            (Some(out), Verdict::Reversed) => {
                assert_eq!(attr(&out, "to"), "u@example/r");
                delivered += 1;
            }
            (None, Verdict::Dropped(DropReason::OverReplyRate)) => {}
            other => panic!("{other:?}"),
        }
    }
    let elapsed_s = (w.clock.mono_ms - start) as f64 / 1000.0;
    let bound = 50.0 + 10.0 * elapsed_s;
    assert!(delivered as f64 <= bound, "{delivered} > {bound}");
    assert!(
        delivered as f64 >= bound - 1.0,
        "{delivered} well under {bound}"
    );
    // Another token of the same recipient is unaffected (a budget shared by one account's
    // tokens would tell the implementing client that they name one account), and so are
    // another recipient and the first one's requests.
    let fwd = w.send(&get("t", "u@example/other")).unwrap();
    let back = w.send(&format!(
        "<iq type='result' id='t' to='{}' from='impl@example/a'/>",
        attr(&fwd, "from")
    ));
    assert_eq!(attr(&back.unwrap(), "to"), "u@example/other");
    let fwd = w.send(&get("s", "v@example/s")).unwrap();
    let back = w.send(&format!(
        "<iq type='result' id='s' to='{}' from='impl@example/a'/>",
        attr(&fwd, "from")
    ));
    assert_eq!(attr(&back.unwrap(), "to"), "v@example/s");
    assert!(w.send(&get("again", "u@example/r")).is_some());
}

/// Failed before the check: the decrypted address was used as `from` whatever it was.
#[test]
fn a_reply_comes_only_from_an_address_at_the_component() {
    let mut w = World::new().online(&["a"]);
    let reverse = |w: &mut World, original_to: &str, salt: u8| {
        let t = token::seal(
            w.proxy.keys(),
            Binding::iq("proxy.example", "1"),
            &Contents {
                sender: "u@example/r",
                original_to: Some(original_to),
            },
            NOW * 1000,
            [salt; SALT_LEN],
        )
        .unwrap();
        w.send_verdict(&format!(
            "<iq type='result' id='1' to='proxy.example/{t}' from='impl@example/a'/>"
        ))
    };
    for (i, bad) in [
        "someone@elsewhere.example",
        "elsewhere.example",
        "proxy.example.elsewhere.example",
        "svc@proxy.example.elsewhere.example/r",
        "elsewhere.example/proxy.example",
        "@@",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            reverse(&mut w, bad, i as u8),
            (
                None,
                Verdict::Dropped(DropReason::TokenOriginalNotAtComponent)
            ),
            "{bad}"
        );
    }
    for (i, good) in [
        "proxy.example",
        "svc@proxy.example",
        "proxy.example/res",
        "svc@proxy.example/res",
    ]
    .into_iter()
    .enumerate()
    {
        let (out, v) = reverse(&mut w, good, 100 + i as u8);
        assert_eq!(v, Verdict::Reversed, "{good}");
        assert_eq!(attr(&out.unwrap(), "from"), good);
    }
}

#[test]
fn bare_is_a_slice_of_the_full_address() {
    for (full, expected) in [
        ("u@example/r", "u@example"),
        ("u@example", "u@example"),
        ("u@example/a/b@c", "u@example"),
        ("example/r/x@y", "example"),
        ("example", "example"),
    ] {
        let j = Jid::new(full).unwrap();
        assert_eq!(bare(&j), expected);
        assert_eq!(bare(&j), j.to_bare().as_str());
    }
}

/// What the core sends on its own now, each checked against the verdict it comes with.
fn transmitted(w: &mut World) -> Vec<Element> {
    let clock = w.clock;
    std::iter::from_fn(|| w.proxy.poll_transmit(clock, &mut w.rng))
        .map(|out| {
            let el = out.transmit.expect("poll_transmit always transmits");
            let xml = stanza::to_xml(&el);
            assert_eq!(out.reply_latency_ms, None, "{xml}");
            match (out.verdict, out.stanza) {
                (Verdict::Probe, Stanza::Presence) => {
                    assert_eq!(el.name(), "presence", "{xml}");
                    assert_eq!(attr(&el, "type"), "probe", "{xml}");
                }
                (Verdict::Forwarded, Stanza::Iq) => {
                    assert_eq!(el.name(), "iq", "{xml}");
                    assert!(matches!(attr(&el, "type"), "get" | "set"), "{xml}");
                }
                (Verdict::Refused(c), Stanza::Iq) => {
                    assert_eq!(el.name(), "iq", "{xml}");
                    assert_eq!(condition(&el), c.name(), "{xml}");
                }
                (v, s) => panic!("unexpected {v:?} on {s:?}: {xml}"),
            }
            el
        })
        .collect()
}

const HELD_REQUEST: &str =
    "<iq type='get' id='h1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>";

#[test]
fn a_request_without_a_resource_is_held_then_forwarded_when_one_appears() {
    let mut w = World::holding(2000, 8);
    let (out, verdict) = w.send_verdict(HELD_REQUEST);
    assert_eq!(verdict, Verdict::Held);
    let probe = out.expect("a probe goes out at once");
    assert_eq!(attr(&probe, "type"), "probe");
    assert_eq!(attr(&probe, "to"), "impl@example");
    assert!(transmitted(&mut w).is_empty());
    assert_eq!(w.proxy.held(), 1);
    assert_eq!(
        w.proxy.poll_timeout(),
        Some(w.clock.mono_ms + HOLD_PROBE_GAP_MS)
    );

    w.advance(100);
    assert_eq!(
        w.send("<presence from='impl@example/a' to='proxy.example'/>"),
        None
    );
    let out = transmitted(&mut w);
    assert_eq!(out.len(), 1, "released exactly once");
    assert_eq!(attr(&out[0], "to"), "impl@example/a");
    assert_eq!(attr(&out[0], "id"), "h1");
    let token = jid::Jid::new(attr(&out[0], "from")).unwrap();
    let reply = format!(
        "<iq type='result' id='h1' to='{token}' from='impl@example/a'><q xmlns='urn:x'/></iq>"
    );
    let back = w
        .send(&reply)
        .expect("the reply is reversed to the held request's sender");
    assert_eq!(attr(&back, "to"), "u@example/r");
    assert_eq!(w.proxy.held(), 0);
    assert_eq!(w.proxy.poll_timeout(), None);
}

#[test]
fn a_held_request_is_refused_when_its_time_runs_out_and_probes_repeat_meanwhile() {
    let mut w = World::holding(2000, 8);
    let (_, verdict) = w.send_verdict(HELD_REQUEST);
    assert_eq!(verdict, Verdict::Held);
    let start = w.clock.mono_ms;
    let mut probes = 1;
    while let Some(due) = w.proxy.poll_timeout() {
        assert!(due > w.clock.mono_ms - 1, "never due in the past");
        w.advance(due - w.clock.mono_ms);
        let clock = w.clock;
        w.proxy.handle_timeout(clock);
        for out in transmitted(&mut w) {
            match out.name() {
                "presence" => probes += 1,
                _ => {
                    assert_eq!(
                        w.clock.mono_ms - start,
                        2000,
                        "refused when its time ran out"
                    );
                    assert_eq!(condition(&out), "service-unavailable");
                    assert_eq!(attr(&out, "to"), "u@example/r");
                    assert_eq!(attr(&out, "id"), "h1");
                }
            }
        }
    }
    assert_eq!(w.proxy.held(), 0);
    assert_eq!(probes, 8, "one probe per {HOLD_PROBE_GAP_MS} ms while held");
}

#[test]
fn holding_is_bounded_and_ends_with_the_stream() {
    let mut w = World::holding(2000, 2);
    for id in ["1", "2"] {
        let (_, v) = w.send_verdict(&HELD_REQUEST.replace("h1", id));
        assert_eq!(v, Verdict::Held);
    }
    let (out, v) = w.send_verdict(&HELD_REQUEST.replace("h1", "3"));
    assert_eq!(
        v,
        Verdict::Refused(Condition::ServiceUnavailable),
        "full: refused at once"
    );
    assert_eq!(attr(&out.unwrap(), "id"), "3");
    // Closing: the held requests are answered, not lost with the stream.
    let clock = w.clock;
    w.proxy.settle_held_at_close(clock);
    let out = transmitted(&mut w);
    let ids: Vec<&str> = out
        .iter()
        .filter(|e| e.name() == "iq")
        .map(|e| attr(e, "id"))
        .collect();
    assert_eq!(ids, ["1", "2"]);
    assert!(
        out.iter()
            .filter(|e| e.name() == "iq")
            .all(|e| condition(e) == "service-unavailable")
    );
    // A lost stream: nothing to send any more, nothing held.
    let (_, v) = w.send_verdict(&HELD_REQUEST.replace("h1", "4"));
    assert_eq!(v, Verdict::Held);
    w.proxy.disconnected();
    assert_eq!(w.proxy.held(), 0);
    assert!(transmitted(&mut w).is_empty());
}

#[test]
fn a_result_from_an_unknown_resource_releases_held_requests() {
    let mut w = World::holding(2000, 8);
    // A first request goes out while a resource is known; the resource is then forgotten
    // (its unavailable presence), and a second request is held.
    w = w.online(&["a"]);
    let first = w
        .send("<iq type='get' id='f' to='proxy.example' from='v@example/r'><q xmlns='urn:x'/></iq>")
        .unwrap();
    w.send("<presence type='unavailable' from='impl@example/a' to='proxy.example'/>");
    assert_eq!(w.send_verdict(HELD_REQUEST).1, Verdict::Held);
    // The result proves "a" is online after all: the held request goes to it.
    let reply = format!(
        "<iq type='result' id='f' to='{}' from='impl@example/a'/>",
        attr(&first, "from")
    );
    assert!(w.send(&reply).is_some());
    let out = transmitted(&mut w);
    assert_eq!(out.len(), 1);
    assert_eq!(attr(&out[0], "id"), "h1");
    assert_eq!(attr(&out[0], "to"), "impl@example/a");
}

/// Where the request `id` from `from` goes: the resource it is forwarded to, or the error
/// condition it is refused with.
fn routed(w: &mut World, id: &str, from: &str) -> String {
    let out = w.send(&get(id, from)).expect("an answer");
    match out.attr("type") {
        Some("error") => condition(&out),
        _ => {
            let to = attr(&out, "to");
            assert!(to.starts_with("impl@example/"), "{to}");
            to["impl@example/".len()..].to_owned()
        }
    }
}

fn presence_with_priority(resource: &str, priority: i32) -> String {
    format!(
        "<presence from='impl@example/{resource}' to='proxy.example'><priority>{priority}</priority></presence>"
    )
}

#[test]
fn a_resource_with_negative_priority_never_receives_anything() {
    let mut w = World::new();
    w.send(&presence_with_priority("idle", -1));
    assert_eq!(w.resources(), ["idle"], "tracked, not eligible");
    for i in 0..8 {
        assert_eq!(
            routed(&mut w, &i.to_string(), &format!("u{i}@example/r")),
            "service-unavailable"
        );
    }
    // A result from it (to a request it had before it went negative) keeps it ineligible.
    w.send("<iq type='result' id='z' to='proxy.example/AAAA' from='impl@example/idle'/>");
    assert_eq!(routed(&mut w, "9", "v@example/r"), "service-unavailable");
    // Another resource joins: everything goes there; the first turns positive: both are used.
    w.send(&presence_with_priority("busy", 0));
    for i in 10..30 {
        assert_eq!(
            routed(&mut w, &i.to_string(), &format!("u{i}@example/r")),
            "busy"
        );
    }
    w.send(&presence_with_priority("idle", 1));
    let seen: std::collections::HashSet<String> = (30..70)
        .map(|i| routed(&mut w, &i.to_string(), &format!("u{i}@example/r")))
        .collect();
    assert_eq!(seen.len(), 2);
    // Malformed priorities count as 0.
    w.send("<presence from='impl@example/idle' to='proxy.example'><priority>high</priority></presence>");
    w.send(&presence_with_priority("busy", 300));
    assert!(w.proxy.resources().any_eligible());
}

#[test]
fn resources_outside_the_patterns_never_receive_anything() {
    let mut w = World::selecting(Balance::Random, &["focus", "worker-*"]);
    w = w.online(&["phone", "focus2"]);
    assert!(w.resources().is_empty(), "not even tracked");
    // Nor learnt from a reply.
    w.send("<iq type='result' id='z' to='proxy.example/AAAA' from='impl@example/phone'/>");
    for i in 0..4 {
        assert_eq!(
            routed(&mut w, &i.to_string(), &format!("u{i}@example/r")),
            "service-unavailable"
        );
    }
    w = w.online(&["worker-1", "focus"]);
    let seen: std::collections::HashSet<String> = (10..60)
        .map(|i| routed(&mut w, &i.to_string(), &format!("u{i}@example/r")))
        .collect();
    assert_eq!(seen, ["focus", "worker-1"].map(String::from).into());
}

#[test]
fn priority_balance_prefers_the_highest() {
    let mut w = World::selecting(Balance::Priority, &[]);
    w.send(&presence_with_priority("desktop", 5));
    w.send(&presence_with_priority("phone", 1));
    for i in 0..20 {
        assert_eq!(routed(&mut w, &i.to_string(), "u@example/r"), "desktop");
    }
    w.send("<presence type='unavailable' from='impl@example/desktop' to='proxy.example'/>");
    assert_eq!(routed(&mut w, "x", "u@example/r"), "phone");
}

#[test]
fn sticky_balance_keeps_an_account_on_one_resource_on_every_instance() {
    let mut one = World::selecting(Balance::Sticky, &[]).online(&["a", "b", "c"]);
    let mut two = World::selecting(Balance::Sticky, &[]).online(&["c", "a", "b"]);
    let senders: Vec<String> = (0..60).map(|i| format!("user{i}@example")).collect();
    let mut used = std::collections::HashSet::new();
    for (i, s) in senders.iter().enumerate() {
        // Any resource of the sender's, on either instance.
        let first = routed(&mut one, &format!("{i}-1"), &format!("{s}/phone"));
        assert_eq!(
            routed(&mut one, &format!("{i}-2"), &format!("{s}/laptop")),
            first
        );
        assert_eq!(
            routed(&mut two, &format!("{i}-3"), &format!("{s}/phone")),
            first
        );
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "the accounts are spread");
    // `b` leaves: only its accounts move.
    let before: Vec<String> = senders
        .iter()
        .enumerate()
        .map(|(i, s)| routed(&mut one, &format!("{i}-4"), s))
        .collect();
    one.send("<presence type='unavailable' from='impl@example/b' to='proxy.example'/>");
    for (i, (s, b)) in senders.iter().zip(&before).enumerate() {
        let now = routed(&mut one, &format!("{i}-5"), s);
        if b != "b" {
            assert_eq!(&now, b);
        } else {
            assert_ne!(now, "b");
        }
    }
}

#[test]
fn messages_are_refused_by_default() {
    let mut w = World::new().online(&["a"]);
    let e = w
        .send(
            "<message type='chat' to='proxy.example' from='u@example/r'><body>hi</body></message>",
        )
        .unwrap();
    assert_eq!(condition(&e), "feature-not-implemented");
    // A headline is never answered with an error (RFC 6121 §5.2.2).
    assert_eq!(
        w.send("<message type='headline' to='proxy.example' from='u@example/r'><body>hi</body></message>"),
        None
    );
}

#[test]
fn a_conversation_goes_through_message_tokens() {
    let mut w = World::messaging().online(&["a", "b"]);
    let msg = "<message type='chat' id='m1' to='chat@proxy.example' from='user@example/abc'><body>hi</body><thread>t1</thread><active xmlns='http://jabber.org/protocol/chatstates'/><request xmlns='urn:xmpp:receipts'/></message>";
    let fwd = w.send(msg).unwrap();
    assert_eq!(fwd.name(), "message");
    assert!(attr(&fwd, "to").starts_with("impl@example/"));
    let from = attr(&fwd, "from").to_owned();
    let token = from.strip_prefix("proxy.example/").unwrap().to_owned();
    assert!(!from.contains("user"));
    assert_eq!(attr(&fwd, "id"), "m1");
    // Everything inside passes untouched.
    let original = read_one(msg.as_bytes(), Limits::default()).unwrap();
    let Inbound::Element(original) = original else {
        panic!()
    };
    assert_eq!(
        fwd.children().map(stanza::to_xml).collect::<Vec<_>>(),
        original.children().map(stanza::to_xml).collect::<Vec<_>>()
    );
    // The same account's next message goes to the same resource (a conversation), even
    // under `balance = "random"`.
    let res = attr(&fwd, "to").to_owned();
    for i in 0..20 {
        let again = w
            .send(&format!(
                "<message to='proxy.example' from='user@example/phone' id='n{i}'><body>{i}</body></message>"
            ))
            .unwrap();
        assert_eq!(attr(&again, "to"), res);
    }
    // The implementing client answers: to the sender, from the address the sender wrote to.
    let answer = w
        .send(&format!("<message type='chat' id='r1' to='{from}' from='{res}'><body>hello</body><thread>t1</thread></message>"))
        .unwrap();
    assert_eq!(attr(&answer, "to"), "user@example/abc");
    assert_eq!(attr(&answer, "from"), "chat@proxy.example");
    assert_eq!(attr(&answer, "type"), "chat");
    assert_eq!(answer.get_child("body", NS).unwrap().text(), "hello");
    // Its message errors are reversed too.
    let err = w
        .send(&format!("<message type='error' id='m1' to='{from}' from='{res}'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"))
        .unwrap();
    assert_eq!(attr(&err, "to"), "user@example/abc");
    assert_eq!(condition(&err), "item-not-found");
    // A message token never routes an IQ reply; an IQ token never routes a message.
    let (out, v) = w.send_verdict(&format!(
        "<iq type='result' id='m1' to='{from}' from='{res}'/>"
    ));
    assert_eq!(
        (out, v),
        (None, Verdict::TokenRejected(crate::token::Rejected::Kind))
    );
    let req = w.send(&get("q1", "user@example/abc")).unwrap();
    let iq_token_addr = attr(&req, "from").to_owned();
    let (out, v) = w.send_verdict(&format!(
        "<message id='q1' to='{iq_token_addr}' from='{res}'><body>x</body></message>"
    ));
    assert_eq!(
        (out, v),
        (None, Verdict::TokenRejected(crate::token::Rejected::Kind))
    );
    // Somebody else's message to the token address is a new message from them, not a
    // reversal.
    let theirs = w
        .send(&format!(
            "<message to='{from}' from='mallory@example/x'><body>x</body></message>"
        ))
        .unwrap();
    assert!(attr(&theirs, "to").starts_with("impl@example/"));
    assert_ne!(attr(&theirs, "from"), from);
    // The token expires with its own lifetime (an hour here), not the IQ one.
    w.advance(3_000_000);
    let late = w
        .send(&format!(
            "<message to='proxy.example/{token}' from='{res}'><body>late</body></message>"
        ))
        .unwrap();
    assert_eq!(attr(&late, "to"), "user@example/abc");
    w.advance(700_000);
    let (out, _) = w.send_verdict(&format!(
        "<message to='proxy.example/{token}' from='{res}'><body>too late</body></message>"
    ));
    assert_eq!(out, None);
}

#[test]
fn message_errors_and_stray_messages() {
    let mut w = World::messaging();
    // No resource: refused at once (messages are not held).
    let e = w
        .send("<message to='proxy.example' from='u@example/r'><body>hi</body></message>")
        .unwrap();
    assert_eq!(condition(&e), "service-unavailable");
    let mut w = w.online(&["a"]);
    // A sender's error (their server bouncing a message delivered to them) is dropped:
    // nothing says which resource wrote it.
    assert_eq!(
        w.send("<message type='error' to='proxy.example' from='u@example/r'/>"),
        None
    );
    // The implementing client writing to the bare domain: refused, except a headline or an
    // error.
    let e = w
        .send("<message to='proxy.example' from='impl@example/a'><body>x</body></message>")
        .unwrap();
    assert_eq!(condition(&e), "feature-not-implemented");
    assert_eq!(attr(&e, "to"), "impl@example/a");
    for t in ["headline", "error"] {
        assert_eq!(
            w.send(&format!(
                "<message type='{t}' to='proxy.example' from='impl@example/a'/>"
            )),
            None
        );
    }
    // A forged token: nothing.
    assert_eq!(
        w.send("<message to='proxy.example/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' from='impl@example/a'><body>x</body></message>"),
        None
    );
    // Policy and rate limits apply to messages as to requests.
    let e = w
        .send("<message to='proxy.example' from='x@spam.example/r'><body>x</body></message>")
        .unwrap();
    assert_eq!(condition(&e), "forbidden");
}

/// The token address a request from `sender` comes from, forwarded to `impl@example/a`.
fn token_of_request(w: &mut World, id: &str, sender: &str) -> String {
    let fwd = w.send(&get(id, sender)).unwrap();
    attr(&fwd, "from").to_owned()
}

#[test]
fn the_implementing_client_starts_requests_to_a_sender_it_heard_from() {
    let mut w = World::starting(Outbound::Known).online(&["a"]);
    let token_addr = token_of_request(&mut w, "q1", "user@example/abc");
    // A new request, with a new id, to the token of an earlier IQ.
    let out = w
        .send(&format!("<iq type='get' id='push-1' to='{token_addr}' from='impl@example/a'><query xmlns='urn:x:ask'/></iq>"))
        .unwrap();
    assert_eq!(attr(&out, "to"), "user@example/abc");
    assert_eq!(attr(&out, "from"), "proxy.example");
    let sealed_id = attr(&out, "id").to_owned();
    assert_ne!(sealed_id, "push-1");
    assert!(!sealed_id.contains("impl") && !sealed_id.contains("push"));
    assert!(out.get_child("query", "urn:x:ask").is_some());
    // The user's answer comes back to the resource that asked, with its id, from the
    // address it wrote to.
    let res = w
        .send(&format!("<iq type='result' id='{sealed_id}' to='proxy.example' from='user@example/abc'><answer xmlns='urn:x:ask'/></iq>"))
        .unwrap();
    assert_eq!(attr(&res, "to"), "impl@example/a");
    assert_eq!(attr(&res, "from"), token_addr);
    assert_eq!(attr(&res, "id"), "push-1");
    assert!(res.get_child("answer", "urn:x:ask").is_some());
    // Its error too.
    let e = w
        .send(&format!("<iq type='error' id='{sealed_id}' to='proxy.example' from='user@example/abc'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"))
        .unwrap();
    assert_eq!(condition(&e), "service-unavailable");
    // Another peer replaying the id, a tampered id, an id it never got: nothing.
    let mut tampered = sealed_id.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (id, from) in [
        (sealed_id.as_str(), "mallory@example/x"),
        (sealed_id.as_str(), "user@example/other"),
        (tampered.as_str(), "user@example/abc"),
        ("push-1", "user@example/abc"),
    ] {
        let (out, _) = w.send_verdict(&format!(
            "<iq type='result' id='{id}' to='proxy.example' from='{from}'/>"
        ));
        assert_eq!(out, None, "{id} from {from}");
    }
    // A route is not a token: offered as one by the implementing client, nothing.
    let (out, _) = w.send_verdict(&format!(
        "<iq type='result' id='x' to='proxy.example/{sealed_id}' from='impl@example/a'/>"
    ));
    assert_eq!(out, None);
    // A message to the IQ token reaches the sender too.
    let m = w
        .send(&format!("<message type='chat' id='m' to='{token_addr}' from='impl@example/a'><body>news</body></message>"))
        .unwrap();
    assert_eq!(attr(&m, "to"), "user@example/abc");
    assert_eq!(attr(&m, "from"), "proxy.example");
    // Expired: the route after the IQ lifetime; a request to an expired token is answered.
    w.advance(301_000);
    let (out, _) = w.send_verdict(&format!(
        "<iq type='result' id='{sealed_id}' to='proxy.example' from='user@example/abc'/>"
    ));
    assert_eq!(out, None);
    let e = w
        .send(&format!(
            "<iq type='get' id='push-2' to='{token_addr}' from='impl@example/a'><q xmlns='x'/></iq>"
        ))
        .unwrap();
    assert_eq!(condition(&e), "item-not-found");
    assert_eq!(attr(&e, "to"), "impl@example/a");
}

#[test]
fn outbound_none_and_known_refuse_what_they_do_not_allow() {
    let mut w = World::messaging().online(&["a"]);
    let token_addr = token_of_request(&mut w, "q1", "user@example/abc");
    let e = w
        .send(&format!(
            "<iq type='get' id='p' to='{token_addr}' from='impl@example/a'><q xmlns='x'/></iq>"
        ))
        .unwrap();
    assert_eq!(condition(&e), "feature-not-implemented");
    // With outbound = "none", an IQ token never routes a message.
    let (out, _) = w.send_verdict(&format!(
        "<message id='m' to='{token_addr}' from='impl@example/a'><body>x</body></message>"
    ));
    assert_eq!(out, None);
    // A peer's result to the bare domain goes nowhere.
    let (out, _) = w.send_verdict(
        "<iq type='result' id='anything' to='proxy.example' from='user@example/abc'/>",
    );
    assert_eq!(out, None);

    let mut w = World::starting(Outbound::Known).online(&["a"]);
    let e = w
        .send("<iq type='get' id='p' to='user\\40example@proxy.example' from='impl@example/a'><q xmlns='x'/></iq>")
        .unwrap();
    assert_eq!(
        condition(&e),
        "item-not-found",
        "escaped addresses need `any`"
    );
}

#[test]
fn outbound_any_reaches_escaped_addresses() {
    let mut w = World::starting(Outbound::Any).online(&["a"]);
    let out = w
        .send("<iq type='set' id='n1' to='someone\\40example.org\\2fdesk@proxy.example' from='impl@example/a'><q xmlns='x'/></iq>")
        .unwrap();
    assert_eq!(attr(&out, "to"), "someone@example.org/desk");
    assert_eq!(attr(&out, "from"), "proxy.example");
    let sealed = attr(&out, "id").to_owned();
    let res = w
        .send(&format!(
            "<iq type='result' id='{sealed}' to='proxy.example' from='someone@example.org/desk'/>"
        ))
        .unwrap();
    assert_eq!(attr(&res, "to"), "impl@example/a");
    assert_eq!(
        attr(&res, "from"),
        "someone\\40example.org\\2fdesk@proxy.example"
    );
    assert_eq!(attr(&res, "id"), "n1");
    let m = w
        .send("<message to='someone\\40example.org@proxy.example' from='impl@example/a'><body>hi</body></message>")
        .unwrap();
    assert_eq!(attr(&m, "to"), "someone@example.org");
    // Never to the component itself, nor to the implementing client.
    for to in ["x\\40proxy.example", "impl\\40example"] {
        let e = w
            .send(&format!("<iq type='get' id='bad' to='{to}@proxy.example' from='impl@example/a'><q xmlns='x'/></iq>"))
            .unwrap();
        assert_eq!(condition(&e), "item-not-found", "{to}");
    }
}

#[test]
fn xep_0106_unescaping() {
    assert_eq!(
        unescape("d\\27artagnan\\40gascon.fr").as_deref(),
        Some("d'artagnan@gascon.fr")
    );
    assert_eq!(
        unescape("a\\20b\\22\\26\\2f\\3a\\3c\\3e\\5c").as_deref(),
        Some("a b\"&/:<>\\")
    );
    assert_eq!(unescape("c\\5cx").as_deref(), Some("c\\x"));
    assert_eq!(
        unescape("not\\zzescaped").as_deref(),
        Some("not\\zzescaped")
    );
    assert_eq!(unescape("\\4"), Some("\\4".to_owned()));
    assert_eq!(unescape(""), None);
}

#[test]
fn a_reversed_reply_carries_its_latency_from_the_token() {
    let mut w = World::new().online(&["a"]);
    let fwd = w.send(&get("lat", "user@example/abc")).unwrap();
    w.advance(1234);
    let reply = format!(
        "<iq type='result' id='lat' to='{}' from='impl@example/a'/>",
        attr(&fwd, "from")
    );
    let inbound = read_one(reply.as_bytes(), Limits::default()).unwrap();
    let out = w.proxy.handle(inbound, w.clock, &mut w.rng);
    assert_eq!(out.verdict, Verdict::Reversed);
    assert_eq!(out.stanza, Stanza::Iq);
    assert_eq!(out.reply_latency_ms, Some(1234));
}

#[test]
fn outbound_details_from_review() {
    // Messages the implementing client starts do not depend on `messages`.
    let mut w = World::with(|s| s.outbound = Outbound::Any).online(&["a"]);
    let token_addr = token_of_request(&mut w, "q1", "user@example/abc");
    let m = w
        .send(&format!(
            "<message id='m' to='{token_addr}' from='impl@example/a'><body>x</body></message>"
        ))
        .unwrap();
    assert_eq!(attr(&m, "to"), "user@example/abc");
    // An escaped resource keeps its case (a resource is case-sensitive), and the reply comes
    // from the address exactly as written.
    let escaped = "someone\\40example.org\\2fGajim@proxy.example";
    let out = w
        .send(&format!(
            "<iq type='get' id='g' to='{escaped}' from='impl@example/a'><q xmlns='x'/></iq>"
        ))
        .unwrap();
    assert_eq!(attr(&out, "to"), "someone@example.org/Gajim");
    let res = w
        .send(&format!(
            "<iq type='result' id='{}' to='proxy.example' from='someone@example.org/Gajim'/>",
            attr(&out, "id")
        ))
        .unwrap();
    assert_eq!(attr(&res, "from"), escaped);
    // A peer refused by policy is not reached.
    let e = w
        .send("<iq type='get' id='p' to='x\\40spam.example@proxy.example' from='impl@example/a'><q xmlns='x'/></iq>")
        .unwrap();
    assert_eq!(condition(&e), "item-not-found");
    // A priority out of range keeps its sign.
    let mut w = World::new();
    w.send("<presence from='impl@example/idle' to='proxy.example'><priority>-200</priority></presence>");
    assert!(!w.proxy.resources().any_eligible());
}

#[test]
fn a_stream_lost_beside_others_relearns_presence_and_keeps_held_requests() {
    let mut w = World::holding(2000, 8).online(&["a"]);
    let probe = w.proxy.stream_lost(w.clock);
    assert_eq!(probe.name(), "presence");
    assert_eq!(attr(&probe, "type"), "probe");
    assert_eq!(attr(&probe, "to"), "impl@example");
    // Nothing is assumed online: a request waits for the probe's answers.
    let (_, v) = w.send_verdict(HELD_REQUEST);
    assert_eq!(v, Verdict::Held);
    assert_eq!(
        w.send("<presence from='impl@example/a' to='proxy.example'/>"),
        None
    );
    let out = transmitted(&mut w);
    let forwarded: Vec<&Element> = out.iter().filter(|e| e.name() == "iq").collect();
    assert_eq!(
        forwarded.len(),
        1,
        "released once a resource is known again"
    );
    assert_eq!(attr(forwarded[0], "to"), "impl@example/a");
}

#[test]
fn budgets_tell_the_implementing_client_nothing_about_who_a_token_names() {
    // Two tokens of one account (A, B), one of another (C), and C's escaped address.
    let mut w = World::starting(Outbound::Any).online(&["a"]);
    let a = token_of_request(&mut w, "qa", "user@example/abc");
    let b = token_of_request(&mut w, "qb", "user@example/abc");
    let c = token_of_request(&mut w, "qc", "other@example/x");
    let escaped = "other\\40example@proxy.example";
    let ask = |w: &mut World, to: &str, id: &str| {
        w.send_verdict(&format!(
            "<iq type='get' id='{id}' to='{to}' from='impl@example/a'><q xmlns='x'/></iq>"
        ))
    };
    // The whole outbound burst on A.
    for i in 0..50 {
        let (out, v) = ask(&mut w, &a, &format!("a{i}"));
        assert_eq!(v, Verdict::Outbound, "{i}");
        // The user answers each at once: its replies are routed, whatever it sent itself.
        let res = w.send(&format!(
            "<iq type='result' id='{}' to='proxy.example' from='user@example/abc'/>",
            attr(&out.unwrap(), "id")
        ));
        assert!(res.is_some(), "reply {i} routed");
    }
    // Then one to each: the same answer whoever the token names (before, B's request was
    // dropped in silence and C's delivered: A and B named one account).
    let answers: Vec<String> = [&a, &b, &c, escaped]
        .into_iter()
        .enumerate()
        .map(|(i, to)| match ask(&mut w, to, &format!("x{i}")) {
            (Some(e), Verdict::Refused(Condition::ResourceConstraint)) => {
                assert_eq!(attr(&e, "to"), "impl@example/a");
                condition(&e).to_owned()
            }
            other => panic!("{to}: {other:?}"),
        })
        .collect();
    assert!(answers.iter().all(|c| c == "resource-constraint"));
    // Refilled at the rate of one sender: 10 a second, to anyone.
    w.advance(1000);
    for (i, to) in [&b, &c, escaped, &a]
        .into_iter()
        .cycle()
        .take(10)
        .enumerate()
    {
        assert_eq!(ask(&mut w, to, &format!("y{i}")).1, Verdict::Outbound);
    }
    assert_eq!(
        ask(&mut w, &a, "z").1,
        Verdict::Refused(Condition::ResourceConstraint)
    );
    // Messages share the budget, and are dropped over it whoever they go to (the reason
    // text is what metrics counts: src/metrics.rs).
    let (m, v) = w.send_verdict(&format!(
        "<message to='{c}' from='impl@example/a'><body>hi</body></message>"
    ));
    assert!(m.is_none());
    assert_eq!(v, Verdict::Dropped(DropReason::OverOutboundRate));
}

#[test]
fn a_peer_answering_each_request_once_is_never_cut_off() {
    // The user spends its own request budget, then the implementing client asks it as fast
    // as its outbound budget lets it, over two of its tokens: every answer is routed.
    let mut w = World::starting(Outbound::Known).online(&["a"]);
    let a = token_of_request(&mut w, "qa", "user@example/abc");
    let b = token_of_request(&mut w, "qb", "user@example/abc");
    for i in 0..60 {
        let _ = w.send(&format!(
            "<iq type='get' id='own{i}' to='proxy.example' from='user@example/abc'><q xmlns='x'/></iq>"
        ));
    }
    let mut routed = 0;
    for i in 0..200 {
        let to = if i % 2 == 0 { &a } else { &b };
        let (out, v) = w.send_verdict(&format!(
            "<iq type='get' id='r{i}' to='{to}' from='impl@example/a'><q xmlns='x'/></iq>"
        ));
        if v == Verdict::Outbound {
            let res = w.send(&format!(
                "<iq type='result' id='{}' to='proxy.example' from='user@example/abc'/>",
                attr(&out.unwrap(), "id")
            ));
            assert!(res.is_some(), "reply to r{i} routed");
            routed += 1;
        }
        w.advance(50);
    }
    assert!(routed >= 100, "{routed}");
}

#[test]
fn an_outbound_message_token_lives_its_own_lifetime() {
    // IQ tokens live longer than message tokens here: a message token is not accepted for
    // the IQ lifetime.
    let mut w = World::with(|s| {
        s.messages = Messages::Forward;
        s.outbound = Outbound::Known;
        s.token_lifetime = 7200;
        s.message_token_lifetime = 600;
    })
    .online(&["a"]);
    let m = w
        .send("<message type='chat' to='proxy.example' from='user@example/abc'><body>hi</body></message>")
        .unwrap();
    let token_addr = attr(&m, "from").to_owned();
    let push = |w: &mut World| {
        w.send_verdict(&format!(
            "<message to='{token_addr}' from='impl@example/a'><body>later</body></message>"
        ))
    };
    w.advance(599_000);
    assert_eq!(push(&mut w).1, Verdict::Outbound);
    w.advance(2_000);
    let (out, v) = push(&mut w);
    assert!(out.is_none() && matches!(v, Verdict::Dropped(_)), "{v:?}");
}

#[test]
fn a_held_request_whose_namespace_is_inherited_by_many_elements_is_released_whole() {
    // 1 KB of namespace on `q`, inherited by 600 children: 600 KB of namespace copies in the
    // tree (within twice the default byte limit), from 5 KB of text. Its text is parsed
    // again at release, under limits that must admit the tree it was.
    let mut w = World::holding(2000, 8);
    let ns = "u".repeat(1000);
    let request = format!(
        "<iq type='get' id='wide' to='proxy.example' from='u@example/r'><q xmlns='{ns}'>{}</q></iq>",
        "<a/>".repeat(600)
    );
    assert_eq!(w.send_verdict(&request).1, Verdict::Held);
    assert_eq!(
        w.send("<presence from='impl@example/a' to='proxy.example'/>"),
        None
    );
    let out = transmitted(&mut w);
    let forwarded: Vec<&Element> = out
        .iter()
        .filter(|e| e.name() == "iq" && e.attr("type") == Some("get"))
        .collect();
    assert_eq!(forwarded.len(), 1, "released, not refused: {out:?}");
    assert_eq!(
        forwarded[0]
            .get_child("q", ns.as_str())
            .unwrap()
            .children()
            .count(),
        600
    );
}

/// The resource the implementing client sees for a request of `sender`, split into
/// pseudonym and token.
fn seen(w: &mut World, id: &str, sender: &str) -> (String, String) {
    let fwd = w
        .send(&format!(
            "<iq type='get' id='{id}' to='proxy.example' from='{sender}'><q xmlns='urn:x'/></iq>"
        ))
        .unwrap();
    assert_eq!(attr(&fwd, "type"), "get", "forwarded");
    let r = attr(&fwd, "from").strip_prefix("proxy.example/").unwrap();
    let (p, t) = r.split_once('.').expect("PSEUDONYM.TOKEN");
    (p.to_owned(), t.to_owned())
}

#[test]
fn a_pseudonym_is_stable_per_account_and_says_nothing_of_who() {
    let pseudonymous = |keys: &[(u32, u64, [u8; 32])]| {
        let mut w = World::with(|s| {
            s.sender = Sender::Pseudonym;
            s.messages = Messages::Forward;
        })
        .online(&["a", "b"]);
        w.proxy.set_keys(KeySet::from_secrets(keys).unwrap());
        w
    };
    let mut w = pseudonymous(&[(1, 0, [7; 32])]);
    let (alice, t1) = seen(&mut w, "1", "alice@example/phone");
    let (alice2, t2) = seen(&mut w, "2", "alice@example/laptop");
    let (bob, _) = seen(&mut w, "3", "bob@example/phone");
    assert_eq!(alice.len(), PSEUDONYM_LEN);
    assert!(
        alice
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(
        alice, alice2,
        "one account, one pseudonym, whatever its resource"
    );
    assert_ne!(t1, t2, "tokens still differ per request");
    assert_ne!(alice, bob);
    for seen in [&alice, &bob] {
        assert!(!seen.contains("alice") && !seen.contains("bob"));
    }
    // Another instance reading the same key file, and the same after a rotation (a newer
    // key current; pruning keeps the stored selection secret: see keys.rs).
    let mut other = pseudonymous(&[(1, 0, [7; 32])]);
    assert_eq!(seen(&mut other, "4", "alice@example/x").0, alice);
    let mut rotated = pseudonymous(&[(1, 0, [7; 32]), (2, 10, [8; 32])]);
    assert_eq!(seen(&mut rotated, "5", "alice@example/x").0, alice);
    // Messages carry it too.
    let fwd = w
        .send("<message to='proxy.example' from='alice@example/phone' id='m'><body>hi</body></message>")
        .unwrap();
    let from = attr(&fwd, "from").to_owned();
    assert!(from.starts_with(&format!("proxy.example/{alice}.")));
    // A reply to the pseudonymous address is reversed by its token alone.
    let back = w
        .send(&format!(
            "<iq type='result' id='1' to='proxy.example/{alice}.{t1}' from='impl@example/a'/>"
        ))
        .unwrap();
    assert_eq!(attr(&back, "to"), "alice@example/phone");
    assert_eq!(attr(&back, "from"), "proxy.example");
    let back = w
        .send(&format!(
            "<message to='{from}' from='impl@example/a'><body>yo</body></message>"
        ))
        .unwrap();
    assert_eq!(attr(&back, "to"), "alice@example/phone");
    // A forged token behind a real pseudonym, or a real token behind a made-up one, goes
    // nowhere but where the token says.
    let forged = format!("proxy.example/{alice}.{}", "A".repeat(t2.len()));
    assert_eq!(
        w.send(&format!(
            "<iq type='result' id='2' to='{forged}' from='impl@example/a'/>"
        )),
        None
    );
    let bobs = seen(&mut w, "3", "bob@example/phone").1;
    let back = w
        .send(&format!(
            "<iq type='result' id='3' to='proxy.example/{alice}.{bobs}' from='impl@example/a'/>"
        ))
        .unwrap();
    assert_eq!(attr(&back, "to"), "bob@example/phone");
}

#[test]
fn policy_and_limits_are_the_same_in_every_sender_mode() {
    for sender in [Sender::Sealed, Sender::Pseudonym, Sender::Revealed] {
        let mut w = World::with(|s| s.sender = sender).online(&["a"]);
        let e = w.send("<iq type='get' id='1' to='proxy.example' from='x@spam.example/r'><q xmlns='urn:x'/></iq>").unwrap();
        assert_eq!(condition(&e), "forbidden", "{sender:?}");
        let resource = "r".repeat(token::MAX_PLAINTEXT_LEN);
        let xml = format!(
            "<iq type='get' id='1' to='proxy.example' from='u@example/{resource}'><q xmlns='urn:x'/></iq>"
        );
        assert_eq!(
            condition(&w.send(&xml).unwrap()),
            "not-acceptable",
            "{sender:?}"
        );
        let refused = (0..80)
            .filter(|i| {
                w.send(&format!("<iq type='get' id='{i}' to='proxy.example' from='flood@example/r{i}'><q xmlns='urn:x'/></iq>"))
                    .unwrap()
                    .attr("type")
                    == Some("error")
            })
            .count();
        assert_eq!(refused, 30, "{sender:?}");
    }
}

#[test]
fn revealed_shows_the_sender_and_reverses_only_the_ids_it_issued() {
    let mut w = World::with(|s| {
        s.sender = Sender::Revealed;
        s.messages = Messages::Forward;
    })
    .online(&["a"]);
    let fwd = w
        .send("<iq type='get' id='q.1' to='proxy.example' from='alice@example/phone'><q xmlns='urn:x'/></iq>")
        .unwrap();
    // As mod_client_proxy writes it: the sender's full JID is the resource.
    assert_eq!(attr(&fwd, "from"), "proxy.example/alice@example/phone");
    let from: Jid = attr(&fwd, "from").parse().unwrap();
    let asked: Jid = from.resource().unwrap().as_str().parse().unwrap();
    assert_eq!(asked.to_string(), "alice@example/phone");
    // The id carries the token, after the original id.
    let id = attr(&fwd, "id").to_owned();
    let token = id.strip_prefix("q.1.").expect("ID.TOKEN").to_owned();
    assert!(!token.contains('.'));
    let reply = |to: &str, id: &str| {
        format!(
            "<iq type='result' id='{id}' to='{to}' from='impl@example/a'><r xmlns='urn:x'/></iq>"
        )
    };
    let back = w
        .send(&reply("proxy.example/alice@example/phone", &id))
        .unwrap();
    assert_eq!(attr(&back, "to"), "alice@example/phone");
    assert_eq!(attr(&back, "from"), "proxy.example");
    assert_eq!(attr(&back, "id"), "q.1", "the sender gets its own id back");
    // Forged: an id jat-proxy never issued, to a real or made-up address; a genuine id
    // replayed to another address (another account, another resource of the same one); a
    // genuine token under another id.
    for (to, id, why) in [
        ("proxy.example/alice@example/phone", "made-up", None),
        ("proxy.example/victim@example/x", "made-up", None),
        (
            "proxy.example/victim@example/x",
            id.as_str(),
            Some(DropReason::RevealedMismatch),
        ),
        (
            "proxy.example/alice@example/laptop",
            id.as_str(),
            Some(DropReason::RevealedMismatch),
        ),
        (
            "proxy.example/alice@example/phone",
            &format!("q.2.{token}"),
            None,
        ),
    ] {
        let (out, verdict) = w.send_verdict(&reply(to, id));
        assert_eq!(out, None, "{to} {id}");
        if let Some(why) = why {
            assert_eq!(verdict, Verdict::Dropped(why), "{to} {id}");
        }
    }
    // An error of the implementing client goes back the same way.
    let fwd = w
        .send(
            "<iq type='set' id='s' to='proxy.example' from='bob@example/x'><q xmlns='urn:x'/></iq>",
        )
        .unwrap();
    let err = format!(
        "<iq type='error' id='{}' to='proxy.example/bob@example/x' from='impl@example/a'><error type='cancel'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        attr(&fwd, "id")
    );
    let back = w.send(&err).unwrap();
    assert_eq!(
        (attr(&back, "to"), attr(&back, "id")),
        ("bob@example/x", "s")
    );
    assert_eq!(condition(&back), "forbidden");
    // Messages keep the sealed form: no id to carry a token through a conversation.
    let msg = w
        .send("<message to='proxy.example' from='alice@example/phone' id='m'><body>hi</body></message>")
        .unwrap();
    assert!(!attr(&msg, "from").contains("alice"));
    assert_eq!(attr(&msg, "id"), "m");
}

#[test]
fn every_sender_mode_reverses_the_forms_of_the_others() {
    // Changing `sender` (a restart, or instances of a cluster upgraded one by one) loses no
    // reply in flight: each form is reversed whatever the mode.
    let forms: Vec<(Sender, String, String)> =
        [Sender::Sealed, Sender::Pseudonym, Sender::Revealed]
            .into_iter()
            .map(|mode| {
                let mut w = World::with(|s| s.sender = mode).online(&["a"]);
                let fwd = w.send(&get("7", "carol@example/r")).unwrap();
                (
                    mode,
                    attr(&fwd, "from").to_owned(),
                    attr(&fwd, "id").to_owned(),
                )
            })
            .collect();
    for mode in [Sender::Sealed, Sender::Pseudonym, Sender::Revealed] {
        let mut w = World::with(|s| s.sender = mode).online(&["a"]);
        for (issued, to, id) in &forms {
            let back = w
                .send(&format!(
                    "<iq type='result' id='{id}' to='{to}' from='impl@example/a'/>"
                ))
                .unwrap_or_else(|| panic!("{issued:?} form under {mode:?}"));
            assert_eq!(
                (attr(&back, "to"), attr(&back, "id")),
                ("carol@example/r", "7")
            );
        }
    }
}

#[test]
fn revealed_outbound_starts_only_at_a_token_never_at_a_jid() {
    let mut w = World::with(|s| {
        s.sender = Sender::Revealed;
        s.messages = Messages::Forward;
        s.outbound = Outbound::Known;
    })
    .online(&["a"]);
    let fwd = w.send(&get("q1", "user@example/abc")).unwrap();
    let token = attr(&fwd, "id").rsplit_once('.').unwrap().1.to_owned();
    // The token of the request's id is an address it may start stanzas to (outbound known)…
    let out = w
        .send(&format!("<iq type='get' id='push' to='proxy.example/{token}' from='impl@example/a'><q xmlns='urn:x'/></iq>"))
        .unwrap();
    assert_eq!(attr(&out, "to"), "user@example/abc");
    // …a JID in clear is not, whatever it names.
    for to in [
        "proxy.example/user@example/abc",
        "proxy.example/victim@example/x",
    ] {
        let out = w
            .send(&format!(
                "<iq type='get' id='p2' to='{to}' from='impl@example/a'><q xmlns='urn:x'/></iq>"
            ))
            .unwrap();
        assert_eq!(attr(&out, "type"), "error", "{to}");
        assert_eq!(attr(&out, "to"), "impl@example/a", "{to}");
    }
}

#[test]
fn the_revealed_form_tells_nothing_in_the_other_modes() {
    // Sealed (or pseudonym): the implementing client puts the token of its request in the
    // id (`ID.TOKEN`) and a guessed address as the resource. Were that reversed when the
    // guess is right, it could test guesses one by one. It never is, right or wrong.
    for mode in [Sender::Sealed, Sender::Pseudonym] {
        let mut w = World::with(|s| s.sender = mode).online(&["a"]);
        let fwd = w.send(&get("7", "alice@example/phone")).unwrap();
        let resource = attr(&fwd, "from").strip_prefix("proxy.example/").unwrap();
        let token = resource
            .rsplit_once('.')
            .map_or(resource, |(_, t)| t)
            .to_owned();
        let verdicts: Vec<Verdict> = ["alice@example/phone", "bob@example/phone"]
            .into_iter()
            .map(|guess| {
                let (out, verdict) = w.send_verdict(&format!(
                    "<iq type='result' id='7.{token}' to='proxy.example/{guess}' from='impl@example/a'/>"
                ));
                assert_eq!(out, None, "{mode:?} {guess}");
                verdict
            })
            .collect();
        assert_eq!(
            verdicts[0], verdicts[1],
            "{mode:?}: the same for a right guess"
        );
    }
}

#[test]
fn revealed_serves_every_address_that_fits_a_resource_and_refuses_the_others() {
    let mut w = World::with(|s| s.sender = Sender::Revealed).online(&["a"]);
    // Addresses that look like tokens or like `PSEUDONYM.TOKEN`: answered all the same.
    for sender in [
        "server.example",
        "localhost",
        "abcdefghijklmnop.example",
        "christopher_long.smith@example/r",
    ] {
        let fwd = w.send(&get("1", sender)).unwrap();
        assert_eq!(attr(&fwd, "from"), format!("proxy.example/{sender}"));
        let back = w
            .send(&format!(
                "<iq type='result' id='{}' to='{}' from='impl@example/a'/>",
                attr(&fwd, "id"),
                attr(&fwd, "from")
            ))
            .unwrap_or_else(|| panic!("{sender}'s reply"));
        assert_eq!((attr(&back, "to"), attr(&back, "id")), (sender, "1"));
    }
    // One whose parts are valid one by one but not as one resource (left-to-right and
    // right-to-left scripts mixed): refused at once, not left waiting for a reply that
    // could never be matched.
    let e = w.send(&get("2", "user@example/שלום")).unwrap();
    assert_eq!(condition(&e), "not-acceptable");
}

/// A world as an instance of several behind ejabberd runs: `balance`, requests held up to
/// `hold_ms`, and a probe round at every (re)connection (the one `World::with` makes starts
/// now).
fn learning(balance: Balance, hold_ms: u64) -> World {
    World::with(|s| {
        s.selection.balance = balance;
        s.hold_ms = hold_ms;
        s.max_held = 8;
        s.learn_ms = LEARN_MS;
    })
}

/// Lets `ms` pass, handling the core's timers when due; what it sends on its own meanwhile.
fn run_for(w: &mut World, ms: u64) -> Vec<Element> {
    let until = w.clock.mono_ms + ms;
    let mut sent = transmitted(w);
    while let Some(t) = w.proxy.poll_timeout()
        && t <= until
    {
        w.advance(t.saturating_sub(w.clock.mono_ms));
        w.proxy.handle_timeout(w.clock);
        sent.extend(transmitted(w));
        assert!(
            w.proxy.poll_timeout().is_none_or(|n| n > w.clock.mono_ms),
            "a timer still due"
        );
    }
    w.advance(until - w.clock.mono_ms);
    sent.extend(transmitted(w));
    sent
}

/// A sender whose sticky resource among `a` and `b` is `b`, on an instance that knows both.
fn sender_of_b() -> String {
    let mut both = World::selecting(Balance::Sticky, &[]).online(&["a", "b"]);
    (0..100)
        .map(|i| format!("user{i}@example"))
        .find(|s| routed(&mut both, "x", &format!("{s}/r")) == "b")
        .expect("some sender's resource is b")
}

#[test]
fn a_sticky_pick_waits_for_the_probe_round_under_way() {
    let sender = sender_of_b();
    let mut w = learning(Balance::Sticky, 5000).online(&["a"]);
    let (_, v) = w.send_verdict(&get("1", &format!("{sender}/r")));
    assert_eq!(v, Verdict::Held, "`a` is known, but the round is not over");
    let sent = run_for(&mut w, 600);
    assert!(
        sent.iter().all(|e| e.name() == "presence"),
        "only probes while the round lasts"
    );
    assert!(
        sent.len() >= 2,
        "the target is probed every {HOLD_PROBE_GAP_MS} ms"
    );
    // The round brings `b` (its presence went to another instance before).
    w.send("<presence from='impl@example/b' to='proxy.example'/>");
    assert!(transmitted(&mut w).is_empty(), "still held");
    let sent = run_for(&mut w, LEARN_MS);
    let forwarded: Vec<_> = sent.iter().filter(|e| e.name() == "iq").collect();
    assert_eq!(forwarded.len(), 1, "released once, when the round ended");
    assert_eq!(
        attr(forwarded[0], "to"),
        "impl@example/b",
        "the pick of every instance"
    );
    assert_eq!(w.proxy.held(), 0);
    assert_eq!(
        w.proxy.poll_timeout(),
        None,
        "no round, nothing held: no timer"
    );
    // After the round, picked at once.
    assert_eq!(routed(&mut w, "2", &format!("{sender}/r")), "b");
    // Without the round, the pick would have been `a`.
    let mut early = World::selecting(Balance::Sticky, &[]).online(&["a"]);
    assert_eq!(routed(&mut early, "3", &format!("{sender}/r")), "a");
}

#[test]
fn a_request_held_for_the_round_leaves_when_its_own_hold_time_runs_out() {
    let sender = sender_of_b();
    let mut w = learning(Balance::Sticky, 500).online(&["a"]);
    let (_, v) = w.send_verdict(&get("1", &format!("{sender}/r")));
    assert_eq!(v, Verdict::Held);
    let sent = run_for(&mut w, 500);
    let forwarded: Vec<_> = sent.iter().filter(|e| e.name() == "iq").collect();
    assert_eq!(forwarded.len(), 1, "hold_ms bounds the wait: {sent:?}");
    assert_eq!(
        attr(forwarded[0], "to"),
        "impl@example/a",
        "what is known then"
    );
}

#[test]
fn priority_waits_for_the_round_and_random_does_not() {
    let mut w = learning(Balance::Priority, 5000);
    w.send(&presence_with_priority("phone", 1));
    let (_, v) = w.send_verdict(&get("1", "u@example/r"));
    assert_eq!(v, Verdict::Held);
    w.send(&presence_with_priority("desktop", 5));
    let sent = run_for(&mut w, LEARN_MS);
    let forwarded: Vec<_> = sent.iter().filter(|e| e.name() == "iq").collect();
    assert_eq!(attr(forwarded[0], "to"), "impl@example/desktop");

    let mut w = learning(Balance::Random, 5000).online(&["a"]);
    let (out, v) = w.send_verdict(&get("1", "u@example/r"));
    assert_eq!(
        v,
        Verdict::Forwarded,
        "a random pick is as good among fewer"
    );
    assert_eq!(attr(&out.unwrap(), "to"), "impl@example/a");
    // The round still probes: the other instances learn from its answers too.
    let probes = run_for(&mut w, LEARN_MS);
    assert!(probes.len() >= 6, "{}", probes.len());
    assert!(probes.iter().all(|e| attr(e, "type") == "probe"));
}

#[test]
fn without_holding_a_sticky_pick_is_made_at_once() {
    let mut w = learning(Balance::Sticky, 0).online(&["a"]);
    assert_eq!(routed(&mut w, "1", "u@example/r"), "a");
}

#[test]
fn a_stream_lost_or_joined_starts_a_round_and_the_session_lost_ends_it() {
    let sender = sender_of_b();
    let mut w = learning(Balance::Sticky, 5000).online(&["a", "b"]);
    run_for(&mut w, LEARN_MS);
    assert_eq!(routed(&mut w, "1", &format!("{sender}/r")), "b");
    let joined = w.proxy.joined(w.clock);
    assert_eq!(attr(&joined[0], "type"), "probe");
    let (_, v) = w.send_verdict(&get("2", &format!("{sender}/r")));
    assert_eq!(
        v,
        Verdict::Held,
        "a stream joined: the round's presence may be new"
    );
    let sent = run_for(&mut w, LEARN_MS);
    assert_eq!(sent.iter().filter(|e| e.name() == "iq").count(), 1);

    let _ = w.proxy.stream_lost(w.clock);
    w.send("<presence from='impl@example/a' to='proxy.example'/>");
    let (_, v) = w.send_verdict(&get("3", &format!("{sender}/r")));
    assert_eq!(v, Verdict::Held, "a stream lost: relearnt from scratch");
    w.proxy.disconnected();
    assert_eq!(
        w.proxy.poll_timeout(),
        None,
        "the round ends with the session"
    );
}

#[test]
fn unsubscribed_after_a_probe_is_answered_with_a_new_subscription_request_once() {
    let mut w = World::new();
    let unsubscribed = "<presence type='unsubscribed' from='impl@example' to='proxy.example'/>";
    // Right after login the probe is followed by its own subscription request.
    assert_eq!(w.send(unsubscribed), None);
    let _ = w.proxy.probe();
    let again = w.send(unsubscribed).expect("asked again");
    assert_eq!(attr(&again, "type"), "subscribe");
    assert_eq!(attr(&again, "to"), "impl@example");
    assert_eq!(attr(&again, "from"), "proxy.example");
    // Once per probe: a client that denies every request is not answered in a loop.
    assert_eq!(w.send(unsubscribed), None);
    // From a full JID it is not the server's answer to a probe.
    let _ = w.proxy.probe();
    assert_eq!(
        w.send("<presence type='unsubscribed' from='impl@example/a' to='proxy.example'/>"),
        None
    );
}

#[test]
fn requests_held_for_the_round_are_forwarded_not_refused_when_the_stream_closes() {
    let mut w = learning(Balance::Sticky, 5000).online(&["a"]);
    let (_, v) = w.send_verdict(&get("1", "u@example/r"));
    assert_eq!(v, Verdict::Held);
    w.proxy.settle_held_at_close(w.clock);
    let out = transmitted(&mut w);
    assert_eq!(out.len(), 1);
    assert_eq!(attr(&out[0], "to"), "impl@example/a");
    assert_eq!(w.proxy.held(), 0);
}
