//! The systemd service notification protocol (`sd_notify(3)`): one datagram of
//! newline-separated `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET` (a path,
//! or an abstract name written with a leading `@`). Outside systemd the variable is unset
//! and every call does nothing. The variables are left in the environment on purpose: the
//! process that an in-place upgrade `exec`s is the same service (same PID) and goes on
//! notifying.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::debug;

/// Where notifications go, and how often the watchdog wants to hear from us.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, Target)>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` (the watchdog is ours
    /// when `$WATCHDOG_PID` is unset or is our PID).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            use std::os::unix::ffi::OsStrExt;
            let b = s.as_bytes();
            let target = match b.first()? {
                b'@' => Target::Abstract(b[1..].to_vec()),
                b'/' => Target::Path(std::path::PathBuf::from(&s)),
                _ => return None,
            };
            Some((UnixDatagram::unbound().ok()?, target))
        });
        let ours = std::env::var("WATCHDOG_PID")
            .map(|p| p.trim() == std::process::id().to_string())
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && ours)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// A notifier that sends nothing (tests).
    #[cfg(test)]
    pub fn none() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// How often `WATCHDOG=1` is to be sent: half the watchdog timeout, as systemd advises.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends `state` (one or more `KEY=VALUE` lines). Best effort: systemd not listening is
    /// not a reason to stop serving.
    pub fn send(&self, state: &str) {
        let Some((socket, target)) = &self.target else {
            return;
        };
        let sent = match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
            }
        };
        if let Err(e) = sent {
            debug!("cannot notify the service manager: {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` (with the monotonic time systemd 253 and later ask for) and a status.
    pub fn reloading(&self, status: &str) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"
        ));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// A status line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// `WATCHDOG=1`: the serving loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("jat-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), Target::Path(path.clone()))),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.ready("connected");
        n.reloading("upgrading");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=connected");
        let len = listener.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        assert!(msg.ends_with("\nSTATUS=upgrading"), "{msg}");
        assert_eq!(n.watchdog_every(), Some(Duration::from_secs(5)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let n = Notifier::none();
        n.ready("x");
        assert_eq!(n.watchdog_every(), None);
    }
}
