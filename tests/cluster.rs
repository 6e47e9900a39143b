//! jat-proxy on a two-node ejabberd cluster (Erlang distribution, Mnesia): two instances
//! of each node, each connected to *both* nodes (`server = [own node, other node]`, as
//! README recommends), all sharing one key file, with `balance = "sticky"`; the
//! implementing client and the users logged in on either node. One cluster for every
//! scenario, run as phases of one test:
//!
//! 1. presence right after the implementing client logs in (measured, printed), and every
//!    instance learning both resources, one on each node (asserted);
//! 2. how the component's stanzas spread over the instances (measured), every instance
//!    choosing the same resource for the sender (asserted);
//! 3. faults under steady load: (a) both instances of node 1 killed, (b) node 2 stopped and
//!    started again, (c) a rolling in-place upgrade of all four instances.
//!
//! What ejabberd 23.01 does here, without `domain_balancing` (read in its `ejabberd_router`
//! and measured with one stream per instance by an earlier version of this test): a stanza
//! for the component domain goes to a random connection *on the node where it is routed* —
//! the node of the sender's session — and to a connection on another node only when its
//! own node has none. So an instance hears the presence of, and the replies from, the
//! implementing client's resources on the nodes it has a stream to: hence a stream to
//! every node.
//!
//! Only what jat-proxy guarantees is asserted; what depends on the server's timing and
//! routing is printed as `[measured]` lines.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testkit::client::{Answer, Client, Element, reply_to};
use testkit::deployment::{COMPONENT, WAIT, ejabberd_cluster_with_proxies, learnt_within, request};
use testkit::load::Tally;
use testkit::proxy::{ProxyProcess, install_build, lines_with, log_field};
use tokio::time::Instant;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// One user sends hundreds of requests per second here: no rate limit in the way.
const UNLIMITED: &str = "\n[limits]\nrate_per_sender = 100000.0\nrate_burst = 100000\n";

/// The steady load of the fault phases, requests per second.
const RATE: u32 = 50;

/// As in `tests/ejabberd.rs`: how long before a stop a request may have been sent and still
/// be inside the stopping process or connection, and how long after it the server may still
/// route to the dead connection. Server and scheduling latencies are milliseconds; the
/// margin is two orders of magnitude wider, and most of each run lies outside it.
const STOP_MARGIN: Duration = Duration::from_secs(1);

/// A jat-proxy instance (of a node: connected to it first, then to the other).
struct Instance {
    proxy: ProxyProcess,
    /// The logs of its earlier processes (before a SIGKILL and a new start).
    past: String,
}

impl Instance {
    /// Its log, earlier processes included.
    fn log(&self) -> String {
        format!("{}{}", self.past, self.proxy.log())
    }
}

/// Ids of the log lines with `what` (`id="..."`).
fn ids_in(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| log_field(l, "id").map(str::to_owned))
        .collect()
}

/// How long an instance may take to learn a resource of the other node: it hears of it
/// through the answers to probes (every second here), each routed to one of the four
/// instances' streams on that node.
const LEARN: Duration = Duration::from_secs(30);

