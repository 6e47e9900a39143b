//! The configuration file (TOML). Every mistake is reported once, naming the file, line,
//! column and key, before any connection is made; the binary then exits with status 2. No
//! message quotes the file: it may hold the component secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jid::BareJid;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::inbound::Limits;
use crate::policy::{Entry, Policy};
use crate::proxy::{Balance, Messages, Outbound, Pattern, Selection, Settings};
use crate::rate::RateLimit;
use crate::tomldiag;

/// Name of the environment variable that may hold the component secret.
pub const SECRET_ENV: &str = "JAT_PROXY_SECRET";

/// A validated configuration: one section per layer, each handed to the layer that uses it.
#[derive(Debug, Clone)]
pub struct Config {
    /// The session's connection to the server (`[component]`, and the probe interval).
    pub component: Component,
    /// The sans-IO core's settings (`[proxy]`, the rates of `[limits]`, `[policy]`).
    pub proxy: Settings,
    /// The key file (`[keys]`, and the longest token lifetime, for pruning).
    pub keys: KeysConfig,
    /// The stream reader's limits on stanzas (`[limits]`).
    pub limits: Limits,
    /// The HTTP listener (`[metrics]`).
    pub metrics: MetricsConfig,
}

/// The session's connection to the server.
#[derive(Debug, Clone)]
pub struct Component {
    /// The component's domain, normalised (`proxy.example`).
    pub jid: String,
    /// `host:port` of each XEP-0114 listener the session keeps a connection to, all serving
    /// the component's domain: one server, or every node of an ejabberd cluster (`server`
    /// is a string or a list).
    pub servers: Vec<String>,
    /// The component secret shared with the server (empty until [`Config::resolve_secret`]
    /// when it comes from a file or the environment).
    pub secret: Zeroizing<String>,
    /// Where the secret comes from.
    pub secret_source: SecretSource,
    /// Idle time after which a keepalive ping is sent.
    pub keepalive_interval: Duration,
    /// How long the server may take to answer it before the session is declared dead.
    pub keepalive_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// How often the target's presence is probed (jittered by ±20%; `[proxy]
    /// probe_interval_secs`, a timer of the session).
    pub probe_interval: Duration,
}

/// The HTTP listener of `/metrics` and `/healthz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where they are served (`[metrics] listen`); off if `None`.
    pub listen: Option<std::net::SocketAddr>,
}

/// Where the component secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `secret = "..."` in the configuration.
    Inline,
    /// `secret_file = "..."`.
    File(PathBuf),
    /// `secret_env = true`: the variable [`SECRET_ENV`].
    Env,
}

impl Config {
    /// Reads the secret from its file or the environment (`env` looks variables up). Inline
    /// secrets are already there.
    pub fn resolve_secret(
        &mut self,
        file: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError::new(file, Some(key), message);
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

/// A configuration error: which file, where in it, which key, what is wrong. It never
/// quotes the file.
#[derive(Debug)]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line of the mistake, when it has a place in the file.
    pub line: Option<usize>,
    /// 1-based column of the mistake, when it has a place in the file.
    pub column: Option<usize>,
    /// The dotted key at fault, when one is.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(file: &Path, key: Option<&str>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            line: None,
            column: None,
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }

    /// Places an error that names a key at that key's value in `text` (or, if the key is
    /// absent, at the table that should hold it).
    fn placed(mut self, text: &str) -> ConfigError {
        if self.line.is_none()
            && let Some(key) = &self.key
            && let Some((line, column)) = tomldiag::locate(text, key)
        {
            self.line = Some(line);
            self.column = Some(column);
        }
        self
    }

