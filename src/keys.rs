//! Token keys and the key file that holds them.
//!
//! Every instance serving one component domain reads the same key file, so a token made by
//! one instance (or by a process that has since been killed) is opened by any other. The file
//! is the only persistent state jat-proxy has; it is written atomically (temporary file, then
//! rename or link) so that a reader never sees half of it, and `keys rotate` changes it under
//! an exclusive lock so that concurrent rotations all take effect.
//!
//! A key is 256 bits from the system CSPRNG. Its id is a fingerprint of its secret (see
//! [`key_id`]), so two keys made anywhere, even by two hosts rotating their own copies of
//! one file, never share an id unless they share the secret. The file keeps keys in the
//! order they were added; the last one is *current*: new tokens use it. Older keys only open
//! tokens; once every token they can have issued has expired they are pruned (see
//! [`KeySet::prune`]).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{hkdf, hmac};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::config::{FileError, FileKind};
use crate::random::Random;

/// Length of a key's secret in bytes.
pub const SECRET_LEN: usize = 32;
/// Largest key file read (a key takes about 110 bytes).
pub const MAX_KEY_FILE_LEN: u64 = 1024 * 1024;
/// Largest component secret file read.
pub const MAX_SECRET_FILE_LEN: u64 = 64 * 1024;
/// Seconds the clocks of instances sharing a key file may disagree: a token may be issued
/// this far in the future, and a superseded key is kept this much longer.
pub const MAX_CLOCK_SKEW: u64 = 60;
/// How long `keys rotate` waits for another rotation to finish.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// The HMAC message whose tag, under a key's secret, gives the key's id.
const KEY_ID_LABEL: &[u8] = b"jat-proxy key id";

/// The id of the key with this secret: the first 4 bytes (big-endian) of
/// HMAC-SHA256(secret, "jat-proxy key id"). The id is public (it is in every token); as a
/// PRF output it says nothing about the secret, and it is a different HMAC input from any
/// token key derivation (`"jat-proxy token v1" ‖ salt ‖ 1`).
pub fn key_id(secret: &[u8; SECRET_LEN]) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, KEY_ID_LABEL);
    u32::from_be_bytes(tag.as_ref()[..4].try_into().expect("4 bytes"))
}

/// One token key: its id (carried in clear in every token it seals) and the HKDF PRK from
/// which each token's own AEAD key is derived.
pub struct Key {
    id: u32,
    created: u64,
    prk: hkdf::Prk,
    secret: Zeroizing<[u8; SECRET_LEN]>,
}

impl Key {
    fn from_secret(id: u32, created: u64, secret: [u8; SECRET_LEN]) -> Key {
        let secret = Zeroizing::new(secret);
        // The secret is uniformly random, so it is a valid PRK for HKDF-Expand as it is
        // (RFC 5869 §3.3): no extract step is needed.
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &secret[..]);
        Key {
            id,
            created,
            prk,
            secret,
        }
    }

    /// The id written into each token this key seals.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// When this key was made (Unix seconds).
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The PRK from which per-token keys are expanded.
    pub(crate) fn prk(&self) -> &hkdf::Prk {
        &self.prk
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// The keys of one key file in the order they were added (the last is current); never
/// empty, no two with one id.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<Key>,
    /// `(id, index in keys)`, sorted by id: [`KeySet::get`] is a binary search.
    by_id: Vec<(u32, usize)>,
    /// The selection secret (see [`KeySet::selection_key`]), if the file has one.
    selection: Option<Zeroizing<[u8; SECRET_LEN]>>,
}

/// The id under which the key file stores the selection secret: the first `[[key]]`, with
/// an id no token key has (0), so that builds that know no selection secret still read the
/// file (they take it for an old key that no token names).
pub const SELECTION_ID: u32 = 0;
/// The HMAC message that derives a selection key from the oldest token key, for a key file
/// without a selection secret that cannot be written.
const SELECTION_LABEL: &[u8] = b"jat-proxy selection";
/// The HMAC message that derives the pseudonym key from the selection secret.
const PSEUDONYM_LABEL: &[u8] = b"jat-proxy pseudonym";

impl KeySet {
    fn new(keys: Vec<Key>) -> Option<KeySet> {
        let mut by_id: Vec<(u32, usize)> =
            keys.iter().enumerate().map(|(i, k)| (k.id, i)).collect();
        by_id.sort_unstable();
        if keys.is_empty() || by_id.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        Some(KeySet {
            keys,
            by_id,
            selection: None,
        })
    }

    /// The key of sticky resource selection (`balance = "sticky"`, and where messages go):
    /// the sender's account is hashed under it, so that the implementing client, which
    /// names its resources, learns nothing of who is behind a token from where it lands.
    /// Every instance reading the key file has the same, and it survives rotation. The
    /// selection secret is derived from the oldest key when first stored (so that copies of
    /// one file given it apart agree, and nothing moves when it is written); a file without
    /// one (of an older build, not writable) derives the same from its oldest key until
    /// that key is pruned.
    pub fn selection_key(&self) -> hmac::Key {
        match &self.selection {
            Some(secret) => hmac::Key::new(hmac::HMAC_SHA256, &secret[..]),
            None => hmac::Key::new(hmac::HMAC_SHA256, &self.derived_selection()[..]),
        }
    }

