//! In-place upgrade: the running process `exec`s the binary installed at the path it was
//! started from, handing over its connected sockets and a [`Record`] of the streams' state,
//! so that the new code goes on with the same streams — no new handshake, no footer, same
//! PID.
//!
//! The sockets and the record (a memfd) cross `exec` as inherited file descriptors, named
//! to the new process by a hidden argument `--handover PID:SOCKET[,SOCKET...]:RECORD` (the
//! sockets in the order of the record's streams). The PID guards against the argument being
//! replayed by hand: only the process that wrote it (the same PID after `exec`) adopts the
//! descriptors.

mod record;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use rustix::io::{FdFlags, fcntl_setfd};

pub use record::{MAX_RECORD_BYTES, Record, RecordError, StreamRecord, VERSION};

/// The hidden command-line option that names the handed-over descriptors.
pub const HANDOVER_ARG: &str = "--handover";

/// How this process was started, so that it can `exec` the same command again: the path of
/// the binary (as started, not `/proc/self/exe`: a binary replaced on disk by the package
/// manager is the new version at the same path) and the arguments, without `--handover`.
#[derive(Debug, Clone)]
pub struct Program {
    path: PathBuf,
    args: Vec<OsString>,
}

impl Program {
    /// The current process's command line.
    pub fn current() -> io::Result<Program> {
        let mut argv = std::env::args_os();
        let argv0 = argv.next().map(PathBuf::from);
        let path = match argv0 {
            Some(p) if p.is_absolute() => p,
            Some(p) if p.components().count() > 1 => std::env::current_dir()?.join(p),
            // Found through $PATH, or no argv[0]: the file the kernel ran.
            _ => std::env::current_exe()?,
        };
        let mut args = Vec::new();
        let mut skip = false;
        for a in argv {
            if skip {
                skip = false;
                continue;
            }
            if a == HANDOVER_ARG {
                skip = true;
                continue;
            }
            if a.to_str()
                .is_some_and(|s| s.starts_with(&format!("{HANDOVER_ARG}=")))
            {
                continue;
            }
            args.push(a);
        }
        Ok(Program { path, args })
    }

    /// The binary's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces this process with the binary at [`Program::path`], run with the same
    /// arguments, handing over `streams` (the connected sockets, in the order of the
    /// record's streams, and the record) if given. Returns only if `exec` failed; the
    /// sockets are then as they were (closed on exec again), and this process goes on
    /// serving.
    pub fn exec(&self, streams: Option<(&[BorrowedFd<'_>], &Record)>) -> io::Error {
        let mut cmd = std::process::Command::new(&self.path);
        cmd.args(&self.args);
        let Some((sockets, record)) = streams.filter(|(s, _)| !s.is_empty()) else {
            return cmd.exec();
        };
        let memfd = match write_record(record) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let restore = || {
            // The sockets must not leak into the children this process spawns later.
            for s in sockets {
                let _ = fcntl_setfd(s, FdFlags::CLOEXEC);
            }
        };
        for s in sockets {
            if let Err(e) = fcntl_setfd(s, FdFlags::empty()) {
                restore();
                return e.into();
            }
        }
        let fds: Vec<String> = sockets.iter().map(|s| s.as_raw_fd().to_string()).collect();
        cmd.arg(HANDOVER_ARG).arg(format!(
            "{}:{}:{}",
            std::process::id(),
            fds.join(","),
            memfd.as_raw_fd()
        ));
        let e = cmd.exec();
        restore();
        e
    }
}

/// The record in an anonymous memory file, left open across `exec` (not close-on-exec).
fn write_record(record: &Record) -> io::Result<File> {
    let fd = rustix::fs::memfd_create("jat-proxy-handover", rustix::fs::MemfdFlags::empty())?;
    let mut f = File::from(fd);
    f.write_all(&record.encode())?;
    f.rewind()?;
    Ok(f)
}

/// What the previous process handed over.
#[derive(Debug)]
pub struct Handover {
    /// The connected sockets of the component streams, in the order of the record's
    /// streams (close-on-exec again, blocking mode as they were).
    pub sockets: Vec<std::net::TcpStream>,
    /// The state record, or why it cannot be used (the socket is then closed properly and
    /// an ordinary login follows).
    pub record: Result<Record, RecordError>,
}

/// Why `--handover` could not be honoured.
#[derive(Debug)]
pub enum AdoptError {
    /// The argument is not `PID:FD[,FD...]:FD`.
    Syntax,
    /// Written by another process (a stale or hand-written argument): nothing adopted.
    NotOurs(u32),
    /// The descriptors are not a socket and a file.
    Descriptors(&'static str),
    /// Reading the record failed.
    Io(io::Error),
}

impl std::fmt::Display for AdoptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdoptError::Syntax => {
                write!(f, "{HANDOVER_ARG} takes PID:SOCKET[,SOCKET...]:RECORD")
            }
            AdoptError::NotOurs(pid) => write!(
                f,
                "{HANDOVER_ARG} was written for process {pid}, not this one: ignored"
            ),
            AdoptError::Descriptors(why) => write!(f, "handed-over descriptors: {why}"),
            AdoptError::Io(e) => write!(f, "cannot read the handover record: {e}"),
        }
    }
}

