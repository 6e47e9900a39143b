//! `[component]`: the session's connection to the server, and the probe interval (a timer of
//! the session, read from `[proxy]` too, where it used to be).

use std::path::PathBuf;
use std::time::Duration;

use jid::BareJid;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::error::Invalid;
use super::range;
use super::tls::{RawServer, Server};

/// Name of the environment variable that may hold the component secret.
pub const SECRET_ENV: &str = "JAT_PROXY_SECRET";

/// Most listeners one instance connects to (a cluster's nodes).
pub const MAX_SERVERS: usize = 16;

/// The session's connection to the server.
#[derive(Debug, Clone)]
pub struct Component {
    /// The component's domain, normalised (`proxy.example`).
    pub jid: String,
    /// Each XEP-0114 listener the session keeps a connection to (`host:port`, and TLS if
    /// configured), all serving the component's domain: one server, or every node of an
    /// ejabberd cluster (`server` is an entry or a list of entries).
    pub servers: Vec<Server>,
    /// The component secret shared with the server (empty until
    /// [`Config::resolve_secret`](super::Config::resolve_secret) when it comes from a file or
    /// the environment).
    pub secret: Zeroizing<String>,
    /// Where the secret comes from.
    pub secret_source: SecretSource,
    /// Idle time after which a keepalive ping is sent.
    pub keepalive_interval: Duration,
    /// How long the server may take to answer it before the session is declared dead.
    pub keepalive_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// How often the target's presence is probed (jittered by ±20%; `[component]
    /// probe_interval_secs`, formerly `[proxy]`, a timer of the session).
    pub probe_interval: Duration,
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

/// `[component]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawComponent {
    jid: String,
    /// `"host:port"`, a table (`{ address = "host:port", tls = true, ... }`), or a list of
    /// either (read by [`RawServer::read`], which names the entry at fault).
    server: toml::Value,
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
    /// Default [`d_probe`], unless given in `[proxy]` (its old place).
    probe_interval_secs: Option<u64>,
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
/// Often enough that each of several instances behind ejabberd learns every resource within
/// about a minute; a probe costs the server one presence per resource.
fn d_probe() -> u64 {
    30
}

impl RawComponent {
    /// The validated section. `probe_in_proxy` is `[proxy] probe_interval_secs`, the old
    /// place of `probe_interval_secs`: still read, with a note in `deprecated`.
    pub(super) fn validate(
        &self,
        probe_in_proxy: Option<u64>,
        deprecated: &mut Vec<Invalid>,
    ) -> Result<Component, Invalid> {
        let jid = BareJid::new(&self.jid)
            .ok()
            .filter(|j| j.node().is_none())
            .ok_or_else(|| {
                Invalid::new(
                    "component.jid",
                    "not a domain (expected e.g. \"proxy.example\")",
                )
            })?
            .to_string();
        let servers = self.servers(&jid)?;
        let (secret, secret_source) = self.secret()?;
        Ok(Component {
            jid,
            servers,
            secret,
            secret_source,
            keepalive_interval: range::secs(
                "component.keepalive_interval_secs",
                self.keepalive_interval_secs,
                5..=3600,
            )?,
            keepalive_timeout: range::secs(
                "component.keepalive_timeout_secs",
                self.keepalive_timeout_secs,
                1..=600,
            )?,
            reconnect_max: range::secs(
                "component.reconnect_max_secs",
                self.reconnect_max_secs,
                1..=3600,
            )?,
            probe_interval: probe_interval(self.probe_interval_secs, probe_in_proxy, deprecated)?,
        })
    }

