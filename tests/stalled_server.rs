//! A server that stops reading must not hang the session, and SIGTERM must still end the
//! process. No real server can be told to stop reading while it keeps sending, so this test
//! plays the server itself on a loopback socket: it logs the component in as Prosody would,
//! then sends presence probes (each answered by jat-proxy) and never reads again.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::deployment::COMPONENT;
use testkit::proxy::{ConfigSpec, ProxyProcess, write_config};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// Reads until `needle` has been seen.
fn read_until(s: &mut TcpStream, needle: &[u8]) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut buf).expect("read from jat-proxy");
        assert!(n > 0, "jat-proxy closed the connection during login");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Accepts jat-proxy, logs it in, then floods it with probes from a thread without ever
/// reading again. Returns the flag that stops the flood.
fn accept_and_stall(listener: &TcpListener) -> Arc<AtomicBool> {
    let (mut s, _) = listener.accept().expect("jat-proxy connects");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_until(&mut s, format!("to='{COMPONENT}'>").as_bytes());
    s.write_all(
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' id='stall' from='{COMPONENT}'>"
        )
        .as_bytes(),
    )
    .unwrap();
    read_until(&mut s, b"</handshake>");
    s.write_all(b"<handshake/>").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let probe = format!("<presence type='probe' from='impl@localhost/a' to='{COMPONENT}'/>")
            .repeat(1000);
        let started = Instant::now();
        // Bounded: at most 60 s and 200 MB, whatever happens.
        let (mut sent, mut at) = (0usize, 0usize);
        while !flag.load(Ordering::Relaxed)
            && started.elapsed() < Duration::from_secs(60)
            && sent < 200 << 20
        {
            // A partial write goes on where it stopped: the stream stays well-formed.
            match s.write(&probe.as_bytes()[at..]) {
                Ok(n) => {
                    sent += n;
                    at = (at + n) % probe.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        // Keeps the socket open (and unread) until told to stop.
        while !flag.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    stop
}

#[test]
fn a_server_that_stops_reading_ends_the_session_and_sigterm_still_exits() {
    let dir = testkit::work_dir("stall");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let keys = dir.join("keys.toml");
    let config = write_config(
        &dir,
        "c.toml",
        &ConfigSpec {
            component: COMPONENT,
            server: listener.local_addr().unwrap(),
            also: &[],
            secret: "s",
            target: "impl@localhost",
            key_file: &keys,
            proxy_extra: "",
            extra: "",
        },
    );
    // Writes time out after keepalive_timeout_secs.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "reconnect_max_secs = 2",
        "reconnect_max_secs = 2\nkeepalive_timeout_secs = 2",
    );
    std::fs::write(&config, text).unwrap();
    let mut proxy = ProxyProcess::start(&binary(), &config);

    // 1. The session is given up when the server takes nothing for the write timeout.
    let stop = accept_and_stall(&listener);
    let stalled = Instant::now();
    let lost = testkit::wait_until(Duration::from_secs(60), || {
        proxy
            .log()
            .lines()
            .find(|l| l.contains("session lost") && l.contains("took nothing"))
            .map(str::to_owned)
    });
    stop.store(true, Ordering::Relaxed);
    let lost = lost.unwrap_or_else(|| panic!("the session hung:\n{}", proxy.log()));
    testkit::report(&format!(
        "stalled server: session given up {:.1} s after the flood began ({lost})",
        stalled.elapsed().as_secs_f64()
    ));

    // 2. It reconnects; stalled again, SIGTERM still ends the process.
    let stop = accept_and_stall(&listener);
    // Its answers stop flowing once the socket buffers are full (whether they are already is
    // not asserted: SIGTERM must end it either way).
    std::thread::sleep(Duration::from_secs(1));
    let signalled = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let status = status.unwrap_or_else(|| panic!("SIGTERM did not end it:\n{}", proxy.log()));
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
    testkit::report(&format!(
        "stalled server: SIGTERM ended the process in {:.1} s",
        signalled.elapsed().as_secs_f64()
    ));
    testkit::discard_work_dir(&dir, "stall");
}

/// With several servers listed, one that stops reading (and floods), one that is down and
/// one that accepts connections but never answers do not hold up the stream to a real
/// server: every request through Prosody is answered while the stalled stream's output
/// waits (for up to its write timeout, 30 s here), and the dead ones are retried on their
/// own. With one stream awaited after another, each request would wait for the stalled
/// server's write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_dead_server_in_the_list_does_not_hold_up_the_others() {
    let stalling = TcpListener::bind("127.0.0.1:0").unwrap();
    let stall_addr = stalling.local_addr().unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let flood = std::thread::spawn(move || accept_and_stall(&stalling));
    let d = testkit::deployment::Deployment::start_listing(
        &binary(),
        &[stall_addr, closed, silent.local_addr().unwrap()],
        "",
        // One user sends requests back to back: no rate limit in the way.
        "\n[limits]\nrate_per_sender = 100000.0\nrate_burst = 100000\n",
    );
    let stop = flood
        .join()
        .expect("the stalling server logged jat-proxy in");
    let stalled = Instant::now();
    let mut imp = d.implementing("a").await;
    let mut user = d.client("user", "u").await;
    let n = 200;
    let mut slowest = (Duration::ZERO, 0);
    for i in 0..n {
        let id = format!("m{i}");
        let sent = Instant::now();
        user.send_xml(&testkit::deployment::request(&id));
        let req = imp
            .recv_request(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("request {id} never forwarded:\n{}", d.proxy.log()));
        imp.send(testkit::client::reply_to(&req, "result", ""));
        let r = user
            .recv_iq(&id, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("request {id} never answered:\n{}", d.proxy.log()));
        assert_eq!(
            r.attr("type"),
            Some("result"),
            "{}",
            testkit::client::xml(&r)
        );
        slowest = slowest.max((sent.elapsed(), i));
    }
    let log = d.proxy.log();
    let still_stalled = !log
        .lines()
        .any(|l| l.contains("session lost") && l.contains(&stall_addr.to_string()));
    stop.store(true, Ordering::Relaxed);
    let refused = format!("server={closed}");
    assert!(
        log.lines()
            .any(|l| l.contains("cannot log in") && l.contains(&refused)),
        "the server that is down is tried:\n{log}"
    );
    testkit::report(&format!(
        "several servers: {n} requests through Prosody answered while another listed server \
         took nothing we sent ({:.1} s into it, its stream {}), one was down and one never \
         answered; slowest round trip {:.1?} (request {} of {n})",
        stalled.elapsed().as_secs_f64(),
        if still_stalled {
            "still waiting for its write timeout"
        } else {
            "already given up"
        },
        slowest.0,
        slowest.1 + 1
    ));
}