impl std::error::Error for AdoptError {}

/// Takes over what the process before the `exec` handed over. Call once, first thing in
/// `main`, before anything opens a file descriptor.
pub fn adopt(arg: &str) -> Result<Handover, AdoptError> {
    let parts: Vec<&str> = arg.split(':').collect();
    let [pid, socks, rec] = parts[..] else {
        return Err(AdoptError::Syntax);
    };
    let fd = |p: &str| p.parse::<u32>().ok();
    let (Some(pid), Some(rec)) = (fd(pid), fd(rec)) else {
        return Err(AdoptError::Syntax);
    };
    let socks: Option<Vec<u32>> = socks.split(',').map(fd).collect();
    let Some(socks) = socks else {
        return Err(AdoptError::Syntax);
    };
    if pid != std::process::id() {
        return Err(AdoptError::NotOurs(pid));
    }
    let mut all = socks.clone();
    all.push(rec);
    all.sort_unstable();
    all.dedup();
    if socks.len() > crate::config::MAX_SERVERS
        || all.len() != socks.len() + 1
        || all.iter().any(|&fd| fd < 3 || fd > i32::MAX as u32)
    {
        return Err(AdoptError::Syntax);
    }
    // Only descriptors that are open are claimed (an `OwnedFd` of a closed one would be
    // closed again when dropped).
    if all
        .iter()
        .any(|fd| std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err())
    {
        return Err(AdoptError::Descriptors("a named descriptor is not open"));
    }
    let sockets: Vec<OwnedFd> = socks.iter().map(|&s| claim(s as RawFd)).collect();
    let record = claim(rec as RawFd);
    // Closed on any later exec, and never inherited by the children spawned to check a
    // configuration.
    for fd in sockets.iter().chain([&record]) {
        fcntl_setfd(fd, FdFlags::CLOEXEC).map_err(|e| AdoptError::Io(e.into()))?;
    }
    let kind = |fd: &OwnedFd| {
        rustix::fs::fstat(fd)
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode))
            .map_err(|e| AdoptError::Io(e.into()))
    };
    for s in &sockets {
        if kind(s)? != rustix::fs::FileType::Socket {
            return Err(AdoptError::Descriptors(
                "a socket descriptor is not a socket",
            ));
        }
    }
    if kind(&record)? != rustix::fs::FileType::RegularFile {
        return Err(AdoptError::Descriptors(
            "the record descriptor is not a file",
        ));
    }
    let mut bytes = Vec::new();
    File::from(record)
        .take(MAX_RECORD_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(AdoptError::Io)?;
    let record = if bytes.len() > MAX_RECORD_BYTES {
        Err(RecordError::Malformed("too large"))
    } else {
        Record::decode(&bytes)
    };
    Ok(Handover {
        sockets: sockets.into_iter().map(std::net::TcpStream::from).collect(),
        record,
    })
}

/// Takes ownership of a descriptor inherited across `exec`.
///
/// The one `unsafe` of the crate (see `lib.rs`). `OwnedFd::from_raw_fd` requires that `fd`
/// be open and owned by nothing else. Both hold here: the descriptor was left open for us by
/// this same process before its `exec` (`adopt` checked that the argument carries our own
/// PID, which `exec` keeps), and `adopt` runs once, first in `main`, before anything in this
/// process image has opened or claimed a descriptor; `adopt` also checked that each one is
/// open (listed in `/proc/self/fd`).
#[allow(unsafe_code)]
fn claim(fd: RawFd) -> OwnedFd {
    // SAFETY: see above — open, inherited for this purpose, claimed exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// This process's build id ([`build_id`]), computed on a thread of its own from the start:
/// hashing the executable takes a while (about 100 ms for a 92 MB debug build), and neither
/// a start nor the stream an upgrade hands over waits for it. Logged (`running build`) when
/// known.
#[derive(Debug, Clone)]
pub struct BuildId(std::sync::Arc<std::sync::OnceLock<String>>);

impl BuildId {
    /// Starts computing it.
    pub fn compute() -> BuildId {
        let cell = std::sync::Arc::new(std::sync::OnceLock::new());
        let id = BuildId(cell.clone());
        let spawned = std::thread::Builder::new()
            .name("build-id".into())
            .spawn(move || {
                let id = build_id().unwrap_or_else(|e| {
                    tracing::warn!("cannot read the running binary to compute its build id: {e}");
                    "unknown".into()
                });
                tracing::info!(
                    version = env!("CARGO_PKG_VERSION"),
                    build = %id,
                    "running build"
                );
                let _ = cell.set(id);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot compute the build id: {e}");
        }
        id
    }

    /// The id, or `unknown` while it is being computed.
    pub fn get(&self) -> &str {
        self.0.get().map_or("unknown", String::as_str)
    }
}

/// A short identity of the executable this process runs: the first 12 hex digits of the
/// SHA-256 of `/proc/self/exe` (the file the kernel ran, even if replaced on disk since).
pub fn build_id() -> io::Result<String> {
    let mut f = File::open("/proc/self/exe")?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect())
}
