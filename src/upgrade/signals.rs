//! The signals the session acts on — SIGTERM, SIGINT, SIGHUP, SIGUSR2 — kept from their
//! default action (ending the process) and from being lost across an in-place upgrade.
//!
//! Their handlers are tokio's, which `exec` resets to the default action; what crosses
//! `exec` is the signal mask and the signals pending. So:
//!
//! - `main` blocks them before it starts any thread, and the session unblocks them on its
//!   own thread only once its handlers are in ([`unblock`]): every other thread (the build id
//!   hasher, the metrics server, the runtimes' blocking pools, which [`block`] too) keeps
//!   them blocked for good, so that a signal is only ever taken by the thread that `exec`s;
//! - before an upgrade writes its record, that thread blocks them again ([`Held`]) and
//!   raises again, while blocked, any that the handlers caught and the session has not
//!   acted on: from then on every one of them stays pending, through `exec` (by `execv`,
//!   which keeps the mask), until the new process has its handlers in and unblocks them.
//!   If `exec` fails, dropping the [`Held`] unblocks them and the old process's handlers
//!   take them.

use std::io;

pub use nix::sys::signal::Signal;
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};

/// The signals the session has handlers for.
pub const HANDLED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR2,
];

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Blocks [`HANDLED`] on the calling thread (and so on every thread it starts from then on).
pub fn block() -> io::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None).map_err(io::Error::from)
}

/// Unblocks [`HANDLED`] on the calling thread: call only once their handlers are in. Any
/// that are pending are taken by the handlers at once.
pub fn unblock() -> io::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None).map_err(io::Error::from)
}

/// Whether `sig` is blocked on the calling thread.
pub fn blocked(sig: Signal) -> bool {
    SigSet::thread_get_mask().is_ok_and(|m| m.contains(sig))
}

/// [`HANDLED`] blocked on the thread that is about to `exec`; unblocked again when dropped
/// (the `exec` failed, and the old process goes on).
#[derive(Debug)]
pub struct Held(());

impl Held {
    /// Blocks them.
    pub fn hold() -> io::Result<Held> {
        block()?;
        Ok(Held(()))
    }

    /// Makes `sig`, which a handler caught but nobody acted on, pending again: on this
    /// thread, where it is blocked, so that the next handler to be unblocked (the new
    /// process's, or this one's if `exec` fails) takes it.
    pub fn again(&self, sig: Signal) -> io::Result<()> {
        nix::sys::signal::raise(sig).map_err(io::Error::from)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Err(e) = unblock() {
            tracing::warn!("cannot unblock the signals held for the upgrade: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal raised while held stays pending and is not delivered; each check runs on a
    /// thread of its own, whose mask it may change freely.
    #[test]
    fn held_signals_stay_pending() {
        std::thread::spawn(|| {
            let held = Held::hold().unwrap();
            for s in HANDLED {
                assert!(blocked(s));
            }
            // SIGUSR2's default action would end the test process if it were delivered.
            held.again(Signal::SIGUSR2).unwrap();
            // Pending on this thread (`SigPnd`, a mask with bit N-1 for signal N).
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let pending = status
                .lines()
                .find_map(|l| l.strip_prefix("SigPnd:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            assert_ne!(pending & (1 << (Signal::SIGUSR2 as i32 - 1)), 0);
            // Taken back without delivery (sigwait), so that the test process lives on.
            let mut set = SigSet::empty();
            set.add(Signal::SIGUSR2);
            assert_eq!(set.wait().unwrap(), Signal::SIGUSR2);
            drop(held);
            for s in HANDLED {
                assert!(!blocked(s));
            }
        })
        .join()
        .unwrap();
    }
}