    /// The key of sender pseudonyms (`[proxy] sender = "pseudonym"`): HMAC-SHA256(selection
    /// secret, "jat-proxy pseudonym"), so it has the selection secret's properties (every
    /// instance reading the key file has the same, rotation keeps it) and is not the key
    /// sticky selection hashes under (a pseudonym says nothing about where a sender lands).
    pub fn pseudonym_key(&self) -> hmac::Key {
        let derived = hmac::sign(&self.selection_key(), PSEUDONYM_LABEL);
        hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
    }

    /// HMAC-SHA256(oldest key, "jat-proxy selection").
    fn derived_selection(&self) -> Zeroizing<[u8; SECRET_LEN]> {
        let oldest = hmac::Key::new(hmac::HMAC_SHA256, &self.keys[0].secret[..]);
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        secret.copy_from_slice(hmac::sign(&oldest, SELECTION_LABEL).as_ref());
        secret
    }

    /// Whether the key file has a selection secret of its own.
    pub fn has_selection_secret(&self) -> bool {
        self.selection.is_some()
    }

    /// Gives the set a selection secret if it has none: the one derived from its oldest key,
    /// which [`KeySet::selection_key`] used meanwhile.
    fn ensure_selection(&mut self) {
        if self.selection.is_none() {
            self.selection = Some(self.derived_selection());
        }
    }

    fn reindex(&mut self) {
        self.by_id = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.id, i))
            .collect();
        self.by_id.sort_unstable();
    }

    /// A new set with one fresh key.
    pub fn generate(rng: &mut dyn Random, now: u64) -> KeySet {
        let mut set = KeySet::new(vec![fresh_key(now, rng, |_| false)]).expect("one key");
        set.ensure_selection();
        set
    }

    /// A set from raw secrets, for tests, benchmarks and the fuzzer: `(id, created, secret)`,
    /// oldest first (the last is current). `None` if empty or if two share an id.
    pub fn from_secrets(secrets: &[(u32, u64, [u8; SECRET_LEN])]) -> Option<KeySet> {
        KeySet::new(
            secrets
                .iter()
                .map(|&(id, created, secret)| Key::from_secret(id, created, secret))
                .collect(),
        )
    }

    /// The key new tokens are sealed with: the one added last.
    pub fn current(&self) -> &Key {
        self.keys.last().expect("a key set is never empty")
    }

    /// The key with this id, if the set still has it.
    pub fn get(&self, id: u32) -> Option<&Key> {
        self.by_id
            .binary_search_by_key(&id, |&(k, _)| k)
            .ok()
            .map(|i| &self.keys[self.by_id[i].1])
    }

    /// Ids of all keys, oldest (first added) first.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// All keys, oldest (first added) first; the last is current.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter()
    }

    /// Adds a new current key and returns its id: a fingerprint of its secret, never 0 and
    /// never the id of a key already in the set (a new secret is drawn if it would be).
    /// Older keys stay, so tokens they sealed still open.
    pub fn rotate(&mut self, rng: &mut dyn Random, now: u64) -> u32 {
        self.ensure_selection();
        let key = fresh_key(now, rng, |id| self.get(id).is_some());
        let id = key.id;
        self.keys.push(key);
        self.reindex();
        id
    }

    /// Removes keys that can no longer have a valid token outstanding.
    ///
    /// A key stops sealing when its successor (the next key in the file) is created
    /// (instances pick the successor up within their reload interval, `reload_grace`). Its
    /// last tokens then live for `token_lifetime`. Past both, plus `clock_skew` between
    /// instances, it is dropped. The current key is never removed. Returns the ids removed.
    pub fn prune(&mut self, now: u64, token_lifetime: u64, reload_grace: u64) -> Vec<u32> {
        let mut removed = Vec::new();
        let horizon = token_lifetime
            .saturating_add(reload_grace)
            .saturating_add(MAX_CLOCK_SKEW);
        // Key i is superseded at keys[i+1].created.
        let mut i = 0;
        while i + 1 < self.keys.len() {
            let superseded = self.keys[i + 1].created;
            if superseded.saturating_add(horizon) < now {
                removed.push(self.keys.remove(i).id);
            } else {
                i += 1;
            }
        }
        self.reindex();
        removed
    }
}

/// A key with a fresh secret whose id is neither 0 nor `taken`.
fn fresh_key(now: u64, rng: &mut dyn Random, taken: impl Fn(u32) -> bool) -> Key {
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    loop {
        rng.fill(&mut secret[..]);
        let id = key_id(&secret);
        if id != 0 && !taken(id) {
            return Key::from_secret(id, now, *secret);
        }
    }
}

