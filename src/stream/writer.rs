//! Stanzas out, bytes out: the stream header, each element serialised with the stream's
//! namespaces declared once (as tokio-xmpp does, so a stanza carries no `xmlns` of its own),
//! and the footer.
//!
//! Elements take a direct path ([`plain`]) that writes exactly the bytes rxml's encoder
//! writes for the shapes stanzas have (attributes in no namespace or `xml:`, children in
//! the parent's namespace or a default namespace of their own), with one table lookup per
//! byte to escape. Anything else — another attribute namespace, a namespace the stream binds
//! to a prefix, a name or a character that is not XML — is left to the encoder, which
//! writes or refuses it as before. `Writer::element_by_encoder` (tests and fuzzing) keeps
//! the encoder's path callable, so that the two can be compared byte for byte.

use rxml::writer::TrackNamespace;
use xmpp_parsers::minidom::Element;
use xso::AsXml;

use crate::stanza::{NS, STREAM_NS};

/// An element could not be serialised (a name or value that is not XML); nothing of it was
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteError(pub String);

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot serialise an element: {}", self.0)
    }
}

impl std::error::Error for WriteError {}

/// The writing half of a component stream, without I/O: appends bytes to a buffer the shell
/// sends.
pub struct Writer {
    encoder: rxml::writer::Encoder<rxml::writer::SimpleNamespaces>,
    ns: &'static str,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

impl Writer {
    /// A writer for a new component stream: [`Writer::header`] comes first.
    pub fn new() -> Writer {
        Writer::with_namespace(NS)
    }

    /// A writer for a new stream whose default namespace is `ns` (`jabber:client` for a
    /// client, as the test harness is).
    pub fn with_namespace(ns: &'static str) -> Writer {
        let mut encoder = rxml::writer::Encoder::new();
        encoder
            .ns_tracker_mut()
            .declare_fixed(Some(rxml::xml_ncname!("stream")), STREAM_NS.into());
        encoder.ns_tracker_mut().declare_fixed(None, ns.into());
        Writer { encoder, ns }
    }

    /// A writer for a component stream whose header was already sent (by another writer, in
    /// this process or before an upgrade).
    pub fn resumed() -> Writer {
        Writer::resumed_with_namespace(NS)
    }

    /// [`Writer::resumed`] for a stream whose default namespace is `ns`.
    pub fn resumed_with_namespace(ns: &'static str) -> Writer {
        let mut w = Writer::with_namespace(ns);
        w.header(&[], &mut Vec::new());
        w
    }

    /// The stream header, with these attributes: for a component (XEP-0114 §3) just `to`,
    /// the component domain. The default namespace and the `stream` prefix are declared
    /// here, so the stanzas written after it carry no `xmlns` of their own.
    pub fn header(&mut self, attrs: &[(&str, &str)], out: &mut Vec<u8>) {
        use rxml::writer::Item;
        let mut encode = |item: Item<'_>| {
            self.encoder
                .encode(item, out)
                .expect("a stream header is always well-formed")
        };
        encode(Item::XmlDeclaration(rxml::XmlVersion::V1_0));
        encode(Item::ElementHeadStart(
            STREAM_NS.into(),
            rxml::xml_ncname!("stream"),
        ));
        for (name, value) in attrs {
            let name =
                <&rxml::NcNameStr>::try_from(*name).expect("attribute names used here are valid");
            encode(Item::Attribute(rxml::Namespace::NONE, name, value));
        }
        encode(Item::ElementHeadEnd);
    }

    /// The stream footer.
    pub fn footer(&mut self, out: &mut Vec<u8>) {
        if self
            .encoder
            .encode(rxml::writer::Item::ElementFoot, out)
            .is_err()
        {
            out.extend_from_slice(b"</stream:stream>");
        }
    }

    /// Appends `el`, serialised. On error `out` is left as it was.
    pub fn element(&mut self, el: &Element, out: &mut Vec<u8>) -> Result<(), WriteError> {
        let before = out.len();
        if plain::element(el, self.ns, out).is_some() {
            return Ok(());
        }
        out.truncate(before);
        self.encode(el, out)
    }

    /// [`Writer::element`] through rxml's encoder only (the path the direct one must match).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn element_by_encoder(
        &mut self,
        el: &Element,
        out: &mut Vec<u8>,
    ) -> Result<(), WriteError> {
        self.encode(el, out)
    }

    fn encode(&mut self, el: &Element, out: &mut Vec<u8>) -> Result<(), WriteError> {
        let before = out.len();
        let result = (|| {
            for item in el.as_xml_iter().map_err(|e| WriteError(e.to_string()))? {
                let item = item.map_err(|e| WriteError(e.to_string()))?;
                self.encoder
                    .encode(item.as_rxml_item(), out)
                    .map_err(|e| WriteError(e.to_string()))?;
            }
            Ok(())
        })();
        if result.is_err() {
            out.truncate(before);
            // The encoder may be left inside the element: start from a clean one, inside
            // the stream.
            *self = Writer::resumed_with_namespace(self.ns);
        }
        result
    }
}

