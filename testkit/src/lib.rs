//! Test harness for jat-proxy: real servers on loopback, a raw XMPP client, and the jat-proxy
//! binary as a child process. Used by the integration tests, the demo and the load generator.
//!
//! Every process started here is a child of the test process, stopped by PID when its guard
//! is dropped (also when a test panics), and started under `setpriv --pdeathsig KILL` so that
//! it dies with the test process even when that is killed.
#![forbid(unsafe_code)]

pub mod client;
pub mod cluster;
pub mod deployment;
pub mod ejabberd;
pub mod http;
pub mod load;
pub mod pki;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod prosody;
pub mod proxy;

pub use client::Client;
pub use prosody::Prosody;
pub use proxy::ProxyProcess;

use std::time::{Duration, Instant};

/// Prints a measurement line that a reader of the test output must see, also when the test
/// passes: written to stderr directly, past libtest's capture of `println!`.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "[measured] {line}");
}

/// Polls `f` every 50 ms until it returns `Some` or `limit` passes.
pub fn wait_until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes a server's work directory, unless the test is panicking: then it is kept, and
/// its path printed, for inspection.
pub fn discard_work_dir(dir: &std::path::Path, what: &str) {
    if std::thread::panicking() {
        eprintln!("{what} work dir kept for inspection: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A fresh directory under the system temp dir that the `prosody`/`ejabberd` users can enter.
pub fn work_dir(tag: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("jat-{tag}-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create work dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}
