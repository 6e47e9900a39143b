//! The token: the resource of `proxy.example/TOKEN`, the address the implementing client
//! sees as the sender of a request and replies to.
//!
//! A token seals the original sender's full JID (and the exact address the request was sent
//! to, when that was not the bare component domain) with an AEAD, so that
//!
//! * a reply is routed back by decryption alone — jat-proxy keeps no table of requests, and a
//!   restart or another instance sharing the key file loses nothing;
//! * the implementing client learns nothing about who asked;
//! * nobody without the key can make a token that routes anywhere: a forged, altered or
//!   foreign token fails authentication.
//!
//! # Layout
//!
//! `base64url_nopad( header || ciphertext || tag )`, where
//!
//! | field      | bytes | in clear | meaning                                         |
//! |------------|-------|----------|-------------------------------------------------|
//! | version    | 1     | yes      | [`VERSION`]                                     |
//! | key id     | 4     | yes      | which key of the key file sealed it (big endian)|
//! | issued     | 8     | yes      | Unix seconds (big endian)                        |
//! | salt       | 16    | yes      | random; selects this token's own AEAD key        |
//! | ciphertext | n     | no       | `sender` or `sender 0x00 original_to`           |
//! | tag        | 16    | –        | Poly1305 tag                                    |
//!
//! The associated data is `header || len16(component) || component || iq_id`: a token opens
//! only for the component JID and the IQ id it was made for, and nobody can change its key id,
//! issue time or salt.
//!
//! # Nonces
//!
//! Each token is sealed with its own ChaCha20-Poly1305 key,
//! `HKDF-Expand(PRK = key secret, info = "jat-proxy token v1" || salt, 32)`, and the all-zero
//! nonce. A (key, nonce) pair repeats only if two tokens under one key secret draw the same
//! 128-bit salt: among `n` tokens that happens with probability below `n² / 2^129`. With the
//! bound this module documents and operators are told to stay under, **2^48 tokens per key**
//! (281 trillion: more than 8,900 years at a million requests per second), that probability
//! is below 2^-33. It holds across restarts and any number of instances sharing the key file,
//! because nothing is counted: every salt is fresh from the CSPRNG.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead;

use crate::keys::KeySet;

/// Format version carried in every token.
pub const VERSION: u8 = 1;
/// Bytes of random salt per token.
pub const SALT_LEN: usize = 16;
/// Bytes of clear header: version, key id, issue time, salt.
pub const HEADER_LEN: usize = 1 + 4 + 8 + SALT_LEN;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// A resourcepart may be at most 1023 bytes (RFC 7622 §3.4).
pub const MAX_TOKEN_LEN: usize = 1023;
/// The most bytes whose unpadded base64 fits in [`MAX_TOKEN_LEN`] characters.
pub const MAX_RAW_LEN: usize = MAX_TOKEN_LEN * 3 / 4;
/// The longest plaintext (sender, and original `to` when present) a token can carry.
pub const MAX_PLAINTEXT_LEN: usize = MAX_RAW_LEN - HEADER_LEN - TAG_LEN;
/// How far in the future a token's issue time may be (clock skew between instances; the key
/// file's pruning allows for the same).
pub use crate::keys::MAX_CLOCK_SKEW;
/// The documented per-key bound on tokens (see the module docs).
pub const TOKENS_PER_KEY_BOUND: u64 = 1 << 48;

const KDF_INFO: &[u8] = b"jat-proxy token v1";

/// What a token is bound to: it opens only with the same component JID and IQ id.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The component's domain, e.g. `proxy.example`.
    pub component: &'a str,
    /// The `id` attribute of the IQ the token travels in.
    pub iq_id: &'a str,
}

/// What a token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents<'a> {
    /// The full JID that sent the request: where the reply goes.
    pub sender: &'a str,
    /// The address the request was sent to, when it was not the bare component domain: where
    /// the reply comes from.
    pub original_to: Option<&'a str>,
}

/// The contents of an opened token, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The full JID that sent the request.
    pub sender: String,
    /// The address the request was sent to, if not the bare component domain.
    pub original_to: Option<String>,
    /// Id of the key that sealed it.
    pub key_id: u32,
}

/// The sender (with `original_to`) is longer than [`MAX_PLAINTEXT_LEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong {
    /// Bytes needed.
    pub len: usize,
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
            Rejected::Authentication => write!(f, "token failed authentication"),
            Rejected::Contents => write!(f, "token contents malformed"),
        }
    }
}

