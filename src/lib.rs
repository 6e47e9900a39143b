//! jat-proxy: an XEP-0114 component that lets one XMPP account, the *implementing client*,
//! serve the IQ requests sent to a component domain — with the senders' addresses sealed into
//! authenticated tokens instead of kept in a table or shown in clear.
//!
//! What an operator's binary or an embedder uses, and what stays inside:
//!
//! - [`config`] (the configuration file, one module per TOML section) and [`keys`] (the
//!   token key file: load, rotate, list).
//! - [`token`] — the token codec, pure (the fuzzer links it directly).
//! - [`proxy`] — the sans-IO state machine: [`Proxy::handle`] from a stanza, the time and
//!   randomness to the stanza to send.
//! - [`stream`] — the component stream without I/O: bytes in, bounded raw elements
//!   ([`Inbound`]) out, and back.
//! - [`endpoint`] — the connection protocol without I/O: logins, keepalives, stalls,
//!   reconnection, failover of unsent output, probes, key polls, shutdown and the upgrade's
//!   lifecycle, over monotonic milliseconds; it owns the core.
//! - [`session`] — the daemon: [`run`] is the tokio shell around the endpoint (sockets,
//!   sleeps, exec) and the metrics it reports to. Sockets and signals are only there and in what it uses: [`upgrade`]
//!   (the in-place upgrade, shared with the binary), the monitoring listener (`http`, which
//!   serves [`metrics`], the counters the session keeps) and systemd notification (`notify`).
//! - Inside the crate: the reading of one stanza (`inbound`), the rate limits (`rate`), the
//!   sender policy (`policy`), randomness (`random`), stanza builders (`stanza`), the
//!   reconnect backoff (`backoff`) and TOML diagnostics (`tomldiag`). What of them is API is
//!   re-exported here.
//!
//! `invariants` (what must hold for any input: the fuzz targets' bodies, replayed by the
//! tests) exists only with the `fuzzing` feature, which the fuzz crate and this package's own
//! tests and benchmarks enable; the daemon does not link `arbitrary`.
// No unsafe code, with one exception: `upgrade::claim`, which takes ownership of the file
// descriptors an in-place upgrade hands across `exec` (the sockets and the record; those a
// refused `--handover` names, to close them), since std offers no safe way to adopt an
// inherited descriptor; its safety argument is written next to it.
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Every type the public items show can be named: the re-exports below are complete.
#![warn(unnameable_types)]

pub mod config;
pub mod endpoint;
pub mod keys;
pub mod metrics;
pub mod proxy;
pub mod session;
pub mod stream;
pub mod token;
pub mod upgrade;

mod backoff;
mod http;
mod inbound;
mod notify;
mod policy;
mod random;
mod rate;
mod stanza;
mod tomldiag;

/// Test and fuzz hooks: not an API, and only with the `fuzzing` feature.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod invariants;

pub use config::{Config, ConfigError};
pub use inbound::{Exceeded, Inbound, Limits, MAX_NODES, Oversized};
pub use keys::KeySet;
pub use policy::{Entry, Policy};
pub use proxy::{Clock, DropReason, Outcome, Proxy, Sender, Settings, Stanza, Verdict};
pub use random::{ChaChaRandom, OsRandom, Random};
pub use rate::{Limiter, Over, RateLimit};
pub use session::{Exit, Start, run};
pub use stanza::Condition;
pub use stream::{Frame, Reader, Writer};
