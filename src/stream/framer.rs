//! Splits the bytes of a component stream into its pieces — the stream header, each
//! top-level element, the footer — by lexing just enough XML to find their boundaries, before
//! any XML parser sees them.
//!
//! This is what lets [`super::Reader`] hold the limits of `[limits]` *before* parsing: an
//! element is collected only while it is within `max_bytes` and `max_depth`; past that its
//! remaining bytes are counted and dropped as they arrive, so that an over-limit element is
//! never held whole and no token of it (an attribute value or a name of any length) ever
//! reaches the parser, whose own token limit would otherwise end the stream.
//!
//! Comments and CDATA sections inside an element are kept (the parser discards comments);
//! a processing instruction, which the parser would reject, becomes a comment. The framer does not check well-formedness beyond what finding
//! boundaries needs: the parser checks every element it is given.

use std::collections::VecDeque;

use crate::inbound::{Exceeded, Limits};

/// When a top-level start tag alone is over the byte limit, its attributes of at most this
/// many bytes (addresses, id, type, namespace declarations) are kept to answer it.
pub const SUMMARY_ATTR_BYTES: usize = 4096;
/// Most attributes a summary keeps (the rest are not needed to answer the stanza).
pub const SUMMARY_ATTRS: usize = 16;

/// The most capacity the element buffer keeps between elements (a larger one is freed).
const KEPT_CAPACITY: usize = 16 * 1024;

/// The most bytes the stream header (`<stream:stream ...>`) may take.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// One piece of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The stream header's start tag, as received.
    Header(Vec<u8>),
    /// A complete top-level element within the limits (processing instructions turned into
    /// comments).
    Element(Vec<u8>),
    /// A top-level element over a limit. `head` is its start tag when that alone was within
    /// the byte limit.
    Oversized {
        /// The element's start tag, if it was complete within the limit.
        head: Option<Vec<u8>>,
        /// Which limit it broke.
        exceeded: Exceeded,
    },
    /// The stream's end tag.
    Footer,
}

/// The bytes are not XML in a way that finding boundaries notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramingError(pub &'static str);

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Character data.
    Text,
    /// Just after `<`.
    Lt,
    /// After `<!` and `n` bytes of `--` or `[CDATA[`.
    Bang { cdata: bool, n: u8 },
    /// In a comment; `dashes` consecutive `-` just seen.
    Comment { dashes: u8 },
    /// In a processing instruction (or the XML declaration); whether `?` was just seen.
    Pi { question: bool },
    /// In a CDATA section; `brackets` consecutive `]` just seen.
    Cdata { brackets: u8 },
    /// In a start tag; `quote` is the open quote of an attribute value (0: none), `slash`
    /// whether the last byte outside a value was `/`.
    StartTag { quote: u8, slash: bool },
    /// In an end tag.
    EndTag,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collecting {
    /// Between pieces: bytes are looked at, not kept.
    Nothing,
    /// The stream header's start tag.
    Header,
    /// A top-level element.
    Element,
}

/// The splitter. Feed it bytes in chunks of any size; take the pieces out.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    lex: Lex,
    /// Element depth: 0 before the header, 1 inside the stream, 2 inside a top-level element.
    depth: usize,
    collecting: Collecting,
    /// Bytes of the piece being collected.
    buf: Vec<u8>,
    /// Bytes of the current top-level element as received (including what is dropped).
    count: usize,
    /// Where in `buf` the markup being lexed began (to drop comments and PIs).
    markup_start: usize,
    /// Length of the top-level element's start tag in `buf`, once complete.
    root_end: Option<usize>,
    /// Set when the current element broke a limit: nothing more is kept (but see `summary`).
    exceeded: Option<Exceeded>,
    /// Where in `buf` the top-level start tag's current attribute begins (0: its name is not
    /// complete yet).
    attr_start: usize,
    /// The top-level start tag broke the byte limit: its name and its attributes of at most
    /// [`SUMMARY_ATTR_BYTES`] are still kept, so that the stanza can be answered.
    summary: bool,
    /// In `summary`, the current attribute is too long and is being dropped.
    skip_attr: bool,
    /// Start tags and attribute values (namespace declarations included) of the current
    /// top-level element so far: past [`Limits::max_nodes`], the element is over a limit
    /// before the parser sees a start tag of more attributes than that (the parser builds
    /// every attribute of a start tag before it hands the tag over).
    nodes: usize,
    /// Attributes a summary kept so far.
    summary_attrs: usize,
    /// Where in `buf` the top-level start tag's attribute before the current one begins.
    prev_attr_start: usize,
    closed: bool,
    out: VecDeque<Piece>,
}

