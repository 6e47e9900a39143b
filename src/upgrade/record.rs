//! The state record handed from a running jat-proxy to the binary it `exec`s for an in-place
//! upgrade: everything the new process needs to go on with the same stream without
//! relearning it. Pure: bytes in, bytes out.
//!
//! Format (all integers big-endian): the magic `jat-proxy handover`, a `u16` version, then
//! the fields of that version in order, each byte string as a `u32` length and its bytes.
//! A reader accepts exactly the versions it knows; any other is refused as a whole (the
//! new process then falls back to an ordinary reconnection), never half-read.

/// The newest format this build writes and reads: a list of streams (version 2). A record
/// of one stream is written in version 1, the format of builds that keep one stream, so
/// that a downgrade to such a build goes on with it.
pub const VERSION: u16 = 2;

/// The formats this build reads (what `check` reports for an upgrade to it).
pub const READS: [u16; 2] = [1, 2];

const MAGIC: &[u8] = b"jat-proxy handover";

/// The largest record a reader accepts: for each stream, its header (at most 64 KiB) and
/// the bytes of one element not yet complete (at most `max_stanza_bytes`, 16 MiB); and
/// small fields.
pub const MAX_RECORD_BYTES: usize = crate::config::MAX_SERVERS * (17 * 1024 * 1024) + 1024 * 1024;

/// What the old process hands over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The component address the streams were authenticated for.
    pub component: String,
    /// The streams, in the order of the sockets handed over with the record.
    pub streams: Vec<StreamRecord>,
    /// The implementing client's resources known to be available.
    pub resources: Vec<String>,
    /// The build id of the process that wrote the record (for the log).
    pub build: String,
}

/// One stream of a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// The server address the stream is connected to (as configured).
    pub server: String,
    /// The server's stream header, as received: the new reader is primed with it.
    pub header: Vec<u8>,
    /// Bytes received after the last complete element (the start of the next one).
    pub pending: Vec<u8>,
    /// When the stream was established (Unix milliseconds).
    pub established_unix_ms: u64,
    /// How many in-place upgrades this stream has been through, this one included.
    pub upgrades: u64,
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The bytes are not a handover record.
    NotARecord,
    /// A record of a format this build does not read (older or newer).
    Version(u16),
    /// The record ends too early, goes on after its last field, or has a field that is not
    /// what it should be.
    Malformed(&'static str),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::NotARecord => f.write_str("not a handover record"),
            RecordError::Version(v) => write!(
                f,
                "handover record of format {v}; this build reads formats 1 to {VERSION}"
            ),
            RecordError::Malformed(why) => write!(f, "malformed handover record: {why}"),
        }
    }
}

impl std::error::Error for RecordError {}

impl Record {
    /// The record's bytes (version 1 for one stream, else version 2).
    pub fn encode(&self) -> Vec<u8> {
        let version = if self.streams.len() == 1 { 1 } else { VERSION };
        self.encode_as(version).unwrap_or_default()
    }

