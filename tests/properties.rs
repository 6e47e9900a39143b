//! Property tests: the token roundtrip, and the proxy's invariants over generated sessions.

use jat_proxy::invariants::{self, COMPONENT, NOW_MS, SEPARATOR};
use jat_proxy::token::{self, Binding, Contents, Rejected};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn token_roundtrip_and_tamper(
        sender in "[a-z0-9.]{1,20}@[a-z0-9.]{1,20}/[^\u{0}]{0,200}",
        id in "[^\u{0}]{0,40}",
        salt in any::<[u8; 16]>(),
        issued in NOW_MS - 100_000..NOW_MS,
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let keys = invariants::keys();
        let b = Binding::iq(COMPONENT, &id);
        let t = token::seal(&keys, b, &Contents { sender: &sender, original_to: None }, issued, salt).unwrap();
        prop_assert!(t.len() <= token::MAX_TOKEN_LEN);
        let opened = token::open(&keys, b, &t, NOW_MS, 300).unwrap();
        prop_assert_eq!(&opened.sender, &sender);
        // Any single bit flipped anywhere: rejected.
        use base64::Engine;
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t).unwrap();
        let i = flip.index(raw.len());
        raw[i] ^= 1 << bit;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        prop_assert!(token::open(&keys, b, &forged, NOW_MS, 300).is_err());
        // Another id: rejected.
        let other_id = format!("{id}.");
        let other = Binding::iq(COMPONENT, &other_id);
        prop_assert_eq!(token::open(&keys, other, &t, NOW_MS, 300), Err(Rejected::Authentication));
    }

    #[test]
    fn arbitrary_token_text_never_opens(text in ".{0,1100}", id in ".{0,10}") {
        let mut input = id.replace('\0', "").into_bytes();
        input.push(0);
        input.extend_from_slice(text.as_bytes());
        invariants::token(&input);
    }

    #[test]
    fn proxy_invariants_hold_over_generated_sessions(session in prop::collection::vec(stanza(), 1..40)) {
        let bytes: Vec<u8> = session.iter().map(|s| s.as_bytes()).collect::<Vec<_>>().join(&SEPARATOR);
        invariants::proxy(&bytes);
    }
}

/// Stanzas as the server could deliver them: well-formed XML, hostile content.
fn stanza() -> impl Strategy<Value = String> {
    let who = prop_oneof![
        Just("u@example/r".to_string()),
        Just("v@example/s".to_string()),
        Just("impl@example/a".to_string()),
        Just("impl@example/b".to_string()),
        Just("impl@example".to_string()),
        Just("x@spam.example/r".to_string()),
        Just("proxy.example/self".to_string()),
        Just("".to_string()),
        "[a-z]{1,5}@example/[a-z]{1,5}",
    ];
    let to = prop_oneof![
        Just("proxy.example".to_string()),
        Just("proxy.example/TOKEN".to_string()),
        Just("svc@proxy.example/z".to_string()),
        Just("proxy.example/garbage".to_string()),
        Just("other.example".to_string()),
        "proxy.example/[A-Za-z0-9_-]{0,90}",
    ];
    let iq_type = prop_oneof![
        Just("get"),
        Just("set"),
        Just("result"),
        Just("error"),
        Just("weird"),
        Just("")
    ];
    let presence_type = prop_oneof![
        Just(""),
        Just("unavailable"),
        Just("subscribe"),
        Just("subscribed"),
        Just("unsubscribe"),
        Just("unsubscribed"),
        Just("probe"),
        Just("error"),
        Just("odd")
    ];
    let payload = prop_oneof![
        Just(String::new()),
        Just("<q xmlns='urn:x'/>".to_string()),
        Just("<q xmlns='urn:x'/><r xmlns='urn:x'/>".to_string()),
        (1usize..12).prop_map(|d| format!("{}{}", "<a xmlns='x'>".repeat(d), "</a>".repeat(d))),
        "[a-z &amp;]{0,50}".prop_map(|t| format!("<q xmlns='urn:x'>{t}</q>")),
    ];
    let id = prop_oneof![Just(None), "[0-9]{1,2}".prop_map(Some)];
    prop_oneof![
        (iq_type, id, who.clone(), to.clone(), payload.clone()).prop_map(|(t, id, f, to, p)| {
            let t = if t.is_empty() {
                String::new()
            } else {
                format!(" type='{t}'")
            };
            let id = id.map(|i| format!(" id='{i}'")).unwrap_or_default();
            format!("<iq{t}{id} from='{f}' to='{to}'>{p}</iq>")
        }),
        (presence_type, who.clone()).prop_map(|(t, f)| {
            let t = if t.is_empty() {
                String::new()
            } else {
                format!(" type='{t}'")
            };
            format!("<presence{t} from='{f}' to='proxy.example'/>")
        }),
        (
            prop_oneof![Just(""), Just("chat"), Just("error"), Just("weird")],
            who,
            to,
            payload
        )
            .prop_map(|(t, f, to, p)| format!(
                "<message type='{t}' from='{f}' to='{to}'>{p}</message>"
            )),
        (0u8..=255).prop_map(|n| format!("\u{0}{n}")), // not XML: skipped by the reader
    ]
}
