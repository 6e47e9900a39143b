//! Faults a production deployment meets, with a real Prosody: the server restarting, the
//! proxy killed or stopped while the implementing client holds requests, and a resource of
//! the implementing client leaving with requests in flight.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::client::reply_to;
use testkit::deployment::{Deployment, QUIET, WAIT, error_condition, request, wait_resource};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_costs_no_cpu_and_service_resumes() {
    let mut d = Deployment::start(&binary());
    let imp = d.implementing("a").await;
    drop(imp);
    d.prosody.stop();
    // CPU and reconnection attempts are counted over the same window, while the server is
    // certainly down (however long it took to stop and takes to start again).
    let attempts_in_log = || d.proxy.log().matches("cannot log in").count();
    let window = Instant::now();
    let cpu_before = cpu_seconds(d.proxy.pid());
    let attempts_before = attempts_in_log();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let cpu_down = cpu_seconds(d.proxy.pid()) - cpu_before;
    let attempts = attempts_in_log() - attempts_before;
    let down = window.elapsed();
    let returned = Instant::now();
    d.prosody.start_again();
    let started_in = returned.elapsed();
    d.proxy.wait_sessions(2, Duration::from_secs(30));
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    user.send_xml(&request("again"));
    let req = imp.recv_request(WAIT).await.expect("serving again");
    imp.send(reply_to(&req, "result", ""));
    assert!(user.recv_iq("again", WAIT).await.is_some());
    testkit::report(&format!(
        "server down {down:.1?}: jat-proxy used {cpu_down:.2} s CPU over {attempts} reconnection \
         attempts; serving again {:.1?} after the server was started ({:.1?} of it the server's \
         own start, {} attempts in all)",
        returned.elapsed(),
        started_in,
        attempts_in_log()
    ));
    // Near idle: well under 5% of one core while waiting (10 ms ticks). CPU time, not wall
    // time: a busy machine does not add to it.
    assert!(
        cpu_down < down.as_secs_f64() * 0.05,
        "{cpu_down} s of CPU while the server was down"
    );
    // The backoff waits at least 250 ms, then 500 ms, then 1 s (half of the 2 s cap) between
    // attempts: at most 4 + one a second (12 in 8 s), fewer when the machine is slow.
    let most = 4 + down.as_secs() as usize;
    assert!(
        attempts <= most,
        "capped backoff, not a busy loop: {attempts} attempts in {down:?} (at most {most})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_survive_sigkill_and_sigterm() {
    let mut d = Deployment::start(&binary());
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    let mut other = d.client("mallory", "m").await;
    for signal in ["KILL", "TERM"] {
        let ids: Vec<String> = (0..5).map(|i| format!("{signal}-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let c = if i % 2 == 0 { &user } else { &other };
            c.send_xml(&request(id));
        }
        let mut held = Vec::new();
        for _ in &ids {
            held.push(imp.recv_request(WAIT).await.expect("forwarded"));
        }
        d.proxy.signal(signal);
        let status = d.proxy.wait_exit(WAIT).expect("the proxy stops");
        if signal == "TERM" {
            assert_eq!(status.code(), Some(0));
        }
        d.proxy.restart();
        d.proxy.wait_sessions(1, WAIT);
        wait_resource(&d.proxy, "a");
        for req in &held {
            imp.send(reply_to(req, "result", ""));
        }
        for (i, id) in ids.iter().enumerate() {
            let c = if i % 2 == 0 { &mut user } else { &mut other };
            let r = c
                .recv_iq(id, WAIT)
                .await
                .unwrap_or_else(|| panic!("{id} lost after SIG{signal}"));
            assert_eq!(r.attr("type"), Some("result"));
        }
    }
}

/// What jat-proxy's debug log says about the requests of the resource-leaving test, in the
/// order it handled them.
#[derive(Default)]
struct LeavingLog {
    /// (id, resource) of every `request forwarded`, in order.
    forwarded: Vec<(String, String)>,
    /// How many requests it had forwarded when it first learnt that `a` left (its unavailable
    /// presence, or the server's bounce of a request sent to it), if it has.
    learnt_after: Option<usize>,
    /// Whether the first thing it learnt it from was a's unavailable presence.
    learnt_from_presence: bool,
    /// Whether it has handled a's unavailable presence at all.
    presence_seen: bool,
    /// Ids of every reply it reversed (results from b, the server's bounces from a).
    reversed: Vec<String>,
    /// Ids of the reversed replies that were the server's bounces from a.
    bounced: Vec<String>,
}

fn read_leaving_log(log: &str) -> LeavingLog {
    use testkit::proxy::log_field;
    let mut l = LeavingLog::default();
    let mut bounce_pending = false;
    for line in log.lines() {
        let resource = log_field(line, "resource");
        if line.contains("request forwarded") {
            let id = log_field(line, "id").unwrap_or_default().to_owned();
            l.forwarded
                .push((id, resource.unwrap_or_default().to_owned()));
        } else if line.contains("implementing client resource unavailable") && resource == Some("a")
        {
            l.presence_seen = true;
            if l.learnt_after.is_none() {
                l.learnt_after = Some(l.forwarded.len());
                l.learnt_from_presence = true;
            }
        } else if line.contains("request bounced") && resource == Some("a") {
            // Logged while handling the bounce, just before the `reply reversed` of it.
            bounce_pending = true;
            if l.learnt_after.is_none() {
                l.learnt_after = Some(l.forwarded.len());
            }
        } else if line.contains("reply reversed") {
            let id = log_field(line, "id").unwrap_or_default().to_owned();
            if std::mem::take(&mut bounce_pending) {
                l.bounced.push(id.clone());
            }
            l.reversed.push(id);
        }
    }
    l
}

/// jat-proxy's own refusal says so in its text; an error it reverses (the server's bounce of
/// a request forwarded to the departed resource) does not.
fn is_refusal(answer: &testkit::client::Element) -> bool {
    testkit::client::xml(answer).contains("the service is not available")
}

/// What is still to come before the run is settled: every request forwarded or refused,
/// every request forwarded to b answered, every reply the proxy reversed at the user (and
/// every answer the user has in the proxy's log, which is read through a pipe), and a's
/// departure seen by the proxy.
fn leaving_unsettled(
    log: &LeavingLog,
    answers: &HashMap<String, testkit::client::Element>,
    all: &[String],
) -> Vec<String> {
    let mut todo = Vec::new();
    if !log.presence_seen {
        todo.push("the proxy has not logged a's unavailable presence".to_owned());
    }
    let forwarded: HashSet<&str> = log.forwarded.iter().map(|(id, _)| id.as_str()).collect();
    let reversed: HashSet<&str> = log.reversed.iter().map(String::as_str).collect();
    for id in all {
        let refused = answers.get(id).is_some_and(is_refusal);
        if !forwarded.contains(id.as_str()) && !refused {
            todo.push(format!("{id}: neither forwarded nor refused"));
        }
    }
    for (id, resource) in &log.forwarded {
        if resource == "b" && !answers.contains_key(id) {
            todo.push(format!("{id}: forwarded to b, not answered"));
        }
    }
    for id in &log.reversed {
        if !answers.contains_key(id) {
            todo.push(format!("{id}: reversed, not at the user"));
        }
    }
    for (id, answer) in answers {
        if !is_refusal(answer) && !reversed.contains(id.as_str()) {
            todo.push(format!("{id}: at the user, not (yet) logged as reversed"));
        }
    }
    todo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_leaving_with_requests_in_flight() {
    let d = Deployment::start_with(
        &binary(),
        "\n[limits]\nrate_per_sender = 10000.0\nrate_burst = 10000\n",
    );
    let a = d.implementing("a").await;
    let mut b = d.implementing("b").await;
    let mut user = d.client("user", "abc").await;
    let n = 200;
    let all: Vec<String> = (0..n).map(|i| format!("q{i}")).collect();
    // Requests keep coming while resource a leaves without answering what it holds. (The
    // pause only shapes the scenario; nothing below depends on how long it really was.)
    for id in &all[..n / 2] {
        user.send_xml(&request(id));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let history = a.history_handle();
    let leaving = tokio::spawn(a.close());
    for id in &all[n / 2..] {
        user.send_xml(&request(id));
    }
    leaving.await.unwrap();
    let started = Instant::now();

    // b answers everything it gets; the user collects every answer, each id at most once.
    let mut answers: HashMap<String, testkit::client::Element> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settled_since: Option<Instant> = None;
    let (log, todo) = loop {
        tokio::select! {
            Some(req) = b.recv_request(Duration::from_millis(100)) => b.send(reply_to(&req, "result", "")),
            Some(r) = user.recv_where(Duration::from_millis(100), |e| e.name() == "iq") => {
                let id = r.attr("id").unwrap_or_default().to_owned();
                let xml = testkit::client::xml(&r);
                if let Some(first) = answers.insert(id.clone(), r) {
                    panic!(
                        "{id} answered twice:\n{}\n{xml}",
                        testkit::client::xml(&first)
                    );
                }
            }
            else => {}
        }
        let log = read_leaving_log(&d.proxy.log());
        let todo = leaving_unsettled(&log, &answers, &all);
        if todo.is_empty() {
            // Settled; stay a while longer to see any second answer to an id.
            if settled_since.get_or_insert_with(Instant::now).elapsed() >= QUIET {
                break (log, todo);
            }
        } else {
            settled_since = None;
        }
        if Instant::now() >= deadline {
            break (log, todo);
        }
    };
    let proxy_log = d.proxy.log();
    assert!(
        todo.is_empty(),
        "not settled within 60 s: {todo:?}\nproxy log:\n{proxy_log}"
    );
    let settled_in = settled_since.expect("settled") - started;

    // What a's client recorded: everything the server delivered to its session, read or not
    // when it left (it records until the server closes the stream).
    let held_by_a: HashSet<String> = history
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.starts_with("<iq") && s.contains("type='get'"))
        .filter_map(|s| {
            s.split("id='")
                .nth(1)?
                .split('\'')
                .next()
                .map(str::to_owned)
        })
        .collect();

    // jat-proxy's guarantees.
    let mut forwarded_to: HashMap<&str, &str> = HashMap::new();
    for (id, resource) in &log.forwarded {
        assert!(
            forwarded_to.insert(id, resource).is_none(),
            "{id} forwarded twice\n{proxy_log}"
        );
    }
    let learnt_after = log
        .learnt_after
        .expect("a's departure was logged (settled)");
    let late: Vec<&(String, String)> = log.forwarded[learnt_after..]
        .iter()
        .filter(|(_, r)| r != "b")
        .collect();
    assert!(
        late.is_empty(),
        "forwarded elsewhere than b after the proxy learnt that a left: {late:?}\n{proxy_log}"
    );
    let bounced: HashSet<&str> = log.bounced.iter().map(String::as_str).collect();
    let mut results = 0;
    let mut errors: HashMap<String, usize> = HashMap::new();
    let mut refused = 0;
    for (id, answer) in &answers {
        let to = forwarded_to.get(id.as_str()).copied();
        match error_condition(answer) {
            None => {
                assert_eq!(to, Some("b"), "{id}: a result, but not forwarded to b");
                results += 1;
            }
            Some(condition) if is_refusal(answer) => {
                assert_eq!(condition, "service-unavailable", "{id}");
                assert_eq!(to, None, "{id}: refused, yet forwarded");
                refused += 1;
            }
            Some(condition) => {
                assert_eq!(to, Some("a"), "{id}: an error reversed, but not sent to a");
                *errors.entry(condition).or_default() += 1;
            }
        }
    }
    for id in &log.bounced {
        assert_eq!(forwarded_to.get(id.as_str()), Some(&"a"), "bounce of {id}");
    }
    // The implementing client never learns who asks.
    for s in b.history().iter().chain(history.lock().unwrap().iter()) {
        assert!(!s.contains("user@localhost"), "leaked: {s}");
    }

    // What depends on when the server delivered, bounced or dropped: measured.
    let to_a: Vec<&str> = log
        .forwarded
        .iter()
        .filter(|(_, r)| r == "a")
        .map(|(id, _)| id.as_str())
        .collect();
    let to_b = log.forwarded.len() - to_a.len();
    let held_and_bounced = to_a
        .iter()
        .filter(|id| held_by_a.contains(**id) && bounced.contains(**id))
        .count();
    let dropped: Vec<&str> = to_a
        .iter()
        .filter(|id| !held_by_a.contains(**id) && !bounced.contains(**id))
        .copied()
        .collect();
    testkit::report(&format!(
        "resource a left: {n} requests; {} forwarded to a (all before the proxy learnt it left, \
         from {}), {to_b} to b, {refused} refused for lack of a resource; {results} results via \
         b, {} server bounces reversed to the sender ({errors:?}); {} recorded by a before its \
         stream closed ({held_and_bounced} of them bounced too); {} dropped silently by the \
         server while a's session was closing: {dropped:?}; all answered {settled_in:?} after a left",
        to_a.len(),
        if log.learnt_from_presence {
            "its unavailable presence"
        } else {
            "a bounce"
        },
        log.bounced.len(),
        held_by_a.len(),
        dropped.len(),
    ));
}
