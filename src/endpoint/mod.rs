//! The connection protocol without I/O: the component's streams (one per configured server),
//! their logins, keepalives, stalls, reconnection backoff, failover of unsent output, the
//! periodic probes and key polls, the drain and close at shutdown, and the in-place upgrade's
//! lifecycle — a state machine over monotonic milliseconds, modelled on quinn-proto's
//! `Endpoint`. It owns the routing core ([`Proxy`]).
//!
//! Inputs: [`Endpoint::connected`], [`Endpoint::closed`], [`Endpoint::read`],
//! [`Endpoint::wrote`], [`Endpoint::signal`], [`Endpoint::handle_timeout`] and the answers to
//! its commands ([`Endpoint::upgrade_checked`], [`Endpoint::upgrade_failed`],
//! [`Endpoint::set_keys`], [`Endpoint::drained`]). Outputs: the bytes to write on each link
//! ([`Endpoint::poll_transmit`]), when it next needs the time ([`Endpoint::poll_timeout`], the
//! earliest of every timer), and [`Event`]s ([`Endpoint::poll_event`]): commands for the shell
//! (connect, close, exec…) and reports (for metrics and logs). The shell (`crate::session`)
//! reads and feeds, drains and writes, sleeps until the next timeout, and does what it is told;
//! it never looks at a report to decide anything.
//!
//! Each stanza is answered on the stream it came in on; what the core sends on its own
//! (probes, held requests) goes out on the stream with least output waiting, the first listed
//! on a tie — any stream reaches the whole cluster. What a lost stream could not send goes out
//! on another, whole elements only.

mod link;
mod output;
#[cfg(test)]
mod tests;
mod tls;
mod upgrade;

use std::collections::VecDeque;
use std::time::Duration;

use tracing::{debug, info, trace, warn};
use xmpp_parsers::component::Handshake;
use xmpp_parsers::minidom::Element;

use crate::backoff::Backoff;
use crate::config::{Config, Server};
use crate::inbound::{Inbound, Limits};
use crate::keys::KeySet;
use crate::proxy::{Clock, Outcome, Proxy, Stanza, Verdict};
use crate::random::Random;
use crate::stanza::{NS, STREAM_NS};
use crate::stream::{Frame, ReadError, Reader, Writer};

use link::{
    CLOSE_WRITE_LIMIT_MS, DRAIN_BYTES, DRAIN_LIMIT_MS, FOOTER_WAIT_MS, LOGIN_TIMEOUT_MS, Link,
    Open, Phase, State, Up,
};
pub use link::{History, Io, LoginError, StreamLost, TlsFailure};
pub use output::{MAX_UNSENT, PAUSE_READING_AT};
use tls::TlsLayer;
pub use upgrade::HandOver;
use upgrade::Upgrade;

/// A stream shorter than this does not reset its backoff: a server that accepts and then
/// drops us at once is not hammered.
const STABLE_SESSION_MS: u64 = 30_000;
/// The first reconnection delay's ceiling.
const RECONNECT_MIN: Duration = Duration::from_millis(500);

/// A link: the index of its server in [`Settings::servers`].
pub type LinkId = usize;

/// What the endpoint needs to know.
#[derive(Clone)]
pub struct Settings {
    /// The component's address (the login's `to`).
    pub jid: String,
    /// The handshake secret.
    pub secret: zeroize::Zeroizing<String>,
    /// The servers, one stream to each (with TLS where configured).
    pub servers: Vec<Server>,
    /// The limits stanzas are read under.
    pub limits: Limits,
    /// Idle time before a keepalive ping (ms).
    pub keepalive_interval_ms: u64,
    /// Time for an answer to a ping, and for the server to take some of the output waiting
    /// (ms).
    pub keepalive_timeout_ms: u64,
    /// The longest reconnection delay.
    pub reconnect_max: Duration,
    /// The mean interval of the periodic presence probes (ms; ± 20%).
    pub probe_interval_ms: u64,
    /// How often the key file is looked at (ms).
    pub key_poll_ms: u64,
    /// How often the service manager's watchdog is to be fed (ms), if it asks.
    pub watchdog_ms: Option<u64>,
    /// The binary an upgrade `exec`s (for the log).
    pub binary: String,
    /// This build's id (for the handover record).
    pub build: crate::upgrade::BuildId,
}

impl Settings {
    /// The settings of `config`, with the upgrade's binary and build and the watchdog's
    /// interval.
    pub fn new(
        config: &Config,
        binary: String,
        build: crate::upgrade::BuildId,
        watchdog: Option<Duration>,
    ) -> Settings {
        let c = &config.component;
        Settings {
            jid: c.jid.clone(),
            secret: c.secret.clone(),
            servers: c.servers.clone(),
            limits: config.limits,
            keepalive_interval_ms: c.keepalive_interval.as_millis() as u64,
            keepalive_timeout_ms: c.keepalive_timeout.as_millis() as u64,
            reconnect_max: c.reconnect_max,
            probe_interval_ms: c.probe_interval.as_millis() as u64,
            key_poll_ms: config.keys.reload_interval.as_millis() as u64,
            watchdog_ms: watchdog.map(|d| d.as_millis() as u64),
            binary,
            build,
        }
    }
}

/// A signal the process received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGUSR2: upgrade in place.
    Upgrade,
    /// SIGHUP: read the key file again.
    Reload,
    /// SIGTERM: stop.
    Terminate,
    /// SIGINT: stop.
    Interrupt,
}

