//! jat-bench: what the proxy hop costs, measured end to end in one run on one server.
//!
//! Starts a throwaway Prosody or ejabberd (the integration tests' harness), N instances of
//! the release jat-proxy (one configuration and key file; more than one only on ejabberd,
//! which spreads the component domain over their connections), an implementing client with
//! R resources answering every request, and K senders. Then, one after the other on the
//! same server:
//!
//! 1. **direct**: senders → the implementing client's full JIDs (no proxy): the ceiling;
//! 2. **proxied**: senders → jat-proxy → implementing client;
//! 3. with `--tls`, **proxied-tls**: the same through a second jat-proxy instance, for a
//!    second component domain ([`TLS_COMPONENT`]), whose stream to the same server is direct
//!    TLS (ejabberd's `tls: true` listener, Prosody's `mod_net_multiplex`), with a CA made
//!    for the run.
//!
//! For each: requests/s, latency percentiles, CPU seconds of the server (its whole process
//! tree) and of jat-proxy (all instances) per 1000 requests (from /proc), jat-proxy's RSS
//! (all instances). Prints a table and the ratios; writes JSON and an SVG latency chart on
//! request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use testkit::Prosody;
use testkit::client::{Answer, Client, reply_to};
use testkit::deployment::{COMPONENT, SECRET, rss_kib};
use testkit::ejabberd::Ejabberd;
use testkit::proxy::{ConfigSpec, ProxyProcess, write_config, write_config_server};

/// The component domain of the TLS instance (`--tls`).
const TLS_COMPONENT: &str = "proxytls.localhost";

#[derive(Parser, Debug, Clone)]
#[command(
    about = "End-to-end load generator: direct vs proxied on a throwaway Prosody or ejabberd"
)]
struct Args {
    /// The XMPP server to start (Debian's package).
    #[arg(long, value_enum, default_value_t = ServerKind::Prosody)]
    server: ServerKind,
    /// jat-proxy instances (one configuration and key file); more than one only on ejabberd
    /// (Prosody refuses a second connection for the component domain).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Sender clients.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Resources of the implementing client.
    #[arg(long, default_value_t = 2)]
    resources: usize,
    /// Requests outstanding at once, over all senders.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Requests per phase.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests of the proxied phase only (e.g. 1000000 for the RSS-flatness run).
    #[arg(long)]
    proxied_requests: Option<usize>,
    /// The jat-proxy binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/jat-proxy")]
    proxy_bin: PathBuf,
    /// What is sent: IQ requests answered with results; messages answered with messages
    /// (`[proxy] messages = "forward"`; the implementing client writes back to the token
    /// address it got each message from); or `outbound`, IQs the implementing client's
    /// resources start, to each sender's full JID directly, and through the proxy to its
    /// XEP-0106-escaped address (`[proxy] outbound = "any"`), answered by the senders.
    #[arg(long, value_enum, default_value_t = Flow::Iq)]
    flow: Flow,
    /// Alternate direct and proxied phases this many times (each with its share of the
    /// requests) and report them summed: on a shared machine, both then see the same load.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also measure the same flow through a jat-proxy instance whose stream is direct TLS
    /// (a third phase, `proxied-tls`, in every round; `--flow iq`, one instance).
    #[arg(long)]
    tls: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the latency distribution of both phases as SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Flow {
    Iq,
    Message,
    Outbound,
}

#[derive(clap::ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ServerKind {
    Prosody,
    Ejabberd,
}

/// The running server.
enum Server {
    Prosody(Prosody),
    Ejabberd(Ejabberd),
}

