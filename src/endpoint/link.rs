//! One configured server and the endpoint's stream to it: its state (down, connecting, open),
//! the phase of an open stream (login, up, draining, closing), its history, and why a login
//! failed or a stream was lost, typed, with the texts the log has always had.

use crate::backoff::Backoff;
use crate::config::Tls;
use crate::stream::{ReadError, Reader, Writer};

use super::output::Output;
use super::tls::TlsLayer;

/// Time allowed for TCP connect, stream header and handshake together.
pub(crate) const LOGIN_TIMEOUT_MS: u64 = 15_000;
/// At shutdown, the longest any one write may take.
pub(crate) const CLOSE_WRITE_LIMIT_MS: u64 = 5_000;
/// How long the server may take to send its footer after ours.
pub(crate) const FOOTER_WAIT_MS: u64 = 2_000;
/// At shutdown, what is read of what the server already sent, at most (in time and bytes,
/// per stream).
pub(crate) const DRAIN_LIMIT_MS: u64 = 1_000;
pub(crate) const DRAIN_BYTES: usize = 4 * 1024 * 1024;

/// What the shell saw go wrong on a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Io {
    /// The TCP connection could not be made (the error's text).
    Connect(String),
    /// The server closed the connection (a read of 0 bytes).
    Eof,
    /// A read failed (the error's text).
    Read(String),
    /// A write failed (the error's text).
    Write(String),
    /// A write took 0 bytes: the connection is closed.
    WriteZero,
}

impl std::fmt::Display for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Io::Connect(e) => write!(f, "{e}"),
            Io::Eof => write!(f, "connection closed"),
            Io::Read(e) => write!(f, "cannot read: {e}"),
            Io::Write(e) => write!(f, "cannot send: {e}"),
            Io::WriteZero => write!(f, "cannot send: connection closed"),
        }
    }
}

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// Connect, stream header and handshake took longer than 15 s together.
    TimedOut,
    /// The socket failed.
    Io(Io),
    /// The server's bytes are not an XML stream.
    Read(ReadError),
    /// The server's stream header had no id (which the handshake hashes).
    NoStreamId,
    /// The server sent a stream error before the handshake.
    StreamError(String),
    /// The server answered the handshake with a stream error.
    Refused(String),
    /// The server closed the stream during the login.
    Eof,
    /// The server's certificate does not verify (`tls = true`).
    Certificate(TlsFailure),
    /// TLS failed otherwise: an alert from the server, or a listener without TLS.
    Tls(TlsFailure),
    /// A plaintext link's connection was closed before the server sent a byte (what a TLS
    /// listener does to a client that does not speak TLS).
    ClosedSilently(Io),
}

/// Why TLS with a server failed: the server (its address), the name verified, the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure {
    /// The server's address.
    pub server: String,
    /// The name its certificate is verified for.
    pub name: String,
    /// What went wrong.
    pub reason: String,
    /// Whether the certificate did not verify.
    pub certificate: bool,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.certificate {
            write!(
                f,
                "TLS refused: the certificate of {} does not verify for {}: {}",
                self.server, self.name, self.reason
            )
        } else {
            write!(f, "TLS with {} failed: {}", self.server, self.reason)
        }
    }
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::TimedOut => write!(f, "login timed out"),
            LoginError::Io(e) => write!(f, "{e}"),
            LoginError::Read(e) => write!(f, "{e}"),
            LoginError::NoStreamId => write!(f, "server sent no stream id"),
            LoginError::StreamError(e) => write!(f, "stream error: {e}"),
            LoginError::Refused(e) => write!(f, "server refused the handshake: {e}"),
            LoginError::Eof => write!(f, "unexpected end of file"),
            LoginError::Certificate(t) | LoginError::Tls(t) => write!(f, "{t}"),
            LoginError::ClosedSilently(e) => write!(
                f,
                "{e} before the server sent anything (a TLS listener does that to a plaintext \
                 client: set `tls = true` for this server if its listener is TLS)"
            ),
        }
    }
}

/// Why a stream that was up was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamLost {
    /// The socket failed.
    Io(Io),
    /// The server's bytes are not XML.
    Read(ReadError),
    /// The server sent its footer.
    Closed,
    /// The server sent a second stream header.
    SecondStream,
    /// The server sent a stream error.
    StreamError(String),
    /// Output waited and the server took none of it for this many seconds.
    Stalled(u64),
    /// Output waiting grew past [`super::output::MAX_UNSENT`] (this many bytes).
    TooMuchWaiting(usize),
    /// No byte within this many seconds of a keepalive ping.
    NoPong(u64),
    /// TLS failed (the server's bytes do not decrypt, or it sent an alert).
    Tls(TlsFailure),
}

impl std::fmt::Display for StreamLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamLost::Io(e) => write!(f, "{e}"),
            StreamLost::Read(e) => write!(f, "{e}"),
            StreamLost::Closed => write!(f, "server closed the stream"),
            StreamLost::SecondStream => write!(f, "the server opened a second stream"),
            StreamLost::StreamError(e) => write!(f, "stream error from server: {e}"),
            StreamLost::Stalled(s) => write!(f, "the server took nothing we sent for {s} s"),
            StreamLost::TooMuchWaiting(n) => write!(
                f,
                "the server takes too little of what we send ({n} bytes wait)"
            ),
            StreamLost::NoPong(s) => write!(f, "no answer to a keepalive ping within {s} s"),
            StreamLost::Tls(t) => write!(f, "{t}"),
        }
    }
}