    /// The record's bytes in format `version`: 1 (one stream only) or 2 (any number of
    /// streams); `None` for any other.
    pub fn encode_as(&self, version: u16) -> Option<Vec<u8>> {
        let size: usize = self
            .streams
            .iter()
            .map(|st| 64 + st.server.len() + st.header.len() + st.pending.len())
            .sum();
        let mut out = Vec::with_capacity(MAGIC.len() + 64 + size + 32 * self.resources.len());
        out.extend_from_slice(MAGIC);
        if version == 1 {
            let [st] = &self.streams[..] else {
                return None;
            };
            // Version 1: component, server, header, pending, resources, established, build,
            // upgrades.
            out.extend_from_slice(&1u16.to_be_bytes());
            put(&mut out, self.component.as_bytes());
            put(&mut out, st.server.as_bytes());
            put(&mut out, &st.header);
            put(&mut out, &st.pending);
            self.put_resources(&mut out);
            out.extend_from_slice(&st.established_unix_ms.to_be_bytes());
            put(&mut out, self.build.as_bytes());
            out.extend_from_slice(&st.upgrades.to_be_bytes());
            return Some(out);
        }
        if version != 2 {
            return None;
        }
        // Version 2: component, the streams (server, header, pending, established,
        // upgrades), resources, build.
        out.extend_from_slice(&VERSION.to_be_bytes());
        put(&mut out, self.component.as_bytes());
        out.extend_from_slice(&(self.streams.len() as u32).to_be_bytes());
        for st in &self.streams {
            put(&mut out, st.server.as_bytes());
            put(&mut out, &st.header);
            put(&mut out, &st.pending);
            out.extend_from_slice(&st.established_unix_ms.to_be_bytes());
            out.extend_from_slice(&st.upgrades.to_be_bytes());
        }
        self.put_resources(&mut out);
        put(&mut out, self.build.as_bytes());
        Some(out)
    }

    fn put_resources(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.resources.len() as u32).to_be_bytes());
        for r in &self.resources {
            put(out, r.as_bytes());
        }
    }

    /// Reads a record of version 1 or 2.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(RecordError::NotARecord)?;
        let mut c = Cursor(rest);
        let version = c.u16().map_err(|_| RecordError::NotARecord)?;
        let record = match version {
            1 => {
                let component = c.string("component")?;
                let server = c.string("server")?;
                let header = c.bytes("header")?.to_vec();
                let pending = c.bytes("pending bytes")?.to_vec();
                let resources = c.resources()?;
                let established_unix_ms = c.u64()?;
                let build = c.string("build")?;
                let upgrades = c.u64()?;
                Record {
                    component,
                    streams: vec![StreamRecord {
                        server,
                        header,
                        pending,
                        established_unix_ms,
                        upgrades,
                    }],
                    resources,
                    build,
                }
            }
            2 => {
                let component = c.string("component")?;
                let n = c.u32()? as usize;
                if n == 0 || n > crate::config::MAX_SERVERS {
                    return Err(RecordError::Malformed("stream count"));
                }
                let mut streams = Vec::with_capacity(n);
                for _ in 0..n {
                    streams.push(StreamRecord {
                        server: c.string("server")?,
                        header: c.bytes("header")?.to_vec(),
                        pending: c.bytes("pending bytes")?.to_vec(),
                        established_unix_ms: c.u64()?,
                        upgrades: c.u64()?,
                    });
                }
                let resources = c.resources()?;
                let build = c.string("build")?;
                Record {
                    component,
                    streams,
                    resources,
                    build,
                }
            }
            v => return Err(RecordError::Version(v)),
        };
        if !c.0.is_empty() {
            return Err(RecordError::Malformed("bytes after the last field"));
        }
        Ok(record)
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Cursor<'a>(&'a [u8]);