/// The direct path: `None` where it leaves the element to the encoder (what it wrote is
/// then truncated by the caller).
pub(super) mod plain {
    use xmpp_parsers::minidom::{Element, Node};

    use crate::stanza::STREAM_NS;

    const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
    const XMLNS_NS: &str = "http://www.w3.org/2000/xmlns/";

    /// Bytes that are escaped, or refused, in character data (`<`, `>`, `&`, `\r`, the
    /// control characters XML forbids, and the last bytes of U+FFFE and U+FFFF) …
    const TEXT: [bool; 256] = table(false);
    /// … and in attribute values (also both quotes, `\n` and `\t`).
    const ATTR: [bool; 256] = table(true);

    const fn table(attribute: bool) -> [bool; 256] {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 0x20 {
            t[b] = !matches!(b, 0x09 | 0x0a) || attribute;
            b += 1;
        }
        t[b'<' as usize] = true;
        t[b'>' as usize] = true;
        t[b'&' as usize] = true;
        t[0xbe] = true;
        t[0xbf] = true;
        if attribute {
            t[b'"' as usize] = true;
            t[b'\'' as usize] = true;
        }
        t
    }

    /// Appends `data` escaped as rxml's encoder escapes it; `None` for a character XML
    /// does not allow.
    fn escape(out: &mut Vec<u8>, data: &str, attribute: bool) -> Option<()> {
        let data = data.as_bytes();
        let table = if attribute { &ATTR } else { &TEXT };
        let mut last = 0;
        for (i, &b) in data.iter().enumerate() {
            if !table[usize::from(b)] {
                continue;
            }
            let escaped: &[u8] = match b {
                b'"' => b"&#34;",
                b'\'' => b"&#39;",
                b'<' => b"&lt;",
                b'>' => b"&gt;",
                b'&' => b"&amp;",
                b'\r' => b"&#xd;",
                b'\n' => b"&#xa;",
                b'\t' => b"&#x9;",
                0xbe | 0xbf => {
                    // U+FFFE and U+FFFF (EF BF BE, EF BF BF) are not XML characters.
                    if i >= 2 && data[i - 2] == 0xef && data[i - 1] == 0xbf {
                        return None;
                    }
                    continue;
                }
                _ => return None,
            };
            out.extend_from_slice(&data[last..i]);
            out.extend_from_slice(escaped);
            last = i + 1;
        }
        out.extend_from_slice(&data[last..]);
        Some(())
    }

    /// Appends `el` inside a parent whose default namespace is `parent_ns`.
    /// It recurses once per level, as the encoder's item iterator does: the parser's trees
    /// are at most `limits.max_depth` (≤ 1024) deep and the core's own are shallow.
    pub(in crate::stream) fn element(
        el: &Element,
        parent_ns: &str,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let name = el.name();
        <&rxml::NcNameStr>::try_from(name).ok()?;
        out.push(b'<');
        out.extend_from_slice(name.as_bytes());
        let own_ns;
        let ns = if el.has_ns(parent_ns) {
            parent_ns
        } else {
            own_ns = el.ns();
            // The encoder writes these with a prefix (or, for no namespace, not at all).
            if own_ns.is_empty() || own_ns == STREAM_NS || own_ns == XML_NS || own_ns == XMLNS_NS {
                return None;
            }
            out.extend_from_slice(b" xmlns='");
            escape(out, &own_ns, true)?;
            out.push(b'\'');
            &own_ns
        };
        for ((attr_ns, attr), value) in el.attrs().iter() {
            match attr_ns.as_namespace_name() {
                // An attribute named `xmlns` would declare a namespace: never written here.
                None if attr.as_str() == "xmlns" => return None,
                None => out.push(b' '),
                Some(XML_NS) => out.extend_from_slice(b" xml:"),
                Some(_) => return None,
            }
            out.extend_from_slice(attr.as_bytes());
            out.extend_from_slice(b"='");
            escape(out, value, true)?;
            out.push(b'\'');
        }
        // An empty element too is written `<x></x>`, as the encoder is given it.
        out.push(b'>');
        for node in el.nodes() {
            match node {
                Node::Text(text) => escape(out, text, false)?,
                Node::Element(child) => element(child, ns, out)?,
            }
        }
        out.extend_from_slice(b"</");
        out.extend_from_slice(name.as_bytes());
        out.push(b'>');
        Some(())
    }
}