/// A stream's history, carried through upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// When it was established (Unix ms).
    pub established_ms: u64,
    /// In-place upgrades it went through.
    pub upgrades: u64,
}

/// One configured server and the stream to it.
pub(crate) struct Link {
    pub(crate) server: String,
    /// How the stream is encrypted (`tls = true`), if it is.
    pub(crate) tls: Option<Tls>,
    pub(crate) backoff: Backoff,
    pub(crate) state: State,
}

pub(crate) enum State {
    /// Not connected: the next login attempt is due at `retry_at` (monotonic ms).
    Down { retry_at: u64 },
    /// The shell is making the TCP connection; the login must be done by `deadline`.
    Connecting { deadline: u64 },
    /// A TCP connection.
    Open(Box<Open>),
    /// Closed for good (the endpoint stopped).
    Stopped,
}

/// A TCP connection and the stream on it.
pub(crate) struct Open {
    pub(crate) reader: Reader,
    pub(crate) writer: Writer,
    pub(crate) output: Output,
    pub(crate) phase: Phase,
    /// The TLS layer between the socket and the stream (`tls = true`).
    pub(crate) tls: Option<Box<TlsLayer>>,
    /// Whether any byte came from the server.
    pub(crate) heard: bool,
}

impl Open {
    /// Bytes waiting to be written: the output not yet written, and the TLS layer's
    /// ciphertext not yet taken by the socket.
    pub(crate) fn unsent(&self) -> usize {
        self.output.unsent() + self.tls.as_ref().map_or(0, |t| t.pending().len())
    }

    /// What the socket is to write next.
    pub(crate) fn transmit(&self) -> &[u8] {
        match &self.tls {
            Some(t) => t.pending(),
            None => self.output.pending(),
        }
    }
}

pub(crate) enum Phase {
    /// Stream header and handshake, to be done by `deadline` (which bounds the writes too).
    Login { deadline: u64 },
    /// Logged in, serving.
    Up(Up),
    /// At shutdown: what the socket already holds is read and handled, until `until` or
    /// [`DRAIN_BYTES`] read.
    Draining {
        history: History,
        until: u64,
        drained: usize,
        done: bool,
    },
    /// At shutdown: our footer queued, written by `deadline`.
    Closing {
        deadline: u64,
        dropped: usize,
        footer: bool,
    },
    /// At shutdown: our footer sent and the socket shut down for writing: the server's
    /// footer is awaited until `until`.
    Footer { until: u64, dropped: usize },
}

/// A stream that is up.
pub(crate) struct Up {
    pub(crate) history: History,
    pub(crate) last_read: u64,
    pub(crate) ping_sent: Option<u64>,
}

impl Link {
    pub(crate) fn open(&self) -> Option<&Open> {
        match &self.state {
            State::Open(o) => Some(o),
            _ => None,
        }
    }

    pub(crate) fn open_mut(&mut self) -> Option<&mut Open> {
        match &mut self.state {
            State::Open(o) => Some(o),
            _ => None,
        }
    }

    /// Whether the stream is up (logged in and serving).
    pub(crate) fn is_up(&self) -> bool {
        matches!(self.open().map(|o| &o.phase), Some(Phase::Up(_)))
    }

    /// Whether stanzas may be queued on it: up, or being drained at shutdown.
    pub(crate) fn serves(&self) -> bool {
        matches!(
            self.open().map(|o| &o.phase),
            Some(Phase::Up(_) | Phase::Draining { .. })
        )
    }

    /// The history of a stream that is up or draining.
    pub(crate) fn history(&self) -> Option<History> {
        match self.open().map(|o| &o.phase) {
            Some(Phase::Up(up)) => Some(up.history),
            Some(Phase::Draining { history, .. }) => Some(*history),
            _ => None,
        }
    }

    /// When this link next needs the time (monotonic ms), given the keepalive settings.
    pub(crate) fn timeout(&self, interval: u64, write_timeout: u64) -> Option<u64> {
        match &self.state {
            State::Down { retry_at } => Some(*retry_at),
            State::Connecting { deadline } => Some(*deadline),
            State::Stopped => None,
            State::Open(o) => match &o.phase {
                Phase::Login { deadline } => Some(*deadline),
                Phase::Up(up) => {
                    // Idle for keepalive_interval: ping; no byte for keepalive_timeout after
                    // that: dead. Output that waits: the server must take some of it within
                    // the write timeout.
                    let keepalive = match up.ping_sent {
                        None => up.last_read + interval,
                        Some(at) => at + write_timeout,
                    };
                    let stall = o.output.waiting_since().map(|t| t + write_timeout);
                    Some(stall.map_or(keepalive, |s| s.min(keepalive)))
                }
                Phase::Draining { until, done, .. } => (!done).then_some(*until),
                Phase::Closing { deadline, .. } => Some(*deadline),
                Phase::Footer { until, .. } => Some(*until),
            },
        }
    }
}
