//! The connection protocol on a fake clock, byte for byte: logins, keepalives, stalls,
//! failover, backoff, shutdown, probes, key polls, upgrades, and a random walk of inputs.

use super::*;
use crate::proxy::{Balance, Selection};
use crate::random::SeededRandom;

const UNIX: u64 = 1_790_000_000_000;
const MONO: u64 = 5_000_000;
const INTERVAL: u64 = 30_000;
const TIMEOUT: u64 = 10_000;
const PROBE: u64 = 600_000;
const KEYS: u64 = 60_000;

const HEADER_OUT: &str = "<?xml version='1.0' encoding='utf-8'?>\n<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='proxy.example'>";
const HEADER_IN: &str = "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' id='abc' from='proxy.example'>";
/// SHA-1 of `abc` and `secret`.
const HANDSHAKE: &str = "<handshake>de0a408ef519cd62e7379039634152874895c50c</handshake>";
const PROBE_OUT: &str = "<presence from='proxy.example' to='impl@example' type='probe'></presence>";
const SUBSCRIBE_OUT: &str =
    "<presence from='proxy.example' to='impl@example' type='subscribe'></presence>";

fn core() -> crate::proxy::Settings {
    crate::proxy::Settings {
        rate: crate::rate::RateLimit {
            per_second: 1000.0,
            burst: 1000.0,
            max_senders: 100,
            per_domain: 1000.0,
            domain_burst: 1000.0,
        },
        policy: crate::policy::Policy::default(),
        selection: Selection {
            balance: Balance::Sticky,
            patterns: vec![],
        },
        ..crate::proxy::Settings::example()
    }
}

fn settings(servers: usize) -> Settings {
    Settings {
        jid: "proxy.example".into(),
        secret: zeroize::Zeroizing::new("secret".into()),
        servers: (0..servers)
            .map(|i| crate::config::Server::plain(format!("node{i}:5347")))
            .collect(),
        limits: Limits::default(),
        keepalive_interval_ms: INTERVAL,
        keepalive_timeout_ms: TIMEOUT,
        reconnect_max: Duration::from_secs(60),
        probe_interval_ms: PROBE,
        key_poll_ms: KEYS,
        watchdog_ms: None,
        binary: "/usr/bin/jat-proxy".into(),
        build: crate::upgrade::BuildId::fixed("0123456789ab"),
    }
}

fn keys() -> KeySet {
    KeySet::from_secrets(&[(1, 0, [7; 32])]).unwrap()
}

/// An endpoint, its clock, and the events it gave.
struct T {
    ep: Endpoint,
    now: Clock,
    events: Vec<Event>,
}

impl T {
    fn new(servers: usize) -> T {
        T::with(settings(servers), core())
    }

    fn with(s: Settings, core: crate::proxy::Settings) -> T {
        let now = Clock {
            unix_ms: UNIX,
            mono_ms: MONO,
        };
        let ep = Endpoint::new(s, core, keys(), Box::new(SeededRandom::new(7)), now);
        let mut t = T {
            ep,
            now,
            events: Vec::new(),
        };
        t.collect();
        t
    }

    fn collect(&mut self) {
        while let Some(e) = self.ep.poll_event() {
            self.events.push(e);
        }
    }

    /// The events since the last call.
    fn take_events(&mut self) -> Vec<Event> {
        self.collect();
        std::mem::take(&mut self.events)
    }

    fn set(&mut self, mono: u64) {
        assert!(mono >= self.now.mono_ms);
        self.now.unix_ms += mono - self.now.mono_ms;
        self.now.mono_ms = mono;
    }

    /// Lets `ms` pass, handling every timer when due; every timer handled moves past now.
    fn advance(&mut self, ms: u64) {
        let target = self.now.mono_ms + ms;
        while let Some(t) = self.ep.poll_timeout()
            && t <= target
        {
            self.set(t.max(self.now.mono_ms));
            self.ep.handle_timeout(self.now);
            let next = self.ep.poll_timeout();
            assert!(
                next.is_none_or(|n| n > self.now.mono_ms),
                "a timer at {next:?} still due at {}",
                self.now.mono_ms
            );
            self.collect();
        }
        self.set(target);
    }

    /// Everything waiting on `link`, written whole.
    fn written(&mut self, link: LinkId) -> String {
        let out = String::from_utf8(self.ep.poll_transmit(link).to_vec()).unwrap();
        self.ep.wrote(link, out.len(), self.now);
        self.collect();
        out
    }

    fn server(&mut self, link: LinkId, xml: &str) {
        self.ep.read(link, xml.as_bytes(), self.now);
        self.collect();
    }

    /// Link `link` logs in (it must be due to connect now).
    fn login(&mut self, link: LinkId) {
        self.advance(0);
        assert!(
            self.events
                .iter()
                .any(|e| matches!(e, Event::Connect { link: l, .. } if *l == link)),
            "{:?}",
            self.events
        );
        self.ep.connected(link, self.now);
        assert_eq!(self.written(link), HEADER_OUT);
        self.server(link, HEADER_IN);
        assert_eq!(self.written(link), HANDSHAKE);
        self.server(link, "<handshake/>");
        assert!(self.ep.links[link].is_up());
    }

    fn has(&mut self, f: impl Fn(&Event) -> bool) -> bool {
        self.collect();
        self.events.iter().any(f)
    }
}

fn iq(id: &str) -> String {
    format!(
        "<iq type='get' id='{id}' from='user@example/a' to='proxy.example'><query xmlns='jabber:iq:version'/></iq>"
    )
}

