//! Every stanza shape a server routes from an ordinary user, through real Prosody and real
//! ejabberd: long ids, long attribute values, long element names, thousands of attributes
//! and namespace declarations, deep nesting, long text, astral characters, and stanzas over
//! the limits. jat-proxy must serve or refuse each one with one component login throughout.

use std::path::PathBuf;

use testkit::client::{Answer, Client, Element, reply_to, stanza};
use testkit::deployment::{
    COMPONENT, Deployment, WAIT, ejabberd_with_proxies, error_condition, wait_resource,
};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// 128 KiB: under both servers' own c2s stanza limits, so that they route stanzas over it.
const LIMITS: &str = "\n[limits]\nmax_stanza_bytes = 131072\nmax_depth = 64\n\
                      rate_per_sender = 1000.0\nrate_burst = 1000\n";

/// A request with this id and payload.
fn request(id: &str, payload: &str) -> Element {
    let mut el = stanza(&format!("<iq type='get' to='{COMPONENT}'>{payload}</iq>"));
    el.attrs_mut().insert(
        rxml::Namespace::NONE,
        rxml::NcName::try_from("id").unwrap(),
        id.to_owned(),
    );
    el
}

/// The shapes within the limits, as (name, id, payload).
fn within() -> Vec<(&'static str, String, String)> {
    let attrs: String = (0..3000).map(|i| format!(" a{i}='{i}'")).collect();
    let decls: String = (0..1500)
        .map(|i| format!(" xmlns:p{i}='urn:p:{i}'"))
        .collect();
    vec![
        (
            "long id",
            "i".repeat(9_000),
            "<q xmlns='urn:x:shapes'/>".into(),
        ),
        (
            "long attribute value",
            "attr".into(),
            format!("<q xmlns='urn:x:shapes' v='{}'/>", "v".repeat(100_000)),
        ),
        (
            "long element name",
            "name".into(),
            format!("<q{} xmlns='urn:x:shapes'/>", "n".repeat(9_000)),
        ),
        (
            "thousands of attributes",
            "attrs".into(),
            format!("<q xmlns='urn:x:shapes'{attrs}/>"),
        ),
        (
            "thousands of namespace declarations",
            "decls".into(),
            format!("<q xmlns='urn:x:shapes'{decls}><p1499:z/></q>"),
        ),
        (
            "deep nesting",
            "deep".into(),
            format!(
                "<q xmlns='urn:x:shapes'>{}{}</q>",
                "<d>".repeat(60),
                "</d>".repeat(60)
            ),
        ),
        (
            "long text and astral characters",
            "text".into(),
            format!(
                "<q xmlns='urn:x:shapes'>{}\u{1F980}\u{10FFFD}&lt;&amp;</q>",
                "t".repeat(100_000)
            ),
        ),
    ]
}

/// The next request the component forwarded (ejabberd also sends the implementing client
/// roster pushes).
async fn forwarded(imp: &mut Client) -> Option<Element> {
    imp.recv_where(WAIT, |e| {
        e.name() == "iq"
            && matches!(e.attr("type"), Some("get" | "set"))
            && e.attr("from").is_some_and(|f| f.starts_with(COMPONENT))
    })
    .await
}

