//! The I/O shell: the component connection, its keepalives, reconnection, key reloads and
//! signals. Everything the proxy decides is in [`crate::proxy`]; this module only moves
//! stanzas between the socket and it.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{sleep, sleep_until, timeout};
use tracing::{debug, info, trace, warn};
use xmpp_parsers::component::Handshake;
use xmpp_parsers::minidom::Element;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::inbound::{Inbound, Limits};
use crate::keys::{self, KeySet};
use crate::notify::Notifier;
use crate::proxy::{Clock, Proxy};
use crate::random::OsRandom;
use crate::stanza::{NS, STREAM_NS};
use crate::stream::{Frame, Reader, Writer};
use crate::upgrade::{Handover, Program, Record};
/// Time allowed for TCP connect, stream header and handshake together.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// A session shorter than this does not reset the backoff: a server that accepts and then
/// drops us at once is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Bytes read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// At shutdown, what is read of what the server already sent, at most (in time and bytes).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 4 * 1024 * 1024;
/// At shutdown, the longest any one write may take.
const CLOSE_WRITE_LIMIT: Duration = Duration::from_secs(5);
/// How long the server may take to send its footer after ours.
const FOOTER_WAIT: Duration = Duration::from_secs(2);
/// How long the new binary may take to check the configuration before an upgrade.
const CHECK_LIMIT: Duration = Duration::from_secs(20);
/// How long an upgrade waits for the stream to reach a point it can be handed over at (only
/// an element over the byte limit being dropped as it streams in holds it up).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// How the process was started: what an upgrade `exec`s and checks, and what the previous
/// process handed over, if this one is the result of an upgrade.
pub struct Start {
    /// The command to `exec` for an upgrade.
    pub program: Program,
    /// The configuration file, checked by the new binary before an upgrade.
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

enum End {
    Shutdown,
    Lost(String),
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

/// Runs the component until SIGTERM/SIGINT: connects (or goes on with the stream an
/// upgrade handed over), serves, and reconnects whenever the session is lost.
pub async fn run(config: Config, keys: KeySet, start: Start) -> io::Result<Exit> {
    let mut signals = Signals::new()?;
    let notifier = Notifier::from_env();
    let mut rng = OsRandom::new();
    let mut proxy = Proxy::new(config.proxy.clone(), keys);
    crate::metrics::global().keys(proxy.keys());
    if let Some(addr) = config.metrics.listen {
        crate::http::spawn(addr);
    }
    let mut watch = KeyWatch::new(&config.keys.key_file);
    let mut backoff = Backoff::new(Duration::from_millis(500), config.component.reconnect_max);
    let mut resumed = start.handover.and_then(|h| resume(h, &config));
    let upgrader = Upgrader {
        program: start.program,
        config_path: start.config_path,
        build: start.build,
    };
    loop {
        // Also while disconnected: an instance that takes over must know every key in use.
        watch.reload_if_changed(&config.keys.key_file, &mut proxy, false);
        let session = match resumed.take() {
            Some((conn, record)) => {
                let mut conn = conn;
                for el in proxy.resumed(&record.resources) {
                    conn.queue(&el);
                }
                Some((conn, record.established_unix_ms, record.upgrades))
            }
            None => {
                notifier.status(&format!("connecting to {}", config.component.server));
                let login = tokio::select! {
                    r = kept_alive(login(&config), &notifier) => r,
                    _ = shutdown(&mut signals.term, &mut signals.int) => return Ok(stopped(&notifier)),
                    _ = signals.usr2.recv() => {
                        upgrader.upgrade_disconnected(&notifier).await;
                        continue;
                    }
                };
                match login {
                    Ok(mut conn) => {
                        info!(component = %config.component.jid, server = %config.component.server, "session established");
                        crate::metrics::global().logged_in();
                        for el in proxy.connected() {
                            conn.queue(&el);
                        }
                        Some((conn, unix_now_ms(), 0))
                    }
                    Err(e) => {
                        warn!(server = %config.component.server, "cannot log in: {e}");
                        crate::metrics::global().login_failed();
                        None
                    }
                }
            }
        };
        if let Some((conn, established_ms, upgrades)) = session {
            crate::metrics::global().session_up(established_ms);
            let stream = Stream {
                established_ms,
                upgrades,
            };
            let end = serve(
                conn,
                &config,
                &mut proxy,
                &mut rng,
                &mut signals,
                &mut watch,
                &notifier,
                &upgrader,
                stream,
            )
            .await;
            proxy.disconnected();
            crate::metrics::global().session_down(matches!(end, End::Lost(_)));
            if unix_now_ms().saturating_sub(established_ms) >= STABLE_SESSION.as_millis() as u64 {
                backoff.reset();
            }
            match end {
                End::Shutdown => return Ok(Exit::Signal),
                End::Lost(why) => warn!("session lost: {why}"),
            }
        }
        let delay = backoff.next_delay(&mut rng);
        info!("reconnecting in {} ms", delay.as_millis());
        notifier.status(&format!(
            "reconnecting to {} in {} ms",
            config.component.server,
            delay.as_millis()
        ));
        tokio::select! {
            _ = kept_alive(sleep(delay), &notifier) => {}
            _ = shutdown(&mut signals.term, &mut signals.int) => return Ok(stopped(&notifier)),
            _ = signals.usr2.recv() => upgrader.upgrade_disconnected(&notifier).await,
        }
    }
}

fn stopped(notifier: &Notifier) -> Exit {
    notifier.stopping("stopped while not connected");
    Exit::Signal
}

/// Runs `f`, sending `WATCHDOG=1` meanwhile if the service manager asked for it: waiting to
/// log in again is the serving loop's work too.
async fn kept_alive<F: Future>(f: F, notifier: &Notifier) -> F::Output {
    let Some(every) = notifier.watchdog_every() else {
        return f.await;
    };
    tokio::pin!(f);
    loop {
        tokio::select! {
            r = &mut f => return r,
            _ = sleep(every) => notifier.watchdog(),
        }
    }
}

/// The stream an upgrade handed over, ready to be served — or `None` (logged) when it cannot
/// be used: the record is of another format, or the configuration now names another
/// component or server. The stream is then closed with a footer and an ordinary login
/// follows.
fn resume(h: Handover, config: &Config) -> Option<(Conn, Record)> {
    let unusable = |socket: std::net::TcpStream, why: String| {
        warn!("cannot go on with the stream handed over: {why}; closing it and logging in again");
        close_handed_over(socket);
        None
    };
    let record = match h.record {
        Ok(r) => r,
        Err(e) => return unusable(h.socket, e.to_string()),
    };
    if record.component != config.component.jid || record.server != config.component.server {
        return unusable(
            h.socket,
            format!(
                "it is for {} at {}, the configuration now says {} at {}",
                record.component, record.server, config.component.jid, config.component.server
            ),
        );
    }
    let conn = h
        .socket
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(h.socket))
        .map_err(|e| e.to_string())
        .and_then(|tcp| {
            Conn::resumed(
                tcp,
                config.limits,
                config.component.keepalive_timeout,
                &record.header,
                &record.pending,
            )
            .map_err(|e| e.to_string())
        });
    match conn {
        Ok(conn) => {
            info!(
                component = %config.component.jid,
                server = %config.component.server,
                from_build = %record.build,
                resources = record.resources.len(),
                pending_bytes = record.pending.len(),
                upgrades = record.upgrades,
                "upgraded in place: going on with the same stream"
            );
            Some((conn, record))
        }
        Err(e) => {
            warn!("cannot go on with the stream handed over: {e}; logging in again");
            None
        }
    }
}

/// Ends a handed-over stream this build cannot go on with: our footer, bounded in time.
fn close_handed_over(socket: std::net::TcpStream) {
    use std::io::Write;
    let _ = socket.set_nonblocking(false);
    let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = (&socket).write_all(b"</stream:stream>");
    let _ = socket.shutdown(std::net::Shutdown::Both);
}

/// What an upgrade needs: the command to `exec`, the configuration the new binary checks.
struct Upgrader {
    program: Program,
    config_path: PathBuf,
    build: crate::upgrade::BuildId,
}

/// The running stream's history, carried through upgrades.
#[derive(Clone, Copy)]
struct Stream {
    established_ms: u64,
    upgrades: u64,
}

type Check = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

impl Upgrader {
    /// Has the binary now installed at the program's path check the configuration and the
    /// key file it will run with: the new code judges them, and a binary that does not run
    /// at all is found out here, while this process still serves.
    fn check(&self) -> Check {
        let mut cmd = tokio::process::Command::new(self.program.path());
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("check")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let path = self.program.path().to_owned();
        Box::pin(async move {
            let out = match timeout(CHECK_LIMIT, cmd.output()).await {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => return Err(format!("cannot run {}: {e}", path.display())),
                Err(_) => {
                    return Err(format!(
                        "{} check did not finish within {} s",
                        path.display(),
                        CHECK_LIMIT.as_secs()
                    ));
                }
            };
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            Err(format!(
                "{} check failed ({}): {why}",
                path.display(),
                out.status
            ))
        })
    }

