//! The session's side of an in-place upgrade: checking the new binary, handing the streams
//! over, and going on with the streams the previous process handed over.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{info, warn};

use crate::config::Config;
use crate::endpoint::{Endpoint, History, LinkId};
use crate::upgrade::{Handover, Program, formats_from_check};

/// How long the new binary may take to check the configuration before an upgrade.
const CHECK_LIMIT: Duration = Duration::from_secs(20);

/// What an upgrade needs: the command to `exec` (whose binary checks the configuration
/// first).
pub(super) struct Upgrader {
    pub(super) program: Program,
}

/// The new binary's check: the record formats it reads, or why the upgrade is refused.
pub(super) type Check = Pin<Box<dyn Future<Output = Result<Vec<u16>, String>> + Send>>;

impl Upgrader {
    /// Has the binary now installed at the program's path check the configuration and the
    /// key file it will run with, given the arguments the `exec` will give it: the new code
    /// judges them, and a binary that does not run at all, or does not take one of the
    /// arguments, is found out here, while this process still serves. It must also say
    /// which handover record formats it reads: a build that does not (one without in-place
    /// upgrades) would refuse the `--handover` it is `exec`ed with, and end the service.
    pub(super) fn check(&self) -> Check {
        let mut cmd = tokio::process::Command::from(self.program.check_command());
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let path = self.program.path().to_owned();
        Box::pin(async move {
            let out = match timeout(CHECK_LIMIT, cmd.output()).await {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => return Err(format!("cannot run {}: {e}", path.display())),
                Err(_) => {
                    return Err(format!(
                        "{} check did not finish within {} s",
                        path.display(),
                        CHECK_LIMIT.as_secs()
                    ));
                }
            };
            if out.status.success() {
                return formats_from_check(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
                    format!(
                        "{} passes check but reports no handover format (a build without in-place \
                         upgrades, which could not take the live streams): restart the service \
                         to run it",
                        path.display()
                    )
                });
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            Err(format!(
                "{} check failed ({}): {why}",
                path.display(),
                out.status
            ))
        })
    }
}

/// The streams an upgrade handed over that can be used, and the resources known then. A
/// stream is closed with a footer (and its server logged in to again, if configured) when
/// it cannot be used: the record is of another format, or the configuration now names
/// another component or no longer that server.
pub(super) fn resume(
    h: Handover,
    config: &Config,
    ep: &mut Endpoint,
) -> (Vec<(LinkId, TcpStream)>, Vec<String>) {
    let unusable = |sockets: Vec<std::net::TcpStream>, why: String| {
        warn!("cannot go on with the stream handed over: {why}; closing it and logging in again");
        for s in sockets {
            close_handed_over(s);
        }
        (Vec::new(), Vec::new())
    };
    let record = match h.record {
        Ok(r) => r,
        Err(e) => return unusable(h.sockets, e.to_string()),
    };
    if record.streams.len() != h.sockets.len() {
        let why = format!(
            "{} sockets for {} streams",
            h.sockets.len(),
            record.streams.len()
        );
        return unusable(h.sockets, why);
    }
    if record.component != config.component.jid {
        let why = format!(
            "it is for {}, the configuration now says {}",
            record.component, config.component.jid
        );
        return unusable(h.sockets, why);
    }
    let mut resumed = Vec::new();
    let now = super::clock();
    for (socket, st) in h.sockets.into_iter().zip(record.streams) {
        match config
            .component
            .servers
            .iter()
            .find(|s| s.address == st.server)
        {
            None => {
                warn!(
                    server = %st.server,
                    "cannot go on with the stream handed over: the configuration no longer names its server; closing it"
                );
                close_handed_over(socket);
                continue;
            }
            Some(s) if s.tls.is_some() => {
                warn!(
                    server = %st.server,
                    "cannot go on with the stream handed over: the configuration now says `tls = true` for its server; closing it and logging in with TLS"
                );
                close_handed_over(socket);
                continue;
            }
            Some(_) => {}
        }
        let history = History {
            established_ms: st.established_unix_ms,
            upgrades: st.upgrades,
        };
        let resumed_link = socket
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(socket))
            .map_err(|e| e.to_string())
            .and_then(|tcp| {
                ep.resume(&st.server, &st.header, &st.pending, history, now)
                    .map_err(|e| e.to_string())
                    .map(|link| link.map(|l| (l, tcp)))
            });
        match resumed_link {
            Ok(Some(link)) => {
                info!(
                    server = %st.server,
                    pending_bytes = st.pending.len(),
                    upgrades = st.upgrades,
                    "going on with the stream handed over"
                );
                resumed.push(link);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(server = %st.server, "cannot go on with the stream handed over: {e}; logging in again");
            }
        }
    }
    if !resumed.is_empty() {
        info!(
            component = %config.component.jid,
            streams = resumed.len(),
            from_build = %record.build,
            resources = record.resources.len(),
            "upgraded in place: going on with the same stream"
        );
    }
    (resumed, record.resources)
}

/// Ends a handed-over stream this build cannot go on with: our footer, bounded in time.
fn close_handed_over(socket: std::net::TcpStream) {
    use std::io::Write;
    let _ = socket.set_nonblocking(false);
    let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = (&socket).write_all(b"</stream:stream>");
    let _ = socket.shutdown(std::net::Shutdown::Both);
}