/// The implementing client, answering every request with a result — except those whose id
/// starts with `hold`, which it keeps until released.
struct Answerer {
    task: tokio::task::JoinHandle<()>,
    held: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

impl Answerer {
    fn start(mut c: Client, hold: Option<&'static str>) -> Answerer {
        let held = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (held2, release2) = (held.clone(), release.clone());
        let task = tokio::spawn(async move {
            let mut kept: Vec<Element> = Vec::new();
            let mut released = false;
            loop {
                tokio::select! {
                    r = c.recv_request(Duration::from_secs(1)) => match r {
                        Some(req) => {
                            let id = req.attr("id").unwrap_or_default();
                            if !released && hold.is_some_and(|h| id.starts_with(h)) {
                                kept.push(req);
                                held2.store(kept.len(), Ordering::SeqCst);
                            } else {
                                c.send(reply_to(&req, "result", "<query xmlns='urn:example:echo'/>"));
                            }
                        }
                        // Also when the stream is gone (its node stopped): do not spin.
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
                    _ = release2.notified(), if !released => {
                        released = true;
                        for req in kept.drain(..) {
                            c.send(reply_to(&req, "result", "<query xmlns='urn:example:echo'/>"));
                        }
                    }
                }
            }
        });
        Answerer {
            task,
            held,
            release,
        }
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn login(node: &testkit::ejabberd::Ejabberd, user: &str, resource: &str) -> Client {
    let answer = if user == "impl" {
        Answer::Subscriptions
    } else {
        Answer::Nothing
    };
    Client::login(node.c2s, "localhost", user, "pw", resource, answer).await
}

/// Sends `n` requests `PREFIX0..` from `user`, one every `every` (open loop: on schedule,
/// whatever comes back) or all at once (`None`), taking every answer (also to requests sent
/// before, by the test itself); then waits for the last answers (all, or nothing new for
/// 5 s). Times are since `t0`.
fn load(
    mut user: Client,
    prefix: &'static str,
    n: usize,
    every: Option<Duration>,
    t0: Instant,
) -> tokio::task::JoinHandle<(Client, Tally)> {
    tokio::spawn(async move {
        let mut tally = Tally::default();
        match every {
            None => {
                for i in 0..n {
                    let id = format!("{prefix}{i}");
                    user.send_xml(&request(&id));
                    tally.sent.push((id, t0.elapsed()));
                }
            }
            Some(every) => {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while tally.sent.len() < n {
                    tokio::select! {
                        _ = tick.tick() => {
                            let id = format!("{prefix}{}", tally.sent.len());
                            user.send_xml(&request(&id));
                            tally.sent.push((id, t0.elapsed()));
                        }
                        Some(r) = user.recv_where(Duration::from_millis(5), |e| e.name() == "iq") => tally.take(r),
                    }
                }
            }
        }
        let mut last_news = std::time::Instant::now();
        while tally
            .sent
            .iter()
            .any(|(id, _)| !tally.answers.contains_key(id))
            && last_news.elapsed() < Duration::from_secs(5)
        {
            if let Some(r) = user
                .recv_where(Duration::from_millis(200), |e| e.name() == "iq")
                .await
            {
                tally.take(r);
                last_news = std::time::Instant::now();
            }
        }
        (user, tally)
    })
}

/// Requests of `prefix` that no instance forwarded (in the logs so far): refused by
/// jat-proxy itself.
fn not_forwarded(instances: &[Instance], tally: &Tally) -> usize {
    let forwarded: std::collections::HashSet<String> = instances
        .iter()
        .flat_map(|i| ids_in(&i.log(), "request forwarded"))
        .collect();
    tally
        .sent
        .iter()
        .filter(|(id, _)| !forwarded.contains(id))
        .count()
}

/// Waits until ejabberd has logged at least `n` logins of the component (its log is
/// written with a delay); returns how many it logged.
fn component_logins(e: &testkit::ejabberd::Ejabberd, n: usize) -> usize {
    let _ = testkit::wait_until(WAIT, || (e.component_logins(COMPONENT) >= n).then_some(()));
    e.component_logins(COMPONENT)
}

/// Runs a blocking call (a stop or start that waits) without holding up the load tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_ejabberd_cluster() {
    let started = std::time::Instant::now();
    // The instances run from a copy of the binary, so that phase 3c can install new builds.
    let bin = testkit::work_dir("cluster-bin");
    let exe = bin.join("jat-proxy");
    install_build(&binary(), &exe, 0);
    let (mut cluster, per_node, _configs) = ejabberd_cluster_with_proxies(
        &exe,
        &[2, 2],
        "",
        "probe_interval_secs = 1\nbalance = \"sticky\"",
        UNLIMITED,
    );
    let mut inst: Vec<Instance> = per_node
        .into_iter()
        .flatten()
        .map(|proxy| Instance {
            proxy,
            past: String::new(),
        })
        .collect();
    // Two instances per node: n1i1, n1i2 on node 1, n2i1, n2i2 on node 2.
    let names: Vec<String> = (0..4)
        .map(|k| format!("n{}i{}", k / 2 + 1, k % 2 + 1))
        .collect();
    let on = |node: usize| -> Vec<usize> { (0..4).filter(|&k| k / 2 == node).collect() };
    // Every instance logs in to both nodes.
    for (n, node) in cluster.nodes.iter().enumerate() {
        let logins = component_logins(node, 4);
        assert_eq!(logins, 4, "node {}: {}", n + 1, node.log());
    }
    testkit::report(&format!(
        "cluster: two ejabberd nodes joined, four instances logged in to both, in {:.1?}",
        started.elapsed()
    ));

    let u1 = login(&cluster.nodes[0], "user", "u1").await;
    let u2 = login(&cluster.nodes[1], "user", "u2").await;

    // ---- 1. Presence right after the implementing client logs in (measured). ----------
    // impl/a logs in on node 1; at once a user on node 1 sends 2000 requests and a user on
    // node 2 sends 200, as fast as they can.
    let t0 = Instant::now();
    let a = Answerer::start(login(&cluster.nodes[0], "impl", "a").await, Some("H"));
    let l1 = load(u1, "P1a", 2000, None, t0);
    let l2 = load(u2, "P1b", 200, None, t0);
    let (u1, p1a) = l1.await.unwrap();
    let (u2, p1b) = l2.await.unwrap();
    for (what, tally) in [("node 1", &p1a), ("node 2", &p1b)] {
        let (results, errors, lost) = tally.all();
        testkit::report(&format!(
            "presence: impl/a logged in on node 1, at once {} requests from a user on {what}: \
             {results} results, errors {errors:?} ({} refused by jat-proxy: no resource known \
             to the instance), {} unanswered",
            tally.sent.len(),
            not_forwarded(&inst, tally),
            lost.len()
        ));
        assert!(lost.is_empty(), "{what}: unanswered {lost:?}");
    }
    // impl/b logs in on node 2; at once the user on node 2 sends 2000 requests.
    let t0 = Instant::now();
    let b = Answerer::start(login(&cluster.nodes[1], "impl", "b").await, Some("H"));
    let (u2, p1c) = load(u2, "P1c", 2000, None, t0).await.unwrap();
    let (results, errors, lost) = p1c.all();
    testkit::report(&format!(
        "presence: impl/b logged in on node 2, at once {} requests from a user on node 2: \
         {results} results, errors {errors:?} ({} refused by jat-proxy), {} unanswered",
        p1c.sent.len(),
        not_forwarded(&inst, &p1c),
        lost.len()
    ));
    assert!(lost.is_empty(), "unanswered {lost:?}");

    // Every instance learns both resources — the one on its own node and the one on the
    // other — through its streams to both nodes (asserted; how long it took is printed).
    let mut learnt = Vec::new();
    for (k, i) in inst.iter().enumerate() {
        for r in ["a", "b"] {
            let took = blocking(|| learnt_within(&i.proxy, r, LEARN));
            assert!(
                took.is_some(),
                "{} never learnt {r} within {LEARN:?}:\n{}",
                names[k],
                i.log()
            );
            learnt.push(format!("{} {r} {:.1?}", names[k], took.unwrap_or_default()));
        }
    }
    testkit::report(&format!(
        "presence: impl/a on node 1, impl/b on node 2; every instance learnt both (waited, \
         after the loads above): {learnt:?}"
    ));

    // ---- 2. How the component's stanzas spread (measured). ----------------------------
    let t0 = Instant::now();
    let l1 = load(u1, "S1x", 200, None, t0);
    let l2 = load(u2, "S2x", 200, None, t0);
    let (u1, s1) = l1.await.unwrap();
    let (u2, s2) = l2.await.unwrap();
    for t in [&s1, &s2] {
        let (results, errors, lost) = t.all();
        assert_eq!(
            (results, errors.len(), lost.len()),
            (200, 0, 0),
            "errors {errors:?}, lost {lost:?}"
        );
    }
    let mut sealed_by: HashMap<String, usize> = HashMap::new();
    let mut forwarded_to: HashMap<String, usize> = HashMap::new();
    let mut chosen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (k, i) in inst.iter().enumerate() {
        for l in lines_with(&i.log(), "request forwarded") {
            if let (Some(id), Some(r)) = (log_field(&l, "id"), log_field(&l, "resource"))
                && id.starts_with('S')
            {
                sealed_by.insert(id.to_owned(), k);
                chosen.insert(r.to_owned());
                *forwarded_to
                    .entry(format!("{}->{r}", names[k]))
                    .or_default() += 1;
            }
        }
    }
    let mut spread = Vec::new();
    // An instance's node is the one it connects to first (k / 2).
    let (mut cross_instance, mut cross_node) = (0, 0);
    for (k, i) in inst.iter().enumerate() {
        let log = i.log();
        let fwd = ids_in(&log, "request forwarded");
        let from = |p: &str| fwd.iter().filter(|id| id.starts_with(p)).count();
        let reversed: Vec<String> = ids_in(&log, "reply reversed")
            .into_iter()
            .filter(|id| id.starts_with('S'))
            .collect();
        for id in &reversed {
            cross_instance += usize::from(sealed_by[id] != k);
            cross_node += usize::from(sealed_by[id] / 2 != k / 2);
        }
        spread.push(format!(
            "{}: {} requests of the node-1 user, {} of the node-2 user, {} replies",
            names[k],
            from("S1x"),
            from("S2x"),
            reversed.len()
        ));
    }
    let mut forwarded_to: Vec<(String, usize)> = forwarded_to.into_iter().collect();
    forwarded_to.sort();
    testkit::report(&format!(
        "spread: 200 requests from a user (one account) on each node (impl/a on node 1, \
         impl/b on node 2, sticky): {spread:?}; forwarded to {forwarded_to:?}; of 400 \
         replies, {cross_instance} reversed by another instance than the one that sealed the \
         token, {cross_node} by an instance of the other node"
    ));
    // Sticky: every instance, whichever node the request came through, chose the same
    // resource for the account.
    assert_eq!(
        chosen.len(),
        1,
        "sticky across instances and nodes: {forwarded_to:?}"
    );

    // ---- 3a. Both instances of node 1 killed under load. ------------------------------
    // The resource chosen for the user holds five of its requests (sealed by whichever
    // instances they reached), releases them once node 1's instances are dead: node 2's
    // instances open the tokens.
    for i in 0..5 {
        u1.send_xml(&request(&format!("H{i}")));
    }
    let holding = || a.held.load(Ordering::SeqCst) + b.held.load(Ordering::SeqCst);
    let held = testkit::wait_until(WAIT, || (holding() == 5).then_some(()));
    assert!(
        held.is_some(),
        "the implementing client holds {}",
        holding()
    );
    let t0 = Instant::now();
    let l1 = load(
        u1,
        "K",
        8 * RATE as usize,
        Some(Duration::from_secs(1) / RATE),
        t0,
    );
    tokio::time::sleep_until(t0 + Duration::from_secs(2)).await;
    let kill_sent = t0.elapsed();
    for &k in &on(0) {
        blocking(|| inst[k].proxy.kill9());
    }
    let kill_done = t0.elapsed();
    tokio::time::sleep_until(t0 + Duration::from_secs(5)).await;
    a.release.notify_one();
    b.release.notify_one();
    let (u1, kt) = l1.await.unwrap();
    let in_window = |at: Duration| at + STOP_MARGIN >= kill_sent && at <= kill_done + STOP_MARGIN;
    let (results, errors, lost) = kt.count(in_window);
    let (results_out, errors_out, lost_out) = kt.count(|at| !in_window(at));
    let held_sealed_by: Vec<String> = (0..5)
        .map(|i| {
            let id = format!("H{i}");
            inst.iter()
                .enumerate()
                .filter(|(_, x)| ids_in(&x.log(), "request forwarded").contains(&id))
                .map(|(k, _)| names[k].clone())
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    let held_reversed_by: Vec<String> = (0..5)
        .map(|i| {
            let id = format!("H{i}");
            inst.iter()
                .enumerate()
                .filter(|(_, x)| ids_in(&x.log(), "reply reversed").contains(&id))
                .map(|(k, _)| names[k].clone())
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    let k_on_node2: usize = on(1)
        .iter()
        .map(|&k| {
            ids_in(&inst[k].log(), "request forwarded")
                .iter()
                .filter(|id| id.starts_with('K'))
                .count()
        })
        .sum();
    testkit::report(&format!(
        "kill: SIGKILL to both node-1 instances at {kill_sent:.2?} (dead {:.0?} later) under \
         {RATE} requests/s from a user on node 1: {} sent; within {STOP_MARGIN:?} of the kill: \
         {results} results, errors {errors:?}, {} unanswered {lost:?}; outside: {results_out} \
         results, errors {errors_out:?}, {} unanswered; {k_on_node2} forwarded by node-2 \
         instances; 5 requests held by the implementing client across the kill, sealed by \
         {held_sealed_by:?}, reversed by {held_reversed_by:?}",
        kill_done - kill_sent,
        kt.sent.len(),
        lost.len(),
        lost_out.len()
    ));
    // Guaranteed: every request sent outside the kill's margin is answered with a result
    // (by node 1's instances before, by node 2's after), and every held reply is reversed
    // by a node-2 instance (node 1 has none left; any instance opens any token).
    assert!(
        errors_out.is_empty() && lost_out.is_empty(),
        "outside the kill: errors {errors_out:?}, unanswered {lost_out:?}"
    );
    for i in 0..5 {
        let id = format!("H{i}");
        let r = kt.answers.get(&id);
        assert_eq!(
            r.and_then(|r| r.attr("type")),
            Some("result"),
            "{id}: {:?}",
            r.map(testkit::client::xml)
        );
        assert!(
            held_reversed_by[i].starts_with("n2"),
            "{held_reversed_by:?}"
        );
    }
    // Node 1's instances come back (a new process each, logged in to both nodes) and learn
    // both resources again.
    for &k in &on(0) {
        let log = inst[k].proxy.log();
        inst[k].past.push_str(&log);
        inst[k].proxy.restart();
    }
    for &k in &on(0) {
        blocking(|| inst[k].proxy.wait_sessions(2, Duration::from_secs(30)));
        for r in ["a", "b"] {
            let took = blocking(|| learnt_within(&inst[k].proxy, r, LEARN));
            assert!(took.is_some(), "{} never learnt {r}", names[k]);
        }
    }

    // ---- 3b. Node 2 stopped and started again under load. ----------------------------
    // Every instance loses its stream to node 2 (and relearns presence through node 1's:
    // impl/b went with node 2), and logs in to it again once it is back.
    drop(u2);
    let sessions_before: Vec<usize> = inst.iter().map(|i| i.proxy.sessions()).collect();
    let t0 = Instant::now();
    let l1 = load(
        u1,
        "N",
        12 * RATE as usize,
        Some(Duration::from_secs(1) / RATE),
        t0,
    );
    tokio::time::sleep_until(t0 + Duration::from_secs(2)).await;
    let stop_sent = t0.elapsed();
    blocking(|| cluster.nodes[1].stop());
    let stop_done = t0.elapsed();
    drop(b);
    tokio::time::sleep_until(t0 + Duration::from_secs(6)).await;
    let start_sent = t0.elapsed();
    blocking(|| cluster.nodes[1].start_again());
    let start_done = t0.elapsed();
    let (u1, nt) = l1.await.unwrap();
    let near = |at: Duration, from: Duration, to: Duration| {
        at + STOP_MARGIN >= from && at <= to + STOP_MARGIN
    };
    let in_window =
        |at: Duration| near(at, stop_sent, stop_done) || near(at, start_sent, start_done);
    let (results, errors, lost) = nt.count(in_window);
    let (results_out, errors_out, lost_out) = nt.count(|at| !in_window(at));
    // Every instance logs in to node 2 again once it is back.
    let mut back_after = Vec::new();
    for (k, i) in inst.iter().enumerate() {
        blocking(|| {
            i.proxy
                .wait_sessions(sessions_before[k] + 1, Duration::from_secs(30))
        });
        let last = lines_with(&i.proxy.log(), "session established");
        back_after.push(last.last().cloned().unwrap_or_default());
    }
    let back_at: Vec<String> = back_after
        .iter()
        .map(|l| l.split_whitespace().next().unwrap_or("?").to_owned())
        .collect();
    blocking(|| cluster.wait_joined(Duration::from_secs(30)));
    testkit::report(&format!(
        "node stop: node 2 stopped at {stop_sent:.2?} (down {:.1?} later), started again at \
         {start_sent:.2?} (listening {:.1?} later), under {RATE} requests/s from a user on \
         node 1: {} sent; within {STOP_MARGIN:?} of the stop or start: {results} results, \
         errors {errors:?}, {} unanswered; outside: {results_out} results, errors \
         {errors_out:?}, {} unanswered; the instances logged in to node 2 again at {back_at:?}",
        stop_done - stop_sent,
        start_done - start_sent,
        nt.sent.len(),
        lost.len(),
        lost_out.len()
    ));
    assert!(
        errors_out.is_empty() && lost_out.is_empty(),
        "outside the stop and start: errors {errors_out:?}, unanswered {lost_out:?}"
    );
    let b = Answerer::start(login(&cluster.nodes[1], "impl", "b").await, None);
    let u2 = login(&cluster.nodes[1], "user", "u2").await;
    for (k, i) in inst.iter().enumerate() {
        for r in ["a", "b"] {
            let took = blocking(|| learnt_within(&i.proxy, r, LEARN));
            assert!(took.is_some(), "{} never learnt {r}", names[k]);
        }
    }

    // ---- 3c. Rolling in-place upgrade of all four instances under load. ---------------
    // ejabberd writes its log with a delay: let the last logins show before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logins_before: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.component_logins(COMPONENT))
        .collect();
    let sessions_before: Vec<usize> = inst.iter().map(|i| i.proxy.sessions()).collect();
    let pids: Vec<u32> = inst.iter().map(|i| i.proxy.pid()).collect();
    let t0 = Instant::now();
    let every = Some(Duration::from_secs(1) / RATE);
    let l1 = load(u1, "U1x", 12 * RATE as usize, every, t0);
    let l2 = load(u2, "U2x", 12 * RATE as usize, every, t0);
    let mut builds = Vec::new();
    for (k, i) in inst.iter().enumerate() {
        tokio::time::sleep_until(t0 + Duration::from_millis(1500 + 2000 * k as u64)).await;
        let before = lines_with(&i.proxy.log(), "upgraded in place").len();
        builds.push(blocking(|| install_build(&binary(), &exe, k + 1)));
        i.proxy.signal("USR2");
        // The next instance once this one is through.
        let through = async {
            while lines_with(&i.proxy.log(), "upgraded in place").len() == before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert!(
            tokio::time::timeout(WAIT, through).await.is_ok(),
            "{}: {}",
            names[k],
            i.proxy.log()
        );
    }
    let (_u1, ut1) = l1.await.unwrap();
    let (_u2, ut2) = l2.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logins_after: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.component_logins(COMPONENT))
        .collect();
    let mut tallies = Vec::new();
    for (what, t) in [("node 1", &ut1), ("node 2", &ut2)] {
        let (results, errors, lost) = t.all();
        tallies.push(format!(
            "user on {what}: {} sent, {results} results, errors {errors:?}, {} unanswered",
            t.sent.len(),
            lost.len()
        ));
    }
    testkit::report(&format!(
        "rolling upgrade: SIGUSR2 to each of the 4 instances in turn, each to a new build, \
         under {RATE} requests/s from a user on each node: {tallies:?}; component logins on \
         (node 1, node 2) before {logins_before:?}, after {logins_after:?}"
    ));
    for (k, i) in inst.iter().enumerate() {
        let log = i.proxy.log();
        let ran = lines_with(&log, "running build");
        assert_eq!(
            ran.last().and_then(|l| log_field(l, "build")),
            Some(builds[k].as_str()),
            "{}: runs the build installed for it:\n{log}",
            names[k]
        );
        assert_eq!(i.proxy.pid(), pids[k], "{}: same process", names[k]);
        assert_eq!(
            i.proxy.sessions(),
            sessions_before[k],
            "{}: no new session:\n{log}",
            names[k]
        );
    }
    assert_eq!(logins_after, logins_before, "no new component login");
    for t in [&ut1, &ut2] {
        let (results, errors, lost) = t.all();
        assert!(
            errors.is_empty() && lost.is_empty(),
            "errors {errors:?}, unanswered {lost:?}"
        );
        assert_eq!(results, t.sent.len());
    }
    drop((a, b));
    // Over the whole run: which instance sealed each token, which one opened it.
    let mut sealer: HashMap<String, usize> = HashMap::new();
    for (k, i) in inst.iter().enumerate() {
        for id in ids_in(&i.log(), "request forwarded") {
            sealer.insert(id, k);
        }
    }
    let (mut reversed, mut other, mut other_node) = (0, 0, 0);
    for (k, i) in inst.iter().enumerate() {
        for id in ids_in(&i.log(), "reply reversed") {
            reversed += 1;
            other += usize::from(sealer.get(&id).is_some_and(|&s| s != k));
            other_node += usize::from(sealer.get(&id).is_some_and(|&s| s / 2 != k / 2));
        }
    }
    testkit::report(&format!(
        "whole run: {reversed} replies reversed, {other} of them by another instance than the \
         one that sealed the token, {other_node} by an instance of the other node"
    ));
    testkit::report(&format!("cluster test: {:.0?} in all", started.elapsed()));
    testkit::discard_work_dir(&bin, "binaries");
}