impl Server {
    fn start(kind: ServerKind, tls: Option<&testkit::pki::Leaf>) -> Server {
        let both = [(COMPONENT, SECRET), (TLS_COMPONENT, SECRET)];
        match (kind, tls) {
            (ServerKind::Prosody, None) => Server::Prosody(Prosody::start(&[(COMPONENT, SECRET)])),
            (ServerKind::Ejabberd, None) => {
                Server::Ejabberd(Ejabberd::start(&[(COMPONENT, SECRET)]))
            }
            (ServerKind::Prosody, Some(l)) => {
                Server::Prosody(Prosody::start_mixed(&both, &l.cert, &l.key))
            }
            (ServerKind::Ejabberd, Some(l)) => {
                Server::Ejabberd(Ejabberd::start_mixed(&both, &l.both))
            }
        }
    }
    fn component_tls(&self) -> Option<std::net::SocketAddr> {
        match self {
            Server::Prosody(p) => p.component_tls,
            Server::Ejabberd(e) => e.component_tls,
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Server::Prosody(_) => "Prosody",
            Server::Ejabberd(_) => "ejabberd",
        }
    }
    fn register(&self, user: &str) {
        match self {
            Server::Prosody(p) => p.register(user, "pw"),
            Server::Ejabberd(e) => e.register(user, "pw"),
        }
    }
    fn c2s(&self) -> std::net::SocketAddr {
        match self {
            Server::Prosody(p) => p.c2s,
            Server::Ejabberd(e) => e.c2s,
        }
    }
    fn component(&self) -> std::net::SocketAddr {
        match self {
            Server::Prosody(p) => p.component,
            Server::Ejabberd(e) => e.component,
        }
    }
    fn dir(&self) -> &Path {
        match self {
            Server::Prosody(p) => p.dir(),
            Server::Ejabberd(e) => e.dir(),
        }
    }
    /// The process its tree of processes hangs from.
    fn pid(&self) -> u32 {
        match self {
            Server::Prosody(p) => p.pid(),
            Server::Ejabberd(e) => e.pid(),
        }
    }
    fn component_logins(&self) -> usize {
        match self {
            Server::Prosody(p) => p.component_logins(),
            Server::Ejabberd(e) => e.component_logins(COMPONENT),
        }
    }
    fn log(&self) -> String {
        match self {
            Server::Prosody(p) => p.log(),
            Server::Ejabberd(e) => e.log(),
        }
    }
}

#[derive(Serialize, Debug, Clone)]
struct Phase {
    name: String,
    requests: usize,
    errors: usize,
    lost: usize,
    seconds: f64,
    requests_per_second: f64,
    latency_us: Percentiles,
    server_cpu_s_per_1000: f64,
    proxy_cpu_s_per_1000: f64,
    proxy_rss_kib_start: u64,
    proxy_rss_kib_end: u64,
    proxy_rss_kib_max: u64,
    #[serde(skip)]
    sorted_latencies_us: Vec<u64>,
}

#[derive(Serialize, Debug, Clone, Default)]
struct Percentiles {
    p50: u64,
    p90: u64,
    p99: u64,
    max: u64,
}