const TRUNCATED: RecordError = RecordError::Malformed("truncated");

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(TRUNCATED);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    fn bytes(&mut self, _what: &'static str) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self, what: &'static str) -> Result<String, RecordError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| RecordError::Malformed(what))
    }

    fn resources(&mut self) -> Result<Vec<String>, RecordError> {
        let n = self.u32()? as usize;
        // Every resource takes at least its 4-byte length: a count beyond what is left is
        // malformed (and is not allowed to reserve memory).
        if n > self.0.len() / 4 {
            return Err(RecordError::Malformed("resource count"));
        }
        let mut resources = Vec::with_capacity(n);
        for _ in 0..n {
            resources.push(self.string("resource")?);
        }
        Ok(resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(server: &str) -> StreamRecord {
        StreamRecord {
            server: server.into(),
            header: b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' id='x' from='proxy.example'>".to_vec(),
            pending: b"<iq type='get' id='1' to='proxy.ex".to_vec(),
            established_unix_ms: 1_764_000_000_123,
            upgrades: 3,
        }
    }

    fn sample() -> Record {
        Record {
            component: "proxy.example".into(),
            streams: vec![stream("127.0.0.1:5347")],
            resources: vec!["a".into(), "worker-\u{e9}".into()],
            build: "0123456789ab".into(),
        }
    }

    fn two() -> Record {
        let mut second = stream("127.0.0.1:5348");
        second.pending.clear();
        second.upgrades = 0;
        Record {
            streams: vec![stream("127.0.0.1:5347"), second],
            ..sample()
        }
    }

    #[test]
    fn round_trip() {
        for r in [sample(), two()] {
            assert_eq!(Record::decode(&r.encode()), Ok(r));
        }
        let empty = Record {
            resources: Vec::new(),
            ..sample()
        };
        assert_eq!(Record::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn one_stream_is_written_in_the_format_of_one_stream_builds() {
        let b = sample().encode();
        assert_eq!(&b[MAGIC.len()..MAGIC.len() + 2], &1u16.to_be_bytes());
        // Byte for byte what a build of format 1 wrote (component, server, header, pending,
        // resources, established, build, upgrades).
        let r = sample();
        let st = &r.streams[0];
        let mut v1 = MAGIC.to_vec();
        v1.extend_from_slice(&1u16.to_be_bytes());
        for f in [
            r.component.as_bytes(),
            st.server.as_bytes(),
            &st.header,
            &st.pending,
        ] {
            v1.extend_from_slice(&(f.len() as u32).to_be_bytes());
            v1.extend_from_slice(f);
        }
        v1.extend_from_slice(&2u32.to_be_bytes());
        for res in &r.resources {
            v1.extend_from_slice(&(res.len() as u32).to_be_bytes());
            v1.extend_from_slice(res.as_bytes());
        }
        v1.extend_from_slice(&st.established_unix_ms.to_be_bytes());
        v1.extend_from_slice(&(r.build.len() as u32).to_be_bytes());
        v1.extend_from_slice(r.build.as_bytes());
        v1.extend_from_slice(&st.upgrades.to_be_bytes());
        assert_eq!(b, v1);
        assert_eq!(
            &two().encode()[MAGIC.len()..MAGIC.len() + 2],
            &2u16.to_be_bytes()
        );
    }

    #[test]
    fn any_number_of_streams_in_format_2_and_one_in_format_1() {
        for r in [sample(), two()] {
            let v2 = r.encode_as(2).unwrap();
            assert_eq!(&v2[MAGIC.len()..MAGIC.len() + 2], &2u16.to_be_bytes());
            assert_eq!(Record::decode(&v2), Ok(r.clone()));
        }
        assert_eq!(sample().encode_as(1), Some(sample().encode()));
        assert_eq!(two().encode_as(1), None);
        assert_eq!(sample().encode_as(3), None);
        assert_eq!(sample().encode_as(0), None);
        // What this build reads is what its decoder takes.
        for v in READS {
            let r = if v == 1 { sample() } else { two() };
            assert_eq!(Record::decode(&r.encode_as(v).unwrap()), Ok(r));
        }
    }

    #[test]
    fn other_versions_are_refused_whole() {
        let mut b = sample().encode();
        b[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(Record::decode(&b), Err(RecordError::Version(3)));
        b[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(Record::decode(&b), Err(RecordError::Version(0)));
        assert_eq!(Record::decode(b"hello"), Err(RecordError::NotARecord));
        assert_eq!(Record::decode(MAGIC), Err(RecordError::NotARecord));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for r in [sample(), two()] {
            let b = r.encode();
            for n in 0..b.len() {
                assert!(Record::decode(&b[..n]).is_err(), "cut at {n}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(
                Record::decode(&longer),
                Err(RecordError::Malformed("bytes after the last field"))
            );
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            for v in [1u16, 2] {
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&v.to_be_bytes());
                b.extend_from_slice(&tail);
                let _ = Record::decode(&b);
            }
        }
    }
}
