//! `jat-proxy --config FILE`: run the component. `jat-proxy keys rotate --config FILE`: add a
//! new current token key to the key file (running instances pick it up by themselves); it
//! and `keys list` read only the `[keys]` section (and the `[proxy]` token lifetimes).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use jat_proxy::{OsRandom, config, keys, session, upgrade};
use tracing::{error, info, warn};

mod log_json;

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How log lines on stderr are written: text, or json (one object per line with
    /// timestamp, level, target, message and fields; for journald and log shippers).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
    /// Set by the process itself when it execs a new binary for an in-place upgrade.
    #[arg(long, hide = true, value_name = "PID:SOCKET:RECORD")]
    handover: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the token key file.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Check the configuration and the key file, then exit; also prints `handover:` and the
    /// in-place upgrade record formats this build reads (e.g. `handover: 1,2`).
    Check,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Add a new current key; prune keys whose tokens have all expired.
    Rotate,
    /// List the key ids and when they were created, oldest first (never the secrets).
    List,
}

const EXIT_CONFIG: u8 = 2;

/// Whether log lines are JSON: then a configuration error is a log line too.
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // First, before anything opens a descriptor: what an in-place upgrade handed over.
    let handover = cli.handover.as_deref().map(upgrade::adopt);
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, Ordering::Relaxed);
            logs.event_format(log_json::Json).init();
        }
    }
    let Some(path) = cli.config else {
        return config_error("--config FILE is required (see --help)");
    };
    let mut rng = OsRandom::new();
    let now = session::unix_now();
    let command = match cli.command {
        // The key commands read only `[keys]` (and the token lifetime): they work where the
        // component secret cannot be resolved, e.g. outside the service's environment.
        Some(Command::Keys { action }) => {
            let config = match config::load_keys(&path) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            return keys_command(action, &config, &mut rng, now);
        }
        other => other,
    };
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    // Keys still read at their old place: one warning each, saying where they go now.
    for d in &config.deprecated {
        warn!("{d}");
    }
    // A stream without TLS to another host crosses the network in clear (issue 19).
    for s in config
        .component
        .servers
        .iter()
        .filter(|s| s.tls.is_none() && !s.is_loopback())
    {
        warn!(
            server = %s.address,
            "this server is not on loopback and its stream has no TLS: the handshake digest, every stanza and every sender address cross the network in clear; set `tls = true` for it (README, \"TLS\")"
        );
    }
    if let Some(Command::Check) = command {
        return match keys::load_or_create(&config.keys.key_file, &mut rng, now) {
            Ok(_) => {
                println!("configuration and key file OK");
                // For a process upgrading to this build: what it can hand over to it.
                println!("{}", upgrade::check_line());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        };
    }
    // SIGTERM, SIGINT, SIGHUP and SIGUSR2 wait (blocked) until the session has its handlers
    // in; every thread started from here on keeps them blocked, so that only this one, which
    // an upgrade `exec`s from, ever takes them. (After an upgrade they are blocked already,
    // held across `exec`.)
    if let Err(e) = upgrade::signals::block() {
        warn!("cannot block SIGTERM, SIGINT, SIGHUP and SIGUSR2 during the start: {e}");
    }
    let handover = match handover {
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            warn!("{e}: starting afresh");
            None
        }
        None => None,
    };
    let program = match upgrade::Program::current() {
        Ok(p) => p,
        Err(e) => {
            error!("cannot tell which binary is running: {e}");
            return ExitCode::FAILURE;
        }
    };
    let build = upgrade::BuildId::compute();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        binary = %program.path().display(),
        resuming = handover.is_some(),
        "jat-proxy starting"
    );
    let keys = match keys::load_or_create(&config.keys.key_file, &mut rng, now) {
        Ok((set, created)) => {
            if created {
                info!(file = %config.keys.key_file.display(), "created a new key file");
            }
            set
        }
        Err(e) => return config_error(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The runtime's blocking pool (name lookups): no signal for its threads either.
        .on_thread_start(|| {
            let _ = upgrade::signals::block();
        })
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = session::Start {
        program,
        config_path: path,
        build,
        handover,
    };
    match runtime.block_on(session::run(config, keys, start)) {
        Ok(session::Exit::Signal) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn keys_command(
    action: KeysAction,
    config: &config::KeysConfig,
    rng: &mut OsRandom,
    now: u64,
) -> ExitCode {
    match action {
        KeysAction::Rotate => match keys::rotate(
            &config.key_file,
            rng,
            now,
            config.token_lifetime,
            config.reload_interval.as_secs(),
        ) {
            Ok(r) => {
                if r.created {
                    println!("created the key file {}", config.key_file.display());
                }
                println!(
                    "new current key: {}; keys now (oldest first): {:?}; pruned: {:?}",
                    r.id, r.ids, r.pruned
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        KeysAction::List => match keys::load(&config.key_file) {
            Ok(set) => {
                // In the order the keys were added: the last one seals new tokens.
                let current = set.current().id();
                for k in set.keys() {
                    let mark = if k.id() == current { " (current)" } else { "" };
                    println!("key {} created {}{mark}", k.id(), k.created());
                }
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
    }
}

/// A mistake in the configuration or key file: one message, exit status 2.
fn config_error(e: impl std::fmt::Display) -> ExitCode {
    if JSON_LOGS.load(Ordering::Relaxed) {
        error!("{e}");
    } else {
        eprintln!("jat-proxy: {e}");
    }
    ExitCode::from(EXIT_CONFIG)
}
