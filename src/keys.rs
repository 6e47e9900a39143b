//! Token keys and the key file that holds them.
//!
//! Every instance serving one component domain reads the same key file, so a token made by
//! one instance (or by a process that has since been killed) is opened by any other. The file
//! is the only persistent state jat-proxy has; it is written atomically (temporary file, then
//! rename or link) so that a reader never sees half of it.
//!
//! A key is 256 bits from the system CSPRNG. The key with the highest id is *current*: new
//! tokens use it. Older keys only open tokens; once every token they can have issued has
//! expired they are pruned (see [`KeySet::prune`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hkdf;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::random::Random;

/// Length of a key's secret in bytes.
pub const SECRET_LEN: usize = 32;

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

/// The keys of one key file, ordered by id; never empty.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// A new set with one fresh key (id 1).
    pub fn generate(rng: &mut dyn Random, now: u64) -> KeySet {
        KeySet {
            keys: vec![fresh_key(1, now, rng)],
        }
    }

    /// A set from raw secrets, for tests, benchmarks and the fuzzer: `(id, created, secret)`.
    pub fn from_secrets(secrets: &[(u32, u64, [u8; SECRET_LEN])]) -> Option<KeySet> {
        let mut keys: Vec<Key> = secrets
            .iter()
            .map(|&(id, created, secret)| Key::from_secret(id, created, secret))
            .collect();
        keys.sort_by_key(|k| k.id);
        if keys.is_empty() || keys.windows(2).any(|w| w[0].id == w[1].id) {
            return None;
        }
        Some(KeySet { keys })
    }

    /// The key new tokens are sealed with: the one with the highest id.
    pub fn current(&self) -> &Key {
        self.keys.last().expect("a key set is never empty")
    }

    /// The key with this id, if the set still has it.
    pub fn get(&self, id: u32) -> Option<&Key> {
        self.keys
            .binary_search_by_key(&id, |k| k.id)
            .ok()
            .map(|i| &self.keys[i])
    }

    /// Ids of all keys, oldest first.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Adds a new current key. Older keys stay, so tokens they sealed still open.
    pub fn rotate(&mut self, rng: &mut dyn Random, now: u64) -> u32 {
        let id = self.current().id.checked_add(1).expect("2^32 rotations");
        self.keys.push(fresh_key(id, now, rng));
        id
    }

    /// Removes keys that can no longer have a valid token outstanding.
    ///
    /// A key stops sealing when its successor is created (instances pick the successor up
    /// within their reload interval, `reload_grace`). Its last tokens then live for
    /// `token_lifetime`. Past both, plus `clock_skew` between instances, it is dropped.
    /// Returns the ids removed.
    pub fn prune(&mut self, now: u64, token_lifetime: u64, reload_grace: u64) -> Vec<u32> {
        let mut removed = Vec::new();
        let horizon = token_lifetime
            .saturating_add(reload_grace)
            .saturating_add(crate::token::MAX_CLOCK_SKEW);
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
        removed
    }
}

fn fresh_key(id: u32, now: u64, rng: &mut dyn Random) -> Key {
    let mut secret = [0u8; SECRET_LEN];
    rng.fill(&mut secret);
    let key = Key::from_secret(id, now, secret);
    secret.zeroize();
    key
}

/// What went wrong with the key file; the message names the file.
#[derive(Debug)]
pub struct KeyFileError {
    /// The key file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key file {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for KeyFileError {}

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
# Add a key with `jat-proxy keys rotate --config FILE`; never edit secrets by hand.

";

/// Refuses a file that group or others may read or write, as ssh does with private keys.
pub fn check_private(path: &Path, what: &str) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {what}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// Reads the key file, refusing one that is readable by group or others.
pub fn load(path: &Path) -> Result<KeySet, KeyFileError> {
    let err = |reason: String| KeyFileError {
        path: path.to_owned(),
        reason,
    };
    check_private(path, "the key file").map_err(err)?;
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let repr: FileRepr = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut secrets = Vec::with_capacity(repr.keys.len());
    for k in &repr.keys {
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(k.secret.as_bytes())
                .map_err(|e| err(format!("key {}: secret is not base64url: {e}", k.id)))?,
        );
        let secret: [u8; SECRET_LEN] = bytes.as_slice().try_into().map_err(|_| {
            err(format!(
                "key {}: secret must be {SECRET_LEN} bytes, found {}",
                k.id,
                bytes.len()
            ))
        })?;
        secrets.push((k.id, k.created, secret));
    }
    let set = KeySet::from_secrets(&secrets);
    for (_, _, s) in &mut secrets {
        s.zeroize();
    }
    set.ok_or_else(|| err("no keys, or two keys with the same id".into()))
}

