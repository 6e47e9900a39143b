//! `[metrics]`: the HTTP listener of `/metrics` and `/healthz`.

use std::net::SocketAddr;

use serde::Deserialize;

use super::error::Invalid;

/// The HTTP listener of `/metrics` and `/healthz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where they are served (`[metrics] listen`); off if `None`.
    pub listen: Option<SocketAddr>,
}

/// `[metrics]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    listen: Option<String>,
}

impl RawMetrics {
    /// The validated section.
    pub(super) fn validate(&self) -> Result<MetricsConfig, Invalid> {
        // An IP address and a port, no host name: what is listened on must not depend on DNS.
        let listen = match &self.listen {
            None => None,
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .ok()
                    .filter(|a| a.port() != 0)
                    .ok_or_else(|| {
                        Invalid::new(
                            "metrics.listen",
                            "not an IP address and port (expected e.g. \"127.0.0.1:9798\")",
                        )
                    })?,
            ),
        };
        Ok(MetricsConfig { listen })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GOOD, parse_str};

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
}
