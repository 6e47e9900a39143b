//! `[proxy] sender = "revealed"` end to end, as Jitsi's jicofo uses mod_client_proxy: real
//! Prosody, the real binary, an implementing client that reads the sender's full JID off the
//! resource it sees and answers with the id it was given.

use std::path::PathBuf;

use testkit::client::reply_to;
use testkit::deployment::{COMPONENT, Deployment, QUIET, WAIT, request};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_is_shown_and_only_replies_to_issued_ids_go_back_on_prosody() {
    let d = Deployment::start_configured(&binary(), "sender = \"revealed\"", "");
    let mut imp = d.implementing("focus").await;
    let mut user = d.client("user", "abc").await;
    let mut mallory = d.client("mallory", "m").await;

    user.send_xml(&request("conf-1"));
    let req = imp.recv_request(WAIT).await.expect("request reaches impl");
    // What jicofo does: the resource of `from`, parsed as a JID, is who asks.
    let from: jid::Jid = req.attr("from").unwrap().parse().unwrap();
    assert_eq!(from.domain().as_str(), COMPONENT);
    let asker: jid::Jid = from.resource().unwrap().as_str().parse().unwrap();
    assert_eq!(asker.to_string(), "user@localhost/abc");
    let id = req.attr("id").unwrap().to_owned();
    assert!(
        id.starts_with("conf-1.") && id.len() > "conf-1.".len(),
        "{id}"
    );

    // What mod_client_proxy would relay and jat-proxy does not: a made-up id to a real or
    // made-up address; the genuine id to another account or another resource.
    for (to, id) in [
        ("proxy.localhost/user@localhost/abc", "made-up"),
        ("proxy.localhost/mallory@localhost/m", "made-up"),
        ("proxy.localhost/mallory@localhost/m", id.as_str()),
        ("proxy.localhost/user@localhost/other", id.as_str()),
        ("proxy.localhost/user@localhost/abc", "conf-1"),
    ] {
        imp.send_xml(&format!(
            "<iq type='result' id='{id}' to='{to}'><query xmlns='urn:example:echo'>forged</query></iq>"
        ));
    }
    assert!(
        mallory
            .recv_where(QUIET, |e| e.name() == "iq")
            .await
            .is_none(),
        "a forged reply reached another account: {:?}",
        mallory.iqs_received()
    );
    // The genuine reply, with the id it was given: the user gets its own id back, and
    // nothing before it.
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'>ok</query>",
    ));
    let res = user
        .recv_where(WAIT, |e| e.name() == "iq")
        .await
        .expect("the reply reaches the user");
    assert_eq!(res.attr("id"), Some("conf-1"), "{:?}", user.iqs_received());
    assert_eq!(res.attr("type"), Some("result"));
    assert_eq!(res.attr("from"), Some(COMPONENT));
    assert_eq!(
        res.get_child("query", "urn:example:echo").map(|q| q.text()),
        Some("ok".to_owned())
    );
}

/// docs/jitsi.md's roster step: an implementing client that never accepts the component's
/// subscription request (jicofo need not) is never seen online, so every request waits
/// `hold_ms` and gets `service-unavailable`; once the subscription exists (here accepted by
/// the client itself, where Jitsi's installation creates it on the server with
/// mod_roster_command), requests reach it with the sender shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_roster_subscription_requests_are_refused_and_with_it_served() {
    let d = Deployment::start_configured(&binary(), "sender = \"revealed\"", "");
    // Logged in as jicofo would be, answering nothing.
    let mut imp = d.client("impl", "focus").await;
    let mut user = d.client("user", "abc").await;
    user.send_xml(&request("no-roster"));
    let res = user.recv_iq("no-roster", WAIT).await.expect("an answer");
    assert_eq!(
        testkit::deployment::error_condition(&res).as_deref(),
        Some("service-unavailable"),
        "{res:?}"
    );
    assert!(
        imp.recv_request(QUIET).await.is_none(),
        "a request reached the client without a subscription"
    );
    // The subscription is created: the server sends the client's presence to the component.
    imp.send_xml(&format!("<presence type='subscribed' to='{COMPONENT}'/>"));
    testkit::deployment::wait_resource(&d.proxy, "focus");
    user.send_xml(&request("roster"));
    let req = imp.recv_request(WAIT).await.expect("request reaches impl");
    let from: jid::Jid = req.attr("from").unwrap().parse().unwrap();
    assert_eq!(
        from.resource().map(|r| r.as_str()),
        Some("user@localhost/abc")
    );
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'>ok</query>",
    ));
    let res = user
        .recv_iq("roster", WAIT)
        .await
        .expect("result reaches user");
    assert_eq!(res.attr("type"), Some("result"));
}
