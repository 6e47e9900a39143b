//! Stanzas out, bytes out: the stream header, each element serialised by rxml's encoder
//! with the stream's namespaces declared once (as tokio-xmpp does, so a stanza carries no
//! `xmlns` of its own), and the footer.

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
