//! One connection to a server's XEP-0114 listener: the socket's halves, the stream without
//! I/O on top ([`Reader`], [`Writer`]), the login, and the end of a stream at shutdown.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
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

/// One connection to the server. Every write is bounded in time: a server that stops
/// reading ends the stream instead of hanging the session.
pub(super) struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    pub(super) out: Vec<u8>,
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
        if let Err(e) = self.writer.element(el, &mut self.out) {
            warn!("{e}: not sent");
        }
    }

    /// Sends the output buffer.
    pub(super) async fn flush(&mut self) -> Result<(), String> {
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
        self.writer.footer(&mut self.out);
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