/// Sends every shape, has the implementing client echo each payload back, and checks what
/// the user gets; then the over-limit shapes; then that the session is the same and still
/// serves.
async fn exercise(user: &mut Client, imp: &mut Client, server: &str) {
    let shapes = within();
    for (name, id, payload) in &shapes {
        let sent = request(id, payload);
        let sent_payload = sent.children().next().unwrap().clone();
        user.send(sent);
        let req = forwarded(imp)
            .await
            .unwrap_or_else(|| panic!("{server}: {name} was not forwarded"));
        assert!(req.attr("id") == Some(id.as_str()), "{server}: {name}: id");
        let got = req.children().next().expect("payload");
        assert!(
            testkit::client::xml(got) == testkit::client::xml(&sent_payload),
            "{server}: {name} not forwarded intact"
        );
        // The reply carries the same payload back through the token path.
        let mut reply = reply_to(&req, "result", "");
        reply.append_child(got.clone());
        imp.send(reply);
        let back = user
            .recv_iq(id, WAIT)
            .await
            .unwrap_or_else(|| panic!("{server}: no reply to {name}"));
        assert_eq!(back.attr("type"), Some("result"), "{server}: {name}");
        assert!(
            testkit::client::xml(back.children().next().unwrap())
                == testkit::client::xml(&sent_payload),
            "{server}: {name}: reply not intact"
        );
        testkit::report(&format!("{server}: {name}: forwarded and answered"));
    }
    // Over the 128 KiB limit: answered with policy-violation, never built.
    let big = "b".repeat(200_000);
    user.send(request(
        "over-attr",
        &format!("<q xmlns='urn:x:shapes' v='{big}'/>"),
    ));
    user.send(request(
        "over-text",
        &format!("<q xmlns='urn:x:shapes'>{big}</q>"),
    ));
    user.send(request(
        "over-deep",
        &format!(
            "<q xmlns='urn:x:shapes'>{}{}</q>",
            "<d>".repeat(100),
            "</d>".repeat(100)
        ),
    ));
    // The stanza's own start tag over the limit (a 200 KB attribute of the iq): answered from
    // its short attributes.
    let mut junk = request("over-start-tag", "<q xmlns='urn:x:shapes'/>");
    junk.attrs_mut().insert(
        rxml::Namespace::NONE,
        rxml::NcName::try_from("junk").unwrap(),
        big.clone(),
    );
    user.send(junk);
    for id in ["over-attr", "over-text", "over-deep"] {
        let e = user
            .recv_iq(id, WAIT)
            .await
            .unwrap_or_else(|| panic!("{server}: no answer to {id}"));
        assert_eq!(
            error_condition(&e).as_deref(),
            Some("policy-violation"),
            "{server}: {id}"
        );
    }
    // ejabberd re-encodes an iq from its own record and drops attributes it does not know,
    // so there the request arrives small, and is served; Prosody passes it as it is.
    let answer = tokio::select! {
        Some(e) = user.recv_iq("over-start-tag", WAIT) => e,
        Some(req) = imp.recv_where(WAIT, |e| e.attr("id") == Some("over-start-tag")) => {
            assert!(req.attr("junk").is_none(), "{server}: forwarded with the junk");
            imp.send(reply_to(&req, "result", ""));
            user.recv_iq("over-start-tag", WAIT)
                .await
                .unwrap_or_else(|| panic!("{server}: no answer to over-start-tag"))
        }
        else => panic!("{server}: no answer to over-start-tag"),
    };
    let how = error_condition(&answer).unwrap_or_else(|| "result".into());
    testkit::report(&format!(
        "{server}: an iq whose own start tag is over the limit: {how}"
    ));
    if server == "prosody" {
        assert_eq!(how, "policy-violation", "{server}");
    }
    // A start tag over the limit by itself (its id alone is 200 KB): dropped unanswered.
    user.send(request(&big, "<q xmlns='urn:x:shapes'/>"));
    // Still serving, on the same session.
    user.send(request("after", "<q xmlns='urn:x:shapes'/>"));
    let req = forwarded(imp)
        .await
        .unwrap_or_else(|| panic!("{server}: not serving after the shapes"));
    assert_eq!(req.attr("id"), Some("after"), "{server}");
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("after", WAIT).await.is_some(), "{server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_through_prosody_with_one_login() {
    let d = Deployment::start_with(&binary(), LIMITS);
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    exercise(&mut user, &mut imp, "prosody").await;
    assert_eq!(d.prosody.component_logins(), 1, "{}", d.prosody.log());
    assert_eq!(d.proxy.sessions(), 1, "{}", d.proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_through_ejabberd_with_one_login() {
    let (ejabberd, mut proxies) =
        ejabberd_with_proxies(&binary(), 1, "probe_interval_secs = 1", LIMITS);
    let proxy = proxies.remove(0);
    let login = |user: &'static str, resource: &'static str, answer| {
        Client::login(ejabberd.c2s, "localhost", user, "pw", resource, answer)
    };
    let mut imp = login("impl", "a", Answer::Subscriptions).await;
    wait_resource(&proxy, "a");
    let mut user = login("user", "abc", Answer::Nothing).await;
    exercise(&mut user, &mut imp, "ejabberd").await;
    let logins = ejabberd.component_logins(COMPONENT);
    assert_eq!(logins, 1, "{}", ejabberd.log());
    assert_eq!(proxy.sessions(), 1, "{}", proxy.log());
}