impl Framer {
    /// A framer at the start of a stream.
    pub fn new(limits: Limits) -> Framer {
        Framer {
            limits,
            lex: Lex::Text,
            depth: 0,
            collecting: Collecting::Nothing,
            buf: Vec::new(),
            count: 0,
            markup_start: 0,
            root_end: None,
            exceeded: None,
            attr_start: 0,
            summary: false,
            skip_attr: false,
            nodes: 0,
            summary_attrs: 0,
            prev_attr_start: 0,
            closed: false,
            out: VecDeque::new(),
        }
    }

    /// A framer inside a stream whose header was already read (to resume a stream).
    pub fn resumed(limits: Limits) -> Framer {
        let mut f = Framer::new(limits);
        f.depth = 1;
        f
    }

    /// The limits it enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether it is between top-level elements (nothing partial is held).
    pub fn at_boundary(&self) -> bool {
        self.collecting == Collecting::Nothing && self.lex == Lex::Text
    }

    /// What a [`Framer::resumed`] framer must be fed to go on exactly where this one is —
    /// the bytes of the element not yet complete, from its `<` (empty at a boundary) — or
    /// `None` where no such bytes exist: pieces not yet taken, an element over a limit being
    /// dropped, the header not yet complete, or markup between elements (a comment, the
    /// footer) only begun. The caller then reads on and asks again.
    pub fn pending(&self) -> Option<Vec<u8>> {
        if !self.out.is_empty() || self.closed || self.depth == 0 || self.exceeded.is_some() {
            return None;
        }
        match (self.collecting, self.lex) {
            (Collecting::Element, _) => Some(self.buf.clone()),
            (Collecting::Nothing, Lex::Text) => Some(Vec::new()),
            // A `<` between elements is not kept until the next byte says what it opens.
            (Collecting::Nothing, Lex::Lt) => Some(b"<".to_vec()),
            _ => None,
        }
    }

    /// Bytes held for the element being collected (bounded by the byte limit).
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// The next complete piece, if any.
    pub fn next_piece(&mut self) -> Option<Piece> {
        self.out.pop_front()
    }