    fn servers(&self, domain: &str) -> Result<Vec<Server>, Invalid> {
        const KEY: &str = "component.server";
        let entries: Vec<(String, &toml::Value)> = match &self.server {
            toml::Value::Array(v) => v
                .iter()
                .enumerate()
                .map(|(i, e)| (format!("{KEY}[{i}]"), e))
                .collect(),
            toml::Value::String(_) | toml::Value::Table(_) => vec![(KEY.to_owned(), &self.server)],
            _ => {
                return Err(Invalid::new(
                    KEY,
                    "wrong type, expected a string (host:port), a table with `address`, or a list of them",
                ));
            }
        };
        if entries.is_empty() || entries.len() > MAX_SERVERS {
            return Err(Invalid::new(
                KEY,
                format!("give one to {MAX_SERVERS} listeners (host:port)"),
            ));
        }
        let mut servers: Vec<Server> = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            let raw = RawServer::read(value, key)?;
            let address = raw.address();
            let at = if matches!(raw, RawServer::Table(_)) {
                format!("{key}.address")
            } else {
                key.clone()
            };
            match address.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => {
                    return Err(Invalid::new(
                        at,
                        "not host:port (expected e.g. \"127.0.0.1:5347\")",
                    ));
                }
            }
            if servers.iter().any(|s| s.address == address) {
                return Err(Invalid::new(at, "listed twice"));
            }
            servers.push(raw.validate(key, domain)?);
        }
        Ok(servers)
    }

    fn secret(&self) -> Result<(Zeroizing<String>, SecretSource), Invalid> {
        let given = [
            self.secret.is_some(),
            self.secret_file.is_some(),
            self.secret_env,
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(Invalid::new(
                "component.secret",
                format!(
                    "give exactly one of `secret`, `secret_file`, or `secret_env = true` \
                     (reads {SECRET_ENV}); found {given}"
                ),
            ));
        }
        let (secret, source) = match (&self.secret, &self.secret_file) {
            (Some(s), _) => (s.clone(), SecretSource::Inline),
            (None, Some(f)) => (Zeroizing::new(String::new()), SecretSource::File(f.clone())),
            (None, None) => (Zeroizing::new(String::new()), SecretSource::Env),
        };
        if source == SecretSource::Inline && secret.is_empty() {
            return Err(Invalid::new("component.secret", "the secret is empty"));
        }
        Ok((secret, source))
    }

    /// Where keepalive pings go: `keepalive_to`, a server domain other than the component's
    /// own (`jid`), or by default the target's domain. (The core sends them, so this goes to
    /// [`Settings`](crate::proxy::Settings).)
    pub(super) fn keepalive_to(&self, jid: &str, target: &BareJid) -> Result<String, Invalid> {
        match &self.keepalive_to {
            Some(d) => Ok(BareJid::new(d)
                .ok()
                .filter(|j| j.node().is_none() && j.domain().as_str() != jid)
                .ok_or_else(|| {
                    Invalid::new(
                        "component.keepalive_to",
                        "not a server domain other than the component's",
                    )
                })?
                .to_string()),
            None => Ok(target.domain().to_string()),
        }
    }
}

