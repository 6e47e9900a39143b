//! Free TCP ports on loopback, never the same one twice in one test process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that was free on 127.0.0.1 a moment ago and that no other test here was given.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind an ephemeral port")
            .local_addr()
            .unwrap()
            .port();
        let mut seen = HANDED_OUT.lock().unwrap();
        if seen.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}