    /// SIGUSR2 while there is no stream: check, then `exec` without a handover.
    async fn upgrade_disconnected(&self, notifier: &Notifier) {
        info!(binary = %self.program.path().display(), "SIGUSR2: upgrading (not connected)");
        notifier.reloading("upgrading: checking the new binary");
        match kept_alive(self.check(), notifier).await {
            Ok(()) => {
                let e = self.program.exec(None);
                warn!(binary = %self.program.path().display(), "upgrade failed: cannot exec: {e}");
            }
            Err(why) => warn!("upgrade refused: {why}"),
        }
        notifier.ready("not connected");
    }
}

/// One connection to the server: the socket's halves, the stream without I/O on top
/// ([`Reader`], [`Writer`]), and what is waiting to be sent. Every write is bounded in time:
/// a server that stops reading ends the session instead of hanging it.
struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    reader: Reader,
    writer: Writer,
    out: Vec<u8>,
    buf: Vec<u8>,
    write_timeout: Duration,
}

impl Conn {
    fn new(tcp: TcpStream, limits: Limits, write_timeout: Duration) -> Conn {
        let (rd, wr) = tcp.into_split();
        Conn {
            rd,
            wr,
            reader: Reader::new(limits),
            writer: Writer::new(),
            out: Vec::with_capacity(4096),
            buf: vec![0; READ_CHUNK],
            write_timeout,
        }
    }

