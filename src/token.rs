//! The token: the resource of `proxy.example/TOKEN`, the address the implementing client
//! sees as the sender of a request or a message, and answers to.
//!
//! A token seals the original sender's full JID (and the exact address the stanza was sent
//! to, when that was not the bare component domain) with an AEAD, so that
//!
//! * a reply is routed back by decryption alone — jat-proxy keeps no table of requests, and a
//!   restart or another instance sharing the key file loses nothing;
//! * the implementing client learns nothing about who asked;
//! * nobody without the key can make a token that routes anywhere: a forged, altered or
//!   foreign token fails authentication.
//!
//! # Layout (version 2)
//!
//! `base64url_nopad( header || ciphertext || tag )`, where
//!
//! | field      | bytes | in clear | meaning                                          |
//! |------------|-------|----------|--------------------------------------------------|
//! | version    | 1     | yes      | [`VERSION`]                                      |
//! | kind       | 1     | yes      | [`Kind`]: 1 IQ, 2 message, 3 route (a sealed id) |
//! | key id     | 4     | yes      | which key of the key file sealed it (big endian) |
//! | issued     | 8     | yes      | Unix milliseconds (big endian)                   |
//! | salt       | 16    | yes      | random; selects this token's own AEAD key        |
//! | ciphertext | n     | no       | see below                                        |
//! | tag        | 16    | –        | Poly1305 tag                                     |
//!
//! The plaintext of an IQ or message token is `sender` or `sender 0x00 original_to`, an IQ
//! token's preceded by an id tag: the request id's length and the id itself when it has at
//! most 16 bytes, else `0xFF` and the first 16 bytes of its SHA-256. The associated data
//! is `header || len16(component) || component`: a token opens only for the component and
//! the kind of stanza it was made for (a message token never routes an IQ reply), and nobody
//! can change its kind, key id, issue time or salt. A reply opens an IQ token only if its
//! id matches the tag sealed inside; a *new* stanza the implementing client sends to a token
//! address (`[proxy] outbound`) opens any IQ or message token without an id to compare —
//! the token names its peer, whatever the new stanza's id.
//!
//! A route is the id of an IQ jat-proxy sends for the implementing client to a peer: its
//! plaintext is `client_jid 0x00 client_to 0x00 id` (who sent the request, to which address
//! at the component, with which id), and its associated data adds `len16(peer) || peer`, the
//! address the IQ went to: only that peer's reply opens it.
//!
//! Version 1 (jat-proxy 0.1: no kind byte, issue time in Unix seconds, IQ tokens only) still
//! opens, for IQ replies, until it expires: an upgrade in the middle of traffic loses nothing.
//!
//! # Nonces
//!
//! Each token is sealed with its own ChaCha20-Poly1305 key,
//! `HKDF-Expand(PRK = key secret, info = "jat-proxy token v1" || salt, 32)`, and the all-zero
//! nonce (the info string names the derivation, unchanged since version 1; the version is
//! authenticated in the header). A (key, nonce) pair repeats only if two tokens under one key
//! secret draw the same 128-bit salt: among `n` tokens that happens with probability below
//! `n² / 2^129`. With the bound this module documents and operators are told to stay under,
//! **2^48 tokens per key** (281 trillion: more than 8,900 years at a million tokens per
//! second), that probability is below 2^-33. It holds across restarts and any number of
//! instances sharing the key file, because nothing is counted: every salt is fresh from the
//! CSPRNG.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead;

use crate::keys::KeySet;