    fn from_toml(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
        let d = tomldiag::diagnose(text, e);
        ConfigError {
            file: file.to_owned(),
            line: d.line,
            column: d.column,
            key: d.key,
            message: d.message,
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        tomldiag::write_error(
            f,
            "config",
            &self.file,
            self.line,
            self.column,
            self.key.as_deref(),
            &self.message,
        )
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    component: RawComponent,
    proxy: RawProxy,
    keys: RawKeys,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// `server = "host:port"` or `server = ["host:port", ...]`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
enum RawServers {
    One(String),
    Many(Vec<String>),
}

/// Most listeners one instance connects to (a cluster's nodes).
pub const MAX_SERVERS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    jid: String,
    server: RawServers,
    secret: Option<Zeroizing<String>>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    secret_env: bool,
    #[serde(default = "d_keepalive")]
    keepalive_interval_secs: u64,
    #[serde(default = "d_keepalive_timeout")]
    keepalive_timeout_secs: u64,
    keepalive_to: Option<String>,
    #[serde(default = "d_reconnect_max")]
    reconnect_max_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    target_address: String,
    #[serde(default = "d_lifetime")]
    token_lifetime_secs: u64,
    #[serde(default = "d_max_resources")]
    max_resources: usize,
    #[serde(default = "d_probe")]
    probe_interval_secs: u64,
    #[serde(default = "d_hold_ms")]
    hold_ms: u64,
    #[serde(default = "d_max_held")]
    max_held: usize,
    #[serde(default)]
    balance: Balance,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    messages: Messages,
    #[serde(default = "d_message_lifetime")]
    message_token_lifetime_secs: u64,
    #[serde(default)]
    outbound: Outbound,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    file: PathBuf,
    #[serde(default = "d_reload")]
    reload_interval_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "d_max_bytes")]
    max_stanza_bytes: usize,
    #[serde(default = "d_max_depth")]
    max_depth: usize,
    #[serde(default = "d_rate")]
    rate_per_sender: f64,
    #[serde(default = "d_burst")]
    rate_burst: f64,
    #[serde(default = "d_max_senders")]
    max_senders: usize,
    #[serde(default = "d_rate_per_domain")]
    rate_per_domain: f64,
    #[serde(default = "d_domain_burst")]
    domain_burst: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_stanza_bytes: d_max_bytes(),
            max_depth: d_max_depth(),
            rate_per_sender: d_rate(),
            rate_burst: d_burst(),
            max_senders: d_max_senders(),
            rate_per_domain: d_rate_per_domain(),
            domain_burst: d_domain_burst(),
        }
    }
}

fn d_rate() -> f64 {
    RateLimit::default().per_second
}
fn d_burst() -> f64 {
    RateLimit::default().burst
}
fn d_max_senders() -> usize {
    RateLimit::default().max_senders
}
fn d_rate_per_domain() -> f64 {
    RateLimit::default().per_domain
}
fn d_domain_burst() -> f64 {
    RateLimit::default().domain_burst
}

fn d_keepalive() -> u64 {
    60
}
fn d_keepalive_timeout() -> u64 {
    30
}
fn d_reconnect_max() -> u64 {
    10
}
/// Five minutes: longer than the IQ timeouts of common clients and libraries (30–120 s), so
/// a slow but legitimate answer still arrives, and short enough that a captured reply can
/// only be replayed, and an old key must be kept, for a few minutes.
fn d_lifetime() -> u64 {
    300
}
/// A day: a conversation goes on longer than an IQ waits for its answer.
fn d_message_lifetime() -> u64 {
    86400
}
/// Thirty days.
const MAX_MESSAGE_LIFETIME: u64 = 30 * 86400;
fn d_max_resources() -> usize {
    64
}
/// Long enough for a few probes and their answers on a busy server (each answer reaches one
/// of the instances behind ejabberd), short against any client's IQ timeout.
fn d_hold_ms() -> u64 {
    2000
}
fn d_max_held() -> usize {
    256
}
/// Often enough that each of several instances behind ejabberd learns every resource within
/// about a minute; a probe costs the server one presence per resource.
fn d_probe() -> u64 {
    30
}
fn d_reload() -> u64 {
    10
}
fn d_max_bytes() -> usize {
    Limits::default().max_bytes
}
fn d_max_depth() -> usize {
    Limits::default().max_depth
}

