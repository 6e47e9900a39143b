//! Micro-benchmarks: the token codec, the sans-IO core from bytes in to bytes out, and the
//! rate limiter at a full table.
//!
//! `cargo bench --bench core`. Numbers of one run are in BENCHMARKS.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jat_proxy::invariants::{
    COMPONENT, NOW, NOW_MS, SeededRandom, TEST_HEADER, keys, read_one, settings,
};
use jat_proxy::proxy::{Balance, Clock, DropReason, Proxy, Selection, Stanza, Verdict};
use jat_proxy::stream::{Frame, Reader, Writer};
use jat_proxy::token::{self, Binding, Contents, SALT_LEN};
use jat_proxy::{Limiter, Limits, RateLimit};

/// A sender JID of exactly `len` bytes.
fn sender(len: usize) -> String {
    let base = "user@example.org/";
    format!("{base}{}", "r".repeat(len - base.len()))
}

fn tokens(c: &mut Criterion) {
    let keys = keys();
    let binding = Binding::iq(COMPONENT, "purple-7a2b");
    let mut g = c.benchmark_group("token");
    for len in [20usize, 50, 200, 700] {
        let s = sender(len);
        let contents = Contents {
            sender: &s,
            original_to: None,
        };
        let t = token::seal(&keys, binding, &contents, NOW_MS, [9; SALT_LEN]).unwrap();
        let mut forged = t.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("encode", len), &len, |b, _| {
            b.iter(|| token::seal(&keys, binding, black_box(&contents), NOW_MS, [9; SALT_LEN]))
        });
        g.bench_with_input(BenchmarkId::new("decode", len), &len, |b, _| {
            b.iter(|| token::open(&keys, binding, black_box(&t), NOW_MS, 300))
        });
        g.bench_with_input(BenchmarkId::new("decode_forged", len), &len, |b, _| {
            b.iter(|| token::open(&keys, binding, black_box(&forged), NOW_MS, 300))
        });
        g.bench_with_input(BenchmarkId::new("encode+decode", len), &len, |b, _| {
            b.iter(|| {
                let t = token::seal(&keys, binding, black_box(&contents), NOW_MS, [9; SALT_LEN])
                    .unwrap();
                token::open(&keys, binding, &t, NOW_MS, 300)
            })
        });
    }
    // The fixed part of every seal and open: deriving the token's own AEAD key.
    let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, &[0x42; 32]);
    g.bench_function("parts/kdf_hkdf_expand_32", |b| {
        b.iter(|| {
            let info = [&b"jat-proxy token v1"[..], black_box(&[7u8; 16][..])];
            let okm = prk.expand(&info, &ring::aead::CHACHA20_POLY1305).unwrap();
            ring::aead::LessSafeKey::new(ring::aead::UnboundKey::from(okm))
        })
    });
    g.finish();
}

const CLOCK: Clock = Clock {
    unix_ms: NOW * 1000,
    mono_ms: 0,
};

fn core(c: &mut Criterion) {
    let mut proxy = Proxy::new(settings_unlimited(), keys());
    let mut rng = SeededRandom::new(1);
    let online = read_one(
        b"<presence from='impl@example/a' to='proxy.example'/>",
        Limits::default(),
    )
    .unwrap();
    let _ = proxy.handle(online, CLOCK, &mut rng);
    let request = b"<iq type='get' id='purple-7a2b' to='proxy.example' from='user@example.org/phone-4f3a'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>";
    let inbound = read_one(request, Limits::default()).unwrap();
    let fwd = proxy.handle(inbound, CLOCK, &mut rng).transmit.unwrap();
    let reply = format!(
        "<iq type='result' id='purple-7a2b' to='{}' from='impl@example/a'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='bot' name='x'/><feature var='urn:xmpp:ping'/></query></iq>",
        fwd.attr("from").unwrap()
    );
    // As the session runs it: one long-lived reader and writer, bytes in, bytes out.
    let mut reader = Reader::resume(Limits::default(), TEST_HEADER).unwrap();
    let mut writer = Writer::resumed();
    let mut out = Vec::with_capacity(4096);
    let mut read = move |bytes: &[u8]| {
        reader.feed(bytes).unwrap();
        match reader.next_frame().unwrap() {
            Some(Frame::Stanza(inbound)) => inbound,
            _ => unreachable!("one stanza"),
        }
    };
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    // Each path as the session runs it (counted for the metrics, src/metrics.rs), and without
    // the count, to compare the two within one run.
    for (name, input, counted) in [
        ("request_in_forwarded_out", &request[..], true),
        ("request_in_forwarded_out_uncounted", request, false),
        ("reply_in_reversed_out", reply.as_bytes(), true),
        ("reply_in_reversed_out_uncounted", reply.as_bytes(), false),
    ] {
        let metrics = jat_proxy::metrics::Metrics::new();
        g.bench_function(name, |b| {
            b.iter(|| {
                let el = read(black_box(input));
                let outcome = proxy.handle(el, CLOCK, &mut rng);
                if counted {
                    metrics.record(&outcome);
                }
                let o = outcome.transmit;
                out.clear();
                writer.element(&o.unwrap(), &mut out).unwrap();
                out.len()
            })
        });
    }
    g.bench_function("parse_only", |b| b.iter(|| read(black_box(request))));
    g.finish();

    // The request path with four resources online, per selection policy (the resources'
    // priorities differ, so `priority` has one winner).
    let mut g = c.benchmark_group("select");
    g.throughput(Throughput::Elements(1));
    for balance in [Balance::Random, Balance::Sticky, Balance::Priority] {
        let mut settings = settings_unlimited();
        settings.selection = Selection {
            balance,
            patterns: vec![],
        };
        let mut proxy = Proxy::new(settings, keys());
        for (i, r) in ["desktop", "laptop", "worker-1", "worker-2"]
            .iter()
            .enumerate()
        {
            let p = format!(
                "<presence from='impl@example/{r}' to='proxy.example'><priority>{i}</priority></presence>"
            );
            let _ = proxy.handle(
                read_one(p.as_bytes(), Limits::default()).unwrap(),
                CLOCK,
                &mut rng,
            );
        }
        g.bench_function(format!("request_4_resources_{}", balance.name()), |b| {
            b.iter(|| {
                let el = read_one(black_box(request), Limits::default()).unwrap();
                proxy.handle(el, CLOCK, &mut rng).transmit
            })
        });
    }
    g.finish();
}