/// What the service manager is to hear (`sd_notify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    /// `READY=1` with a status line.
    Ready(String),
    /// A new status line.
    Status(String),
    /// `RELOADING=1` with a status line.
    Reloading(String),
    /// `STOPPING=1` with a status line.
    Stopping(String),
    /// `WATCHDOG=1`.
    Watchdog,
}

/// What the endpoint tells the shell: commands first, then reports.
#[derive(Debug)]
pub enum Event {
    /// Open a TCP connection to `server` for `link`, then call [`Endpoint::connected`] (or
    /// [`Endpoint::closed`] with [`Io::Connect`]).
    Connect {
        /// The link.
        link: LinkId,
        /// Its server's address.
        server: String,
    },
    /// Close `link`'s connection (or give up connecting): the endpoint is done with it.
    Close {
        /// The link.
        link: LinkId,
    },
    /// At shutdown: read what `link`'s socket already holds, without waiting, feeding it
    /// with [`Endpoint::read`] while [`Endpoint::draining`] says so; then call
    /// [`Endpoint::drained`].
    Drain {
        /// The link.
        link: LinkId,
    },
    /// Shut `link`'s socket down for writing (our footer is sent).
    ShutdownWrite {
        /// The link.
        link: LinkId,
    },
    /// Have the new binary check the configuration, then call [`Endpoint::upgrade_checked`].
    CheckUpgrade,
    /// `exec` the new binary with these links' sockets and this record; if that returns,
    /// call [`Endpoint::upgrade_failed`].
    HandOver(HandOver),
    /// Look at the key file (read it whatever its stamp if `force`), and give what it holds
    /// now, if it changed, to [`Endpoint::set_keys`].
    ReadKeys {
        /// Read it even if its stamp did not change.
        force: bool,
    },
    /// Tell the service manager.
    Notify(Notify),
    /// Every stream is closed: the process may exit.
    Stopped,
    /// What the core made of one stanza (for metrics).
    Stanza {
        /// What it was.
        verdict: Verdict,
        /// Its kind.
        stanza: Stanza,
        /// For a reply reversed: from its request's forwarding to now (ms).
        reply_latency_ms: Option<u64>,
    },
    /// A login succeeded.
    LoggedIn {
        /// The link.
        link: LinkId,
    },
    /// A login failed.
    LoginFailed {
        /// The link.
        link: LinkId,
        /// Why.
        why: LoginError,
    },
    /// A stream that was up was lost (it logs in again).
    StreamLost {
        /// The link.
        link: LinkId,
        /// Why.
        why: StreamLost,
    },
    /// The session is up (a first stream), established at this Unix time (ms).
    SessionUp {
        /// When (Unix ms).
        established_ms: u64,
    },
    /// No stream is up any more.
    SessionDown,
    /// How many streams are up.
    Streams(usize),
    /// How many servers are configured.
    Servers(usize),
    /// How many resources of the implementing client are online.
    Resources(usize),
    /// The key that seals new tokens: its id and when it was created (Unix seconds).
    Key {
        /// Its id.
        id: u32,
        /// When it was created (Unix seconds).
        created: u64,
    },
}

/// Shutdown under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    No,
    /// Streams are being drained.
    Draining,
    /// Footers are being sent and awaited.
    Closing,
    /// Done.
    Stopped,
}

/// The connection protocol: the core, the links, the timers, the upgrade.
pub struct Endpoint {
    settings: Settings,
    proxy: Proxy,
    rng: Box<dyn Random + Send + Sync>,
    links: Vec<Link>,
    events: VecDeque<Event>,
    /// Whether any stream is up (the session is up).
    up: bool,
    upgrade: Upgrade,
    stopping: Stopping,
    next_probe: u64,
    next_keys: u64,
    next_watchdog: Option<u64>,
    ready_sent: bool,
    status: String,
    streams_reported: Option<usize>,
    resources_reported: Option<usize>,
    /// The last time given.
    now: Clock,
}

impl Endpoint {
    /// An endpoint at time `now`, every link down and due to connect at once.
    pub fn new(
        settings: Settings,
        core: crate::proxy::Settings,
        keys: KeySet,
        mut rng: Box<dyn Random + Send + Sync>,
        now: Clock,
    ) -> Endpoint {
        let proxy = Proxy::new(core, keys);
        let links = settings
            .servers
            .iter()
            .map(|server| Link {
                server: server.address.clone(),
                tls: server.tls.clone(),
                state: State::Down {
                    retry_at: now.mono_ms,
                },
                backoff: Backoff::new(RECONNECT_MIN, settings.reconnect_max),
            })
            .collect();
        let next_probe = now.mono_ms + jittered(settings.probe_interval_ms, &mut *rng);
        let mut e = Endpoint {
            next_watchdog: settings.watchdog_ms.map(|_| now.mono_ms),
            next_keys: now.mono_ms,
            next_probe,
            settings,
            proxy,
            rng,
            links,
            events: VecDeque::new(),
            up: false,
            upgrade: Upgrade::Idle,
            stopping: Stopping::No,
            ready_sent: false,
            status: String::new(),
            streams_reported: None,
            resources_reported: None,
            now,
        };
        e.report_key();
        e.events.push_back(Event::Servers(e.links.len()));
        e
    }

