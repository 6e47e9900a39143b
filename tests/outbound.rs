//! Stanzas the implementing client starts (`[proxy] outbound`), end to end through real
//! Prosody and real ejabberd (two instances: a route sealed by one is opened by the other).

use std::net::SocketAddr;
use std::path::PathBuf;

use testkit::client::{Answer, Client, Element, reply_to, xml};
use testkit::deployment::{
    COMPONENT, Deployment, QUIET, WAIT, ejabberd_with_proxies, error_condition, implementing_at,
    request,
};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// The next IQ request that came through the component (not the server's own roster pushes).
async fn request_from_component(c: &mut Client) -> Element {
    c.recv_where(WAIT, |e| {
        e.name() == "iq"
            && matches!(e.attr("type"), Some("get") | Some("set"))
            && e.attr("from").is_some_and(|f| f.starts_with(COMPONENT))
    })
    .await
    .unwrap_or_else(|| panic!("no request from the component reached {}", c.jid()))
}

/// The whole exchange on whatever server `c2s` is; `imp` is the only resource of the
/// implementing client.
async fn exchange(c2s: SocketAddr, mut imp: Client) {
    let mut user = Client::login(c2s, "localhost", "user", "pw", "abc", Answer::Nothing).await;
    // The user asks once: the implementing client now holds a token naming the user.
    user.send_xml(&request("q1"));
    let req = imp.recv_iq("q1", WAIT).await.expect("the request arrives");
    let token_addr = req.attr("from").unwrap().to_owned();
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'/>",
    ));
    user.recv_iq("q1", WAIT).await.expect("the result arrives");

    // Later, the implementing client asks the user something: a new id, to the token.
    imp.send_xml(&format!(
        "<iq type='get' id='push-1' to='{token_addr}'><query xmlns='urn:example:ask'>sure?</query></iq>"
    ));
    let asked = request_from_component(&mut user).await;
    assert_eq!(asked.attr("from"), Some(COMPONENT), "{}", xml(&asked));
    assert_ne!(asked.attr("id"), Some("push-1"));
    assert!(
        !xml(&asked).contains("impl@"),
        "the user does not learn the client"
    );
    user.send(reply_to(
        &asked,
        "result",
        "<query xmlns='urn:example:ask'>yes</query>",
    ));
    let answer = imp
        .recv_iq("push-1", WAIT)
        .await
        .expect("the answer comes back");
    assert_eq!(answer.attr("type"), Some("result"));
    assert_eq!(answer.attr("from"), Some(token_addr.as_str()));
    assert_eq!(
        answer
            .get_child("query", "urn:example:ask")
            .map(|q| q.text()),
        Some("yes".to_owned())
    );

    // A message to the same token reaches the user, from the component.
    imp.send_xml(&format!(
        "<message type='chat' id='news' to='{token_addr}'><body>news for you</body></message>"
    ));
    let m = user
        .recv_where(WAIT, |e| {
            e.name() == "message" && e.attr("id") == Some("news")
        })
        .await
        .expect("the message reaches the user");
    assert_eq!(m.attr("from"), Some(COMPONENT));

    // `any`: to a full JID escaped as XEP-0106 says.
    let escaped = format!("user\\40localhost\\2fabc@{COMPONENT}");
    imp.send_xml(&format!(
        "<iq type='set' id='push-2' to='{escaped}'><query xmlns='urn:example:ask'/></iq>"
    ));
    let asked = request_from_component(&mut user).await;
    user.send(reply_to(
        &asked,
        "error",
        "<error type='cancel'><not-allowed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
    ));
    let e = imp
        .recv_iq("push-2", WAIT)
        .await
        .expect("the error comes back");
    assert_eq!(e.attr("from"), Some(escaped.as_str()));
    assert_eq!(error_condition(&e).as_deref(), Some("not-allowed"));

    // A forged route: the user answers with an id jat-proxy never sealed; a route replayed
    // by someone else. Nothing reaches the implementing client.
    let mallory = Client::login(c2s, "localhost", "mallory", "pw", "m", Answer::Nothing).await;
    user.send_xml(&format!(
        "<iq type='result' id='forged-route' to='{COMPONENT}'/>"
    ));
    mallory.send_xml(&format!(
        "<iq type='result' id='{}' to='{COMPONENT}'/>",
        asked.attr("id").unwrap()
    ));
    assert!(
        imp.recv_where(QUIET, |e| e.name() == "iq"
            && matches!(e.attr("type"), Some("result") | Some("error")))
            .await
            .is_none(),
        "a forged or replayed route reached the implementing client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_implementing_client_starts_requests_through_prosody() {
    let d =
        Deployment::start_configured(&binary(), "outbound = \"any\"\nmessages = \"forward\"", "");
    d.prosody.register("mallory", "pw");
    let imp = d.implementing("a").await;
    exchange(d.prosody.c2s, imp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_implementing_client_starts_requests_through_ejabberd_with_two_instances() {
    let (ejabberd, proxies) = ejabberd_with_proxies(
        &binary(),
        2,
        "outbound = \"any\"\nmessages = \"forward\"\nprobe_interval_secs = 1",
        "",
    );
    ejabberd.register("mallory", "pw");
    let imp = implementing_at(ejabberd.c2s, "a", &proxies).await;
    exchange(ejabberd.c2s, imp).await;
    let sent: Vec<usize> = proxies
        .iter()
        .map(|p| p.log().matches("outbound request sent").count())
        .collect();
    let routed: Vec<usize> = proxies
        .iter()
        .map(|p| p.log().matches("outbound reply routed").count())
        .collect();
    println!(
        "[measured] outbound on ejabberd: requests sent per instance {sent:?}, replies routed per instance {routed:?}"
    );
}
