//! The configuration file (TOML). Every mistake is reported once, naming the file, line,
//! column and key, before any connection is made; the binary then exits with status 2. No
//! message quotes the file: it may hold the component secret.
//!
//! Each section has a module of its own (`src/config/`), with its raw (serde) form and its
//! validation: `component.rs`, `proxy.rs`, `keys.rs`, `limits.rs` (`[limits]` is read into
//! two parts: the stream reader's limits and the core's rate limits), `policy.rs` and
//! `metrics.rs`. Every numeric key is checked by one range check (`range.rs`), which never
//! shows the value found; every error, here and in the key file, is a [`FileError`];
//! `memory.rs` checks what the sections' limits add up to. [`parse`] puts the sections
//! together.

use std::path::Path;

use serde::Deserialize;
use zeroize::Zeroizing;

mod component;
mod error;
mod keys;
mod limits;
mod memory;
mod metrics;
mod policy;
mod proxy;
mod range;
mod tls;

pub use component::{Component, MAX_SERVERS, SECRET_ENV, SecretSource};
use error::Invalid;
pub use error::{FileError, FileKind};
pub use keys::KeysConfig;
pub use memory::{MEMORY_CEILING, MemoryBound};
pub use metrics::MetricsConfig;
pub use tls::{Server, Tls, client_config, name_text};

use crate::inbound::Limits;
use crate::proxy::Settings;

/// A configuration error (the one error shape of the configuration and the key file).
pub type ConfigError = FileError;

/// A validated configuration: one section per layer, each handed to the layer that uses it.
#[derive(Debug, Clone)]
pub struct Config {
    /// The session's connection to the server (`[component]`, with the probe interval).
    pub component: Component,
    /// The sans-IO core's settings (`[proxy]`, the rate limits of `[limits]`, `[policy]`,
    /// and `[component] keepalive_to`).
    pub proxy: Settings,
    /// The key file (`[keys]`, and the longest token lifetime, for pruning).
    pub keys: KeysConfig,
    /// The stream reader's limits on stanzas (`[limits] max_stanza_bytes` and `max_depth`;
    /// the section's rate limits are the core's, in [`Settings::rate`]).
    pub limits: Limits,
    /// The HTTP listener (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Keys read where they still work but no longer belong, each placed like an error
    /// and saying where the key goes now: for the caller to log as warnings.
    pub deprecated: Vec<FileError>,
}

impl Config {
    /// Reads the secret from its file or the environment (`env` looks variables up). Inline
    /// secrets are already there.
    pub fn resolve_secret(
        &mut self,
        file: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let err =
            |key: &str, reason: String| FileError::new(FileKind::Config, file, Some(key), reason);
        let secret = match &self.component.secret_source {
            SecretSource::Inline => return Ok(()),
            SecretSource::File(f) => {
                let what = format!("the secret file {}", f.display());
                let s = crate::keys::read_private(f, &what, crate::keys::MAX_SECRET_FILE_LEN)
                    .map_err(|m| err("component.secret_file", m))?;
                Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_owned())
            }
            SecretSource::Env => Zeroizing::new(env(SECRET_ENV).ok_or_else(|| {
                err(
                    "component.secret_env",
                    format!("environment variable {SECRET_ENV} is not set"),
                )
            })?),
        };
        if secret.is_empty() {
            return Err(err("component.secret", "the secret is empty".into()));
        }
        self.component.secret = secret;
        Ok(())
    }
}

/// The whole file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    component: component::RawComponent,
    proxy: proxy::RawProxy,
    keys: keys::RawKeys,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    policy: policy::RawPolicy,
    #[serde(default)]
    metrics: metrics::RawMetrics,
}

/// What the key commands read of the file (other sections and keys are not looked at).
#[derive(Deserialize)]
struct RawForKeys {
    keys: keys::RawKeys,
    #[serde(default)]
    proxy: proxy::RawLifetimes,
}

impl Raw {
    /// Each section validated, in the order of the file, then what they must agree on.
    fn validate(self, deprecated: &mut Vec<Invalid>) -> Result<Config, Invalid> {
        let component = self
            .component
            .validate(self.proxy.probe_interval_secs, deprecated)?;
        let target = proxy::target(&self.proxy.target_address, &component.jid)?;
        let keepalive_to = self.component.keepalive_to(&component.jid, &target)?;
        let proxy = self.proxy.validate(target)?;
        let keys = self.keys.validate(proxy.longest_lifetime)?;
        let limits = self.limits.validate()?;
        let policy = self.policy.validate()?;
        let metrics = self.metrics.validate()?;
        MemoryBound {
            servers: component.servers.len(),
            max_stanza_bytes: limits.stanza.max_bytes,
            max_senders: limits.rate.max_senders,
            max_resources: proxy.max_resources,
        }
        .check()?;
        Ok(Config {
            proxy: proxy.into_settings(component.jid.clone(), keepalive_to, limits.rate, policy),
            component,
            keys,
            limits: limits.stanza,
            metrics,
            deprecated: Vec::new(),
        })
    }
}

