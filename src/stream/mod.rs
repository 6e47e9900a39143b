//! The component stream, without I/O: bytes in → frames ([`Reader`]), elements → bytes
//! ([`Writer`]).
//!
//! jat-proxy owns this layer instead of using tokio-xmpp's `xmlstream` because that one
//! builds its rxml parser with `rxml::Parser::default()`, whose 8 KiB token limit makes any
//! attribute value or name longer than that a hard parse error that ends the stream — and
//! Prosody and ejabberd both route such stanzas from ordinary users. Nothing in tokio-xmpp
//! lets that be changed. Here:
//!
//! * a byte-level framer (`framer`) finds where each top-level element ends, counting its bytes
//!   and depth as they arrive; an element over `[limits]` is dropped as it streams in (only
//!   its start tag is kept, to answer it with `policy-violation`), never held whole and never
//!   shown to the parser;
//! * the parser (rxml, the library under tokio-xmpp) is created with a token limit of
//!   `max_stanza_bytes`, so every element within the limits parses, whatever the length of
//!   its names, attribute values or text, and however many attributes it has;
//! * only ill-formed XML, which a server never sends, is an error: the session ends.
//!
//! The seam for resuming a live stream (the in-place upgrade) is [`Reader::resume`], primed
//! with the header's bytes, plus the bytes after the last complete element.

pub(crate) mod framer;
mod reader;
mod writer;

pub use framer::{FramingError, MAX_HEADER_BYTES};
pub use reader::{Frame, Header, ReadError, Reader};
pub use writer::{WriteError, Writer};

#[cfg(test)]
mod tests;
