//! A link's TLS layer (`tls = true`): a rustls [`ClientConnection`], itself without I/O,
//! between the socket's bytes and the stream's. What the socket reads is decrypted before the
//! stream reader sees it; what the stream queues (its [`Output`](super::output::Output), in
//! plaintext, where failover and the stall clock keep working on whole elements) is sealed at
//! most one record at a time, only once the socket took every byte sealed before: a record
//! the socket did not take whole never reached the server, so the plaintext in it still
//! counts as unsent, exactly as on a plaintext stream.

use std::io::Read;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConnection};

use super::link::TlsFailure;
use crate::config::Tls;

/// Plaintext sealed at once: one TLS record's worth.
const RECORD: usize = 16 * 1024;

/// One link's TLS connection and the ciphertext waiting for its socket.
pub(crate) struct TlsLayer {
    conn: ClientConnection,
    server: String,
    name: String,
    /// Ciphertext to write: `tx[tx_sent..]`.
    tx: Vec<u8>,
    tx_sent: usize,
    /// Plaintext bytes of the output sealed in `tx`, counted as written once `tx` is.
    in_flight: usize,
    /// Whether any byte came from the server.
    heard: bool,
    close_sent: bool,
}

impl TlsLayer {
    /// A TLS connection to `server` (its address, for the log) as `tls` says: its
    /// ClientHello waits to be written.
    pub(crate) fn new(tls: &Tls, server: &str) -> Result<TlsLayer, TlsFailure> {
        let mut layer = TlsLayer {
            conn: connect(tls.client.clone(), tls.name.clone()).map_err(|e| TlsFailure {
                server: server.to_owned(),
                name: tls.name_str(),
                reason: e.to_string(),
                certificate: false,
            })?,
            server: server.to_owned(),
            name: tls.name_str(),
            tx: Vec::new(),
            tx_sent: 0,
            in_flight: 0,
            heard: false,
            close_sent: false,
        };
        layer.flush();
        Ok(layer)
    }

    /// Ciphertext read from the socket: the plaintext it holds is appended to `plain`.
    pub(crate) fn read(&mut self, mut bytes: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsFailure> {
        if !self.heard && bytes.first() == Some(&b'<') {
            return Err(self.failure(
                "the server answered in plain XML: its listener has no TLS (remove `tls = true` \
                 for it, or enable TLS on the listener)"
                    .into(),
                false,
            ));
        }
        self.heard |= !bytes.is_empty();
        while !bytes.is_empty() {
            match self.conn.read_tls(&mut bytes) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(self.failure(format!("cannot read TLS: {e}"), false)),
            }
            let state = match self.conn.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    let (reason, certificate) = self.explain(&e);
                    return Err(self.failure(reason, certificate));
                }
            };
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let start = plain.len();
                plain.resize(start + n, 0);
                if let Err(e) = self.conn.reader().read_exact(&mut plain[start..]) {
                    plain.truncate(start);
                    return Err(self.failure(format!("cannot read TLS: {e}"), false));
                }
            }
        }
        // Handshake messages, or an answer to the server's key update.
        self.flush();
        Ok(())
    }

    /// Whether the TLS handshake is still under way.
    pub(crate) fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// What a connection closed during the handshake means.
    pub(crate) fn closed_in_handshake(&self) -> TlsFailure {
        self.failure(
            "the server closed the connection during the TLS handshake (ejabberd does that \
             when the listener has no `certfile`, or the file holds no key)"
                .into(),
            false,
        )
    }

    /// The ciphertext waiting to be written.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.tx[self.tx_sent..]
    }

    /// `n` bytes of [`TlsLayer::pending`] were written: once all of them are, the plaintext
    /// they sealed (this many bytes of the output) has been written.
    pub(crate) fn wrote(&mut self, n: usize) -> Option<usize> {
        self.tx_sent = (self.tx_sent + n).min(self.tx.len());
        if self.tx_sent < self.tx.len() {
            return None;
        }
        self.tx.clear();
        self.tx_sent = 0;
        if self.tx.capacity() > 4 * RECORD {
            self.tx = Vec::with_capacity(RECORD + 1024);
        }
        Some(std::mem::take(&mut self.in_flight))
    }

    /// Whether the plaintext sealed so far was all written (the next may be sealed).
    fn idle(&self) -> bool {
        self.tx_sent == self.tx.len() && self.in_flight == 0
    }

    /// Seals the start of `plain` (the output not yet written) if the handshake is done and
    /// the socket took everything sealed before; with `last` (our footer is in `plain`), the
    /// TLS close follows the last of it.
    pub(crate) fn seal(&mut self, plain: &[u8], last: bool) {
        if !self.idle() || self.conn.is_handshaking() || self.close_sent {
            return;
        }
        if !plain.is_empty() {
            let n = plain.len().min(RECORD);
            match std::io::Write::write(&mut self.conn.writer(), &plain[..n]) {
                Ok(n) => self.in_flight = n,
                Err(_) => return,
            }
        }
        if last && self.in_flight == plain.len() {
            self.conn.send_close_notify();
            self.close_sent = true;
        }
        self.flush();
    }

    /// What rustls has to send, appended to the ciphertext waiting.
    fn flush(&mut self) {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.tx).is_err() {
                break;
            }
        }
    }

    fn failure(&self, reason: String, certificate: bool) -> TlsFailure {
        TlsFailure {
            server: self.server.clone(),
            name: self.name.clone(),
            reason,
            certificate,
        }
    }

    /// What a rustls error means for the operator, and whether it is about the certificate.
    fn explain(&self, e: &rustls::Error) -> (String, bool) {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(c) => (certificate_reason(c), true),
            E::AlertReceived(AlertDescription::UnrecognisedName) => (
                format!(
                    "the server does not serve the name {} (alert unrecognized_name): Prosody \
                     accepts as SNI only one of its hosts, such as the component's domain; set \
                     `name` to it",
                    self.name
                ),
                false,
            ),
            E::AlertReceived(a) => (format!("the server sent the TLS alert {a:?}"), false),
            E::InvalidMessage(m) => (
                format!(
                    "the server does not speak TLS ({m:?}): is its listener TLS? (remove `tls = \
                     true` for a plaintext listener)"
                ),
                false,
            ),
            other => (other.to_string(), false),
        }
    }
}

fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> Result<ClientConnection, rustls::Error> {
    ClientConnection::new(config, name)
}

fn certificate_reason(c: &CertificateError) -> String {
    use CertificateError as C;
    match c {
        C::UnknownIssuer => "unknown issuer: not signed by the roots configured (the system's, \
                             or the `ca` file given for this server)"
            .into(),
        C::NotValidForName => {
            "not issued for this name (set `name` to one it is issued for)".into()
        }
        C::NotValidForNameContext { presented, .. } => format!(
            "not issued for this name but for {} (set `name` to one of them)",
            presented.join(", ")
        ),
        C::Expired | C::ExpiredContext { .. } => "expired".into(),
        C::BadSignature => {
            "bad signature (issued by another CA of the same name as a root?)".into()
        }
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".into(),
        other => format!("{other:?}"),
    }
}
