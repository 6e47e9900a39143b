//! In-place upgrade: the running process `exec`s the binary installed at the path it was
//! started from, handing over its connected sockets and a [`Record`] of the streams' state,
//! so that the new code goes on with the same streams — no new handshake, no footer, same
//! PID.
//!
//! The sockets and the record (a memfd) cross `exec` as inherited file descriptors, named
//! to the new process by a hidden argument `--handover PID:SOCKET[,SOCKET...]:RECORD` (the
//! sockets in the order of the record's streams). The PID guards against the argument being
//! replayed by hand: only the process that wrote it (the same PID after `exec`) adopts the
//! descriptors; an argument that is not adopted has every descriptor it names closed.
//!
//! Before an upgrade, the binary now installed runs `check` with the arguments the `exec`
//! will give it; besides judging the configuration, `check` prints the record formats the
//! build reads ([`check_line`]), and an upgrade to a build that reads none this process can
//! write (or that does not say: a build without in-place upgrades) is refused before `exec`.

mod record;
pub mod signals;

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::io::{FdFlags, fcntl_setfd};

pub use record::{MAX_RECORD_BYTES, READS, Record, RecordError, StreamRecord, VERSION};

/// The hidden command-line option that names the handed-over descriptors.
pub(crate) const HANDOVER_ARG: &str = "--handover";

/// What `check` prints before it says the configuration is fine: `handover:` and the record
/// formats this build reads, e.g. `handover: 1,2` (a build that prints no such line takes no
/// handover).
const CHECK_PREFIX: &str = "handover:";

/// The line `check` prints on stdout for a process about to upgrade to this build: the
/// handover record formats it reads ([`READS`]), e.g. `handover: 1,2`.
pub fn check_line() -> String {
    let formats: Vec<String> = READS.iter().map(u16::to_string).collect();
    format!("{CHECK_PREFIX} {}", formats.join(","))
}

/// The record formats another build reads, from what its `check` printed on stdout (the
/// numbers of its `handover:` line; formats this build does not know are kept, and never
/// chosen): `None` if it printed no such line, or one without a number.
pub(crate) fn formats_from_check(stdout: &str) -> Option<Vec<u16>> {
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(CHECK_PREFIX))?;
    let formats: Vec<u16> = line
        .split(',')
        .filter_map(|f| f.trim().parse().ok())
        .collect();
    (!formats.is_empty()).then_some(formats)
}

