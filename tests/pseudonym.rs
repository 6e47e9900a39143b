//! `[proxy] sender = "pseudonym"` end to end: two instances behind real ejabberd (which
//! spreads the component domain over their connections) sharing one key file, the real
//! binary, the implementing client reading the pseudonym off the resource it sees.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use testkit::client::{Answer, Client, reply_to};
use testkit::deployment::{COMPONENT, WAIT, ejabberd_with_proxies, implementing_at, request};
use testkit::proxy::ProxyProcess;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// How many requests with an id starting `prefix` `proxy` forwarded (its debug log).
fn forwarded(proxy: &ProxyProcess, prefix: &str) -> usize {
    proxy
        .log()
        .lines()
        .filter(|l| l.contains("request forwarded") && l.contains(&format!("id=\"{prefix}")))
        .count()
}

/// One request of `user` with this id, answered by `imp`; returns the pseudonym the
/// implementing client saw (the resource's part before the `.`), after checking that the
/// result reached `user` from the component.
async fn pseudonym_of(user: &mut Client, imp: &mut Client, id: &str) -> String {
    user.send_xml(&request(id));
    let req = loop {
        let r = imp.recv_request(WAIT).await.expect("request reaches impl");
        if r.attr("id") == Some(id) {
            break r;
        }
    };
    let from = req.attr("from").unwrap_or_default().to_owned();
    let resource = from
        .strip_prefix(&format!("{COMPONENT}/"))
        .unwrap_or_else(|| panic!("from the component: {from}"));
    let (pseudonym, token) = resource
        .split_once('.')
        .unwrap_or_else(|| panic!("PSEUDONYM.TOKEN: {resource}"));
    assert_eq!(pseudonym.len(), 16, "{resource}");
    assert!(!token.is_empty());
    imp.send(reply_to(
        &req,
        "result",
        "<query xmlns='urn:example:echo'/>",
    ));
    let res = user.recv_iq(id, WAIT).await.expect("result reaches user");
    assert_eq!(res.attr("type"), Some("result"), "{id}");
    assert_eq!(res.attr("from"), Some(COMPONENT));
    pseudonym.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pseudonym_per_account_on_every_instance_and_across_a_rotation_on_ejabberd() {
    let (ejabberd, proxies) = ejabberd_with_proxies(
        &binary(),
        2,
        "sender = \"pseudonym\"\nprobe_interval_secs = 1",
        "",
    );
    ejabberd.register("other", "pw");
    let c2s = ejabberd.c2s;
    let mut imp = implementing_at(c2s, "a", &proxies).await;
    let mut alice = Client::login(c2s, "localhost", "user", "pw", "phone", Answer::Nothing).await;
    let mut bob = Client::login(c2s, "localhost", "other", "pw", "phone", Answer::Nothing).await;

    // Requests of one account until each instance has forwarded some (ejabberd picks the
    // connection at random): every one carries the same pseudonym.
    let mut seen: HashMap<&str, HashSet<String>> = HashMap::new();
    let mut n = 0;
    while n < 8 || proxies.iter().any(|p| forwarded(p, "a-") == 0) {
        assert!(n < 200, "ejabberd never used one of the instances");
        let p = pseudonym_of(&mut alice, &mut imp, &format!("a-{n}")).await;
        seen.entry("alice").or_default().insert(p);
        let p = pseudonym_of(&mut bob, &mut imp, &format!("b-{n}")).await;
        seen.entry("bob").or_default().insert(p);
        n += 1;
    }
    let per_instance: Vec<usize> = proxies.iter().map(|p| forwarded(p, "a-")).collect();
    testkit::report(&format!(
        "pseudonym: {n} requests per account, alice's forwarded by the instances {per_instance:?}"
    ));
    assert_eq!(
        seen["alice"].len(),
        1,
        "one pseudonym on both instances: {seen:?}"
    );
    assert_eq!(seen["bob"].len(), 1, "{seen:?}");
    let alice_p = seen["alice"].iter().next().unwrap().clone();
    assert_ne!(
        &alice_p,
        seen["bob"].iter().next().unwrap(),
        "two accounts, two pseudonyms"
    );

    // `keys rotate`: both instances reload, new tokens, the same pseudonyms.
    let (status, out) = testkit::proxy::run_to_end(
        &binary(),
        &[
            "keys",
            "rotate",
            "--config",
            proxies[0].config().to_str().unwrap(),
        ],
    );
    assert!(status.success(), "{out}");
    let reloaded = testkit::wait_until(WAIT, || {
        proxies
            .iter()
            .all(|p| p.log().contains("key file reloaded"))
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "both instances reload the rotated key file"
    );
    for i in 0..8 {
        assert_eq!(
            pseudonym_of(&mut alice, &mut imp, &format!("r-{i}")).await,
            alice_p,
            "after the rotation"
        );
    }
}
