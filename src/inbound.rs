//! What the server sends, as the core sees it: raw XML elements read under hard limits
//! (by [`crate::stream`]).
//!
//! Any well-formed element becomes a [`minidom::Element`] the proxy inspects itself, so an
//! odd stanza is answered or ignored and the session goes on. An element deeper or larger
//! than the limits is not built at all: the proxy gets its stanza header, enough to answer a
//! request with an error.

use xmpp_parsers::minidom::Element;

/// Most nodes (elements, attributes and text nodes) of one stanza built into a tree. A
/// parsed node costs far more memory than the bytes it was written in (`<a/>` is 4 bytes on
/// the wire and about 200 on the heap), so the byte limit alone does not bound what a tree
/// costs: a stanza with more nodes is not built, and is answered as one over a limit
/// (SECURITY.md, "Memory").
pub const MAX_NODES: usize = 16_384;

/// Limits on one element read from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of XML, as received, one stanza may take.
    pub max_bytes: usize,
    /// Most nesting levels, the stanza element itself being level 1.
    pub max_depth: usize,
    /// Most nodes (elements, attributes, texts) of a stanza built into a tree: [`MAX_NODES`]
    /// for what the server sends.
    pub max_nodes: usize,
}

impl Limits {
    /// Most bytes of names, namespaces, attribute values and text one stanza's tree may
    /// hold: twice the byte limit (what was received, decoded, never grows; only each
    /// element's own copy of its namespace can make the tree hold more than the wire did).
    pub fn tree_bytes(&self) -> usize {
        self.max_bytes.saturating_mul(2)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 512 * 1024,
            max_depth: 64,
            max_nodes: MAX_NODES,
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
    /// [`Limits::max_nodes`].
    Nodes(usize),
    /// [`Limits::tree_bytes`].
    Tree(usize),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Bytes(n) => write!(f, "stanza larger than {n} bytes"),
            Exceeded::Depth(n) => write!(f, "stanza nested deeper than {n} levels"),
            Exceeded::Nodes(n) => {
                write!(f, "stanza of more than {n} elements, attributes and texts")
            }
            Exceeded::Tree(n) => write!(
                f,
                "stanza whose tree would hold more than {n} bytes of names, values and text"
            ),
        }
    }
}

/// Bytes of names, namespaces, attribute values and text a tree holds, as the reader counts
/// them against [`Limits::tree_bytes`] (each element its own namespace).
pub(crate) fn tree_strings(el: &Element) -> usize {
    el.ns().len()
        + el.name().len()
        + el.attrs()
            .iter()
            .map(|((_, n), v)| n.len() + v.len())
            .sum::<usize>()
        + el.nodes()
            .map(|n| match n {
                xmpp_parsers::minidom::Node::Element(c) => tree_strings(c),
                xmpp_parsers::minidom::Node::Text(t) => t.len(),
            })
            .sum::<usize>()
}

/// Reads the first element of `xml` as the session would read it from a component stream
/// (whose default namespace is `jabber:component:accept`). `None` if `xml` does not hold a
/// complete well-formed element. For tests, benchmarks and the fuzzer, which drive the proxy
/// from bytes (`invariants::read_one`), and for a held request read again at its release.
pub fn read_one(xml: &[u8], limits: Limits) -> Option<Inbound> {
    use crate::stream::{Frame, Reader};
    let mut reader = Reader::resume(limits, TEST_HEADER).ok()?;
    reader.feed(xml).ok()?;
    match reader.next_frame() {
        Ok(Some(Frame::Stanza(inbound))) => Some(inbound),
        _ => None,
    }
}