fn unavailable(id: &str) -> String {
    format!(
        "<iq from='proxy.example' id='{id}' to='user@example/a' type='error'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'></service-unavailable><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>the service is not available</text></error></iq>"
    )
}

#[test]
fn login_byte_for_byte() {
    let mut t = T::new(1);
    assert_eq!(t.ep.poll_timeout(), Some(MONO));
    t.login(0);
    let ev = t.take_events();
    assert!(ev.iter().any(|e| matches!(e, Event::LoggedIn { link: 0 })));
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::SessionUp { established_ms } if *established_ms == UNIX))
    );
    assert!(ev.iter().any(|e| matches!(e, Event::Notify(Notify::Ready(s)) if s == "connected to node0:5347 as proxy.example; 0 resource(s) of impl@example online; key 1")));
    assert_eq!(t.written(0), format!("{PROBE_OUT}{SUBSCRIBE_OUT}"));
    // A request answered on its stream (and, refused for want of a resource, a probe).
    t.server(0, &iq("1"));
    assert_eq!(t.written(0), format!("{}{PROBE_OUT}", unavailable("1")));
}

#[test]
fn login_refused_and_backoff() {
    let mut t = T::new(1);
    t.advance(0);
    t.ep.connected(0, t.now);
    t.written(0);
    t.server(0, HEADER_IN);
    t.written(0);
    t.take_events();
    t.server(
        0,
        "<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
    );
    let ev = t.take_events();
    let why = ev
        .iter()
        .find_map(|e| match e {
            Event::LoginFailed { why, .. } => Some(why.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        why.to_string(),
        "server refused the handshake: not-authorized"
    );
    assert!(ev.iter().any(|e| matches!(e, Event::Close { link: 0 })));
    // Retried after 250 to 500 ms, then after longer and longer.
    let mut last = 0;
    for n in 0..6 {
        let retry = t.ep.poll_timeout().unwrap() - t.now.mono_ms;
        let ceiling = (500u64 << n).min(60_000);
        assert!(retry >= ceiling / 2 && retry <= ceiling, "{n}: {retry}");
        assert!(retry >= last / 2);
        last = retry;
        t.advance(retry);
        assert!(t.has(|e| matches!(e, Event::Connect { .. })));
        t.ep.closed(
            0,
            Io::Connect("Connection refused (os error 111)".into()),
            t.now,
        );
        let ev = t.take_events();
        assert!(ev.iter().any(|e| matches!(e, Event::LoginFailed { why, .. } if why.to_string() == "Connection refused (os error 111)")));
    }
}

#[test]
fn login_times_out_after_15_s_even_while_writing() {
    let mut t = T::new(1);
    t.advance(0);
    t.ep.connected(0, t.now);
    // The server takes nothing: no stall timer during the login, only its deadline.
    t.ep.wrote(0, 0, t.now);
    t.take_events();
    assert_eq!(t.ep.poll_timeout(), Some(MONO + 15_000));
    t.advance(14_999);
    assert!(t.take_events().is_empty());
    t.advance(1);
    let ev = t.take_events();
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::LoginFailed {
            why: LoginError::TimedOut,
            ..
        }
    )));
    assert!(ev.iter().any(|e| matches!(e, Event::Close { link: 0 })));
    assert_eq!(LoginError::TimedOut.to_string(), "login timed out");
}

#[test]
fn a_connect_that_never_finishes_times_out_too() {
    let mut t = T::new(1);
    t.advance(15_000);
    assert!(t.has(|e| matches!(
        e,
        Event::LoginFailed {
            why: LoginError::TimedOut,
            ..
        }
    )));
}

#[test]
fn keepalive_ping_after_idle_and_lost_without_answer() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.take_events();
    t.advance(INTERVAL - 1);
    assert_eq!(t.written(0), "");
    t.advance(1);
    assert_eq!(
        t.written(0),
        "<iq from='proxy.example' id='jat-ping-1' to='example' type='get'><ping xmlns='urn:xmpp:ping'></ping></iq>"
    );
    // An answer (any byte) resets the idle clock.
    t.server(
        0,
        "<iq type='result' id='jat-ping-1' from='example' to='proxy.example'/>",
    );
    t.advance(TIMEOUT);
    assert!(t.ep.links[0].is_up());
    t.advance(INTERVAL - TIMEOUT);
    assert!(t.written(0).contains("jat-ping-2"));
    t.advance(TIMEOUT - 1);
    assert!(t.ep.links[0].is_up());
    t.take_events();
    t.advance(1);
    let ev = t.take_events();
    let why = ev
        .iter()
        .find_map(|e| match e {
            Event::StreamLost { why, .. } => Some(why.to_string()),
            _ => None,
        })
        .unwrap();
    assert_eq!(why, "no answer to a keepalive ping within 10 s");
    assert!(ev.iter().any(|e| matches!(e, Event::SessionDown)));
}

#[test]
fn a_ping_behind_waiting_output_is_judged_by_the_stall_timer() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.advance(INTERVAL);
    // The ping waits; the server takes a little every few seconds: never lost.
    for _ in 0..10 {
        t.ep.wrote(0, 1, t.now);
        t.advance(TIMEOUT - 1);
        assert!(t.ep.links[0].is_up());
    }
}