    /// Consumes `input`.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), FramingError> {
        if self.closed {
            return Ok(());
        }
        while !input.is_empty() {
            let n = self.step(input)?;
            input = &input[n..];
            if self.closed {
                break;
            }
        }
        Ok(())
    }

    fn keeping(&self) -> bool {
        self.collecting != Collecting::Nothing && self.exceeded.is_none()
    }

    /// Takes `bytes` as part of the current piece: counted against the limit, and kept
    /// unless the piece is already over it.
    fn take(&mut self, bytes: &[u8]) -> Result<(), FramingError> {
        match self.collecting {
            Collecting::Nothing => Ok(()),
            Collecting::Header => {
                if self.buf.len() + bytes.len() > MAX_HEADER_BYTES {
                    return Err(FramingError("stream header too large"));
                }
                self.buf.extend_from_slice(bytes);
                Ok(())
            }
            Collecting::Element => {
                self.count = self.count.saturating_add(bytes.len());
                if self.exceeded.is_some() {
                    if self.summary && !self.skip_attr {
                        self.buf.extend_from_slice(bytes);
                        // Below the limit, not at it: the summary is closed with a `>`.
                        if self.buf.len() - self.attr_start > SUMMARY_ATTR_BYTES
                            || self.buf.len() >= self.limits.max_bytes
                        {
                            self.buf.truncate(self.attr_start);
                            self.skip_attr = true;
                        }
                    }
                    return Ok(());
                }
                if self.count > self.limits.max_bytes {
                    self.exceed(Exceeded::Bytes(self.limits.max_bytes));
                } else {
                    self.buf.extend_from_slice(bytes);
                }
                Ok(())
            }
        }
    }

    fn exceed(&mut self, what: Exceeded) {
        if self.exceeded.is_some() {
            return;
        }
        self.exceeded = Some(what);
        match self.root_end {
            Some(end) => self.buf.truncate(end),
            // Inside the top-level start tag, past its name: summarise it.
            None if self.attr_start > 0 => {
                // The attributes complete so far, if they leave room for the summary's `>`;
                // otherwise all but the last (which began below the limit); and of those,
                // only what a summary keeps.
                if self.attr_start >= self.limits.max_bytes {
                    self.attr_start = self.prev_attr_start;
                }
                self.buf.truncate(self.attr_start);
                let (head, kept) = summary_of(&self.buf);
                self.buf = head;
                self.summary_attrs = kept;
                self.attr_start = self.buf.len();
                self.prev_attr_start = self.attr_start;
                self.summary = true;
                self.skip_attr = true;
            }
            None => self.buf.truncate(0),
        }
    }

    /// Whether a summary keeps `attr` (` name='value'`, as received): see [`summarised`].
    fn summarised(&self, attr: &[u8]) -> bool {
        summarised(attr) && self.summary_attrs < SUMMARY_ATTRS
    }

    /// A start tag or an attribute value of the top-level element was lexed.
    fn node(&mut self) {
        if self.collecting == Collecting::Element {
            self.nodes = self.nodes.saturating_add(1);
            if self.nodes > self.limits.max_nodes {
                self.exceed(Exceeded::Nodes(self.limits.max_nodes));
            }
        }
    }

    /// Whether the lexer is in the top-level element's start tag.
    fn in_root_tag(&self) -> bool {
        self.collecting == Collecting::Element && self.root_end.is_none() && self.depth == 1
    }

    /// A quoted attribute value of the top-level start tag ended: the next attribute starts
    /// here.
    fn attribute_done(&mut self) {
        if self.in_root_tag() && (self.exceeded.is_none() || self.summary) {
            if self.summary && !self.skip_attr && !self.summarised(&self.buf[self.attr_start..]) {
                // Only what answering the stanza needs is kept (and a few of those): the
                // summary is parsed, and the parser builds every attribute it holds.
                self.buf.truncate(self.attr_start);
                self.skip_attr = false;
                return;
            }
            if self.summary && !self.skip_attr {
                self.summary_attrs += 1;
            }
            self.skip_attr = false;
            self.prev_attr_start = self.attr_start;
            self.attr_start = self.buf.len();
        }
    }

    /// Lexes from the start of `input`; returns how many bytes it consumed (at least one).
    fn step(&mut self, input: &[u8]) -> Result<usize, FramingError> {
        match self.lex {
            Lex::Text => {
                let end = memchr::memchr(b'<', input).unwrap_or(input.len());
                if end > 0 {
                    // Character data between top-level elements (whitespace keepalives) is
                    // not kept; inside an element it is.
                    self.take(&input[..end])?;
                    return Ok(end);
                }
                self.markup_start = self.buf.len();
                self.lex = Lex::Lt;
                self.take(b"<")?;
                Ok(1)
            }
            Lex::Lt => {
                let b = input[0];
                match b {
                    b'/' => self.lex = Lex::EndTag,
                    b'?' => self.lex = Lex::Pi { question: false },
                    b'!' => self.lex = Lex::Bang { cdata: false, n: 0 },
                    _ if b.is_ascii_whitespace() || b == b'>' || b == b'<' => {
                        return Err(FramingError("'<' not followed by a name"));
                    }
                    _ => {
                        self.lex = Lex::StartTag {
                            quote: 0,
                            slash: false,
                        };
                        if self.collecting == Collecting::Nothing {
                            self.begin_piece()?;
                        }
                        self.node();
                    }
                }
                self.take(&input[..1])?;
                Ok(1)
            }
            Lex::Bang { cdata, n } => {
                const CDATA: &[u8] = b"[CDATA[";
                let b = input[0];
                self.lex = match (cdata, n, b) {
                    (false, 0, b'-') => Lex::Bang { cdata: false, n: 1 },
                    (false, 1, b'-') => Lex::Comment { dashes: 0 },
                    (false, 0, b'[') => Lex::Bang { cdata: true, n: 1 },
                    (true, n, b) if b == CDATA[n as usize] => {
                        if n as usize + 1 == CDATA.len() {
                            Lex::Cdata { brackets: 0 }
                        } else {
                            Lex::Bang {
                                cdata: true,
                                n: n + 1,
                            }
                        }
                    }
                    _ => return Err(FramingError("document type or unknown markup")),
                };
                self.take(&input[..1])?;
                Ok(1)
            }
            Lex::Comment { dashes } => {
                let b = input[0];
                self.take(&input[..1])?;
                self.lex = match b {
                    b'-' => Lex::Comment {
                        dashes: (dashes + 1).min(2),
                    },
                    // Comments are kept: the parser discards them itself, and cutting them
                    // out could join `]]` and `>` of the text around them.
                    b'>' if dashes >= 2 => Lex::Text,
                    _ => Lex::Comment { dashes: 0 },
                };
                Ok(1)
            }
            Lex::Pi { question } => {
                let b = input[0];
                self.take(&input[..1])?;
                self.lex = match b {
                    b'>' if question => {
                        self.pi_to_comment();
                        Lex::Text
                    }
                    _ => Lex::Pi {
                        question: b == b'?',
                    },
                };
                Ok(1)
            }
            Lex::Cdata { brackets } => {
                let b = input[0];
                self.take(&input[..1])?;
                self.lex = match b {
                    b']' => Lex::Cdata {
                        brackets: (brackets + 1).min(2),
                    },
                    b'>' if brackets >= 2 => Lex::Text,
                    _ => Lex::Cdata { brackets: 0 },
                };
                Ok(1)
            }
            Lex::StartTag { quote, slash } => {
                if quote != 0 {
                    // Inside an attribute value: up to and including the closing quote.
                    return match memchr::memchr(quote, input) {
                        Some(i) => {
                            self.take(&input[..=i])?;
                            self.lex = Lex::StartTag {
                                quote: 0,
                                slash: false,
                            };
                            self.node();
                            self.attribute_done();
                            Ok(i + 1)
                        }
                        None => {
                            self.take(input)?;
                            Ok(input.len())
                        }
                    };
                }
                // A run of bytes that change nothing but the length (names, `=`, spaces
                // between attributes) is taken at once. A space that may end the top-level
                // element's name is not part of a run.
                let name_pending =
                    self.attr_start == 0 && self.exceeded.is_none() && self.in_root_tag();
                let run = input
                    .iter()
                    .position(|&b| {
                        matches!(b, b'\'' | b'"' | b'>' | b'/')
                            || (name_pending && b.is_ascii_whitespace())
                    })
                    .unwrap_or(input.len());
                if run > 0 {
                    self.take(&input[..run])?;
                    self.lex = Lex::StartTag {
                        quote: 0,
                        slash: false,
                    };
                    return Ok(run);
                }
                let b = input[0];
                self.take(&input[..1])?;
                if b.is_ascii_whitespace()
                    && self.attr_start == 0
                    && self.exceeded.is_none()
                    && self.in_root_tag()
                {
                    // The top-level element's name is complete.
                    self.attr_start = self.buf.len() - 1;
                    self.prev_attr_start = self.attr_start;
                }
                match b {
                    b'\'' | b'"' => {
                        self.lex = Lex::StartTag {
                            quote: b,
                            slash: false,
                        }
                    }
                    b'>' => {
                        self.lex = Lex::Text;
                        self.start_tag_done(slash)?;
                    }
                    b'/' => {
                        self.lex = Lex::StartTag {
                            quote: 0,
                            slash: true,
                        }
                    }
                    _ => {
                        self.lex = Lex::StartTag {
                            quote: 0,
                            slash: false,
                        }
                    }
                }
                Ok(1)
            }
            Lex::EndTag => {
                let end = memchr::memchr(b'>', input);
                let n = end.map_or(input.len(), |i| i + 1);
                self.take(&input[..n])?;
                if end.is_some() {
                    self.lex = Lex::Text;
                    self.end_tag_done()?;
                }
                Ok(n)
            }
        }
    }

    /// A processing instruction ended: the parser refuses them, so it becomes a comment of
    /// the same length (dropping it could join `]]` and `>` of the text around it). The
    /// shortest PIs (5 and 6 bytes) become the shortest comment, 7 bytes: the difference
    /// counts against the byte limit, so what is held never exceeds it.
    fn pi_to_comment(&mut self) {
        if !self.keeping() || self.collecting != Collecting::Element {
            return;
        }
        const SHORTEST: usize = b"<!---->".len();
        let len = self.buf.len() - self.markup_start;
        self.buf.truncate(self.markup_start);
        self.buf.extend_from_slice(b"<!--");
        self.buf
            .extend(std::iter::repeat_n(b' ', len.saturating_sub(SHORTEST)));
        self.buf.extend_from_slice(b"-->");
        if len < SHORTEST {
            self.count += SHORTEST - len;
            if self.count > self.limits.max_bytes {
                self.exceed(Exceeded::Bytes(self.limits.max_bytes));
            }
        }
    }

    fn begin_piece(&mut self) -> Result<(), FramingError> {
        self.buf.clear();
        self.count = 0;
        self.root_end = None;
        self.exceeded = None;
        self.attr_start = 0;
        self.summary = false;
        self.skip_attr = false;
        self.nodes = 0;
        self.summary_attrs = 0;
        self.prev_attr_start = 0;
        self.collecting = match self.depth {
            0 => Collecting::Header,
            1 => Collecting::Element,
            _ => return Err(FramingError("element outside a piece")),
        };
        // The '<' was taken before the piece began.
        self.take(b"<")
    }

    fn start_tag_done(&mut self, empty: bool) -> Result<(), FramingError> {
        if self.collecting == Collecting::Header {
            if empty {
                return Err(FramingError("empty stream header"));
            }
            self.depth = 1;
            self.collecting = Collecting::Nothing;
            self.out
                .push_back(Piece::Header(std::mem::take(&mut self.buf)));
            return Ok(());
        }
        if self.summary {
            // The summary of a start tag over the limit: what was kept, closed.
            if self.skip_attr {
                self.buf.truncate(self.attr_start);
            }
            if self.buf.last() != Some(&b'>') {
                self.buf.push(b'>');
            }
            self.root_end = Some(self.buf.len());
            self.summary = false;
            self.skip_attr = false;
        }
        if self.root_end.is_none() && self.exceeded.is_none() {
            self.root_end = Some(self.buf.len());
        }
        // The element's level in the stanza (the stanza being level 1) is the stream depth
        // of its parent, whether or not it is empty.
        if self.depth > self.limits.max_depth {
            self.exceed(Exceeded::Depth(self.limits.max_depth));
        }
        if empty {
            if self.depth == 1 {
                self.element_done();
            }
            return Ok(());
        }
        self.depth += 1;
        Ok(())
    }

    fn end_tag_done(&mut self) -> Result<(), FramingError> {
        match self.depth {
            0 => Err(FramingError("end tag before the stream header")),
            1 => {
                self.depth = 0;
                self.closed = true;
                self.out.push_back(Piece::Footer);
                Ok(())
            }
            _ => {
                self.depth -= 1;
                if self.depth == 1 {
                    self.element_done();
                }
                Ok(())
            }
        }
    }

    fn element_done(&mut self) {
        self.collecting = Collecting::Nothing;
        // A small buffer is copied (exactly its size) and keeps its capacity for the next
        // element instead of growing again from nothing; a large one is handed over, so that
        // a large element is never held twice.
        let small = self.buf.capacity() <= KEPT_CAPACITY;
        let mut bytes = || {
            if small {
                self.buf.clone()
            } else {
                std::mem::take(&mut self.buf)
            }
        };
        let piece = match self.exceeded.take() {
            None => Piece::Element(bytes()),
            Some(exceeded) => Piece::Oversized {
                head: self.root_end.map(|_| bytes()),
                exceeded,
            },
        };
        self.buf.clear();
        self.out.push_back(piece);
    }
}

