//! What the server sends, read as raw XML elements under hard limits.
//!
//! tokio-xmpp's typed `Component` stream ends on the first stanza xmpp-parsers rejects. Here
//! the xmlstream layer is asked for [`Inbound`] instead: any well-formed element becomes a
//! [`minidom::Element`] the proxy inspects itself, so an odd stanza is answered or ignored
//! and the session goes on. An element deeper or larger than the limits is not built at all:
//! its remaining events are counted and dropped (no recursion, no memory held), and the proxy
//! gets its stanza header, enough to answer a request with an error.

use xmpp_parsers::minidom::Element;
use xso::{Context, FromEventsBuilder, FromXml, error::Error, error::FromEventsError};

/// Limits on one element read from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of XML, as received, one stanza may take.
    pub max_bytes: usize,
    /// Most nesting levels, the stanza element itself being level 1.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 512 * 1024,
            max_depth: 64,
        }
    }
}

/// One top-level element of the component stream.
#[derive(Debug)]
pub enum Inbound {
    /// A well-formed element within the limits.
    Element(Element),
    /// An element over a limit: only its name and stanza header were kept.
    Oversized(Oversized),
}

/// The header of an element that was over a limit, and which limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Namespace of the element.
    pub ns: String,
    /// Local name (`iq`, `message`, ...).
    pub name: String,
    /// `from` attribute.
    pub from: Option<String>,
    /// `to` attribute.
    pub to: Option<String>,
    /// `id` attribute.
    pub id: Option<String>,
    /// `type` attribute.
    pub type_: Option<String>,
    /// Which limit it broke.
    pub exceeded: Exceeded,
}

/// The limit an element broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// [`Limits::max_bytes`].
    Bytes(usize),
    /// [`Limits::max_depth`].
    Depth(usize),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Bytes(n) => write!(f, "stanza larger than {n} bytes"),
            Exceeded::Depth(n) => write!(f, "stanza nested deeper than {n} levels"),
        }
    }
}

/// Limits used by the [`FromXml`] implementation. The xmlstream layer gives a builder no
/// parameters, so the session sets them once per process before it reads anything; the
/// default applies otherwise.
static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();

/// Sets the limits for every stream read from now on. Only the first call has an effect.
pub fn set_limits(limits: Limits) {
    let _ = LIMITS.set(limits);
}

fn limits() -> Limits {
    LIMITS.get().copied().unwrap_or_default()
}

/// Builds an [`Inbound`] from XML events (used by the xmlstream reader).
///
/// The tree is built with an explicit stack (no recursion), and each element takes the
/// parser's attribute map as it is (no copy). The stanza header of an oversized element is
/// read from the partial root when a limit is hit, so nothing is copied up front.
pub struct InboundBuilder {
    limits: Limits,
    bytes: usize,
    depth: usize,
    state: State,
}

enum State {
    /// Open elements, root first.
    Building(Vec<Element>),
    /// Over a limit: the rest of the element is counted and dropped.
    Skipping(Box<Oversized>),
}

impl FromXml for Inbound {
    type Builder = InboundBuilder;

    fn from_events(
        name: rxml::QName,
        attrs: rxml::AttrMap,
        ctx: &Context<'_>,
    ) -> Result<Self::Builder, FromEventsError> {
        Ok(InboundBuilder::new(limits(), name, attrs, ctx))
    }
}

fn element(name: rxml::QName, attrs: rxml::AttrMap) -> Element {
    let mut el = Element::bare(name.1.as_str(), name.0.as_str());
    *el.attrs_mut() = attrs;
    el
}

impl InboundBuilder {
    /// A builder with explicit limits, for tests and the fuzzer.
    pub fn new(
        limits: Limits,
        name: rxml::QName,
        attrs: rxml::AttrMap,
        _ctx: &Context<'_>,
    ) -> Self {
        let bytes = name.1.len()
            + attrs
                .iter()
                .map(|((_, n), v)| n.len() + v.len() + 4)
                .sum::<usize>();
        let mut stack = Vec::with_capacity(4);
        stack.push(element(name, attrs));
        let mut b = InboundBuilder {
            limits,
            bytes: 0,
            depth: 1,
            state: State::Building(stack),
        };
        b.count(bytes);
        b
    }

    fn count(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.limits.max_bytes {
            self.exceed(Exceeded::Bytes(self.limits.max_bytes));
        }
    }

    fn exceed(&mut self, what: Exceeded) {
        if let State::Building(stack) = &self.state {
            let root = &stack[0];
            let get = |n: &str| root.attr(n).map(str::to_owned);
            let header = Oversized {
                ns: root.ns(),
                name: root.name().to_owned(),
                from: get("from"),
                to: get("to"),
                id: get("id"),
                type_: get("type"),
                exceeded: what,
            };
            // Dropping the partial tree is cheap and shallow: it is at most max_depth deep.
            self.state = State::Skipping(Box::new(header));
        }
    }
}

impl FromEventsBuilder for InboundBuilder {
    type Output = Inbound;