    /// A connection whose stream an upgrade handed over: the reader primed with the stream
    /// header and fed the bytes received after the last complete element.
    fn resumed(
        tcp: TcpStream,
        limits: Limits,
        write_timeout: Duration,
        header: &[u8],
        pending: &[u8],
    ) -> Result<Conn, crate::stream::ReadError> {
        let mut conn = Conn::new(tcp, limits, write_timeout);
        conn.reader = Reader::resume(limits, header)?;
        conn.reader.feed(pending)?;
        conn.writer = Writer::resumed();
        Ok(conn)
    }

    /// Serialises `el` into the output buffer.
    fn queue(&mut self, el: &Element) {
        if let Err(e) = self.writer.element(el, &mut self.out) {
            warn!("{e}: not sent");
        }
    }

    /// Sends the output buffer.
    async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        match timeout(self.write_timeout, self.wr.write_all(&self.out)).await {
            Ok(Ok(())) => {
                self.out.clear();
                if self.out.capacity() > 1024 * 1024 {
                    self.out = Vec::with_capacity(4096);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(format!("cannot send: {e}")),
            Err(_) => Err(format!(
                "the server took nothing we sent for {} s",
                self.write_timeout.as_secs()
            )),
        }
    }

    /// Waits for bytes from the server and gives them to the reader. Cancel-safe.
    async fn read(&mut self) -> Result<(), String> {
        let n = self
            .rd
            .read(&mut self.buf)
            .await
            .map_err(|e| format!("cannot read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.reader.feed(&self.buf[..n]).map_err(|e| e.to_string())
    }

    /// Gives the reader what the socket already holds, without waiting: how many bytes
    /// (0 when there was nothing).
    fn read_ready(&mut self) -> Result<usize, String> {
        match self.rd.try_read(&mut self.buf) {
            Ok(0) => Err("connection closed".into()),
            Ok(n) => self
                .reader
                .feed(&self.buf[..n])
                .map(|()| n)
                .map_err(|e| e.to_string()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(format!("cannot read: {e}")),
        }
    }

    /// The next frame, reading as needed.
    async fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            if let Some(f) = self.reader.next_frame().map_err(|e| e.to_string())? {
                return Ok(f);
            }
            self.read().await?;
        }
    }
}

/// TCP connect, stream header, XEP-0114 handshake.
async fn login(config: &Config) -> io::Result<Conn> {
    let refused = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    let attempt = async {
        let tcp = TcpStream::connect(&config.component.server).await?;
        tcp.set_nodelay(true)?;
        let mut conn = Conn::new(tcp, config.limits, config.component.keepalive_timeout);
        conn.writer
            .header(&[("to", &config.component.jid)], &mut conn.out);
        conn.flush().await.map_err(io::Error::other)?;
        let id = loop {
            match conn.next_frame().await.map_err(io::Error::other)? {
                Frame::Header(h) => {
                    break h.id.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "server sent no stream id")
                    })?;
                }
                Frame::Stanza(Inbound::Element(el)) if el.is("error", STREAM_NS) => {
                    return Err(refused(format!("stream error: {}", stream_error(&el))));
                }
                Frame::Footer => return Err(io::ErrorKind::UnexpectedEof.into()),
                Frame::Stanza(_) => continue,
            }
        };
        let handshake = Handshake::from_stream_id_and_password(id, &config.component.secret);
        conn.queue(&Element::from(handshake));
        conn.flush().await.map_err(io::Error::other)?;
        loop {
            match conn.next_frame().await.map_err(io::Error::other)? {
                Frame::Stanza(Inbound::Element(el)) if el.is("handshake", NS) => return Ok(conn),
                Frame::Stanza(Inbound::Element(el)) if el.is("error", STREAM_NS) => {
                    return Err(refused(format!(
                        "server refused the handshake: {}",
                        stream_error(&el)
                    )));
                }
                Frame::Footer => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => continue,
            }
        }
    };
    timeout(LOGIN_TIMEOUT, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "login timed out"))?
}