/// The harness settings without the rate limit, which would refuse a benchmark's requests.
fn settings_unlimited() -> jat_proxy::proxy::Settings {
    let mut s = settings();
    s.rate = RateLimit {
        per_second: 1e9,
        burst: 1e9,
        max_senders: 16,
        per_domain: 1e9,
        domain_burst: 1e9,
    };
    s
}

/// The rate limiter when its table is full and every call comes from a sender never seen
/// before (what a sender-minting attacker causes): one eviction per call, whose cost must
/// not depend on the table's size.
fn limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");
    g.throughput(Throughput::Elements(1));
    for size in [1_000usize, 100_000] {
        let mut l = Limiter::new(RateLimit {
            max_senders: size,
            ..RateLimit::default()
        });
        for i in 0..size {
            let _ = l.request(&format!("old{i}@remote.example"), Some("remote.example"), 0);
        }
        let mut sender = String::new();
        let mut i = 0u64;
        g.bench_with_input(
            BenchmarkId::new("table_full_new_sender_each_call", size),
            &size,
            |b, _| {
                b.iter(|| {
                    use std::fmt::Write;
                    i += 1;
                    sender.clear();
                    write!(sender, "new{i}@remote.example").unwrap();
                    l.request(black_box(&sender), Some("remote.example"), i)
                })
            },
        );
    }
    g.finish();
}

/// What the session adds per stanza for the metrics: one counter increment by verdict.
fn metrics(c: &mut Criterion) {
    let m = jat_proxy::metrics::Metrics::new();
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(1));
    g.bench_function("record_forwarded", |b| {
        b.iter(|| m.count(black_box(Verdict::Forwarded), black_box(Stanza::Iq)))
    });
    g.bench_function("record_reversed", |b| {
        b.iter(|| m.count(black_box(Verdict::Reversed), black_box(Stanza::Iq)))
    });
    // A drop over a rate limit: two increments by the reason's type, no label lookup.
    g.bench_function("record_dropped", |b| {
        let why = Verdict::Dropped(DropReason::OverReplyRate);
        b.iter(|| m.count(black_box(why), black_box(Stanza::Iq)))
    });
    g.finish();
}

/// The flows beside the IQ request and reply: a message each way, a request the implementing
/// client starts, and its peer's reply routed back (stanza in, stanza out; no serialising).
fn flows(c: &mut Criterion) {
    let mut proxy = Proxy::new(settings_unlimited(), keys());
    let mut rng = SeededRandom::new(3);
    let handle = |proxy: &mut Proxy, xml: &str, rng: &mut SeededRandom| {
        proxy
            .handle(
                read_one(xml.as_bytes(), Limits::default()).unwrap(),
                CLOCK,
                rng,
            )
            .transmit
            .unwrap()
    };
    let _ = proxy.handle(
        read_one(
            b"<presence from='impl@example/a' to='proxy.example'/>",
            Limits::default(),
        )
        .unwrap(),
        CLOCK,
        &mut rng,
    );
    let message = "<message type='chat' id='m-7a2b' to='proxy.example' from='user@example.org/phone-4f3a'><body>hello there</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>";
    let fwd = handle(&mut proxy, message, &mut rng);
    let token_addr = fwd.attr("from").unwrap().to_owned();
    let answer = format!(
        "<message type='chat' id='r-1' to='{token_addr}' from='impl@example/a'><body>hello</body></message>"
    );
    let push = format!(
        "<iq type='get' id='push-1' to='{token_addr}' from='impl@example/a'><query xmlns='urn:x:ask'/></iq>"
    );
    let sent = handle(&mut proxy, &push, &mut rng);
    let routed = format!(
        "<iq type='result' id='{}' to='proxy.example' from='user@example.org/phone-4f3a'><answer xmlns='urn:x:ask'/></iq>",
        sent.attr("id").unwrap()
    );
    let mut g = c.benchmark_group("flows");
    g.throughput(Throughput::Elements(1));
    for (name, input) in [
        ("message_in_forwarded_out", message.to_owned()),
        ("message_in_reversed_out", answer),
        ("outbound_request_in_sent_out", push),
        ("routed_reply_in_out", routed),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| handle(&mut proxy, black_box(&input), &mut rng))
        });
    }
    g.finish();
}

criterion_group!(benches, tokens, core, flows, limiter, metrics);
criterion_main!(benches);
