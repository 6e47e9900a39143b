//! Monitoring end to end: a real Prosody, the real binary with `[metrics] listen`, a real
//! Prometheus scraping it, and hostile clients on the HTTP listener.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::client::reply_to;
use testkit::deployment::{Deployment, WAIT, request};
use testkit::http::{self, sample};
use testkit::ports::free_port;
use testkit::prometheus::{self, PROMTOOL, Prometheus};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus-alerts.yml")
}

/// A deployment whose jat-proxy serves `/metrics` and `/healthz` on a free loopback port.
fn deployment() -> (Deployment, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Deployment::start_with(&binary(), &format!("\n[metrics]\nlisten = \"{addr}\"\n"));
    let up = testkit::wait_until(WAIT, || http::get(addr, "/healthz"));
    assert!(up.is_some(), "no /healthz on {addr}:\n{}", d.proxy.log());
    (d, addr)
}

/// One request from `user`, forwarded to `imp`, answered, and the result back at `user`.
async fn round_trip(user: &mut testkit::Client, imp: &mut testkit::Client, id: &str) {
    user.send_xml(&request(id));
    let req = imp
        .recv_request(WAIT)
        .await
        .unwrap_or_else(|| panic!("{id} never reached the implementing client"));
    imp.send(reply_to(&req, "result", ""));
    let res = user
        .recv_iq(id, WAIT)
        .await
        .unwrap_or_else(|| panic!("{id} never answered"));
    assert_eq!(res.attr("type"), Some("result"), "{id}");
}

