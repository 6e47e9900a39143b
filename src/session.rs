//! The I/O shell: the component connection, its keepalives, reconnection, key reloads and
//! signals. Everything the proxy decides is in [`crate::proxy`]; this module only moves
//! stanzas between the socket and it.

use std::io;
use std::path::Path;
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
use crate::proxy::{Clock, Proxy, Verdict};
use crate::random::OsRandom;
use crate::stanza::{Condition, NS, STREAM_NS};
use crate::stream::{Frame, Reader, Writer};
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
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn shutdown(&mut self) {
        shutdown(&mut self.term, &mut self.int).await
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

/// Runs the component until SIGTERM/SIGINT: connects, serves, and reconnects whenever the
/// session is lost.
pub async fn run(config: Config, keys: KeySet) -> io::Result<Exit> {
    let mut signals = Signals::new()?;
    let mut rng = OsRandom::new();
    let mut proxy = Proxy::new(config.settings(), keys);
    let mut watch = KeyWatch::new(&config.key_file);
    let mut backoff = Backoff::new(Duration::from_millis(500), config.reconnect_max);
    loop {
        // Also while disconnected: an instance that takes over must know every key in use.
        watch.reload_if_changed(&config.key_file, &mut proxy, false);
        let login = tokio::select! {
            r = login(&config) => r,
            _ = signals.shutdown() => return Ok(Exit::Signal),
        };
        match login {
            Ok(conn) => {
                info!(component = %config.jid, server = %config.server, "session established");
                let started = Instant::now();
                let end = serve(
                    conn,
                    &config,
                    &mut proxy,
                    &mut rng,
                    &mut signals,
                    &mut watch,
                )
                .await;
                proxy.disconnected();
                if started.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                }
                match end {
                    End::Shutdown => return Ok(Exit::Signal),
                    End::Lost(why) => warn!("session lost: {why}"),
                }
            }
            Err(e) => warn!(server = %config.server, "cannot log in: {e}"),
        }
        let delay = backoff.next_delay(&mut rng);
        info!("reconnecting in {} ms", delay.as_millis());
        tokio::select! {
            _ = sleep(delay) => {}
            _ = signals.shutdown() => return Ok(Exit::Signal),
        }
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
        let tcp = TcpStream::connect(&config.server).await?;
        tcp.set_nodelay(true)?;
        let mut conn = Conn::new(tcp, config.limits, config.keepalive_timeout);
        conn.writer.header(&[("to", &config.jid)], &mut conn.out);
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
        let handshake = Handshake::from_stream_id_and_password(id, &config.secret);
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

async fn serve(
    mut conn: Conn,
    config: &Config,
    proxy: &mut Proxy,
    rng: &mut OsRandom,
    signals: &mut Signals,
    watch: &mut KeyWatch,
) -> End {
    for el in proxy.connected() {
        conn.queue(&el);
    }
    let mut reload = tokio::time::interval(config.key_reload_interval);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_probe = Instant::now() + jittered(config.probe_interval, rng);
    let mut urgent_probe = Instant::now();
    let mut last_read = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    loop {
        // Everything complete that was read is handled before anything is sent.
        if let Err(why) = handle_frames(&mut conn, proxy, rng, &mut urgent_probe) {
            return End::Lost(why);
        }
        if let Err(why) = conn.flush().await {
            return End::Lost(why);
        }
        // Idle for keepalive_interval: ping; no byte for keepalive_timeout after that: dead.
        let wake = match ping_sent {
            None => last_read + config.keepalive_interval,
            Some(at) => at + config.keepalive_timeout,
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
                        config.keepalive_timeout.as_secs()
                    ));
                }
                debug!("idle: sending keepalive ping");
                conn.queue(&proxy.keepalive());
                ping_sent = Some(Instant::now());
            }
            _ = sleep_until(next_probe.into()) => {
                next_probe = Instant::now() + jittered(config.probe_interval, rng);
                conn.queue(&proxy.probe());
            }
            _ = shutdown(&mut signals.term, &mut signals.int) => {
                close(conn, proxy, rng).await;
                return End::Shutdown;
            }
            _ = signals.hup.recv() => {
                info!("SIGHUP: reloading the key file");
                watch.reload_if_changed(&config.key_file, proxy, true);
            }
            _ = reload.tick() => {
                watch.reload_if_changed(&config.key_file, proxy, false);
            }
        }
    }
}

/// `d` ± 20%, so that instances started together do not probe in lockstep.
fn jittered(d: Duration, rng: &mut OsRandom) -> Duration {
    use crate::random::Random;
    let ms = d.as_millis() as usize;
    Duration::from_millis((ms * 8 / 10 + rng.below(ms * 4 / 10 + 1)) as u64)
}

/// Hands every complete frame the reader holds to the proxy and queues what it answers.
fn handle_frames(
    conn: &mut Conn,
    proxy: &mut Proxy,
    rng: &mut OsRandom,
    urgent_probe: &mut Instant,
) -> Result<(), String> {
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
        let (out, verdict) = proxy.handle(inbound, clock(), rng);
        if verdict == Verdict::Refused(Condition::ServiceUnavailable)
            && urgent_probe.elapsed() >= Duration::from_secs(1)
        {
            // No resource known: maybe this instance just (re)connected and the target's
            // presence went to another one. Ask now rather than at the next probe.
            *urgent_probe = Instant::now();
            conn.queue(&proxy.probe());
        }
        if let Some(out) = out {
            conn.queue(&out);
        }
    }
    Ok(())
}

/// Closes the stream cleanly: first handles every stanza already received (so that nothing
/// the server delivered before the signal is dropped), then sends our footer and waits briefly
/// for the server's. XEP-0114 has no way to ask the server to stop routing first: a stanza it
/// routes to us between our footer and its reading of it can no longer be answered; such
/// stanzas are counted and logged. Every step is bounded in time.
async fn close(mut conn: Conn, proxy: &mut Proxy, rng: &mut OsRandom) {
    let mut urgent_probe = Instant::now();
    // Each write of the shutdown gets at most a few seconds, whatever keepalive_timeout is:
    // a server that stops reading cannot hold SIGTERM up for long.
    conn.write_timeout = conn.write_timeout.min(CLOSE_WRITE_LIMIT);
    // What the socket already holds, handled as it is read; bounded, so that a server that
    // keeps sending cannot hold the shutdown up.
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut drained = 0usize;
    loop {
        if let Err(e) = handle_frames(&mut conn, proxy, rng, &mut urgent_probe) {
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
