//! The committed fuzz corpora, replayed through the same invariant checks the cargo-fuzz
//! targets run (`jat_proxy::invariants`), so that the stable `cargo test` covers every input
//! the fuzzers kept. `cargo test --test corpus -- --ignored write_seed_corpora` rewrites the
//! hand-made seeds.

use std::path::{Path, PathBuf};

use jat_proxy::invariants::{self, COMPONENT, NOW_MS, SEPARATOR};
use jat_proxy::token::{self, Binding, Contents};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target} corpus input {} breaks an invariant",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "the {target} corpus is empty");
    n
}

#[test]
fn token_corpus_holds() {
    replay("token", invariants::token);
}

#[test]
fn proxy_corpus_holds() {
    replay("proxy", invariants::proxy);
}

#[test]
fn wire_raw_corpus_holds() {
    replay("wire_raw", invariants::wire_raw);
}

#[test]
fn wire_structured_corpus_holds() {
    replay("wire_structured", invariants::wire_structured);
}

#[test]
fn config_corpus_holds() {
    replay("config", invariants::config);
}

fn script(stanzas: &[&str]) -> Vec<u8> {
    stanzas
        .iter()
        .map(|s| s.as_bytes())
        .collect::<Vec<_>>()
        .join(&SEPARATOR)
}