/// The stream header [`read_one`] reads elements under: what Prosody sends a component.
pub const TEST_HEADER: &[u8] = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
xmlns='jabber:component:accept' id='test' from='proxy.example'>";

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
            max_nodes: MAX_NODES,
        };
        let Inbound::Oversized(o) = read(&big, limits) else {
            panic!()
        };
        assert_eq!(o.exceeded, Exceeded::Bytes(4096));
        assert_eq!(o.name, "message");
    }

    /// `<iq>` with `pairs` times `<a/>x` in a `<q/>`: 2 (iq and q) + 3 (the iq's
    /// attributes) + 2 × pairs nodes.
    fn many_nodes(pairs: usize) -> String {
        format!(
            "<iq type='get' id='n' from='u@e/r'><q xmlns='urn:x'>{}</q></iq>",
            "<a/>x".repeat(pairs)
        )
    }

    #[test]
    fn a_stanza_of_more_nodes_than_the_limit_is_not_built() {
        let at_limit = (MAX_NODES - 5) / 2;
        let Inbound::Element(e) = read(&many_nodes(at_limit), Limits::default()) else {
            panic!("a stanza of MAX_NODES nodes is built")
        };
        assert_eq!(
            e.get_child("q", "urn:x").unwrap().children().count(),
            at_limit
        );
        let Inbound::Oversized(o) = read(&many_nodes(at_limit + 1), Limits::default()) else {
            panic!("one node more is not built")
        };
        assert_eq!(o.exceeded, Exceeded::Nodes(MAX_NODES));
        assert_eq!(o.id.as_deref(), Some("n"));
        assert_eq!(o.from.as_deref(), Some("u@e/r"));
        assert_eq!((o.name.as_str(), o.type_.as_deref()), ("iq", Some("get")));
        assert_eq!(o.ns, "jabber:component:accept");
        // Attributes count: one element with many of them.
        let attrs: String = (0..MAX_NODES).map(|i| format!(" a{i}='v'")).collect();
        let wide = format!("<message id='w'><x xmlns='urn:x'{attrs}/></message>");
        assert!(matches!(
            read(&wide, Limits::default()),
            Inbound::Oversized(Oversized {
                exceeded: Exceeded::Nodes(_),
                ..
            })
        ));
    }

    #[test]
    fn the_stream_reads_on_after_a_stanza_over_the_node_limit() {
        use crate::stream::{Frame, Reader};
        let mut reader = Reader::resume(Limits::default(), TEST_HEADER).unwrap();
        // Over the limit deep inside, so that the skip has open elements to follow.
        let deep = format!(
            "<iq type='set' id='d'><q xmlns='urn:x'><r>{}</r></q></iq>",
            "<a><b/>t</a>".repeat(MAX_NODES)
        );
        reader.feed(deep.as_bytes()).unwrap();
        reader
            .feed(b"<iq type='get' id='next'><ping xmlns='urn:xmpp:ping'/></iq>")
            .unwrap();
        let Some(Frame::Stanza(Inbound::Oversized(o))) = reader.next_frame().unwrap() else {
            panic!()
        };
        assert_eq!(o.id.as_deref(), Some("d"));
        let Some(Frame::Stanza(Inbound::Element(e))) = reader.next_frame().unwrap() else {
            panic!("the next stanza reads whole")
        };
        assert_eq!(e.attr("id"), Some("next"));
        assert!(reader.at_boundary());
    }

    #[test]
    fn a_namespace_repeated_on_every_element_is_charged_each_time() {
        // 100 KB of namespace on `q`, inherited by 100 children: each element of the tree
        // holds its own copy (10 MB), far over twice the byte limit.
        let ns = "A".repeat(100_000);
        let xml = format!(
            "<iq type='get' id='ns' from='u@e/r'><q xmlns='{ns}'>{}</q></iq>",
            "<a/>".repeat(100)
        );
        let Inbound::Oversized(o) = read(&xml, Limits::default()) else {
            panic!("not built")
        };
        assert_eq!(o.exceeded, Exceeded::Tree(2 * 512 * 1024));
        assert_eq!(o.id.as_deref(), Some("ns"));
        // Five children: 600 KB, within.
        let xml = format!(
            "<iq type='get' id='ns' from='u@e/r'><q xmlns='{ns}'>{}</q></iq>",
            "<a/>".repeat(5)
        );
        assert!(matches!(read(&xml, Limits::default()), Inbound::Element(_)));
    }

    #[test]
    fn a_start_tag_of_more_attributes_than_the_node_limit_never_reaches_the_parser() {
        // On a child: the framer stops keeping the element at the attribute past the limit.
        let attrs: String = (0..MAX_NODES).map(|i| format!(" a{i}=''")).collect();
        let xml = format!("<iq type='set' id='w' from='u@e/r'><x xmlns='urn:x'{attrs}/></iq>");
        let Inbound::Oversized(o) = read(&xml, Limits::default()) else {
            panic!()
        };
        assert_eq!(o.exceeded, Exceeded::Nodes(MAX_NODES));
        assert_eq!(o.id.as_deref(), Some("w"));
        // On the stanza itself, after its id: the summary keeps what answers it, and no
        // more than a few attributes of the rest.
        let xml = format!("<iq type='set' id='r' from='u@e/r'{attrs} to='proxy.example'/>");
        let Inbound::Oversized(o) = read(&xml, Limits::default()) else {
            panic!()
        };
        assert_eq!(o.exceeded, Exceeded::Nodes(MAX_NODES));
        assert_eq!(
            (o.id.as_deref(), o.type_.as_deref(), o.from.as_deref()),
            (Some("r"), Some("set"), Some("u@e/r"))
        );
        // A start tag over the byte limit is summarised to the same few attributes.
        let big: String = (0..20_000)
            .map(|i| format!(" b{i}='{}'", "v".repeat(40)))
            .collect();
        let xml = format!("<iq type='get' id='big' from='u@e/r'{big}/>");
        let Inbound::Oversized(o) = read(&xml, Limits::default()) else {
            panic!()
        };
        assert_eq!(o.exceeded, Exceeded::Bytes(512 * 1024));
        assert_eq!(o.id.as_deref(), Some("big"));
        let mut framer = crate::stream::framer::Framer::resumed(Limits::default());
        framer.feed(xml.as_bytes()).unwrap();
        let Some(crate::stream::framer::Piece::Oversized {
            head: Some(head), ..
        }) = framer.next_piece()
        else {
            panic!()
        };
        assert!(head.len() < 200, "{}", String::from_utf8_lossy(&head));
    }
}
