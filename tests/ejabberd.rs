//! jat-proxy on ejabberd: three instances sharing one key file serve one component domain,
//! which ejabberd spreads over their connections at random, stanza by stanza.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use testkit::client::{Answer, Client, Element, reply_to};
use testkit::deployment::{COMPONENT, SECRET, WAIT, error_condition, request};
use testkit::ejabberd::Ejabberd;
use testkit::proxy::{ConfigSpec, ProxyProcess, write_config};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// ejabberd, accounts `impl` and `user`, and `n` instances with one config and key file.
struct Cluster {
    ejabberd: Ejabberd,
    proxies: Vec<ProxyProcess>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let ejabberd = Ejabberd::start(&[(COMPONENT, SECRET)]);
        for u in ["impl", "user"] {
            ejabberd.register(u, "pw");
        }
        let keys = ejabberd.dir().join("keys.toml");
        let config = write_config(
            ejabberd.dir(),
            "jat-proxy.toml",
            &ConfigSpec {
                component: COMPONENT,
                server: ejabberd.component,
                secret: SECRET,
                target: "impl@localhost",
                key_file: &keys,
                proxy_extra: "probe_interval_secs = 1",
                // One user sends 50 requests/s here: no rate limit in the way.
                extra: "\n[limits]\nrate_per_sender = 10000.0\nrate_burst = 10000\n",
            },
        );
        let proxies: Vec<ProxyProcess> = (0..n)
            .map(|_| ProxyProcess::start(&binary(), &config))
            .collect();
        for p in &proxies {
            p.wait_sessions(1, WAIT);
        }
        Cluster { ejabberd, proxies }
    }

    async fn client(&self, user: &str, resource: &str, answer: Answer) -> Client {
        Client::login(self.ejabberd.c2s, "localhost", user, "pw", resource, answer).await
    }

    /// Waits until every instance knows `resource` (periodic probes spread the presence).
    fn wait_all_know(&self, resource: &str) {
        let needle = format!("resource=\"{resource}\"");
        for (i, p) in self.proxies.iter().enumerate() {
            let known = testkit::wait_until(Duration::from_secs(20), || {
                p.log()
                    .lines()
                    .any(|l| l.contains("resource available") && l.contains(&needle))
                    .then_some(())
            });
            assert!(
                known.is_some(),
                "instance {i} never learnt {resource}:\n{}",
                p.log()
            );
        }
    }
}

/// Answers every request either resource receives, until `stop` is set.
fn answer_everything(mut a: Client, mut b: Client) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let req = tokio::select! {
                Some(r) = a.recv_request(Duration::from_secs(5)) => (r, true),
                Some(r) = b.recv_request(Duration::from_secs(5)) => (r, false),
                else => break,
            };
            let reply = reply_to(&req.0, "result", "<query xmlns='urn:example:echo'/>");
            if req.1 {
                a.send(reply)
            } else {
                b.send(reply)
            }
            n += 1;
        }
        n
    })
}