/// The record format this build writes `streams` streams in for a build that reads
/// `reads`: format 1 (that of builds keeping one stream) for one stream, if it reads it;
/// else format 2, if it reads it; else none: such a build cannot take the streams.
pub(crate) fn format_for(streams: usize, reads: &[u16]) -> Option<u16> {
    if streams == 1 && reads.contains(&1) {
        Some(1)
    } else if streams >= 1 && reads.contains(&2) {
        Some(2)
    } else {
        None
    }
}

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

    /// The binary at [`Program::path`] run as `check` with the arguments an `exec` gives it
    /// (so that a build that does not take one of them fails here, not after the `exec`).
    pub fn check_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.path);
        cmd.args(&self.args).arg("check");
        cmd
    }

    /// Replaces this process with the binary at [`Program::path`], run with the same
    /// arguments, handing over `streams` (the connected sockets, in the order of the
    /// record's streams, and the record's bytes) if given. Returns only if `exec` failed;
    /// the sockets are then as they were (closed on exec again), and this process goes on
    /// serving.
    ///
    /// The `exec` is `execv(2)` itself, which keeps the signal mask and the signals pending
    /// as they are (see [`signals`]).
    pub fn exec(&self, streams: Option<(&[BorrowedFd<'_>], &[u8])>) -> io::Error {
        let mut argv = vec![self.path.as_os_str().to_owned()];
        argv.extend(self.args.iter().cloned());
        let Some((sockets, record)) = streams.filter(|(s, _)| !s.is_empty()) else {
            return execv(&argv);
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
        argv.push(HANDOVER_ARG.into());
        argv.push(
            format!(
                "{}:{}:{}",
                std::process::id(),
                fds.join(","),
                memfd.as_raw_fd()
            )
            .into(),
        );
        let e = execv(&argv);
        restore();
        e
    }
}

/// `execv(argv[0], argv)`: returns only if it failed.
fn execv(argv: &[OsString]) -> io::Error {
    let argv: Result<Vec<CString>, _> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes().to_vec()))
        .collect();
    let argv = match argv {
        Ok(a) if !a.is_empty() => a,
        _ => return io::Error::new(io::ErrorKind::InvalidInput, "an argument holds a NUL byte"),
    };
    match nix::unistd::execv(&argv[0], &argv) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// The record in an anonymous memory file, left open across `exec` (not close-on-exec).
fn write_record(record: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::memfd_create("jat-proxy-handover", rustix::fs::MemfdFlags::empty())?;
    let mut f = File::from(fd);
    f.write_all(record)?;
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
///
/// An argument that is refused (of another process, malformed, naming a descriptor twice or
/// one that is not open or not of its kind, a record that cannot be read) has every
/// descriptor it names closed: none stays open, unused, in this process or the children it
/// starts. (An argument not of the form `PID:...:...` names none; neither do the standard
/// descriptors 0 to 2, which are never closed.)
pub fn adopt(arg: &str) -> Result<Handover, AdoptError> {
    let named = named_descriptors(arg);
    let mut claimed = Vec::new();
    let adopted = adopt_named(arg, &mut claimed);
    if adopted.is_err() {
        // Those claimed were closed when dropped; the others are closed here.
        for fd in named.into_iter().filter(|fd| !claimed.contains(fd)) {
            if is_open(fd) {
                drop(claim(fd));
            }
        }
    }
    adopted
}

/// The distinct descriptors (at least 3) a `--handover` argument names, if it has the form
/// `PID:SOCKET[,SOCKET...]:RECORD`, whatever else is wrong with it.
fn named_descriptors(arg: &str) -> Vec<RawFd> {
    let parts: Vec<&str> = arg.split(':').collect();
    let [_, socks, rec] = parts[..] else {
        return Vec::new();
    };
    let mut fds: Vec<RawFd> = socks
        .split(',')
        .chain([rec])
        .filter_map(|p| p.parse::<RawFd>().ok())
        .filter(|&fd| fd >= 3)
        .collect();
    fds.sort_unstable();
    fds.dedup();
    fds
}

/// Whether descriptor `fd` is open in this process (listed in `/proc/self/fd`).
fn is_open(fd: RawFd) -> bool {
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok()
}

/// [`adopt`], noting in `claimed` each descriptor it took ownership of (closed if dropped).
fn adopt_named(arg: &str, claimed: &mut Vec<RawFd>) -> Result<Handover, AdoptError> {
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
    if all.iter().any(|&fd| !is_open(fd as RawFd)) {
        return Err(AdoptError::Descriptors("a named descriptor is not open"));
    }
    claimed.extend(all.iter().map(|&fd| fd as RawFd));
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
/// be open and owned by nothing else. Both hold here: `adopt` runs once, first in `main`,
/// before anything in this process image has opened or claimed a descriptor, so that every
/// descriptor open then was inherited across `exec` and is owned by nothing in this image;
/// `adopt` checked that each one it claims is open (listed in `/proc/self/fd`) and claims
/// each at most once (the numbers are deduplicated, and those it closes after a refusal
/// are the ones it did not claim). Those it keeps were left open for it by this same
/// process before its `exec` (the argument carries our own PID, which `exec` keeps); those
/// of a refused argument are closed at once.
#[allow(unsafe_code)]
fn claim(fd: RawFd) -> OwnedFd {
    // SAFETY: see above — open, inherited, owned by nothing else, claimed exactly once.
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

    /// A fixed id (tests).
    pub fn fixed(id: &str) -> BuildId {
        let cell = std::sync::OnceLock::new();
        let _ = cell.set(id.to_owned());
        BuildId(std::sync::Arc::new(cell))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn check_reports_the_formats_this_build_reads() {
        assert_eq!(check_line(), "handover: 1,2");
        let out = format!("configuration and key file OK\n{}\n", check_line());
        assert_eq!(formats_from_check(&out), Some(READS.to_vec()));
        assert_eq!(formats_from_check("handover: 2, 7\n"), Some(vec![2, 7]));
        // A build without in-place upgrades, or one that says nothing usable.
        assert_eq!(formats_from_check("configuration and key file OK\n"), None);
        assert_eq!(formats_from_check(""), None);
        assert_eq!(formats_from_check("handover:\n"), None);
        assert_eq!(formats_from_check("handover: none\n"), None);
    }

    #[test]
    fn the_format_written_is_one_the_new_build_reads() {
        assert_eq!(format_for(1, &READS), Some(1));
        assert_eq!(format_for(2, &READS), Some(2));
        assert_eq!(format_for(1, &[2]), Some(2));
        assert_eq!(format_for(1, &[1]), Some(1));
        assert_eq!(format_for(3, &[1]), None);
        assert_eq!(format_for(1, &[3]), None);
        assert_eq!(format_for(1, &[]), None);
    }

    /// A descriptor of the test's, named so that it is recognised in `/proc/self/fd` (the
    /// test process's other threads open and close descriptors meanwhile: a number that is
    /// reused shows another target).
    fn memfd(name: &str) -> (RawFd, String) {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::empty()).unwrap();
        let fd = fd.into_raw_fd();
        (fd, target(fd).unwrap())
    }

    fn socket() -> (RawFd, String) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.into_raw_fd();
        (fd, target(fd).unwrap())
    }

    fn target(fd: RawFd) -> Option<String> {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .ok()
            .map(|p| p.display().to_string())
    }

    fn still_open(fds: &[(RawFd, String)]) -> Vec<RawFd> {
        fds.iter()
            .filter(|(fd, t)| target(*fd).as_deref() == Some(t.as_str()))
            .map(|(fd, _)| *fd)
            .collect()
    }

    #[test]
    fn a_refused_handover_closes_every_descriptor_it_names() {
        let me = std::process::id();
        type Case = fn(u32, RawFd, RawFd, RawFd) -> String;
        let cases: [(&str, Case); 7] = [
            ("another process's", |me, s, _, r| {
                format!("{}:{s}:{r}", me + 1)
            }),
            ("a PID that is no number", |_, s, _, r| {
                format!("x{s}:{s}:{r}")
            }),
            ("a socket that is no number", |me, s, _, r| {
                format!("{me}:{s},y:{r}")
            }),
            ("a descriptor named twice", |me, s, _, r| {
                format!("{me}:{s},{s}:{r}")
            }),
            // Never open: beyond any limit on descriptors.
            ("a descriptor that is not open", |me, s, _, r| {
                format!("{me}:{s},{}:{r}", i32::MAX - 1)
            }),
            ("a file where a socket should be", |me, s, f, r| {
                format!("{me}:{s},{f}:{r}")
            }),
            ("the socket and the record swapped", |me, s, _, r| {
                format!("{me}:{r}:{s}")
            }),
        ];
        for (what, arg) in cases {
            let s = socket();
            let f = memfd(&format!("jat-test-file-{what}"));
            let r = memfd(&format!("jat-test-record-{what}"));
            let arg = arg(me, s.0, f.0, r.0);
            // The memfd standing for a file is named only by the case that needs it.
            let named: Vec<(RawFd, String)> = [s.clone(), f.clone(), r.clone()]
                .into_iter()
                .filter(|(fd, _)| arg.split([':', ',']).skip(1).any(|p| p == fd.to_string()))
                .collect();
            assert!(adopt(&arg).is_err(), "{what}: {arg} adopted");
            assert_eq!(still_open(&named), Vec::<RawFd>::new(), "{what}: {arg}");
            for (fd, t) in [s, f, r] {
                if !named.iter().any(|(n, _)| *n == fd) && target(fd).as_deref() == Some(&t) {
                    drop(claim(fd));
                }
            }
        }
    }

    #[test]
    fn descriptors_below_3_are_never_closed() {
        assert!(adopt(&format!("{}:0,1:2", std::process::id())).is_err());
        assert!(adopt("1:0:2").is_err());
        for fd in 0..3 {
            assert!(target(fd).is_some(), "descriptor {fd} closed");
        }
    }
}