/// Reads and validates the configuration file. The secret may come from `secret`,
/// `secret_file` (see `keys::read_private` in the source for what that file must be) or, with
/// `secret_env = true`, the environment variable [`SECRET_ENV`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let (text, meta) = read_with_metadata(path)?;
    let mut config = parse(path, &text)?;
    if config.component.secret_source == SecretSource::Inline {
        // The file holds the secret: it must be as private as a secret file (checked on the
        // descriptor it was read from).
        crate::keys::check_private(
            path,
            &meta,
            "the configuration file, which holds the component secret,",
        )
        .map_err(|m| {
            FileError::at(
                FileKind::Config,
                path,
                &text,
                "component.secret",
                format!("{m}; or move the secret to `secret_file`"),
            )
        })?;
    }
    config
        .resolve_secret(path, |name| std::env::var(name).ok())
        .map_err(|e| e.placed(&text))?;
    Ok(config)
}

/// The configuration text, wiped from memory when dropped (it may hold the secret).
fn read(path: &Path) -> Result<Zeroizing<String>, ConfigError> {
    read_with_metadata(path).map(|(text, _)| text)
}

/// The configuration text and what `fstat` says of the file it was read from.
fn read_with_metadata(path: &Path) -> Result<(Zeroizing<String>, std::fs::Metadata), ConfigError> {
    use std::io::Read;
    let cannot = |e: std::io::Error| {
        FileError::new(FileKind::Config, path, None, format!("cannot read: {e}"))
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    // Sized once, so that no unwiped copy is left behind by a reallocation.
    let mut text = Zeroizing::new(String::with_capacity(meta.len() as usize + 1));
    file.read_to_string(&mut text).map_err(cannot)?;
    Ok((text, meta))
}

/// Reads the parts of the configuration file that the key commands need ([`KeysConfig`]).
pub fn load_keys(path: &Path) -> Result<KeysConfig, ConfigError> {
    let text = read(path)?;
    parse_keys(path, &text)
}

/// Validates what [`load_keys`] reads from configuration text.
pub fn parse_keys(path: &Path, text: &str) -> Result<KeysConfig, ConfigError> {
    let raw: RawForKeys =
        toml::from_str(text).map_err(|e| FileError::from_toml(FileKind::Config, path, text, &e))?;
    raw.proxy
        .longest()
        .and_then(|lifetime| raw.keys.validate(lifetime))
        .map_err(|i| FileError::invalid(FileKind::Config, path, text, i))
}

/// Validates configuration text (`path` only names it in errors). Pure: a secret given by
/// `secret_file` or `secret_env` is left for [`Config::resolve_secret`], and keys at a
/// deprecated place are returned in [`Config::deprecated`], not logged.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: Raw =
        toml::from_str(text).map_err(|e| FileError::from_toml(FileKind::Config, path, text, &e))?;
    let place = |i: Invalid| FileError::invalid(FileKind::Config, path, text, i);
    let mut deprecated = Vec::new();
    let mut config = raw.validate(&mut deprecated).map_err(place)?;
    config.deprecated = deprecated.into_iter().map(place).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const GOOD: &str = r#"
[component]
jid = "proxy.localhost"
server = "127.0.0.1:5347"
secret = "s3cret"

[proxy]
target_address = "impl@localhost"

[keys]
file = "/var/lib/jat-proxy/keys.toml"
"#;

    pub(super) fn parse_str(text: &str) -> Result<Config, ConfigError> {
        let mut c = parse(Path::new("test.toml"), text)?;
        c.resolve_secret(Path::new("test.toml"), |_| None)?;
        Ok(c)
    }

    #[test]
    fn documented_example_parses_with_defaults() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.component.jid, "proxy.localhost");
        assert_eq!(c.proxy.target.to_string(), "impl@localhost");
        assert_eq!(c.proxy.token_lifetime, 300);
        assert_eq!(c.proxy.keepalive_to, "localhost");
        assert_eq!(&*c.component.secret, "s3cret");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_str(&GOOD.replace("[proxy]", "[proxy]\ntarget = 1")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.target"), "{e}");
        assert_eq!((e.line, e.column), (Some(8), Some(1)));
        assert!(
            e.reason
                .starts_with("unknown key, expected one of `target_address`")
        );
        assert_eq!(
            e.to_string(),
            format!("config test.toml:8:1: `proxy.target`: {}", e.reason)
        );
    }

    #[test]
    fn wrong_type_is_reported_without_the_value() {
        let e = parse_str(&GOOD.replace("\"s3cret\"", "12345")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config test.toml:5:10: `component.secret`: wrong type, expected a string"
        );
    }

    #[test]
    fn values_found_wrong_after_parsing_are_placed_and_not_quoted() {
        let e =
            parse_str(&GOOD.replace("127.0.0.1:5347", "s3cret-in-the-wrong-place")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("component.server"));
        assert_eq!((e.line, e.column), (Some(4), Some(10)));
        assert!(!e.to_string().contains("s3cret-in"), "{e}");
        let e = parse_str(&format!("{GOOD}\n[limits]\nmax_depth = 1\n")).unwrap_err();
        assert_eq!((e.line, e.column), (Some(14), Some(13)), "{e}");
        let e = parse_str(&format!(
            "{GOOD}\n[policy]\ndeny = [\n  \"ok.example\",\n  \"@@\",\n]\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("policy.deny[1]"));
        assert_eq!((e.line, e.column), (Some(16), Some(3)), "{e}");
        assert!(!e.to_string().contains("@@"), "{e}");
        // A key that is absent is placed at its table.
        let e = parse_str(&GOOD.replace("secret = \"s3cret\"\n", "")).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("component.secret"), Some(2))
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            ("impl@localhost", "localhost", "proxy.target_address"),
            (
                "\"proxy.localhost\"",
                "\"a@proxy.localhost\"",
                "component.jid",
            ),
            ("127.0.0.1:5347", "127.0.0.1", "component.server"),
            ("secret = \"s3cret\"", "secret = \"\"", "component.secret"),
            ("secret = \"s3cret\"", "", "component.secret"),
        ] {
            let e = parse_str(&GOOD.replace(from, to)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
        }
        let e = parse_str(&format!("{GOOD}\n[limits]\nmax_depth = 1\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_depth"));
        let e = parse_str(&format!("{GOOD}\n[limits]\nrate_per_sender = -1.0\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.rate_per_sender"));
        let e = parse_str(&format!(
            "{GOOD}\n[policy]\ndeny = [\"ok.example\", \"@@\"]\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("policy.deny[1]"));
        let proxy = |extra: &str| GOOD.replace("[proxy]", &format!("[proxy]\n{extra}"));
        let e = parse_str(&proxy("resources = [\"focus\", \"a*b\"]")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.resources[1]"), "{e}");
        assert_eq!(e.line, Some(8), "{e}");
        let e = parse_str(&proxy("balance = \"roundrobin\"")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.balance"), "{e}");
        assert!(e.reason.contains("`sticky`"), "{e}");
    }

    #[test]
    fn every_numeric_range_error_has_one_wording() {
        for (section, extra, key) in [
            (
                "component",
                "keepalive_interval_secs = 4",
                "component.keepalive_interval_secs",
            ),
            (
                "component",
                "reconnect_max_secs = 0",
                "component.reconnect_max_secs",
            ),
            (
                "proxy",
                "token_lifetime_secs = 9",
                "proxy.token_lifetime_secs",
            ),
            ("proxy", "max_resources = 0", "proxy.max_resources"),
            ("proxy", "hold_ms = 30001", "proxy.hold_ms"),
            ("proxy", "max_held = 65537", "proxy.max_held"),
            (
                "keys",
                "reload_interval_secs = 0",
                "keys.reload_interval_secs",
            ),
        ] {
            let header = format!("[{section}]");
            let e = parse_str(&GOOD.replace(&header, &format!("{header}\n{extra}"))).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(
                e.reason.starts_with("out of range: must be at least "),
                "{e}"
            );
        }
        for (extra, key) in [
            ("max_depth = 1025", "limits.max_depth"),
            ("rate_per_sender = 0.0", "limits.rate_per_sender"),
            ("rate_burst = 0.5", "limits.rate_burst"),
            ("max_senders = 0", "limits.max_senders"),
            ("rate_per_domain = inf", "limits.rate_per_domain"),
            ("domain_burst = nan", "limits.domain_burst"),
        ] {
            let e = parse_str(&format!("{GOOD}\n[limits]\n{extra}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.reason.starts_with("out of range: must be "), "{e}");
        }
    }
}
