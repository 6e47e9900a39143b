//! A throwaway ejabberd cluster on loopback: an epmd of the test's own and two (or more)
//! nodes, each with its own ports, config, spool and logs, the others joined to the first
//! (`ejabberdctl join_cluster`). Every process is a child of the test, stopped by PID.
//!
//! What it takes, found out on ejabberd 23.01 (Debian): the nodes run as the `ejabberd` user
//! (ejabberdctl switches to it), so they share its Erlang cookie; they find each other
//! through epmd, which Erlang would otherwise start as a daemon of its own (on every
//! interface, outliving the test). Here the test runs `epmd -port P -address 127.0.0.1` as
//! a child and every node, and every `ejabberdctl` client node, is told `ERL_EPMD_PORT=P`
//! and `-start_epmd false`; the distribution listens on loopback only
//! (`inet_dist_use_interface`). Node names are unique (they hold the test's PID).

use std::path::Path;
use std::time::Duration;

use crate::ejabberd::Ejabberd;
use crate::ports::free_port;
use crate::process::Owned;

/// An epmd on 127.0.0.1 at a free port, a child of the test.
pub struct Epmd {
    process: Owned,
    /// Its port.
    pub port: u16,
}

impl Epmd {
    /// Starts it and waits until it listens.
    pub fn start() -> Epmd {
        crate::ejabberd::require();
        let port = free_port();
        let mut process = Owned::spawn(
            "epmd",
            Path::new("/usr/bin/epmd"),
            &["-port", &port.to_string(), "-address", "127.0.0.1"],
            &[],
        );
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        process.wait_listening(&[addr], Duration::from_secs(10), String::new);
        Epmd { process, port }
    }

    /// The names registered with it (`epmd -names`).
    pub fn names(&self) -> String {
        let out = std::process::Command::new("/usr/bin/epmd")
            .arg("-names")
            .env("ERL_EPMD_PORT", self.port.to_string())
            .output()
            .expect("run epmd -names");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Nodes of one ejabberd cluster serving `localhost`, all with the same component
/// listener settings (each on its own port).
pub struct EjabberdCluster {
    /// The nodes; `nodes[0]` is the one the others joined.
    pub nodes: Vec<Ejabberd>,
    // Dropped after the nodes (fields drop in order).
    epmd: Epmd,
}

impl EjabberdCluster {
    /// Starts `n` nodes with these `(component domain, secret)` pairs and `extra_config`
    /// appended to each node's `ejabberd.yml`, and joins nodes 2.. to node 1. Panics, with
    /// the servers' logs, unless every node lists all of them as running.
    pub fn start(n: usize, components: &[(&str, &str)], extra_config: &str) -> EjabberdCluster {
        assert!(n >= 1);
        let epmd = Epmd::start();
        let mut nodes: Vec<Ejabberd> = Vec::new();
        for _ in 0..n {
            nodes.push(Ejabberd::start_node(
                components,
                Some(epmd.port),
                extra_config,
            ));
        }
        let mut cluster = EjabberdCluster { nodes, epmd };
        let first = cluster.nodes[0].node().to_owned();
        for i in 1..n {
            let (ok, out) = cluster.nodes[i].ctl(&["join_cluster", &first]);
            assert!(
                ok,
                "join_cluster {first} from node {}: {out}\n{}",
                i + 1,
                cluster.nodes[i].log()
            );
            // Joining restarts ejabberd inside the node: wait for its listeners again.
            cluster.nodes[i].wait_listening(Duration::from_secs(60));
        }
        cluster.wait_joined(Duration::from_secs(30));
        cluster
    }

    /// Waits until every running node lists every running node in `list_cluster`.
    pub fn wait_joined(&self, limit: Duration) {
        let running: Vec<&Ejabberd> = self.nodes.iter().filter(|n| n.running()).collect();
        let joined = crate::wait_until(limit, || {
            running
                .iter()
                .all(|n| {
                    let (ok, out) = n.ctl(&["list_cluster"]);
                    ok && running.iter().all(|m| out.contains(m.node()))
                })
                .then_some(())
        });
        if joined.is_none() {
            let lists: Vec<String> = running
                .iter()
                .map(|n| format!("{}: {}", n.node(), n.ctl(&["list_cluster"]).1))
                .collect();
            panic!(
                "the nodes do not list each other within {limit:?}: {lists:?}\nepmd: {}",
                self.epmd.names()
            );
        }
    }

    /// Creates an account (on node 1; the cluster shares it).
    pub fn register(&self, user: &str, password: &str) {
        self.nodes[0].register(user, password);
    }

    /// The test's epmd.
    pub fn epmd(&self) -> &Epmd {
        &self.epmd
    }
}
