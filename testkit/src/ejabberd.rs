//! A throwaway ejabberd on loopback (Debian's package): its own ejabberdctl config, config,
//! logs, spool and a unique Erlang node name, started with `ejabberdctl foreground` as a child
//! process and stopped by PID (the whole process tree it started).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ports::free_port;
use crate::process::Owned;

const CTL: &str = "/usr/sbin/ejabberdctl";

/// Panics, saying how to install it, unless ejabberd is installed. Never skips.
pub fn require() {
    if !Path::new(CTL).exists() {
        panic!(
            "ejabberd is not installed ({CTL} missing). These tests need a real server: run \
             `apt-get install -y ejabberd` (Debian/Ubuntu), then run the tests again."
        );
    }
}

/// A running ejabberd serving `localhost`.
pub struct Ejabberd {
    dir: PathBuf,
    node: String,
    process: Option<Owned>,
    /// The c2s listener.
    pub c2s: SocketAddr,
    /// The XEP-0114 listener.
    pub component: SocketAddr,
    /// A second XEP-0114 listener, with direct TLS, if started with one
    /// ([`Ejabberd::start_mixed`]).
    pub component_tls: Option<SocketAddr>,
}

impl Ejabberd {
    /// Starts ejabberd with these `(component domain, secret)` pairs on one service listener.
    pub fn start(components: &[(&str, &str)]) -> Ejabberd {
        Self::start_node(components, None, "")
    }

    /// Starts a node that registers with the epmd listening on `epmd_port` (one of the
    /// test's, see [`crate::cluster::Epmd`]) instead of the system's, with its Erlang
    /// distribution listener on loopback; `extra_config` is appended to its `ejabberd.yml`
    /// (top-level options).
    pub fn start_node(
        components: &[(&str, &str)],
        epmd_port: Option<u16>,
        extra_config: &str,
    ) -> Ejabberd {
        Self::start_full(components, epmd_port, extra_config, None, false)
    }

    /// Starts ejabberd with two service listeners for the same components, as on a cluster
    /// node that serves its own instances on loopback and the other hosts' by TLS: the
    /// plaintext [`Ejabberd::component`], and [`Ejabberd::component_tls`] with `tls: true`
    /// and the certificate and key in `certfile`.
    pub fn start_mixed(components: &[(&str, &str)], certfile: &Path) -> Ejabberd {
        Self::start_full(components, None, "", Some(certfile), true)
    }

    /// Starts ejabberd whose service listener takes direct TLS only (`tls: true`), with the
    /// certificate and key in the one PEM file `certfile` (which the ejabberd user must be
    /// able to read).
    pub fn start_tls(components: &[(&str, &str)], certfile: &Path) -> Ejabberd {
        Self::start_full(components, None, "", Some(certfile), false)
    }