    fn feed(&mut self, ev: rxml::Event, _ctx: &Context<'_>) -> Result<Option<Inbound>, Error> {
        match &ev {
            rxml::Event::StartElement(m, ..) => {
                self.depth += 1;
                self.count(m.len());
                if self.depth > self.limits.max_depth {
                    self.exceed(Exceeded::Depth(self.limits.max_depth));
                }
            }
            rxml::Event::EndElement(m) => {
                self.depth -= 1;
                self.count(m.len());
            }
            rxml::Event::Text(m, text) => self.count(m.len().max(text.len())),
            rxml::Event::XmlDeclaration(m, _) => self.count(m.len()),
        }
        match &mut self.state {
            State::Building(stack) => match ev {
                rxml::Event::StartElement(_, name, attrs) => {
                    stack.push(element(name, attrs));
                    Ok(None)
                }
                rxml::Event::Text(_, text) => {
                    if let Some(top) = stack.last_mut() {
                        top.append_text_node(text);
                    }
                    Ok(None)
                }
                rxml::Event::EndElement(_) => {
                    let done = stack.pop().expect("an open element per end event");
                    match stack.last_mut() {
                        Some(parent) => {
                            parent.append_child(done);
                            Ok(None)
                        }
                        None => Ok(Some(Inbound::Element(done))),
                    }
                }
                rxml::Event::XmlDeclaration(..) => Ok(None),
            },
            State::Skipping(header) => {
                if self.depth == 0 {
                    Ok(Some(Inbound::Oversized(std::mem::replace(
                        header.as_mut(),
                        placeholder(),
                    ))))
                } else {
                    Ok(None)
                }
            }
        }
    }
}

fn placeholder() -> Oversized {
    Oversized {
        ns: String::new(),
        name: String::new(),
        from: None,
        to: None,
        id: None,
        type_: None,
        exceeded: Exceeded::Bytes(0),
    }
}

/// Reads the first element of `xml` as the session would read it from a component stream
/// (whose default namespace is `jabber:component:accept`). `None` if `xml` does not hold a
/// complete well-formed element. For tests, benchmarks and the fuzzer, which drive the proxy
/// from bytes.
pub fn read_one(xml: &[u8], limits: Limits) -> Option<Inbound> {
    use rxml::Parse;
    let mut parser = rxml::Parser::default();
    let ctx = Context::empty();
    let mut input: &[u8] = b"<stream xmlns='jabber:component:accept'>";
    let mut builder: Option<InboundBuilder> = None;
    let mut depth = 0usize;
    for (chunk, at_eof) in [(&mut input, false), (&mut &xml[..], false)] {
        loop {
            let ev = match parser.parse(chunk, at_eof) {
                Ok(Some(ev)) => ev,
                Ok(None) => return None,
                Err(rxml::error::EndOrError::NeedMoreData) => break,
                Err(_) => return None,
            };
            depth = match &ev {
                rxml::Event::StartElement(..) => depth + 1,
                rxml::Event::EndElement(..) => depth.checked_sub(1)?,
                _ => depth,
            };
            match (&mut builder, ev) {
                (Some(b), ev) => match b.feed(ev, &ctx) {
                    Ok(Some(out)) => return Some(out),
                    Ok(None) => {}
                    Err(_) => return None,
                },
                (None, rxml::Event::StartElement(_, name, attrs)) if depth == 2 => {
                    builder = Some(InboundBuilder::new(limits, name, attrs, &ctx));
                }
                (None, rxml::Event::Text(..)) if depth == 1 => {}
                (None, rxml::Event::StartElement(..)) if depth == 1 => {}
                _ => return None,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(xml: &str, limits: Limits) -> Inbound {
        read_one(xml.as_bytes(), limits).expect("a complete element")
    }

    #[test]
    fn ordinary_element_is_built() {
        let Inbound::Element(e) = read(
            "<iq type='get' id='1'><query xmlns='q'><a>text</a></query></iq>",
            Limits::default(),
        ) else {
            panic!()
        };
        assert_eq!(e.name(), "iq");
        assert_eq!(e.ns(), "jabber:component:accept");
        assert_eq!(e.children().next().unwrap().ns(), "q");
    }

    #[test]
    fn deep_element_is_skipped_with_header() {
        let deep = format!(
            "<iq type='set' id='d' from='u@e/r'>{}{}</iq>",
            "<a>".repeat(10_000),
            "</a>".repeat(10_000)
        );
        let Inbound::Oversized(o) = read(&deep, Limits::default()) else {
            panic!()
        };
        assert_eq!(o.exceeded, Exceeded::Depth(64));
        assert_eq!(o.id.as_deref(), Some("d"));
        assert_eq!(o.from.as_deref(), Some("u@e/r"));
        assert_eq!(o.name, "iq");
    }

    #[test]
    fn large_element_is_skipped() {
        let big = format!(
            "<message id='m'><body>{}</body></message>",
            "x".repeat(10_000)
        );
        let limits = Limits {
            max_bytes: 4096,
            max_depth: 64,
        };
        let Inbound::Oversized(o) = read(&big, limits) else {
            panic!()
        };
        assert_eq!(o.exceeded, Exceeded::Bytes(4096));
        assert_eq!(o.name, "message");
    }
}