/// Polls `/healthz` until its status is `status` and its body contains `body`.
fn wait_health(addr: SocketAddr, status: u16, body: &str, limit: Duration) -> http::Response {
    let mut last = None;
    let found = testkit::wait_until(limit, || {
        let r = http::get(addr, "/healthz")?;
        let ok = r.status == status && r.body.contains(body);
        last = Some(r.clone());
        ok.then_some(r)
    });
    found.unwrap_or_else(|| {
        panic!("/healthz never answered {status} with {body} within {limit:?}; last: {last:?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_forwarded_and_reversed_counts() {
    prometheus::require();
    let (d, addr) = deployment();
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    let prom = Prometheus::start(&[addr], &[&rules_file()]);

    const N: usize = 25;
    for i in 0..N {
        round_trip(&mut user, &mut imp, &format!("m{i}")).await;
    }
    // What jat-proxy itself exposes once the last reply is through.
    let text = testkit::wait_until(WAIT, || {
        let r = http::get(addr, "/metrics")?;
        (sample(&r.body, "jat_proxy_replies_reversed_total") == Some(N as f64)).then_some(r.body)
    })
    .unwrap_or_else(|| panic!("the exposition never counted {N} replies"));
    assert_eq!(
        sample(&text, "jat_proxy_requests_forwarded_total"),
        Some(N as f64),
        "{text}"
    );
    // Every reversed reply's latency is observed, from the time sealed in its token (the
    // values depend on the machine: printed, not asserted).
    assert_eq!(
        sample(&text, "jat_proxy_reply_latency_seconds_count"),
        Some(N as f64),
        "{text}"
    );
    println!(
        "[measured] reply latency through Prosody and a test client: sum {:?} s over {N} replies",
        sample(&text, "jat_proxy_reply_latency_seconds_sum")
    );
    assert_eq!(sample(&text, "jat_proxy_session_up"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "jat_proxy_resources_online"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "jat_proxy_logins_total"), Some(1.0), "{text}");
    assert!(
        text.contains("jat_proxy_build_info{revision=\""),
        "build info: {text}"
    );

    // What Prometheus stored: scraped after the traffic, `up`, and the same counts.
    let wait = Duration::from_secs(60);
    let scraped = testkit::wait_until(wait, || {
        let f = prom.query("jat_proxy_requests_forwarded_total{job=\"jat-proxy\"}")?;
        let r = prom.query("jat_proxy_replies_reversed_total{job=\"jat-proxy\"}")?;
        (f == N as f64 && r == N as f64).then_some(())
    });
    assert!(
        scraped.is_some(),
        "Prometheus never stored forwarded = reversed = {N}: forwarded {:?}, reversed {:?}\n{}",
        prom.query("jat_proxy_requests_forwarded_total"),
        prom.query("jat_proxy_replies_reversed_total"),
        prom.log()
    );
    assert_eq!(prom.query("up{job=\"jat-proxy\"}"), Some(1.0));
    assert_eq!(prom.query("jat_proxy_session_up"), Some(1.0));
    assert_eq!(
        prom.query("jat_proxy_tokens_rejected_total{reason=\"authentication\"}"),
        Some(0.0)
    );

    // promtool accepts the exposition as it is served.
    let mut check = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And the alert rules in docs/monitoring.md, which Prometheus loaded above.
    let out = Command::new(PROMTOOL)
        .args(["check", "rules"])
        .arg(rules_file())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring.md"))
            .unwrap();
    assert!(
        doc.contains(&std::fs::read_to_string(rules_file()).unwrap()),
        "docs/monitoring.md's alert rules differ from deploy/prometheus-alerts.yml"
    );
    testkit::report(&format!(
        "Prometheus stored forwarded = reversed = {N} after {N} requests through Prosody"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rejections_are_counted_by_reason() {
    let (d, addr) = deployment();
    let mut imp = d.implementing("a").await;
    let user = d.client("user", "abc").await;
    user.send_xml(&request("t1"));
    let req = imp.recv_request(WAIT).await.expect("forwarded");
    // The same reply for another IQ id: the token is bound to the id, so it fails
    // authentication.
    let mut forged = reply_to(&req, "result", "");
    forged.attrs_mut().insert(
        rxml::Namespace::NONE,
        rxml::NcName::try_from("id").unwrap(),
        "other".to_owned(),
    );
    imp.send(forged);
    let counted = testkit::wait_until(WAIT, || {
        let r = http::get(addr, "/metrics")?;
        (sample(
            &r.body,
            "jat_proxy_tokens_rejected_total{reason=\"authentication\"}",
        ) == Some(1.0))
        .then_some(r.body)
    });
    assert!(counted.is_some(), "never counted:\n{}", d.proxy.log());
    // Other paths are not served.
    assert_eq!(http::get(addr, "/").map(|r| r.status), Some(404));
    assert_eq!(http::get(addr, "/metrics/x").map(|r| r.status), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_resources_and_the_server() {
    let (mut d, addr) = deployment();
    let limit = Duration::from_secs(20);
    // Logged in, nobody to serve the requests.
    let r = wait_health(addr, 503, "\"connected\":true", limit);
    assert!(r.body.contains("\"resources\":0"), "{r:?}");
    assert!(r.body.contains("\"key_id\":"), "{r:?}");
    let imp = d.implementing("a").await;
    let r = wait_health(addr, 200, "\"resources\":1", limit);
    assert!(r.body.contains("\"connected\":true"), "{r:?}");
    // The last resource leaves: 503; it comes back: 200.
    imp.close().await;
    wait_health(addr, 503, "\"resources\":0", limit);
    let _imp = d.implementing("a").await;
    wait_health(addr, 200, "\"resources\":1", limit);
    // The server goes (stopped by PID): 503, not connected.
    d.prosody.stop();
    let r = wait_health(addr, 503, "\"connected\":false", limit);
    assert!(r.body.contains("\"resources\":0"), "{r:?}");
    let text = http::get(addr, "/metrics")
        .expect("metrics while down")
        .body;
    assert_eq!(sample(&text, "jat_proxy_session_up"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "jat_proxy_reconnects_total"),
        Some(1.0),
        "{text}"
    );
    // It comes back: logged in again, and healthy once the implementing client is back.
    d.prosody.start_again();
    d.proxy.wait_sessions(2, Duration::from_secs(30));
    wait_health(addr, 503, "\"connected\":true", limit);
    let _imp = d.implementing("a").await;
    wait_health(addr, 200, "\"resources\":1", limit);
    let text = http::get(addr, "/metrics").expect("metrics").body;
    assert_eq!(sample(&text, "jat_proxy_logins_total"), Some(2.0), "{text}");
}

/// Connects to the listener and sends `bytes`, then reads until the server closes the
/// connection (or `limit` passes). Returns what was read and whether the server closed it.
fn send_and_read(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    let Ok(mut tcp) = TcpStream::connect(addr) else {
        return (Vec::new(), true);
    };
    tcp.set_read_timeout(Some(limit)).unwrap();
    // The server may close before reading it all (a header over its limit): that is fine.
    let _ = tcp.write_all(bytes);
    let mut out = Vec::new();
    // Closed: the end of the stream, or a reset (what it had not read was discarded).
    let closed = match tcp.read_to_end(&mut out) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    (out, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_never_disturbs_the_session() {
    let (d, addr) = deployment();
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "abc").await;
    // For comparison: the slowest of ten round trips without abuse.
    let mut quiet = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        round_trip(&mut user, &mut imp, &format!("before{i}")).await;
        quiet = quiet.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let attack = Duration::from_secs(8);
    let started = Instant::now();
    let mut attackers = Vec::new();
    // Garbage: random bytes, repeatedly.
    attackers.push(std::thread::spawn(move || {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rounds = 0;
        while started.elapsed() < attack {
            let junk: Vec<u8> = (0..65_536)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let (_, closed) = send_and_read(addr, &junk, Duration::from_secs(15));
            assert!(closed, "a connection of garbage was never closed");
            rounds += 1;
        }
        format!("{rounds} connections of 64 KiB garbage")
    }));
    // A 1 MiB header, repeatedly: refused (431) or cut off, never read whole.
    attackers.push(std::thread::spawn(move || {
        let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1 << 20));
        big.extend_from_slice(b"\r\n\r\n");
        let mut rounds = 0;
        while started.elapsed() < attack {
            let (out, closed) = send_and_read(addr, &big, Duration::from_secs(15));
            assert!(closed, "a 1 MiB header kept its connection open");
            let head = String::from_utf8_lossy(&out);
            assert!(
                out.is_empty() || head.starts_with("HTTP/1.1 431"),
                "a 1 MiB header was answered: {}",
                head.lines().next().unwrap_or("")
            );
            rounds += 1;
        }
        format!("{rounds} requests with a 1 MiB header")
    }));
    // Slowloris: more connections than the listener serves at once, each trickling a
    // header that never ends. Every one is closed by the server: when a newer connection
    // needs its slot (the oldest first), else within its header timeout.
    let mut slowloris = Vec::new();
    for n in 0..40 {
        slowloris.push(std::thread::spawn(move || {
            let Ok(mut tcp) = TcpStream::connect(addr) else {
                return Duration::ZERO;
            };
            tcp.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let header = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            let opened = Instant::now();
            let mut sent = 0;
            let mut buf = [0u8; 1024];
            loop {
                let byte = header.get(sent).copied().unwrap_or(b'a');
                if tcp.write_all(&[byte]).is_err() {
                    break;
                }
                sent += 1;
                match tcp.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
                assert!(
                    opened.elapsed() < Duration::from_secs(30),
                    "slowloris {n} kept its connection for 30 s"
                );
            }
            opened.elapsed()
        }));
    }
    // Meanwhile, and after: requests through the proxy are served, every one. Five a
    // second, within the sender's rate limit (10/s).
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    let mut next = Instant::now();
    while started.elapsed() < attack + Duration::from_secs(2) {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_millis(200);
        let t = Instant::now();
        round_trip(&mut user, &mut imp, &format!("during{served}")).await;
        slowest = slowest.max(t.elapsed());
        served += 1;
    }
    let mut reports = Vec::new();
    for a in attackers {
        reports.push(a.join().expect("an attacker's assertion failed"));
    }
    let held: Vec<Duration> = slowloris
        .into_iter()
        .map(|s| s.join().expect("a slowloris connection was never closed"))
        .collect();
    let at_once = held.iter().filter(|d| **d < Duration::from_secs(1)).count();
    let longest = held.iter().max().copied().unwrap_or_default();
    for i in 0..5 {
        round_trip(&mut user, &mut imp, &format!("after{i}")).await;
    }
    assert_eq!(d.proxy.sessions(), 1, "the XMPP session was never lost");
    // The listener serves again once the attackers are gone.
    wait_health(addr, 200, "\"resources\":1", Duration::from_secs(20));
    let text = http::get(addr, "/metrics")
        .expect("metrics after the attack")
        .body;
    assert_eq!(
        sample(&text, "jat_proxy_reconnects_total"),
        Some(0.0),
        "{text}"
    );
    testkit::report(&format!(
        "during {attack:?} of HTTP abuse ({}; {}; 40 slowloris connections: {at_once} closed \
         within 1 s, the others after {longest:.1?} at most): {served} requests served through the \
         proxy, slowest round trip {slowest:.1?} (without abuse: {quiet:.1?})",
        reports[0], reports[1],
    ));
}

/// One `GET /healthz` on a fresh connection: its status and the time from connecting until
/// the response's head had arrived, or why none did within `limit`.
fn health_within(addr: SocketAddr, limit: Duration) -> Result<(u16, Duration), String> {
    let t = Instant::now();
    let mut tcp = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    tcp.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = limit.saturating_sub(t.elapsed());
        if left.is_zero() {
            return Err(format!("no response within {limit:?}"));
        }
        tcp.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match tcp.read(&mut buf) {
            Ok(0) => return Err(format!("closed without a response after {:?}", t.elapsed())),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no response after {:?}: {e}", t.elapsed())),
        }
    }
    let elapsed = t.elapsed();
    let head = String::from_utf8_lossy(&raw);
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3)?.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
    Ok((status, elapsed))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether the server has closed `tcp` (non-blocking): the end of the stream, or an error.
fn is_closed(tcp: &mut TcpStream) -> bool {
    match tcp.read(&mut [0u8; 512]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn healthz_is_never_starved_by_idle_or_slow_connections() {
    const IDLE: usize = 200;
    const TRICKLING: usize = 20;
    const DEADLINE: Duration = Duration::from_secs(1);
    let (d, addr) = deployment();
    // The attacker, on one thread: 200 connections that never send a byte and 20 that send
    // one byte of a header every 500 ms, each opened again as soon as it is found closed
    // (every millisecond or so), until told to stop (30 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let attacker = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let connect = || {
                let tcp = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                tcp.set_nonblocking(true).ok()?;
                Some(tcp)
            };
            let header = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            let mut idle: Vec<Option<TcpStream>> = (0..IDLE).map(|_| connect()).collect();
            let mut trickling: Vec<(Option<TcpStream>, usize)> =
                (0..TRICKLING).map(|_| (connect(), 0)).collect();
            let _ = opened_tx.send(idle.iter().flatten().count());
            let started = Instant::now();
            let mut reopened = 0u64;
            let mut next_byte = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                for tcp in &mut idle {
                    if tcp.as_mut().is_none_or(is_closed) {
                        *tcp = connect();
                        reopened += 1;
                    }
                }
                let trickle = Instant::now() >= next_byte;
                if trickle {
                    next_byte += Duration::from_millis(500);
                }
                for (tcp, sent) in &mut trickling {
                    let alive = tcp.as_mut().is_some_and(|t| {
                        !is_closed(t)
                            && (!trickle
                                || t.write_all(&[header.get(*sent).copied().unwrap_or(b'a')])
                                    .is_ok())
                    });
                    if !alive {
                        (*tcp, *sent) = (connect(), 0);
                        reopened += 1;
                    } else if trickle {
                        *sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let open = idle.iter().flatten().count()
                + trickling.iter().filter(|(t, _)| t.is_some()).count();
            // Every socket is closed here, as `idle` and `trickling` are dropped.
            (reopened, open)
        }
    });
    let opened = opened_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the attacker never opened its connections");
    // Let the attack settle: every slot of the listener taken, the rest reopening.
    std::thread::sleep(Duration::from_millis(500));
    let mut checks = Vec::new();
    for _ in 0..3 {
        checks.push(health_within(addr, DEADLINE));
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let (reopened, open) = attacker.join().expect("the attacker panicked");
    testkit::report(&format!(
        "/healthz beside {IDLE} idle and {TRICKLING} trickling connections ({opened} idle ones \
         connected at first, {reopened} reopened after the server closed them, {open} open at \
         the end): {checks:?}"
    ));
    for (i, check) in checks.iter().enumerate() {
        assert!(
            check.is_ok(),
            "health check {i} got no response within {DEADLINE:?}: {check:?}; the proxy's \
             log ends:\n{}",
            tail(&d.proxy.log(), 20)
        );
    }
}