/// Reads and validates the configuration file. The secret may come from `secret`,
/// `secret_file` (see [`crate::keys::read_private`] for what that file must be) or, with
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
            ConfigError::new(
                path,
                Some("component.secret"),
                format!("{m}; or move the secret to `secret_file`"),
            )
            .placed(&text)
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
    let cannot = |e: std::io::Error| ConfigError::new(path, None, format!("cannot read: {e}"));
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    // Sized once, so that no unwiped copy is left behind by a reallocation.
    let mut text = Zeroizing::new(String::with_capacity(meta.len() as usize + 1));
    file.read_to_string(&mut text).map_err(cannot)?;
    Ok((text, meta))
}

/// What `jat-proxy keys rotate` and `keys list` need: the `[keys]` section and
/// `[proxy] token_lifetime_secs` (for pruning). Nothing else is read or required, so the key
/// commands work where the component secret cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysConfig {
    /// The key file.
    pub key_file: PathBuf,
    /// How often running instances check the key file.
    pub reload_interval: Duration,
    /// The longest lifetime of the tokens instances seal, in seconds: the IQ token lifetime,
    /// or the message token lifetime when messages are forwarded. A superseded key is kept
    /// that long.
    pub token_lifetime: u64,
}

#[derive(Deserialize)]
struct RawForKeys {
    keys: RawKeys,
    #[serde(default)]
    proxy: RawProxyLifetime,
}

/// Other `[proxy]` keys are ignored here (the full parse checks them).
#[derive(Deserialize)]
struct RawProxyLifetime {
    #[serde(default = "d_lifetime")]
    token_lifetime_secs: u64,
    #[serde(default)]
    messages: Messages,
    #[serde(default = "d_message_lifetime")]
    message_token_lifetime_secs: u64,
}

impl Default for RawProxyLifetime {
    fn default() -> Self {
        RawProxyLifetime {
            token_lifetime_secs: d_lifetime(),
            messages: Messages::default(),
            message_token_lifetime_secs: d_message_lifetime(),
        }
    }
}

/// Reads the parts of the configuration file that the key commands need ([`KeysConfig`]).
pub fn load_keys(path: &Path) -> Result<KeysConfig, ConfigError> {
    let text = read(path)?;
    parse_keys(path, &text)
}

/// Validates what [`load_keys`] reads from configuration text.
pub fn parse_keys(path: &Path, text: &str) -> Result<KeysConfig, ConfigError> {
    let raw: RawForKeys =
        toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, &e))?;
    let err = |key: &str, message: String| ConfigError::new(path, Some(key), message).placed(text);
    Ok(KeysConfig {
        key_file: key_file(&raw.keys, &err)?,
        reload_interval: key_reload_interval(&raw.keys, &err)?,
        token_lifetime: {
            let iq = token_lifetime(raw.proxy.token_lifetime_secs, &err)?;
            match raw.proxy.messages {
                Messages::Refuse => iq,
                Messages::Forward => iq.max(message_lifetime(
                    raw.proxy.message_token_lifetime_secs,
                    &err,
                )?),
            }
        },
    })
}

/// The most memory the limits may let remote senders make jat-proxy use: what
/// [`MemoryBound::bytes`] may reach; the shipped unit's `MemoryMax=256M` less room for the
/// process's own allocator slack.
pub const MEMORY_CEILING: u64 = 224 << 20;

/// What bounds jat-proxy's memory whatever remote senders send (SECURITY.md, "Memory"): the
/// settings in the formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBound {
    /// Streams (`component.server` entries).
    pub servers: usize,
    /// `limits.max_stanza_bytes`.
    pub max_stanza_bytes: usize,
    /// `limits.max_senders`.
    pub max_senders: usize,
    /// `proxy.max_resources`.
    pub max_resources: usize,
}

impl MemoryBound {
    /// The process itself: code, runtime, buffers of its own (measured about 12 MiB).
    pub const BASE: u64 = 16 << 20;
    /// Heap bytes one node of a parsed tree takes at most (measured about 190).
    pub const NODE: u64 = 256;
    /// Output waiting on one stream: the stream is given up past 8 MiB; one more read
    /// (64 KiB) is handled before that is looked at again.
    pub const UNSENT: u64 = 9 << 20;
    /// One rate-limiter entry for an account (a bare JID of up to 2047 bytes and its
    /// buckets), one for its domain (up to 1023 bytes) and one for a token's reply budget,
    /// with the tables' overhead.
    pub const SENDER: u64 = 2048 + 1024 + 768;
    /// One resource of the target (up to 1023 bytes) and its entry.
    pub const RESOURCE: u64 = 1024 + 256;

