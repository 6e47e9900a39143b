//! One entry of `[component] server`: a listener's address and, with `tls = true`, how its
//! certificate is verified (the name, and the CA file or the system's roots). The rustls
//! client configuration is built here, at start, so that a CA file that cannot be read or
//! holds no certificate is a configuration error (exit 2) rather than a failing login.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::error::Invalid;

/// Largest CA file read (a bundle of a few hundred certificates fits).
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// One XEP-0114 listener the session keeps a stream to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `host:port`.
    pub address: String,
    /// Direct TLS (from the first byte), if configured.
    pub tls: Option<Tls>,
}

impl Server {
    /// A plaintext listener.
    pub fn plain(address: impl Into<String>) -> Server {
        Server {
            address: address.into(),
            tls: None,
        }
    }

    /// The host part of the address (without the brackets of an IPv6 literal).
    pub fn host(&self) -> &str {
        host_of(&self.address)
    }

    /// Whether the address is a loopback one (`localhost`, 127.0.0.0/8, `::1`), where a
    /// stream without TLS does not leave the host.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// How the listener's certificate is verified.
#[derive(Clone)]
pub struct Tls {
    /// The name the certificate must be issued for, sent as SNI when it is a DNS name.
    pub name: ServerName<'static>,
    /// The CA file, if given (otherwise the system's roots).
    pub ca: Option<PathBuf>,
    /// The client configuration: those roots, no ALPN, no client certificate.
    pub client: Arc<rustls::ClientConfig>,
}

impl PartialEq for Tls {
    fn eq(&self, other: &Tls) -> bool {
        self.name == other.name && self.ca == other.ca
    }
}
impl Eq for Tls {}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("name", &self.name)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The verified name, as text (for the log).
    pub fn name_str(&self) -> String {
        name_text(&self.name)
    }
}

/// The name of a [`ServerName`] as text.
pub fn name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        _ => "?".into(),
    }
}

/// One entry as written: `"host:port"` or `{ address = "host:port", tls = true, ... }`.
pub(super) enum RawServer {
    Address(String),
    Table(RawServerTable),
}

pub(super) struct RawServerTable {
    address: String,
    tls: bool,
    name: Option<String>,
    ca: Option<PathBuf>,
}

/// What an entry's table may hold.
const TABLE_KEYS: &str = "`address`, `tls`, `name`, `ca`";

impl RawServer {
    /// The entry at `key` as written (its values are never quoted in an error).
    pub(super) fn read(value: &toml::Value, key: &str) -> Result<RawServer, Invalid> {
        let table = match value {
            toml::Value::String(a) => return Ok(RawServer::Address(a.clone())),
            toml::Value::Table(t) => t,
            _ => {
                return Err(Invalid::new(
                    key,
                    "wrong type, expected a string (host:port) or a table with `address`",
                ));
            }
        };
        let string = |k: &str| -> Result<Option<String>, Invalid> {
            match table.get(k) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Invalid::new(
                    format!("{key}.{k}"),
                    "wrong type, expected a string",
                )),
            }
        };
        if let Some(k) = table
            .keys()
            .find(|k| !["address", "tls", "name", "ca"].contains(&k.as_str()))
        {
            return Err(Invalid::new(
                format!("{key}.{k}"),
                format!("unknown key, expected one of {TABLE_KEYS}"),
            ));
        }
        let tls = match table.get("tls") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                return Err(Invalid::new(
                    format!("{key}.tls"),
                    "wrong type, expected a boolean",
                ));
            }
        };
        Ok(RawServer::Table(RawServerTable {
            address: string("address")?.ok_or_else(|| {
                Invalid::new(key, "missing `address` (expected e.g. \"10.0.0.2:5347\")")
            })?,
            tls,
            name: string("name")?,
            ca: string("ca")?.map(PathBuf::from),
        }))
    }

    pub(super) fn address(&self) -> &str {
        match self {
            RawServer::Address(a) => a,
            RawServer::Table(t) => &t.address,
        }
    }

    /// The validated entry at `key` (`component.server` or `component.server[i]`) of the
    /// component `domain`.
    pub(super) fn validate(&self, key: &str, domain: &str) -> Result<Server, Invalid> {
        let t = match self {
            RawServer::Address(a) => return Ok(Server::plain(a.clone())),
            RawServer::Table(t) => t,
        };
        let mut server = Server::plain(t.address.clone());
        if !t.tls {
            for (given, what) in [(t.name.is_some(), "name"), (t.ca.is_some(), "ca")] {
                if given {
                    return Err(Invalid::new(
                        format!("{key}.{what}"),
                        "only with `tls = true`",
                    ));
                }
            }
            return Ok(server);
        }
        let name = match &t.name {
            Some(n) => ServerName::try_from(n.clone()).map_err(|_| {
                Invalid::new(
                    format!("{key}.name"),
                    "not a DNS name or an IP address (expected e.g. \"proxy.example\")",
                )
            })?,
            None => default_name(server.host(), domain),
        };
        let roots = match &t.ca {
            Some(path) => ca_roots(path).map_err(|m| Invalid::new(format!("{key}.ca"), m))?,
            None => system_roots().map_err(|m| Invalid::new(format!("{key}.tls"), m))?,
        };
        server.tls = Some(Tls {
            name,
            ca: t.ca.clone(),
            client: client_config(roots),
        });
        Ok(server)
    }
}

