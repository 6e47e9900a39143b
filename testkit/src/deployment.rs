//! A whole deployment for a test: Prosody, jat-proxy in front of `impl@localhost`, and the
//! accounts `impl`, `user`, `mallory` (password `pw`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{Answer, Client, Element};
use crate::prosody::Prosody;
use crate::proxy::{ConfigSpec, ProxyProcess, write_config};

/// The component domain of test deployments.
pub const COMPONENT: &str = "proxy.localhost";
/// The component secret of test deployments.
pub const SECRET: &str = "component-secret";
/// How long a test waits for something that must happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test waits to be sure something does not happen: long enough for a stanza to
/// cross the server twice on loopback many times over.
pub const QUIET: Duration = Duration::from_millis(1500);

/// Prosody + one jat-proxy.
pub struct Deployment {
    /// The server.
    pub prosody: Prosody,
    /// The proxy process.
    pub proxy: ProxyProcess,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its key file.
    pub keys: PathBuf,
}

impl Deployment {
    /// Starts everything with the default configuration.
    pub fn start(binary: &Path) -> Deployment {
        Self::start_with(binary, "")
    }

    /// Starts everything; `extra_config` is appended to the proxy's configuration.
    pub fn start_with(binary: &Path, extra_config: &str) -> Deployment {
        Self::start_configured(binary, "", extra_config)
    }

    /// Starts everything; `proxy_extra` goes into the `[proxy]` section, `extra_config` is
    /// appended.
    pub fn start_configured(binary: &Path, proxy_extra: &str, extra_config: &str) -> Deployment {
        Self::start_listing(binary, &[], proxy_extra, extra_config)
    }

    /// Starts everything, the proxy's `server` listing Prosody's listener first, then `also`
    /// (each may be anything, down or not a server at all); returns once the proxy has a
    /// stream to Prosody.
    pub fn start_listing(
        binary: &Path,
        also: &[std::net::SocketAddr],
        proxy_extra: &str,
        extra_config: &str,
    ) -> Deployment {
        let prosody = Prosody::start(&[(COMPONENT, SECRET)]);
        for user in ["impl", "user", "mallory", "flood"] {
            prosody.register(user, "pw");
        }
        let (config, keys) = standard_config(
            prosody.dir(),
            prosody.component,
            also,
            proxy_extra,
            extra_config,
        );
        let proxy = ProxyProcess::start(binary, &config);
        let server = format!("server={}", prosody.component);
        let up = crate::wait_until(WAIT, || {
            proxy
                .log()
                .lines()
                .any(|l| l.contains("session established") && l.contains(&server))
                .then_some(())
        });
        assert!(up.is_some(), "no stream to Prosody:\n{}", proxy.log());
        Deployment {
            prosody,
            proxy,
            config,
            keys,
        }
    }

    /// An ordinary client.
    pub async fn client(&self, user: &str, resource: &str) -> Client {
        Client::login(
            self.prosody.c2s,
            "localhost",
            user,
            "pw",
            resource,
            Answer::Nothing,
        )
        .await
    }

    /// The implementing client logs in once (accepting the component's subscription, as a
    /// real one has before any production traffic) and out again; returns once the proxy
    /// knows it is gone. From then on requests wait for it.
    pub async fn implementing_gone(&self, resource: &str) {
        self.implementing(resource).await.close().await;
        assert!(
            crate::wait_until(WAIT, || self
                .proxy
                .log()
                .contains("implementing client resource unavailable")
                .then_some(()))
            .is_some(),
            "the proxy learns impl/{resource} is gone:\n{}",
            self.proxy.log()
        );
    }

    /// A resource of the implementing client, once the proxy knows it is online. It accepts
    /// the proxy's subscription request as a real implementing client must.
    pub async fn implementing(&self, resource: &str) -> Client {
        implementing_at(
            self.prosody.c2s,
            resource,
            std::slice::from_ref(&self.proxy),
        )
        .await
    }
}

/// A resource of the implementing client logged in at `c2s` (accepting the component's
/// subscription request as a real implementing client must), once every one of `proxies`
/// knows it is online (behind ejabberd, periodic probes teach the instances a presence did
/// not reach).
pub async fn implementing_at(
    c2s: std::net::SocketAddr,
    resource: &str,
    proxies: &[ProxyProcess],
) -> Client {
    let c = Client::login(
        c2s,
        "localhost",
        "impl",
        "pw",
        resource,
        Answer::Subscriptions,
    )
    .await;
    for p in proxies {
        wait_resource(p, resource);
    }
    c
}

/// Waits until `proxy` has seen `resource` of the implementing client come online in its
/// current session (what it learnt before its last stream loss, it has forgotten; a stream
/// that comes up beside others forgets nothing).
pub fn wait_resource(proxy: &ProxyProcess, resource: &str) {
    assert!(
        learnt_within(proxy, resource, WAIT).is_some(),
        "proxy never saw impl/{resource} in its current session:\n{}",
        proxy.log()
    );
}

