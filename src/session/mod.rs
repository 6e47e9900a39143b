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

mod handover;

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::endpoint::{Endpoint, Event, HandOver, Io, LinkId, Notify, Signal as Sig};
use crate::keys::{self, KeySet};
use crate::notify::Notifier;
use crate::proxy::Clock;
use crate::random::ChaChaRandom;
use crate::upgrade::signals::Held;
use crate::upgrade::{Handover, Program};
use handover::{Check, Upgrader, resume};

/// Bytes read from a socket at once.
const READ_CHUNK: usize = 64 * 1024;

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

/// Tracks the key file so that a rotation made by `jat-proxy keys rotate` (or by another
/// instance) is picked up without a restart.
struct KeyWatch {
    stamp: Option<(SystemTime, u64, u64)>,
}

impl KeyWatch {
    fn new(path: &Path) -> KeyWatch {
        KeyWatch { stamp: stamp(path) }
    }

    /// The key file's keys, if it changed since last read (or whatever its stamp if
    /// `force`).
    fn reload_if_changed(&mut self, path: &Path, force: bool) -> Option<KeySet> {
        let now = stamp(path);
        if !force && now == self.stamp {
            return None;
        }
        match keys::load(path) {
            Ok(set) => {
                self.stamp = now;
                info!(ids = ?set.ids(), current = set.current().id(), "key file reloaded");
                Some(set)
            }
            Err(e) => {
                warn!("{e}; keeping the keys in use");
                None
            }
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
    // The shell owns the metrics: fed by the endpoint's events, read by the monitoring
    // listener.
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    if let Some(addr) = config.metrics.listen {
        crate::http::spawn(addr, metrics.clone());
    }
    let notifier = Notifier::from_env();
    let settings = crate::endpoint::Settings::new(
        &config,
        start.program.path().display().to_string(),
        start.build.clone(),
        notifier.watchdog_every(),
    );
    let mut ep = Endpoint::new(
        settings,
        config.proxy.clone(),
        keys,
        Box::new(ChaChaRandom::new()),
        clock(),
    );
    let mut shell = Shell {
        slots: (0..config.component.servers.len())
            .map(|_| Slot::Closed)
            .collect(),
        watch: KeyWatch::new(&config.keys.key_file),
        upgrader: Upgrader {
            program: start.program,
        },
        notifier,
        metrics,
        buf: vec![0; READ_CHUNK],
        turn: 0,
        config,
    };
    if let Some(h) = start.handover {
        let (streams, resources) = resume(h, &shell.config, &mut ep);
        for (link, tcp) in streams {
            shell.slots[link] = Slot::Open(tcp);
        }
        ep.resumed(&resources, clock());
    }
    // The handlers are in: the signals `main` blocked (and an upgrade held across `exec`)
    // reach them now, those pending at once.
    if let Err(e) = crate::upgrade::signals::unblock() {
        warn!("cannot unblock SIGTERM, SIGINT, SIGHUP and SIGUSR2: {e}");
    }
    Ok(shell.serve(&mut ep, &mut signals).await)
}

/// A link's socket.
enum Slot {
    Closed,
    Connecting(Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>),
    Open(TcpStream),
}

/// What happened on the sockets.
enum Ready {
    Connected(LinkId, io::Result<TcpStream>),
    Readable(LinkId),
    Writable,
}

/// The I/O around the endpoint: the sockets, the key file, the service manager, metrics.
struct Shell {
    config: Config,
    slots: Vec<Slot>,
    watch: KeyWatch,
    upgrader: Upgrader,
    notifier: Notifier,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    buf: Vec<u8>,
    /// The link the next look at the sockets starts at.
    turn: LinkId,
}

impl Shell {
    async fn serve(&mut self, ep: &mut Endpoint, signals: &mut Signals) -> Exit {
        let mut checking: Option<Check> = None;
        loop {
            // Do what the endpoint says, and write what it queued, until it says nothing more.
            loop {
                while let Some(ev) = ep.poll_event() {
                    if let Some(exit) = self.event(ep, ev, signals, &mut checking).await {
                        return exit;
                    }
                }
                self.write(ep);
                if !ep.has_events() {
                    break;
                }
            }
            let due = ep.poll_timeout().map(instant);
            let slots = &mut self.slots;
            let epr = &*ep;
            // Each pass starts looking after the link last read, so that a busy stream does
            // not starve the others.
            let turn = self.turn;
            let ready = std::future::poll_fn(|cx| {
                let n = slots.len();
                for i in (0..n).map(|k| (turn + k) % n) {
                    let slot = &mut slots[i];
                    match slot {
                        Slot::Connecting(f) => {
                            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                                return Poll::Ready(Ready::Connected(i, r));
                            }
                        }
                        Slot::Open(tcp) => {
                            if !epr.poll_transmit(i).is_empty()
                                && let Poll::Ready(_) = tcp.poll_write_ready(cx)
                            {
                                return Poll::Ready(Ready::Writable);
                            }
                            if epr.wants_read(i)
                                && let Poll::Ready(_) = tcp.poll_read_ready(cx)
                            {
                                return Poll::Ready(Ready::Readable(i));
                            }
                        }
                        Slot::Closed => {}
                    }
                }
                Poll::Pending
            });
            // Not biased: a socket that is always ready must leave the signals and the timer
            // their turn.
            tokio::select! {
                r = ready => match r {
                    Ready::Connected(i, Ok(tcp)) => {
                        self.slots[i] = Slot::Open(tcp);
                        ep.connected(i, clock());
                    }
                    Ready::Connected(i, Err(e)) => {
                        self.slots[i] = Slot::Closed;
                        ep.closed(i, Io::Connect(e.to_string()), clock());
                    }
                    Ready::Readable(i) => {
                        self.turn = (i + 1) % self.slots.len();
                        self.read(ep, i);
                    }
                    Ready::Writable => {}
                },
                _ = signals.term.recv() => ep.signal(Sig::Terminate, clock()),
                _ = signals.int.recv() => ep.signal(Sig::Interrupt, clock()),
                _ = signals.hup.recv() => ep.signal(Sig::Reload, clock()),
                _ = signals.usr2.recv() => ep.signal(Sig::Upgrade, clock()),
                r = async { checking.as_mut().expect("guarded").await }, if checking.is_some() => {
                    checking = None;
                    ep.upgrade_checked(r, clock());
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    // A last look at the sockets (the loop may have been busy): what arrived
                    // counts, and what they take now goes out.
                    // Not once the endpoint decided to hand the streams over: what it would
                    // read or write now, the handover record would not hold.
                    for i in 0..self.slots.len() {
                        if ep.handing_over() {
                            break;
                        }
                        if ep.wants_read(i) {
                            self.read(ep, i);
                        }
                    }
                    if !ep.handing_over() {
                        self.write(ep);
                        ep.handle_timeout(clock());
                    }
                }
            }
        }
    }

    /// Reads what link `i`'s socket holds now, without waiting.
    fn read(&mut self, ep: &mut Endpoint, i: LinkId) {
        let Slot::Open(tcp) = &self.slots[i] else {
            return;
        };
        match read_draining(tcp, &mut self.buf) {
            Ok(0) => ep.closed(i, Io::Eof, clock()),
            Ok(n) => ep.read(i, &self.buf[..n], clock()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => ep.closed(i, Io::Read(e.to_string()), clock()),
        }
    }

    /// Writes what each socket takes now, without waiting.
    fn write(&mut self, ep: &mut Endpoint) {
        for i in 0..self.slots.len() {
            while let Slot::Open(tcp) = &self.slots[i] {
                let out = ep.poll_transmit(i);
                if out.is_empty() {
                    break;
                }
                match tcp.try_write(out) {
                    Ok(0) => ep.closed(i, Io::WriteZero, clock()),
                    Ok(n) => {
                        ep.wrote(i, n, clock());
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => ep.wrote(i, 0, clock()),
                    Err(e) => ep.closed(i, Io::Write(e.to_string()), clock()),
                }
                break;
            }
        }
    }

    /// Does what one event says; `Some` once the endpoint stopped.
    async fn event(
        &mut self,
        ep: &mut Endpoint,
        ev: Event,
        signals: &mut Signals,
        checking: &mut Option<Check>,
    ) -> Option<Exit> {
        self.metrics.observe(&ev);
        match ev {
            Event::Connect { link, server } => {
                self.slots[link] = Slot::Connecting(Box::pin(async move {
                    let tcp = TcpStream::connect(&server).await?;
                    tcp.set_nodelay(true)?;
                    Ok(tcp)
                }));
            }
            Event::Close { link } => self.slots[link] = Slot::Closed,
            Event::Drain { link } => {
                while ep.draining(link) {
                    let Slot::Open(tcp) = &self.slots[link] else {
                        break;
                    };
                    match tcp.try_read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => ep.read(link, &self.buf[..n], clock()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            debug!("closing the stream: cannot read: {e}");
                            break;
                        }
                    }
                }
                ep.drained(link, clock());
            }
            Event::ShutdownWrite { link } => {
                if let Slot::Open(tcp) = &self.slots[link] {
                    let _ = socket2_shutdown(tcp);
                }
            }
            Event::CheckUpgrade => *checking = Some(self.upgrader.check()),
            Event::HandOver(h) => {
                match signals.hold().await {
                    Ok(held) => {
                        self.hand_over(h);
                        // Still here: exec failed, and this process goes on serving; the
                        // signals held meanwhile reach the handlers.
                        drop(held);
                    }
                    Err(e) => warn!(
                        "upgrade abandoned: cannot hold the signals across exec: {e}; still serving"
                    ),
                }
                ep.upgrade_failed(clock());
            }
            Event::ReadKeys { force } => {
                if let Some(set) = self
                    .watch
                    .reload_if_changed(&self.config.keys.key_file, force)
                {
                    ep.set_keys(set, clock());
                }
            }
            Event::Notify(n) => match n {
                Notify::Ready(s) => self.notifier.ready(&s),
                Notify::Status(s) => self.notifier.status(&s),
                Notify::Reloading(s) => self.notifier.reloading(&s),
                Notify::Stopping(s) => self.notifier.stopping(&s),
                Notify::Watchdog => self.notifier.watchdog(),
            },
            Event::Stopped => return Some(Exit::Signal),
            _ => {}
        }
        None
    }

    /// `exec`s the new binary with the streams: returns only if that failed (logged).
    fn hand_over(&self, h: HandOver) {
        let program = &self.upgrader.program;
        let Some((_, bytes)) = &h.record else {
            let e = program.exec(None);
            warn!(binary = %program.path().display(), "upgrade failed: cannot exec: {e}");
            return;
        };
        let sockets: Option<Vec<_>> = h
            .links
            .iter()
            .map(|&i| match &self.slots[i] {
                Slot::Open(tcp) => Some(tcp.as_fd()),
                _ => None,
            })
            .collect();
        let Some(sockets) = sockets else {
            // The record names a stream per socket: one missing would pair them wrongly.
            warn!("upgrade failed: a stream to hand over has no socket; still serving");
            return;
        };
        let e = program.exec(Some((&sockets, bytes)));
        warn!(
            binary = %program.path().display(),
            "upgrade failed: cannot exec: {e}; still serving"
        );
    }
}

/// One `recv` of what `tcp` holds, as `try_read` does, except that a read shorter than `buf`
/// also clears the socket's readiness: the kernel handed over all it had, so the loop waits
/// for the next readiness event instead of making one more `recv` that would only return
/// `EAGAIN` (under load, one system call in four). Data arriving after the `recv` raises a
/// new edge-triggered event, which tokio keeps (a clear only drops the readiness it
/// observed before the call), and the end of the stream stays readable (tokio never clears
/// the closed states), so nothing waiting is missed.
fn read_draining(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let r = tcp.try_io(tokio::io::Interest::READABLE, || {
        let (n, _) = rustix::net::recv(tcp, &mut *buf, rustix::net::RecvFlags::empty())?;
        got = Some(n);
        if n > 0 && n < buf.len() {
            // Read, and drained: the readiness goes (the bytes are returned below).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, r) => r,
    }
}

/// Shuts a socket down for writing (our footer is sent).
fn socket2_shutdown(tcp: &TcpStream) -> io::Result<()> {
    let fd = tcp.as_fd().try_clone_to_owned()?;
    let std = std::net::TcpStream::from(fd);
    std.shutdown(std::net::Shutdown::Write)
}

/// A time on the endpoint's monotonic clock, as a tokio instant.
fn instant(mono_ms: u64) -> tokio::time::Instant {
    let now = clock().mono_ms;
    tokio::time::Instant::now() + Duration::from_millis(mono_ms.saturating_sub(now))
}
