//! The I/O shell: the component connection, its keepalives, reconnection, key reloads and
//! signals. Everything the proxy decides is in [`crate::proxy`]; this module only moves
//! stanzas between the socket and it.

use std::borrow::Cow;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{sleep, timeout};
use tokio_xmpp::xmlstream::{ReadError, StreamHeader, Timeouts, XmlStream, initiate_stream};
use tracing::{debug, info, trace, warn};
use xmpp_parsers::component::Handshake;
use xmpp_parsers::minidom::Element;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::inbound::{self, Inbound};
use crate::keys::{self, KeySet};
use crate::proxy::{Proxy, Verdict};
use crate::random::OsRandom;
use crate::stanza::Condition;
use crate::stanza::NS;

type Stream = XmlStream<BufStream<TcpStream>, Inbound>;

const STREAM_NS: &str = "http://etherx.jabber.org/streams";
/// Time allowed for TCP connect, stream header and handshake together.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// A session shorter than this does not reset the backoff: a server that accepts and then
/// drops us at once is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Most stanzas handled before the output is flushed.
const BATCH: usize = 64;

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
    inbound::set_limits(config.limits);
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
            Ok(stream) => {
                info!(component = %config.jid, server = %config.server, "session established");
                let started = Instant::now();
                let end = serve(
                    stream,
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

/// TCP connect, stream header, XEP-0114 handshake.
async fn login(config: &Config) -> io::Result<Stream> {
    let attempt = async {
        let tcp = TcpStream::connect(&config.server).await?;
        tcp.set_nodelay(true)?;
        let timeouts = Timeouts {
            read_timeout: config.keepalive_interval,
            response_timeout: config.keepalive_timeout,
        };
        let header = StreamHeader {
            from: None,
            to: Some(Cow::Borrowed(config.jid.as_str())),
            id: None,
        };
        let mut pending = initiate_stream(BufStream::new(tcp), NS, header, timeouts).await?;
        let id = pending.take_header().id.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "server sent no stream id")
        })?;
        let mut stream: Stream = pending.skip_features();
        let handshake = Handshake::from_stream_id_and_password(id.into_owned(), &config.secret);
        stream.send(&handshake).await?;
        loop {
            match stream.next().await {
                Some(Ok(Inbound::Element(el))) if el.is("handshake", NS) => return Ok(stream),
                Some(Ok(Inbound::Element(el))) if el.is("error", STREAM_NS) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("server refused the handshake: {}", stream_error(&el)),
                    ));
                }
                Some(Ok(_)) => continue,
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Err(e)) => return Err(io::Error::other(e.to_string())),
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
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
    mut stream: Stream,
    config: &Config,
    proxy: &mut Proxy,
    rng: &mut OsRandom,
    signals: &mut Signals,
    watch: &mut KeyWatch,
) -> End {
    for el in proxy.connected() {
        if let Err(e) = stream.feed(&el).await {
            return End::Lost(e.to_string());
        }
    }
    if let Err(e) = SinkExt::<&Element>::flush(&mut stream).await {
        return End::Lost(e.to_string());
    }
    let mut reload = tokio::time::interval(config.key_reload_interval);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_probe = Instant::now() + jittered(config.probe_interval, rng);
    let mut urgent_probe = Instant::now();
    loop {
        let first = tokio::select! {
            _ = tokio::time::sleep_until(next_probe.into()) => {
                next_probe = Instant::now() + jittered(config.probe_interval, rng);
                let probe = proxy.probe();
                if let Err(e) = stream.send(&probe).await {
                    return End::Lost(e.to_string());
                }
                continue;
            }
            _ = shutdown(&mut signals.term, &mut signals.int) => {
                close(&mut stream, proxy, rng).await;
                return End::Shutdown;
            }
            _ = signals.hup.recv() => {
                info!("SIGHUP: reloading the key file");
                watch.reload_if_changed(&config.key_file, proxy, true);
                continue;
            }
            _ = reload.tick() => {
                watch.reload_if_changed(&config.key_file, proxy, false);
                continue;
            }
            item = stream.next() => item,
        };
        // Handle what is already buffered before flushing once.
        let mut item = first;
        let mut handled = 0;
        loop {
            match step(item, &mut stream, proxy, rng, &mut urgent_probe).await {
                Ok(()) => {}
                Err(why) => return End::Lost(why),
            }
            handled += 1;
            if handled >= BATCH {
                break;
            }
            match stream.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        if let Err(e) = SinkExt::<&Element>::flush(&mut stream).await {
            return End::Lost(e.to_string());
        }
    }
}

/// `d` ± 20%, so that instances started together do not probe in lockstep.
fn jittered(d: Duration, rng: &mut OsRandom) -> Duration {
    use crate::random::Random;
    let ms = d.as_millis() as usize;
    Duration::from_millis((ms * 8 / 10 + rng.below(ms * 4 / 10 + 1)) as u64)
}

async fn step(
    item: Option<Result<Inbound, ReadError>>,
    stream: &mut Stream,
    proxy: &mut Proxy,
    rng: &mut OsRandom,
    urgent_probe: &mut Instant,
) -> Result<(), String> {
    let out = match item {
        None => return Err("connection closed".into()),
        Some(Ok(Inbound::Element(el))) if el.is("error", STREAM_NS) => {
            return Err(format!("stream error from server: {}", stream_error(&el)));
        }
        Some(Ok(inbound)) => {
            if let Inbound::Element(el) = &inbound {
                trace!(xml = %String::from(el), "in");
            }
            // Rate limits run on a monotonic clock from the first stanza of the process.
            static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            let clock = crate::proxy::Clock {
                unix_ms: unix_now_ms(),
                mono_ms: STARTED.get_or_init(Instant::now).elapsed().as_millis() as u64,
            };
            let (out, verdict) = proxy.handle(inbound, clock, rng);
            if verdict == Verdict::Refused(Condition::ServiceUnavailable)
                && urgent_probe.elapsed() >= Duration::from_secs(1)
            {
                // No resource known: maybe this instance just (re)connected and the target's
                // presence went to another one. Ask now rather than at the next probe.
                *urgent_probe = Instant::now();
                stream
                    .feed(&proxy.probe())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            out
        }
        Some(Err(ReadError::SoftTimeout)) => {
            debug!("idle: sending keepalive ping");
            Some(proxy.keepalive())
        }
        Some(Err(ReadError::ParseError(e))) => {
            // Inbound accepts every well-formed element; kept for completeness.
            warn!("unparseable element skipped: {e}");
            None
        }
        Some(Err(ReadError::HardError(e))) => return Err(e.to_string()),
        Some(Err(ReadError::StreamFooterReceived)) => {
            return Err("server closed the stream".into());
        }
    };
    if let Some(out) = out {
        SinkExt::<&Element>::feed(stream, &out)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Closes the stream cleanly: first handles every stanza already received (so that nothing
/// the server delivered before the signal is dropped), then sends our footer and waits briefly
/// for the server's. XEP-0114 has no way to ask the server to stop routing first: a stanza it
/// routes to us between our footer and its reading of it can no longer be answered; such
/// stanzas are counted and logged.
async fn close(stream: &mut Stream, proxy: &mut Proxy, rng: &mut OsRandom) {
    let mut urgent_probe = Instant::now();
    while let Some(item) = stream.next().now_or_never() {
        if step(item, stream, proxy, rng, &mut urgent_probe)
            .await
            .is_err()
        {
            return;
        }
    }
    if let Err(e) = SinkExt::<&Element>::flush(stream).await {
        debug!("closing the stream: {e}");
        return;
    }
    if let Err(e) = stream.shutdown().await {
        debug!("closing the stream: {e}");
        return;
    }
    let mut dropped = 0usize;
    let _ = timeout(Duration::from_secs(2), async {
        while let Some(item) = stream.next().await {
            match item {
                Ok(Inbound::Element(el)) if el.has_ns(NS) => dropped += 1,
                Ok(Inbound::Oversized(_)) => dropped += 1,
                Err(ReadError::StreamFooterReceived) | Err(ReadError::HardError(_)) => break,
                _ => {}
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
