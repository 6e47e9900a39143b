//! jat-proxy exposed to hostile users, through a real Prosody: a battery of odd stanzas, a
//! flood from one sender, live key rotation across two instances sharing a key file, and the
//! refusal of readable key files.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use testkit::client::{reply_to, xml};
use testkit::deployment::{
    COMPONENT, Deployment, QUIET, WAIT, error_condition, request, rss_kib, wait_resource,
};
use testkit::proxy::ProxyProcess;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

const LIMITS: &str = "\n[limits]\nmax_stanza_bytes = 65536\nmax_depth = 32\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_battery_keeps_the_session_and_answers_no_result() {
    let d = Deployment::start_with(&binary(), LIMITS);
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    let rss_before = rss_kib(d.proxy.pid()).unwrap();

    // A live request held by the implementing client, for genuine-token cases.
    user.send_xml(&request("held"));
    let held = imp.recv_request(WAIT).await.unwrap();
    let token = held
        .attr("from")
        .unwrap()
        .trim_start_matches("proxy.localhost/")
        .to_owned();

    let mut cases: Vec<String> = Vec::new();
    // IQ types, ids and children (Prosody answers some of these itself).
    for t in ["weird", "", "GET", "Result", "get ", "error\u{301}"] {
        cases.push(format!(
            "<iq type='{t}' id='t-{}' to='{COMPONENT}'><q xmlns='urn:x'/></iq>",
            cases.len()
        ));
    }
    cases.push(format!(
        "<iq id='notype' to='{COMPONENT}'><q xmlns='urn:x'/></iq>"
    ));
    cases.push(format!(
        "<iq type='get' to='{COMPONENT}'><q xmlns='urn:x'/></iq>"
    ));
    cases.push(format!(
        "<iq type='get' id='' to='{COMPONENT}'><q xmlns='urn:x'/></iq>"
    ));
    cases.push(format!("<iq type='get' id='nochild' to='{COMPONENT}'/>"));
    cases.push(format!(
        "<iq type='set' id='two' to='{COMPONENT}'><a xmlns='urn:x'/><b xmlns='urn:x'/></iq>"
    ));
    cases.push(format!(
        "<iq type='get' id='text-only' to='{COMPONENT}'>just text</iq>"
    ));
    // Sizes and depths.
    for (i, size) in [10_000usize, 60_000, 100_000, 200_000]
        .into_iter()
        .enumerate()
    {
        cases.push(format!(
            "<iq type='set' id='big-{i}' to='{COMPONENT}'><q xmlns='urn:x'>{}</q></iq>",
            "x".repeat(size)
        ));
    }
    // Deeper than 200 overflows the stack of this test's own client (minidom serialises
    // recursively); jat-proxy never builds past max_depth, which src/inbound.rs tests with
    // 10,000 levels.
    for (i, depth) in [20usize, 40, 200].into_iter().enumerate() {
        cases.push(format!(
            "<iq type='get' id='deep-{i}' to='{COMPONENT}'>{}{}</iq>",
            "<d xmlns='urn:x'>".repeat(depth),
            "</d>".repeat(depth)
        ));
    }
    // Characters and languages.
    for (i, text) in [
        "مرحبا بالعالم",
        "你好，世界",
        "🦀🦀🦀",
        "e\u{301}\u{302}\u{303}",
        "\u{202E}evil",
        "&lt;&amp;&gt;&apos;&quot;",
        "\u{FFFD}",
        "ＡＢＣ",
    ]
    .into_iter()
    .enumerate()
    {
        cases.push(format!(
            "<iq type='get' id='lang-{i}' to='{COMPONENT}' xml:lang='ar'><q xmlns='urn:x' xml:lang='zh-Hant'>{text}</q></iq>"
        ));
    }
    // Addresses at the component.
    for (i, to) in [
        "svc@proxy.localhost",
        "proxy.localhost/res",
        "svc@proxy.localhost/res/with/slashes",
        "proxy.localhost/🦀",
    ]
    .into_iter()
    .enumerate()
    {
        cases.push(format!(
            "<iq type='get' id='addr-{i}' to='{to}'><q xmlns='urn:x'/></iq>"
        ));
    }
    // Results and errors from the user to every kind of address: never answered.
    let max_resource = "A".repeat(1023);
    let truncated = &token[..token.len() / 2];
    let mut bad_base64 = token.clone();
    bad_base64.replace_range(0..1, "*");
    let wrong_key = {
        let other = jat_proxy::keys::KeySet::from_secrets(&[(1, 0, [5; 32])]).unwrap();
        jat_proxy::token::seal(
            &other,
            jat_proxy::token::Binding::iq(COMPONENT, "held"),
            &jat_proxy::token::Contents {
                sender: "user@localhost/abc",
                original_to: None,
            },
            jat_proxy::session::unix_now() * 1000,
            [2; 16],
        )
        .unwrap()
    };
    let targets = [
        COMPONENT.to_string(),
        format!("{COMPONENT}/garbage"),
        format!("{COMPONENT}/{truncated}"),
        format!("{COMPONENT}/{max_resource}"),
        format!("{COMPONENT}/{bad_base64}"),
        format!("{COMPONENT}/{wrong_key}"),
        format!("{COMPONENT}/user@localhost/abc"),
        format!("node@{COMPONENT}/{token}"),
        format!("{COMPONENT}/{token}"),
    ];
    let mut reply_ids = Vec::new();
    for (i, to) in targets.iter().enumerate() {
        for t in ["result", "error"] {
            let id = format!("re-{t}-{i}");
            cases.push(format!("<iq type='{t}' id='{id}' to='{to}'/>"));
            reply_ids.push(id);
        }
    }
    // Presence and message oddities.
    for p in [
        format!("<presence to='{COMPONENT}'/>"),
        format!("<presence type='weird' to='{COMPONENT}'/>"),
        format!("<presence type='subscribe' to='{COMPONENT}'/>"),
        format!("<presence type='probe' to='{COMPONENT}'/>"),
        format!("<presence type='unavailable' to='{COMPONENT}/{token}'/>"),
        format!(
            "<presence to='{COMPONENT}'><show>chat</show><x xmlns='urn:x'>{}</x></presence>",
            "p".repeat(5000)
        ),
        format!("<message type='weird' id='m1' to='{COMPONENT}'><body>hi</body></message>"),
        format!("<message type='headline' id='m2' to='{COMPONENT}'/>"),
        format!(
            "<message type='groupchat' id='m3' to='{COMPONENT}/{token}'><body>x</body></message>"
        ),
        format!(
            "<message type='error' id='re-msg' to='{COMPONENT}'><error type='cancel'><gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        ),
        format!(
            "<message id='m4' to='{COMPONENT}'><body>{}</body></message>",
            "m".repeat(100_000)
        ),
    ] {
        cases.push(p);
    }
    reply_ids.push("re-msg".into());
    let n_cases = cases.len();
    for c in &cases {
        user.send_xml(c);
    }
    // The implementing client sends results and errors to odd addresses too, and requests.
    for (i, to) in targets.iter().enumerate() {
        let id = format!("re-impl-{i}");
        imp.send_xml(&format!("<iq type='result' id='{id}' to='{to}'/>"));
        reply_ids.push(id);
    }
    imp.send_xml(&format!(
        "<iq type='get' id='impl-req' to='{COMPONENT}'><q xmlns='urn:x'/></iq>"
    ));

    // Answer every request that reached the implementing client, so nothing is left held:
    // up to a last, ordinary request from the user, which the server and the proxy handle
    // after all the cases (one stream each way, in order).
    user.send_xml(&request("last"));
    let mut forwarded = 0;
    loop {
        let req = imp
            .recv_request(WAIT)
            .await
            .expect("the user's last request reaches the implementing client");
        imp.send(reply_to(&req, "result", ""));
        if req.attr("id") == Some("last") {
            break;
        }
        forwarded += 1;
    }
    assert!(user.recv_iq("last", WAIT).await.is_some());
    // Give any answer to a result or an error time to arrive (none may).
    while let Some(req) = imp.recv_request(QUIET).await {
        imp.send(reply_to(&req, "result", ""));
        forwarded += 1;
    }

    // Nobody was answered for a result or an error.
    for c in [&user, &imp] {
        for s in c.history() {
            for id in &reply_ids {
                assert!(
                    !s.contains(&format!("id='{id}'")),
                    "answered a result/error: {s}"
                );
            }
        }
    }
    // The implementing client's own request was refused, as in mod_client_proxy.
    let refused = imp
        .recv_iq("impl-req", WAIT)
        .await
        .expect("an answer to impl-req");
    assert_eq!(
        error_condition(&refused).as_deref(),
        Some("feature-not-implemented")
    );
    // Limits answered with policy-violation.
    for id in ["big-2", "deep-2"] {
        let e = user
            .recv_iq(id, WAIT)
            .await
            .unwrap_or_else(|| panic!("no answer to {id}"));
        assert_eq!(
            error_condition(&e).as_deref(),
            Some("policy-violation"),
            "{}",
            xml(&e)
        );
    }
    // Unicode payloads made the round trip unchanged.
    let lang = user.recv_iq("lang-0", WAIT).await.expect("lang-0 answered");
    assert_eq!(lang.attr("type"), Some("result"));

    // Still the same session, still serving.
    imp.send(reply_to(&held, "result", "<q xmlns='urn:x'>held</q>"));
    assert!(
        user.recv_iq("held", WAIT).await.is_some(),
        "the held request still completes"
    );
    user.send_xml(&request("after"));
    let req = imp.recv_request(WAIT).await.expect("still serving");
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("after", WAIT).await.is_some());
    assert_eq!(d.prosody.component_logins(), 1, "{}", d.prosody.log());
    assert_eq!(d.proxy.sessions(), 1, "{}", d.proxy.log());
    let rss_after = rss_kib(d.proxy.pid()).unwrap();
    testkit::report(&format!(
        "hostile battery: {n_cases} stanzas from the user, {} results/errors, {forwarded} forwarded; \
         proxy RSS {rss_before} KiB -> {rss_after} KiB",
        reply_ids.len()
    ));
    assert!(rss_after < 64 * 1024, "memory bounded: {rss_after} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_rate_limited_and_others_are_still_served() {
    let d = Deployment::start_with(
        &binary(),
        "\n[limits]\nrate_per_sender = 5.0\nrate_burst = 20\n",
    );
    let mut imp = d.implementing("a").await;
    let mut flood = d.client("flood", "f").await;
    let mut user = d.client("user", "abc").await;
    let n = 300;
    let started = tokio::time::Instant::now();
    for i in 0..n {
        flood.send_xml(&request(&format!("f{i}")));
    }
    // Meanwhile another user asks once.
    user.send_xml(&request("innocent"));
    // Every flood request gets a result, a resource-constraint error, or — once the flood's
    // budget of errors (the same 5/s, 20 at once) is spent — nothing, which jat-proxy logs.
    let budget_spent = "the sender's error budget is spent";
    let silent = || d.proxy.log().matches(budget_spent).count();
    // The flooder's own replies are limited per recipient with the same rate and burst; a
    // reply that comes back sooner than its request's token did is dropped, and logged.
    let over_replies = "reply dropped: over the recipient's rate limit";
    let replies_dropped = || d.proxy.log().matches(over_replies).count();
    let asked = tokio::time::Instant::now();
    let (mut results, mut limited) = (0, 0);
    let mut innocent = None;
    // Until every request is accounted for, the innocent one included: it reaches the
    // implementing client after the flood, maybe after the last refusal of the flood
    // reached the flooder, and the loop is what answers it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (results + limited + silent() + replies_dropped() < n || innocent.is_none())
        && tokio::time::Instant::now() < deadline
    {
        tokio::select! {
            Some(req) = imp.recv_request(Duration::from_millis(200)) => imp.send(reply_to(&req, "result", "")),
            Some(r) = flood.recv_where(Duration::from_millis(200), |e| e.name() == "iq") => {
                match error_condition(&r).as_deref() {
                    None => results += 1,
                    Some("resource-constraint") => limited += 1,
                    Some(other) => panic!("unexpected error {other}"),
                }
            }
            Some(r) = user.recv_iq("innocent", Duration::from_millis(200)), if innocent.is_none() => {
                innocent = Some((r, asked.elapsed()));
            }
            else => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (innocent, waited) = innocent.expect("the other user is served");
    assert_eq!(innocent.attr("type"), Some("result"));
    // Anything still in flight would show now.
    tokio::time::sleep(QUIET).await;
    let late = flood
        .recv_where(Duration::from_millis(100), |e| e.name() == "iq")
        .await;
    assert!(
        late.is_none(),
        "an answer after all were accounted for: {}",
        late.map(|e| xml(&e)).unwrap_or_default()
    );
    let silent = silent();
    let replies_dropped = replies_dropped();
    testkit::report(&format!(
        "flood: {n} requests sent, {results} served, {limited} refused with resource-constraint, \
         {silent} dropped silently once the error budget was spent, {replies_dropped} replies \
         dropped over the recipient's reply limit, in {elapsed:.1} s; the other user's request \
         answered after {waited:.0?}"
    ));
    assert_eq!(
        results + limited + silent + replies_dropped,
        n,
        "every flood request was served, refused, dropped for the error budget, or its reply \
         dropped for the recipient's limit:\n{}",
        d.proxy
            .log()
            .lines()
            .filter(|l| l.contains("reply dropped") || l.contains("request forwarded"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(limited > 0, "the rate limit engaged");
    assert!(results >= 20, "the burst was served");
    if silent > 0 {
        assert!(limited >= 20, "errors went silent only after their burst");
    }
    let bound = 20.0 + 5.0 * elapsed + 1.0;
    assert!(
        (results as f64) <= bound && (limited as f64) <= bound,
        "within 20 + 5/s each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rotation_across_two_instances_sharing_a_key_file() {
    let extra = "reload_interval_secs = 1\n";
    let d = Deployment::start_with(&binary(), extra);
    // A second instance with the same configuration and key file: Prosody keeps the first
    // connection and refuses this one, which retries — a hot standby.
    let mut standby = ProxyProcess::start(&binary(), &d.config);
    // Running (its keys loaded), so that what follows tests a reload, not a first load.
    let refused = testkit::wait_until(WAIT, || {
        standby.log().contains("cannot log in").then_some(())
    });
    assert!(refused.is_some(), "{}", standby.log());
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;

    user.send_xml(&request("old-key"));
    let old = imp.recv_request(WAIT).await.unwrap();
    let (status, listed) = testkit::proxy::run_to_end(
        &binary(),
        &["keys", "list", "--config", d.config.to_str().unwrap()],
    );
    assert!(status.success(), "{listed}");
    assert!(
        listed.contains(&format!("key {} ", key_id(&old))),
        "the request used the file's key: {listed}"
    );

    let (status, out) = testkit::proxy::run_to_end(
        &binary(),
        &["keys", "rotate", "--config", d.config.to_str().unwrap()],
    );
    assert!(status.success(), "{out}");
    let reloaded = testkit::wait_until(WAIT, || {
        (d.proxy.log().contains("key file reloaded") && standby.log().contains("key file reloaded"))
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "both instances reload:\n{}\n{}",
        d.proxy.log(),
        standby.log()
    );

    user.send_xml(&request("new-key"));
    let new = imp.recv_request(WAIT).await.unwrap();
    assert_ne!(key_id(&new), key_id(&old), "new requests use the new key");
    let (_, listed) = testkit::proxy::run_to_end(
        &binary(),
        &["keys", "list", "--config", d.config.to_str().unwrap()],
    );
    let current = format!("key {} ", key_id(&new));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&current) && l.ends_with("(current)")),
        "the new key is current: {listed}"
    );

    // The active instance dies; the standby takes over the domain.
    let mut active = d.proxy;
    active.kill9();
    standby.wait_sessions(1, Duration::from_secs(20));
    wait_resource(&standby, "a");
    imp.send(reply_to(&old, "result", ""));
    imp.send(reply_to(&new, "result", ""));
    for id in ["old-key", "new-key"] {
        let r = user
            .recv_iq(id, WAIT)
            .await
            .unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    }
    standby.signal("TERM");
    assert_eq!(standby.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
}

/// The key id in the clear header of the token a forwarded request carries.
fn key_id(req: &testkit::client::Element) -> u32 {
    use base64::Engine;
    let token = req
        .attr("from")
        .unwrap()
        .trim_start_matches("proxy.localhost/");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .unwrap();
    // Version 2: version, kind, key id; version 1 had no kind byte.
    let at = if raw[0] == 1 { 1 } else { 2 };
    u32::from_be_bytes(raw[at..at + 4].try_into().unwrap())
}

#[test]
fn readable_key_or_secret_file_is_refused() {
    let dir = testkit::work_dir("perms");
    let keys = dir.join("keys.toml");
    let config = testkit::proxy::write_config(
        &dir,
        "c.toml",
        &testkit::proxy::ConfigSpec {
            component: COMPONENT,
            server: "127.0.0.1:9".parse().unwrap(),
            also: &[],
            secret: "s",
            target: "impl@localhost",
            key_file: &keys,
            proxy_extra: "",
            extra: "",
        },
    );
    let cfg = config.to_str().unwrap();
    // The configuration holds the secret (`secret = ...`): as private as a secret file.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, out) = testkit::proxy::run_to_end(&binary(), &["check", "--config", cfg]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("`component.secret`")
            && out.contains("mode 0644")
            && out.contains("chmod 600"),
        "{out}"
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, out) = testkit::proxy::run_to_end(&binary(), &["check", "--config", cfg]);
    assert!(status.success(), "{out}");
    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, out) = testkit::proxy::run_to_end(&binary(), &["--config", cfg]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("keys.toml") && out.contains("chmod 600"),
        "{out}"
    );

    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "secret = \"s\"",
        &format!("secret_file = \"{}\"", secret.display()),
    );
    std::fs::write(&config, text).unwrap();
    let (status, out) = testkit::proxy::run_to_end(&binary(), &["check", "--config", cfg]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("component.secret_file") && out.contains("mode 0640"),
        "{out}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Without the secret in it, the configuration may be world-readable (as shipped).
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, out) = testkit::proxy::run_to_end(&binary(), &["check", "--config", cfg]);
    assert!(status.success(), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}