/// Format version of the tokens [`seal`] makes.
pub const VERSION: u8 = 2;
/// The previous format, which [`open`] still accepts for IQ tokens.
pub const VERSION_1: u8 = 1;
/// Bytes of random salt per token.
pub const SALT_LEN: usize = 16;
/// Bytes of clear header: version, kind, key id, issue time, salt.
pub const HEADER_LEN: usize = 1 + 1 + 4 + 8 + SALT_LEN;
const HEADER_LEN_V1: usize = 1 + 4 + 8 + SALT_LEN;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// A resourcepart may be at most 1023 bytes (RFC 7622 §3.4).
pub const MAX_TOKEN_LEN: usize = 1023;
/// The most bytes whose unpadded base64 fits in [`MAX_TOKEN_LEN`] characters.
pub const MAX_RAW_LEN: usize = MAX_TOKEN_LEN * 3 / 4;
/// An IQ id of at most this many bytes is sealed as it is; a longer one as this many bytes
/// of its SHA-256 digest.
pub const ID_INLINE_LEN: usize = 16;
/// Bytes of an IQ token's id tag at most: a length byte, then the id or its digest.
pub const ID_TAG_LEN: usize = 1 + ID_INLINE_LEN;
/// The longest plaintext (sender, and original `to` when present) a token can carry.
pub const MAX_PLAINTEXT_LEN: usize = MAX_RAW_LEN - HEADER_LEN - TAG_LEN - ID_TAG_LEN;
/// How far in the future a token's issue time may be (clock skew between instances; the key
/// file's pruning allows for the same).
pub use crate::keys::MAX_CLOCK_SKEW;
/// The documented per-key bound on tokens (see the module docs).
pub const TOKENS_PER_KEY_BOUND: u64 = 1 << 48;

const KDF_INFO: &[u8] = b"jat-proxy token v1";

/// The kind of stanza a token routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// IQ requests and their replies.
    Iq = 1,
    /// Messages.
    Message = 2,
    /// The id of an IQ sent to a peer for the implementing client.
    Route = 3,
}

/// What a token is sealed for, or opened as.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// An IQ token; opened so, the reply must carry the request's id.
    Iq {
        /// The component's domain, e.g. `proxy.example`.
        component: &'a str,
        /// The `id` attribute of the IQ the token travels in.
        id: &'a str,
    },
    /// A message token.
    Message {
        /// The component's domain.
        component: &'a str,
    },
    /// Only for opening: an IQ or message token (of version 2) to which the implementing
    /// client sends a new stanza; no id is compared.
    Peer {
        /// The component's domain.
        component: &'a str,
    },
    /// A route: the id of an IQ sent to `peer`.
    Route {
        /// The component's domain.
        component: &'a str,
        /// The address the IQ went to, where its reply comes from.
        peer: &'a str,
    },
}

impl<'a> Binding<'a> {
    /// An IQ token of `component` for the IQ `id`.
    pub fn iq(component: &'a str, id: &'a str) -> Binding<'a> {
        Binding::Iq { component, id }
    }

    /// A message token of `component`.
    pub fn message(component: &'a str) -> Binding<'a> {
        Binding::Message { component }
    }

    /// The kind a token sealed for this binding has; none for [`Binding::Peer`], which only
    /// opens.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Binding::Iq { .. } => Some(Kind::Iq),
            Binding::Message { .. } => Some(Kind::Message),
            Binding::Route { .. } => Some(Kind::Route),
            Binding::Peer { .. } => None,
        }
    }

    /// Whether a version 2 token of kind byte `kind` may open as this binding.
    fn accepts(&self, kind: u8) -> bool {
        match self {
            Binding::Peer { .. } => kind == Kind::Iq as u8 || kind == Kind::Message as u8,
            _ => self.kind().is_some_and(|k| k as u8 == kind),
        }
    }

    fn component(&self) -> &'a str {
        match self {
            Binding::Iq { component, .. }
            | Binding::Message { component }
            | Binding::Peer { component }
            | Binding::Route { component, .. } => component,
        }
    }
}

fn kind_of(byte: u8) -> Kind {
    match byte {
        1 => Kind::Iq,
        2 => Kind::Message,
        _ => Kind::Route,
    }
}

/// An IQ token's id tag: the id's length and the id itself when it has at most
/// [`ID_INLINE_LEN`] bytes (most clients' ids: no hashing on the hot path), else `0xFF` and the
/// first [`ID_INLINE_LEN`] bytes of its SHA-256. Returns the buffer and the tag's length.
fn id_tag(id: &str) -> ([u8; ID_TAG_LEN], usize) {
    let mut tag = [0u8; ID_TAG_LEN];
    let id = id.as_bytes();
    if id.len() <= ID_INLINE_LEN {
        tag[0] = id.len() as u8;
        tag[1..=id.len()].copy_from_slice(id);
        (tag, 1 + id.len())
    } else {
        let d = ring::digest::digest(&ring::digest::SHA256, id);
        tag[0] = 0xFF;
        tag[1..].copy_from_slice(&d.as_ref()[..ID_INLINE_LEN]);
        (tag, ID_TAG_LEN)
    }
}

