//! The state record handed from a running jat-proxy to the binary it `exec`s for an in-place
//! upgrade: everything the new process needs to go on with the same stream without
//! relearning it. Pure: bytes in, bytes out.
//!
//! Format (all integers big-endian): the magic `jat-proxy handover`, a `u16` version, then
//! the fields of that version in order, each byte string as a `u32` length and its bytes.
//! A reader accepts exactly the versions it knows; any other is refused as a whole (the
//! new process then falls back to an ordinary reconnection), never half-read.

/// The format this build writes (and the only one it reads).
pub const VERSION: u16 = 1;

const MAGIC: &[u8] = b"jat-proxy handover";

/// The largest record a reader accepts: the stream header (at most 64 KiB), the bytes of
/// one element not yet complete (at most `max_stanza_bytes`, 16 MiB), and small fields.
pub const MAX_RECORD_BYTES: usize = 20 * 1024 * 1024;

/// What the old process hands over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The component address the stream was authenticated for.
    pub component: String,
    /// The server address the stream is connected to (as configured).
    pub server: String,
    /// The server's stream header, as received: the new reader is primed with it.
    pub header: Vec<u8>,
    /// Bytes received after the last complete element (the start of the next one).
    pub pending: Vec<u8>,
    /// The implementing client's resources known to be available.
    pub resources: Vec<String>,
    /// When the stream was established (Unix milliseconds).
    pub established_unix_ms: u64,
    /// The build id of the process that wrote the record (for the log).
    pub build: String,
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
                "handover record of format {v}; this build reads format {VERSION}"
            ),
            RecordError::Malformed(why) => write!(f, "malformed handover record: {why}"),
        }
    }
}

impl std::error::Error for RecordError {}

impl Record {
    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            MAGIC.len() + 64 + self.header.len() + self.pending.len() + 32 * self.resources.len(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        put(&mut out, self.component.as_bytes());
        put(&mut out, self.server.as_bytes());
        put(&mut out, &self.header);
        put(&mut out, &self.pending);
        out.extend_from_slice(&(self.resources.len() as u32).to_be_bytes());
        for r in &self.resources {
            put(&mut out, r.as_bytes());
        }
        out.extend_from_slice(&self.established_unix_ms.to_be_bytes());
        put(&mut out, self.build.as_bytes());
        out.extend_from_slice(&self.upgrades.to_be_bytes());
        out
    }

    /// Reads a record of this build's format.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(RecordError::NotARecord)?;
        let mut c = Cursor(rest);
        let version = c.u16().map_err(|_| RecordError::NotARecord)?;
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        let component = c.string("component")?;
        let server = c.string("server")?;
        let header = c.bytes("header")?.to_vec();
        let pending = c.bytes("pending bytes")?.to_vec();
        let n = c.u32()? as usize;
        // Every resource takes at least its 4-byte length: a count beyond what is left is
        // malformed (and is not allowed to reserve memory).
        if n > c.0.len() / 4 {
            return Err(RecordError::Malformed("resource count"));
        }
        let mut resources = Vec::with_capacity(n);
        for _ in 0..n {
            resources.push(c.string("resource")?);
        }
        let established_unix_ms = c.u64()?;
        let build = c.string("build")?;
        let upgrades = c.u64()?;
        if !c.0.is_empty() {
            return Err(RecordError::Malformed("bytes after the last field"));
        }
        Ok(Record {
            component,
            server,
            header,
            pending,
            resources,
            established_unix_ms,
            build,
            upgrades,
        })
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        Record {
            component: "proxy.example".into(),
            server: "127.0.0.1:5347".into(),
            header: b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' id='x' from='proxy.example'>".to_vec(),
            pending: b"<iq type='get' id='1' to='proxy.ex".to_vec(),
            resources: vec!["a".into(), "worker-\u{e9}".into()],
            established_unix_ms: 1_764_000_000_123,
            build: "0123456789ab".into(),
            upgrades: 3,
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(Record::decode(&r.encode()), Ok(r));
        let empty = Record {
            pending: Vec::new(),
            resources: Vec::new(),
            ..sample()
        };
        assert_eq!(Record::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn other_versions_are_refused_whole() {
        let mut b = sample().encode();
        b[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(Record::decode(&b), Err(RecordError::Version(2)));
        b[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(Record::decode(&b), Err(RecordError::Version(0)));
        assert_eq!(Record::decode(b"hello"), Err(RecordError::NotARecord));
        assert_eq!(Record::decode(MAGIC), Err(RecordError::NotARecord));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let b = sample().encode();
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

    proptest! {
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_be_bytes());
            b.extend_from_slice(&tail);
            let _ = Record::decode(&b);
        }
    }
}