    fn start_full(
        components: &[(&str, &str)],
        epmd_port: Option<u16>,
        extra_config: &str,
        certfile: Option<&Path>,
        mixed: bool,
    ) -> Ejabberd {
        require();
        let dir = crate::work_dir("ejabberd");
        let c2s_port = free_port();
        let component_port = free_port();
        let node = format!(
            "jat{}x{}@localhost",
            std::process::id(),
            dir.file_name()
                .unwrap()
                .to_string_lossy()
                .rsplit('-')
                .next()
                .unwrap()
        );
        for sub in ["logs", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            let _ = Command::new("chown")
                .args(["-R", "ejabberd:ejabberd"])
                .arg(dir.join(sub))
                .status();
        }
        // Every service listener has `global_routes: false`: with ejabberd's default (true), a
        // component that logs in for one domain of a listener's `hosts` registers routes for
        // all of them, so with two domains (jat-bench --tls: one plaintext instance, one TLS
        // instance) each connection also took the other's domain, and ejabberd spread that
        // domain's stanzas over both (the wrong instance drops them). With one domain per
        // listener, as in the tests, false and true register the same route.
        let mut hosts = String::new();
        for (domain, secret) in components {
            hosts.push_str(&format!(
                "      \"{domain}\":\n        password: \"{secret}\"\n"
            ));
        }
        let tls_lines = |f: &Path| format!("    tls: true\n    certfile: \"{}\"\n", f.display());
        let (tls, second, tls_port) = match certfile {
            None => (String::new(), String::new(), None),
            Some(f) if mixed => {
                let port = free_port();
                let second = format!(
                    "  -\n    port: {port}\n    ip: \"127.0.0.1\"\n    module: ejabberd_service\n    global_routes: false\n{}    hosts:\n{hosts}",
                    tls_lines(f)
                );
                (String::new(), second, Some(port))
            }
            Some(f) => (tls_lines(f), String::new(), None),
        };
        let config = format!(
            r#"# written by jat-proxy's testkit
hosts:
  - localhost
loglevel: info
certfiles: []
listen:
  -
    port: {c2s_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls: false
  -
    port: {component_port}
    ip: "127.0.0.1"
    module: ejabberd_service
    global_routes: false
{tls}    hosts:
{hosts}{second}auth_method: internal
auth_password_format: plain
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  register:
    deny: all
modules:
  mod_roster: {{}}
  mod_ping: {{}}
  mod_disco: {{}}
{extra_config}"#
        );
        std::fs::write(dir.join("ejabberd.yml"), config).unwrap();
        let mut ctl_config = format!("ERLANG_NODE={node}\n");
        if let Some(port) = epmd_port {
            // Sourced by ejabberdctl (as root, then `su` to the ejabberd user keeps the
            // environment): the node, and every ejabberdctl client node, asks the test's
            // epmd; none starts an epmd daemon of its own; the distribution listens on
            // loopback only (ERL_OPTIONS goes unquoted into erl's arguments).
            ctl_config.push_str(&format!(
                "export ERL_EPMD_PORT={port}\n\
                 ERL_OPTIONS=\"-start_epmd false -kernel inet_dist_use_interface {{127,0,0,1}}\"\n"
            ));
        }
        std::fs::write(dir.join("ejabberdctl.cfg"), ctl_config).unwrap();
        let mut e = Ejabberd {
            dir,
            node,
            process: None,
            c2s: SocketAddr::from(([127, 0, 0, 1], c2s_port)),
            component: SocketAddr::from(([127, 0, 0, 1], component_port)),
            component_tls: tls_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        };
        e.start_again();
        e
    }

    fn ctl_args(&self) -> Vec<String> {
        let d = |s: &str| self.dir.join(s).to_string_lossy().into_owned();
        vec![
            "--ctl-config".into(),
            d("ejabberdctl.cfg"),
            "--config".into(),
            d("ejabberd.yml"),
            "--logs".into(),
            d("logs"),
            "--spool".into(),
            d("spool"),
            "--node".into(),
            self.node.clone(),
        ]
    }

    /// Runs `ejabberdctl ARGS` against this node; returns (success, output).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(CTL)
            .args(self.ctl_args())
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run ejabberdctl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Starts the node again (same ports, spool and logs) after [`Ejabberd::stop`].
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "already running");
        let mut args = self.ctl_args();
        args.push("foreground".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = Owned::spawn("ejabberd", Path::new(CTL), &args, &[]);
        let mut addrs = vec![self.c2s, self.component];
        addrs.extend(self.component_tls);
        process.wait_listening(&addrs, Duration::from_secs(60), || self.log());
        self.process = Some(process);
    }

    /// Stops the node: `ejabberdctl stop`, then the process tree it ran in, by PID.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = self.ctl(&["stop"]);
            if p.wait_exit(Duration::from_secs(20)).is_none() {
                p.kill_tree();
            }
        }
    }

    /// The process id of `ejabberdctl foreground` (the Erlang VM runs in its process tree).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// Creates an account.
    pub fn register(&self, user: &str, password: &str) {
        let (ok, out) = self.ctl(&["register", user, "localhost", password]);
        assert!(ok, "ejabberdctl register {user}: {out}");
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/ejabberd.log")).unwrap_or_default()
    }

    /// How many component logins for `domain` the server logged.
    pub fn component_logins(&self, domain: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Accepted external component") && l.contains(domain))
            .count()
    }

    /// The work directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Erlang node name (`name@localhost`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the node is running (started and not stopped).
    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    /// Waits until the node's listeners accept connections again (after a cluster join,
    /// which restarts ejabberd inside the running node).
    pub fn wait_listening(&mut self, limit: Duration) {
        let addrs = [self.c2s, self.component];
        let log = self.log();
        if let Some(p) = &mut self.process {
            p.wait_listening(&addrs, limit, || log.clone());
        }
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        if let Some(p) = &mut self.process {
            p.kill_tree();
        }
        crate::discard_work_dir(&self.dir, "ejabberd");
    }
}