/// `probe_interval_secs` from `[component]`, or from `[proxy]` (its old place, noted in
/// `deprecated`), or the default; given in both is a mistake.
fn probe_interval(
    in_component: Option<u64>,
    in_proxy: Option<u64>,
    deprecated: &mut Vec<Invalid>,
) -> Result<Duration, Invalid> {
    const KEY: &str = "component.probe_interval_secs";
    const OLD_KEY: &str = "proxy.probe_interval_secs";
    let (key, secs) = match (in_component, in_proxy) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                OLD_KEY,
                format!("also given as `{KEY}`: keep only that one"),
            ));
        }
        (Some(s), None) => (KEY, s),
        (None, Some(s)) => {
            deprecated.push(Invalid::new(
                OLD_KEY,
                format!(
                    "deprecated: the probe interval is a timer of the session; move it to \
                     [component] as `{KEY}` (still read here until then)"
                ),
            ));
            (OLD_KEY, s)
        }
        (None, None) => (KEY, d_probe()),
    };
    range::secs(key, secs, 1..=86400)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::{GOOD, parse_str};
    use super::super::{SECRET_ENV, parse};

    #[test]
    fn server_is_one_listener_or_a_list() {
        let c = parse_str(GOOD).unwrap();
        let addresses = |c: &super::super::Config| -> Vec<String> {
            c.component
                .servers
                .iter()
                .map(|s| s.address.clone())
                .collect()
        };
        assert_eq!(addresses(&c), ["127.0.0.1:5347"]);
        assert!(c.component.servers[0].tls.is_none());
        let two = GOOD.replace(
            "server = \"127.0.0.1:5347\"",
            "server = [\"127.0.0.1:5347\", \"10.0.0.2:5347\"]",
        );
        let c = parse_str(&two).unwrap();
        assert_eq!(addresses(&c), ["127.0.0.1:5347", "10.0.0.2:5347"]);
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
                "expected a string (host:port), a table with `address`, or a list of them",
            ),
        ] {
            let e = parse_str(&GOOD.replace("server = \"127.0.0.1:5347\"", to)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn a_server_entry_may_be_a_table_with_tls() {
        use rustls::pki_types::ServerName;
        let dir = std::env::temp_dir().join(format!("jat-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let with = |to: &str| GOOD.replace("server = \"127.0.0.1:5347\"", to);
        // A table without TLS; a list mixing strings and tables; the default names.
        let c = parse_str(&with("server = { address = \"10.0.0.2:5347\" }")).unwrap();
        assert!(c.component.servers[0].tls.is_none());
        let text = with(&format!(
            "server = [\"127.0.0.1:5347\", {{ address = \"10.0.0.2:5347\", tls = true, ca = \"{}\" }},\n  {{ address = \"xmpp.example:5347\", tls = true, ca = \"{}\" }},\n  {{ address = \"10.0.0.3:5347\", tls = true, name = \"other.example\", ca = \"{}\" }}]",
            ca.display(),
            ca.display(),
            ca.display()
        ));
        let c = parse_str(&text).unwrap();
        let s = &c.component.servers;
        assert!(s[0].tls.is_none());
        let name = |i: usize| s[i].tls.as_ref().unwrap().name.clone();
        // An IP address: the component's domain; a DNS name: itself; or as given.
        assert_eq!(name(1), ServerName::try_from("proxy.localhost").unwrap());
        assert_eq!(name(2), ServerName::try_from("xmpp.example").unwrap());
        assert_eq!(name(3), ServerName::try_from("other.example").unwrap());
        assert_eq!(s[1].tls.as_ref().unwrap().ca.as_deref(), Some(ca.as_path()));
        // Mistakes, each named and placed.
        let missing = dir.join("missing.pem");
        for (to, key, line, says) in [
            (
                "server = { address = \"10.0.0.2:5347\", tsl = true }".to_owned(),
                "component.server.tsl",
                4,
                "unknown key, expected one of `address`, `tls`",
            ),
            (
                "server = { tls = true }".to_owned(),
                "component.server",
                4,
                "missing `address`",
            ),
            (
                "server = [\"127.0.0.1:5347\",\n { address = \"10.0.0.2:5347\", tls = \"yes\" }]"
                    .to_owned(),
                "component.server[1].tls",
                5,
                "expected a boolean",
            ),
            (
                "server = { address = \"10.0.0.2:5347\", name = \"x.example\" }".to_owned(),
                "component.server.name",
                4,
                "only with `tls = true`",
            ),
            (
                "server = { address = \"10.0.0.2\", tls = true }".to_owned(),
                "component.server.address",
                4,
                "not host:port",
            ),
            (
                format!(
                    "server = [\"10.0.0.2:5347\",\n {{ address = \"10.0.0.2:5347\", tls = true, ca = \"{}\" }}]",
                    ca.display()
                ),
                "component.server[1].address",
                5,
                "listed twice",
            ),
            (
                format!(
                    "server = {{ address = \"10.0.0.2:5347\", tls = true, name = \"a b\", ca = \"{}\" }}",
                    ca.display()
                ),
                "component.server.name",
                4,
                "not a DNS name or an IP address",
            ),
            (
                format!(
                    "server = {{ address = \"10.0.0.2:5347\", tls = true, ca = \"{}\" }}",
                    missing.display()
                ),
                "component.server.ca",
                4,
                "cannot read the CA file",
            ),
            (
                format!(
                    "server = {{ address = \"10.0.0.2:5347\", tls = true, ca = \"{}\" }}",
                    not_pem.display()
                ),
                "component.server.ca",
                4,
                "holds no certificate",
            ),
        ] {
            let e = parse_str(&with(&to)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
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

    #[test]
    fn probe_interval_in_component_or_in_proxy_with_a_deprecation() {
        use std::time::Duration;
        // The default, and no note.
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.component.probe_interval, Duration::from_secs(30));
        assert!(c.deprecated.is_empty());
        // Its place now.
        let text = GOOD.replace("[proxy]", "probe_interval_secs = 5\n\n[proxy]");
        let c = parse_str(&text).unwrap();
        assert_eq!(c.component.probe_interval, Duration::from_secs(5));
        assert!(c.deprecated.is_empty(), "{:?}", c.deprecated);
        // Its old place: read as before, with one note, placed and naming the new place.
        let old = GOOD.replace("[proxy]", "[proxy]\nprobe_interval_secs = 7");
        let c = parse_str(&old).unwrap();
        assert_eq!(c.component.probe_interval, Duration::from_secs(7));
        let [d] = &c.deprecated[..] else {
            panic!("{:?}", c.deprecated)
        };
        assert_eq!(d.key.as_deref(), Some("proxy.probe_interval_secs"));
        assert_eq!((d.line, d.column), (Some(8), Some(23)));
        assert!(d.reason.starts_with("deprecated"), "{d}");
        assert!(
            d.to_string()
                .starts_with("config test.toml:8:23: `proxy.probe_interval_secs`: deprecated: ")
                && d.to_string().contains("`component.probe_interval_secs`"),
            "{d}"
        );
        // Out of range at either place: the error names the key where it was found.
        let e = parse_str(&old.replace("= 7", "= 0")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.probe_interval_secs"), "{e}");
        let e = parse_str(&text.replace("= 5", "= 86401")).unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("component.probe_interval_secs"),
            "{e}"
        );
        assert!(!e.to_string().contains("86401"), "{e}");
        // Both: which one holds is unclear, so neither is taken.
        let e =
            parse_str(&old.replace("[proxy]", "probe_interval_secs = 5\n\n[proxy]")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.probe_interval_secs"), "{e}");
        assert!(e.reason.contains("`component.probe_interval_secs`"), "{e}");
    }
}