/// What went wrong with the key file: the one error shape of jat-proxy's files
/// ([`FileError`], of kind [`FileKind::KeyFile`]). It names the file and, for a mistake in
/// it, the line, column and key; it never quotes the file.
pub type KeyFileError = FileError;

/// An error about the key file as a whole.
fn file_error(path: &Path, reason: impl Into<String>) -> KeyFileError {
    FileError::new(FileKind::KeyFile, path, None, reason)
}

/// An error at `key` of the key file's `text` (placed by toml's own parse of it).
fn error_at(path: &Path, text: &str, key: &str, reason: impl Into<String>) -> KeyFileError {
    FileError::at(FileKind::KeyFile, path, text, key, reason)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    #[serde(rename = "key")]
    keys: Vec<KeyRepr>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRepr {
    id: u32,
    created: u64,
    secret: Zeroizing<String>,
}

const FILE_HEADER: &str = "\
# jat-proxy token keys. SECRET: whoever reads this file can read the sender addresses in
# tokens and forge replies. Keep it mode 0600, owned by the user jat-proxy runs as, and share
# it only between the instances that serve one component domain.
# Keys are in the order they were added; the last one seals new tokens. The first, id 0,
# is no token key: it keys the choice of resource for `balance = \"sticky\"`, and stays.
# Add a key with `jat-proxy keys rotate --config FILE`; never edit secrets by hand.

";

/// Reads a file that must be private, as ssh does with private keys: opened once, without
/// following a symbolic link and without blocking (a FIFO cannot hang us), then checked *on
/// the open descriptor* — a regular file, owned by the user we run as or root, no permission
/// for group or others, at most `max_len` bytes — and read from that same descriptor, so
/// what is checked is what is read.
///
/// When running as root, a file owned by the owner of the directory that holds it is also
/// accepted: that user controls the name anyway, and it is how systemd's `StateDirectory`
/// hands the key file to the service's user (see [`load_or_create`]).
///
/// `what` names the file in messages ("the key file"); no message quotes its content.
pub(crate) fn read_private(
    path: &Path,
    what: &str,
    max_len: u64,
) -> Result<Zeroizing<String>, String> {
    use rustix::fs::OFlags;
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                format!("{what} is a symbolic link, which is not followed; name the file itself")
            } else {
                format!("cannot open {what}: {e}")
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot examine {what}: {e}"))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let is = if kind.is_dir() {
            "a directory"
        } else if std::os::unix::fs::FileTypeExt::is_fifo(&kind) {
            "a FIFO"
        } else if std::os::unix::fs::FileTypeExt::is_socket(&kind) {
            "a socket"
        } else {
            "a device"
        };
        return Err(format!("{what} is {is}, not a regular file"));
    }
    check_private(path, &meta, what)?;
    if meta.len() > max_len {
        return Err(format!(
            "{what} is {} bytes, more than the {max_len} allowed",
            meta.len()
        ));
    }
    // Exactly as many bytes as fstat reported, plus one to notice a file that grew: the
    // buffer is never reallocated, so no copy of the secret is left behind unwiped.
    let len = meta.len() as usize;
    let mut buf = Zeroizing::new(vec![0u8; len + 1]);
    let mut filled = 0;
    loop {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled > len {
                    return Err(format!("{what} changed while it was read; try again"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read {what}: {e}")),
        }
    }
    buf.truncate(filled);
    match std::str::from_utf8(&buf) {
        Ok(_) => {}
        Err(e) => {
            let valid = &buf[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            return Err(format!("{what} is not UTF-8 text (line {line})"));
        }
    }
    let bytes = std::mem::take(&mut *buf);
    Ok(Zeroizing::new(
        String::from_utf8(bytes).expect("checked to be UTF-8"),
    ))
}

/// Whether a file holding a secret is private: owned by the user jat-proxy runs as or by
/// root (or, when jat-proxy runs as root, by the owner of its directory), and not accessible
/// by group or others. `what` names the file in the message.
pub(crate) fn check_private(path: &Path, meta: &fs::Metadata, what: &str) -> Result<(), String> {
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 && !(euid == 0 && owned_by_dir_owner(path, meta.uid()))
    {
        return Err(format!(
            "{what} is owned by uid {}, not by the user jat-proxy runs as (uid {euid}) or \
             root; run `chown {euid} {}` or run jat-proxy as its owner",
            meta.uid(),
            path.display()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// Whether `uid` owns the directory holding `path`.
fn owned_by_dir_owner(path: &Path, uid: u32) -> bool {
    fs::metadata(parent_dir(path)).is_ok_and(|d| d.uid() == uid)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Reads the key file (see `read_private` in the source for what it must be).
pub fn load(path: &Path) -> Result<KeySet, KeyFileError> {
    let text = read_private(path, "the key file", MAX_KEY_FILE_LEN)
        .map_err(|reason| file_error(path, reason))?;
    parse(path, &text)
}

/// Reads key file text (`path` only names it in errors). An error names the line, column and
/// key at fault and never quotes the text.
pub fn parse(path: &Path, text: &str) -> Result<KeySet, KeyFileError> {
    let repr: FileRepr = toml::from_str(text)
        .map_err(|e| FileError::from_toml(FileKind::KeyFile, path, text, &e))?;
    let mut keys = Vec::with_capacity(repr.keys.len());
    let mut selection = None;
    for (i, k) in repr.keys.iter().enumerate() {
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(k.secret.as_bytes()).map_err(|_| {
            error_at(
                path,
                text,
                &format!("key[{i}].secret"),
                "not base64url (URL-safe base64 without padding)",
            )
        })?);
        let mut secret: [u8; SECRET_LEN] = bytes.as_slice().try_into().map_err(|_| {
            error_at(
                path,
                text,
                &format!("key[{i}].secret"),
                format!("must be {SECRET_LEN} bytes, found {}", bytes.len()),
            )
        })?;
        if k.id == SELECTION_ID {
            if selection.is_some() {
                secret.zeroize();
                return Err(error_at(
                    path,
                    text,
                    &format!("key[{i}].id"),
                    "a second selection secret (id 0)",
                ));
            }
            selection = Some(Zeroizing::new(secret));
            secret.zeroize();
            continue;
        }
        if let Some(j) = keys.iter().position(|k2: &Key| k2.id == k.id) {
            secret.zeroize();
            return Err(error_at(
                path,
                text,
                &format!("key[{i}].id"),
                format!("the same id as key[{j}]"),
            ));
        }
        keys.push(Key::from_secret(k.id, k.created, secret));
        secret.zeroize();
    }
    let mut set = KeySet::new(keys).ok_or_else(|| error_at(path, text, "key", "no keys"))?;
    set.selection = selection;
    Ok(set)
}

/// Reads the key file, or creates it (mode 0600) with one fresh key if it does not exist.
///
/// Several instances may start at once on a new shared file: the file is written in full
/// under a temporary name and linked into place only if no other instance got there first,
/// in which case that instance's keys are read and used. A file created by root gets the
/// owner (user and group) of its directory, so that the service whose directory it is (a
/// systemd `StateDirectory`, say) can read it.
pub fn load_or_create(
    path: &Path,
    rng: &mut dyn Random,
    now: u64,
) -> Result<(KeySet, bool), KeyFileError> {
    let (set, created) = load_or_create_as_is(path, rng, now)?;
    if set.has_selection_secret() {
        return Ok((set, created));
    }
    // A file of a build without selection secrets: given the one derived from its oldest
    // key (what was used meanwhile, so nothing moves), under the rotation lock (another
    // instance may be doing the same), if it can be written.
    let added = lock(path).and_then(|_lock| {
        let mut set = load(path)?;
        if !set.has_selection_secret() {
            set.ensure_selection();
            save(path, &set, rng)?;
        }
        Ok(set)
    });
    Ok(match added {
        Ok(set) => (set, created),
        Err(e) => {
            tracing::warn!(
                "the key file has no selection secret and cannot be given one ({e}); the one \
                 derived from its oldest key is used, the same on every instance, until that \
                 key is pruned"
            );
            (set, created)
        }
    })
}

/// [`load_or_create`] without giving a file of an older build a selection secret (for
/// callers that hold the lock and write the file anyway).
fn load_or_create_as_is(
    path: &Path,
    rng: &mut dyn Random,
    now: u64,
) -> Result<(KeySet, bool), KeyFileError> {
    match fs::symlink_metadata(path) {
        Ok(_) => return load(path).map(|k| (k, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_error(path, e.to_string())),
    }
    let set = KeySet::generate(rng, now);
    match write_new(path, &set, rng, false) {
        Ok(()) => Ok((set, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load(path).map(|k| (k, false)),
        Err(e) => Err(file_error(path, format!("cannot create: {e}"))),
    }
}

/// Writes the set over the key file, atomically (the old file stays whole until the rename).
/// The new file keeps the owner of the one it replaces.
///
/// To add a key, use [`rotate`]: it re-reads the file under a lock first, so that a
/// concurrent rotation is not lost.
pub fn save(path: &Path, set: &KeySet, rng: &mut dyn Random) -> Result<(), KeyFileError> {
    write_new(path, set, rng, true).map_err(|e| file_error(path, format!("cannot write: {e}")))
}

/// What [`rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The new current key.
    pub id: u32,
    /// The ids in the file now, oldest first.
    pub ids: Vec<u32>,
    /// The ids pruned.
    pub pruned: Vec<u32>,
    /// Whether the key file did not exist and was created first.
    pub created: bool,
}

/// `jat-proxy keys rotate`: under an exclusive lock (see `lock` in the source), reads the key file (or
/// creates it), adds a new current key, prunes keys whose tokens have all expired
/// ([`KeySet::prune`]) and writes the file back atomically. Rotations running at the same
/// time, in threads or processes, are serialised: each one's key is kept.
pub fn rotate(
    path: &Path,
    rng: &mut dyn Random,
    now: u64,
    token_lifetime: u64,
    reload_grace: u64,
) -> Result<Rotation, KeyFileError> {
    let _lock = lock(path)?;
    let (mut set, created) = load_or_create_as_is(path, rng, now)?;
    let id = set.rotate(rng, now);
    let pruned = set.prune(now, token_lifetime, reload_grace);
    save(path, &set, rng)?;
    Ok(Rotation {
        id,
        ids: set.ids(),
        pruned,
        created,
    })
}

/// The lock file of a key file: `.NAME.lock` in the same directory.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.lock"))
}

/// Takes the exclusive lock (`flock`) of the key file's lock file, creating it (mode 0600,
/// owned like a new key file) if needed; it is held until the returned file is dropped.
/// Gives up after 30 s.
pub(crate) fn lock(path: &Path) -> Result<fs::File, KeyFileError> {
    use rustix::fs::{FlockOperation, OFlags, flock};
    let lock = lock_path(path);
    let err = |m: String| file_error(path, m);
    let file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(&lock)
    {
        Ok(f) => {
            give_dir_owner(path, &f)
                .map_err(|e| err(format!("lock file {}: {e}", lock.display())))?;
            f
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&lock)
            .map_err(|e| err(format!("cannot open the lock file {}: {e}", lock.display())))?,
        Err(e) => {
            return Err(err(format!(
                "cannot create the lock file {}: {e}",
                lock.display()
            )));
        }
    };
    let started = Instant::now();
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                if started.elapsed() > LOCK_WAIT {
                    return Err(err(format!(
                        "another `jat-proxy keys rotate` has held {} for over {} s",
                        lock.display(),
                        LOCK_WAIT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(err(format!(
                    "cannot lock {}: {}",
                    lock.display(),
                    io::Error::from(e)
                )));
            }
        }
    }
}

fn write_new(path: &Path, set: &KeySet, rng: &mut dyn Random, replace: bool) -> io::Result<()> {
    let selection = set.selection.as_ref().map(|secret| KeyRepr {
        id: SELECTION_ID,
        created: set.keys[0].created,
        secret: Zeroizing::new(URL_SAFE_NO_PAD.encode(&secret[..])),
    });
    let repr = FileRepr {
        keys: selection
            .into_iter()
            .chain(set.keys.iter().map(|k| KeyRepr {
                id: k.id,
                created: k.created,
                secret: Zeroizing::new(URL_SAFE_NO_PAD.encode(&k.secret[..])),
            }))
            .collect(),
    };
    let body = Zeroizing::new(toml::to_string(&repr).map_err(io::Error::other)?);
    let mut suffix = [0u8; 8];
    rng.fill(&mut suffix);
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        u64::from_le_bytes(suffix)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&tmp)?;
        if !(replace && keep_owner(path, &f)?) {
            give_dir_owner(path, &f)?;
        }
        f.write_all(FILE_HEADER.as_bytes())?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        drop(f);
        if replace {
            fs::rename(&tmp, path)
        } else {
            // link() fails with AlreadyExists instead of replacing: first writer wins.
            fs::hard_link(&tmp, path)
        }
    })();
    let _ = fs::remove_file(&tmp);
    if result.is_ok()
        && let Ok(d) = fs::File::open(parent_dir(path))
    {
        let _ = d.sync_all();
    }
    result
}

/// A rotation run as root must not leave the file unreadable to the service's own user:
/// the replacement takes the owner of the file it replaces. `false` if there is none.
fn keep_owner(old: &Path, new: &fs::File) -> io::Result<bool> {
    let Ok(old_meta) = fs::symlink_metadata(old) else {
        return Ok(false);
    };
    set_owner(new, old_meta.uid(), old_meta.gid(), "the old key file")?;
    Ok(true)
}

/// A file created by root takes the owner of its directory (the service's user, for a
/// systemd `StateDirectory`); one created by anyone else is theirs already.
fn give_dir_owner(path: &Path, new: &fs::File) -> io::Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let dir = fs::metadata(parent_dir(path))?;
    set_owner(new, dir.uid(), dir.gid(), "its directory")
}

fn set_owner(file: &fs::File, uid: u32, gid: u32, of: &str) -> io::Result<()> {
    let meta = file.metadata()?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot give the new key file the owner of {of} (uid {uid}): {e}; \
                 run the command as that user or as root"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRandom;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("jat-keys-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_private(path: &Path, text: &str) {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn secret_of(set: &KeySet, id: u32) -> [u8; SECRET_LEN] {
        *set.get(id).unwrap().secret
    }

    /// Hands out the given 32-byte blocks in turn (then zeros).
    struct Script(Vec<[u8; SECRET_LEN]>);
    impl Random for Script {
        fn fill(&mut self, buf: &mut [u8]) {
            let next = if self.0.is_empty() {
                [0; SECRET_LEN]
            } else {
                self.0.remove(0)
            };
            buf.copy_from_slice(&next[..buf.len()]);
        }
    }

    #[test]
    fn created_with_mode_0600_and_reused() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        let mut rng = SeededRandom::new(1);
        let (a, created) = load_or_create(&path, &mut rng, 1000).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = load_or_create(&path, &mut rng, 2000).unwrap();
        assert!(!created);
        assert_eq!(a.current().secret[..], b.current().secret[..]);
        assert_eq!(b.current().created(), 1000);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_group_readable_file() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        let mut rng = SeededRandom::new(2);
        load_or_create(&path, &mut rng, 1000).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("mode 0640"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ids_are_fingerprints_of_the_secrets() {
        let mut rng = SeededRandom::new(3);
        let mut set = KeySet::generate(&mut rng, 1000);
        let first = set.current().id();
        assert_eq!(first, key_id(&secret_of(&set, first)));
        let second = set.rotate(&mut rng, 5000);
        assert_eq!(second, key_id(&secret_of(&set, second)));
        assert_ne!(second, first);
        assert_ne!(second, first.wrapping_add(1), "not sequential");
        assert_eq!(set.current().id(), second);
        assert_eq!(set.ids(), vec![first, second]);
        // The id is HMAC-SHA256(secret, "jat-proxy key id")[..4], big-endian.
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]),
            b"jat-proxy key id",
        );
        assert_eq!(key_id(&[7; 32]).to_be_bytes(), tag.as_ref()[..4]);
    }

    #[test]
    fn a_colliding_id_draws_a_new_secret() {
        let (a, b) = ([1u8; SECRET_LEN], [2u8; SECRET_LEN]);
        let mut set = KeySet::from_secrets(&[(key_id(&a), 0, a)]).unwrap();
        // The generator first repeats `a` (same id as the key already there), then gives `b`.
        let id = set.rotate(&mut Script(vec![a, b]), 10);
        assert_eq!(id, key_id(&b));
        assert_eq!(set.ids(), vec![key_id(&a), key_id(&b)]);
        assert_eq!(secret_of(&set, id), b);
    }

    #[test]
    fn current_is_the_last_key_in_file_order() {
        let set = KeySet::from_secrets(&[(900, 0, [1; 32]), (5, 10, [2; 32]), (70, 20, [3; 32])])
            .unwrap();
        assert_eq!(set.current().id(), 70);
        assert_eq!(set.ids(), vec![900, 5, 70]);
        for id in [900, 5, 70] {
            assert_eq!(set.get(id).unwrap().id(), id);
        }
        assert!(set.get(6).is_none());
        assert!(KeySet::from_secrets(&[(5, 0, [1; 32]), (5, 1, [2; 32])]).is_none());
        assert!(KeySet::from_secrets(&[]).is_none());
    }

    #[test]
    fn old_sequential_key_files_still_load() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        let s = |b: u8| URL_SAFE_NO_PAD.encode([b; 32]);
        write_private(
            &path,
            &format!(
                "{FILE_HEADER}[[key]]\nid = 1\ncreated = 100\nsecret = \"{}\"\n\n\
                 [[key]]\nid = 2\ncreated = 200\nsecret = \"{}\"\n\n\
                 [[key]]\nid = 3\ncreated = 300\nsecret = \"{}\"\n",
                s(1),
                s(2),
                s(3)
            ),
        );
        let set = load(&path).unwrap();
        assert_eq!(set.ids(), vec![1, 2, 3]);
        assert_eq!(set.current().id(), 3);
        assert_eq!(secret_of(&set, 1), [1; 32]);
        // A rotation of an old file appends a fingerprint id and keeps the rest.
        let r = rotate(&path, &mut SeededRandom::new(4), 400, 300, 10).unwrap();
        assert_eq!(r.ids[..3], [1, 2, 3]);
        let set = load(&path).unwrap();
        assert_eq!(set.current().id(), r.id);
        assert_eq!(r.id, key_id(&secret_of(&set, r.id)));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn independent_rotations_of_copies_never_share_an_id() {
        let dir = tmpdir();
        let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
        load_or_create(&a, &mut SeededRandom::new(5), 1000).unwrap();
        fs::copy(&a, &b).unwrap();
        let ra = rotate(&a, &mut SeededRandom::new(6), 2000, 300, 10).unwrap();
        let rb = rotate(&b, &mut SeededRandom::new(7), 2000, 300, 10).unwrap();
        assert_ne!(ra.id, rb.id, "two hosts rotating copies of one file");
        assert_eq!(ra.ids[0], rb.ids[0]);
        // So a token of host A's new key is an unknown key on host B (the token module's
        // tests check that), not a forgery.
        let (ka, kb) = (load(&a).unwrap(), load(&b).unwrap());
        assert!(ka.get(ra.id).is_some() && kb.get(ra.id).is_none());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotate_then_prune_after_lifetime() {
        let mut rng = SeededRandom::new(3);
        let mut set = KeySet::generate(&mut rng, 1000);
        let first = set.current().id();
        let second = set.rotate(&mut rng, 5000);
        assert_eq!(set.current().id(), second);
        assert!(set.get(first).is_some());
        // The first key may have sealed tokens until 5000 (+ reload grace); they live 300 s.
        assert!(set.prune(5000 + 300, 300, 10).is_empty());
        assert_eq!(
            set.prune(5000 + 300 + 10 + MAX_CLOCK_SKEW + 1, 300, 10),
            vec![first]
        );
        assert_eq!(set.ids(), vec![second]);
        assert!(set.get(first).is_none());
        assert_eq!(set.get(second).unwrap().id(), second);
    }

    #[test]
    fn the_pseudonym_key_survives_rotation_and_pruning_and_is_not_the_selection_key() {
        let pseudonym = |set: &KeySet| {
            hmac::sign(&set.pseudonym_key(), b"alice@example")
                .as_ref()
                .to_vec()
        };
        let mut rng = SeededRandom::new(5);
        let mut set = KeySet::generate(&mut rng, 1000);
        let before = pseudonym(&set);
        assert_ne!(before, tag(&set));
        set.rotate(&mut rng, 5000);
        assert_eq!(pseudonym(&set), before);
        set.prune(5000 + 300 + 10 + MAX_CLOCK_SKEW + 1, 300, 10);
        assert_eq!(pseudonym(&set), before);
        assert_ne!(pseudonym(&KeySet::generate(&mut rng, 1000)), before);
    }

    fn tag(set: &KeySet) -> Vec<u8> {
        hmac::sign(&set.selection_key(), b"alice@example")
            .as_ref()
            .to_vec()
    }

    #[test]
    fn the_selection_secret_survives_rotation_and_pruning_and_old_files_get_one() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        let mut rng = SeededRandom::new(11);
        let (first, _) = load_or_create(&path, &mut rng, 1000).unwrap();
        assert!(first.has_selection_secret());
        let text = fs::read_to_string(&path).unwrap();
        // Stored as the first [[key]], id 0: a build without selection secrets reads it as
        // an old key (id, created, secret) that no token names.
        let repr: FileRepr = toml::from_str(&text).unwrap();
        assert_eq!(repr.keys[0].id, SELECTION_ID);
        assert_eq!(repr.keys.len(), 2);
        for now in [5000, 100_000, 200_000] {
            rotate(&path, &mut rng, now, 300, 10).unwrap();
        }
        let rotated = load(&path).unwrap();
        assert_eq!(rotated.ids().len(), 2, "old token keys pruned");
        assert!(rotated.get(SELECTION_ID).is_none(), "not a token key");
        assert_eq!(
            tag(&rotated),
            tag(&first),
            "same secret after rotations and pruning"
        );

        // A file of a build without selection secrets: its keys only.
        let old = dir.join("old.toml");
        let without: String = text
            .split("[[key]]")
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join("[[key]]");
        fs::write(&old, &without).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o600)).unwrap();
        let read = load(&old).unwrap();
        assert!(!read.has_selection_secret());
        // Keyed by its oldest key meanwhile, as every instance reading it computes.
        assert_eq!(tag(&read), tag(&load(&old).unwrap()));
        let (given, _) = load_or_create(&old, &mut rng, 2000).unwrap();
        assert!(given.has_selection_secret());
        assert_eq!(
            tag(&load(&old).unwrap()),
            tag(&given),
            "written to the file"
        );
        assert_eq!(given.current().id(), read.current().id());
        // The one derived meanwhile: nothing moves, and copies of the file given it apart
        // agree.
        assert_eq!(tag(&given), tag(&read));
        // `keys rotate` of such a file gives it the same, at once (it holds the lock).
        let older = dir.join("older.toml");
        fs::write(&older, &without).unwrap();
        fs::set_permissions(&older, fs::Permissions::from_mode(0o600)).unwrap();
        let t = std::time::Instant::now();
        rotate(&older, &mut rng, 3000, 300, 10).unwrap();
        assert!(t.elapsed() < LOCK_WAIT / 2, "{:?}", t.elapsed());
        assert_eq!(tag(&load(&older).unwrap()), tag(&read));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn prune_follows_file_order_not_id_order() {
        // Ids out of numeric order: 50 was superseded by 7 at 100, 7 by 3 at 5000.
        let mut set =
            KeySet::from_secrets(&[(50, 0, [1; 32]), (7, 100, [2; 32]), (3, 5000, [3; 32])])
                .unwrap();
        assert_eq!(set.prune(1000, 300, 10), vec![50]);
        assert_eq!(set.ids(), vec![7, 3]);
        assert_eq!(set.current().id(), 3);
        assert!(set.get(7).is_some() && set.get(50).is_none());
        assert_eq!(set.prune(100_000, 300, 10), vec![7]);
        assert_eq!(set.ids(), vec![3]);
    }

    #[test]
    fn rejects_bad_secret() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        write_private(&path, "[[key]]\nid = 1\ncreated = 0\nsecret = \"AAAA\"\n");
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("must be 32 bytes"), "{e}");
        assert_eq!(e.key.as_deref(), Some("key[0].secret"));
        assert_eq!((e.line, e.column), (Some(4), Some(10)));
        assert!(!e.to_string().contains("AAAA"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn duplicate_ids_and_empty_files_are_placed() {
        let p = Path::new("k.toml");
        let s = URL_SAFE_NO_PAD.encode([1; 32]);
        let text = format!(
            "[[key]]\nid = 4\ncreated = 0\nsecret = \"{s}\"\n[[key]]\nid = 4\ncreated = 1\nsecret = \"{s}\"\n"
        );
        let e = parse(p, &text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("key[1].id"), "{e}");
        assert_eq!(e.line, Some(6));
        assert!(!e.to_string().contains(&s));
        let e = parse(p, "key = []\n").unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("key"), Some(1)), "{e}");
        let e = parse(p, "# nothing\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("key"), "{e}");
        let e = parse(
            p,
            "[[key]]\nid = 1\ncreated = 0\nsecret = \"!!!notbase64\"\n",
        )
        .unwrap_err();
        assert!(
            e.reason.contains("base64url") && !e.to_string().contains("notbase64"),
            "{e}"
        );
    }

    #[test]
    fn symlinked_key_file_is_refused() {
        let dir = tmpdir();
        let real = dir.join("real.toml");
        load_or_create(&real, &mut SeededRandom::new(8), 1000).unwrap();
        let link = dir.join("keys.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = load(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // load_or_create sees the link (it exists) and refuses it too: it is not replaced.
        assert!(load_or_create(&link, &mut SeededRandom::new(9), 1000).is_err());
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn directories_fifos_and_large_files_are_refused() {
        let dir = tmpdir();
        let sub = dir.join("sub");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        let e = load(&sub).unwrap_err().to_string();
        assert!(e.contains("a directory, not a regular file"), "{e}");

        // A FIFO with no writer: opening it for reading would block without O_NONBLOCK.
        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load(&f).map(|_| ()).map_err(|e| e.to_string()));
        });
        let e = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("reading a FIFO must not hang")
            .unwrap_err();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");

        let big = dir.join("big.toml");
        write_private(&big, &"#".repeat(MAX_KEY_FILE_LEN as usize + 1));
        let e = load(&big).unwrap_err().to_string();
        assert!(e.contains("more than the 1048576 allowed"), "{e}");
        let secret = dir.join("secret");
        write_private(&secret, &"s".repeat(MAX_SECRET_FILE_LEN as usize + 1));
        let e = read_private(&secret, "the secret file", MAX_SECRET_FILE_LEN).unwrap_err();
        assert!(e.contains("more than the 65536 allowed"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_owned_by_another_user_is_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to give a file away");
            return;
        }
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        load_or_create(&path, &mut SeededRandom::new(10), 1000).unwrap();
        // Root-owned: accepted.
        assert_eq!(fs::metadata(&path).unwrap().uid(), 0);
        load(&path).unwrap();
        // Owned by another user, in a directory that user does not own: refused.
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        let e = read_private(&path, "the secret file", MAX_SECRET_FILE_LEN).unwrap_err();
        assert!(e.contains("owned by uid 65534"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_created_by_root_gets_the_owner_of_its_directory() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tmpdir();
        let state = dir.join("state");
        fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(65534), Some(65533)).unwrap();
        let path = state.join("keys.toml");
        let owner = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        load_or_create(&path, &mut SeededRandom::new(11), 1000).unwrap();
        assert_eq!(owner(&path), (65534, 65533));
        // Root still reads it (its owner owns the directory) and rotates it; the replacement
        // and the lock file keep the service user as owner.
        load(&path).unwrap();
        let r = rotate(&path, &mut SeededRandom::new(12), 2000, 300, 10).unwrap();
        assert_eq!(r.ids.len(), 2);
        assert_eq!(owner(&path), (65534, 65533));
        assert_eq!(owner(&lock_path(&path)), (65534, 65533));
        // A rotation that creates the file does the same.
        let other = state.join("other.toml");
        let r = rotate(&other, &mut SeededRandom::new(13), 2000, 300, 10).unwrap();
        assert!(r.created);
        assert_eq!(owner(&other), (65534, 65533));
        // A replaced file keeps its previous owner, even if that is not the directory's.
        std::os::unix::fs::chown(&other, Some(0), Some(0)).unwrap();
        rotate(&other, &mut SeededRandom::new(14), 3000, 300, 10).unwrap();
        assert_eq!(owner(&other), (0, 0));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_rotations_all_take_effect() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        let (first, _) = load_or_create(&path, &mut SeededRandom::new(15), 1000).unwrap();
        let first = first.current().id();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut rng = SeededRandom::new(100 + t);
                    (0..12)
                        .map(|_| rotate(&path, &mut rng, 2000, 300, 10).unwrap().id)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let added: Vec<u32> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let set = load(&path).unwrap();
        assert_eq!(set.ids().len(), 1 + added.len(), "a rotation was lost");
        assert!(set.get(first).is_some());
        for id in &added {
            assert!(set.get(*id).is_some(), "key {id} lost");
        }
        // Each rotation's key was current right after it: the last one added is current.
        assert_eq!(*set.ids().last().unwrap(), set.current().id());
        fs::remove_dir_all(dir).unwrap();
    }
}
