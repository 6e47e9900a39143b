//! `jat-proxy --config FILE`: run the component. `jat-proxy keys rotate --config FILE`: add a
//! new current token key to the key file (running instances pick it up by themselves).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jat_proxy::{config, keys, random::OsRandom, session};
use tracing::{error, info};

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the token key file.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Check the configuration and the key file, then exit.
    Check,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Add a new current key; prune keys whose tokens have all expired.
    Rotate,
    /// List the key ids and when they were created (never the secrets).
    List,
}

const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Some(path) = cli.config else {
        eprintln!("jat-proxy: --config FILE is required (see --help)");
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jat-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut rng = OsRandom::new();
    let now = session::unix_now();
    match cli.command {
        Some(Command::Keys {
            action: KeysAction::Rotate,
        }) => {
            let mut set = match keys::load_or_create(&config.key_file, &mut rng, now) {
                Ok((set, _)) => set,
                Err(e) => return config_error(e),
            };
            let id = set.rotate(&mut rng, now);
            let pruned = set.prune(
                now,
                config.token_lifetime,
                config.key_reload_interval.as_secs(),
            );
            if let Err(e) = keys::save(&config.key_file, &set, &mut rng) {
                return config_error(e);
            }
            println!(
                "new current key: {id}; keys now: {:?}; pruned: {pruned:?}",
                set.ids()
            );
            ExitCode::SUCCESS
        }
        Some(Command::Keys {
            action: KeysAction::List,
        }) => match keys::load(&config.key_file) {
            Ok(set) => {
                for id in set.ids() {
                    let k = set.get(id).expect("listed");
                    let mark = if id == set.current().id() {
                        " (current)"
                    } else {
                        ""
                    };
                    println!("key {id} created {}{mark}", k.created());
                }
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        Some(Command::Check) => match keys::load_or_create(&config.key_file, &mut rng, now) {
            Ok(_) => {
                println!("configuration and key file OK");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        None => {
            let keys = match keys::load_or_create(&config.key_file, &mut rng, now) {
                Ok((set, created)) => {
                    if created {
                        info!(file = %config.key_file.display(), "created a new key file");
                    }
                    set
                }
                Err(e) => return config_error(e),
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    error!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(session::run(config, keys)) {
                Ok(session::Exit::Signal) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: keys::KeyFileError) -> ExitCode {
    eprintln!("jat-proxy: {e}");
    ExitCode::from(EXIT_CONFIG)
}
