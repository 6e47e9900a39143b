//! Bytes in, stream frames out: the [`Framer`] finds each top-level element within the
//! limits, and one long-lived rxml parser (configured from the limits, so that no token of
//! an element within them can be too long for it) turns it into a [`minidom::Element`].

use rxml::{Parse, WithOptions};
use xmpp_parsers::minidom::Element;

use super::framer::{Framer, FramingError, Piece};
use crate::inbound::{Exceeded, Inbound, Limits, Oversized};

/// What the stream header said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The stream id (`id`), which the XEP-0114 handshake hashes.
    pub id: Option<String>,
    /// The server's `from`.
    pub from: Option<String>,
}

/// One thing read from the stream.
#[derive(Debug)]
pub enum Frame {
    /// The server's stream header.
    Header(Header),
    /// A top-level element (a stanza, the handshake answer, a stream error).
    Stanza(Inbound),
    /// The server closed the stream.
    Footer,
}

/// The stream is broken: ill-formed XML (which a server never sends). The session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The bytes are not XML (found while finding element boundaries).
    Framing(FramingError),
    /// The parser rejected an element or the header.
    Xml(String),
    /// Something other than a stream header opened the stream.
    NotAStream,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Framing(e) => write!(f, "ill-formed XML from the server: {e}"),
            ReadError::Xml(e) => write!(f, "ill-formed XML from the server: {e}"),
            ReadError::NotAStream => write!(f, "the server did not open an XML stream"),
        }
    }
}

impl std::error::Error for ReadError {}

impl From<FramingError> for ReadError {
    fn from(e: FramingError) -> Self {
        ReadError::Framing(e)
    }
}

/// The reading half of a component stream, without I/O: [`Reader::feed`] bytes as they
/// arrive, then take [`Reader::next_frame`] until it returns `None`.
#[derive(Debug)]
pub struct Reader {
    framer: Framer,
    parser: rxml::Parser,
    /// The header's bytes as received: what a resumed reader is primed with.
    header: Option<Vec<u8>>,
}

fn parser(limits: Limits) -> rxml::Parser {
    // An element within the limits has no token longer than max_bytes (a token's decoded
    // length never exceeds its encoded one), and longer elements never reach the parser.
    let options = rxml::parser::Options {
        max_token_length: limits
            .max_bytes
            .max(rxml::parser::Options::default().max_token_length),
        comments: rxml::parser::CommentMode::Discard,
        ..Default::default()
    };
    rxml::Parser::with_options(options)
}

impl Reader {
    /// A reader at the start of a stream.
    pub fn new(limits: Limits) -> Reader {
        Reader {
            framer: Framer::new(limits),
            parser: parser(limits),
            header: None,
        }
    }

    /// A reader that goes on reading a stream whose header (`header`, as received) was
    /// read by another reader, in this process or before an upgrade. The header is not
    /// returned again.
    pub fn resume(limits: Limits, header: &[u8]) -> Result<Reader, ReadError> {
        let mut r = Reader {
            framer: Framer::resumed(limits),
            parser: parser(limits),
            header: None,
        };
        r.header(header.to_vec())?;
        Ok(r)
    }

    /// The stream header's bytes as received, once read.
    pub fn header_bytes(&self) -> Option<&[u8]> {
        self.header.as_deref()
    }