#[test]
fn stall_only_when_output_waits_and_the_server_takes_nothing() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    // Idle with nothing waiting and reads coming in: never a stall.
    for _ in 0..10 {
        t.advance(INTERVAL - 1);
        t.server(0, "<presence from='impl@example/a' to='proxy.example'/>");
    }
    assert!(t.ep.links[0].is_up());
    // Output waits; the server takes some: no stall while it does.
    t.server(0, &iq("1"));
    t.ep.wrote(0, 0, t.now);
    t.advance(TIMEOUT - 1);
    t.ep.wrote(0, 3, t.now);
    t.advance(TIMEOUT - 1);
    assert!(t.ep.links[0].is_up());
    t.take_events();
    t.advance(1);
    let ev = t.take_events();
    assert!(ev.iter().any(|e| matches!(e, Event::StreamLost { why, .. } if why.to_string() == "the server took nothing we sent for 10 s")));
}

#[test]
fn too_much_waiting_gives_the_stream_up() {
    let mut t = T::new(1);
    t.login(0);
    t.take_events();
    let probe = t.ep.proxy.probe();
    while t.ep.poll_transmit(0).len() <= MAX_UNSENT {
        t.ep.queue(0, &probe);
    }
    // Reading paused long before.
    assert!(!t.ep.wants_read(0));
    t.ep.wrote(0, 0, t.now);
    assert!(t.has(|e| matches!(
        e,
        Event::StreamLost {
            why: StreamLost::TooMuchWaiting(_),
            ..
        }
    )));
}

#[test]
fn failover_moves_the_elements_the_server_cannot_have_whole() {
    let mut t = T::new(2);
    t.login(0);
    t.login(1);
    t.written(0);
    t.written(1);
    t.take_events();
    t.server(0, &iq("1"));
    t.server(0, &iq("2"));
    t.server(0, &iq("3"));
    let first = unavailable("1");
    // The first written whole and 5 bytes of the second.
    t.ep.wrote(0, first.len() + 5, t.now);
    t.ep.closed(0, Io::Eof, t.now);
    let ev = t.take_events();
    assert!(ev.iter().any(|e| matches!(e, Event::StreamLost { link: 0, why } if why.to_string() == "connection closed")));
    assert!(!ev.iter().any(|e| matches!(e, Event::SessionDown)));
    // Link 1 had the probe that followed the first refusal (it had least waiting).
    assert_eq!(
        t.written(1),
        format!(
            "{PROBE_OUT}{}{}{PROBE_OUT}",
            unavailable("2"),
            unavailable("3")
        )
    );
    assert_eq!(t.ep.poll_transmit(0), b"");
}

#[test]
fn what_the_core_sends_on_its_own_goes_on_the_least_busy_stream() {
    let mut s = settings(2);
    s.probe_interval_ms = 5_000;
    let mut t = T::with(s, core());
    let probe_at = t.ep.next_probe;
    let jitter = probe_at - MONO;
    assert!((4_000..=6_000).contains(&jitter), "{jitter}");
    t.login(0);
    t.login(1);
    t.written(0);
    // Link 1 still has its probe and subscribe waiting: the periodic probe goes on link 0.
    t.advance(probe_at - t.now.mono_ms);
    assert_eq!(t.written(0), PROBE_OUT);
    let next = t.ep.next_probe - t.now.mono_ms;
    assert!((4_000..=6_000).contains(&next), "{next}");
    // Both idle: the first listed.
    t.written(1);
    t.advance(next);
    assert_eq!(t.written(0), PROBE_OUT);
    assert_eq!(t.written(1), "");
}

#[test]
fn a_stable_session_resets_the_backoff() {
    let mut t = T::new(1);
    // Three failures: the ceiling is 4 s.
    for _ in 0..3 {
        let at = t.ep.poll_timeout().unwrap();
        t.advance(at - t.now.mono_ms);
        t.ep.closed(0, Io::Connect("refused".into()), t.now);
    }
    let at = t.ep.poll_timeout().unwrap();
    t.advance(at - t.now.mono_ms);
    t.login(0);
    t.written(0);
    // Lost after 29 s: no reset (the fourth delay: 2 to 4 s).
    t.advance(29_000);
    t.ep.closed(0, Io::Eof, t.now);
    let retry = t.ep.poll_timeout().unwrap() - t.now.mono_ms;
    assert!(retry >= 2_000, "{retry}");
    t.advance(retry);
    t.login(0);
    t.written(0);
    t.advance(30_000 - 1);
    t.server(0, " ");
    t.advance(1);
    t.ep.closed(0, Io::Eof, t.now);
    let retry = t.ep.poll_timeout().unwrap() - t.now.mono_ms;
    assert!(retry < 500, "{retry}");
}

#[test]
fn stop_drains_answers_and_closes_with_footers() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.take_events();
    t.ep.signal(Signal::Terminate, t.now);
    let ev = t.take_events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Notify(Notify::Stopping(s)) if s == "closing the stream"))
    );
    assert!(ev.iter().any(|e| matches!(e, Event::Drain { link: 0 })));
    assert!(t.ep.draining(0));
    // What the socket holds is read and answered.
    t.server(0, &iq("1"));
    t.ep.drained(0, t.now);
    assert_eq!(
        t.written(0),
        format!("{}{PROBE_OUT}</stream:stream>", unavailable("1"))
    );
    let ev = t.take_events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::ShutdownWrite { link: 0 }))
    );
    // A stanza routed after our footer is dropped (counted); the server's footer ends it.
    t.server(0, &iq("2"));
    assert!(!t.has(|e| matches!(e, Event::Stopped)));
    t.server(0, "</stream:stream>");
    assert!(t.has(|e| matches!(e, Event::Close { link: 0 })));
    assert!(t.has(|e| matches!(e, Event::Stopped)));
    assert_eq!(t.ep.poll_timeout(), None);
}