fn stream_error(el: &Element) -> String {
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

#[allow(clippy::too_many_arguments)]
async fn serve(
    mut conn: Conn,
    config: &Config,
    proxy: &mut Proxy,
    rng: &mut OsRandom,
    signals: &mut Signals,
    watch: &mut KeyWatch,
    notifier: &Notifier,
    upgrader: &Upgrader,
    stream: Stream,
) -> End {
    let mut reload = tokio::time::interval(config.keys.reload_interval);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_probe = Instant::now() + jittered(config.component.probe_interval, rng);
    let mut last_read = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let watchdog_every = notifier.watchdog_every();
    let mut next_watchdog = Instant::now();
    // The upgrade under way: the new binary checking the configuration, then the wait for a
    // point where the stream can be handed over.
    let mut checking: Option<Check> = None;
    let mut handover_since: Option<Instant> = None;
    let mut status = String::new();
    let mut ready_sent = false;
    loop {
        // Everything complete that was read is handled before anything is sent.
        if let Err(why) = handle_frames(&mut conn, proxy, rng) {
            return End::Lost(why);
        }
        // The watchdog is fed while a slow server takes what we send (bounded by the
        // write timeout, which may exceed the watchdog's).
        if let Err(why) = kept_alive(conn.flush(), notifier).await {
            return End::Lost(why);
        }
        if let Some(since) = handover_since {
            // Every complete stanza read is handled and its answer sent: hand over here,
            // unless the stream is in the middle of something that cannot be handed over.
            // Held requests are not handed over: they are settled (forwarded or refused)
            // within the hold time, and the handover waits for that.
            if let Some(pending) = conn.reader.pending().filter(|_| proxy.held() == 0) {
                handover_since = None;
                hand_over(&conn, pending, config, proxy, upgrader, stream);
                // Still here: exec failed, and this process goes on serving.
                ready_sent = false;
            } else if since.elapsed() >= HANDOVER_WAIT + Duration::from_millis(config.proxy.hold_ms)
            {
                warn!(
                    "upgrade abandoned: the stream was never at a point it could be handed over at (a stanza over the limit streaming in, or requests held for a resource) within {} ms; still serving",
                    (HANDOVER_WAIT + Duration::from_millis(config.proxy.hold_ms)).as_millis()
                );
                handover_since = None;
                ready_sent = false;
            }
        }
        crate::metrics::global().resources(proxy.resources().len());
        if checking.is_none() && handover_since.is_none() {
            let now = format!(
                "connected to {} as {}; {} resource(s) of {} online; key {}",
                config.component.server,
                config.component.jid,
                proxy.resources().len(),
                config.proxy.target,
                proxy.keys().current().id()
            );
            if !ready_sent {
                notifier.ready(&now);
                ready_sent = true;
                status = now;
            } else if now != status {
                notifier.status(&now);
                status = now;
            }
        }
        // Idle for keepalive_interval: ping; no byte for keepalive_timeout after that: dead.
        let wake = match ping_sent {
            None => last_read + config.component.keepalive_interval,
            Some(at) => at + config.component.keepalive_timeout,
        };
        tokio::select! {
            r = conn.read() => {
                if let Err(why) = r {
                    return End::Lost(why);
                }
                last_read = Instant::now();
                ping_sent = None;
            }
            _ = sleep_until(wake.into()) => {
                if ping_sent.is_some() {
                    return End::Lost(format!(
                        "no answer to a keepalive ping within {} s",
                        config.component.keepalive_timeout.as_secs()
                    ));
                }
                debug!("idle: sending keepalive ping");
                conn.queue(&proxy.keepalive());
                ping_sent = Some(Instant::now());
            }
            _ = sleep_until(next_probe.into()) => {
                next_probe = Instant::now() + jittered(config.component.probe_interval, rng);
                conn.queue(&proxy.probe());
            }
            _ = sleep_until(core_due(proxy)), if proxy.poll_timeout().is_some() => {
                proxy.handle_timeout(clock(), rng);
                transmit(&mut conn, proxy);
            }
            _ = sleep_until(next_watchdog.into()), if watchdog_every.is_some() => {
                notifier.watchdog();
                next_watchdog = Instant::now() + watchdog_every.unwrap_or_default();
            }
            _ = shutdown(&mut signals.term, &mut signals.int) => {
                notifier.stopping("closing the stream");
                close(conn, proxy, rng).await;
                return End::Shutdown;
            }
            _ = signals.hup.recv() => {
                info!("SIGHUP: reloading the key file");
                watch.reload_if_changed(&config.keys.key_file, proxy, true);
            }
            _ = signals.usr2.recv() => {
                if checking.is_some() || handover_since.is_some() {
                    info!("SIGUSR2: an upgrade is already under way");
                } else {
                    info!(binary = %upgrader.program.path().display(), "SIGUSR2: upgrading in place");
                    notifier.reloading("upgrading: checking the new binary");
                    checking = Some(upgrader.check());
                }
            }
            r = async { checking.as_mut().expect("guarded").await }, if checking.is_some() => {
                checking = None;
                match r {
                    Ok(()) => handover_since = Some(Instant::now()),
                    Err(why) => {
                        warn!("upgrade refused: {why}; still serving");
                        ready_sent = false;
                    }
                }
            }
            _ = reload.tick() => {
                watch.reload_if_changed(&config.keys.key_file, proxy, false);
            }
        }
    }
}

/// `exec`s the new binary with the stream: returns only if that failed (logged).
fn hand_over(
    conn: &Conn,
    pending: Vec<u8>,
    config: &Config,
    proxy: &Proxy,
    upgrader: &Upgrader,
    stream: Stream,
) {
    let Some(header) = conn.reader.header_bytes() else {
        return;
    };
    let record = Record {
        component: config.component.jid.clone(),
        server: config.component.server.clone(),
        header: header.to_vec(),
        pending,
        resources: proxy
            .resources()
            .eligible_names()
            .map(str::to_owned)
            .collect(),
        established_unix_ms: stream.established_ms,
        build: upgrader.build.get().to_owned(),
        upgrades: stream.upgrades + 1,
    };
    info!(
        binary = %upgrader.program.path().display(),
        pending_bytes = record.pending.len(),
        resources = record.resources.len(),
        "handing the stream over to the new binary"
    );
    let socket: &tokio::net::TcpStream = conn.rd.as_ref();
    let e = upgrader
        .program
        .exec(Some((std::os::fd::AsFd::as_fd(socket), &record)));
    warn!(
        binary = %upgrader.program.path().display(),
        "upgrade failed: cannot exec: {e}; still serving"
    );
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

/// Hands every complete frame the reader holds to the proxy and queues what it answers.
fn handle_frames(conn: &mut Conn, proxy: &mut Proxy, rng: &mut OsRandom) -> Result<(), String> {
    while let Some(frame) = conn.reader.next_frame().map_err(|e| e.to_string())? {
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
        let outcome = proxy.handle(inbound, clock(), rng);
        crate::metrics::global().record(&outcome);
        if let Some(out) = outcome.transmit {
            conn.queue(&out);
        }
        transmit(conn, proxy);
    }
    Ok(())
}

/// Queues what the core sends besides its answers (held requests released or refused,
/// probes).
fn transmit(conn: &mut Conn, proxy: &mut Proxy) {
    while let Some(el) = proxy.poll_transmit() {
        crate::metrics::global().transmitted(&el);
        conn.queue(&el);
    }
}

/// Closes the stream cleanly: first handles every stanza already received (so that nothing
/// the server delivered before the signal is dropped), then sends our footer and waits briefly
/// for the server's. XEP-0114 has no way to ask the server to stop routing first: a stanza it
/// routes to us between our footer and its reading of it can no longer be answered; such
/// stanzas are counted and logged. Every step is bounded in time.
async fn close(mut conn: Conn, proxy: &mut Proxy, rng: &mut OsRandom) {
    // Each write of the shutdown gets at most a few seconds, whatever keepalive_timeout is:
    // a server that stops reading cannot hold SIGTERM up for long.
    conn.write_timeout = conn.write_timeout.min(CLOSE_WRITE_LIMIT);
    // What the socket already holds, handled as it is read; bounded, so that a server that
    // keeps sending cannot hold the shutdown up.
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut drained = 0usize;
    loop {
        if let Err(e) = handle_frames(&mut conn, proxy, rng) {
            debug!("closing the stream: {e}");
            return;
        }
        if Instant::now() >= deadline || drained >= DRAIN_BYTES {
            warn!(
                drained,
                "still receiving at shutdown: closing without reading further"
            );
            break;
        }
        match conn.read_ready() {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) => {
                debug!("closing the stream: {e}");
                break;
            }
        }
    }
    // Requests still waiting for a resource are answered rather than lost with the stream.
    proxy.refuse_held(clock());
    transmit(&mut conn, proxy);
    conn.writer.footer(&mut conn.out);
    if let Err(e) = conn.flush().await {
        debug!("closing the stream: {e}");
        return;
    }
    if let Err(e) = timeout(conn.write_timeout, conn.wr.shutdown()).await {
        debug!("closing the stream: {e}");
        return;
    }
    let mut dropped = 0usize;
    let _ = timeout(FOOTER_WAIT, async {
        loop {
            match conn.next_frame().await {
                Ok(Frame::Stanza(Inbound::Element(el))) if el.has_ns(NS) => dropped += 1,
                Ok(Frame::Stanza(Inbound::Oversized(_))) => dropped += 1,
                Ok(Frame::Footer) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    if dropped > 0 {
        warn!(
            dropped,
            "stanzas routed to this instance after its stream footer were dropped"
        );
    }
    info!("stream closed");
}
