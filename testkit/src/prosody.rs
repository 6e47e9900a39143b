//! A throwaway Prosody on loopback: its own config, data directory, log and free ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ports::free_port;
use crate::process::Owned;

const BINARY: &str = "/usr/bin/prosody";

/// A running Prosody serving `localhost`, with components as configured.
pub struct Prosody {
    dir: PathBuf,
    process: Option<Owned>,
    /// The c2s listener.
    pub c2s: SocketAddr,
    /// The XEP-0114 component listener.
    pub component: SocketAddr,
    /// The direct-TLS listener of `mod_net_multiplex` beside a plaintext component listener,
    /// if started with both ([`Prosody::start_mixed`]).
    pub component_tls: Option<SocketAddr>,
    /// The host it serves (`localhost`).
    pub domain: String,
}

/// Panics, saying how to install it, unless Prosody is installed. Never skips.
pub fn require() {
    if !Path::new(BINARY).exists() {
        panic!(
            "Prosody is not installed ({BINARY} missing). The integration tests need a real \
             server: run `apt-get install -y prosody` (Debian/Ubuntu), then run the tests again."
        );
    }
}

impl Prosody {
    /// Starts Prosody with these `(component domain, secret)` pairs.
    pub fn start(components: &[(&str, &str)]) -> Prosody {
        Self::start_full(components, None, false)
    }

    /// Starts Prosody whose components are reachable by direct TLS only: `mod_net_multiplex`
    /// listens with TLS (`ssl_ports`, certificate `cert` and key `key`) and hands
    /// `jabber:component:accept` streams to the component service, which has no plaintext
    /// port (`component_ports = { }`). [`Prosody::component`] is the TLS port.
    pub fn start_tls(components: &[(&str, &str)], cert: &Path, key: &Path) -> Prosody {
        Self::start_full(components, Some((cert, key)), false)
    }

    /// Starts Prosody with both: the plaintext component listener ([`Prosody::component`])
    /// and `mod_net_multiplex`'s direct-TLS listener ([`Prosody::component_tls`]), which
    /// reach the same components.
    pub fn start_mixed(components: &[(&str, &str)], cert: &Path, key: &Path) -> Prosody {
        Self::start_full(components, Some((cert, key)), true)
    }

    fn start_full(
        components: &[(&str, &str)],
        tls: Option<(&Path, &Path)>,
        mixed: bool,
    ) -> Prosody {
        require();
        let dir = crate::work_dir("prosody");
        let c2s_port = free_port();
        let component_port = free_port();
        let tls_port = mixed.then(free_port);
        let plain = format!(
            "component_ports = {{ {component_port} }}\ncomponent_interfaces = {{ \"127.0.0.1\" }}\n"
        );
        let (listener, modules) = match tls {
            None => (plain, ""),
            Some((cert, key)) => (
                format!(
                    "{}ssl = {{ certificate = \"{}\"; key = \"{}\"; }}\n\
                     ssl_ports = {{ {} }}\nssl_interfaces = {{ \"127.0.0.1\" }}\n\
                     certificates = \"{}\"\n",
                    if mixed {
                        plain.as_str()
                    } else {
                        "component_ports = { }\n"
                    },
                    cert.display(),
                    key.display(),
                    tls_port.unwrap_or(component_port),
                    dir.display()
                ),
                " \"net_multiplex\";",
            ),
        };
        let mut config = format!(
            r#"-- written by jat-proxy's testkit
run_as_root = true
daemonize = false
pidfile = "{dir}/prosody.pid"
data_path = "{dir}/data"
log = {{ {level} = "{dir}/prosody.log"; }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
{listener}modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "posix";{modules} }}
modules_disabled = {{ "s2s"; "offline"; }}
c2s_require_encryption = false
s2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"

VirtualHost "localhost"
"#,
            dir = dir.display(),
            level = if std::env::var_os("JAT_PROSODY_DEBUG").is_some() {
                "debug"
            } else {
                "info"
            },
        );
        for (domain, secret) in components {
            config.push_str(&format!(
                "\nComponent \"{domain}\"\n    component_secret = \"{secret}\"\n"
            ));
        }
        std::fs::create_dir_all(dir.join("data/localhost/accounts")).unwrap();
        std::fs::write(dir.join("prosody.cfg.lua"), config).unwrap();
        let mut p = Prosody {
            dir,
            process: None,
            c2s: SocketAddr::from(([127, 0, 0, 1], c2s_port)),
            component: SocketAddr::from(([127, 0, 0, 1], component_port)),
            component_tls: tls_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            domain: "localhost".into(),
        };
        p.start_again();
        p
    }

    /// Starts the server again (same ports, data and log) after [`Prosody::stop`].
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "already running");
        let cfg = self.dir.join("prosody.cfg.lua");
        let mut process = Owned::spawn(
            "prosody",
            Path::new(BINARY),
            &["-F", "--config", cfg.to_str().unwrap()],
            &[],
        );
        let mut addrs = vec![self.c2s, self.component];
        addrs.extend(self.component_tls);
        process.wait_listening(&addrs, Duration::from_secs(30), || self.log());
        self.process = Some(process);
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal("TERM");
            if p.wait_exit(Duration::from_secs(10)).is_none() {
                p.kill();
            }
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// Creates an account (written straight into Prosody's internal storage).
    pub fn register(&self, user: &str, password: &str) {
        let path = self.dir.join(format!("data/localhost/accounts/{user}.dat"));
        std::fs::write(
            path,
            format!("return {{\n\t[\"password\"] = \"{password}\";\n}};\n"),
        )
        .unwrap();
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prosody.log")).unwrap_or_default()
    }

    /// How many times a component logged in, as the server logged it.
    pub fn component_logins(&self) -> usize {
        self.log()
            .matches("External component successfully authenticated")
            .count()
    }

    /// The work directory (config, data, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        if let Some(p) = &mut self.process {
            p.kill();
        }
        crate::discard_work_dir(&self.dir, "prosody");
    }
}
