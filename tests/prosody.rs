//! jat-proxy end to end: a real Prosody on loopback, the real binary, real XMPP clients.
//!
//! Each test starts its own Prosody (fresh config, data and ports), registers `impl` (the
//! implementing client) and `user`, runs `jat-proxy --config FILE` as a child process and
//! drives the exchange of mod_client_proxy's README through it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::client::{reply_to, stanza, xml};
use testkit::deployment::{
    COMPONENT, Deployment, QUIET, SECRET, WAIT, error_condition, request, wait_resource,
};
use testkit::proxy::ConfigSpec;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_and_error_are_reversed_intact() {
    let d = Deployment::start(&binary());
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;

    // user -> component
    user.send_xml(&request("1234"));
    // component -> implementing client
    let req = imp.recv_request(WAIT).await.expect("request reaches impl");
    assert_eq!(req.attr("id"), Some("1234"));
    assert_eq!(req.attr("to"), Some("impl@localhost/a"));
    let from = req.attr("from").unwrap();
    assert!(from.starts_with("proxy.localhost/"), "{from}");
    assert_eq!(
        req.get_child("query", "urn:example:echo").unwrap().text(),
        "1234",
        "payload unchanged"
    );
    // implementing client -> component
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'><answer>forty-two</answer></query>",
    ));
    // component -> user
    let res = user
        .recv_iq("1234", WAIT)
        .await
        .expect("result reaches user");
    assert_eq!(res.attr("type"), Some("result"));
    assert_eq!(res.attr("from"), Some(COMPONENT));
    assert_eq!(res.attr("to"), Some(user.jid()));
    let answer = res.get_child("query", "urn:example:echo").unwrap();
    assert_eq!(answer.children().next().unwrap().text(), "forty-two");

    // And an error, condition and text intact.
    user.send_xml(&request("e1"));
    let req = imp.recv_request(WAIT).await.unwrap();
    imp.send(reply_to(
        &req,
        "error",
        "<error type='auth'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>go away</text></error>",
    ));
    let err = user.recv_iq("e1", WAIT).await.expect("error reaches user");
    assert_eq!(err.attr("type"), Some("error"));
    assert_eq!(error_condition(&err).as_deref(), Some("forbidden"));
    assert!(xml(&err).contains("go away"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_resources_serve_and_never_learn_the_sender() {
    let d = Deployment::start(&binary());
    let mut a = d.implementing("a").await;
    let mut b = d.implementing("b").await;
    // A resource with a character base64url lacks: a token can never contain it by chance.
    let mut user = d.client("user", "phone.abc").await;
    let n = 24;
    for i in 0..n {
        user.send_xml(&request(&format!("r{i}")));
    }
    // Answer from whichever resource got it.
    let mut per_resource = [0usize; 2];
    let mut answered = 0;
    while answered < n {
        tokio::select! {
            Some(req) = a.recv_request(WAIT) => { a.send(reply_to(&req, "result", "")); per_resource[0] += 1; }
            Some(req) = b.recv_request(WAIT) => { b.send(reply_to(&req, "result", "")); per_resource[1] += 1; }
            else => panic!("{answered} of {n} requests reached the implementing client"),
        }
        answered += 1;
    }
    for i in 0..n {
        let id = format!("r{i}");
        let res = user
            .recv_iq(&id, WAIT)
            .await
            .unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(res.attr("type"), Some("result"));
    }
    assert!(
        per_resource[0] > 0 && per_resource[1] > 0,
        "both resources used: {per_resource:?}"
    );
    // Nothing the implementing client received names the sender.
    for c in [&a, &b] {
        for s in c.history() {
            assert!(!s.contains("user@localhost"), "leaked: {s}");
            assert!(!s.contains("phone.abc"), "leaked resource: {s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resource_gets_service_unavailable() {
    let d = Deployment::start(&binary());
    let mut user = d.client("user", "abc").await;
    user.send_xml(&request("nobody"));
    let err = user.recv_iq("nobody", WAIT).await.expect("an answer");
    assert_eq!(err.attr("type"), Some("error"));
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("service-unavailable")
    );
    assert_eq!(err.attr("from"), Some(COMPONENT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_replies_reach_nobody() {
    let d = Deployment::start(&binary());
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    let mut mallory = d.client("mallory", "m").await;

    user.send_xml(&request("1234"));
    let req = imp.recv_request(WAIT).await.unwrap();
    let token_addr = req.attr("from").unwrap().to_owned();
    let token = token_addr
        .strip_prefix("proxy.localhost/")
        .unwrap()
        .to_owned();
    let mut tampered = token.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();

    // Another id, a tampered token, garbage, a clear-text JID (what mod_client_proxy would
    // relay), and a token made by another deployment's key.
    let other_keys = jat_proxy::keys::KeySet::from_secrets(&[(1, 0, [9; 32])]).unwrap();
    let foreign = jat_proxy::token::seal(
        &other_keys,
        jat_proxy::token::Binding::iq(COMPONENT, "f"),
        &jat_proxy::token::Contents {
            sender: "user@localhost/abc",
            original_to: None,
        },
        jat_proxy::session::unix_now() * 1000,
        [1; 16],
    )
    .unwrap();
    for (id, to) in [
        ("1235", token_addr.clone()),
        ("1234", format!("proxy.localhost/{tampered}")),
        ("1234", "proxy.localhost/garbage".into()),
        ("1234", "proxy.localhost/user@localhost/abc".into()),
        ("f", format!("proxy.localhost/{foreign}")),
    ] {
        imp.send_xml(&format!("<iq type='result' id='{id}' to='{to}'/>"));
    }
    // The same valid token, but the reply comes from another account.
    mallory.send_xml(&format!("<iq type='result' id='1234' to='{token_addr}'/>"));

    assert!(
        user.recv_where(QUIET, |e| e.name() == "iq").await.is_none(),
        "user got a forged reply: {:?}",
        user.iqs_received()
    );
    // Results and errors are never answered, so the senders get nothing back either.
    assert!(imp.recv_where(QUIET, |e| e.name() == "iq").await.is_none());
    assert!(
        mallory
            .recv_where(QUIET, |e| e.name() == "iq")
            .await
            .is_none()
    );

    // The genuine reply still works afterwards.
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("1234", WAIT).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_stanzas_do_not_end_the_session() {
    let d = Deployment::start(&binary());
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    // Stanzas Prosody passes through but xmpp-parsers rejects.
    user.send_xml(&format!(
        "<message type='weird' to='{COMPONENT}' id='m1'><body>hi</body></message>"
    ));
    user.send_xml(&format!("<presence type='weird' to='{COMPONENT}'/>"));
    user.send_xml(&format!("<message to='{COMPONENT}' id='m2'><body xml:lang='x-klingon'>Qapla'</body><unknown xmlns='urn:x' a='&amp;&lt;'/></message>"));
    user.send_xml(&format!("<iq type='set' id='odd' to='{COMPONENT}'><query xmlns='urn:x' weird-attr='1'><![CDATA[<not xml>]]></query></iq>"));
    // Messages are refused (feature-not-implemented), the odd-but-valid IQ is forwarded.
    let m = user
        .recv_where(WAIT, |e| {
            e.name() == "message" && e.attr("id") == Some("m1")
        })
        .await
        .expect("error for the weird message");
    assert_eq!(
        error_condition(&m).as_deref(),
        Some("feature-not-implemented")
    );
    let req = imp.recv_request(WAIT).await.expect("odd IQ forwarded");
    assert!(xml(&req).contains("&lt;not xml&gt;"), "{}", xml(&req));
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("odd", WAIT).await.is_some());
    // Still the same session, still serving.
    user.send_xml(&request("after"));
    let req = imp.recv_request(WAIT).await.unwrap();
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("after", WAIT).await.is_some());
    assert_eq!(d.prosody.component_logins(), 1, "{}", d.prosody.log());
    assert_eq!(d.proxy.sessions(), 1, "{}", d.proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_longer_than_a_minute_keeps_the_session() {
    // Longer than tokio-xmpp's 60 s soft read timeout, with the default keepalive settings
    // and no presence probes: nothing at all crosses the stream but jat-proxy's pings.
    let d = Deployment::start_configured(&binary(), "probe_interval_secs = 86400", "");
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    let idle = Instant::now();
    // The first ping is due after 60 s of silence: wait for it (not for a fixed time), then
    // stay idle until well past the soft timeout.
    while !d.proxy.log().contains("sending keepalive ping") {
        assert!(
            idle.elapsed() < Duration::from_secs(180),
            "no keepalive ping after {:?} idle:\n{}",
            idle.elapsed(),
            d.proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pinged_after = idle.elapsed();
    tokio::time::sleep(Duration::from_secs(75).saturating_sub(idle.elapsed())).await;
    testkit::report(&format!(
        "idle session: first keepalive ping {pinged_after:.1?} after the clients logged in"
    ));
    user.send_xml(&request("after-idle"));
    let req = imp
        .recv_request(WAIT)
        .await
        .expect("still serving after idling");
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("after-idle", WAIT).await.is_some());
    assert_eq!(d.prosody.component_logins(), 1, "{}", d.prosody.log());
    assert_eq!(d.proxy.sessions(), 1, "{}", d.proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_survives_kill_9_and_restart() {
    let mut d = Deployment::start(&binary());
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    user.send_xml(&request("held"));
    let req = imp.recv_request(WAIT).await.unwrap();
    // The implementing client holds the request while the proxy dies.
    d.proxy.kill9();
    d.proxy.restart();
    d.proxy.wait_sessions(1, WAIT);
    wait_resource(&d.proxy, "a");
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'>late</query>",
    ));
    let res = user
        .recv_iq("held", WAIT)
        .await
        .expect("reply after restart");
    assert_eq!(res.attr("type"), Some("result"));
    assert_eq!(res.attr("to"), Some(user.jid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_stream_and_exits_0() {
    let mut d = Deployment::start(&binary());
    d.proxy.signal("TERM");
    let status = d.proxy.wait_exit(WAIT).expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.proxy.log());
    assert!(d.proxy.log().contains("stream closed"), "{}", d.proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_restarts() {
    let mut d = Deployment::start(&binary());
    let mut imp = d.implementing("a").await;
    drop(imp);
    d.prosody.stop();
    // Let a few reconnection attempts fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.prosody.start_again();
    d.proxy.wait_sessions(2, Duration::from_secs(20));
    imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    user.send_xml(&request("again"));
    let req = imp.recv_request(WAIT).await.expect("serving again");
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("again", WAIT).await.is_some());
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let dir = testkit::work_dir("config");
    let good = testkit::proxy::write_config(
        &dir,
        "good.toml",
        &ConfigSpec {
            component: COMPONENT,
            server: "127.0.0.1:5347".parse().unwrap(),
            also: &[],
            secret: SECRET,
            target: "impl@localhost",
            key_file: &dir.join("keys.toml"),
            proxy_extra: "",
            extra: "",
        },
    );
    let text = std::fs::read_to_string(&good).unwrap();
    for (name, bad, expect) in [
        (
            "unknown.toml",
            text.replace("[proxy]", "[proxy]\ncolour = \"blue\""),
            "colour",
        ),
        (
            "target.toml",
            text.replace("impl@localhost", "not a jid@@"),
            "proxy.target_address",
        ),
        (
            "server.toml",
            text.replace("127.0.0.1:5347", "nowhere"),
            "component.server",
        ),
        ("syntax.toml", text.replace("[keys]", "[keys"), "TOML"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bad).unwrap();
        let (status, out) =
            testkit::proxy::run_to_end(&binary(), &["--config", path.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{name}: {out}");
        assert!(out.contains(expect) || expect == "TOML", "{name}: {out}");
        assert!(out.contains(name), "names the file: {out}");
    }
    let (status, out) = testkit::proxy::run_to_end(
        &binary(),
        &["--config", dir.join("missing.toml").to_str().unwrap()],
    );
    assert_eq!(status.code(), Some(2));
    assert!(out.contains("missing.toml"), "{out}");
    let _ = stanza("<presence/>");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The first deployment: jat-proxy logs in while the implementing client, never subscribed,
/// is offline. Its subscription request waits on the server for the client, however often
/// jat-proxy probes meanwhile (the 2 s probe round after login, held requests' probes): each
/// probe is answered `unsubscribed` as the target, which cancels the pending request, and
/// jat-proxy asks again. The client, when it logs in, still finds the request, accepts it,
/// and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_request_outlasts_the_probes_sent_before_the_client_logs_in() {
    let d = Deployment::start(&binary());
    let mut user = d.client("user", "abc").await;
    // A held request's probes too (refused after hold_ms: no resource).
    user.send_xml(&request("early"));
    let res = user.recv_iq("early", WAIT).await.expect("an answer");
    assert_eq!(
        error_condition(&res).as_deref(),
        Some("service-unavailable")
    );
    // Past the probe round.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let asked_again = d
        .proxy
        .log()
        .matches("asking for the subscription again")
        .count();
    let mut imp = d.implementing("a").await;
    user.send_xml(&request("later"));
    let req = imp.recv_request(WAIT).await.expect("request reaches impl");
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'/>",
    ));
    let res = user
        .recv_iq("later", WAIT)
        .await
        .expect("result reaches user");
    assert_eq!(res.attr("type"), Some("result"));
    println!(
        "[measured] subscription requested again {asked_again} times before the client logged in"
    );
}
