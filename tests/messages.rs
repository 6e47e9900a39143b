//! Messages end to end (`[proxy] messages = "forward"`): a user's conversation with the
//! component reaches one resource of the implementing client, whose answers reach the user
//! from the address they wrote to — through real Prosody, and through real ejabberd with two
//! instances (a message token sealed by one is opened by the other).

use std::net::SocketAddr;
use std::path::PathBuf;

use testkit::client::{Answer, Client, Element, xml};
use testkit::deployment::{
    COMPONENT, Deployment, QUIET, WAIT, ejabberd_with_proxies, error_condition, implementing_at,
    request,
};
use testkit::proxy::ProxyProcess;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

async fn login(c2s: SocketAddr, user: &str, resource: &str, answer: Answer) -> Client {
    Client::login(c2s, "localhost", user, "pw", resource, answer).await
}

/// The next message with this id.
async fn recv_message(c: &mut Client, id: &str) -> Option<Element> {
    c.recv_where(WAIT, |e| e.name() == "message" && e.attr("id") == Some(id))
        .await
}

/// The message `id` reaches one of `a` and `b`; returns which (0 or 1) and the message.
async fn at_either(a: &mut Client, b: &mut Client, id: &str) -> (usize, Element) {
    let pred = |e: &Element| e.name() == "message" && e.attr("id") == Some(id);
    tokio::select! {
        Some(m) = a.recv_where(WAIT, pred) => (0, m),
        Some(m) = b.recv_where(WAIT, pred) => (1, m),
        else => panic!("message {id} reached no resource"),
    }
}

/// The whole conversation, on whatever server `c2s` is; `proxies` must already know the
/// resources `a` and `b`.
async fn conversation(c2s: SocketAddr, mut a: Client, mut b: Client) {
    let mut user = login(c2s, "user", "abc", Answer::Nothing).await;
    let body = "<body>hello, service</body><thread>t-1</thread><active xmlns='http://jabber.org/protocol/chatstates'/><request xmlns='urn:xmpp:receipts'/><x xmlns='urn:example:ext' a='1'><y>z</y></x>";
    user.send_xml(&format!(
        "<message type='chat' id='m1' to='chat@{COMPONENT}'>{body}</message>"
    ));
    let (which, got) = at_either(&mut a, &mut b, "m1").await;
    let token_addr = got.attr("from").unwrap().to_owned();
    assert!(
        token_addr.starts_with(&format!("{COMPONENT}/")),
        "{}",
        xml(&got)
    );
    assert!(!token_addr.contains("user@"), "the sender is not revealed");
    assert_eq!(got.attr("type"), Some("chat"));
    // Everything inside passed untouched (in an order the server may change: ejabberd
    // moves its own known elements first).
    let sent = testkit::client::stanza(&format!("<message>{body}</message>"));
    let sorted = |e: &Element| {
        let mut v: Vec<String> = e.children().map(xml).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&got), sorted(&sent));
    let (serving, other) = if which == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // The user goes on talking: the same resource, whichever instance takes it.
    for i in 2..8 {
        let id = format!("m{i}");
        user.send_xml(&format!(
            "<message type='chat' id='{id}' to='chat@{COMPONENT}'><body>{i}</body></message>"
        ));
        let m = recv_message(serving, &id)
            .await
            .unwrap_or_else(|| panic!("{id} did not reach the conversation's resource"));
        assert_eq!(m.attr("type"), Some("chat"));
    }
    // The implementing client answers, with a receipt: from the address the user wrote to.
    serving.send_xml(&format!(
        "<message type='chat' id='r1' to='{token_addr}'><body>hello, user</body><thread>t-1</thread><received xmlns='urn:xmpp:receipts' id='m1'/></message>"
    ));
    let answer = recv_message(&mut user, "r1")
        .await
        .expect("the answer reaches the user");
    assert_eq!(answer.attr("from"), Some(&*format!("chat@{COMPONENT}")));
    assert_eq!(answer.attr("to"), Some(user.jid()));
    assert!(
        answer
            .children()
            .any(|c| c.name() == "received" && c.attr("id") == Some("m1"))
    );
    // Its errors are reversed too.
    serving.send_xml(&format!(
        "<message type='error' id='m7' to='{token_addr}'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    ));
    let err = recv_message(&mut user, "m7")
        .await
        .expect("the error reaches the user");
    assert_eq!(err.attr("type"), Some("error"));
    assert_eq!(error_condition(&err).as_deref(), Some("item-not-found"));

    // An IQ token never routes a message: ask once, then try the IQ's token address.
    user.send_xml(&request("q1"));
    let req = tokio::select! {
        Some(r) = serving.recv_iq("q1", WAIT) => r,
        Some(r) = other.recv_iq("q1", WAIT) => r,
        else => panic!("the request reached no resource"),
    };
    let iq_token_addr = req.attr("from").unwrap().to_owned();
    serving.send_xml(&format!(
        "<message type='chat' id='forged' to='{iq_token_addr}'><body>x</body></message>"
    ));
    // Nor does a message token route an IQ reply.
    serving.send_xml(&format!("<iq type='result' id='m1' to='{token_addr}'/>"));
    assert!(
        user.recv_where(QUIET, |e| e.attr("id") == Some("forged")
            || (e.name() == "iq" && e.attr("id") == Some("m1")))
            .await
            .is_none(),
        "a token of the other kind routed something"
    );
    // The other resource never saw the conversation.
    let strays: Vec<String> = other
        .history()
        .into_iter()
        .filter(|m| m.starts_with("<message") && m.contains(&token_addr))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_through_prosody() {
    let d = Deployment::start_configured(&binary(), "messages = \"forward\"", "");
    let a = d.implementing("a").await;
    let b = d.implementing("b").await;
    conversation(d.prosody.c2s, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_through_ejabberd_with_two_instances() {
    let (ejabberd, proxies) = ejabberd_with_proxies(
        &binary(),
        2,
        "messages = \"forward\"\nprobe_interval_secs = 1",
        "",
    );
    let a = implementing_at(ejabberd.c2s, "a", &proxies).await;
    let b = implementing_at(ejabberd.c2s, "b", &proxies).await;
    conversation(ejabberd.c2s, a, b).await;
    let forwarded: Vec<usize> = proxies
        .iter()
        .map(|p| count(p, "message forwarded"))
        .collect();
    let reversed: Vec<usize> = proxies
        .iter()
        .map(|p| count(p, "message reversed"))
        .collect();
    println!(
        "[measured] messages on ejabberd: forwarded per instance {forwarded:?}, reversed per instance {reversed:?}"
    );
}

fn count(p: &ProxyProcess, what: &str) -> usize {
    p.log().matches(what).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_refused_unless_forwarding_is_on() {
    let d = Deployment::start(&binary());
    let _a = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    user.send_xml(&format!(
        "<message type='chat' id='m1' to='{COMPONENT}'><body>hi</body></message>"
    ));
    let e = recv_message(&mut user, "m1").await.expect("an error");
    assert_eq!(e.attr("type"), Some("error"));
    assert_eq!(
        error_condition(&e).as_deref(),
        Some("feature-not-implemented")
    );
}