#[test]
fn stop_is_bounded_drain_1_s_write_5_s_footer_2_s() {
    // The drain: 1 s at most.
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.ep.signal(Signal::Interrupt, t.now);
    t.advance(999);
    assert!(t.ep.draining(0));
    t.advance(1);
    assert!(!t.ep.draining(0));
    // Our footer: written within 5 s, or the stream is closed.
    t.take_events();
    t.ep.wrote(0, 0, t.now);
    t.advance(4_999);
    assert!(!t.has(|e| matches!(e, Event::Stopped)));
    t.advance(1);
    assert!(t.has(|e| matches!(e, Event::Stopped)));

    // The server's footer: awaited 2 s.
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.ep.signal(Signal::Terminate, t.now);
    t.ep.drained(0, t.now);
    t.written(0);
    t.advance(1_999);
    assert!(!t.has(|e| matches!(e, Event::Stopped)));
    t.advance(1);
    assert!(t.has(|e| matches!(e, Event::Stopped)));

    // Not connected: stopped at once.
    let mut t = T::new(2);
    t.advance(0);
    t.ep.signal(Signal::Terminate, t.now);
    let ev = t.take_events();
    assert!(ev.iter().any(
        |e| matches!(e, Event::Notify(Notify::Stopping(s)) if s == "stopped while not connected")
    ));
    assert!(ev.iter().any(|e| matches!(e, Event::Stopped)));
}

#[test]
fn the_drain_limit_counts_bytes_that_complete_no_stanza() {
    // A large element streaming in at shutdown: 4 MiB of it, no more, is read.
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.ep.signal(Signal::Terminate, t.now);
    t.server(
        0,
        "<iq type='get' id='big' from='user@example/a' to='proxy.example'><q xmlns='urn:x'>",
    );
    let chunk = "x".repeat(64 * 1024);
    let mut read = 0;
    while t.ep.draining(0) {
        assert!(read <= DRAIN_BYTES, "still draining after {read} bytes");
        t.server(0, &chunk);
        read += chunk.len();
    }
    assert!(read >= DRAIN_BYTES - chunk.len(), "{read}");
}

#[test]
fn an_upgrade_under_way_at_shutdown_is_dropped_without_a_ready() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.ep.signal(Signal::Upgrade, t.now);
    assert!(t.has(|e| matches!(e, Event::CheckUpgrade)));
    t.ep.signal(Signal::Terminate, t.now);
    t.take_events();
    // The check ends while the stream closes, slowly (the drain takes its 1 s, the server
    // takes nothing of our footer for 5 s): nothing more of the upgrade meanwhile.
    t.ep.upgrade_checked(Ok(vec![1, 2]), t.now);
    t.ep.wrote(0, 0, t.now);
    t.advance(10_000);
    let ev = t.take_events();
    assert!(
        !ev.iter()
            .any(|e| matches!(e, Event::Notify(Notify::Ready(_)) | Event::HandOver(_))),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(e, Event::Stopped)));
}

#[test]
fn keys_are_polled_and_reloaded_on_sighup() {
    let mut t = T::new(1);
    t.advance(0);
    assert!(t.has(|e| matches!(e, Event::ReadKeys { force: false })));
    t.take_events();
    t.ep.closed(0, Io::Connect("x".into()), t.now);
    t.advance(KEYS - 1);
    assert!(!t.has(|e| matches!(e, Event::ReadKeys { .. })));
    t.advance(1);
    assert!(t.has(|e| matches!(e, Event::ReadKeys { force: false })));
    t.ep.signal(Signal::Reload, t.now);
    assert!(t.has(|e| matches!(e, Event::ReadKeys { force: true })));
    t.take_events();
    t.ep.set_keys(KeySet::from_secrets(&[(2, 5, [8; 32])]).unwrap(), t.now);
    assert!(t.has(|e| matches!(e, Event::Key { id: 2, created: 5 })));
}

#[test]
fn upgrade_hands_over_at_an_element_boundary() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.server(0, "<presence from='impl@example/a' to='proxy.example'/>");
    t.take_events();
    t.ep.signal(Signal::Upgrade, t.now);
    let ev = t.take_events();
    assert!(ev.iter().any(|e| matches!(e, Event::CheckUpgrade)));
    t.ep.signal(Signal::Upgrade, t.now);
    assert!(
        !t.has(|e| matches!(e, Event::CheckUpgrade)),
        "already under way"
    );
    // An answer waits to be written: not yet (half an element read does not hold it up:
    // its bytes are handed over).
    t.server(
        0,
        "<iq type='get' id='9' from='user@example/a' to='proxy.example'/><iq",
    );
    t.ep.upgrade_checked(Ok(vec![1, 2]), t.now);
    assert!(!t.has(|e| matches!(e, Event::HandOver(_))), "output waits");
    t.written(0);
    let ev = t.take_events();
    let h = ev
        .iter()
        .find_map(|e| match e {
            Event::HandOver(h) => Some(h),
            _ => None,
        })
        .unwrap();
    assert_eq!(h.links, vec![0]);
    let (format, bytes) = h.record.clone().unwrap();
    assert_eq!(format, 1);
    let record = crate::upgrade::Record::decode(&bytes).unwrap();
    assert_eq!(record.component, "proxy.example");
    assert_eq!(record.resources, vec!["a".to_string()]);
    assert_eq!(record.build, "0123456789ab");
    assert_eq!(record.streams[0].server, "node0:5347");
    assert_eq!(record.streams[0].header, HEADER_IN.as_bytes());
    assert_eq!(record.streams[0].pending, b"<iq");
    assert_eq!(record.streams[0].established_unix_ms, UNIX);
    assert_eq!(record.streams[0].upgrades, 1);

    // The exec failed: serving on, a new upgrade may start.
    t.ep.upgrade_failed(t.now);
    t.server(
        0,
        " type='get' id='10' from='user@example/a' to='proxy.example'/>",
    );
    t.ep.signal(Signal::Upgrade, t.now);
    assert!(t.has(|e| matches!(e, Event::CheckUpgrade)));
}