/// Waits up to `limit` until `proxy` knows `resource` now, as [`wait_resource`]; returns how
/// long that took, or `None`.
pub fn learnt_within(proxy: &ProxyProcess, resource: &str, limit: Duration) -> Option<Duration> {
    let needle = format!("resource=\"{resource}\"");
    let t = std::time::Instant::now();
    crate::wait_until(limit, || {
        let log = proxy.log();
        let current = log
            .rfind("session lost")
            .map_or(log.as_str(), |i| &log[i..]);
        current
            .lines()
            .any(|l| l.contains("resource available") && l.contains(&needle))
            .then_some(())
    })
    .map(|()| t.elapsed())
}

/// A request to the component, as in the README: `<iq type='get' id=ID to='proxy.localhost'>`.
pub fn request(id: &str) -> String {
    format!(
        "<iq type='get' id='{id}' to='{COMPONENT}'><query xmlns='urn:example:echo'>{id}</query></iq>"
    )
}

/// The defined condition of an error stanza.
pub fn error_condition(el: &Element) -> Option<String> {
    el.children()
        .find(|c| c.name() == "error")?
        .children()
        .find(|c| c.ns() == "urn:ietf:params:xml:ns:xmpp-stanzas" && c.name() != "text")
        .map(|c| c.name().to_owned())
}

/// Resident memory of a process in KiB (from /proc).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory a process has had since it started, in KiB (from /proc).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// ejabberd with the accounts `impl` and `user` (password `pw`), and `n` jat-proxy instances
/// in front of `impl@localhost` sharing one configuration and key file (ejabberd spreads the
/// component domain over their connections). `proxy_extra` goes into the `[proxy]` section,
/// `extra` is appended.
pub fn ejabberd_with_proxies(
    binary: &Path,
    n: usize,
    proxy_extra: &str,
    extra: &str,
) -> (crate::ejabberd::Ejabberd, Vec<ProxyProcess>) {
    let ejabberd = crate::ejabberd::Ejabberd::start(&[(COMPONENT, SECRET)]);
    for u in ["impl", "user"] {
        ejabberd.register(u, "pw");
    }
    let (config, _) = standard_config(ejabberd.dir(), ejabberd.component, &[], proxy_extra, extra);
    let proxies: Vec<ProxyProcess> = (0..n)
        .map(|_| ProxyProcess::start(binary, &config))
        .collect();
    // Several logins at once to an Erlang server on a busy machine: a generous limit.
    for p in &proxies {
        p.wait_sessions(1, Duration::from_secs(30));
    }
    (ejabberd, proxies)
}

/// An ejabberd cluster of `per_node.len()` nodes (`server_extra` appended to each node's
/// `ejabberd.yml`) with the accounts `impl` and `user` (password `pw`), and `per_node[i]`
/// jat-proxy instances of node `i + 1`, as README recommends for a cluster: each connected
/// to every node, its own node first (one configuration file per node: its `server` lists
/// that node's component listener, then the others'), all naming one key file (in node 1's
/// directory). `proxy_extra` goes into the `[proxy]` section, `extra` is appended. Returns
/// the cluster, the instances of each node (each logged in to every node), and each node's
/// configuration file.
pub fn ejabberd_cluster_with_proxies(
    binary: &Path,
    per_node: &[usize],
    server_extra: &str,
    proxy_extra: &str,
    extra: &str,
) -> (
    crate::cluster::EjabberdCluster,
    Vec<Vec<ProxyProcess>>,
    Vec<PathBuf>,
) {
    let cluster = crate::cluster::EjabberdCluster::start(
        per_node.len(),
        &[(COMPONENT, SECRET)],
        server_extra,
    );
    for u in ["impl", "user"] {
        cluster.register(u, "pw");
    }
    let keys = cluster.nodes[0].dir().join("keys.toml");
    let configs: Vec<PathBuf> = cluster
        .nodes
        .iter()
        .map(|node| {
            let others: Vec<std::net::SocketAddr> = cluster
                .nodes
                .iter()
                .map(|n| n.component)
                .filter(|c| *c != node.component)
                .collect();
            write_config(
                node.dir(),
                "jat-proxy.toml",
                &ConfigSpec {
                    component: COMPONENT,
                    server: node.component,
                    also: &others,
                    secret: SECRET,
                    target: "impl@localhost",
                    key_file: &keys,
                    proxy_extra,
                    extra,
                },
            )
        })
        .collect();
    let proxies: Vec<Vec<ProxyProcess>> = per_node
        .iter()
        .zip(&configs)
        .map(|(&n, config)| {
            (0..n)
                .map(|_| ProxyProcess::start(binary, config))
                .collect()
        })
        .collect();
    for p in proxies.iter().flatten() {
        p.wait_sessions(per_node.len(), Duration::from_secs(30));
    }
    (cluster, proxies, configs)
}

/// The configuration of a test deployment, written into `dir`: the component at `server`
/// in front of `impl@localhost`, key file `dir/keys.toml`. Returns (config, key file).
fn standard_config(
    dir: &Path,
    server: std::net::SocketAddr,
    also: &[std::net::SocketAddr],
    proxy_extra: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys.toml");
    let config = write_config(
        dir,
        "jat-proxy.toml",
        &ConfigSpec {
            component: COMPONENT,
            server,
            also,
            secret: SECRET,
            target: "impl@localhost",
            key_file: &keys,
            proxy_extra,
            extra,
        },
    );
    (config, keys)
}
