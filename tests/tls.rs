//! Direct TLS to the component listener (`tls = true`, issue 19) on real servers, with a
//! throwaway CA made in the test: ejabberd's `ejabberd_service` with `tls: true`, and
//! Prosody's component service reached through `mod_net_multiplex`'s TLS listener with no
//! plaintext component port at all. Requests are answered through both; a certificate that
//! does not verify is refused with a log line naming the server and the reason, and retried
//! until the server's certificate is fixed; an in-place upgrade closes the TLS stream and the
//! new process logs in anew, an in-flight request's reply crossing it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::Prosody;
use testkit::client::{Answer, Client, Element, reply_to};
use testkit::deployment::{COMPONENT, SECRET, WAIT, implementing_at, request};
use testkit::ejabberd::Ejabberd;
use testkit::pki::Ca;
use testkit::proxy::{ConfigSpec, ProxyProcess, install_build, lines_with, write_config_server};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// The names a listener's certificate is issued for in these tests.
const NAMES: &[&str] = &["localhost", COMPONENT, "127.0.0.1"];

/// A jat-proxy configuration in `dir` whose one server is `server` (TOML, as is).
fn config(dir: &Path, name: &str, server: &str) -> PathBuf {
    let keys = dir.join("keys.toml");
    write_config_server(
        dir,
        name,
        &ConfigSpec {
            component: COMPONENT,
            server: "127.0.0.1:1".parse().unwrap(),
            also: &[],
            secret: SECRET,
            target: "impl@localhost",
            key_file: &keys,
            proxy_extra: "",
            extra: "\n[limits]\nrate_per_sender = 100000.0\nrate_burst = 100000\n",
        },
        server,
    )
}

/// `{ address = ..., tls = true, ca = ... }` and more keys.
fn tls_server(addr: std::net::SocketAddr, ca: &Path, more: &str) -> String {
    format!(
        "{{ address = \"{addr}\", tls = true, ca = \"{}\"{more} }}",
        ca.display()
    )
}

/// Answers every request the client receives with a result, until aborted.
fn answer_everything(mut c: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Some(req) = c.recv_request(Duration::from_secs(1)).await {
                c.send(reply_to(
                    &req,
                    "result",
                    "<query xmlns='urn:example:echo'/>",
                ));
            }
        }
    })
}

async fn answered(user: &mut Client, id: &str) -> Option<Element> {
    user.send_xml(&request(id));
    user.recv_iq(id, WAIT).await
}

/// Waits until ejabberd has logged the component's login over TLS (`(tls|` on the line
/// "Accepted external component", where a plaintext login has `(tcp|`).
fn assert_accepted_over_tls(ejabberd: &Ejabberd) {
    let ok = testkit::wait_until(WAIT, || {
        lines_with(&ejabberd.log(), "Accepted external component")
            .iter()
            .any(|l| l.contains("(tls|"))
            .then_some(())
    });
    assert!(ok.is_some(), "{}", ejabberd.log());
}

