//! A raw XMPP client: SASL PLAIN over plain TCP on loopback, resource binding, then any
//! element the test wants to send, odd ones included. Built on jat-proxy's own stream layer
//! (`jat_proxy::stream`), with untyped elements and no token limit short of 64 MiB, so that
//! nothing the server sends — a 100 KB attribute included — can end it (tokio-xmpp's stream
//! would: its parser refuses tokens over 8 KiB).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use jat_proxy::{Frame, Inbound, Limits, Reader, Writer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
pub use xmpp_parsers::minidom::Element;

const CLIENT_NS: &str = "jabber:client";
const SASL_NS: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const BIND_NS: &str = "urn:ietf:params:xml:ns:xmpp-bind";

/// What the test client reads: anything up to 64 MiB and 4096 levels.
const LIMITS: Limits = Limits {
    max_bytes: 64 * 1024 * 1024,
    max_depth: 4096,
    max_nodes: usize::MAX,
};

/// A client stream: the socket and the stream layer on top.
struct Stream {
    tcp: TcpStream,
    reader: Reader,
    writer: Writer,
    buf: Vec<u8>,
}

impl Stream {
    /// Sends a stream header (again, after SASL).
    async fn open(&mut self, domain: &str) -> Result<(), String> {
        self.reader = Reader::new(LIMITS);
        self.writer = Writer::with_namespace(CLIENT_NS);
        let mut out = Vec::new();
        self.writer
            .header(&[("to", domain), ("version", "1.0")], &mut out);
        self.tcp.write_all(&out).await.map_err(|e| e.to_string())?;
        match self.frame().await? {
            Frame::Header(_) => Ok(()),
            _ => Err("no stream header".into()),
        }
    }

    async fn send(&mut self, el: &Element) -> Result<(), String> {
        let mut out = Vec::new();
        self.writer
            .element(el, &mut out)
            .map_err(|e| e.to_string())?;
        self.tcp.write_all(&out).await.map_err(|e| e.to_string())
    }

    /// The next frame (cancel-safe: a frame is only taken once complete).
    async fn frame(&mut self) -> Result<Frame, String> {
        loop {
            if let Some(f) = self.reader.next_frame().map_err(|e| e.to_string())? {
                return Ok(f);
            }
            let n = self
                .tcp
                .read(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("stream closed".into());
            }
            self.reader
                .feed(&self.buf[..n])
                .map_err(|e| e.to_string())?;
        }
    }

    /// The next element; `Err` when the stream ends.
    async fn element(&mut self) -> Result<Element, String> {
        match self.frame().await? {
            Frame::Stanza(Inbound::Element(el)) => Ok(el),
            Frame::Stanza(Inbound::Oversized(o)) => {
                Err(format!("over the test client's limits: {o:?}"))
            }
            Frame::Footer => Err("stream closed".into()),
            Frame::Header(_) => Err("a second stream header".into()),
        }
    }
}

/// Parses stanza XML written without a namespace, as in the examples of the XMPP RFCs:
/// `<iq type='get' id='1' to='proxy.localhost'><query xmlns='urn:x'/></iq>`. Any token
/// length is fine (it is read as the client reads its stream).
pub fn stanza(xml: &str) -> Element {
    let header = format!(
        "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='{CLIENT_NS}'>"
    );
    let mut reader = Reader::resume(LIMITS, header.as_bytes()).expect("a header");
    let parsed = reader
        .feed(xml.as_bytes())
        .map_err(|e| e.to_string())
        .and_then(|()| reader.next_frame().map_err(|e| e.to_string()));
    match parsed {
        Ok(Some(Frame::Stanza(Inbound::Element(el)))) => el,
        other => panic!(
            "bad test XML {:?}: {other:?}",
            xml.chars().take(200).collect::<String>()
        ),
    }
}

/// Serialises an element.
pub fn xml(el: &Element) -> String {
    String::from(el)
}

enum Command {
    Send(Element),
    Close,
}

/// A logged-in client. Everything it receives is kept in order (see [`Client::history`]).
pub struct Client {
    jid: String,
    tx: mpsc::UnboundedSender<Command>,
    rx: mpsc::UnboundedReceiver<Element>,
    backlog: std::collections::VecDeque<Element>,
    history: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// How a client answers subscription requests and IQ requests by itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The test reads everything itself.
    Nothing,
    /// Accepts every subscription request (as an implementing client must).
    Subscriptions,
}