/// The name verified by default: the host, if it is a DNS name; the component's domain if
/// the host is an IP address (a listener's certificate is often issued for the domain).
fn default_name(host: &str, domain: &str) -> ServerName<'static> {
    let dns = host
        .parse::<IpAddr>()
        .is_err()
        .then(|| ServerName::try_from(host.to_owned()).ok())
        .flatten();
    dns.or_else(|| ServerName::try_from(domain.to_owned()).ok())
        .unwrap_or_else(|| ServerName::try_from("invalid").expect("a DNS name"))
}

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The certificates of a PEM file, as roots.
fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let what = format!("the CA file {}", path.display());
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what}: {e}"))?
        .len();
    if len > MAX_CA_FILE {
        return Err(format!("{what} is larger than {MAX_CA_FILE} bytes"));
    }
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {what}: {e}"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{what} is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{what} holds a certificate that cannot be a root: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what} holds no certificate (PEM `CERTIFICATE`)"));
    }
    Ok(roots)
}

/// The system's roots (read once per process).
fn system_roots() -> Result<RootCertStore, String> {
    static ROOTS: std::sync::OnceLock<Result<RootCertStore, String>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                Err(
                    "no system root certificate found (install ca-certificates, or give `ca`)"
                        .into(),
                )
            } else {
                Ok(roots)
            }
        })
        .clone()
}

/// A client configuration verifying against `roots`: the ring provider, TLS 1.2 and 1.3,
/// no ALPN (Prosody's multiplexer would route `xmpp-client` to c2s), no client certificate.
pub fn client_config(roots: RootCertStore) -> Arc<rustls::ClientConfig> {
    // ring, as the design asks (aws-lc-rs builds C with cmake); rustls 0.23.48 marks it
    // deprecated only because ring has no post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_is_the_host_or_for_an_address_the_domain() {
        let n = |h| name_text(&default_name(h, "proxy.example"));
        assert_eq!(n("xmpp.example"), "xmpp.example");
        assert_eq!(n("10.0.0.2"), "proxy.example");
        assert_eq!(n("::1"), "proxy.example");
        assert_eq!(host_of("[::1]:5347"), "::1");
        assert!(Server::plain("[::1]:5347").is_loopback());
        assert!(Server::plain("localhost:5347").is_loopback());
        assert!(Server::plain("127.0.0.2:5347").is_loopback());
        assert!(!Server::plain("10.0.0.2:5347").is_loopback());
        assert!(!Server::plain("xmpp.example:5347").is_loopback());
    }
}