/// The length of the id tag at the start of an IQ token's plaintext, if well-formed.
fn id_tag_len(plain: &[u8]) -> Option<usize> {
    let n = match *plain.first()? {
        0xFF => ID_TAG_LEN,
        n if usize::from(n) <= ID_INLINE_LEN => 1 + usize::from(n),
        _ => return None,
    };
    (plain.len() >= n).then_some(n)
}

/// What a token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents<'a> {
    /// The full JID that sent the stanza: where the answer goes.
    pub sender: &'a str,
    /// The address the stanza was sent to, when it was not the bare component domain: where
    /// the answer comes from.
    pub original_to: Option<&'a str>,
}

/// The contents of an opened token, owned, with its clear header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The full JID that sent the stanza.
    pub sender: String,
    /// The address the stanza was sent to, if not the bare component domain.
    pub original_to: Option<String>,
    /// Id of the key that sealed it.
    pub key_id: u32,
    /// What kind of token it is.
    pub kind: Kind,
    /// Its format version.
    pub version: u8,
    /// When it was issued, in Unix milliseconds (whole seconds for version 1).
    pub issued_ms: u64,
    /// Its salt.
    pub salt: [u8; SALT_LEN],
}

/// Why a token was not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// The sender (with `original_to`) is longer than [`MAX_PLAINTEXT_LEN`]: bytes needed.
    TooLong {
        /// Bytes needed.
        len: usize,
    },
    /// [`Binding::Peer`] only opens tokens: it names no kind to seal.
    OpenOnly,
}

/// Why a token was not accepted. Only logged (at debug): a rejected token gets no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Longer than a resourcepart may be.
    TooLong,
    /// Not canonical unpadded base64url.
    Encoding,
    /// Shorter than header and tag.
    Truncated,
    /// Another format version.
    Version(u8),
    /// Sealed by a key that this key file does not (or no longer) hold.
    UnknownKey(u32),
    /// Issued more than the token lifetime ago.
    Expired,
    /// Issued more than [`MAX_CLOCK_SKEW`] in the future.
    FromFuture,
    /// Made for another kind of stanza (in clear: a message token offered for an IQ, say).
    Kind,
    /// Failed authentication: forged, altered, or made for another IQ id or component.
    Authentication,
    /// Authenticated but not UTF-8: cannot happen with tokens jat-proxy made.
    Contents,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::TooLong => write!(f, "token longer than a resourcepart"),
            Rejected::Encoding => write!(f, "token is not base64url"),
            Rejected::Truncated => write!(f, "token too short"),
            Rejected::Version(v) => write!(f, "unknown token version {v}"),
            Rejected::UnknownKey(id) => write!(f, "unknown key id {id}"),
            Rejected::Expired => write!(f, "token expired"),
            Rejected::FromFuture => write!(f, "token issued in the future"),
            Rejected::Kind => write!(f, "token made for another kind of stanza"),
            Rejected::Authentication => write!(f, "token failed authentication"),
            Rejected::Contents => write!(f, "token contents malformed"),
        }
    }
}

/// Seals `contents` into a token for `binding`, issued at `issued_ms` (Unix milliseconds),
/// with the current key of `keys`.
pub fn seal(
    keys: &KeySet,
    binding: Binding<'_>,
    contents: &Contents<'_>,
    issued_ms: u64,
    salt: [u8; SALT_LEN],
) -> Result<String, SealError> {
    seal_as(
        keys,
        keys.current().id(),
        VERSION,
        binding,
        contents,
        issued_ms,
        salt,
    )
}

/// Seals exactly the token that `opened` came from, if `keys` holds its key: what the
/// fuzzer's "only the keys' own output opens" invariant compares with. Version 1 tokens
/// store whole seconds.
pub fn reseal(
    keys: &KeySet,
    binding: Binding<'_>,
    opened: &Opened,
) -> Option<Result<String, SealError>> {
    keys.get(opened.key_id)?;
    let contents = Contents {
        sender: &opened.sender,
        original_to: opened.original_to.as_deref(),
    };
    Some(seal_as(
        keys,
        opened.key_id,
        opened.version,
        binding,
        &contents,
        opened.issued_ms,
        opened.salt,
    ))
}

