//! One connection to a server's XEP-0114 listener: the socket's halves, the stream without
//! I/O on top ([`Reader`], [`Writer`]), the login, and the end of a stream at shutdown.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;
use tracing::{debug, info, warn};
use xmpp_parsers::component::Handshake;
use xmpp_parsers::minidom::Element;

use crate::inbound::{Inbound, Limits};
use crate::stanza::{NS, STREAM_NS};
use crate::stream::{Frame, Reader, Writer};

/// Time allowed for TCP connect, stream header and handshake together.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// At shutdown, the longest any one write may take.
pub(super) const CLOSE_WRITE_LIMIT: Duration = Duration::from_secs(5);
/// How long the server may take to send its footer after ours.
const FOOTER_WAIT: Duration = Duration::from_secs(2);

/// Queued output past which a stream is not read until the server takes some: a server
/// that stops reading but keeps sending cannot make the session buffer without bound.
pub(super) const PAUSE_READING_AT: usize = 1024 * 1024;

/// One connection to the server. Writes never block the session (the session writes what
/// the socket takes and polls for the rest), and are bounded in time: a server that takes
/// nothing for `write_timeout` ends the stream.
pub(super) struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    /// Output: `out[sent..]` is still to be written.
    out: Vec<u8>,
    sent: usize,
    /// Where in `out` each element queued begins (to take back the unsent ones whole).
    starts: std::collections::VecDeque<usize>,
    /// Since when the output waiting has made no progress (`None` while nothing waits).
    waiting_since: Option<Instant>,
    buf: Vec<u8>,
    pub(super) write_timeout: Duration,
}

impl Conn {
    pub(super) fn new(tcp: TcpStream, limits: Limits, write_timeout: Duration) -> Conn {
        let (rd, wr) = tcp.into_split();
        Conn {
            rd,
            wr,
            reader: Reader::new(limits),
            writer: Writer::new(),
            out: Vec::with_capacity(4096),
            sent: 0,
            starts: std::collections::VecDeque::new(),
            waiting_since: None,
            buf: vec![0; READ_CHUNK],
            write_timeout,
        }
    }

    /// A connection whose stream an upgrade handed over: the reader primed with the stream
    /// header and fed the bytes received after the last complete element.
    pub(super) fn resumed(
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

    /// The socket (to hand it over).
    pub(super) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        let socket: &TcpStream = self.rd.as_ref();
        std::os::fd::AsFd::as_fd(socket)
    }

    /// Serialises `el` into the output buffer.
    pub(super) fn queue(&mut self, el: &Element) {
        let start = self.out.len();
        if let Err(e) = self.writer.element(el, &mut self.out) {
            warn!("{e}: not sent");
            self.out.truncate(start);
            return;
        }
        self.starts.push_back(start);
        self.queued();
    }

    /// Our stream footer, into the output buffer.
    fn queue_footer(&mut self) {
        self.writer.footer(&mut self.out);
        self.queued();
    }

    fn queued(&mut self) {
        if self.waiting_since.is_none() && self.out.len() > self.sent {
            self.waiting_since = Some(Instant::now());
        }
    }

    /// The elements queued that the server cannot have received whole — those not written
    /// at all, and the one partly written (the server drops an element it did not get to
    /// the end of) — to go out on another stream when this one is lost. Elements written
    /// whole are not among them, even if the server may have missed them: sending them
    /// again could deliver them twice.
    pub(super) fn take_unsent(&mut self) -> Option<Vec<u8>> {
        let from = self.starts.iter().rev().find(|&&s| s <= self.sent).copied();
        let from = match from {
            Some(s) => s,
            None => *self.starts.front()?,
        };
        (from < self.out.len()).then(|| self.out[from..].to_vec())
    }

    /// Queues bytes of whole elements serialised by another stream's writer (the same
    /// namespaces: every stream is the component's).
    pub(super) fn queue_bytes(&mut self, bytes: &[u8]) {
        self.starts.push_back(self.out.len());
        self.out.extend_from_slice(bytes);
        self.queued();
    }

    /// Bytes queued and not yet written.
    pub(super) fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    /// When the output waiting will have made no progress for `write_timeout`, if any
    /// waits.
    pub(super) fn write_deadline(&self) -> Option<Instant> {
        self.waiting_since.map(|t| t + self.write_timeout)
    }

    /// The error of a stream whose server took nothing for `write_timeout`.
    pub(super) fn stalled(&self) -> String {
        format!(
            "the server took nothing we sent for {} s",
            self.write_timeout.as_secs()
        )
    }

    fn wrote(&mut self, n: usize) {
        self.sent += n;
        // Elements written whole are forgotten (keep the start of the one being written).
        while self.starts.len() > 1 && self.starts[1] <= self.sent {
            self.starts.pop_front();
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            self.starts.clear();
            self.waiting_since = None;
            if self.out.capacity() > 1024 * 1024 {
                self.out = Vec::with_capacity(4096);
            }
        } else {
            self.waiting_since = Some(Instant::now());
        }
    }