fn ids_in(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split("id=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_reversed_by_instances_other_than_the_encoder() {
    let c = Cluster::start(3);
    let a = c.cluster_impl("a").await;
    let b = c.cluster_impl("b").await;
    c.wait_all_know("a");
    c.wait_all_know("b");
    assert_eq!(
        c.ejabberd.component_logins(COMPONENT),
        3,
        "{}",
        c.ejabberd.log()
    );
    let answering = answer_everything(a, b);
    let mut user = c.client("user", "u", Answer::Nothing).await;
    let n = 60;
    for i in 0..n {
        user.send_xml(&request(&format!("x{i}")));
    }
    let mut results = 0;
    for i in 0..n {
        let r = user
            .recv_iq(&format!("x{i}"), WAIT)
            .await
            .expect("every request answered");
        assert_eq!(
            r.attr("type"),
            Some("result"),
            "{}",
            testkit::client::xml(&r)
        );
        results += 1;
    }
    // Who sealed each token, who opened it.
    let mut sealed_by = HashMap::new();
    let mut per_instance = vec![(0, 0); c.proxies.len()];
    for (i, p) in c.proxies.iter().enumerate() {
        let log = p.log();
        for id in ids_in(&log, "request forwarded") {
            sealed_by.insert(id, i);
            per_instance[i].0 += 1;
        }
        per_instance[i].1 += ids_in(&log, "reply reversed").len();
    }
    let mut cross = 0;
    for (i, p) in c.proxies.iter().enumerate() {
        for id in ids_in(&p.log(), "reply reversed") {
            if sealed_by.get(&id) != Some(&i) {
                cross += 1;
            }
        }
    }
    testkit::report(&format!(
        "three instances: {results}/{n} results; (forwarded, reversed) per instance: {per_instance:?}; \
         {cross} replies reversed by an instance other than the one that sealed the token"
    ));
    assert!(
        cross > 0,
        "ejabberd spreads replies: some must cross instances"
    );
    drop(answering);
}

impl Cluster {
    async fn cluster_impl(&self, resource: &str) -> Client {
        self.client("impl", resource, Answer::Subscriptions).await
    }
}

/// Sends a request every `every` for `duration`, in a task; returns the ids sent.
fn steady_load(
    user_tx: tokio::sync::mpsc::UnboundedSender<String>,
    every: Duration,
    duration: Duration,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut i = 0;
        while start.elapsed() < duration {
            if user_tx.send(format!("L{i}")).is_err() {
                break;
            }
            i += 1;
            tokio::time::sleep(every).await;
        }
        i
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_request() {
    let mut c = Cluster::start(3);
    let a = c.cluster_impl("a").await;
    let b = c.cluster_impl("b").await;
    c.wait_all_know("a");
    c.wait_all_know("b");
    let answering = answer_everything(a, b);
    let mut user = c.client("user", "u", Answer::Nothing).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let load = steady_load(tx, Duration::from_millis(20), Duration::from_secs(16));
    let mut sent: Vec<(String, Duration)> = Vec::new();
    let mut killed_at = None;
    let mut stopped_at: Vec<Duration> = Vec::new();
    let mut answers: HashMap<String, Element> = HashMap::new();
    let start = tokio::time::Instant::now();
    // (time, action) for the instances: kill one, then restart all three one by one.
    let mut plan: Vec<(u64, usize, &str)> = vec![
        (2, 0, "kill-9"),
        (4, 0, "start"),
        (6, 1, "term+start"),
        (9, 2, "term+start"),
        (12, 0, "term+start"),
    ];
    plan.reverse();
    loop {
        tokio::select! {
            id = rx.recv() => match id {
                Some(id) => { user.send_xml(&request(&id)); sent.push((id, start.elapsed())); }
                None => break,
            },
            Some(r) = user.recv_where(Duration::from_millis(50), |e| e.name() == "iq") => {
                answers.insert(r.attr("id").unwrap_or_default().to_owned(), r);
            }
        }
        if let Some(&(t, i, action)) = plan.last()
            && start.elapsed() >= Duration::from_secs(t)
        {
            plan.pop();
            match action {
                "kill-9" => {
                    killed_at = Some(start.elapsed());
                    c.proxies[i].kill9();
                }
                "start" => c.proxies[i].restart(),
                _ => {
                    stopped_at.push(start.elapsed());
                    c.proxies[i].signal("TERM");
                    let status = c.proxies[i].wait_exit(WAIT);
                    assert_eq!(status.and_then(|s| s.code()), Some(0));
                    c.proxies[i].restart();
                }
            }
        }
    }
    let total = load.await.unwrap();
    // Let the last answers arrive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answers.len() < sent.len() && tokio::time::Instant::now() < deadline {
        if let Some(r) = user
            .recv_where(Duration::from_millis(200), |e| e.name() == "iq")
            .await
        {
            answers.insert(r.attr("id").unwrap_or_default().to_owned(), r);
        }
    }
    let mut by_condition: HashMap<String, usize> = HashMap::new();
    let mut results = 0;
    for r in answers.values() {
        match error_condition(r) {
            None => results += 1,
            Some(cond) => *by_condition.entry(cond).or_default() += 1,
        }
    }
    let missing: Vec<&(String, Duration)> = sent
        .iter()
        .filter(|(id, _)| !answers.contains_key(id))
        .collect();
    let killed_at = killed_at.expect("the plan kills one instance");
    testkit::report(&format!(
        "rolling restart: sent {total}, answered {} ({results} results, errors {by_condition:?}), \
         missing {}: {:?} (kill -9 at {killed_at:?})",
        answers.len(),
        missing.len(),
        missing
    ));
    let logins = c.ejabberd.component_logins(COMPONENT);
    testkit::report(&format!("component logins seen by ejabberd: {logins}"));
    drop(answering);
    assert_eq!(
        logins,
        3 + 4,
        "three first logins, one after the kill, three restarts"
    );
    // A request can vanish only if it was inside an instance at the moment it stopped: with
    // SIGKILL, what it had read but not forwarded or what sat in its socket; with SIGTERM,
    // a stanza the server routed to it between its stream footer and the server reading
    // that footer (XEP-0114 has no way to ask the server to stop routing first). So: sent
    // within the second before a stop, and few.
    let stops: Vec<Duration> = std::iter::once(killed_at)
        .chain(stopped_at.iter().copied())
        .collect();
    for (id, at) in &missing {
        assert!(
            stops.iter().any(|s| *at <= *s + Duration::from_millis(100)
                && s.saturating_sub(*at) < Duration::from_secs(1)),
            "request {id} sent at {at:?} vanished, not in flight at a stop ({stops:?})"
        );
    }
    assert!(
        missing.len() <= 5,
        "at most what was in flight at the stops: {missing:?}"
    );
}