    /// The routing core.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// The links' servers, by [`LinkId`].
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|l| l.server.as_str())
    }

    /// How many streams are up.
    pub fn ups(&self) -> usize {
        self.links.iter().filter(|l| l.is_up()).count()
    }

    // ---- outputs ----

    /// Whether an event waits.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the endpoint has decided to hand its streams over ([`Event::HandOver`] queued
    /// or being done): from then until [`Endpoint::upgrade_failed`], nothing more may be read
    /// or written on them, which the record would not account for.
    pub fn handing_over(&self) -> bool {
        self.upgrade == Upgrade::Exec
    }

    /// What waits to be written on `link` (empty if nothing): write what the socket takes,
    /// then report it with [`Endpoint::wrote`].
    pub fn poll_transmit(&self, link: LinkId) -> &[u8] {
        self.links
            .get(link)
            .and_then(Link::open)
            .map_or(&[], Open::transmit)
    }

    /// Whether `link`'s socket is to be read: open, and its server takes what we send (past
    /// [`PAUSE_READING_AT`] waiting, a stream is not read, as the server applies
    /// back-pressure to us).
    pub fn wants_read(&self, link: LinkId) -> bool {
        self.links
            .get(link)
            .and_then(Link::open)
            .is_some_and(|o| o.unsent() < PAUSE_READING_AT)
    }

    /// While an [`Event::Drain`] is carried out: whether to read on.
    pub fn draining(&self, link: LinkId) -> bool {
        matches!(
            self.links.get(link).and_then(Link::open).map(|o| &o.phase),
            Some(Phase::Draining { done: false, .. })
        )
    }

    /// When [`Endpoint::handle_timeout`] is next due (monotonic ms): the earliest of every
    /// timer — each link's (login, reconnection, keepalive, stall, drain, closing write,
    /// footer wait), the probe, the key poll, the watchdog, the upgrade's wait for a handover
    /// point, and the core's (held requests).
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.stopping == Stopping::Stopped {
            return None;
        }
        let (interval, timeout) = self.keepalive();
        let links = self
            .links
            .iter()
            .filter_map(|l| l.timeout(interval, timeout))
            .min();
        let serving = self.stopping == Stopping::No;
        [
            links,
            serving.then_some(self.next_probe),
            serving.then_some(self.next_keys),
            self.next_watchdog.filter(|_| serving),
            self.upgrade.timeout(),
            self.proxy.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn keepalive(&self) -> (u64, u64) {
        (
            self.settings.keepalive_interval_ms,
            self.settings.keepalive_timeout_ms,
        )
    }

    // ---- inputs ----

    /// `link`'s TCP connection is made: the login begins.
    pub fn connected(&mut self, link: LinkId, now: Clock) {
        self.now = now;
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        let State::Connecting { deadline } = l.state else {
            self.events.push_back(Event::Close { link });
            return;
        };
        let tls = match l.tls.as_ref().map(|t| TlsLayer::new(t, &l.server)) {
            None => None,
            Some(Ok(layer)) => Some(Box::new(layer)),
            Some(Err(why)) => {
                l.state = State::Open(Box::new(Open {
                    reader: Reader::new(self.settings.limits),
                    writer: Writer::new(),
                    output: Default::default(),
                    phase: Phase::Login { deadline },
                    tls: None,
                    heard: false,
                }));
                self.fail(link, Failure::Tls(why));
                self.after();
                return;
            }
        };
        let mut open = Box::new(Open {
            reader: Reader::new(self.settings.limits),
            writer: Writer::new(),
            output: Default::default(),
            phase: Phase::Login { deadline },
            tls,
            heard: false,
        });
        let mut header = Vec::new();
        open.writer
            .header(&[("to", &self.settings.jid)], &mut header);
        open.output.raw(&header, now.mono_ms);
        l.state = State::Open(open);
        self.after();
    }

    /// `link`'s socket failed, or the connection could not be made.
    pub fn closed(&mut self, link: LinkId, why: Io, now: Clock) {
        self.now = now;
        if link >= self.links.len() {
            return;
        }
        self.fail(link, Failure::Io(why));
        self.after();
    }

    /// Bytes read on `link`.
    pub fn read(&mut self, link: LinkId, bytes: &[u8], now: Clock) {
        self.now = now;
        let Some(open) = self.links.get_mut(link).and_then(Link::open_mut) else {
            return;
        };
        match &mut open.phase {
            Phase::Up(up) => {
                up.last_read = now.mono_ms;
                up.ping_sent = None;
            }
            Phase::Draining { drained, .. } => *drained += bytes.len(),
            _ => {}
        }
        let first = !open.heard;
        open.heard |= !bytes.is_empty();
        let plain;
        let bytes = match &mut open.tls {
            Some(tls) => {
                let mut p = Vec::new();
                if let Err(why) = tls.read(bytes, &mut p) {
                    self.fail(link, Failure::Tls(why));
                    self.after();
                    return;
                }
                plain = p;
                &plain[..]
            }
            None if first
                && matches!(open.phase, Phase::Login { .. })
                && matches!(bytes.first(), Some(0x15 | 0x16)) =>
            {
                // A TLS record (a handshake or an alert) where a stream header was due.
                let why = TlsFailure {
                    server: self.links[link].server.clone(),
                    name: String::new(),
                    reason: "the server speaks TLS: set `tls = true` for it".into(),
                    certificate: false,
                };
                self.fail(link, Failure::Tls(why));
                self.after();
                return;
            }
            None => bytes,
        };
        if let Err(e) = open.reader.feed(bytes) {
            self.fail(link, Failure::Read(e));
        } else {
            self.frames(link);
        }
        // At shutdown, the limit counts every byte read, whether or not it completed a frame
        // (a large element streaming in must not keep the drain going).
        if self.draining(link) {
            self.drain_limit(link);
        }
        self.after();
    }

    /// `n` bytes of [`Endpoint::poll_transmit`] were written on `link` (0: the socket took
    /// nothing now).
    pub fn wrote(&mut self, link: LinkId, n: usize, now: Clock) {
        self.now = now;
        let Some(open) = self.links.get_mut(link).and_then(Link::open_mut) else {
            return;
        };
        match &mut open.tls {
            Some(tls) => match tls.wrote(n) {
                Some(plain) if plain > 0 => open.output.wrote(plain, now.mono_ms),
                Some(_) => {}
                None if n > 0 => open.output.progress(now.mono_ms),
                None => {}
            },
            None => open.output.wrote(n, now.mono_ms),
        }
        let unsent = open.unsent();
        match open.phase {
            Phase::Up(_) if unsent > MAX_UNSENT => {
                self.lost(link, StreamLost::TooMuchWaiting(unsent));
            }
            Phase::Closing { footer, .. } if unsent == 0 => {
                self.events.push_back(Event::ShutdownWrite { link });
                if footer {
                    self.finish(link);
                } else if let Phase::Closing { dropped, .. } = open.phase {
                    open.phase = Phase::Footer {
                        until: now.mono_ms + FOOTER_WAIT_MS,
                        dropped,
                    };
                }
            }
            _ => {}
        }
        self.after();
    }

    /// A signal was received.
    pub fn signal(&mut self, sig: Signal, now: Clock) {
        self.now = now;
        if self.stopping != Stopping::No {
            return;
        }
        match sig {
            Signal::Terminate | Signal::Interrupt => {
                let name = if sig == Signal::Terminate {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                info!("{name}: shutting down");
                self.stop();
            }
            Signal::Reload => {
                info!("SIGHUP: reloading the key file");
                self.events.push_back(Event::ReadKeys { force: true });
            }
            Signal::Upgrade => self.upgrade_signal(),
        }
        self.after();
    }

    /// The key file holds new keys.
    pub fn set_keys(&mut self, keys: KeySet, now: Clock) {
        self.now = now;
        self.proxy.set_keys(keys);
        self.report_key();
        self.after();
    }

    /// An [`Event::Drain`] was carried out (the socket holds nothing more now, or
    /// [`Endpoint::draining`] said to stop).
    pub fn drained(&mut self, link: LinkId, now: Clock) {
        self.now = now;
        if let Some(Phase::Draining { done, .. }) = self
            .links
            .get_mut(link)
            .and_then(Link::open_mut)
            .map(|o| &mut o.phase)
        {
            *done = true;
        }
        self.close_if_drained();
        self.after();
    }

    /// Time passed: whatever is due at `now` is done.
    pub fn handle_timeout(&mut self, now: Clock) {
        self.now = now;
        let t = now.mono_ms;
        for i in 0..self.links.len() {
            let (interval, timeout) = self.keepalive();
            if self.links[i]
                .timeout(interval, timeout)
                .is_some_and(|d| d <= t)
            {
                self.link_timeout(i);
            }
        }
        if self.stopping == Stopping::No {
            if self.next_probe <= t {
                self.next_probe = t + jittered(self.settings.probe_interval_ms, &mut *self.rng);
                let probe = self.proxy.probe();
                if let Some(first) = self.out_link() {
                    self.queue(first, &probe);
                }
            }
            if self.next_keys <= t {
                self.next_keys = t + self.settings.key_poll_ms.max(1);
                // Also while disconnected: an instance that takes over must know every key
                // in use.
                self.events.push_back(Event::ReadKeys { force: false });
            }
            if let (Some(at), Some(every)) = (self.next_watchdog, self.settings.watchdog_ms)
                && at <= t
            {
                self.next_watchdog = Some(t + every.max(1));
                self.events.push_back(Event::Notify(Notify::Watchdog));
            }
        }
        if self.proxy.poll_timeout().is_some_and(|d| d <= t) {
            self.proxy.handle_timeout(now);
            self.transmit();
        }
        self.upgrade_timeout();
        self.after();
    }

    // ---- the links ----

    fn link_timeout(&mut self, i: LinkId) {
        let t = self.now.mono_ms;
        let (interval, timeout) = self.keepalive();
        let close_limit = self.close_write_limit();
        let link = &mut self.links[i];
        match &mut link.state {
            State::Down { .. } => {
                if self.stopping != Stopping::No {
                    link.state = State::Stopped;
                    return;
                }
                link.state = State::Connecting {
                    deadline: t + LOGIN_TIMEOUT_MS,
                };
                self.events.push_back(Event::Connect {
                    link: i,
                    server: link.server.clone(),
                });
                if self.ups() == 0 {
                    let connecting: Vec<&str> = self
                        .links
                        .iter()
                        .filter(|l| matches!(l.state, State::Connecting { .. }))
                        .map(|l| l.server.as_str())
                        .collect();
                    let status = format!("connecting to {}", connecting.join(", "));
                    self.events.push_back(Event::Notify(Notify::Status(status)));
                }
            }
            State::Connecting { .. } => self.fail(i, Failure::LoginTimedOut),
            State::Stopped => {}
            State::Open(open) => {
                let unsent = open.unsent();
                match &mut open.phase {
                    Phase::Login { .. } => self.fail(i, Failure::LoginTimedOut),
                    Phase::Up(up) => {
                        if open
                            .output
                            .waiting_since()
                            .is_some_and(|w| w + timeout <= t)
                        {
                            self.lost(i, StreamLost::Stalled(timeout / 1000));
                            return;
                        }
                        match up.ping_sent {
                            None if up.last_read + interval <= t => {
                                debug!(server = %link.server, "idle: sending keepalive ping");
                                up.ping_sent = Some(t);
                                let ping = self.proxy.keepalive();
                                self.queue(i, &ping);
                            }
                            Some(at) if at + timeout <= t => {
                                if unsent > 0 {
                                    // Output waits (the ping behind it): the stall timer judges
                                    // the stream while the server takes it.
                                    up.ping_sent = Some(t);
                                } else {
                                    self.lost(i, StreamLost::NoPong(timeout / 1000));
                                }
                            }
                            _ => {}
                        }
                    }
                    Phase::Draining { .. } => {
                        self.drain_limit(i);
                        self.close_if_drained();
                    }
                    Phase::Closing { .. } => {
                        let why = StreamLost::Stalled(close_limit / 1000);
                        debug!(server = %link.server, "closing the stream: {why}");
                        self.close_link(i);
                    }
                    Phase::Footer { .. } => self.finish(i),
                }
            }
        }
    }

    /// The stream what the core sends on its own goes out on: the one with least output
    /// waiting, the first listed on a tie (a server that reads slowly does not hold it up).
    fn out_link(&self) -> Option<LinkId> {
        self.links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.serves())
            .filter_map(|(i, l)| Some((l.open()?.unsent(), i)))
            .min()
            .map(|(_, i)| i)
    }

    /// Serialises `el` onto link `i`'s output.
    fn queue(&mut self, i: LinkId, el: &Element) {
        let now = self.now.mono_ms;
        let Some(open) = self.links.get_mut(i).and_then(Link::open_mut) else {
            return;
        };
        let start = open.output.buffer().len();
        if let Err(e) = open.writer.element(el, open.output.buffer()) {
            warn!("{e}: not sent");
            return;
        }
        open.output.appended(start, now);
    }

    /// Queues what the core sends besides its answers (held requests released or refused,
    /// probes) on [`Endpoint::out_link`].
    fn transmit(&mut self) {
        let Some(first) = self.out_link() else {
            return;
        };
        while let Some(outcome) = self.proxy.poll_transmit(self.now, &mut *self.rng) {
            self.outcome(first, outcome);
        }
    }

    fn outcome(&mut self, link: LinkId, outcome: Outcome) {
        self.events.push_back(Event::Stanza {
            verdict: outcome.verdict,
            stanza: outcome.stanza,
            reply_latency_ms: outcome.reply_latency_ms,
        });
        if let Some(el) = &outcome.transmit {
            self.queue(link, el);
        }
    }

    /// Handles every complete frame link `i`'s reader holds, as its phase says.
    fn frames(&mut self, i: LinkId) {
        loop {
            // While an upgrade closes a TLS stream (not at shutdown), what its server still
            // routes to it after our footer is handled and answered on another stream, if one
            // is up, rather than dropped: any stream reaches the whole cluster.
            let relay = (self.stopping == Stopping::No)
                .then(|| self.out_link())
                .flatten();
            let mut relayed = None;
            let Some(open) = self.links.get_mut(i).and_then(Link::open_mut) else {
                return;
            };
            let frame = match open.reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => return self.fail(i, Failure::Read(e)),
            };
            match (&mut open.phase, frame) {
                (Phase::Login { .. }, frame) => {
                    if let Err(why) = self.login_frame(i, frame) {
                        return self.fail(i, Failure::Login(why));
                    }
                }
                (Phase::Up(_) | Phase::Draining { .. }, frame) => {
                    let inbound = match frame {
                        Frame::Footer => return self.fail(i, Failure::Lost(StreamLost::Closed)),
                        Frame::Header(_) => {
                            return self.fail(i, Failure::Lost(StreamLost::SecondStream));
                        }
                        Frame::Stanza(Inbound::Element(el)) if el.is("error", STREAM_NS) => {
                            let why = StreamLost::StreamError(stream_error(&el));
                            return self.fail(i, Failure::Lost(why));
                        }
                        Frame::Stanza(inbound) => inbound,
                    };
                    if let Inbound::Element(el) = &inbound {
                        trace!(xml = %String::from(el), "in");
                    }
                    let outcome = self.proxy.handle(inbound, self.now, &mut *self.rng);
                    self.outcome(i, outcome);
                    self.transmit();
                }
                (
                    Phase::Closing {
                        dropped, footer, ..
                    },
                    frame,
                ) => match frame {
                    Frame::Stanza(inbound) if routed(&inbound) => match relay {
                        Some(j) => relayed = Some((j, inbound)),
                        None => *dropped += 1,
                    },
                    Frame::Footer => *footer = true,
                    _ => {}
                },
                (Phase::Footer { dropped, .. }, frame) => match frame {
                    Frame::Stanza(inbound) if routed(&inbound) => match relay {
                        Some(j) => relayed = Some((j, inbound)),
                        None => *dropped += 1,
                    },
                    Frame::Footer => return self.finish(i),
                    _ => {}
                },
            }
            if let Some((j, inbound)) = relayed {
                debug!(server = %self.links[i].server, "routed here after our footer: answered on another stream");
                let outcome = self.proxy.handle(inbound, self.now, &mut *self.rng);
                self.outcome(j, outcome);
                self.transmit();
            }
            if matches!(
                self.links[i].open().map(|o| &o.phase),
                Some(Phase::Draining { .. })
            ) {
                self.drain_limit(i);
            }
        }
    }

    /// One frame during the login: the server's header (answered with the handshake), then
    /// the handshake's answer.
    fn login_frame(&mut self, i: LinkId, frame: Frame) -> Result<(), LoginError> {
        match frame {
            Frame::Header(h) => {
                let id = h.id.ok_or(LoginError::NoStreamId)?;
                let handshake = Handshake::from_stream_id_and_password(id, &self.settings.secret);
                self.queue(i, &Element::from(handshake));
                Ok(())
            }
            Frame::Stanza(Inbound::Element(el)) if el.is("error", STREAM_NS) => {
                let header = self.links[i]
                    .open()
                    .is_some_and(|o| o.reader.header_bytes().is_some());
                let why = stream_error(&el);
                Err(if header {
                    LoginError::Refused(why)
                } else {
                    LoginError::StreamError(why)
                })
            }
            Frame::Stanza(Inbound::Element(el)) if el.is("handshake", NS) => {
                self.logged_in(i);
                Ok(())
            }
            Frame::Footer => Err(LoginError::Eof),
            Frame::Stanza(_) => Ok(()),
        }
    }

    /// Link `i` logged in.
    fn logged_in(&mut self, i: LinkId) {
        let t = self.now.mono_ms;
        let server = self.links[i].server.clone();
        info!(component = %self.settings.jid, server = %server, "session established");
        self.events.push_back(Event::LoggedIn { link: i });
        let history = History {
            established_ms: self.now.unix_ms,
            upgrades: 0,
        };
        if let Some(open) = self.links[i].open_mut() {
            open.phase = Phase::Up(Up {
                history,
                last_read: t,
                ping_sent: None,
            });
        }
        let els = if self.up {
            // Presence answers come on the node of each resource: ask again, now that this
            // stream's node can route them here too.
            self.proxy.joined(self.now)
        } else {
            self.proxy.connected(self.now)
        };
        for el in &els {
            self.queue(i, el);
        }
        if !self.up {
            self.session_up(history);
        }
    }

    fn session_up(&mut self, history: History) {
        self.up = true;
        self.events.push_back(Event::SessionUp {
            established_ms: history.established_ms,
        });
    }

    /// Link `i` failed, as its phase makes of it.
    fn fail(&mut self, i: LinkId, f: Failure) {
        let link = &mut self.links[i];
        let login = match &link.state {
            State::Connecting { .. } => true,
            State::Open(o) => matches!(o.phase, Phase::Login { .. }),
            _ => return,
        };
        if login {
            let silent = link.open().is_none_or(|o| !o.heard) && link.tls.is_none();
            let in_handshake = link
                .open()
                .and_then(|o| o.tls.as_ref())
                .filter(|t| t.handshaking());
            let why = match f {
                Failure::Io(Io::Eof | Io::Read(_)) if in_handshake.is_some() => {
                    LoginError::Tls(in_handshake.expect("checked").closed_in_handshake())
                }
                Failure::Io(e @ (Io::Eof | Io::Read(_))) if silent && link.open().is_some() => {
                    LoginError::ClosedSilently(e)
                }
                Failure::Io(e) => LoginError::Io(e),
                Failure::Tls(t) if t.certificate => LoginError::Certificate(t),
                Failure::Tls(t) => LoginError::Tls(t),
                Failure::Read(e) => LoginError::Read(e),
                Failure::Login(e) => e,
                Failure::LoginTimedOut => LoginError::TimedOut,
                Failure::Lost(StreamLost::Closed) => LoginError::Eof,
                Failure::Lost(e) => LoginError::Io(Io::Read(e.to_string())),
            };
            warn!(server = %link.server, "cannot log in: {why}");
            self.events.push_back(Event::Close { link: i });
            self.events.push_back(Event::LoginFailed { link: i, why });
            self.down(i, None);
            return;
        }
        let why = match f {
            Failure::Io(e) => StreamLost::Io(e),
            Failure::Read(e) => StreamLost::Read(e),
            Failure::Tls(t) => StreamLost::Tls(t),
            Failure::Lost(e) => e,
            Failure::Login(_) | Failure::LoginTimedOut => return,
        };
        let phase = &self.links[i].open().expect("open").phase;
        match phase {
            Phase::Up(_) => self.lost(i, why),
            Phase::Draining { .. } => {
                debug!(server = %self.links[i].server, "closing the stream: {why}");
                self.close_link(i);
                self.close_if_drained();
            }
            Phase::Closing { .. } | Phase::Footer { .. } => {
                if matches!(why, StreamLost::Closed | StreamLost::Io(Io::Eof)) {
                    self.finish(i);
                } else {
                    debug!(server = %self.links[i].server, "closing the stream: {why}");
                    self.close_link(i);
                }
            }
            Phase::Login { .. } => unreachable!("handled above"),
        }
    }

    /// Link `i`'s stream, which was up, failed.
    fn lost(&mut self, i: LinkId, why: StreamLost) {
        let Some(history) = self.links[i].history() else {
            return;
        };
        warn!(server = %self.links[i].server, "session lost: {why}");
        self.events.push_back(Event::Close { link: i });
        self.events.push_back(Event::StreamLost { link: i, why });
        // What the server cannot have received goes out on another stream, if one is up:
        // any stream reaches the whole cluster.
        let unsent = self.links[i]
            .open_mut()
            .and_then(|o| o.output.take_unsent());
        self.down(i, Some(history.established_ms));
        if let Some(bytes) = unsent
            && let Some(j) = self.out_link()
        {
            debug!(
                bytes = bytes.len(),
                "sending what the lost stream could not"
            );
            let now = self.now.mono_ms;
            if let Some(o) = self.links[j].open_mut() {
                o.output.element(&bytes, now);
            }
        }
        // Other streams are up: what was learnt through this one may have gone with its
        // server (the resources connected to that node): relearn.
        if let Some(first) = self.out_link() {
            let probe = self.proxy.stream_lost(self.now);
            self.queue(first, &probe);
        }
    }

    /// Link `i`'s login failed or its stream was lost: it logs in again after its backoff.
    fn down(&mut self, i: LinkId, established_ms: Option<u64>) {
        let link = &mut self.links[i];
        if established_ms.is_some_and(|at| self.now.unix_ms.saturating_sub(at) >= STABLE_SESSION_MS)
        {
            link.backoff.reset();
        }
        let delay = link.backoff.next_delay(&mut *self.rng);
        let delay_ms = delay.as_millis() as u64;
        link.state = State::Down {
            retry_at: self.now.mono_ms + delay_ms,
        };
        info!(server = %link.server, "reconnecting in {} ms", delay_ms);
        if self.ups() == 0 {
            if self.up {
                self.up = false;
                self.proxy.disconnected();
                self.events.push_back(Event::SessionDown);
                self.resources_reported = None;
            }
            let status = format!(
                "reconnecting to {} in {} ms",
                self.links[i].server, delay_ms
            );
            self.events.push_back(Event::Notify(Notify::Status(status)));
        }
    }

    // ---- shutdown ----

    /// Closes every stream cleanly: first handles every stanza already received on any of
    /// them (so that nothing the server delivered before the signal is dropped), answers the
    /// requests still held, then sends each our footer and waits briefly for the server's.
    /// Every step is bounded in time.
    fn stop(&mut self) {
        let t = self.now.mono_ms;
        let ups = self.ups();
        let why = if ups == 0 {
            "stopped while not connected"
        } else {
            "closing the stream"
        };
        self.events
            .push_back(Event::Notify(Notify::Stopping(why.into())));
        self.stopping = Stopping::Draining;
        // An upgrade under way is dropped: this process is going, and must not tell the
        // service manager it serves on.
        if self.upgrade != Upgrade::Exec {
            self.upgrade = Upgrade::Idle;
        }
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            match &mut link.state {
                State::Open(open) => match &open.phase {
                    Phase::Up(up) => {
                        open.phase = Phase::Draining {
                            history: up.history,
                            until: t + DRAIN_LIMIT_MS,
                            drained: 0,
                            done: false,
                        };
                        self.events.push_back(Event::Drain { link: i });
                    }
                    // Already closing for an upgrade (a TLS stream): it closes on its own.
                    Phase::Draining { .. } | Phase::Closing { .. } | Phase::Footer { .. } => {}
                    Phase::Login { .. } => self.close_link(i),
                },
                State::Connecting { .. } => self.close_link(i),
                State::Down { .. } | State::Stopped => link.state = State::Stopped,
            }
        }
        // What was already read (complete frames) is handled first.
        for i in 0..self.links.len() {
            if self.draining(i) {
                self.frames(i);
            }
        }
        self.close_if_drained();
    }

    /// At shutdown, the drain limit of link `i` (time and bytes) reached: reading stops.
    fn drain_limit(&mut self, i: LinkId) {
        let t = self.now.mono_ms;
        let server = self.links[i].server.clone();
        if let Some(Phase::Draining {
            until,
            drained,
            done,
            ..
        }) = self.links[i].open_mut().map(|o| &mut o.phase)
            && !*done
            && (t >= *until || *drained >= DRAIN_BYTES)
        {
            *done = true;
            warn!(
                server = %server,
                drained = *drained,
                "still receiving at shutdown: closing without reading further"
            );
        }
    }

    /// Once every stream is drained: held requests are answered rather than lost with the
    /// streams, and each stream gets our footer.
    fn close_if_drained(&mut self) {
        if self.stopping == Stopping::No {
            // An upgrade's drain of the TLS streams: each one drained gets our footer.
            for i in 0..self.links.len() {
                if matches!(
                    self.links[i].open().map(|o| &o.phase),
                    Some(Phase::Draining { done: true, .. })
                ) {
                    self.footer(i);
                }
            }
            return;
        }
        if self.stopping != Stopping::Draining
            || self.links.iter().any(|l| {
                matches!(
                    l.open().map(|o| &o.phase),
                    Some(Phase::Draining { done: false, .. })
                )
            })
        {
            return;
        }
        self.stopping = Stopping::Closing;
        self.proxy.settle_held_at_close(self.now);
        self.transmit();
        for i in 0..self.links.len() {
            self.footer(i);
        }
        self.stop_if_closed();
    }

    /// Link `i`, if drained, gets our footer (written within the closing write limit).
    fn footer(&mut self, i: LinkId) {
        let t = self.now.mono_ms;
        let limit = self.close_write_limit();
        if let Some(open) = self.links[i].open_mut()
            && let Phase::Draining { .. } = open.phase
        {
            let mut footer = Vec::new();
            open.writer.footer(&mut footer);
            open.output.raw(&footer, t);
            open.phase = Phase::Closing {
                deadline: t + limit,
                dropped: 0,
                footer: false,
            };
        }
    }

    /// Each write of the shutdown gets at most a few seconds, whatever keepalive_timeout is:
    /// a server that stops reading cannot hold SIGTERM up for long.
    fn close_write_limit(&self) -> u64 {
        self.settings.keepalive_timeout_ms.min(CLOSE_WRITE_LIMIT_MS)
    }

    /// The server's footer came (or the wait for it is over): the stream is closed.
    fn finish(&mut self, i: LinkId) {
        let server = self.links[i].server.clone();
        let dropped = match self.links[i].open().map(|o| &o.phase) {
            Some(Phase::Footer { dropped, .. } | Phase::Closing { dropped, .. }) => *dropped,
            _ => return,
        };
        if dropped > 0 {
            warn!(
                server,
                dropped, "stanzas routed to this instance after its stream footer were dropped"
            );
        }
        info!(server, "stream closed");
        self.close_link(i);
    }

    /// Link `i` is closed for good (at shutdown).
    fn close_link(&mut self, i: LinkId) {
        if !matches!(self.links[i].state, State::Stopped | State::Down { .. }) {
            self.events.push_back(Event::Close { link: i });
        }
        self.links[i].state = State::Stopped;
        self.stop_if_closed();
    }

    fn stop_if_closed(&mut self) {
        if self.stopping == Stopping::Closing
            && self.links.iter().all(|l| matches!(l.state, State::Stopped))
        {
            self.stopping = Stopping::Stopped;
            self.events.push_back(Event::Streams(0));
            self.events.push_back(Event::SessionDown);
            self.events.push_back(Event::Stopped);
        }
    }

    // ---- after every input ----

    /// What is looked at after every input: the upgrade's handover point, the counts for
    /// metrics, the status line for the service manager.
    fn after(&mut self) {
        self.seal();
        if self.stopping != Stopping::No {
            return;
        }
        self.upgrade_point();
        let ups = self.ups();
        if self.streams_reported != Some(ups) {
            self.streams_reported = Some(ups);
            self.events.push_back(Event::Streams(ups));
        }
        if ups > 0 {
            let n = self.proxy.resources().len();
            if self.resources_reported != Some(n) {
                self.resources_reported = Some(n);
                self.events.push_back(Event::Resources(n));
            }
        }
        if ups > 0 && self.upgrade.is_idle() {
            let now = self.status_line();
            if !self.ready_sent {
                self.ready_sent = true;
                self.status = now.clone();
                self.events.push_back(Event::Notify(Notify::Ready(now)));
            } else if now != self.status {
                self.status = now.clone();
                self.events.push_back(Event::Notify(Notify::Status(now)));
            }
        }
    }

    /// Each TLS stream's output is sealed as its socket takes the ciphertext (one record at a
    /// time; see [`tls`]).
    fn seal(&mut self) {
        for l in &mut self.links {
            if let State::Open(open) = &mut l.state
                && let Some(tls) = &mut open.tls
            {
                let last = matches!(open.phase, Phase::Closing { .. });
                tls.seal(open.output.pending(), last);
            }
        }
    }

    /// The status line for the service manager while a stream is up.
    fn status_line(&self) -> String {
        let ups: Vec<&str> = self
            .links
            .iter()
            .filter(|l| l.is_up())
            .map(|l| l.server.as_str())
            .collect();
        let of = if self.links.len() > 1 {
            format!(" ({} of {})", ups.len(), self.links.len())
        } else {
            String::new()
        };
        format!(
            "connected to {}{of} as {}; {} resource(s) of {} online; key {}",
            ups.join(", "),
            self.settings.jid,
            self.proxy.resources().len(),
            self.proxy.settings().target,
            self.proxy.keys().current().id()
        )
    }

    fn report_key(&mut self) {
        let current = self.proxy.keys().current();
        self.events.push_back(Event::Key {
            id: current.id(),
            created: current.created(),
        });
    }
}

/// How a link failed, before its phase says what that means.
enum Failure {
    Io(Io),
    Read(ReadError),
    Tls(TlsFailure),
    Login(LoginError),
    LoginTimedOut,
    Lost(StreamLost),
}

/// Whether a frame is a stanza the server routed to us (not stream-level).
fn routed(inbound: &Inbound) -> bool {
    match inbound {
        Inbound::Element(el) => el.has_ns(NS),
        Inbound::Oversized(_) => true,
    }
}

/// A stream error's conditions and text, for the log.
pub(crate) fn stream_error(el: &Element) -> String {
    let mut parts: Vec<String> = el
        .children()
        .filter(|c| c.name() != "text")
        .map(|c| c.name().to_owned())
        .collect();
    if let Some(t) = el.children().find(|c| c.name() == "text") {
        parts.push(format!("({})", t.text()));
    }
    if parts.is_empty() {
        "stream error".into()
    } else {
        parts.join(" ")
    }
}

/// `ms` ± 20%, so that instances started together do not probe in lockstep.
fn jittered(ms: u64, rng: &mut dyn Random) -> u64 {
    let ms = ms as usize;
    (ms * 8 / 10 + rng.below(ms * 4 / 10 + 1)) as u64
}