    /// `BASE + servers × (3 × max_stanza_bytes + UNSENT)` (each stream's partial stanza, its
    /// parser's buffers, sized by the byte limit, and its output) `+ 3 × max_stanza_bytes +
    /// MAX_NODES × NODE` (the one stanza being handled: its bytes, and its tree of at most
    /// twice as many bytes of strings and `MAX_NODES` nodes) `+ MAX_HELD_BYTES` (held
    /// requests, as text) `+ max_senders × SENDER + max_resources × RESOURCE` (the tables).
    pub fn bytes(&self) -> u64 {
        let m = self.max_stanza_bytes as u64;
        Self::BASE
            + self.servers as u64 * (3 * m + Self::UNSENT)
            + 3 * m
            + crate::inbound::MAX_NODES as u64 * Self::NODE
            + crate::proxy::MAX_HELD_BYTES as u64
            + self.max_senders as u64 * Self::SENDER
            + self.max_resources as u64 * Self::RESOURCE
    }

    /// The key of the setting whose term is the largest.
    fn largest_key(&self) -> &'static str {
        let m = self.max_stanza_bytes as u64;
        let streams = self.servers as u64 * Self::UNSENT;
        let stanzas = (3 * self.servers as u64 + 3) * m;
        let senders = self.max_senders as u64 * Self::SENDER;
        if senders >= stanzas && senders >= streams {
            "limits.max_senders"
        } else if stanzas >= streams {
            "limits.max_stanza_bytes"
        } else {
            "component.server"
        }
    }
}

fn in_range<E>(
    err: &impl Fn(&str, String) -> E,
    key: &str,
    v: u64,
    min: u64,
    max: u64,
) -> Result<Duration, E> {
    if (min..=max).contains(&v) {
        Ok(Duration::from_secs(v))
    } else {
        Err(err(key, format!("out of range {min}..={max}")))
    }
}

fn key_file<E>(keys: &RawKeys, err: &impl Fn(&str, String) -> E) -> Result<PathBuf, E> {
    if keys.file.as_os_str().is_empty() || keys.file.file_name().is_none() {
        return Err(err("keys.file", "must be the path of a file".into()));
    }
    Ok(keys.file.clone())
}

fn key_reload_interval<E>(keys: &RawKeys, err: &impl Fn(&str, String) -> E) -> Result<Duration, E> {
    in_range(
        err,
        "keys.reload_interval_secs",
        keys.reload_interval_secs,
        1,
        3600,
    )
}

fn token_lifetime<E>(v: u64, err: &impl Fn(&str, String) -> E) -> Result<u64, E> {
    Ok(in_range(err, "proxy.token_lifetime_secs", v, 10, 86400)?.as_secs())
}

fn message_lifetime<E>(v: u64, err: &impl Fn(&str, String) -> E) -> Result<u64, E> {
    let key = "proxy.message_token_lifetime_secs";
    Ok(in_range(err, key, v, 10, MAX_MESSAGE_LIFETIME)?.as_secs())
}

