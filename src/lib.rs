//! jat-proxy: an XEP-0114 component that lets one XMPP account, the *implementing client*,
//! serve the IQ requests sent to a component domain — with the senders' addresses sealed into
//! authenticated tokens instead of kept in a table or shown in clear.
//!
//! Layout: [`token`] (the codec the fuzzer links), [`keys`] (key file), [`proxy`] (the
//! sans-IO state machine), [`stream`] (the component stream without I/O: bytes in, bounded
//! raw elements out, and back), [`inbound`] (what the core is given), [`session`] (the only
//! module with sockets, clocks and signals).
// No unsafe code, with one exception: `upgrade::claim`, which takes ownership of the file
// descriptors an in-place upgrade hands across `exec` (the sockets and the record; those a
// refused `--handover` names, to close them), since std offers no safe way to adopt an
// inherited descriptor; its safety argument is written next to it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod config;
pub mod endpoint;
pub mod http;
pub mod inbound;
pub mod invariants;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod random;
pub mod rate;
pub mod session;
pub mod stanza;
pub mod stream;
pub mod token;
mod tomldiag;
pub mod upgrade;