#[test]
fn an_upgrade_that_never_finds_a_handover_point_is_abandoned() {
    let mut t = T::new(1);
    t.login(0);
    t.written(0);
    t.take_events();
    t.ep.signal(Signal::Upgrade, t.now);
    // The server takes nothing of the answer: never a handover point.
    let request = iq("1");
    let (a, b) = request.split_at(20);
    t.server(0, a);
    t.server(0, b);
    t.ep.upgrade_checked(Ok(vec![2]), t.now);
    t.advance(4_999);
    assert!(!t.has(|e| matches!(e, Event::HandOver(_))));
    assert!(matches!(t.ep.upgrade, Upgrade::Waiting { .. }));
    t.advance(1);
    assert_eq!(t.ep.upgrade, Upgrade::Idle);
    // Nothing lost: the answer goes out, and the stream serves on.
    assert_eq!(t.written(0), format!("{}{PROBE_OUT}", unavailable("1")));
    t.server(0, &iq("2"));
    assert_eq!(t.written(0), format!("{}{PROBE_OUT}", unavailable("2")));
}

#[test]
fn an_upgrade_refused_by_the_check_or_the_formats() {
    let mut t = T::new(2);
    t.login(0);
    t.login(1);
    t.take_events();
    t.ep.signal(Signal::Upgrade, t.now);
    // Two streams, and the new build reads format 1 only.
    t.ep.upgrade_checked(Ok(vec![1]), t.now);
    assert_eq!(t.ep.upgrade, Upgrade::Idle);
    t.ep.signal(Signal::Upgrade, t.now);
    t.ep.upgrade_checked(Err("broken".into()), t.now);
    assert_eq!(t.ep.upgrade, Upgrade::Idle);
    // Not connected: the handover is an exec without streams.
    let mut t = T::new(1);
    t.advance(0);
    t.ep.signal(Signal::Upgrade, t.now);
    t.ep.upgrade_checked(Ok(vec![2]), t.now);
    assert!(t.has(
        |e| matches!(e, Event::HandOver(HandOver { links, record: None }) if links.is_empty())
    ));
    t.take_events();
    t.ep.upgrade_failed(t.now);
    assert!(t.has(|e| matches!(e, Event::Notify(Notify::Ready(s)) if s == "not connected")));
}

#[test]
fn a_resumed_stream_is_served_at_once() {
    let mut t = T::new(1);
    let history = History {
        established_ms: UNIX - 60_000,
        upgrades: 1,
    };
    let link =
        t.ep.resume(
            "node0:5347",
            HEADER_IN.as_bytes(),
            iq("1").as_bytes(),
            history,
            t.now,
        )
        .unwrap();
    assert_eq!(link, Some(0));
    t.ep.resumed(&["a".into()], t.now);
    assert!(t.has(
        |e| matches!(e, Event::SessionUp { established_ms } if *established_ms == UNIX - 60_000)
    ));
    let out = t.written(0);
    assert!(out.starts_with(PROBE_OUT), "{out}");
    assert!(out.contains("to='impl@example/a'"), "forwarded: {out}");
    assert!(!t.has(|e| matches!(e, Event::Connect { .. })));
}

#[test]
fn log_texts_are_those_of_before() {
    assert_eq!(StreamLost::Closed.to_string(), "server closed the stream");
    assert_eq!(
        StreamLost::TooMuchWaiting(9).to_string(),
        "the server takes too little of what we send (9 bytes wait)"
    );
    assert_eq!(Io::WriteZero.to_string(), "cannot send: connection closed");
    assert_eq!(Io::Read("x".into()).to_string(), "cannot read: x");
    assert_eq!(LoginError::Eof.to_string(), "unexpected end of file");
    assert_eq!(
        StreamLost::StreamError("conflict".into()).to_string(),
        "stream error from server: conflict"
    );
}

/// Random inputs: no panic, every timer handled moves past now, and no element is lost or
/// sent twice by a failover.
#[test]
fn a_random_walk_keeps_the_invariants() {
    use crate::random::Random;
    for seed in 0..40 {
        let mut rng = SeededRandom::new(seed);
        let mut t = T::new(3);
        let mut next_id = 0u64;
        let mut asked = std::collections::BTreeSet::new();
        let mut answered: Vec<String> = Vec::new();
        for _ in 0..400 {
            let link = rng.below(3);
            match rng.below(10) {
                0 => t.advance(rng.below(40_000) as u64),
                1 => {
                    if matches!(t.ep.links[link].state, State::Connecting { .. }) {
                        t.ep.connected(link, t.now);
                    }
                }
                2 => t.ep.closed(link, Io::Eof, t.now),
                3 => {
                    if t.ep.links[link]
                        .open()
                        .is_some_and(|o| matches!(o.phase, Phase::Login { .. }))
                    {
                        t.server(link, HEADER_IN);
                        t.server(link, "<handshake/>");
                    }
                }
                4..=6 => {
                    if t.ep.links[link].is_up() {
                        next_id += 1;
                        asked.insert(next_id.to_string());
                        t.server(link, &iq(&next_id.to_string()));
                    }
                }
                _ => {
                    let pending = t.ep.poll_transmit(link).to_vec();
                    let n = rng.below(pending.len() + 1);
                    answered.push(String::from_utf8_lossy(&pending[..n]).into_owned());
                    t.ep.wrote(link, n, t.now);
                }
            }
            t.collect();
        }
        // Every answer written whole at most once.
        let all: String = answered.concat();
        for id in &asked {
            let whole = unavailable(id);
            assert!(all.matches(&whole).count() <= 1, "seed {seed}: {id} twice");
        }
    }
}