#[derive(Serialize)]
struct Report<'a> {
    machine: String,
    server: ServerKind,
    flow: Flow,
    instances: usize,
    rounds: usize,
    senders: usize,
    resources: usize,
    window: usize,
    phases: &'a [Phase],
    proxied_over_direct_throughput: f64,
    proxy_cpu_over_server_cpu_per_request: f64,
    /// With `--tls`: proxied-tls over proxied, throughput.
    tls_over_plain_throughput: Option<f64>,
    /// With `--tls`: proxied-tls over proxied, jat-proxy CPU per request.
    tls_over_plain_proxy_cpu_per_request: Option<f64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if !args.proxy_bin.exists() {
        eprintln!(
            "jat-bench: {} not found; build it first: cargo build --release",
            args.proxy_bin.display()
        );
        std::process::exit(2);
    }
    if args.instances == 0 || (args.instances > 1 && args.server != ServerKind::Ejabberd) {
        eprintln!("jat-bench: --instances must be 1, or more with --server ejabberd");
        std::process::exit(2);
    }
    if args.tls && (args.instances != 1 || args.flow != Flow::Iq) {
        eprintln!("jat-bench: --tls takes --instances 1 and --flow iq");
        std::process::exit(2);
    }
    // A CA and a listener certificate made for the run.
    let pki = args.tls.then(|| {
        let dir = testkit::work_dir("bench-pki");
        let ca = testkit::pki::Ca::new("jat-bench CA");
        let ca_file = ca.write(&dir, "ca");
        let leaf = ca.issue(&dir, "server", &["localhost", COMPONENT, TLS_COMPONENT]);
        (dir, ca_file, leaf)
    });
    let server = Server::start(args.server, pki.as_ref().map(|(_, _, l)| l));
    server.register("impl");
    for i in 0..args.senders {
        server.register(&format!("s{i}"));
    }
    let config = write_config(
        server.dir(),
        "jat-proxy.toml",
        &ConfigSpec {
            component: COMPONENT,
            server: server.component(),
            also: &[],
            secret: SECRET,
            target: "impl@localhost",
            key_file: &server.dir().join("keys.toml"),
            proxy_extra: "messages = \"forward\"\noutbound = \"any\"",
            extra: "\n[limits]\nrate_per_sender = 1000000.0\nrate_burst = 1000000\n",
        },
    );
    let proxies: Vec<ProxyProcess> = (0..args.instances)
        .map(|_| ProxyProcess::start_with_log(&args.proxy_bin, &config, "warn"))
        .collect();
    wait_for_login(&server, args.instances);
    let proxy_pids: Vec<u32> = proxies.iter().map(ProxyProcess::pid).collect();
    // The TLS instance: its own domain, on the server's direct-TLS listener.
    let tls_proxy = pki.as_ref().map(|(_, ca_file, _)| {
        let addr = server.component_tls().expect("a TLS listener");
        let config = write_config_server(
            server.dir(),
            "jat-proxy-tls.toml",
            &ConfigSpec {
                component: TLS_COMPONENT,
                server: addr,
                also: &[],
                secret: SECRET,
                target: "impl@localhost",
                key_file: &server.dir().join("keys-tls.toml"),
                proxy_extra: "",
                extra: "\n[limits]\nrate_per_sender = 1000000.0\nrate_burst = 1000000\n",
            },
            &format!(
                "{{ address = \"{addr}\", tls = true, name = \"{TLS_COMPONENT}\", ca = \"{}\" }}",
                ca_file.display()
            ),
        );
        let p = ProxyProcess::start_with_log(&args.proxy_bin, &config, "warn");
        let up = testkit::wait_until(Duration::from_secs(30), || {
            (server.component_logins() > args.instances || server_has_tls_login(&server))
                .then_some(())
        });
        assert!(
            up.is_some(),
            "the TLS instance did not log in:\n{}",
            p.log()
        );
        p
    });
    let tls_pids: Vec<u32> = tls_proxy.iter().map(ProxyProcess::pid).collect();

    // The implementing client: every resource answers every request at once.
    let stop = Arc::new(AtomicBool::new(false));
    let mut responders = Vec::new();
    let mut resources = Vec::new();
    for r in 0..args.resources {
        let c = Client::login(
            server.c2s(),
            "localhost",
            "impl",
            "pw",
            &format!("r{r}"),
            Answer::Subscriptions,
        )
        .await;
        if args.flow == Flow::Outbound {
            resources.push(c);
        } else {
            responders.push(tokio::spawn(respond(c, stop.clone())));
        }
    }
    let mut senders = Vec::new();
    for i in 0..args.senders {
        senders.push(
            Client::login(
                server.c2s(),
                "localhost",
                &format!("s{i}"),
                "pw",
                "bench",
                Answer::Nothing,
            )
            .await,
        );
    }
    let (mut senders, direct_targets, proxied_targets) = if args.flow == Flow::Outbound {
        // The implementing client's resources drive; the senders answer.
        let peers: Vec<String> = (0..args.senders)
            .map(|i| format!("s{i}@localhost/bench"))
            .collect();
        let escaped: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "{}@{COMPONENT}",
                    p.replace('@', "\\40").replace('/', "\\2f")
                )
            })
            .collect();
        for c in senders {
            responders.push(tokio::spawn(respond(c, stop.clone())));
        }
        let mut resources = resources;
        for (i, to) in [&peers[0], &escaped[0]].into_iter().enumerate() {
            warm_up(&mut resources[0], to, 1 + 20 * args.instances * i).await;
        }
        (resources, peers, escaped)
    } else {
        // Until an instance knows a resource, it holds requests (then service-unavailable):
        // warm up both paths, and every instance (the server picks one at random per
        // stanza).
        warm_up(&mut senders[0], COMPONENT, 20 * args.instances).await;
        warm_up(&mut senders[0], "impl@localhost/r0", 1).await;
        if args.tls {
            warm_up(&mut senders[0], TLS_COMPONENT, 20).await;
        }
        let direct = (0..args.resources)
            .map(|r| format!("impl@localhost/r{r}"))
            .collect();
        (senders, direct, vec![COMPONENT.to_string()])
    };
    let proxied_n = args.proxied_requests.unwrap_or(args.requests);
    let rounds = args.rounds.max(1);
    let (mut directs, mut proxieds, mut tlss) = (Vec::new(), Vec::new(), Vec::new());
    let tls_targets = vec![TLS_COMPONENT.to_string()];
    for _ in 0..rounds {
        let (s, direct) = run_phase(
            "direct",
            senders,
            &direct_targets,
            &args,
            args.requests / rounds,
            server.pid(),
            &proxy_pids,
        )
        .await;
        let (s, proxied) = run_phase(
            "proxied",
            s,
            &proxied_targets,
            &args,
            proxied_n / rounds,
            server.pid(),
            &proxy_pids,
        )
        .await;
        senders = s;
        if args.tls {
            let (s, tls) = run_phase(
                "proxied-tls",
                senders,
                &tls_targets,
                &args,
                proxied_n / rounds,
                server.pid(),
                &tls_pids,
            )
            .await;
            senders = s;
            tlss.push(tls);
        }
        directs.push(direct);
        proxieds.push(proxied);
    }
    stop.store(true, Ordering::Relaxed);
    let per_round: Vec<String> = directs
        .iter()
        .zip(&proxieds)
        .map(|(d, p)| format!("{:.2}", p.requests_per_second / d.requests_per_second))
        .collect();

    let mut phases = vec![merge(directs), merge(proxieds)];
    if !tlss.is_empty() {
        phases.push(merge(tlss));
    }
    let tls_ratios = phases.get(2).map(|t| {
        (
            t.requests_per_second / phases[1].requests_per_second,
            t.proxy_cpu_s_per_1000 / phases[1].proxy_cpu_s_per_1000,
            t.server_cpu_s_per_1000 / phases[1].server_cpu_s_per_1000,
        )
    });
    let ratio_tput = phases[1].requests_per_second / phases[0].requests_per_second;
    let server_per_req = phases[1].server_cpu_s_per_1000;
    let ratio_cpu = if server_per_req > 0.0 {
        phases[1].proxy_cpu_s_per_1000 / server_per_req
    } else {
        f64::NAN
    };
    println!(
        "{}, {:?}, {} jat-proxy instance(s), {} senders, {} resources, window {}",
        server.name(),
        args.flow,
        args.instances,
        args.senders,
        args.resources,
        args.window
    );
    print_table(&phases);
    println!();
    // The goals of BENCHMARKS.md were set on Prosody (single-threaded: every proxied stanza
    // crosses it twice); ejabberd has none.
    let (goal_tput, goal_cpu) = match args.server {
        ServerKind::Prosody => (
            "   (goal >= 0.45; about 0.5 is the ceiling)",
            "   (goal <= 0.10)",
        ),
        ServerKind::Ejabberd => ("", ""),
    };
    println!("proxied / direct throughput:                 {ratio_tput:.3}{goal_tput}");
    println!(
        "jat-proxy CPU / {} CPU, per request: {ratio_cpu:>8.3}{goal_cpu}",
        server.name()
    );
    println!(
        "jat-proxy RSS over the proxied phase:        {} KiB at start, {} KiB at end, {} KiB max",
        phases[1].proxy_rss_kib_start, phases[1].proxy_rss_kib_end, phases[1].proxy_rss_kib_max
    );
    if rounds > 1 {
        println!(
            "proxied / direct throughput by round:        {}",
            per_round.join(" ")
        );
    }
    if let Some((tput, cpu, server_cpu)) = tls_ratios {
        println!("proxied-tls / proxied throughput:            {tput:.3}");
        println!("proxied-tls / proxied jat-proxy CPU per req: {cpu:.3}");
        println!(
            "proxied-tls / proxied {} CPU per req: {server_cpu:>7.3}",
            server.name()
        );
    }
    let report = Report {
        machine: machine(),
        server: args.server,
        flow: args.flow,
        instances: args.instances,
        rounds,
        senders: args.senders,
        resources: args.resources,
        window: args.window,
        phases: &phases,
        proxied_over_direct_throughput: ratio_tput,
        proxy_cpu_over_server_cpu_per_request: ratio_cpu,
        tls_over_plain_throughput: tls_ratios.map(|r| r.0),
        tls_over_plain_proxy_cpu_per_request: tls_ratios.map(|r| r.1),
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("JSON written to {}", path.display());
    }
    if let Some(path) = &args.svg {
        draw(path, &phases, &args, server.name());
        println!("chart written to {}", path.display());
    }
    // Stopped cleanly, so that a profiler wrapped around it (--proxy-bin) writes its output.
    let proxies: Vec<ProxyProcess> = proxies.into_iter().chain(tls_proxy).collect();
    for p in &proxies {
        p.signal("TERM");
    }
    for mut p in proxies {
        let _ = p.wait_exit(Duration::from_secs(30));
    }
    if let Some((dir, _, _)) = pki {
        testkit::discard_work_dir(&dir, "pki");
    }
}