#[test]
#[ignore = "writes the seed files; run explicitly"]
fn write_seed_corpora() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };

    // Tokens: genuine ones (so mutations start from valid structure), and garbage. (The
    // `seed-v1-genuine-*` files are the version 1 tokens these lines wrote before version 2.)
    let keys = invariants::keys();
    for (i, (id, sender, to)) in [
        ("1234", "user@example/abc", None),
        ("", "a@b", None),
        ("x", "u@example/r", Some("svc@proxy.example/z")),
        ("long", &*format!("u@example/{}", "r".repeat(600)), None),
    ]
    .into_iter()
    .enumerate()
    {
        let t = token::seal(
            &keys,
            Binding::iq(COMPONENT, id),
            &Contents {
                sender,
                original_to: to,
            },
            NOW_MS,
            [i as u8; token::SALT_LEN],
        )
        .unwrap();
        write(
            "token",
            &format!("genuine-{i}"),
            format!("{id}\0{t}").as_bytes(),
        );
    }
    let m = token::seal(
        &keys,
        Binding::message(COMPONENT),
        &Contents {
            sender: "user@example/abc",
            original_to: Some("chat@proxy.example"),
        },
        NOW_MS,
        [9; token::SALT_LEN],
    )
    .unwrap();
    write("token", "message", format!("\0{m}").as_bytes());
    write("token", "garbage", b"1\0not-a-token!");
    write("token", "empty", b"");

    // Proxy sessions.
    let online = "<presence from='impl@example/a' to='proxy.example'/>";
    write(
        "proxy",
        "readme-exchange",
        &script(&[
            online,
            "<presence from='impl@example/b' to='proxy.example'/>",
            "<iq type='get' id='1234' to='proxy.example' from='user@example/abc'><query xmlns='urn:x'/></iq>",
            "<iq type='result' id='1234' to='proxy.example/TOKEN' from='impl@example/a'><query xmlns='urn:x'/></iq>",
        ]),
    );
    write(
        "proxy",
        "error-reply-and-original-to",
        &script(&[
            online,
            "<iq type='set' id='e' to='svc@proxy.example/x' from='u@example/r'><q xmlns='urn:x'/></iq>",
            "<iq type='error' id='e' to='proxy.example/TOKEN' from='impl@example/a'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        ]),
    );
    write(
        "proxy",
        "forgeries",
        &script(&[
            online,
            "<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
            "<iq type='result' id='2' to='proxy.example/TOKEN' from='impl@example/a'/>",
            "<iq type='result' id='1' to='proxy.example/TOKEN' from='mallory@example/a'/>",
            "<iq type='result' id='1' to='proxy.example/user@example/abc' from='impl@example/a'/>",
            "<iq type='result' id='1' to='proxy.example/' from='impl@example/a'/>",
        ]),
    );
    let mut expiry = script(&[
        online,
        "<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
    ]);
    expiry.push(SEPARATOR);
    expiry.extend_from_slice(&[0xFE, 250]);
    expiry.extend_from_slice(
        b"<iq type='result' id='1' to='proxy.example/TOKEN' from='impl@example/a'/>",
    );
    expiry.push(SEPARATOR);
    expiry.extend_from_slice(&[0xFE, 100]);
    expiry.extend_from_slice(
        b"<iq type='result' id='1' to='proxy.example/TOKEN' from='impl@example/a'/>",
    );
    write("proxy", "expiry", &expiry);
    write(
        "proxy",
        "odd-stanzas",
        &script(&[
            online,
            "<message type='weird' to='proxy.example' from='u@example/r'><body>hi</body></message>",
            "<message type='error' to='proxy.example' from='u@example/r'/>",
            "<iq type='weird' id='w' to='proxy.example' from='u@example/r'/>",
            "<iq id='n' to='proxy.example' from='u@example/r'/>",
            "<iq type='get' to='proxy.example' from='u@example/r'><q xmlns='x'/></iq>",
            "<iq type='get' id='0' to='proxy.example' from='u@example/r'/>",
            "<iq type='get' id='2' to='proxy.example' from='u@example/r'><a xmlns='x'/><b xmlns='x'/></iq>",
            "<iq type='get' id='3' to='proxy.example' from='impl@example/a'><q xmlns='x'/></iq>",
            "<iq type='get' id='4' to='proxy.example' from='x@spam.example/r'><q xmlns='x'/></iq>",
            "<iq type='get' id='5' to='proxy.example' from='proxy.example/loop'><q xmlns='x'/></iq>",
            "<iq type='get' id='6' to='elsewhere.example' from='u@example/r'><q xmlns='x'/></iq>",
            "<iq type='get' id='7' to='proxy.example' from='not a jid@@'><q xmlns='x'/></iq>",
            "<iq xmlns='jabber:client' type='get' id='8' to='proxy.example' from='u@example/r'><q xmlns='x'/></iq>",
            "<unknown/>",
            "<a><b><c><d><e><f><g><h><i><j/></i></h></g></f></e></d></c></b></a>",
        ]),
    );
    write(
        "proxy",
        "presence",
        &script(&[
            online,
            "<presence type='unavailable' from='impl@example/a' to='proxy.example'/>",
            "<presence type='subscribe' from='impl@example' to='proxy.example'/>",
            "<presence type='unsubscribe' from='impl@example' to='proxy.example'/>",
            "<presence type='probe' from='impl@example' to='proxy.example'/>",
            "<presence type='error' from='impl@example' to='proxy.example'/>",
            "<presence from='mallory@example/a' to='proxy.example'/>",
            "<presence from='impl@example/1' to='proxy.example'/>",
            "<presence from='impl@example/2' to='proxy.example'/>",
            "<presence from='impl@example/3' to='proxy.example'/>",
            "<presence from='impl@example/4' to='proxy.example'/>",
            "<presence from='impl@example/5' to='proxy.example'/>",
        ]),
    );
    write(
        "proxy",
        "messages",
        &script(&[
            online,
            "<presence from='impl@example/b' to='proxy.example'><priority>-1</priority></presence>",
            "<message type='chat' id='m1' to='proxy.example' from='user@example/abc'><body>hi</body><thread>t1</thread><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message type='chat' id='r1' to='proxy.example/TOKEN' from='impl@example/a'><body>hello</body><request xmlns='urn:xmpp:receipts'/></message>",
            "<message type='error' id='r1' to='proxy.example/TOKEN' from='impl@example/a'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
            "<iq type='result' id='m1' to='proxy.example/TOKEN' from='impl@example/a'/>",
            "<message to='chat@proxy.example/x' from='u@example/r'><body>to a named address</body></message>",
            "<message type='headline' to='proxy.example' from='impl@example/a'><body>x</body></message>",
            "<message to='proxy.example' from='impl@example/a'><body>to the bare domain</body></message>",
            "<message type='error' to='proxy.example' from='u@example/r'/>",
            "<message to='proxy.example/TOKEN' from='mallory@example/a'><body>not mine</body></message>",
        ]),
    );
    let flood: Vec<String> = (0..30)
        .map(|i| format!("<iq type='get' id='{i}' to='proxy.example' from='f{}@example/r'><q xmlns='x'/></iq>", i % 12))
        .collect();
    let mut stanzas = vec![online];
    stanzas.extend(flood.iter().map(String::as_str));
    write("proxy", "flood", &script(&stanzas));
    write(
        "proxy",
        "oversized",
        &script(&[
            online,
            &format!(
                "<iq type='get' id='d' to='proxy.example' from='u@example/r'>{}{}</iq>",
                "<a xmlns='x'>".repeat(20),
                "</a>".repeat(20)
            ),
            "<iq type='get' id='big' to='proxy.example' from='u@example/r'><q xmlns='x'/></iq>",
            &format!(
                "<iq type='result' id='big' to='proxy.example/TOKEN' from='impl@example/a'><q xmlns='x'>{}</q></iq>",
                "z".repeat(9000)
            ),
            &format!(
                "<message to='proxy.example' from='u@example/r'><body>{}</body></message>",
                "m".repeat(9000)
            ),
        ]),
    );

    // The harness runs an input with the sender mode `(len / 4) % 3` (sealed, pseudonym,
    // revealed) and the balance `(len / 12) % 3` (random, sticky, priority): a last stanza
    // of padding picks both.
    let shaped = |stanzas: &[&str], sender: usize, balance: usize| {
        let mut data = script(stanzas);
        data.push(SEPARATOR);
        data.extend_from_slice(b"<pad/>");
        while (data.len() / 4) % 9 != balance * 3 + sender {
            data.push(b' ');
        }
        data
    };
    let mut advance = vec![0xFE, 3];
    advance.extend_from_slice(online.as_bytes());
    let advance = String::from_utf8(advance).unwrap_or_default();
    let revealed = [
        online,
        "<iq type='get' id='q1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        // Forgeries first: a made-up id, the genuine id to another address, no token.
        "<iq type='result' id='q1.AAAA' to='proxy.example/u@example/r' from='impl@example/a'/>",
        "<iq type='result' id='TOKEN' to='proxy.example/v@example/r' from='impl@example/a'/>",
        "<iq type='result' id='TOKEN' to='proxy.example/u@example/other' from='impl@example/a'/>",
        "<iq type='result' id='q1' to='proxy.example/u@example/r' from='impl@example/a'/>",
        "<iq type='result' id='TOKEN' to='proxy.example/TOKEN' from='impl@example/a'/>",
        "<iq type='result' id='TOKEN' to='proxy.example/u@example/r' from='impl@example/a'><q xmlns='urn:x'/></iq>",
    ];
    write("proxy", "revealed-reply", &shaped(&revealed, 2, 0));
    // Sticky: the request waits for the probe round after the login (2 s), then the reply.
    let round = [
        online,
        "<iq type='get' id='s1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>",
        "<presence from='impl@example/b' to='proxy.example'/>",
        &advance,
        "<iq type='result' id='s1' to='proxy.example/TOKEN' from='impl@example/b'/>",
        "<iq type='result' id='s1' to='proxy.example/TOKEN' from='impl@example/a'/>",
    ];
    write("proxy", "sticky-round", &shaped(&round, 0, 1));
    write("proxy", "sticky-round-revealed", &shaped(&round, 2, 1));
    write("proxy", "priority-round", &shaped(&round, 1, 2));

    // Configurations.
    let good = "[component]\njid = \"proxy.localhost\"\nserver = \"127.0.0.1:5347\"\nsecret = \"s\"\n\n[proxy]\ntarget_address = \"impl@localhost\"\n\n[keys]\nfile = \"/var/lib/jat-proxy/keys.toml\"\n";
    write("config", "minimal", good.as_bytes());
    write(
        "config",
        "full",
        format!(
            "{good}reload_interval_secs = 5\n\n[limits]\nmax_stanza_bytes = 65536\nmax_depth = 32\nrate_per_sender = 2.5\nrate_burst = 10\nmax_senders = 100\n\n[policy]\nallow = [\"localhost\"]\ndeny = [\"spam@localhost\"]\n"
        )
        .replace("secret = \"s\"", "secret_env = true\nkeepalive_interval_secs = 30\nkeepalive_timeout_secs = 10\nkeepalive_to = \"localhost\"\nreconnect_max_secs = 5")
        .as_bytes(),
    );
    write(
        "config",
        "selection-and-messages",
        good.replace(
            "target_address = \"impl@localhost\"",
            "target_address = \"impl@localhost\"\nbalance = \"sticky\"\nresources = [\"focus\", \"worker-*\", \"a*b\"]\nmessages = \"forward\"\nmessage_token_lifetime_secs = 7200",
        )
        .as_bytes(),
    );
    write(
        "config",
        "unknown-key",
        format!("{good}\n[extra]\nx = 1\n").as_bytes(),
    );
    write(
        "config",
        "bad-values",
        good.replace("impl@localhost", "@")
            .replace("5347", "0")
            .as_bytes(),
    );
}