// ---- TLS (`tls = true`): the layer against an in-memory rustls server ----

mod pki {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::RootCertStore;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A throwaway CA and a server certificate it issued for `names`.
    pub(super) struct Pki {
        pub(super) roots: RootCertStore,
        pub(super) server: Arc<rustls::ServerConfig>,
    }

    pub(super) fn pki(names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Each CA a name of its own (webpki looks issuers up by name).
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca.distinguished_name
            .push(DnType::CommonName, format!("test CA {n}"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Pki {
            roots,
            server: Arc::new(server),
        }
    }
}

/// Settings whose link 0 is TLS, verifying `name` against `roots`, and link 1 (if
/// `servers` is 2) plaintext.
fn tls_settings(roots: rustls::RootCertStore, name: &str, servers: usize) -> Settings {
    let mut s = settings(servers);
    s.servers[0].tls = Some(crate::config::Tls {
        name: rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
        ca: None,
        client: crate::config::client_config(roots),
    });
    s
}

/// The server's end of a TLS link: what it decrypted, and every ciphertext byte it got.
struct Peer {
    conn: rustls::ServerConnection,
    plain: Vec<u8>,
    wire: Vec<u8>,
}

impl Peer {
    fn new(p: &pki::Pki) -> Peer {
        Peer {
            conn: rustls::ServerConnection::new(p.server.clone()).unwrap(),
            plain: Vec::new(),
            wire: Vec::new(),
        }
    }

    fn send(&mut self, xml: &str) {
        use std::io::Write;
        self.conn.writer().write_all(xml.as_bytes()).unwrap();
    }

    /// What it decrypted since the last call.
    fn heard(&mut self) -> String {
        String::from_utf8(std::mem::take(&mut self.plain)).unwrap()
    }
}

impl T {
    /// Moves bytes both ways between link `link` and `peer` until neither has any: the
    /// server's TLS error, if it has one.
    fn exchange(&mut self, link: LinkId, peer: &mut Peer) -> Result<(), rustls::Error> {
        use std::io::Read;
        loop {
            let mut moved = false;
            let out = self.ep.poll_transmit(link).to_vec();
            if !out.is_empty() {
                self.ep.wrote(link, out.len(), self.now);
                self.collect();
                peer.wire.extend_from_slice(&out);
                let mut rd = &out[..];
                while !rd.is_empty() {
                    peer.conn.read_tls(&mut rd).unwrap();
                    let state = peer.conn.process_new_packets()?;
                    let n = state.plaintext_bytes_to_read();
                    let start = peer.plain.len();
                    peer.plain.resize(start + n, 0);
                    peer.conn
                        .reader()
                        .read_exact(&mut peer.plain[start..])
                        .unwrap();
                }
                moved = true;
            }
            let mut back = Vec::new();
            while peer.conn.wants_write() {
                peer.conn.write_tls(&mut back).unwrap();
            }
            if !back.is_empty() {
                self.ep.read(link, &back, self.now);
                self.collect();
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// TLS link `link` logs in with `peer` (it must be due to connect now).
    fn tls_login(&mut self, link: LinkId, peer: &mut Peer) {
        self.advance(0);
        self.ep.connected(link, self.now);
        self.exchange(link, peer).unwrap();
        assert_eq!(peer.heard(), HEADER_OUT);
        peer.send(HEADER_IN);
        self.exchange(link, peer).unwrap();
        assert_eq!(peer.heard(), HANDSHAKE);
        peer.send("<handshake/>");
        self.exchange(link, peer).unwrap();
        assert!(self.ep.links[link].is_up());
    }

    fn login_failure(&mut self) -> LoginError {
        self.take_events()
            .into_iter()
            .find_map(|e| match e {
                Event::LoginFailed { why, .. } => Some(why),
                _ => None,
            })
            .expect("a login failure")
    }
}

#[test]
fn tls_login_and_serving_with_nothing_in_clear() {
    let p = pki::pki(&["proxy.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 1), core());
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
    assert!(t.has(|e| matches!(e, Event::LoggedIn { link: 0 })));
    t.exchange(0, &mut peer).unwrap();
    assert_eq!(peer.heard(), format!("{PROBE_OUT}{SUBSCRIBE_OUT}"));
    // A request answered on its stream.
    peer.send(&iq("secret-id-1"));
    t.exchange(0, &mut peer).unwrap();
    assert_eq!(
        peer.heard(),
        format!("{}{PROBE_OUT}", unavailable("secret-id-1"))
    );
    // On the wire: TLS records only (the name verified is in the ClientHello's SNI; no
    // stream, handshake or stanza byte).
    for clear in [
        "jabber:component:accept",
        "handshake",
        "secret-id-1",
        "user@example",
        "<iq",
    ] {
        assert!(
            !peer
                .wire
                .windows(clear.len())
                .any(|w| w == clear.as_bytes()),
            "{clear} in clear"
        );
    }
    assert_eq!(peer.wire[0], 0x16, "a TLS handshake record first");
}

#[test]
fn tls_refusals_name_the_server_and_the_reason_and_back_off() {
    // An unknown CA.
    let p = pki::pki(&["proxy.example"]);
    let other = pki::pki(&["proxy.example"]);
    let mut t = T::with(
        tls_settings(other.roots.clone(), "proxy.example", 1),
        core(),
    );
    let mut peer = Peer::new(&p);
    t.advance(0);
    t.ep.connected(0, t.now);
    let _ = t.exchange(0, &mut peer);
    let why = t.login_failure();
    assert!(matches!(why, LoginError::Certificate(_)), "{why:?}");
    assert_eq!(
        why.to_string(),
        "TLS refused: the certificate of node0:5347 does not verify for proxy.example: unknown \
         issuer: not signed by the roots configured (the system's, or the `ca` file given for \
         this server)"
    );
    // It backs off like any other failure, then tries again.
    assert!(matches!(t.ep.links[0].state, State::Down { .. }));
    let retry = t.ep.poll_timeout().unwrap() - t.now.mono_ms;
    assert!((250..=500).contains(&retry), "{retry}");
    t.advance(retry);
    assert!(t.has(|e| matches!(e, Event::Connect { link: 0, .. })));

    // A certificate for another name.
    let p = pki::pki(&["other.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 1), core());
    let mut peer = Peer::new(&p);
    t.advance(0);
    t.ep.connected(0, t.now);
    let _ = t.exchange(0, &mut peer);
    let why = t.login_failure();
    assert_eq!(
        why.to_string(),
        "TLS refused: the certificate of node0:5347 does not verify for proxy.example: not \
         issued for this name but for DnsName(\"other.example\") (set `name` to one of them)"
    );

    // Prosody's strict SNI: the alert unrecognized_name, with a hint.
    let p = pki::pki(&["proxy.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "xmpp.example", 1), core());
    t.advance(0);
    t.ep.connected(0, t.now);
    t.ep.wrote(0, t.ep.poll_transmit(0).len(), t.now);
    t.ep.read(0, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70], t.now);
    let why = t.login_failure();
    assert!(matches!(why, LoginError::Tls(_)), "{why:?}");
    assert!(
        why.to_string().starts_with(
            "TLS with node0:5347 failed: the server does not serve the name xmpp.example \
             (alert unrecognized_name): Prosody accepts as SNI only one of its hosts"
        ),
        "{why}"
    );
}

#[test]
fn tls_and_plaintext_listeners_mixed_up_are_said_so() {
    // TLS to a plaintext listener: it answers our ClientHello in XML.
    let p = pki::pki(&["proxy.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 1), core());
    t.advance(0);
    t.ep.connected(0, t.now);
    t.ep.wrote(0, t.ep.poll_transmit(0).len(), t.now);
    t.server(
        0,
        "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept'>",
    );
    let why = t.login_failure().to_string();
    assert!(
        why.contains("answered in plain XML: its listener has no TLS"),
        "{why}"
    );
    // A TLS listener that closes during the handshake (ejabberd without a `certfile`).
    t.advance(t.ep.poll_timeout().unwrap() - t.now.mono_ms);
    t.ep.connected(0, t.now);
    t.ep.wrote(0, t.ep.poll_transmit(0).len(), t.now);
    t.ep.closed(0, Io::Eof, t.now);
    let why = t.login_failure();
    assert!(matches!(why, LoginError::Tls(_)), "{why:?}");
    assert!(
        why.to_string()
            .contains("closed the connection during the TLS handshake"),
        "{why}"
    );
    // Plaintext to a TLS listener: ejabberd closes without a byte, Prosody resets; a
    // listener that answers sends a TLS alert record.
    let mut t = T::new(1);
    t.advance(0);
    t.ep.connected(0, t.now);
    t.written(0);
    t.ep.closed(0, Io::Eof, t.now);
    let why = t.login_failure();
    assert!(
        matches!(why, LoginError::ClosedSilently(Io::Eof)),
        "{why:?}"
    );
    assert!(why.to_string().contains("set `tls = true`"), "{why}");
    t.advance(t.ep.poll_timeout().unwrap() - t.now.mono_ms);
    t.ep.connected(0, t.now);
    t.written(0);
    t.ep.read(0, &[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46], t.now);
    let why = t.login_failure().to_string();
    assert!(
        why.contains("the server speaks TLS: set `tls = true`"),
        "{why}"
    );
}

#[test]
fn tls_close_without_close_notify_is_an_ordinary_close() {
    let p = pki::pki(&["proxy.example"]);
    // Lost while up: the server closes the TCP connection without close_notify (ejabberd).
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 1), core());
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
    t.exchange(0, &mut peer).unwrap();
    t.take_events();
    t.ep.closed(0, Io::Eof, t.now);
    let ev = t.take_events();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::StreamLost {
                why: StreamLost::Io(Io::Eof),
                ..
            }
        )),
        "{ev:?}"
    );

    // At shutdown: our footer, then our close_notify, then the socket shut down for writing;
    // the server's footer and EOF without close_notify end it cleanly.
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 1), core());
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
    t.exchange(0, &mut peer).unwrap();
    peer.heard();
    t.ep.signal(Signal::Terminate, t.now);
    peer.send(&iq("7"));
    t.exchange(0, &mut peer).unwrap();
    t.ep.drained(0, t.now);
    t.exchange(0, &mut peer).unwrap();
    assert_eq!(
        peer.heard(),
        format!("{}{PROBE_OUT}</stream:stream>", unavailable("7"))
    );
    assert!(peer.conn.process_new_packets().unwrap().peer_has_closed());
    assert!(t.has(|e| matches!(e, Event::ShutdownWrite { link: 0 })));
    peer.send("</stream:stream>");
    t.exchange(0, &mut peer).unwrap();
    assert!(t.has(|e| matches!(e, Event::Stopped)));
}

#[test]
fn an_output_sealed_but_not_written_counts_as_unsent() {
    // Two streams, the TLS one takes a large element and writes part of its records: the
    // element goes out whole on the other stream when the TLS one is lost.
    let p = pki::pki(&["proxy.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 2), core());
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
    t.login(1);
    t.exchange(0, &mut peer).unwrap();
    t.written(1);
    t.take_events();
    let big = format!(
        "<message from='proxy.example' to='x@example'><body>{}</body></message>",
        "a".repeat(40_000)
    );
    let now = t.now.mono_ms;
    t.ep.links[0]
        .open_mut()
        .unwrap()
        .output
        .element(big.as_bytes(), now);
    t.ep.wrote(0, 0, t.now);
    let first = t.ep.poll_transmit(0).len();
    assert!(first > 16_384 && first < 17_000, "one record: {first}");
    t.ep.wrote(0, first, t.now);
    let second = t.ep.poll_transmit(0).len();
    t.ep.wrote(0, second - 1, t.now);
    assert!(t.ep.links[0].open().unwrap().unsent() > big.len() - 16_384);
    t.ep.closed(0, Io::Write("broken pipe".into()), t.now);
    t.take_events();
    let out = t.written(1);
    assert!(
        out.starts_with(&big) && out[big.len()..] == *PROBE_OUT,
        "the element, whole, on the other stream, and a probe (not so: {} bytes)",
        out.len()
    );
}

#[test]
fn an_upgrade_closes_the_tls_streams_and_hands_over_the_others() {
    let p = pki::pki(&["proxy.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 2), core());
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
    t.login(1);
    t.exchange(0, &mut peer).unwrap();
    t.written(1);
    peer.heard();
    t.take_events();
    t.ep.signal(Signal::Upgrade, t.now);
    t.ep.upgrade_checked(Ok(vec![1, 2]), t.now);
    // The wait for a handover point allows for the TLS close: 5 s, and drain 1 s, write 5 s,
    // footer 2 s.
    assert_eq!(t.ep.upgrade.timeout(), Some(t.now.mono_ms + 13_000));
    // The TLS stream is drained (what arrives is answered), then closed with footers.
    let ev = t.take_events();
    assert!(
        ev.iter().any(|e| matches!(e, Event::Drain { link: 0 })),
        "{ev:?}"
    );
    assert!(!ev.iter().any(|e| matches!(e, Event::HandOver(_))));
    peer.send(&iq("8"));
    t.exchange(0, &mut peer).unwrap();
    t.ep.drained(0, t.now);
    t.exchange(0, &mut peer).unwrap();
    assert_eq!(
        peer.heard(),
        format!("{}</stream:stream>", unavailable("8"))
    );
    assert!(
        !t.has(|e| matches!(e, Event::HandOver(_))),
        "the TLS stream is not closed yet"
    );
    // What the server still routes to it after our footer is answered on the other stream.
    peer.send(&iq("9"));
    peer.send("</stream:stream>");
    t.exchange(0, &mut peer).unwrap();
    // (The probe the first refusal asked for went out on the other stream too.)
    assert_eq!(t.written(1), format!("{PROBE_OUT}{}", unavailable("9")));
    let ev = t.take_events();
    assert!(ev.iter().any(|e| matches!(e, Event::Close { link: 0 })));
    let h = ev
        .iter()
        .find_map(|e| match e {
            Event::HandOver(h) => Some(h),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a handover: {ev:?}"));
    // Only the plaintext stream goes over.
    assert_eq!(h.links, vec![1]);
    let record = crate::upgrade::Record::decode(&h.record.clone().unwrap().1).unwrap();
    assert_eq!(record.streams.len(), 1);
    assert_eq!(record.streams[0].server, "node1:5347");
    // No TLS login meanwhile; if the exec fails, the TLS stream logs in again at once.
    t.advance(10);
    assert!(!t.has(|e| matches!(e, Event::Connect { link: 0, .. })));
    t.ep.upgrade_failed(t.now);
    t.advance(0);
    assert!(t.has(|e| matches!(e, Event::Connect { link: 0, .. })));
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
}

#[test]
fn an_upgrade_with_only_tls_streams_execs_without_a_record() {
    let p = pki::pki(&["proxy.example"]);
    let mut t = T::with(tls_settings(p.roots.clone(), "proxy.example", 1), core());
    let mut peer = Peer::new(&p);
    t.tls_login(0, &mut peer);
    t.exchange(0, &mut peer).unwrap();
    t.take_events();
    t.ep.signal(Signal::Upgrade, t.now);
    t.ep.upgrade_checked(Ok(vec![1, 2]), t.now);
    t.ep.drained(0, t.now);
    t.exchange(0, &mut peer).unwrap();
    // The server closes without its footer and without close_notify (ejabberd after ours).
    t.advance(0);
    t.ep.closed(0, Io::Eof, t.now);
    let ev = t.take_events();
    let h = ev
        .iter()
        .find_map(|e| match e {
            Event::HandOver(h) => Some(h),
            _ => None,
        })
        .expect("a handover");
    assert!(h.links.is_empty() && h.record.is_none());
}