fn seal_as(
    keys: &KeySet,
    key_id: u32,
    version: u8,
    binding: Binding<'_>,
    contents: &Contents<'_>,
    issued_ms: u64,
    salt: [u8; SALT_LEN],
) -> Result<String, SealError> {
    let plain_len = contents.sender.len() + contents.original_to.map_or(0, |t| 1 + t.len());
    if plain_len > MAX_PLAINTEXT_LEN {
        return Err(SealError::TooLong { len: plain_len });
    }
    let kind = binding.kind().ok_or(SealError::OpenOnly)?;
    let id_tag = match binding {
        Binding::Iq { id, .. } if version != VERSION_1 => Some(id_tag(id)),
        _ => None,
    };
    let key = keys.get(key_id).expect("sealing with a key of the set");
    let mut buf = Vec::with_capacity(HEADER_LEN + plain_len + TAG_LEN);
    buf.push(version);
    if version == VERSION_1 {
        buf.extend_from_slice(&key.id().to_be_bytes());
        buf.extend_from_slice(&(issued_ms / 1000).to_be_bytes());
    } else {
        buf.push(kind as u8);
        buf.extend_from_slice(&key.id().to_be_bytes());
        buf.extend_from_slice(&issued_ms.to_be_bytes());
    }
    buf.extend_from_slice(&salt);
    let header_len = buf.len();
    if let Some((tag, len)) = &id_tag {
        buf.extend_from_slice(&tag[..*len]);
    }
    buf.extend_from_slice(contents.sender.as_bytes());
    if let Some(to) = contents.original_to {
        buf.push(0);
        buf.extend_from_slice(to.as_bytes());
    }
    let aead_key = token_key(key.prk(), &salt);
    let (header, body) = buf.split_at_mut(header_len);
    let ad = associated_data(header, binding, version);
    let tag = aead_key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
            aead::Aad::from(&ad[..]),
            body,
        )
        .expect("plaintext length is bounded far below ChaCha20-Poly1305's limit");
    buf.extend_from_slice(tag.as_ref());
    Ok(URL_SAFE_NO_PAD.encode(&buf))
}

/// Opens a token made by [`seal`] for the same `binding`, if it is still valid at `now_ms`
/// (Unix milliseconds) with a lifetime of `lifetime` seconds.
pub fn open(
    keys: &KeySet,
    binding: Binding<'_>,
    token: &str,
    now_ms: u64,
    lifetime: u64,
) -> Result<Opened, Rejected> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Rejected::TooLong);
    }
    let mut buf = URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .map_err(|_| Rejected::Encoding)?;
    let version = *buf.first().ok_or(Rejected::Truncated)?;
    let (header_len, key_id, issued_ms) = match version {
        VERSION => {
            if buf.len() < HEADER_LEN + TAG_LEN {
                return Err(Rejected::Truncated);
            }
            if !binding.accepts(buf[1]) {
                return Err(Rejected::Kind);
            }
            let key_id = u32::from_be_bytes(buf[2..6].try_into().expect("4 bytes"));
            let issued = u64::from_be_bytes(buf[6..14].try_into().expect("8 bytes"));
            (HEADER_LEN, key_id, issued)
        }
        VERSION_1 => {
            if buf.len() < HEADER_LEN_V1 + TAG_LEN {
                return Err(Rejected::Truncated);
            }
            if !matches!(binding, Binding::Iq { .. }) {
                return Err(Rejected::Kind);
            }
            let key_id = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes"));
            let issued = u64::from_be_bytes(buf[5..13].try_into().expect("8 bytes"));
            (HEADER_LEN_V1, key_id, issued.saturating_mul(1000))
        }
        v => {
            if buf.len() < HEADER_LEN_V1 + TAG_LEN {
                return Err(Rejected::Truncated);
            }
            return Err(Rejected::Version(v));
        }
    };
    // Cheap checks first: a flood of stale or foreign tokens costs no key derivation.
    if issued_ms > now_ms.saturating_add(MAX_CLOCK_SKEW * 1000) {
        return Err(Rejected::FromFuture);
    }
    if now_ms >= issued_ms.saturating_add(lifetime.saturating_mul(1000)) {
        return Err(Rejected::Expired);
    }
    let key = keys.get(key_id).ok_or(Rejected::UnknownKey(key_id))?;
    let salt: [u8; SALT_LEN] = buf[header_len - SALT_LEN..header_len]
        .try_into()
        .expect("salt length");
    let aead_key = token_key(key.prk(), &salt);
    let (header, body) = buf.split_at_mut(header_len);
    let ad = associated_data(header, binding, version);
    let kind = if version == VERSION_1 {
        Kind::Iq
    } else {
        kind_of(header[1])
    };
    let plain = aead_key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
            aead::Aad::from(&ad[..]),
            body,
        )
        .map_err(|_| Rejected::Authentication)?;
    let plain: &[u8] = if kind == Kind::Iq && version != VERSION_1 {
        let n = id_tag_len(plain).ok_or(Rejected::Contents)?;
        let (tag, rest) = plain.split_at(n);
        // A reply must carry the request's id; a new stanza to the token names only its peer.
        // (No need for a constant-time comparison: the tag was authenticated, and who offers
        // the id knows it.)
        if let Binding::Iq { id, .. } = binding {
            let (expected, len) = id_tag(id);
            if tag != &expected[..len] {
                return Err(Rejected::Authentication);
            }
        }
        rest
    } else {
        plain
    };
    let (sender, original_to) = match plain.iter().position(|&b| b == 0) {
        Some(i) => (&plain[..i], Some(&plain[i + 1..])),
        None => (plain, None),
    };
    let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_owned);
    Ok(Opened {
        sender: text(sender).map_err(|_| Rejected::Contents)?,
        original_to: original_to
            .map(text)
            .transpose()
            .map_err(|_| Rejected::Contents)?,
        key_id,
        kind,
        version,
        issued_ms,
        salt,
    })
}

