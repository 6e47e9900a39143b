//! A complete local demo: a throwaway Prosody on loopback, jat-proxy in front of an
//! implementing client with two resources, and a user asking it things.
//!
//! Run with `cargo run --example demo` (Prosody must be installed: `apt-get install -y
//! prosody`). It prints each hop of the exchange and the address the implementing client saw.

use std::path::Path;
use std::time::Duration;

use testkit::Prosody;
use testkit::client::{Answer, Client, Element, reply_to, xml};

const COMPONENT: &str = "proxy.localhost";
const SECRET: &str = "demo-secret";
const WAIT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("== jat-proxy demo ==\n");
    let prosody = Prosody::start(&[(COMPONENT, SECRET)]);
    prosody.register("impl", "pw");
    prosody.register("user", "pw");
    println!(
        "Prosody on {} (c2s) and {} (components), throwaway dir {}",
        prosody.c2s,
        prosody.component,
        prosody.dir().display()
    );

    // The proxy, with the same configuration file an operator would write.
    let config_text = format!(
        "[component]\njid = \"{COMPONENT}\"\nserver = \"{}\"\nsecret = \"{SECRET}\"\n\n\
         [proxy]\ntarget_address = \"impl@localhost\"\n\n[keys]\nfile = \"{}\"\n",
        prosody.component,
        prosody.dir().join("keys.toml").display()
    );
    println!("\njat-proxy configuration:\n{config_text}");
    let config =
        jat_proxy::config::parse(Path::new("demo.toml"), &config_text).expect("demo configuration");
    let mut rng = jat_proxy::OsRandom::new();
    let (keys, _) = jat_proxy::keys::load_or_create(
        &config.keys.key_file,
        &mut rng,
        jat_proxy::session::unix_now(),
    )
    .expect("key file");
    let start = jat_proxy::session::Start::fresh("demo.toml".into()).expect("the running binary");
    tokio::spawn(jat_proxy::session::run(config, keys, start));

    // The implementing client: two resources, accepting the proxy's subscription.
    let mut a = login(&prosody, "impl", "a", Answer::Subscriptions).await;
    let mut b = login(&prosody, "impl", "b", Answer::Subscriptions).await;
    let mut user = login(&prosody, "user", "abc", Answer::Nothing).await;
    // Give the proxy a moment to learn both resources' presence.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("implementing client online as {} and {}", a.jid(), b.jid());
    println!("user online as {}\n", user.jid());

    let mut seen_by = Vec::new();
    for i in 1..=4 {
        let id = format!("demo-{i}");
        let request = format!(
            "<iq type='get' id='{id}' to='{COMPONENT}'><query xmlns='urn:example:time'/></iq>"
        );
        user.send_xml(&request);
        println!(
            "user -> component:\n    {}",
            xml(&stamp(&request, user.jid()))
        );
        let (req, who) = tokio::select! {
            Some(r) = a.recv_request(WAIT) => (r, "a"),
            Some(r) = b.recv_request(WAIT) => (r, "b"),
        };
        println!(
            "component -> implementing client (resource {who}):\n    {}",
            xml(&req)
        );
        let seen = req.attr("from").unwrap_or_default().to_owned();
        let answer =
            format!("<query xmlns='urn:example:time'><utc>2026-11-28T12:00:0{i}Z</utc></query>");
        let reply = reply_to(&req, "result", &answer);
        println!("implementing client -> component:\n    {}", xml(&reply));
        if who == "a" {
            a.send(reply)
        } else {
            b.send(reply)
        }
        let res = user
            .recv_iq(&id, WAIT)
            .await
            .expect("the result reaches the user");
        println!("component -> user:\n    {}\n", xml(&res));
        seen_by.push((who, seen));
    }

    println!("What the implementing client saw as the sender of each request:");
    for (who, seen) in &seen_by {
        println!("    resource {who}: {seen}");
    }
    let token = seen_by[0].1.trim_start_matches("proxy.localhost/");
    println!(
        "\nEach is proxy.localhost/ plus a {}-character token: the sender's address ({}) sealed \
         with ChaCha20-Poly1305, bound to the IQ id and the component, valid for 300 s.\n\
         The implementing client cannot read it; a reply to it is routed by decryption alone.",
        token.len(),
        user.jid()
    );
    let leaked = [&a, &b]
        .iter()
        .flat_map(|c| c.history())
        .any(|s| s.contains("user@localhost"));
    println!(
        "Did any stanza the implementing client received contain user@localhost? {}",
        if leaked { "YES (bug!)" } else { "no" }
    );
    for c in [a, b, user] {
        c.close().await;
    }
}

async fn login(prosody: &Prosody, user: &str, resource: &str, answer: Answer) -> Client {
    Client::login(prosody.c2s, "localhost", user, "pw", resource, answer).await
}

/// The request as the server delivers it (with the sender's address), for display.
fn stamp(request: &str, from: &str) -> Element {
    let mut el = testkit::client::stanza(request);
    el.attrs_mut().insert(
        rxml::Namespace::NONE,
        rxml::NcName::try_from("from").unwrap(),
        from.to_owned(),
    );
    el
}