/// Seals `contents` into a token for `binding`, with the current key of `keys`.
pub fn seal(
    keys: &KeySet,
    binding: Binding<'_>,
    contents: &Contents<'_>,
    issued: u64,
    salt: [u8; SALT_LEN],
) -> Result<String, TooLong> {
    let plain_len = contents.sender.len() + contents.original_to.map_or(0, |t| 1 + t.len());
    if plain_len > MAX_PLAINTEXT_LEN {
        return Err(TooLong { len: plain_len });
    }
    let key = keys.current();
    let mut buf = Vec::with_capacity(HEADER_LEN + plain_len + TAG_LEN);
    buf.push(VERSION);
    buf.extend_from_slice(&key.id().to_be_bytes());
    buf.extend_from_slice(&issued.to_be_bytes());
    buf.extend_from_slice(&salt);
    buf.extend_from_slice(contents.sender.as_bytes());
    if let Some(to) = contents.original_to {
        buf.push(0);
        buf.extend_from_slice(to.as_bytes());
    }
    let aead_key = token_key(key.prk(), &salt);
    let (header, body) = buf.split_at_mut(HEADER_LEN);
    let ad = associated_data(header, binding);
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

/// Opens a token made by [`seal`] for the same `binding`, if it is still valid at `now`.
pub fn open(
    keys: &KeySet,
    binding: Binding<'_>,
    token: &str,
    now: u64,
    lifetime: u64,
) -> Result<Opened, Rejected> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Rejected::TooLong);
    }
    let mut buf = URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .map_err(|_| Rejected::Encoding)?;
    if buf.len() < HEADER_LEN + TAG_LEN {
        return Err(Rejected::Truncated);
    }
    if buf[0] != VERSION {
        return Err(Rejected::Version(buf[0]));
    }
    let key_id = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes"));
    let issued = u64::from_be_bytes(buf[5..13].try_into().expect("8 bytes"));
    // Cheap checks first: a flood of stale or foreign tokens costs no key derivation.
    if issued > now.saturating_add(MAX_CLOCK_SKEW) {
        return Err(Rejected::FromFuture);
    }
    if now >= issued.saturating_add(lifetime) {
        return Err(Rejected::Expired);
    }
    let key = keys.get(key_id).ok_or(Rejected::UnknownKey(key_id))?;
    let salt: [u8; SALT_LEN] = buf[13..HEADER_LEN].try_into().expect("salt length");
    let aead_key = token_key(key.prk(), &salt);
    let (header, body) = buf.split_at_mut(HEADER_LEN);
    let ad = associated_data(header, binding);
    let plain = aead_key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
            aead::Aad::from(&ad[..]),
            body,
        )
        .map_err(|_| Rejected::Authentication)?;
    let (sender, original_to) = match plain.iter().position(|&b| b == 0) {
        Some(i) => (&plain[..i], Some(&plain[i + 1..])),
        None => (&plain[..], None),
    };
    let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_owned);
    Ok(Opened {
        sender: text(sender).map_err(|_| Rejected::Contents)?,
        original_to: original_to
            .map(text)
            .transpose()
            .map_err(|_| Rejected::Contents)?,
        key_id,
    })
}

/// Length in characters of the token for a plaintext of `plain_len` bytes.
pub fn encoded_len(plain_len: usize) -> usize {
    (4 * (HEADER_LEN + plain_len + TAG_LEN)).div_ceil(3)
}

fn token_key(prk: &ring::hkdf::Prk, salt: &[u8; SALT_LEN]) -> aead::LessSafeKey {
    let info = [KDF_INFO, &salt[..]];
    let okm = prk
        .expand(&info, &aead::CHACHA20_POLY1305)
        .expect("32 bytes is within HKDF-SHA256's output limit");
    aead::LessSafeKey::new(aead::UnboundKey::from(okm))
}

fn associated_data(header: &[u8], binding: Binding<'_>) -> Vec<u8> {
    let component = binding.component.as_bytes();
    let len = u16::try_from(component.len()).unwrap_or(u16::MAX);
    let mut ad = Vec::with_capacity(header.len() + 2 + component.len() + binding.iq_id.len());
    ad.extend_from_slice(header);
    ad.extend_from_slice(&len.to_be_bytes());
    ad.extend_from_slice(component);
    ad.extend_from_slice(binding.iq_id.as_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000;
    const LIFE: u64 = 300;

    fn keys() -> KeySet {
        KeySet::from_secrets(&[(7, 0, [0x42; 32])]).unwrap()
    }

    fn binding(id: &str) -> Binding<'_> {
        Binding {
            component: "proxy.example",
            iq_id: id,
        }
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
        assert_eq!(o.sender, "user@example/abc");
        assert_eq!(o.original_to, None);
        assert_eq!(o.key_id, 7);
        assert_eq!(t.len(), encoded_len("user@example/abc".len()));
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
        let other = Binding {
            component: "other.example",
            iq_id: "1234",
        };
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
        assert!(open(&keys(), binding("1234"), &t, NOW + LIFE - 1, LIFE).is_ok());
        assert_eq!(
            open(&keys(), binding("1234"), &t, NOW + LIFE, LIFE),
            Err(Rejected::Expired)
        );
        assert!(open(&keys(), binding("1234"), &t, NOW - MAX_CLOCK_SKEW, LIFE).is_ok());
        assert_eq!(
            open(&keys(), binding("1234"), &t, NOW - MAX_CLOCK_SKEW - 1, LIFE),
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
            Err(TooLong {
                len: MAX_PLAINTEXT_LEN + 1
            })
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
        raw[0] = 2;
        assert_eq!(
            open(&k, b, &URL_SAFE_NO_PAD.encode(&raw), NOW, LIFE),
            Err(Rejected::Version(2))
        );
    }
}
