//! jat-proxy on ejabberd: three instances sharing one key file serve one component domain,
//! which ejabberd spreads over their connections at random, stanza by stanza.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use testkit::client::{Answer, Client, Element, reply_to};
use testkit::deployment::{COMPONENT, WAIT, ejabberd_with_proxies, error_condition, request};
use testkit::ejabberd::Ejabberd;
use testkit::proxy::ProxyProcess;

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
        let (ejabberd, proxies) = ejabberd_with_proxies(
            &binary(),
            n,
            "probe_interval_secs = 1",
            // One user sends 50 requests/s here: no rate limit in the way.
            "\n[limits]\nrate_per_sender = 10000.0\nrate_burst = 10000\n",
        );
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

/// Answers every request either resource receives, until the task is aborted (or both
/// streams end).
fn answer_everything(mut a: Client, mut b: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let req = tokio::select! {
                Some(r) = a.recv_request(Duration::from_secs(1)) => (r, true),
                Some(r) = b.recv_request(Duration::from_secs(1)) => (r, false),
                else => continue,
            };
            let reply = reply_to(&req.0, "result", "<query xmlns='urn:example:echo'/>");
            if req.1 { a.send(reply) } else { b.send(reply) }
        }
    })
}

/// Waits (the server's log is written with a delay) until ejabberd has logged at least
/// `n` logins of the component, and returns how many it logged.
fn component_logins(e: &Ejabberd, n: usize) -> usize {
    let _ = testkit::wait_until(WAIT, || (e.component_logins(COMPONENT) >= n).then_some(()));
    e.component_logins(COMPONENT)
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
    assert_eq!(component_logins(&c.ejabberd, 3), 3, "{}", c.ejabberd.log());
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
    answering.abort();
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

/// One instance stopped during the rolling restart.
struct Stop {
    instance: usize,
    signal: &'static str,
    /// When the signal was sent, and when the process had exited (since the load started).
    sent_at: Duration,
    exited_at: Duration,
    /// Its log, to the end.
    log: String,
}

/// How long before a stop a request may have been sent and still be inside the stopping
/// instance, and how long after its exit the server may still route to its dead connection.
/// Both are server and scheduling latencies: the lost requests measured on a busy 2-core
/// machine were sent within a few milliseconds of the signal, so the margin is two orders of
/// magnitude wider — yet narrow enough that most of the run lies outside every window, where
/// every request must be served.
const STOP_MARGIN: Duration = Duration::from_secs(1);

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
    let mut stops: Vec<Stop> = Vec::new();
    let mut answers: HashMap<String, Element> = HashMap::new();
    let receive = |answers: &mut HashMap<String, Element>, r: Element| {
        let id = r.attr("id").unwrap_or_default().to_owned();
        let xml = testkit::client::xml(&r);
        if let Some(first) = answers.insert(id.clone(), r) {
            panic!(
                "{id} answered twice:\n{}\n{xml}",
                testkit::client::xml(&first)
            );
        }
    };
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
                receive(&mut answers, r);
            }
        }
        if let Some(&(t, i, action)) = plan.last()
            && start.elapsed() >= Duration::from_secs(t)
        {
            plan.pop();
            if action == "start" {
                c.proxies[i].restart();
                continue;
            }
            let sent_at = start.elapsed();
            let signal = if action == "kill-9" {
                c.proxies[i].kill9();
                "KILL"
            } else {
                c.proxies[i].signal("TERM");
                let status = c.proxies[i].wait_exit(WAIT);
                assert_eq!(
                    status.and_then(|s| s.code()),
                    Some(0),
                    "{}",
                    c.proxies[i].log()
                );
                "TERM"
            };
            stops.push(Stop {
                instance: i,
                signal,
                sent_at,
                exited_at: start.elapsed(),
                log: c.proxies[i].log(),
            });
            if action != "kill-9" {
                c.proxies[i].restart();
            }
        }
    }
    let total = load.await.unwrap();

    // Every reply an instance reversed (its log says so), it wrote to the server before
    // anything else could happen to it — also when it was then stopped with SIGTERM, which
    // flushes what it handled before closing. Only SIGKILL may take a reversed reply with it.
    let mut logs: Vec<(usize, &str, String)> = stops
        .iter()
        .map(|s| (s.instance, s.signal, s.log.clone()))
        .collect();
    for (i, p) in c.proxies.iter().enumerate() {
        logs.push((i, "running", p.log()));
    }
    let must_arrive: Vec<(String, usize)> = logs
        .iter()
        .filter(|(_, how, _)| *how != "KILL")
        .flat_map(|(i, _, log)| ids_in(log, "reply reversed").into_iter().map(|id| (id, *i)))
        .collect();
    // Let the last answers arrive: all, or at least every reversed one and then nothing more
    // for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last_news = tokio::time::Instant::now();
    while answers.len() < sent.len() && tokio::time::Instant::now() < deadline {
        let all_reversed_in = must_arrive.iter().all(|(id, _)| answers.contains_key(id));
        if all_reversed_in && last_news.elapsed() >= Duration::from_secs(3) {
            break;
        }
        if let Some(r) = user
            .recv_where(Duration::from_millis(200), |e| e.name() == "iq")
            .await
        {
            receive(&mut answers, r);
            last_news = tokio::time::Instant::now();
        }
    }
    answering.abort();
    let lost_reversed: Vec<&(String, usize)> = must_arrive
        .iter()
        .filter(|(id, _)| !answers.contains_key(id))
        .collect();

    let mut by_condition: HashMap<String, usize> = HashMap::new();
    let mut results = 0;
    for r in answers.values() {
        match error_condition(r) {
            None => results += 1,
            Some(cond) => *by_condition.entry(cond).or_default() += 1,
        }
    }
    let forwarded: std::collections::HashSet<String> = logs
        .iter()
        .flat_map(|(_, _, log)| ids_in(log, "request forwarded"))
        .collect();
    let missing: Vec<&(String, Duration)> = sent
        .iter()
        .filter(|(id, _)| !answers.contains_key(id))
        .collect();
    // How far each lost request was sent from the nearest stop (negative: before the signal).
    let offsets: Vec<String> = missing
        .iter()
        .map(|(id, at)| {
            let nearest = stops
                .iter()
                .min_by_key(|s| s.sent_at.as_millis().abs_diff(at.as_millis()))
                .expect("stops");
            let ms = at.as_millis() as i64 - nearest.sent_at.as_millis() as i64;
            let fate = if forwarded.contains(id) {
                "forwarded, reply lost"
            } else {
                "never forwarded"
            };
            format!("{id} {ms:+} ms from SIG{} ({fate})", nearest.signal)
        })
        .collect();
    let footer_drops: usize = stops
        .iter()
        .flat_map(|s| s.log.lines())
        .filter(|l| l.contains("after its stream footer were dropped"))
        .filter_map(|l| {
            testkit::proxy::log_field(l, "dropped")?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let windows: Vec<String> = stops
        .iter()
        .map(|s| {
            format!(
                "SIG{} to #{} at {:.2?}, exited {:.0?} later",
                s.signal,
                s.instance,
                s.sent_at,
                s.exited_at - s.sent_at
            )
        })
        .collect();
    testkit::report(&format!(
        "rolling restart: sent {total}, answered {} ({results} results, errors {by_condition:?}), \
         missing {}: {offsets:?}; {footer_drops} stanzas logged as routed after a SIGTERM footer; \
         stops: {windows:?}",
        answers.len(),
        missing.len(),
    ));
    let logins = component_logins(&c.ejabberd, 3 + 4);
    testkit::report(&format!("component logins seen by ejabberd: {logins}"));
    assert_eq!(
        logins,
        3 + 4,
        "three first logins, one after the kill, three restarts"
    );
    assert!(
        lost_reversed.is_empty(),
        "replies logged as reversed by an instance not killed with SIGKILL never reached the \
         user: {lost_reversed:?}"
    );
    // A request can vanish only if it was inside an instance at the moment it stopped: with
    // SIGKILL, what it had read but not forwarded or what sat in its socket; with SIGTERM,
    // a stanza the server routed to it between its stream footer and the server reading
    // that footer (XEP-0114 has no way to ask the server to stop routing first). How many
    // that is depends on the server's timing (measured above); when, within a wide margin
    // of a stop, does not.
    for (id, at) in &missing {
        assert!(
            stops
                .iter()
                .any(|s| *at + STOP_MARGIN >= s.sent_at && *at <= s.exited_at + STOP_MARGIN),
            "request {id} sent at {at:?} vanished, not near a stop ({windows:?})"
        );
    }
}
