//! Runs one path of the sans-IO core N times, bytes in to bytes out, as the session does —
//! the reader (framer and parser), the core's decision (tokens included), the writer — each
//! stage in a function of its own, so that an instruction count (`valgrind --tool=callgrind`)
//! splits the cost per stanza between them (BENCHMARKS.md, "Performance III").
//!
//! `cargo run --release --example core_paths -- PATH N` with PATH one of `request`, `reply`,
//! `message`, `message-back`, `outbound`, `routed`.

use std::hint::black_box;

use jat_proxy::invariants::{NOW, SeededRandom, TEST_HEADER, keys, read_one, settings};
use jat_proxy::{Clock, Frame, Inbound, Limits, Outcome, Proxy, RateLimit, Reader, Writer};
use xmpp_parsers::minidom::Element;

const CLOCK: Clock = Clock {
    unix_ms: NOW * 1000,
    mono_ms: 0,
};

#[inline(never)]
fn parse(reader: &mut Reader, bytes: &[u8]) -> Inbound {
    reader.feed(bytes).expect("well-formed");
    match reader.next_frame().expect("well-formed") {
        Some(Frame::Stanza(inbound)) => inbound,
        _ => panic!("one stanza"),
    }
}

#[inline(never)]
fn decide(proxy: &mut Proxy, inbound: Inbound, rng: &mut SeededRandom) -> Outcome {
    proxy.handle(inbound, CLOCK, rng)
}

#[inline(never)]
fn serialise(writer: &mut Writer, el: &Element, out: &mut Vec<u8>) -> usize {
    out.clear();
    writer.element(el, out).expect("serialisable");
    out.len()
}

fn handle(proxy: &mut Proxy, xml: &str, rng: &mut SeededRandom) -> Element {
    let inbound = read_one(xml.as_bytes(), Limits::default()).expect("one stanza");
    proxy.handle(inbound, CLOCK, rng).transmit.expect("sent on")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "request".into());
    let n: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(5000);

    let mut s = settings();
    s.rate = RateLimit {
        per_second: 1e9,
        burst: 1e9,
        max_senders: 16,
        per_domain: 1e9,
        domain_burst: 1e9,
    };
    let mut proxy = Proxy::new(s, keys());
    let mut rng = SeededRandom::new(1);
    let presence = "<presence from='impl@example/a' to='proxy.example'/>";
    let inbound = read_one(presence.as_bytes(), Limits::default()).expect("presence");
    let _ = proxy.handle(inbound, CLOCK, &mut rng);

    let request = "<iq type='get' id='purple-7a2b' to='proxy.example' from='user@example.org/phone-4f3a'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>";
    let message = "<message type='chat' id='m-7a2b' to='proxy.example' from='user@example.org/phone-4f3a'><body>hello there</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>";
    let input = match path.as_str() {
        "request" => request.to_owned(),
        "message" => message.to_owned(),
        "reply" => {
            let fwd = handle(&mut proxy, request, &mut rng);
            format!(
                "<iq type='result' id='purple-7a2b' to='{}' from='impl@example/a'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='bot' name='x'/><feature var='urn:xmpp:ping'/></query></iq>",
                fwd.attr("from").expect("token address")
            )
        }
        "message-back" | "outbound" | "routed" => {
            let fwd = handle(&mut proxy, message, &mut rng);
            let token = fwd.attr("from").expect("token address").to_owned();
            let push = format!(
                "<iq type='get' id='push-1' to='{token}' from='impl@example/a'><query xmlns='urn:x:ask'/></iq>"
            );
            match path.as_str() {
                "message-back" => format!(
                    "<message type='chat' id='r-1' to='{token}' from='impl@example/a'><body>hello</body></message>"
                ),
                "outbound" => push,
                _ => {
                    let sent = handle(&mut proxy, &push, &mut rng);
                    format!(
                        "<iq type='result' id='{}' to='proxy.example' from='user@example.org/phone-4f3a'><answer xmlns='urn:x:ask'/></iq>",
                        sent.attr("id").expect("route id")
                    )
                }
            }
        }
        other => {
            eprintln!("core_paths: unknown path {other}");
            std::process::exit(2);
        }
    };

    let mut reader = Reader::resume(Limits::default(), TEST_HEADER).expect("header");
    let mut writer = Writer::resumed();
    let mut out = Vec::with_capacity(4096);
    let mut total = 0;
    for _ in 0..n {
        let inbound = parse(&mut reader, black_box(input.as_bytes()));
        let outcome = decide(&mut proxy, inbound, &mut rng);
        let el = outcome.transmit.expect("sent on");
        total += serialise(&mut writer, &el, &mut out);
    }
    println!("{path}: {n} stanzas, {total} bytes out");
}
