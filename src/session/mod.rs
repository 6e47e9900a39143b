//! The I/O shell: the component's streams (one per configured server), their keepalives,
//! reconnection, key reloads, signals and in-place upgrades. Everything the proxy decides is
//! in [`crate::proxy`]; this module only moves stanzas between the sockets and it.
//!
//! `[component] server` names one listener or several (every node of an ejabberd cluster):
//! the session keeps a stream to each, all feeding one core — one presence table, one set
//! of rate limits. ejabberd routes a stanza for the component's domain on the node where
//! it is routed (the sender's), so an instance with a stream on every node hears every
//! resource of the implementing client, wherever it is connected. Each stanza is answered
//! on the stream it came in on; what the core sends on its own (probes, held requests)
//! goes out on the first stream listed with nothing waiting to be written — any stream
//! reaches the whole cluster. Writes never block the loop: a server that reads slowly or
//! not at all holds up its own stream only, and what a lost stream could not send goes out
//! on another.

mod conn;
mod handover;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::sleep_until;
use tracing::{debug, info, trace, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::inbound::Inbound;
use crate::keys::{self, KeySet};
use crate::notify::Notifier;
use crate::proxy::{Clock, Proxy};
use crate::random::OsRandom;
use crate::stanza::STREAM_NS;
use crate::stream::Frame;
use crate::upgrade::signals::Held;
use crate::upgrade::{Handover, Program};
use conn::{CLOSE_WRITE_LIMIT, Conn, LoginParams, PAUSE_READING_AT, login, stream_error};
use handover::{Check, Resumed, Upgrader, resume};

/// A stream shorter than this does not reset its backoff: a server that accepts and then
/// drops us at once is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// At shutdown, what is read of what the server already sent, at most (in time and bytes,
/// per stream).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 4 * 1024 * 1024;
/// How long an upgrade waits for the streams to reach a point they can be handed over at
/// (an element over the byte limit being dropped as it streams in, or output a server has not
/// taken, holds one up; requests held for a resource do not).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);
/// Output waiting on one stream past which the stream is given up (its server takes too
/// little of it; what waits goes out on another stream, if one is up). Reading it pauses
/// long before, at [`PAUSE_READING_AT`].
const MAX_UNSENT: usize = 8 * PAUSE_READING_AT;
/// While an upgrade waits for the streams to reach a point they can be handed over at, they
/// are looked at this often.
const HANDOVER_POLL: Duration = Duration::from_millis(10);

/// How the process was started: what an upgrade `exec`s and checks, and what the previous
/// process handed over, if this one is the result of an upgrade.
pub struct Start {
    /// The command to `exec` for an upgrade.
    pub program: Program,
    /// The configuration file. (Before an upgrade, the new binary checks the one named in
    /// the program's arguments, with which the `exec` would start it.)
    pub config_path: PathBuf,
    /// This build's id (for the log and the handover record).
    pub build: crate::upgrade::BuildId,
    /// What the process before the `exec` handed over.
    pub handover: Option<Handover>,
}

impl Start {
    /// A process started afresh (not by an upgrade) with the configuration at `config_path`.
    pub fn fresh(config_path: PathBuf) -> io::Result<Start> {
        Ok(Start {
            program: Program::current()?,
            config_path,
            build: crate::upgrade::BuildId::compute(),
            handover: None,
        })
    }
}

/// Why `run` returned.
#[derive(Debug)]
pub enum Exit {
    /// SIGTERM or SIGINT: the stream was closed cleanly.
    Signal,
}

/// Current time in Unix seconds.
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// The core's clock: Unix time for tokens, and a monotonic clock (from the first call in the
/// process) for rate limits, which a step of the wall clock must not disturb.
fn clock() -> Clock {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    Clock {
        unix_ms: unix_now_ms(),
        mono_ms: STARTED.get_or_init(Instant::now).elapsed().as_millis() as u64,
    }
}

/// Current time in Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Before an `exec`: blocks the signals on this thread (the one that `exec`s; every
    /// other thread has them blocked for good, see [`crate::upgrade::signals`]), and raises
    /// again, while blocked, each one the handlers caught that the loop has not acted on.
    /// Until the returned [`Held`] is dropped (the `exec` failed) or the new process has its
    /// handlers in, every one of them waits, pending: none ends the process, none is lost.
    async fn hold(&mut self) -> io::Result<Held> {
        use crate::upgrade::signals::Signal;
        use std::task::{Context, Poll};
        let held = Held::hold()?;
        // A signal the handler caught is on the runtime's signal pipe until the driver reads
        // it: yielding once has the (current-thread) runtime poll its driver, which hands
        // what it read to the receivers below.
        tokio::task::yield_now().await;
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        for (rx, sig) in [
            (&mut self.term, Signal::SIGTERM),
            (&mut self.int, Signal::SIGINT),
            (&mut self.hup, Signal::SIGHUP),
            (&mut self.usr2, Signal::SIGUSR2),
        ] {
            if let Poll::Ready(Some(())) = rx.poll_recv(&mut cx) {
                debug!(signal = %sig, "held for the new process");
                held.again(sig)?;
            }
        }
        Ok(held)
    }
}