/// Whether a summary keeps the attribute `attr` (` name='value'`, as received): `from`, `to`,
/// `id`, `type` and namespace declarations: what answering the stanza needs.
fn summarised(attr: &[u8]) -> bool {
    let name_start = attr
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(attr.len());
    let rest = &attr[name_start..];
    let name_end = rest
        .iter()
        .position(|&b| b == b'=' || b.is_ascii_whitespace())
        .unwrap_or(rest.len());
    let name = &rest[..name_end];
    matches!(name, b"from" | b"to" | b"id" | b"type" | b"xmlns") || name.starts_with(b"xmlns:")
}

/// Of the top-level start tag begun in `head` (`<name`, then complete attributes), its name
/// and the attributes a summary keeps, at most [`SUMMARY_ATTRS`]; and how many those are.
fn summary_of(head: &[u8]) -> (Vec<u8>, usize) {
    let name_end = head
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let mut out = head[..name_end].to_vec();
    let mut kept = 0;
    let mut i = name_end;
    while i < head.len() {
        // Whitespace, a name, `=` (a name has none), maybe whitespace, a quoted value.
        let Some(eq) = memchr::memchr(b'=', &head[i..]) else {
            break;
        };
        let mut j = i + eq + 1;
        while j < head.len() && head[j].is_ascii_whitespace() {
            j += 1;
        }
        let Some(&quote) = head.get(j) else {
            break;
        };
        let Some(len) = memchr::memchr(quote, &head[j + 1..]) else {
            break;
        };
        let end = j + 1 + len + 1;
        if kept < SUMMARY_ATTRS && summarised(&head[i..end]) {
            out.extend_from_slice(&head[i..end]);
            kept += 1;
        }
        i = end;
    }
    (out, kept)
}