/// Waits until `proxy`'s log has `n` lines containing `what`.
fn wait_lines(proxy: &ProxyProcess, what: &str, n: usize, limit: Duration) {
    let ok = testkit::wait_until(limit, || {
        (lines_with(&proxy.log(), what).len() >= n).then_some(())
    });
    assert!(
        ok.is_some(),
        "no {n} line(s) with {what:?} within {limit:?}:\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_tls_listener_serves_over_an_encrypted_stream() {
    testkit::ejabberd::require();
    let pki = testkit::work_dir("tls-pki");
    let ca = Ca::new("jat test CA");
    let ca_file = ca.write(&pki, "ca");
    let leaf = ca.issue(&pki, "server", NAMES);
    let ejabberd = Ejabberd::start_tls(&[(COMPONENT, SECRET)], &leaf.both);
    for u in ["impl", "user"] {
        ejabberd.register(u, "pw");
    }
    // By address: the name verified is the component's domain.
    let cfg = config(
        ejabberd.dir(),
        "jat-proxy.toml",
        &tls_server(ejabberd.component, &ca_file, ""),
    );
    let proxy = ProxyProcess::start(&binary(), &cfg);
    proxy.wait_sessions(1, Duration::from_secs(30));
    // ejabberd says the component came in over TLS.
    assert_accepted_over_tls(&ejabberd);
    let accepted = lines_with(&ejabberd.log(), "Accepted external component");
    assert!(accepted.iter().all(|l| l.contains("(tls|")), "{accepted:?}");
    assert!(
        !proxy.log().contains("not on loopback"),
        "no warning for a loopback server"
    );
    let answering =
        answer_everything(implementing_at(ejabberd.c2s, "a", std::slice::from_ref(&proxy)).await);
    let mut user = Client::login(
        ejabberd.c2s,
        "localhost",
        "user",
        "pw",
        "u",
        Answer::Nothing,
    )
    .await;
    for i in 0..20 {
        let id = format!("e{i}");
        let r = answered(&mut user, &id).await;
        assert_eq!(
            r.as_ref().and_then(|r| r.attr("type")),
            Some("result"),
            "{id}: {:?}\n{}",
            r.as_ref().map(testkit::client::xml),
            proxy.log()
        );
    }
    answering.abort();
    // A TLS stream's close (ejabberd sends no close_notify) is an ordinary one.
    proxy.signal("TERM");
    let mut proxy = proxy;
    let status = proxy.wait_exit(WAIT).expect("exits");
    assert!(status.success(), "{}", proxy.log());
    assert!(proxy.log().contains("stream closed"), "{}", proxy.log());
    testkit::discard_work_dir(&pki, "pki");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_component_through_net_multiplex_tls_only() {
    testkit::prosody::require();
    let pki = testkit::work_dir("tls-pki");
    let ca = Ca::new("jat test CA");
    let ca_file = ca.write(&pki, "ca");
    let leaf = ca.issue(&pki, "server", NAMES);
    let prosody = Prosody::start_tls(&[(COMPONENT, SECRET)], &leaf.cert, &leaf.key);
    // No plaintext path to the component exists: only the multiplexer's TLS port. (The
    // component service is activated once its host is loaded: wait for the line.)
    let activated = testkit::wait_until(WAIT, || {
        let log = prosody.log();
        (log.contains("Activated service 'component' on no ports")
            && log.contains("Activated service 'multiplex_ssl'"))
        .then_some(())
    });
    assert!(activated.is_some(), "{}", prosody.log());
    for u in ["impl", "user"] {
        prosody.register(u, "pw");
    }
    let cfg = config(
        prosody.dir(),
        "jat-proxy.toml",
        &tls_server(prosody.component, &ca_file, ""),
    );
    let proxy = ProxyProcess::start(&binary(), &cfg);
    proxy.wait_sessions(1, WAIT);
    let logged = testkit::wait_until(WAIT, || (prosody.component_logins() == 1).then_some(()));
    assert!(logged.is_some(), "{}", prosody.log());
    let answering =
        answer_everything(implementing_at(prosody.c2s, "a", std::slice::from_ref(&proxy)).await);
    let mut user =
        Client::login(prosody.c2s, "localhost", "user", "pw", "u", Answer::Nothing).await;
    for i in 0..20 {
        let id = format!("p{i}");
        let r = answered(&mut user, &id).await;
        assert_eq!(
            r.as_ref().and_then(|r| r.attr("type")),
            Some("result"),
            "{id}\n{}",
            proxy.log()
        );
    }
    answering.abort();

    // Prosody's strict SNI: a name that is not one of its hosts gets the alert
    // unrecognized_name, which the log explains.
    let wrong = config(
        prosody.dir(),
        "wrong-name.toml",
        &tls_server(
            prosody.component,
            &ca_file,
            ", name = \"localhost.example\"",
        ),
    );
    let other = ProxyProcess::start(&binary(), &wrong);
    wait_lines(&other, "alert unrecognized_name", 2, WAIT);
    let line = &lines_with(&other.log(), "alert unrecognized_name")[0];
    assert!(
        line.contains(&format!("TLS with {} failed", prosody.component))
            && line.contains("Prosody accepts as SNI only one of its hosts"),
        "{line}"
    );
    // A plaintext client on the TLS port: said so.
    let plain = config(
        prosody.dir(),
        "plain.toml",
        &format!("\"{}\"", prosody.component),
    );
    let plain = ProxyProcess::start(&binary(), &plain);
    wait_lines(&plain, "set `tls = true` for this server", 1, WAIT);
    drop((other, plain));
    testkit::discard_work_dir(&pki, "pki");
}

/// A certificate of an unknown CA, then one for another name: each refused with a log line
/// naming the server and the reason, the link retrying with its backoff; once the server has
/// the right certificate, the same process logs in with nothing else done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_is_refused_and_retried() {
    testkit::ejabberd::require();
    let pki = testkit::work_dir("tls-pki");
    let ca = Ca::new("jat test CA");
    let ca_file = ca.write(&pki, "ca");
    let rogue = Ca::new("jat rogue CA");
    // The server's certificate file, replaced in place between restarts.
    let certfile = pki.join("listener.pem");
    let issue = |by: &Ca, names: &[&str]| {
        let leaf = by.issue(&pki, "current", names);
        std::fs::copy(&leaf.both, &certfile).unwrap();
    };
    issue(&rogue, NAMES);
    let mut ejabberd = Ejabberd::start_tls(&[(COMPONENT, SECRET)], &certfile);
    let cfg = config(
        ejabberd.dir(),
        "jat-proxy.toml",
        &tls_server(ejabberd.component, &ca_file, ""),
    );
    let proxy = ProxyProcess::start(&binary(), &cfg);
    let server = ejabberd.component.to_string();
    // An unknown CA.
    wait_lines(&proxy, "unknown issuer", 2, Duration::from_secs(20));
    let line = &lines_with(&proxy.log(), "unknown issuer")[0];
    assert!(
        line.contains(&format!(
            "cannot log in: TLS refused: the certificate of {server} does not verify for {COMPONENT}: unknown issuer"
        )),
        "{line}"
    );
    assert!(proxy.log().contains("reconnecting in"));
    assert_eq!(proxy.sessions(), 0);
    // Another name.
    ejabberd.stop();
    issue(&ca, &["other.localhost"]);
    ejabberd.start_again();
    wait_lines(
        &proxy,
        "not issued for this name",
        2,
        Duration::from_secs(30),
    );
    let line = &lines_with(&proxy.log(), "not issued for this name")[0];
    assert!(
        line.contains(&format!(
            "TLS refused: the certificate of {server} does not verify for {COMPONENT}: not issued for this name but for DnsName(\"other.localhost\")"
        )),
        "{line}"
    );
    assert_eq!(proxy.sessions(), 0);
    // The right certificate: the link, still retrying, logs in.
    ejabberd.stop();
    issue(&ca, NAMES);
    ejabberd.start_again();
    proxy.wait_sessions(1, Duration::from_secs(30));
    assert_accepted_over_tls(&ejabberd);
    // A plaintext client to the TLS listener: said so.
    let plain = config(ejabberd.dir(), "plain.toml", &format!("\"{server}\""));
    let plain = ProxyProcess::start(&binary(), &plain);
    wait_lines(&plain, "set `tls = true` for this server", 1, WAIT);
    drop(plain);
    testkit::discard_work_dir(&pki, "pki");
}

/// An in-place upgrade with a TLS stream (Prosody, one connection per domain): the stream is
/// drained and closed (TLS state cannot cross `exec`), the new process logs in anew, and
/// serves; a request forwarded before the upgrade is answered after it (tokens are
/// stateless). What arrives during the gap is bounced by Prosody: counted and printed, as is
/// the gap, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_with_a_tls_stream_logs_in_anew_and_keeps_serving() {
    testkit::prosody::require();
    let pki = testkit::work_dir("tls-pki");
    let ca = Ca::new("jat test CA");
    let ca_file = ca.write(&pki, "ca");
    let leaf = ca.issue(&pki, "server", NAMES);
    let prosody = Prosody::start_tls(&[(COMPONENT, SECRET)], &leaf.cert, &leaf.key);
    for u in ["impl", "user"] {
        prosody.register(u, "pw");
    }
    let bin = testkit::work_dir("tls-upgrade-bin");
    install_build(&binary(), &bin.join("jat-proxy"), 0);
    let cfg = config(
        prosody.dir(),
        "jat-proxy.toml",
        &tls_server(prosody.component, &ca_file, ""),
    );
    let proxy = ProxyProcess::start(&bin.join("jat-proxy"), &cfg);
    proxy.wait_sessions(1, WAIT);
    let pid = proxy.pid();
    // The implementing client answers everything, except one request it holds until told.
    let mut implementing = implementing_at(prosody.c2s, "a", std::slice::from_ref(&proxy)).await;
    let mut user =
        Client::login(prosody.c2s, "localhost", "user", "pw", "u", Answer::Nothing).await;
    user.send_xml(&request("inflight"));
    let held = implementing
        .recv_request(WAIT)
        .await
        .expect("the in-flight request reaches the implementing client");
    let release = Arc::new(AtomicBool::new(false));
    let held = Arc::new(Mutex::new(Some(held)));
    let answering = {
        let release = release.clone();
        let held = held.clone();
        tokio::spawn(async move {
            loop {
                if let Some(req) = implementing.recv_request(Duration::from_millis(50)).await {
                    implementing.send(reply_to(
                        &req,
                        "result",
                        "<query xmlns='urn:example:echo'/>",
                    ));
                }
                if release.load(Ordering::SeqCst)
                    && let Some(req) = held.lock().unwrap().take()
                {
                    implementing.send(reply_to(
                        &req,
                        "result",
                        "<query xmlns='urn:example:echo'/>",
                    ));
                }
            }
        })
    };
    // Requests every 20 ms across the upgrade.
    let build = install_build(&binary(), &bin.join("jat-proxy"), 1);
    let mut tally = testkit::load::Tally::default();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut signalled = false;
    while start.elapsed() < Duration::from_secs(8) {
        tokio::select! {
            _ = tick.tick() => {
                let id = format!("U{}", tally.sent.len());
                user.send_xml(&request(&id));
                tally.sent.push((id, start.elapsed()));
            }
            Some(r) = user.recv_where(Duration::from_millis(2), |e| e.name() == "iq" && e.attr("id") != Some("inflight")) => tally.take(r),
        }
        if !signalled && start.elapsed() >= Duration::from_secs(2) {
            proxy.signal("USR2");
            signalled = true;
        }
    }
    proxy.wait_sessions(2, WAIT);
    let log = proxy.log();
    assert_eq!(proxy.pid(), pid, "the same process");
    assert!(
        lines_with(&log, "running build")
            .last()
            .is_some_and(|l| l.contains(&build)),
        "the new build runs:\n{log}"
    );
    assert_eq!(lines_with(&log, "closing the TLS stream").len(), 1, "{log}");
    // The in-flight request's reply crosses the upgrade.
    release.store(true, Ordering::SeqCst);
    let reply = user.recv_iq("inflight", WAIT).await;
    assert_eq!(
        reply.as_ref().and_then(|r| r.attr("type")),
        Some("result"),
        "{log}"
    );
    // And it serves on.
    let mut after = 0;
    for i in 0..10 {
        let id = format!("after{i}");
        user.send_xml(&request(&id));
        if user
            .recv_iq(&id, WAIT)
            .await
            .and_then(|r| r.attr("type").map(str::to_owned))
            == Some("result".into())
        {
            after += 1;
        }
    }
    assert_eq!(after, 10, "{}", proxy.log());
    // The last answers of the load.
    while let Some(r) = user
        .recv_where(Duration::from_millis(500), |e| e.name() == "iq")
        .await
    {
        tally.take(r);
    }
    let (results, errors, lost) = tally.all();
    let gap = gap_ms(&proxy.log());
    testkit::report(&format!(
        "Prosody, TLS: an upgrade under 50 requests/s: {} sent, {results} results, errors \
         {errors:?} (bounced by the server while no stream was up), {} unanswered; from \
         closing the TLS stream to the new process's login: {gap:?} ms; component logins: {}",
        tally.sent.len(),
        lost.len(),
        prosody.component_logins()
    ));
    answering.abort();
    drop(proxy);
    testkit::discard_work_dir(&bin, "binaries");
    testkit::discard_work_dir(&pki, "pki");
}

