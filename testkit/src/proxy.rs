//! The jat-proxy binary as a child process, with its log captured.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::process::Owned;

/// What a test's jat-proxy configuration says.
pub struct ConfigSpec<'a> {
    /// Component domain.
    pub component: &'a str,
    /// The server's component listener.
    pub server: std::net::SocketAddr,
    /// More listeners the instance also connects to (the other nodes of a cluster).
    pub also: &'a [std::net::SocketAddr],
    /// Component secret.
    pub secret: &'a str,
    /// The implementing client's account.
    pub target: &'a str,
    /// The key file.
    pub key_file: &'a Path,
    /// More keys of the `[proxy]` section.
    pub proxy_extra: &'a str,
    /// More TOML, appended as is (sections after `[keys]`).
    pub extra: &'a str,
}

/// Writes a jat-proxy configuration file into `dir` and returns its path.
pub fn write_config(dir: &Path, name: &str, spec: &ConfigSpec<'_>) -> PathBuf {
    let server = if spec.also.is_empty() {
        format!("\"{}\"", spec.server)
    } else {
        let all: Vec<String> = std::iter::once(&spec.server)
            .chain(spec.also)
            .map(|s| format!("\"{s}\""))
            .collect();
        format!("[{}]", all.join(", "))
    };
    write_config_server(dir, name, spec, &server)
}

/// Writes a jat-proxy configuration file into `dir` as [`write_config`] does, but with
/// `server` as the value of `[component] server`, as is (e.g. a table with `tls = true`;
/// `spec.server` and `spec.also` are not used).
pub fn write_config_server(dir: &Path, name: &str, spec: &ConfigSpec<'_>, server: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[component]\njid = \"{}\"\nserver = {}\nsecret = \"{}\"\n\
             reconnect_max_secs = 2\n\n[proxy]\ntarget_address = \"{}\"\n{}\n[keys]\nfile = \"{}\"\n{}",
            spec.component,
            server,
            spec.secret,
            spec.target,
            spec.proxy_extra,
            spec.key_file.display(),
            spec.extra
        ),
    )
    .unwrap();
    // It holds the component secret: jat-proxy refuses it readable by others.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A running jat-proxy.
pub struct ProxyProcess {
    process: Owned,
    binary: PathBuf,
    config: PathBuf,
    filter: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl ProxyProcess {
    /// Starts `binary --config config` with debug logs from jat-proxy (or `$JAT_TEST_LOG`).
    pub fn start(binary: &Path, config: &Path) -> ProxyProcess {
        let filter =
            std::env::var("JAT_TEST_LOG").unwrap_or_else(|_| "info,jat_proxy=debug".into());
        Self::start_with_log(binary, config, &filter)
    }

    /// Starts it with this `RUST_LOG` filter (benchmarks run it at `info`).
    pub fn start_with_log(binary: &Path, config: &Path, filter: &str) -> ProxyProcess {
        Self::start_with_env(binary, config, filter, &[])
    }

    /// Starts it with this `RUST_LOG` filter and more environment variables (e.g. the
    /// service manager's `NOTIFY_SOCKET`).
    pub fn start_with_env(
        binary: &Path,
        config: &Path,
        filter: &str,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let process = spawn(binary, config, filter, &env, &[]);
        ProxyProcess {
            process,
            binary: binary.to_owned(),
            config: config.to_owned(),
            filter: filter.to_owned(),
            env,
            args: Vec::new(),
        }
    }

    /// Starts it as [`ProxyProcess::start`] does, with more arguments after `--config FILE`
    /// (e.g. `--log-format text`).
    pub fn start_with_args(binary: &Path, config: &Path, args: &[&str]) -> ProxyProcess {
        let filter =
            std::env::var("JAT_TEST_LOG").unwrap_or_else(|_| "info,jat_proxy=debug".into());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        ProxyProcess {
            process: spawn(binary, config, &filter, &[], &args),
            binary: binary.to_owned(),
            config: config.to_owned(),
            filter,
            env: Vec::new(),
            args,
        }
    }

    /// Its configuration file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Whether it has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// Waits until the proxy has logged in `n` times in total (since its start).
    pub fn wait_sessions(&self, n: usize, limit: Duration) {
        let ok = crate::wait_until(limit, || (self.sessions() >= n).then_some(()));
        if ok.is_none() {
            panic!(
                "jat-proxy did not log in {n} time(s) within {limit:?}:\n{}",
                self.log()
            );
        }
    }

    /// How many sessions it established.
    pub fn sessions(&self) -> usize {
        self.log().matches("session established").count()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.process.output()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends a signal by PID ("TERM", "KILL", "HUP", "INT").
    pub fn signal(&self, sig: &str) {
        self.process.signal(sig)
    }

    /// Waits for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(limit)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.process.signal("KILL");
        let _ = self.process.wait_exit(Duration::from_secs(10));
    }

    /// Starts the same binary with the same config again (after it was stopped).
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = spawn(
            &self.binary,
            &self.config,
            &self.filter,
            &self.env,
            &self.args,
        );
    }
}

fn spawn(
    binary: &Path,
    config: &Path,
    filter: &str,
    env: &[(String, String)],
    args: &[String],
) -> Owned {
    let mut envs: Vec<(&str, &str)> = vec![("RUST_LOG", filter), ("NO_COLOR", "1")];
    envs.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend(args.iter().map(String::as_str));
    Owned::spawn("jat-proxy", binary, &all, &envs)
}

/// Runs the binary to completion with `args` and returns (status, stderr).
pub fn run_to_end(binary: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = std::process::Command::new(binary)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run jat-proxy");
    (
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The value of the field `name` in one line of jat-proxy's log (tracing's format:
/// `message name="value" other=value`), quotes removed.
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// The lines of a log that contain `what`, in order.
pub fn lines_with(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// Installs build number `n` of `binary` at `path` the way a package manager does — written
/// beside it, then renamed over it — and returns its build id. Each number is a different
/// file (the binary with a line of its own appended, which the ELF loader ignores), so the
/// build id that jat-proxy logs (`running build`: the first 12 hex digits of the SHA-256 of
/// the executable it runs) proves which one runs.
pub fn install_build(binary: &Path, path: &Path, n: usize) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(binary).unwrap();
    bytes.extend_from_slice(format!("\njat-proxy test build {n}\n").as_bytes());
    let id: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    id
}