    /// Writes what the socket takes now, without waiting.
    pub(super) fn write_now(&mut self) -> Result<(), String> {
        match self.poll_write(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    /// Polls the socket for room and writes what waits. Ready when nothing waits any more
    /// (or on an error); pending (with the waker registered) while output waits.
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        while self.unsent() > 0 {
            match Pin::new(&mut self.wr).poll_write(cx, &self.out[self.sent..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err("cannot send: connection closed".into()));
                }
                Poll::Ready(Ok(n)) => self.wrote(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("cannot send: {e}"))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends everything queued, waiting at most `write_timeout` (login and close only).
    pub(super) async fn flush(&mut self) -> Result<(), String> {
        if self.unsent() == 0 {
            return Ok(());
        }
        match timeout(
            self.write_timeout,
            std::future::poll_fn(|cx| self.poll_write(cx)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(self.stalled()),
        }
    }

    /// Polls for bytes from the server and gives them to the reader (as a cancel-safe
    /// read: nothing is lost when the caller stops polling).
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let mut rb = ReadBuf::new(&mut self.buf);
        match Pin::new(&mut self.rd).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(format!("cannot read: {e}"))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Err("connection closed".into()));
                }
                Poll::Ready(self.reader.feed(&self.buf[..n]).map_err(|e| e.to_string()))
            }
        }
    }

    /// Waits for bytes from the server and gives them to the reader. Cancel-safe.
    async fn read(&mut self) -> Result<(), String> {
        std::future::poll_fn(|cx| self.poll_read(cx)).await
    }

    /// Gives the reader what the socket already holds, without waiting: how many bytes
    /// (0 when there was nothing).
    pub(super) fn read_ready(&mut self) -> Result<usize, String> {
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

    /// The end of a stream at shutdown, once everything received was handled and answered
    /// (queued): our footer, then a bounded wait for the server's. XEP-0114 has no way to ask
    /// the server to stop routing first: a stanza it routes to us between our footer and its
    /// reading of it can no longer be answered; such stanzas are counted and logged.
    pub(super) async fn finish(mut self, server: &str) {
        self.write_timeout = self.write_timeout.min(CLOSE_WRITE_LIMIT);
        self.queue_footer();
        if let Err(e) = self.flush().await {
            debug!(server, "closing the stream: {e}");
            return;
        }
        if let Err(e) = timeout(self.write_timeout, self.wr.shutdown()).await {
            debug!(server, "closing the stream: {e}");
            return;
        }
        let mut dropped = 0usize;
        let _ = timeout(FOOTER_WAIT, async {
            loop {
                match self.next_frame().await {
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
                server,
                dropped, "stanzas routed to this instance after its stream footer were dropped"
            );
        }
        info!(server, "stream closed");
    }
}

/// What a login needs.
#[derive(Clone)]
pub(super) struct LoginParams {
    pub(super) jid: String,
    pub(super) secret: zeroize::Zeroizing<String>,
    pub(super) limits: Limits,
    pub(super) write_timeout: Duration,
}

/// TCP connect to `server`, stream header, XEP-0114 handshake.
pub(super) async fn login(server: String, p: LoginParams) -> io::Result<Conn> {
    let refused = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    let attempt = async {
        let tcp = TcpStream::connect(&server).await?;
        tcp.set_nodelay(true)?;
        let mut conn = Conn::new(tcp, p.limits, p.write_timeout);
        conn.writer.header(&[("to", &p.jid)], &mut conn.out);
        conn.queued();
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
        let handshake = Handshake::from_stream_id_and_password(id, &p.secret);
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

/// A stream error's conditions and text, for the log.
pub(super) fn stream_error(el: &Element) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn el(id: &str) -> Element {
        format!("<iq xmlns='jabber:component:accept' type='get' id='{id}'/>")
            .parse()
            .unwrap()
    }

    /// A connection to a loopback peer that reads nothing.
    async fn conn() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, (server, _)) =
            tokio::join!(client, async { listener.accept().await.unwrap() });
        let mut c = Conn::new(client.unwrap(), Limits::default(), Duration::from_secs(5));
        c.writer = Writer::resumed();
        (c, server)
    }

    #[tokio::test]
    async fn what_is_taken_back_is_every_element_the_server_cannot_have_whole() {
        let (mut c, _peer) = conn().await;
        assert_eq!(c.take_unsent(), None);
        for id in ["1", "2", "3"] {
            c.queue(&el(id));
        }
        let all = c.out.clone();
        let first_len = all.windows(5).position(|w| w == b"</iq>").unwrap() + 5;
        assert_eq!(
            c.starts.iter().copied().collect::<Vec<_>>()[..2],
            [0, first_len]
        );
        // Nothing written: all three.
        assert_eq!(c.take_unsent().as_deref(), Some(&all[..]));
        // The first written whole: the other two.
        c.wrote(first_len);
        assert_eq!(c.take_unsent().as_deref(), Some(&all[first_len..]));
        // The second partly written: it again, whole, and the third.
        c.wrote(3);
        assert_eq!(c.take_unsent().as_deref(), Some(&all[first_len..]));
        // Everything written: nothing.
        let rest = c.unsent();
        c.wrote(rest);
        assert_eq!(c.take_unsent(), None);
        assert_eq!(c.unsent(), 0);
        assert_eq!(c.write_deadline(), None);
        // Bytes taken from another stream count as one piece.
        c.queue_bytes(&all[first_len..]);
        c.wrote(1);
        assert_eq!(c.take_unsent().as_deref(), Some(&all[first_len..]));
    }

    #[tokio::test]
    async fn output_waits_with_a_deadline_and_writes_go_out_in_order() {
        let (mut c, mut peer) = conn().await;
        c.queue(&el("a"));
        c.queue(&el("b"));
        assert!(c.write_deadline().is_some());
        c.write_now().unwrap();
        assert_eq!(c.unsent(), 0);
        assert_eq!(c.write_deadline(), None);
        let mut got = vec![0u8; 256];
        let n = peer.read(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got[..n]);
        assert!(
            got.find("id='a'").unwrap() < got.find("id='b'").unwrap(),
            "{got}"
        );
    }
}