/// Milliseconds from the upgrade's closing of the TLS stream to the next login.
fn gap_ms(log: &str) -> Option<u64> {
    let secs = |line: &str| -> Option<f64> {
        let time = line.split('T').nth(1)?.split('Z').next()?;
        let mut p = time.split(':');
        let h: f64 = p.next()?.parse().ok()?;
        let m: f64 = p.next()?.parse().ok()?;
        let s: f64 = p.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let closing = lines_with(log, "closing the TLS stream");
    let from = secs(closing.first()?)?;
    let to = lines_with(log, "session established")
        .iter()
        .filter_map(|l| secs(l))
        .find(|t| *t >= from)?;
    Some(((to - from) * 1000.0) as u64)
}

/// A cluster node's two listeners for one domain, as docs/tls.md sets them up: plaintext on
/// loopback, direct TLS for the other hosts; one instance lists both (a mixed `server` list).
/// An in-place upgrade under load hands the plaintext stream over and closes the TLS one,
/// which the new process logs in anew; ejabberd routes to the stream that stays meanwhile,
/// and what it still routed to the TLS stream after our footer is answered on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_mixed_streams_an_upgrade_keeps_serving() {
    testkit::ejabberd::require();
    let pki = testkit::work_dir("tls-pki");
    let ca = Ca::new("jat test CA");
    let ca_file = ca.write(&pki, "ca");
    let leaf = ca.issue(&pki, "server", NAMES);
    let ejabberd = Ejabberd::start_mixed(&[(COMPONENT, SECRET)], &leaf.both);
    for u in ["impl", "user"] {
        ejabberd.register(u, "pw");
    }
    let bin = testkit::work_dir("tls-upgrade-bin");
    install_build(&binary(), &bin.join("jat-proxy"), 0);
    let tls_addr = ejabberd.component_tls.expect("a TLS listener");
    let cfg = config(
        ejabberd.dir(),
        "jat-proxy.toml",
        &format!(
            "[\"{}\", {}]",
            ejabberd.component,
            tls_server(tls_addr, &ca_file, "")
        ),
    );
    let proxy = ProxyProcess::start(&bin.join("jat-proxy"), &cfg);
    proxy.wait_sessions(2, Duration::from_secs(30));
    let pid = proxy.pid();
    let answering =
        answer_everything(implementing_at(ejabberd.c2s, "a", std::slice::from_ref(&proxy)).await);
    let mut user = Client::login(
        ejabberd.c2s,
        "localhost",
        "user",
        "pw",
        "u",
        Answer::Nothing,
    )
    .await;
    let build = install_build(&binary(), &bin.join("jat-proxy"), 1);
    let mut tally = testkit::load::Tally::default();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut signalled = false;
    while start.elapsed() < Duration::from_secs(8) {
        tokio::select! {
            _ = tick.tick() => {
                let id = format!("U{}", tally.sent.len());
                user.send_xml(&request(&id));
                tally.sent.push((id, start.elapsed()));
            }
            Some(r) = user.recv_where(Duration::from_millis(2), |e| e.name() == "iq") => tally.take(r),
        }
        if !signalled && start.elapsed() >= Duration::from_secs(2) {
            proxy.signal("USR2");
            signalled = true;
        }
    }
    while tally.answers.len() < tally.sent.len() {
        match user
            .recv_where(Duration::from_secs(3), |e| e.name() == "iq")
            .await
        {
            Some(r) => tally.take(r),
            None => break,
        }
    }
    proxy.wait_sessions(3, WAIT);
    let log = proxy.log();
    assert_eq!(proxy.pid(), pid);
    assert!(
        lines_with(&log, "running build")
            .last()
            .is_some_and(|l| l.contains(&build)),
        "{log}"
    );
    // The plaintext stream went over; the TLS one was closed and logged in to anew.
    assert_eq!(lines_with(&log, "upgraded in place").len(), 1, "{log}");
    assert_eq!(lines_with(&log, "closing the TLS stream").len(), 1, "{log}");
    let (results, errors, lost) = tally.all();
    testkit::report(&format!(
        "ejabberd, a plaintext and a TLS stream: an upgrade under 50 requests/s: {} sent, \
         {results} results, errors {errors:?}, {} unanswered; from closing the TLS stream to \
         its new login: {:?} ms",
        tally.sent.len(),
        lost.len(),
        gap_ms(&log)
    ));
    assert!(
        errors.is_empty() && lost.is_empty(),
        "{errors:?} {lost:?}\n{log}"
    );
    answering.abort();
    drop(proxy);
    testkit::discard_work_dir(&bin, "binaries");
    testkit::discard_work_dir(&pki, "pki");
}