/// Validates configuration text (`path` only names it in errors). Pure: a secret given by
/// `secret_file` or `secret_env` is left for [`Config::resolve_secret`].
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let err = |key: &str, message: String| ConfigError::new(path, Some(key), message).placed(text);
    let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, &e))?;

    let jid = BareJid::new(&raw.component.jid)
        .ok()
        .filter(|j| j.node().is_none())
        .ok_or_else(|| {
            err(
                "component.jid",
                "not a domain (expected e.g. \"proxy.example\")".into(),
            )
        })?
        .to_string();

    let (servers, listed) = match &raw.component.server {
        RawServers::One(s) => (vec![s.clone()], false),
        RawServers::Many(v) => (v.clone(), true),
    };
    if servers.is_empty() || servers.len() > MAX_SERVERS {
        return Err(err(
            "component.server",
            format!("give one to {MAX_SERVERS} listeners (host:port)"),
        ));
    }
    for (i, server) in servers.iter().enumerate() {
        let key = if listed {
            format!("component.server[{i}]")
        } else {
            "component.server".to_owned()
        };
        match server.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(err(
                    &key,
                    "not host:port (expected e.g. \"127.0.0.1:5347\")".into(),
                ));
            }
        }
        if servers[..i].contains(server) {
            return Err(err(&key, "listed twice".into()));
        }
    }

    let c = &raw.component;
    let given = [c.secret.is_some(), c.secret_file.is_some(), c.secret_env]
        .iter()
        .filter(|b| **b)
        .count();
    if given != 1 {
        return Err(err(
            "component.secret",
            format!(
                "give exactly one of `secret`, `secret_file`, or `secret_env = true` \
                 (reads {SECRET_ENV}); found {given}"
            ),
        ));
    }
    let (secret, secret_source) = match (&c.secret, &c.secret_file) {
        (Some(s), _) => (s.clone(), SecretSource::Inline),
        (None, Some(f)) => (Zeroizing::new(String::new()), SecretSource::File(f.clone())),
        (None, None) => (Zeroizing::new(String::new()), SecretSource::Env),
    };
    if secret_source == SecretSource::Inline && secret.is_empty() {
        return Err(err("component.secret", "the secret is empty".into()));
    }

    let secs = |key: &str, v: u64, min: u64, max: u64| in_range(&err, key, v, min, max);
    let keepalive_interval = secs(
        "component.keepalive_interval_secs",
        c.keepalive_interval_secs,
        5,
        3600,
    )?;
    let keepalive_timeout = secs(
        "component.keepalive_timeout_secs",
        c.keepalive_timeout_secs,
        1,
        600,
    )?;
    let reconnect_max = secs(
        "component.reconnect_max_secs",
        c.reconnect_max_secs,
        1,
        3600,
    )?;

    let target = BareJid::new(&raw.proxy.target_address)
        .ok()
        .filter(|j| j.node().is_some())
        .ok_or_else(|| {
            err(
                "proxy.target_address",
                "not an account address (expected e.g. \"impl@example\")".into(),
            )
        })?;
    if target.domain().as_str() == jid {
        return Err(err(
            "proxy.target_address",
            "must not be at the component's own domain".into(),
        ));
    }
    let keepalive_to = match &c.keepalive_to {
        Some(d) => BareJid::new(d)
            .ok()
            .filter(|j| j.node().is_none() && j.domain().as_str() != jid)
            .ok_or_else(|| {
                err(
                    "component.keepalive_to",
                    "not a server domain other than the component's".into(),
                )
            })?
            .to_string(),
        None => target.domain().to_string(),
    };
    let probe_interval = secs(
        "proxy.probe_interval_secs",
        raw.proxy.probe_interval_secs,
        1,
        86400,
    )?;
    let token_lifetime = token_lifetime(raw.proxy.token_lifetime_secs, &err)?;
    if !(1..=4096).contains(&raw.proxy.max_resources) {
        return Err(err("proxy.max_resources", "out of range 1..=4096".into()));
    }
    if raw.proxy.hold_ms > 30_000 {
        return Err(err("proxy.hold_ms", "out of range 0..=30000".into()));
    }
    if raw.proxy.max_held > 65_536 {
        return Err(err("proxy.max_held", "out of range 0..=65536".into()));
    }
    if raw.proxy.resources.len() > 256 {
        return Err(err("proxy.resources", "more than 256 patterns".into()));
    }
    let patterns = raw
        .proxy
        .resources
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Pattern::new(p).map_err(|e| err(&format!("proxy.resources[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let selection = Selection {
        balance: raw.proxy.balance,
        patterns,
    };
    let message_token_lifetime = message_lifetime(raw.proxy.message_token_lifetime_secs, &err)?;
    let key_file = key_file(&raw.keys, &err)?;
    let key_reload_interval = key_reload_interval(&raw.keys, &err)?;
    let l = &raw.limits;
    // At most 16 MiB: the parser sizes its buffers by this limit (and reallocates one at
    // every entity reference), which must stay a heap allocation, not an mmap per reference.
    if !(4096..=16 * 1024 * 1024).contains(&l.max_stanza_bytes) {
        return Err(err(
            "limits.max_stanza_bytes",
            "out of range 4096..=16777216".into(),
        ));
    }
    if !(4..=1024).contains(&l.max_depth) {
        return Err(err("limits.max_depth", "out of range 4..=1024".into()));
    }

    if !(l.rate_per_sender.is_finite() && l.rate_per_sender > 0.0 && l.rate_per_sender <= 1e6) {
        return Err(err(
            "limits.rate_per_sender",
            "not a rate in (0, 1000000] requests per second".into(),
        ));
    }
    if !(l.rate_burst.is_finite() && (1.0..=1e6).contains(&l.rate_burst)) {
        return Err(err("limits.rate_burst", "out of range 1..=1000000".into()));
    }
    if !(1..=10_000_000).contains(&l.max_senders) {
        return Err(err(
            "limits.max_senders",
            "out of range 1..=10000000".into(),
        ));
    }
    if !(l.rate_per_domain.is_finite() && l.rate_per_domain > 0.0 && l.rate_per_domain <= 1e6) {
        return Err(err(
            "limits.rate_per_domain",
            "not a rate in (0, 1000000] requests per second".into(),
        ));
    }
    if !(l.domain_burst.is_finite() && (1.0..=1e6).contains(&l.domain_burst)) {
        return Err(err(
            "limits.domain_burst",
            "out of range 1..=1000000".into(),
        ));
    }
    let list = |key: &str, items: &[String]| -> Result<Vec<Entry>, ConfigError> {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Entry::parse(s).ok_or_else(|| {
                    err(
                        &format!("{key}[{i}]"),
                        "neither a domain nor an account address".into(),
                    )
                })
            })
            .collect()
    };
    let policy = Policy {
        allow: list("policy.allow", &raw.policy.allow)?,
        deny: list("policy.deny", &raw.policy.deny)?,
    };
    // An IP address and a port, no host name: what is listened on must not depend on DNS.
    let metrics_listen = match &raw.metrics.listen {
        None => None,
        Some(a) => Some(
            a.parse::<std::net::SocketAddr>()
                .ok()
                .filter(|a| a.port() != 0)
                .ok_or_else(|| {
                    err(
                        "metrics.listen",
                        "not an IP address and port (expected e.g. \"127.0.0.1:9798\")".into(),
                    )
                })?,
        ),
    };

    let keys_lifetime = match raw.proxy.messages {
        Messages::Refuse => token_lifetime,
        Messages::Forward => token_lifetime.max(message_token_lifetime),
    };
    let bound = MemoryBound {
        servers: servers.len(),
        max_stanza_bytes: l.max_stanza_bytes,
        max_senders: l.max_senders,
        max_resources: raw.proxy.max_resources,
    };
    if bound.bytes() > MEMORY_CEILING {
        return Err(err(
            bound.largest_key(),
            format!(
                "these limits let remote senders make jat-proxy use up to {} MiB, over the {} MiB \
                 it may use under the shipped unit's MemoryMax=256M (SECURITY.md, \"Memory\"): \
                 lower limits.max_senders, limits.max_stanza_bytes or the number of servers",
                bound.bytes() >> 20,
                MEMORY_CEILING >> 20
            ),
        ));
    }
    Ok(Config {
        component: Component {
            jid: jid.clone(),
            servers,
            secret,
            secret_source,
            keepalive_interval,
            keepalive_timeout,
            reconnect_max,
            probe_interval,
        },
        proxy: Settings {
            component: jid,
            target,
            token_lifetime,
            max_resources: raw.proxy.max_resources,
            keepalive_to,
            rate: RateLimit {
                per_second: l.rate_per_sender,
                burst: l.rate_burst,
                max_senders: l.max_senders,
                per_domain: l.rate_per_domain,
                domain_burst: l.domain_burst,
            },
            policy,
            hold_ms: raw.proxy.hold_ms,
            max_held: raw.proxy.max_held,
            selection,
            messages: raw.proxy.messages,
            message_token_lifetime,
            outbound: raw.proxy.outbound,
        },
        keys: KeysConfig {
            key_file,
            reload_interval: key_reload_interval,
            token_lifetime: keys_lifetime,
        },
        limits: Limits {
            max_bytes: l.max_stanza_bytes,
            max_depth: l.max_depth,
            max_nodes: crate::inbound::MAX_NODES,
        },
        metrics: MetricsConfig {
            listen: metrics_listen,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[component]
jid = "proxy.localhost"
server = "127.0.0.1:5347"
secret = "s3cret"

[proxy]
target_address = "impl@localhost"

[keys]
file = "/var/lib/jat-proxy/keys.toml"
"#;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        let mut c = parse(Path::new("test.toml"), text)?;
        c.resolve_secret(Path::new("test.toml"), |_| None)?;
        Ok(c)
    }

    #[test]
    fn no_error_shows_a_configured_value() {
        for (extra, key) in [
            ("rate_per_domain = 7654321.5", "limits.rate_per_domain"),
            ("domain_burst = 7654321.5", "limits.domain_burst"),
            ("rate_per_sender = 7654321.5", "limits.rate_per_sender"),
            ("rate_burst = 7654321.5", "limits.rate_burst"),
            ("max_senders = 7654321000", "limits.max_senders"),
            ("max_stanza_bytes = 7654321000", "limits.max_stanza_bytes"),
        ] {
            let e = parse_str(&format!("{GOOD}\n[limits]\n{extra}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key));
            assert!(!e.to_string().contains("7654321"), "{e}");
        }
    }

    #[test]
    fn limits_that_would_let_senders_past_memory_max_are_refused() {
        // The defaults: well within, with room for the process (SECURITY.md's figure).
        let c = parse_str(GOOD).unwrap();
        let defaults = MemoryBound {
            servers: c.component.servers.len(),
            max_stanza_bytes: c.limits.max_bytes,
            max_senders: c.proxy.rate.max_senders,
            max_resources: c.proxy.max_resources,
        };
        assert_eq!(defaults.bytes() >> 20, 72, "SECURITY.md states it");
        // Each of the largest terms alone.
        let e = parse_str(&format!("{GOOD}\n[limits]\nmax_senders = 10000000\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_senders"));
        assert!(e.message.contains("MemoryMax"), "{}", e.message);
        let servers = |n: usize, extra: &str| {
            let list: Vec<String> = (0..n)
                .map(|i| format!("\"127.0.0.1:{}\"", 5000 + i))
                .collect();
            let text = GOOD.replace(
                "server = \"127.0.0.1:5347\"",
                &format!("server = [{}]", list.join(", ")),
            );
            parse_str(&format!("{text}\n[limits]\n{extra}\n"))
        };
        // The largest stanzas on one stream, or the default on twelve: allowed.
        parse_str(&format!("{GOOD}\n[limits]\nmax_stanza_bytes = 16777216\n")).unwrap();
        servers(12, "").unwrap();
        let e = servers(16, "").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("component.server"));
        let e = servers(4, "max_stanza_bytes = 16777216").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_stanza_bytes"));
        let e = servers(16, "max_stanza_bytes = 1048576").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("component.server"));
        // What the default allows at most, and one more.
        let most = (MEMORY_CEILING
            - MemoryBound {
                max_senders: 0,
                ..defaults
            }
            .bytes())
            / MemoryBound::SENDER;
        parse_str(&format!("{GOOD}\n[limits]\nmax_senders = {most}\n")).unwrap();
        parse_str(&format!("{GOOD}\n[limits]\nmax_senders = {}\n", most + 1)).unwrap_err();
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
            e.message
                .starts_with("unknown key, expected one of `target_address`")
        );
        assert_eq!(
            e.to_string(),
            format!("config test.toml:8:1: `proxy.target`: {}", e.message)
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
    fn key_commands_need_only_the_keys_section() {
        let only = "[keys]\nfile = \"/k.toml\"\n";
        let k = parse_keys(Path::new("t"), only).unwrap();
        assert_eq!(k.key_file, Path::new("/k.toml"));
        assert_eq!(k.token_lifetime, 300);
        assert_eq!(k.reload_interval, Duration::from_secs(10));
        assert!(parse(Path::new("t"), only).is_err());
        // Incomplete or unresolvable other sections do not matter; the lifetime does.
        let text = GOOD
            .replace("secret = \"s3cret\"", "secret_env = true\nbogus = 1")
            .replace(
                "target_address = \"impl@localhost\"",
                "token_lifetime_secs = 600",
            );
        let k = parse_keys(Path::new("t"), &text).unwrap();
        assert_eq!(k.token_lifetime, 600);
        let e = parse_keys(Path::new("t"), &text.replace("600", "5")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.token_lifetime_secs"));
        let e = parse_keys(Path::new("t"), "[proxy]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("keys"), "{e}");
        let e =
            parse_keys(Path::new("t"), &format!("{GOOD}reload_interval_secs = 0\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("keys.reload_interval_secs"), "{e}");
    }

    #[test]
    fn server_is_one_listener_or_a_list() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.component.servers, ["127.0.0.1:5347"]);
        let two = GOOD.replace(
            "server = \"127.0.0.1:5347\"",
            "server = [\"127.0.0.1:5347\", \"10.0.0.2:5347\"]",
        );
        let c = parse_str(&two).unwrap();
        assert_eq!(c.component.servers, ["127.0.0.1:5347", "10.0.0.2:5347"]);
        for (to, key, line, says) in [
            (
                "server = [\"127.0.0.1:5347\",\n  \"nope\"]",
                "component.server[1]",
                5,
                "not host:port",
            ),
            (
                "server = [\"127.0.0.1:5347\", \"127.0.0.1:5347\"]",
                "component.server[1]",
                4,
                "listed twice",
            ),
            ("server = []", "component.server", 4, "give one to 16"),
            (
                "server = 5347",
                "component.server",
                4,
                "a string or a list of strings",
            ),
        ] {
            let e = parse_str(&GOOD.replace("server = \"127.0.0.1:5347\"", to)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
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
        assert!(e.message.contains("`sticky`"), "{e}");
    }

    #[test]
    fn selection() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.proxy.selection, Selection::default());
        let text = GOOD.replace(
            "[proxy]",
            "[proxy]\nbalance = \"sticky\"\nresources = [\"focus\", \"worker-*\"]",
        );
        let c = parse_str(&text).unwrap();
        assert_eq!(c.proxy.selection.balance, Balance::Sticky);
        assert!(c.proxy.selection.admits("focus") && c.proxy.selection.admits("worker-7"));
        assert!(!c.proxy.selection.admits("phone") && !c.proxy.selection.admits("focus2"));
    }

    #[test]
    fn metrics_listener_is_off_unless_set() {
        assert_eq!(parse_str(GOOD).unwrap().metrics.listen, None);
        let c = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:9798\"\n")).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9798".parse().unwrap()));
        let c = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"[::1]:9798\"\n")).unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:9798".parse().unwrap()));
        assert_eq!(
            parse_str(&format!("{GOOD}\n[metrics]\n"))
                .unwrap()
                .metrics
                .listen,
            None
        );
        for bad in [
            "localhost:9798",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:99999",
        ] {
            let e = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"{bad}\"\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("metrics.listen"), "{e}");
            assert_eq!((e.line, e.column), (Some(14), Some(10)), "{e}");
        }
        let e = parse_str(&format!("{GOOD}\n[metrics]\nport = 1\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("metrics.port"), "{e}");
        let e = parse_str(&format!("{GOOD}\n[metrics]\nlisten = 9798\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("metrics.listen"), "{e}");
    }

    #[test]
    fn secret_from_environment() {
        let text = GOOD.replace("secret = \"s3cret\"", "secret_env = true");
        let mut c = parse(Path::new("t"), &text).unwrap();
        c.resolve_secret(Path::new("t"), |n| {
            (n == SECRET_ENV).then(|| "from-env".to_owned())
        })
        .unwrap();
        assert_eq!(&*c.component.secret, "from-env");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("component.secret_env"));
    }
}