/// Length in characters of the IQ token for the id `id` and a plaintext of `plain_len` bytes.
pub fn encoded_len(id: &str, plain_len: usize) -> usize {
    (4 * (HEADER_LEN + id_tag(id).1 + plain_len + TAG_LEN)).div_ceil(3)
}

/// Where the reply to an IQ jat-proxy sent to a peer for the implementing client goes: what
/// a route holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The implementing client's full JID that sent the request.
    pub client: String,
    /// The address at the component it sent the request to: where the reply comes from.
    pub client_to: String,
    /// The request's own id.
    pub id: String,
}

/// Seals `route` into the id of an IQ sent to `peer`.
pub fn seal_route(
    keys: &KeySet,
    component: &str,
    peer: &str,
    route: &Route,
    issued_ms: u64,
    salt: [u8; SALT_LEN],
) -> Result<String, SealError> {
    let rest = format!("{}\0{}", route.client_to, route.id);
    let contents = Contents {
        sender: &route.client,
        original_to: Some(&rest),
    };
    seal(
        keys,
        Binding::Route { component, peer },
        &contents,
        issued_ms,
        salt,
    )
}

/// Opens the id of a reply from `peer` as a route.
pub fn open_route(
    keys: &KeySet,
    component: &str,
    peer: &str,
    id: &str,
    now_ms: u64,
    lifetime: u64,
) -> Result<Route, Rejected> {
    let o = open(
        keys,
        Binding::Route { component, peer },
        id,
        now_ms,
        lifetime,
    )?;
    let rest = o.original_to.ok_or(Rejected::Contents)?;
    let (client_to, id) = rest.split_once('\0').ok_or(Rejected::Contents)?;
    Ok(Route {
        client: o.sender,
        client_to: client_to.to_owned(),
        id: id.to_owned(),
    })
}

fn token_key(prk: &ring::hkdf::Prk, salt: &[u8; SALT_LEN]) -> aead::LessSafeKey {
    let info = [KDF_INFO, &salt[..]];
    let okm = prk
        .expand(&info, &aead::CHACHA20_POLY1305)
        .expect("32 bytes is within HKDF-SHA256's output limit");
    aead::LessSafeKey::new(aead::UnboundKey::from(okm))
}