impl Client {
    /// Logs `user@domain/resource` in over plain TCP and sends initial presence; panics,
    /// naming the account, if that fails.
    pub async fn login(
        addr: SocketAddr,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
        answer: Answer,
    ) -> Client {
        let attempt: Result<Client, String> = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut stream = Stream {
            tcp,
            reader: Reader::new(LIMITS),
            writer: Writer::with_namespace(CLIENT_NS),
            buf: vec![0; 64 * 1024],
        };
        stream.open(domain).await?;
        let _features = next(&mut stream).await?;
        let creds =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let auth: Element = format!("<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{creds}</auth>")
            .parse()
            .unwrap();
        stream.send(&auth).await?;
        let answer_el = next(&mut stream).await?;
        if answer_el.name() != "success" {
            return Err(format!("authentication failed: {}", xml(&answer_el)));
        }
        stream.open(domain).await?;
        let _features = next(&mut stream).await?;
        let bind: Element = format!(
            "<iq xmlns='{CLIENT_NS}' type='set' id='bind'><bind xmlns='{BIND_NS}'><resource>{resource}</resource></bind></iq>"
        )
        .parse()
        .unwrap();
        stream.send(&bind).await?;
        let bound = next(&mut stream).await?;
        let jid = bound
            .get_child("bind", BIND_NS)
            .and_then(|b| b.get_child("jid", BIND_NS))
            .map(|j| j.text())
            .ok_or_else(|| format!("bind failed: {}", xml(&bound)))?;
        stream.send(&stanza("<presence/>")).await?;
        let (tx, mut cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, rx) = mpsc::unbounded_channel();
        let history = Arc::new(Mutex::new(Vec::new()));
        let hist = history.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        Some(Command::Send(el)) => {
                            if stream.send(&el).await.is_err() { break; }
                        }
                        Some(Command::Close) | None => {
                            // Our footer, then everything the server still delivers until its
                            // own footer: the history must hold all it sent to this session.
                            let mut out = Vec::new();
                            stream.writer.footer(&mut out);
                            if stream.tcp.write_all(&out).await.is_ok() {
                                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                                    while let Ok(el) = stream.element().await {
                                        hist.lock().unwrap().push(xml(&el));
                                    }
                                })
                                .await;
                            }
                            break;
                        }
                    },
                    item = stream.element() => match item {
                        Ok(el) => {
                            hist.lock().unwrap().push(xml(&el));
                            if answer == Answer::Subscriptions
                                && el.name() == "presence"
                                && el.attr("type") == Some("subscribe")
                            {
                                let mut ok = stanza("<presence type='subscribed'/>");
                                ok.attrs_mut().insert(
                                    rxml::Namespace::NONE,
                                    rxml::NcName::try_from("to").unwrap(),
                                    el.attr("from").unwrap_or_default().to_owned(),
                                );
                                if stream.send(&ok).await.is_err() { break; }
                            }
                            if ev_tx.send(el).is_err() { break; }
                        }
                        Err(_) => break,
                    },
                }
            }
        });
        Ok(Client {
            jid,
            tx,
            rx,
            backlog: Default::default(),
            history,
            task,
        })
        }
        .await;
        attempt.unwrap_or_else(|e| panic!("{user}@{domain}/{resource} cannot log in: {e}"))
    }

    /// The full JID the server bound.
    pub fn jid(&self) -> &str {
        &self.jid
    }

    /// Sends an element as it is.
    pub fn send(&self, el: Element) {
        let _ = self.tx.send(Command::Send(el));
    }

    /// Sends stanza XML (see [`stanza`]).
    pub fn send_xml(&self, xml: &str) {
        self.send(stanza(xml));
    }

    /// The next element received within `limit`.
    pub async fn recv(&mut self, limit: Duration) -> Option<Element> {
        self.recv_where(limit, |_| true).await
    }

    /// The first element matching `pred` received (or arriving within `limit`); the others
    /// stay queued for later calls.
    pub async fn recv_where(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&Element) -> bool,
    ) -> Option<Element> {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let el = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()
                .flatten()?;
            if pred(&el) {
                return Some(el);
            }
            self.backlog.push_back(el);
        }
    }

    /// The next IQ with this id.
    pub async fn recv_iq(&mut self, id: &str, limit: Duration) -> Option<Element> {
        self.recv_where(limit, |e| e.name() == "iq" && e.attr("id") == Some(id))
            .await
    }

    /// The next IQ request (get/set).
    pub async fn recv_request(&mut self, limit: Duration) -> Option<Element> {
        self.recv_where(limit, |e| {
            e.name() == "iq" && matches!(e.attr("type"), Some("get") | Some("set"))
        })
        .await
    }

    /// Everything received so far, serialised, in order.
    pub fn history(&self) -> Vec<String> {
        self.history.lock().unwrap().clone()
    }

    /// The live history, which keeps filling until the client is closed.
    pub fn history_handle(&self) -> Arc<Mutex<Vec<String>>> {
        self.history.clone()
    }

    /// IQs received so far (serialised).
    pub fn iqs_received(&self) -> Vec<String> {
        self.history()
            .into_iter()
            .filter(|s| s.starts_with("<iq"))
            .collect()
    }

    /// Closes the stream.
    pub async fn close(self) {
        let _ = self.tx.send(Command::Close);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn next(stream: &mut Stream) -> Result<Element, String> {
    match tokio::time::timeout(Duration::from_secs(10), stream.element()).await {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(r) => r,
    }
}

/// The reply to `request` of `type_` with these children: id, to and from swapped.
pub fn reply_to(request: &Element, type_: &str, payload: &str) -> Element {
    let el = stanza(&format!("<iq type='{type_}'>{payload}</iq>"));
    let mut el = el;
    let attrs = el.attrs_mut();
    for (name, value) in [
        ("id", request.attr("id")),
        ("to", request.attr("from")),
        ("from", request.attr("to")),
    ] {
        if let Some(v) = value {
            attrs.insert(
                rxml::Namespace::NONE,
                rxml::NcName::try_from(name).unwrap(),
                v.to_owned(),
            );
        }
    }
    el
}