    /// Whether nothing partial is held: the bytes fed so far end at an element boundary.
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }

    /// What a reader made with [`Reader::resume`] from [`Reader::header_bytes`] must be fed
    /// to go on exactly where this one is: the bytes of the element not yet complete (empty
    /// at a boundary). `None` until every complete frame was taken, or while no such bytes
    /// exist (an element over a limit is being dropped): read on and ask again.
    pub fn pending(&self) -> Option<Vec<u8>> {
        self.header.as_ref()?;
        self.framer.pending()
    }

    /// Bytes held for an element not yet complete (never more than the byte limit).
    pub fn held(&self) -> usize {
        self.framer.held()
    }

    /// Takes bytes received from the server. Complete frames are then available from
    /// [`Reader::next_frame`].
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), ReadError> {
        self.framer.feed(bytes).map_err(ReadError::from)
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        let Some(piece) = self.framer.next_piece() else {
            return Ok(None);
        };
        Ok(Some(match piece {
            Piece::Header(bytes) => Frame::Header(self.header(bytes)?),
            Piece::Element(bytes) => Frame::Stanza(self.element(&bytes)?),
            Piece::Oversized { head, exceeded } => {
                Frame::Stanza(Inbound::Oversized(self.oversized(head, exceeded)?))
            }
            Piece::Footer => Frame::Footer,
        }))
    }

    fn header(&mut self, bytes: Vec<u8>) -> Result<Header, ReadError> {
        let mut input = &bytes[..];
        let mut header = None;
        loop {
            match self.parser.parse(&mut input, false) {
                Ok(Some(rxml::Event::XmlDeclaration(..))) => {}
                Ok(Some(rxml::Event::StartElement(_, (ns, name), attrs))) => {
                    if name.as_str() != "stream" || ns.as_str() != crate::stanza::STREAM_NS {
                        return Err(ReadError::NotAStream);
                    }
                    let get = |n: &str| attrs.get(&rxml::Namespace::NONE, n).map(|v| v.to_string());
                    header = Some(Header {
                        id: get("id"),
                        from: get("from"),
                    });
                }
                Ok(Some(_)) => return Err(ReadError::NotAStream),
                Ok(None) => return Err(ReadError::NotAStream),
                Err(rxml::error::EndOrError::NeedMoreData) => break,
                Err(rxml::error::EndOrError::Error(e)) => {
                    return Err(ReadError::Xml(e.to_string()));
                }
            }
        }
        let header = header.ok_or(ReadError::NotAStream)?;
        self.header = Some(bytes);
        Ok(header)
    }

    /// Parses one complete element (its bytes hold exactly one, within the limits) into a
    /// tree, or, past [`Limits::max_nodes`] nodes or [`Limits::tree_bytes`] bytes of names,
    /// namespaces, values and text (each element holds its own copy of its namespace, so a
    /// long namespace repeated costs far more than its bytes on the wire), into the header
    /// of an element over a limit: the
    /// rest of it is parsed (the parser's state must follow the stream) but not kept.
    fn element(&mut self, bytes: &[u8]) -> Result<Inbound, ReadError> {
        let mut input = bytes;
        let mut stack: Vec<Element> = Vec::with_capacity(4);
        let mut nodes = 0usize;
        let mut strings = 0usize;
        let limits = self.framer.limits();
        // Once over the node limit: the header taken from the root, and the depth skipped.
        let mut over: Option<(Oversized, usize)> = None;
        loop {
            let ev = match self.parser.parse(&mut input, false) {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(rxml::error::EndOrError::NeedMoreData) => {
                    return Err(ReadError::Xml("incomplete element".into()));
                }
                Err(rxml::error::EndOrError::Error(e)) => {
                    return Err(ReadError::Xml(e.to_string()));
                }
            };
            if let Some((_, depth)) = &mut over {
                match ev {
                    rxml::Event::StartElement(..) => *depth += 1,
                    rxml::Event::EndElement(_) if *depth == 0 => {
                        if !input.is_empty() {
                            return Err(ReadError::Xml("bytes after an element".into()));
                        }
                        let (o, _) = over.take().expect("set");
                        return Ok(Inbound::Oversized(o));
                    }
                    rxml::Event::EndElement(_) => *depth -= 1,
                    _ => {}
                }
                continue;
            }
            match ev {
                rxml::Event::StartElement(_, (ns, name), attrs) => {
                    nodes += 1 + attrs.len();
                    strings += ns.len() + name.len();
                    strings += attrs
                        .iter()
                        .map(|((_, n), v)| n.len() + v.len())
                        .sum::<usize>();
                    let mut el = Element::bare(name.as_str(), ns.as_str());
                    *el.attrs_mut() = attrs;
                    stack.push(el);
                }
                rxml::Event::Text(_, text) => {
                    nodes += 1;
                    strings += text.len();
                    if let Some(top) = stack.last_mut() {
                        top.append_text_node(text);
                    }
                }
                rxml::Event::EndElement(_) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| ReadError::Xml("unbalanced end tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => {
                            parent.append_child(done);
                        }
                        None => {
                            if !input.is_empty() {
                                return Err(ReadError::Xml("bytes after an element".into()));
                            }
                            return Ok(Inbound::Element(done));
                        }
                    }
                }
                rxml::Event::XmlDeclaration(..) => {
                    return Err(ReadError::Xml("XML declaration inside the stream".into()));
                }
            }
            let exceeded = if nodes > limits.max_nodes {
                Some(Exceeded::Nodes(limits.max_nodes))
            } else if strings > limits.tree_bytes() {
                Some(Exceeded::Tree(limits.tree_bytes()))
            } else {
                None
            };
            if let Some(exceeded) = exceeded
                && !stack.is_empty()
            {
                // What was built is dropped now; the root's start tag answers the stanza.
                let depth = stack.len() - 1;
                let root = stack.swap_remove(0);
                stack = Vec::new();
                over = Some((
                    Oversized {
                        ns: root.ns(),
                        name: root.name().to_owned(),
                        from: root.attr("from").map(str::to_owned),
                        to: root.attr("to").map(str::to_owned),
                        id: root.attr("id").map(str::to_owned),
                        type_: root.attr("type").map(str::to_owned),
                        exceeded,
                    },
                    depth,
                ));
            }
        }
    }

    /// The header of an element over a limit: its start tag, if that was kept, parsed by a
    /// parser of its own primed with the stream header (the stream's parser never sees the
    /// element, so its state is untouched).
    fn oversized(
        &mut self,
        head: Option<Vec<u8>>,
        exceeded: Exceeded,
    ) -> Result<Oversized, ReadError> {
        let mut o = Oversized {
            ns: String::new(),
            name: String::new(),
            from: None,
            to: None,
            id: None,
            type_: None,
            exceeded,
        };
        let (Some(head), Some(header)) = (head, self.header.as_deref()) else {
            return Ok(o);
        };
        // Sized for the start tag only (it is within the limit), not for a whole stanza.
        let mut p = parser(Limits {
            max_bytes: head.len(),
            max_depth: self.framer.limits().max_depth,
            max_nodes: crate::inbound::MAX_NODES,
        });
        for mut input in [header, &head[..]] {
            loop {
                match p.parse(&mut input, false) {
                    Ok(Some(rxml::Event::StartElement(_, (ns, name), attrs)))
                        if !(name.as_str() == "stream"
                            && ns.as_str() == crate::stanza::STREAM_NS) =>
                    {
                        let get =
                            |n: &str| attrs.get(&rxml::Namespace::NONE, n).map(|v| v.to_string());
                        o.ns = ns.to_string();
                        o.name = name.to_string();
                        o.from = get("from");
                        o.to = get("to");
                        o.id = get("id");
                        o.type_ = get("type");
                        return Ok(o);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(rxml::error::EndOrError::NeedMoreData) => break,
                    // The start tag itself is ill-formed: the element is dropped unanswered.
                    Err(rxml::error::EndOrError::Error(_)) => return Ok(o),
                }
            }
        }
        Ok(o)
    }
}