/// Reads the key file, or creates it (mode 0600) with one fresh key if it does not exist.
///
/// Several instances may start at once on a new shared file: the file is written in full
/// under a temporary name and linked into place only if no other instance got there first,
/// in which case that instance's keys are read and used.
pub fn load_or_create(
    path: &Path,
    rng: &mut dyn Random,
    now: u64,
) -> Result<(KeySet, bool), KeyFileError> {
    match fs::symlink_metadata(path) {
        Ok(_) => return load(path).map(|k| (k, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(KeyFileError {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    }
    let set = KeySet::generate(rng, now);
    match write_new(path, &set, rng, false) {
        Ok(()) => Ok((set, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load(path).map(|k| (k, false)),
        Err(e) => Err(KeyFileError {
            path: path.to_owned(),
            reason: format!("cannot create: {e}"),
        }),
    }
}

/// Writes the set over the key file, atomically (the old file stays whole until the rename).
pub fn save(path: &Path, set: &KeySet, rng: &mut dyn Random) -> Result<(), KeyFileError> {
    write_new(path, set, rng, true).map_err(|e| KeyFileError {
        path: path.to_owned(),
        reason: format!("cannot write: {e}"),
    })
}

fn write_new(path: &Path, set: &KeySet, rng: &mut dyn Random, replace: bool) -> io::Result<()> {
    let repr = FileRepr {
        keys: set
            .keys
            .iter()
            .map(|k| KeyRepr {
                id: k.id,
                created: k.created,
                secret: Zeroizing::new(URL_SAFE_NO_PAD.encode(&k.secret[..])),
            })
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
            .open(&tmp)?;
        f.write_all(FILE_HEADER.as_bytes())?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        drop(f);
        if replace {
            keep_owner(path, &tmp)?;
            fs::rename(&tmp, path)
        } else {
            // link() fails with AlreadyExists instead of replacing: first writer wins.
            fs::hard_link(&tmp, path)
        }
    })();
    let _ = fs::remove_file(&tmp);
    if result.is_ok()
        && let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
    result
}

/// A rotation run as root must not leave the file unreadable to the service's own user:
/// the replacement takes the owner of the file it replaces.
fn keep_owner(old: &Path, new: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(old_meta) = fs::metadata(old) else {
        return Ok(());
    };
    let new_meta = fs::metadata(new)?;
    if (old_meta.uid(), old_meta.gid()) == (new_meta.uid(), new_meta.gid()) {
        return Ok(());
    }
    std::os::unix::fs::chown(new, Some(old_meta.uid()), Some(old_meta.gid())).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot give the new key file the owner of the old one (uid {}): {e}; \
                 run the rotation as that user or as root",
                old_meta.uid()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRandom;

    fn tmpdir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("jat-keys-{}-{n}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
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
    fn rotate_then_prune_after_lifetime() {
        let mut rng = SeededRandom::new(3);
        let mut set = KeySet::generate(&mut rng, 1000);
        assert_eq!(set.rotate(&mut rng, 5000), 2);
        assert_eq!(set.current().id(), 2);
        assert!(set.get(1).is_some());
        // Key 1 may have sealed tokens until 5000 (+ reload grace); they live 300 s.
        assert!(set.prune(5000 + 300, 300, 10).is_empty());
        assert_eq!(
            set.prune(5000 + 300 + 10 + crate::token::MAX_CLOCK_SKEW + 1, 300, 10),
            vec![1]
        );
        assert_eq!(set.ids(), vec![2]);
    }

    #[test]
    fn rejects_bad_secret() {
        let dir = tmpdir();
        let path = dir.join("keys.toml");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(b"[[key]]\nid = 1\ncreated = 0\nsecret = \"AAAA\"\n")
            .unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("must be 32 bytes"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }
}