fn associated_data(header: &[u8], binding: Binding<'_>, version: u8) -> Vec<u8> {
    let component = binding.component().as_bytes();
    // Version 1 bound an IQ token's id here; version 2 seals its digest inside. A route is
    // bound to the peer its IQ went to.
    let extra: &[u8] = match binding {
        Binding::Iq { id, .. } if version == VERSION_1 => id.as_bytes(),
        Binding::Route { peer, .. } => peer.as_bytes(),
        _ => b"",
    };
    let len = u16::try_from(component.len()).unwrap_or(u16::MAX);
    let mut ad = Vec::with_capacity(header.len() + 4 + component.len() + extra.len());
    ad.extend_from_slice(header);
    ad.extend_from_slice(&len.to_be_bytes());
    ad.extend_from_slice(component);
    if let Binding::Route { peer, .. } = binding {
        let len = u16::try_from(peer.len()).unwrap_or(u16::MAX);
        ad.extend_from_slice(&len.to_be_bytes());
    }
    ad.extend_from_slice(extra);
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix milliseconds.
    const NOW: u64 = 1_790_000_000_123;
    /// Seconds.
    const LIFE: u64 = 300;

    fn keys() -> KeySet {
        KeySet::from_secrets(&[(7, 0, [0x42; 32])]).unwrap()
    }

    fn binding(id: &str) -> Binding<'_> {
        Binding::iq("proxy.example", id)
    }

    fn sealed(sender: &str) -> String {
        let c = Contents {
            sender,
            original_to: None,
        };
        seal(&keys(), binding("1234"), &c, NOW, [9; SALT_LEN]).unwrap()
    }

    #[test]
    fn roundtrip() {
        let t = sealed("user@example/abc");
        let o = open(&keys(), binding("1234"), &t, NOW + 5, LIFE).unwrap();
        assert_eq!((o.version, o.issued_ms), (VERSION, NOW));
        assert_eq!(o.sender, "user@example/abc");
        assert_eq!(o.original_to, None);
        assert_eq!(o.key_id, 7);
        assert_eq!(t.len(), encoded_len("1234", "user@example/abc".len()));
    }

    #[test]
    fn roundtrip_with_original_to() {
        let c = Contents {
            sender: "user@example/abc",
            original_to: Some("svc@proxy.example/x"),
        };
        let t = seal(&keys(), binding("1"), &c, NOW, [1; SALT_LEN]).unwrap();
        let o = open(&keys(), binding("1"), &t, NOW, LIFE).unwrap();
        assert_eq!(o.original_to.as_deref(), Some("svc@proxy.example/x"));
    }

    #[test]
    fn hides_the_sender() {
        let t = sealed("user@example/abc");
        assert!(!t.contains("user"));
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        assert!(!raw.windows(4).any(|w| w == b"user"));
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let t = sealed("user@example/abc");
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        for i in 0..raw.len() {
            for bit in [0x01u8, 0x80] {
                let mut r = raw.clone();
                r[i] ^= bit;
                let forged = URL_SAFE_NO_PAD.encode(&r);
                assert!(
                    open(&keys(), binding("1234"), &forged, NOW, LIFE).is_err(),
                    "byte {i} bit {bit:#x} accepted"
                );
            }
        }
    }

    #[test]
    fn another_id_is_rejected() {
        let t = sealed("user@example/abc");
        assert_eq!(
            open(&keys(), binding("1235"), &t, NOW, LIFE),
            Err(Rejected::Authentication)
        );
    }

    #[test]
    fn another_component_is_rejected() {
        let t = sealed("user@example/abc");
        let other = Binding::iq("other.example", "1234");
        assert_eq!(
            open(&keys(), other, &t, NOW, LIFE),
            Err(Rejected::Authentication)
        );
    }

    #[test]
    fn another_key_is_rejected() {
        let t = sealed("user@example/abc");
        let same_id_other_secret = KeySet::from_secrets(&[(7, 0, [0x43; 32])]).unwrap();
        assert_eq!(
            open(&same_id_other_secret, binding("1234"), &t, NOW, LIFE),
            Err(Rejected::Authentication)
        );
        let other_id = KeySet::from_secrets(&[(8, 0, [0x42; 32])]).unwrap();
        assert_eq!(
            open(&other_id, binding("1234"), &t, NOW, LIFE),
            Err(Rejected::UnknownKey(7))
        );
    }

    #[test]
    fn expiry_and_future() {
        let t = sealed("user@example/abc");
        assert!(open(&keys(), binding("1234"), &t, NOW + LIFE * 1000 - 1, LIFE).is_ok());
        assert_eq!(
            open(&keys(), binding("1234"), &t, NOW + LIFE * 1000, LIFE),
            Err(Rejected::Expired)
        );
        let skew = MAX_CLOCK_SKEW * 1000;
        assert!(open(&keys(), binding("1234"), &t, NOW - skew, LIFE).is_ok());
        assert_eq!(
            open(&keys(), binding("1234"), &t, NOW - skew - 1, LIFE),
            Err(Rejected::FromFuture)
        );
    }

    #[test]
    fn old_key_still_opens_after_rotation() {
        let t = sealed("user@example/abc");
        let rotated = KeySet::from_secrets(&[(7, 0, [0x42; 32]), (8, 1, [0x44; 32])]).unwrap();
        assert_eq!(rotated.current().id(), 8);
        assert!(open(&rotated, binding("1234"), &t, NOW, LIFE).is_ok());
    }

    #[test]
    fn too_long_sender_is_refused_and_limit_fits_a_resourcepart() {
        let max = "a".repeat(MAX_PLAINTEXT_LEN);
        let t = sealed(&max);
        assert!(t.len() <= MAX_TOKEN_LEN, "{}", t.len());
        let over = "a".repeat(MAX_PLAINTEXT_LEN + 1);
        let c = Contents {
            sender: &over,
            original_to: None,
        };
        assert_eq!(
            seal(&keys(), binding("1"), &c, NOW, [0; SALT_LEN]),
            Err(SealError::TooLong {
                len: MAX_PLAINTEXT_LEN + 1
            })
        );
    }

    #[test]
    fn a_peer_binding_seals_nothing() {
        let c = Contents {
            sender: "u@e/r",
            original_to: None,
        };
        let peer = Binding::Peer {
            component: "proxy.example",
        };
        assert_eq!(peer.kind(), None);
        assert_eq!(
            seal(&keys(), peer, &c, NOW, [0; SALT_LEN]),
            Err(SealError::OpenOnly)
        );
    }

    #[test]
    fn garbage_is_rejected_with_reasons() {
        let k = keys();
        let b = binding("1");
        assert_eq!(open(&k, b, "", NOW, LIFE), Err(Rejected::Truncated));
        assert_eq!(
            open(&k, b, "not base64!", NOW, LIFE),
            Err(Rejected::Encoding)
        );
        assert_eq!(open(&k, b, "abc=", NOW, LIFE), Err(Rejected::Encoding));
        assert_eq!(
            open(&k, b, &"A".repeat(1024), NOW, LIFE),
            Err(Rejected::TooLong)
        );
        let mut raw = URL_SAFE_NO_PAD.decode(sealed("u@e/r")).unwrap();
        raw[0] = 3;
        assert_eq!(
            open(&k, b, &URL_SAFE_NO_PAD.encode(&raw), NOW, LIFE),
            Err(Rejected::Version(3))
        );
    }

    /// A token of the previous format, made by jat-proxy 0.1 (key 7 = [0x42; 32], issued at
    /// Unix second 1 790 000 000 for IQ id 1234, sender `user@example/abc`, sent to
    /// `svc@proxy.example`, salt [9; 16]).
    const V1_TOKEN: &str = "AQAAAAcAAAAAarE7gAkJCQkJCQkJCQkJCQkJCQkkT-qAjdF52NbaP3hokTw6AqXbkVlwwtQbJIB-uRF9UJel66Kh896xJU0YXZ8JxmkMkw";

    #[test]
    fn version_1_tokens_open_until_they_expire() {
        let issued_ms = 1_790_000_000_000;
        let o = open(&keys(), binding("1234"), V1_TOKEN, issued_ms + 1500, LIFE).unwrap();
        assert_eq!(o.sender, "user@example/abc");
        assert_eq!(o.original_to.as_deref(), Some("svc@proxy.example"));
        assert_eq!(
            (o.version, o.issued_ms, o.key_id),
            (VERSION_1, issued_ms, 7)
        );
        // Exactly what 0.1 made, re-made from what opened.
        assert_eq!(
            reseal(&keys(), binding("1234"), &o).unwrap().unwrap(),
            V1_TOKEN
        );
        let late = issued_ms + LIFE * 1000;
        assert_eq!(
            open(&keys(), binding("1234"), V1_TOKEN, late, LIFE),
            Err(Rejected::Expired)
        );
        assert_eq!(
            open(&keys(), binding("1235"), V1_TOKEN, issued_ms, LIFE),
            Err(Rejected::Authentication)
        );
        // Version 1 only ever sealed IQ tokens.
        assert_eq!(
            open(
                &keys(),
                Binding::message("proxy.example"),
                V1_TOKEN,
                issued_ms,
                LIFE
            ),
            Err(Rejected::Kind)
        );
    }

    #[test]
    fn a_route_opens_for_its_peer_and_component_only() {
        let r = Route {
            client: "impl@example/a".into(),
            client_to: "proxy.example/TOKEN".into(),
            id: "push-1".into(),
        };
        let peer = "user@example/abc";
        let id = seal_route(&keys(), "proxy.example", peer, &r, NOW, [6; SALT_LEN]).unwrap();
        let open = |component, peer, now| open_route(&keys(), component, peer, &id, now, LIFE);
        assert_eq!(open("proxy.example", peer, NOW), Ok(r.clone()));
        assert_eq!(
            open("proxy.example", "user@example/other", NOW),
            Err(Rejected::Authentication)
        );
        assert_eq!(
            open("other.example", peer, NOW),
            Err(Rejected::Authentication)
        );
        assert_eq!(
            open("proxy.example", peer, NOW + LIFE * 1000),
            Err(Rejected::Expired)
        );
        // A route is no token, and no token is a route.
        let peer_binding = Binding::Peer {
            component: "proxy.example",
        };
        for b in [
            binding("push-1"),
            Binding::message("proxy.example"),
            peer_binding,
        ] {
            assert_eq!(super::open(&keys(), b, &id, NOW, LIFE), Err(Rejected::Kind));
        }
        let token = sealed("user@example/abc");
        assert_eq!(
            open_route(&keys(), "proxy.example", peer, &token, NOW, LIFE),
            Err(Rejected::Kind)
        );
    }

    #[test]
    fn short_ids_are_sealed_whole_and_long_ones_as_a_digest() {
        let c = Contents {
            sender: "user@example/abc",
            original_to: None,
        };
        let long = "0123456789abcdef-and-then-some";
        for (id, other) in [
            ("", "x"),
            ("0123456789abcdef", "0123456789abcdeg"),
            (long, "0123456789abcdef"),
            (long, "0123456789abcdef-and-then-somf"),
        ] {
            let t = seal(&keys(), binding(id), &c, NOW, [4; SALT_LEN]).unwrap();
            assert_eq!(t.len(), encoded_len(id, c.sender.len()), "{id}");
            assert!(open(&keys(), binding(id), &t, NOW, LIFE).is_ok(), "{id}");
            assert_eq!(
                open(&keys(), binding(other), &t, NOW, LIFE),
                Err(Rejected::Authentication),
                "{id} vs {other}"
            );
            let peer = Binding::Peer {
                component: "proxy.example",
            };
            assert_eq!(open(&keys(), peer, &t, NOW, LIFE).unwrap().sender, c.sender);
        }
    }

    #[test]
    fn a_token_opens_for_its_kind_and_component_only() {
        let c = Contents {
            sender: "user@example/abc",
            original_to: None,
        };
        let message = Binding::message("proxy.example");
        let m = seal(&keys(), message, &c, NOW, [5; SALT_LEN]).unwrap();
        let o = open(&keys(), message, &m, NOW + 86_000_000, 86_400).unwrap();
        assert_eq!(o.sender, "user@example/abc");
        assert_eq!(
            open(&keys(), message, &m, NOW + 86_400_000, 86_400),
            Err(Rejected::Expired)
        );
        // A message token never routes an IQ reply, whatever its id, nor an IQ token a
        // message.
        assert_eq!(
            open(&keys(), binding(""), &m, NOW, LIFE),
            Err(Rejected::Kind)
        );
        let iq = sealed("user@example/abc");
        assert_eq!(open(&keys(), message, &iq, NOW, LIFE), Err(Rejected::Kind));
        // Flipping the kind byte in clear fails authentication.
        for (t, b) in [(&m, binding("")), (&iq, message)] {
            let mut raw = URL_SAFE_NO_PAD.decode(t).unwrap();
            raw[1] ^= 3;
            assert_eq!(
                open(&keys(), b, &URL_SAFE_NO_PAD.encode(&raw), NOW, LIFE),
                Err(Rejected::Authentication)
            );
        }
        assert_eq!(
            open(&keys(), Binding::message("other.example"), &m, NOW, LIFE),
            Err(Rejected::Authentication)
        );
    }
}