async fn shutdown(term: &mut tokio::signal::unix::Signal, int: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}

/// Tracks the key file so that a rotation made by `jat-proxy keys rotate` (or by another
/// instance) is picked up without a restart.
struct KeyWatch {
    stamp: Option<(SystemTime, u64, u64)>,
}

impl KeyWatch {
    fn new(path: &Path) -> KeyWatch {
        KeyWatch { stamp: stamp(path) }
    }

    fn reload_if_changed(&mut self, path: &Path, proxy: &mut Proxy, force: bool) {
        let now = stamp(path);
        if !force && now == self.stamp {
            return;
        }
        match keys::load(path) {
            Ok(set) => {
                self.stamp = now;
                info!(ids = ?set.ids(), current = set.current().id(), "key file reloaded");
                proxy.set_keys(set);
                crate::metrics::global().keys(proxy.keys());
            }
            Err(e) => warn!("{e}; keeping the keys in use"),
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Runs the component until SIGTERM/SIGINT: connects to every configured server (or goes
/// on with the streams an upgrade handed over), serves, and reconnects each stream whenever
/// it is lost.
pub async fn run(config: Config, keys: KeySet, start: Start) -> io::Result<Exit> {
    let mut signals = Signals::new()?;
    let proxy = Proxy::new(config.proxy.clone(), keys);
    crate::metrics::global().keys(proxy.keys());
    crate::metrics::global().servers(config.component.servers.len());
    if let Some(addr) = config.metrics.listen {
        crate::http::spawn(addr);
    }
    let links = config
        .component
        .servers
        .iter()
        .map(|server| Link {
            server: server.clone(),
            state: State::Down {
                retry_at: Instant::now(),
            },
            backoff: Backoff::new(Duration::from_millis(500), config.component.reconnect_max),
        })
        .collect();
    let mut shell = Shell {
        login: LoginParams {
            jid: config.component.jid.clone(),
            secret: config.component.secret.clone(),
            limits: config.limits,
            write_timeout: config.component.keepalive_timeout,
        },
        watch: KeyWatch::new(&config.keys.key_file),
        config,
        proxy,
        rng: OsRandom::new(),
        notifier: Notifier::from_env(),
        upgrader: Upgrader {
            program: start.program,
            build: start.build,
            reads: Vec::new(),
        },
        links,
        turn: 0,
        up: false,
    };
    if let Some(h) = start.handover {
        let (resumed, resources) = resume(h, &shell.config);
        shell.resumed(resumed, &resources);
    }
    // The handlers are in: the signals `main` blocked (and an upgrade held across `exec`)
    // reach them now, those pending at once.
    if let Err(e) = crate::upgrade::signals::unblock() {
        warn!("cannot unblock SIGTERM, SIGINT, SIGHUP and SIGUSR2: {e}");
    }
    Ok(shell.serve(&mut signals).await)
}

/// The running stream's history, carried through upgrades.
#[derive(Clone, Copy)]
struct Stream {
    established_ms: u64,
    upgrades: u64,
}

/// One configured server and the session's stream to it.
struct Link {
    server: String,
    state: State,
    backoff: Backoff,
}

enum State {
    Up(Box<Up>),
    Connecting(Pin<Box<dyn Future<Output = io::Result<Box<Conn>>> + Send>>),
    /// Not connected: the next login attempt is due at `retry_at`.
    Down {
        retry_at: Instant,
    },
}

/// A stream that is up.
struct Up {
    conn: Conn,
    stream: Stream,
    last_read: Instant,
    ping_sent: Option<Instant>,
}

impl Up {
    fn new(conn: Conn, stream: Stream) -> Box<Up> {
        Box::new(Up {
            conn,
            stream,
            last_read: Instant::now(),
            ping_sent: None,
        })
    }

    /// Idle for keepalive_interval: ping; no byte for keepalive_timeout after that: dead.
    /// Output that waits: the server must take some of it within the write timeout.
    fn wake(&self, c: &crate::config::Component) -> Instant {
        let keepalive = match self.ping_sent {
            None => self.last_read + c.keepalive_interval,
            Some(at) => at + c.keepalive_timeout,
        };
        self.conn
            .write_deadline()
            .map_or(keepalive, |w| w.min(keepalive))
    }
}

/// What happened on the links.
enum LinkEvent {
    /// Bytes were read (given to the stream's reader), or the stream failed (reading or
    /// writing).
    Read(usize, Result<(), String>),
    /// A login finished.
    LoggedIn(usize, io::Result<Box<Conn>>),
}

/// The session: the core, the links, and what the shell needs around them.
struct Shell {
    config: Config,
    login: LoginParams,
    proxy: Proxy,
    rng: OsRandom,
    notifier: Notifier,
    upgrader: Upgrader,
    watch: KeyWatch,
    links: Vec<Link>,
    /// Which link is polled first next (so that a busy stream cannot starve the others).
    turn: usize,
    /// Whether any stream is up (the session is up).
    up: bool,
}

impl Shell {
    fn up_mut(&mut self, i: usize) -> Option<&mut Up> {
        match &mut self.links[i].state {
            State::Up(up) => Some(up),
            _ => None,
        }
    }

    /// The stream what the core sends on its own goes out on: the first one listed with
    /// nothing waiting to be written, else the one with least waiting (a server that reads
    /// slowly does not hold it up).
    fn out_link(&self) -> Option<usize> {
        self.links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.state {
                State::Up(up) => Some((up.conn.unsent(), i)),
                _ => None,
            })
            .min()
            .map(|(_, i)| i)
    }

    fn ups(&self) -> usize {
        self.links
            .iter()
            .filter(|l| matches!(l.state, State::Up(_)))
            .count()
    }

    /// Streams an upgrade handed over: served at once, with the resources known then.
    fn resumed(&mut self, resumed: Vec<Resumed>, resources: &[String]) {
        for r in resumed {
            let Some(i) = self.links.iter().position(|l| l.server == r.server) else {
                continue;
            };
            self.links[i].state = State::Up(Up::new(r.conn, r.stream));
        }
        if let Some(first) = self.out_link() {
            let probe = self.proxy.resumed(resources);
            if let Some(up) = self.up_mut(first) {
                for el in &probe {
                    up.conn.queue(el);
                }
            }
            self.session_up(first);
        }
    }

    /// The session came up with link `i` (no stream was up before).
    fn session_up(&mut self, i: usize) {
        self.up = true;
        if let State::Up(up) = &self.links[i].state {
            crate::metrics::global().session_up(up.stream.established_ms);
        }
    }

    /// Link `i` logged in.
    fn logged_in(&mut self, i: usize, conn: Conn) {
        let server = self.links[i].server.clone();
        info!(component = %self.config.component.jid, server = %server, "session established");
        crate::metrics::global().logged_in();
        let stream = Stream {
            established_ms: unix_now_ms(),
            upgrades: 0,
        };
        let mut up = Up::new(conn, stream);
        if self.up {
            // Presence answers come on the node of each resource: ask again, now that this
            // stream's node can route them here too.
            for el in self.proxy.joined() {
                up.conn.queue(&el);
            }
            self.links[i].state = State::Up(up);
        } else {
            for el in self.proxy.connected() {
                up.conn.queue(&el);
            }
            self.links[i].state = State::Up(up);
            self.session_up(i);
        }
    }

    /// Link `i`'s login failed or its stream was lost: it logs in again after its backoff.
    fn down(&mut self, i: usize, established_ms: Option<u64>) {
        let link = &mut self.links[i];
        if established_ms
            .is_some_and(|at| unix_now_ms().saturating_sub(at) >= STABLE_SESSION.as_millis() as u64)
        {
            link.backoff.reset();
        }
        let delay = link.backoff.next_delay(&mut self.rng);
        link.state = State::Down {
            retry_at: Instant::now() + delay,
        };
        info!(server = %link.server, "reconnecting in {} ms", delay.as_millis());
        if self.ups() == 0 {
            if self.up {
                self.up = false;
                self.proxy.disconnected();
                crate::metrics::global().session_down();
            }
            self.notifier.status(&format!(
                "reconnecting to {} in {} ms",
                self.links[i].server,
                delay.as_millis()
            ));
        }
    }

    /// Link `i`'s stream failed.
    fn lost(&mut self, i: usize, why: String) {
        let established = match &self.links[i].state {
            State::Up(up) => up.stream.established_ms,
            _ => return,
        };
        warn!(server = %self.links[i].server, "session lost: {why}");
        crate::metrics::global().stream_lost();
        // What the server cannot have received goes out on another stream, if one is up:
        // any stream reaches the whole cluster.
        let unsent = self.up_mut(i).and_then(|up| up.conn.take_unsent());
        self.down(i, Some(established));
        if let Some(bytes) = unsent
            && let Some(j) = self.out_link()
            && let Some(up) = self.up_mut(j)
        {
            debug!(
                bytes = bytes.len(),
                "sending what the lost stream could not"
            );
            up.conn.queue_bytes(&bytes);
        }
        // Other streams are up: what was learnt through this one may have gone with its
        // server (the resources connected to that node): relearn.
        if let Some(first) = self.out_link() {
            let probe = self.proxy.stream_lost();
            if let Some(up) = self.up_mut(first) {
                up.conn.queue(&probe);
            }
        }
    }

    /// Hands every complete frame link `i`'s reader holds to the proxy, and queues what it
    /// answers on the same stream and what it sends on its own on [`Shell::out_link`].
    fn handle_frames(&mut self, i: usize) -> Result<(), String> {
        loop {
            let Some(up) = self.up_mut(i) else {
                return Ok(());
            };
            let Some(frame) = up.conn.reader.next_frame().map_err(|e| e.to_string())? else {
                return Ok(());
            };
            let inbound = match frame {
                Frame::Footer => return Err("server closed the stream".into()),
                Frame::Header(_) => return Err("the server opened a second stream".into()),
                Frame::Stanza(Inbound::Element(el)) if el.is("error", STREAM_NS) => {
                    return Err(format!("stream error from server: {}", stream_error(&el)));
                }
                Frame::Stanza(inbound) => inbound,
            };
            if let Inbound::Element(el) = &inbound {
                trace!(xml = %String::from(el), "in");
            }
            let outcome = self.proxy.handle(inbound, clock(), &mut self.rng);
            crate::metrics::global().record(&outcome);
            if let Some(out) = outcome.transmit
                && let Some(up) = self.up_mut(i)
            {
                up.conn.queue(&out);
            }
            self.transmit();
        }
    }

    /// Queues what the core sends besides its answers (held requests released or refused,
    /// probes) on [`Shell::out_link`].
    fn transmit(&mut self) {
        let Some(first) = self.out_link() else {
            return;
        };
        while let Some(outcome) = self.proxy.poll_transmit(clock(), &mut self.rng) {
            crate::metrics::global().record(&outcome);
            if let Some(el) = &outcome.transmit
                && let Some(up) = self.up_mut(first)
            {
                up.conn.queue(el);
            }
        }
    }

    /// Handles what every stream read, then writes what was queued, as far as each socket
    /// takes it now (the rest is written as the event loop finds room: a server that reads
    /// slowly holds up its own stream only); a stream that fails is lost (and logs in
    /// again).
    fn pump(&mut self) {
        for i in 0..self.links.len() {
            if let Err(why) = self.handle_frames(i) {
                self.lost(i, why);
            }
        }
        // Again while a stream failed: what its loss queued (a probe) goes out now too.
        loop {
            let mut failed = false;
            for i in 0..self.links.len() {
                let State::Up(up) = &mut self.links[i].state else {
                    continue;
                };
                let r = up.conn.write_now().and_then(|()| {
                    if up.conn.unsent() > MAX_UNSENT {
                        Err(format!(
                            "the server takes too little of what we send ({} bytes wait)",
                            up.conn.unsent()
                        ))
                    } else {
                        Ok(())
                    }
                });
                if let Err(why) = r {
                    self.lost(i, why);
                    failed = true;
                }
            }
            if !failed {
                break;
            }
        }
    }

    /// Starts the logins that are due.
    fn connect_due(&mut self) {
        let now = Instant::now();
        let mut connecting = Vec::new();
        for link in &mut self.links {
            if let State::Down { retry_at } = link.state
                && retry_at <= now
            {
                connecting.push(link.server.clone());
                let (server, params) = (link.server.clone(), self.login.clone());
                link.state = State::Connecting(Box::pin(async {
                    login(server, params).await.map(Box::new)
                }));
            }
        }
        if !connecting.is_empty() && self.ups() == 0 {
            self.notifier
                .status(&format!("connecting to {}", connecting.join(", ")));
        }
    }

    /// The next login attempt due, if a link is down.
    fn next_retry(&self) -> Option<Instant> {
        self.links
            .iter()
            .filter_map(|l| match l.state {
                State::Down { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()
    }

    /// The next keepalive due on a stream, if any is up.
    fn next_keepalive(&self) -> Option<Instant> {
        self.links
            .iter()
            .filter_map(|l| match &l.state {
                State::Up(up) => Some(up.wake(&self.config.component)),
                _ => None,
            })
            .min()
    }

    /// Keepalives due: a ping on a stream idle for `keepalive_interval`, and a stream
    /// whose ping went unanswered for `keepalive_timeout` is lost.
    fn keepalive(&mut self) {
        let now = Instant::now();
        for i in 0..self.links.len() {
            let c = &self.config.component;
            let timeout = c.keepalive_timeout;
            let State::Up(up) = &mut self.links[i].state else {
                continue;
            };
            if up.wake(&self.config.component) > now {
                continue;
            }
            if up.conn.write_deadline().is_some_and(|d| d <= now) {
                // A last attempt: the socket may have room now (the loop was busy).
                let before = up.conn.unsent();
                let r = up.conn.write_now();
                if r.is_ok() && up.conn.unsent() < before {
                    continue;
                }
                let why = r.err().unwrap_or_else(|| up.conn.stalled());
                self.lost(i, why);
                continue;
            }
            if up.ping_sent.is_some() {
                if up.conn.unsent() > 0 {
                    // Output waits (the ping behind it): the write deadline judges the
                    // stream while the server takes it.
                    up.ping_sent = Some(now);
                    continue;
                }
                // Bytes that arrived but were not read yet count (the loop was busy).
                match up.conn.read_ready() {
                    Ok(0) => {}
                    Ok(_) => {
                        up.last_read = now;
                        up.ping_sent = None;
                        continue;
                    }
                    Err(e) => {
                        self.lost(i, e);
                        continue;
                    }
                }
                let why = format!(
                    "no answer to a keepalive ping within {} s",
                    timeout.as_secs()
                );
                self.lost(i, why);
                continue;
            }
            debug!(server = %self.links[i].server, "idle: sending keepalive ping");
            let ping = self.proxy.keepalive();
            if let State::Up(up) = &mut self.links[i].state {
                up.conn.queue(&ping);
                up.ping_sent = Some(now);
            }
        }
    }

    /// The status line for the service manager while a stream is up.
    fn status(&self) -> String {
        let ups: Vec<&str> = self
            .links
            .iter()
            .filter(|l| matches!(l.state, State::Up(_)))
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
            self.config.component.jid,
            self.proxy.resources().len(),
            self.config.proxy.target,
            self.proxy.keys().current().id()
        )
    }

    /// Every stream up, with the bytes of its element not yet complete, if all of them
    /// are at a point where they can be handed over. Requests held for a resource do not
    /// hold the upgrade up: they are handed over as XML for the new process to read first.
    fn handover_point(&self) -> Option<Vec<(usize, Vec<u8>)>> {
        self.links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.state {
                State::Up(up) => Some(
                    up.conn
                        .reader
                        .pending()
                        .filter(|_| up.conn.unsent() == 0)
                        .map(|p| (i, p)),
                ),
                _ => None,
            })
            .collect()
    }

    /// `exec`s the new binary with every stream up: returns only if that failed (logged).
    fn hand_over(&self, mut pending: Vec<(usize, Vec<u8>)>) {
        // Held requests go first on the first stream: the new process reads them as it
        // reads what the server sent, and holds them again (the hold time starts anew).
        if let Some((_, first)) = pending.first_mut()
            && self.proxy.held() > 0
        {
            let mut held: Vec<u8> = self.proxy.held_xml().flat_map(str::bytes).collect();
            held.append(first);
            *first = held;
        }
        let streams: Vec<_> = pending
            .into_iter()
            .filter_map(|(i, p)| match &self.links[i].state {
                State::Up(up) => Some((self.links[i].server.as_str(), &up.conn, p, up.stream)),
                _ => None,
            })
            .collect();
        if streams.is_empty() {
            let e = self.upgrader.program.exec(None);
            warn!(binary = %self.upgrader.program.path().display(), "upgrade failed: cannot exec: {e}");
            return;
        }
        let resources = self
            .proxy
            .resources()
            .eligible_names()
            .map(str::to_owned)
            .collect();
        self.upgrader
            .hand_over(&self.config.component.jid, &streams, resources);
    }

    /// An upgrade did not happen: the service manager hears that this process serves on
    /// (at once while no stream is up; with the status line once one is).
    fn upgrade_failed(&self, ready_sent: &mut bool) {
        *ready_sent = false;
        if self.ups() == 0 {
            self.notifier.ready("not connected");
        }
    }

    async fn serve(&mut self, signals: &mut Signals) -> Exit {
        let mut reload = tokio::time::interval(self.config.keys.reload_interval);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_probe =
            Instant::now() + jittered(self.config.component.probe_interval, &mut self.rng);
        let watchdog_every = self.notifier.watchdog_every();
        let mut next_watchdog = Instant::now();
        // The upgrade under way: the new binary checking the configuration, then the wait
        // for a point where the streams can be handed over.
        let mut checking: Option<Check> = None;
        let mut handover_since: Option<Instant> = None;
        let mut status = String::new();
        let mut ready_sent = false;
        loop {
            self.connect_due();
            // Everything complete that was read is handled before anything is sent.
            self.pump();
            if let Some(since) = handover_since {
                if let Some(pending) = self.handover_point() {
                    handover_since = None;
                    match signals.hold().await {
                        Ok(held) => {
                            self.hand_over(pending);
                            // Still here: exec failed, and this process goes on serving; the
                            // signals held meanwhile reach the handlers.
                            drop(held);
                        }
                        Err(e) => warn!(
                            "upgrade abandoned: cannot hold the signals across exec: {e}; still serving"
                        ),
                    }
                    self.upgrade_failed(&mut ready_sent);
                } else if since.elapsed() >= HANDOVER_WAIT {
                    warn!(
                        "upgrade abandoned: the streams were never at a point they could be handed over at (a stanza over the limit streaming in, or output the server did not take) within {} ms; still serving",
                        HANDOVER_WAIT.as_millis()
                    );
                    handover_since = None;
                    self.upgrade_failed(&mut ready_sent);
                }
            }
            let ups = self.ups();
            crate::metrics::global().streams(ups);
            if ups > 0 {
                crate::metrics::global().resources(self.proxy.resources().len());
            }
            if ups > 0 && checking.is_none() && handover_since.is_none() {
                let now = self.status();
                if !ready_sent {
                    self.notifier.ready(&now);
                    ready_sent = true;
                    status = now;
                } else if now != status {
                    self.notifier.status(&now);
                    status = now;
                }
            }
            let keepalive = self.next_keepalive();
            let retry = self.next_retry();
            let turn = self.turn;
            let links = &mut self.links;
            let event = std::future::poll_fn(|cx| {
                let n = links.len();
                for k in 0..n {
                    let i = (turn + k) % n;
                    match &mut links[i].state {
                        State::Up(up) => {
                            if up.conn.unsent() > 0
                                && let Poll::Ready(Err(e)) = up.conn.poll_write(cx)
                            {
                                return Poll::Ready(LinkEvent::Read(i, Err(e)));
                            }
                            // A server that does not take what we send is not read either
                            // (past a bound), as the server applies back-pressure to us.
                            if up.conn.unsent() < PAUSE_READING_AT
                                && let Poll::Ready(r) = up.conn.poll_read(cx)
                            {
                                return Poll::Ready(LinkEvent::Read(i, r));
                            }
                        }
                        State::Connecting(f) => {
                            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                                return Poll::Ready(LinkEvent::LoggedIn(i, r));
                            }
                        }
                        State::Down { .. } => {}
                    }
                }
                Poll::Pending
            });
            tokio::select! {
                ev = event => match ev {
                    LinkEvent::Read(i, Ok(())) => {
                        // The next poll starts after this link: none starves the others.
                        self.turn = (i + 1) % self.links.len();
                        if let Some(up) = self.up_mut(i) {
                            up.last_read = Instant::now();
                            up.ping_sent = None;
                        }
                    }
                    LinkEvent::Read(i, Err(why)) => self.lost(i, why),
                    LinkEvent::LoggedIn(i, Ok(conn)) => self.logged_in(i, *conn),
                    LinkEvent::LoggedIn(i, Err(e)) => {
                        warn!(server = %self.links[i].server, "cannot log in: {e}");
                        crate::metrics::global().login_failed();
                        self.down(i, None);
                    }
                },
                _ = sleep_until(keepalive.unwrap_or_else(Instant::now).into()), if keepalive.is_some() => {
                    self.keepalive();
                }
                _ = sleep_until(retry.unwrap_or_else(Instant::now).into()), if retry.is_some() => {}
                _ = tokio::time::sleep(HANDOVER_POLL), if handover_since.is_some() => {}
                _ = sleep_until(next_probe.into()) => {
                    next_probe = Instant::now() + jittered(self.config.component.probe_interval, &mut self.rng);
                    let probe = self.proxy.probe();
                    if let Some(up) = self.out_link().and_then(|i| self.up_mut(i)) {
                        up.conn.queue(&probe);
                    }
                }
                _ = sleep_until(core_due(&self.proxy)), if self.proxy.poll_timeout().is_some() => {
                    self.proxy.handle_timeout(clock());
                    self.transmit();
                }
                _ = sleep_until(next_watchdog.into()), if watchdog_every.is_some() => {
                    self.notifier.watchdog();
                    next_watchdog = Instant::now() + watchdog_every.unwrap_or_default();
                }
                _ = shutdown(&mut signals.term, &mut signals.int) => {
                    if self.ups() == 0 {
                        self.notifier.stopping("stopped while not connected");
                    } else {
                        self.notifier.stopping("closing the stream");
                        self.close().await;
                    }
                    crate::metrics::global().streams(0);
                    crate::metrics::global().session_down();
                    return Exit::Signal;
                }
                _ = signals.hup.recv() => {
                    info!("SIGHUP: reloading the key file");
                    self.watch.reload_if_changed(&self.config.keys.key_file, &mut self.proxy, true);
                }
                _ = signals.usr2.recv() => {
                    if checking.is_some() || handover_since.is_some() {
                        info!("SIGUSR2: an upgrade is already under way");
                    } else {
                        info!(binary = %self.upgrader.program.path().display(), "SIGUSR2: upgrading in place");
                        self.notifier.reloading("upgrading: checking the new binary");
                        checking = Some(self.upgrader.check());
                    }
                }
                r = async { checking.as_mut().expect("guarded").await }, if checking.is_some() => {
                    checking = None;
                    match r.and_then(|reads| self.upgrader.accept(reads, self.ups())) {
                        Ok(()) => handover_since = Some(Instant::now()),
                        Err(why) => {
                            warn!("upgrade refused: {why}; still serving");
                            self.upgrade_failed(&mut ready_sent);
                        }
                    }
                }
                _ = reload.tick() => {
                    // Also while disconnected: an instance that takes over must know every
                    // key in use.
                    self.watch.reload_if_changed(&self.config.keys.key_file, &mut self.proxy, false);
                }
            }
        }
    }

    /// Closes every stream cleanly: first handles every stanza already received on any of
    /// them (so that nothing the server delivered before the signal is dropped), answers
    /// the requests still held, then sends each our footer and waits briefly for the
    /// server's. Every step is bounded in time.
    async fn close(&mut self) {
        for i in 0..self.links.len() {
            if let Some(up) = self.up_mut(i) {
                // Each write of the shutdown gets at most a few seconds, whatever
                // keepalive_timeout is: a server that stops reading cannot hold SIGTERM up
                // for long.
                up.conn.write_timeout = up.conn.write_timeout.min(CLOSE_WRITE_LIMIT);
            }
            // What the socket already holds, handled as it is read; bounded, so that a
            // server that keeps sending cannot hold the shutdown up.
            let deadline = Instant::now() + DRAIN_LIMIT;
            let mut drained = 0usize;
            loop {
                if let Err(e) = self.handle_frames(i) {
                    debug!(server = %self.links[i].server, "closing the stream: {e}");
                    self.links[i].state = State::Down {
                        retry_at: Instant::now(),
                    };
                    break;
                }
                let Some(up) = self.up_mut(i) else {
                    break;
                };
                if Instant::now() >= deadline || drained >= DRAIN_BYTES {
                    warn!(
                        server = %self.links[i].server,
                        drained,
                        "still receiving at shutdown: closing without reading further"
                    );
                    break;
                }
                match up.conn.read_ready() {
                    Ok(0) => break,
                    Ok(n) => drained += n,
                    Err(e) => {
                        debug!("closing the stream: {e}");
                        break;
                    }
                }
            }
        }
        // Requests still waiting for a resource are answered rather than lost with the
        // streams.
        self.proxy.refuse_held(clock());
        self.transmit();
        let mut ends = Vec::new();
        for link in &mut self.links {
            let state = std::mem::replace(
                &mut link.state,
                State::Down {
                    retry_at: Instant::now(),
                },
            );
            if let State::Up(up) = state {
                let server = link.server.clone();
                ends.push(async move { up.conn.finish(&server).await });
            }
        }
        futures::future::join_all(ends).await;
    }
}

/// When the core asked to be given the time (see [`Proxy::poll_timeout`]), as an instant.
fn core_due(proxy: &Proxy) -> tokio::time::Instant {
    let now = clock().mono_ms;
    let due = proxy.poll_timeout().unwrap_or(now);
    tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now))
}

/// `d` ± 20%, so that instances started together do not probe in lockstep.
fn jittered(d: Duration, rng: &mut OsRandom) -> Duration {
    use crate::random::Random;
    let ms = d.as_millis() as usize;
    Duration::from_millis((ms * 8 / 10 + rng.below(ms * 4 / 10 + 1)) as u64)
}