/// Whether the server logged the TLS instance's login (ejabberd names the domain).
fn server_has_tls_login(server: &Server) -> bool {
    match server {
        Server::Prosody(_) => false,
        Server::Ejabberd(e) => e.component_logins(TLS_COMPONENT) > 0,
    }
}

fn wait_for_login(server: &Server, instances: usize) {
    // Several logins at once to an Erlang server on a busy machine: a generous limit.
    let ok = testkit::wait_until(Duration::from_secs(30), || {
        (server.component_logins() >= instances).then_some(())
    });
    assert!(
        ok.is_some(),
        "jat-proxy did not log in {instances} time(s):\n{}",
        server.log()
    );
}

async fn respond(mut c: Client, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(el) = c.recv(Duration::from_millis(500)).await else {
            continue;
        };
        match (el.name(), el.attr("type")) {
            ("iq", Some("get" | "set")) => c.send(reply_to(&el, "result", "")),
            // Write back to whoever wrote (a token address, or the sender when direct).
            ("message", t) if t != Some("error") => {
                if let (Some(id), Some(from)) = (el.attr("id"), el.attr("from")) {
                    c.send_xml(&format!(
                        "<message type='chat' id='{id}' to='{from}'><body>ok</body></message>"
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Sends requests to `to` one at a time until `results` of them were answered with a result.
async fn warm_up(c: &mut Client, to: &str, results: usize) {
    let mut ok = 0;
    for i in 0..100 + results {
        let id = format!("warm-{to}-{i}");
        c.send_xml(&format!(
            "<iq type='get' id='{id}' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
        if let Some(r) = c.recv_iq(&id, Duration::from_secs(5)).await
            && r.attr("type") == Some("result")
        {
            ok += 1;
            if ok == results {
                return;
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{to} answered {ok} of the {results} warm-up requests");
}

/// (pid, parent pid, user + system CPU seconds) of a process, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((pid, ppid, ticks as f64 / 100.0))
}

/// CPU seconds of `pid` and every process below it (ejabberd's Erlang VM runs in a child of
/// `ejabberdctl`; Prosody and jat-proxy are one process each).
fn cpu_seconds_tree(pid: u32) -> f64 {
    let all: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(stat)
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            all.iter()
                .filter(|(p, pp, _)| *pp == parent && *p != parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    all.iter()
        .filter(|(p, _, _)| tree.contains(p))
        .map(|(_, _, cpu)| cpu)
        .sum()
}

fn cpu_seconds_all(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds_tree(p)).sum()
}

fn rss_kib_all(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    name: &str,
    senders: Vec<Client>,
    targets: &[String],
    args: &Args,
    requests: usize,
    server_pid: u32,
    proxy_pids: &[u32],
) -> (Vec<Client>, Phase) {
    let k = senders.len();
    let per_sender = requests / k;
    let window = (args.window / k).max(1);
    let rss_start = rss_kib_all(proxy_pids).unwrap_or(0);
    let rss_max = Arc::new(std::sync::atomic::AtomicU64::new(rss_start));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (rss_max, sampling) = (rss_max.clone(), sampling.clone());
        let proxy_pids = proxy_pids.to_vec();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib_all(&proxy_pids) {
                    rss_max.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let cpu_server = cpu_seconds_tree(server_pid);
    let cpu_proxy = cpu_seconds_all(proxy_pids);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (si, mut c) in senders.into_iter().enumerate() {
        let targets = targets.to_vec();
        let name = name.to_owned();
        let flow = args.flow;
        tasks.push(tokio::spawn(async move {
            let mut in_flight: HashMap<String, Instant> = HashMap::new();
            let mut latencies = Vec::with_capacity(per_sender);
            let (mut sent, mut errors, mut lost) = (0usize, 0usize, 0usize);
            while latencies.len() + errors + lost < per_sender {
                while sent < per_sender && in_flight.len() < window {
                    let id = format!("{name}-{si}-{sent}");
                    let to = &targets[sent % targets.len()];
                    c.send_xml(&match flow {
                        Flow::Iq | Flow::Outbound => format!(
                            "<iq type='get' id='{id}' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>"
                        ),
                        Flow::Message => format!(
                            "<message type='chat' id='{id}' to='{to}'><body>{id}</body></message>"
                        ),
                    });
                    in_flight.insert(id, Instant::now());
                    sent += 1;
                }
                match c.recv(Duration::from_secs(30)).await {
                    Some(r) if r.name() == "iq" || r.name() == "message" => {
                        if let Some(t0) = r.attr("id").and_then(|id| in_flight.remove(id)) {
                            if matches!(r.attr("type"), Some("result") | Some("chat")) {
                                latencies.push(t0.elapsed().as_micros() as u64);
                            } else {
                                errors += 1;
                            }
                        }
                    }
                    Some(_) => {}
                    None => {
                        lost += in_flight.len();
                        in_flight.clear();
                    }
                }
            }
            (c, latencies, errors, lost)
        }));
    }
    let mut clients = Vec::new();
    let mut all = Vec::new();
    let (mut errors, mut lost) = (0, 0);
    for t in tasks {
        let (c, l, e, x) = t.await.unwrap();
        clients.push(c);
        all.extend(l);
        errors += e;
        lost += x;
    }
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds_tree(server_pid) - cpu_server;
    let proxy_cpu = cpu_seconds_all(proxy_pids) - cpu_proxy;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    all.sort_unstable();
    let done = all.len();
    let total = done + errors + lost;
    let phase = Phase {
        name: name.to_owned(),
        requests: total,
        errors,
        lost,
        seconds,
        requests_per_second: done as f64 / seconds,
        latency_us: percentiles(&all),
        server_cpu_s_per_1000: server_cpu / total as f64 * 1000.0,
        proxy_cpu_s_per_1000: proxy_cpu / total as f64 * 1000.0,
        proxy_rss_kib_start: rss_start,
        proxy_rss_kib_end: rss_kib_all(proxy_pids).unwrap_or(0),
        proxy_rss_kib_max: rss_max.load(Ordering::Relaxed),
        sorted_latencies_us: all,
    };
    eprintln!("{name}: done");
    (clients, phase)
}

fn percentiles(sorted: &[u64]) -> Percentiles {
    let n = sorted.len();
    let pct = |p: f64| {
        sorted
            .get(((n as f64 * p) as usize).min(n.saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Percentiles {
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: sorted.last().copied().unwrap_or(0),
    }
}

/// The rounds of one phase as one: counts, time and CPU summed, latencies pooled.
fn merge(parts: Vec<Phase>) -> Phase {
    let sum = |f: fn(&Phase) -> f64| parts.iter().map(f).sum::<f64>();
    let requests: usize = parts.iter().map(|p| p.requests).sum();
    let errors: usize = parts.iter().map(|p| p.errors).sum();
    let lost: usize = parts.iter().map(|p| p.lost).sum();
    let seconds = sum(|p| p.seconds);
    let server_cpu = sum(|p| p.server_cpu_s_per_1000 * p.requests as f64 / 1000.0);
    let proxy_cpu = sum(|p| p.proxy_cpu_s_per_1000 * p.requests as f64 / 1000.0);
    let mut all: Vec<u64> = parts
        .iter()
        .flat_map(|p| p.sorted_latencies_us.iter().copied())
        .collect();
    all.sort_unstable();
    Phase {
        name: parts[0].name.clone(),
        requests,
        errors,
        lost,
        seconds,
        requests_per_second: all.len() as f64 / seconds,
        latency_us: percentiles(&all),
        server_cpu_s_per_1000: server_cpu / requests as f64 * 1000.0,
        proxy_cpu_s_per_1000: proxy_cpu / requests as f64 * 1000.0,
        proxy_rss_kib_start: parts[0].proxy_rss_kib_start,
        proxy_rss_kib_end: parts[parts.len() - 1].proxy_rss_kib_end,
        proxy_rss_kib_max: parts.iter().map(|p| p.proxy_rss_kib_max).max().unwrap_or(0),
        sorted_latencies_us: all,
    }
}

fn print_table(phases: &[Phase]) {
    println!(
        "{:<11} {:>9} {:>6} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>14} {:>14}",
        "phase",
        "requests",
        "errors",
        "lost",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "server CPU s",
        "jat-proxy CPU s"
    );
    println!(
        "{:<11} {:>9} {:>6} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>14} {:>14}",
        "", "", "", "", "", "", "", "", "", "per 1000 req", "per 1000 req"
    );
    for p in phases {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{:<11} {:>9} {:>6} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>14.3} {:>14.3}",
            p.name,
            p.requests,
            p.errors,
            p.lost,
            p.requests_per_second,
            ms(p.latency_us.p50),
            ms(p.latency_us.p90),
            ms(p.latency_us.p99),
            ms(p.latency_us.max),
            p.server_cpu_s_per_1000,
            p.proxy_cpu_s_per_1000
        );
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu} (shared machine)")
}

/// Latency by percentile, both phases, as SVG.
fn draw(path: &Path, phases: &[Phase], args: &Args, server: &str) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max_ms = phases
        .iter()
        .filter_map(|p| {
            p.sorted_latencies_us
                .get((p.sorted_latencies_us.len() as f64 * 0.999) as usize)
        })
        .max()
        .copied()
        .unwrap_or(1) as f64
        / 1000.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "jat-bench: latency by percentile ({} senders, window {}, {} resources; {server}, {} instance(s))",
                args.senders, args.window, args.resources, args.instances
            ),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..99.9f64, 0f64..max_ms * 1.05)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .unwrap();
    for (p, color) in phases.iter().zip([BLUE, RED, GREEN]) {
        let n = p.sorted_latencies_us.len();
        if n == 0 {
            continue;
        }
        let points = (0..999).map(|i| {
            let q = i as f64 / 10.0;
            let v = p.sorted_latencies_us[((n as f64 * q / 100.0) as usize).min(n - 1)];
            (q, v as f64 / 1000.0)
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .unwrap()
            .label(format!("{} ({:.0} req/s)", p.name, p.requests_per_second))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .unwrap();
    root.present().unwrap();
}
