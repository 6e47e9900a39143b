//! The monitoring listener (`[metrics] listen`): `GET /metrics` (the Prometheus text format)
//! and `GET /healthz` (200 or 503 with a short JSON body), on hyper's HTTP/1 server.
//!
//! It runs on a thread of its own beside the session and reads only the atomics of
//! [`crate::metrics`]: whatever arrives here — garbage, huge headers, a client trickling
//! bytes — costs the session nothing but a little CPU. Every connection is bounded: headers
//! to [`MAX_HEADER_BYTES`] and [`HEADER_TIMEOUT`], [`MAX_REQUESTS`] requests, [`CONNECTION_LIFETIME`]
//! in all, and at most [`MAX_CONNECTIONS`] at once.
//!
//! Nobody can keep the listener from answering by holding its slots, idle or trickling: when
//! all are taken, a new connection closes the oldest one, once that one has had
//! [`EVICTION_GRACE`]. The listener waits on nothing but its clients (each response is built
//! at once), so the oldest is always waiting on its client: for a request, the rest of one, or
//! to read a response. A client that sends its request within [`EVICTION_GRACE`] of being
//! accepted is answered, however many connections others open and reopen. While the slots are
//! full, connections are accepted at up to [`MAX_CONNECTIONS`] per [`EVICTION_GRACE`], so a
//! new one waits in the kernel's accept queue ([`ACCEPT_QUEUE`]) for about a third of a
//! second at most; only more connections than the slots and that queue hold together delay it
//! further (the kernel drops its SYN, and the client sends it again after a second).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use crate::metrics::{self, Metrics};

/// Connections served at once; when all are taken, a new one closes the oldest (after its
/// [`EVICTION_GRACE`]).
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection is safe from being closed for a newer one: time enough to send a
/// request, from a client that sends it at once.
pub const EVICTION_GRACE: Duration = Duration::from_millis(10);
/// Connections the kernel holds until they are accepted (capped by `net.core.somaxconn`,
/// 4096 by default since Linux 5.4; std's and tokio's default is 128). When it is full, the
/// kernel drops new connections' SYNs.
pub const ACCEPT_QUEUE: u32 = 1024;
/// Time a client has to send a request's headers, unless a newer connection closes it first.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a request's headers at most (larger: 431, and the connection is closed).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Requests served on one connection; the last is answered with `Connection: close`.
pub const MAX_REQUESTS: u32 = 100;
/// How long one connection may stay open; then it is closed (gracefully, if idle).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Time to finish a response in flight once the connection's lifetime is over.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Wait before trying to listen again when the address is taken.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Starts the listener on `addr` on a thread of its own, with a runtime of its own: no
/// request, however hostile, is parsed on the session's thread.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) {
    if !addr.ip().is_loopback() {
        warn!(
            %addr,
            "[metrics] listen is not a loopback address: whoever reaches it reads the counters and the key id"
        );
    }
    let started = std::thread::Builder::new()
        .name("monitoring".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    warn!("cannot start the monitoring listener's runtime: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = loop {
                    match listen(addr) {
                        Ok(l) => break l,
                        Err(e) => {
                            warn!(%addr, "cannot listen for metrics: {e}; trying again in {} s", BIND_RETRY.as_secs());
                            sleep(BIND_RETRY).await;
                        }
                    }
                };
                info!(%addr, "serving /metrics and /healthz");
                serve(listener, metrics).await;
            });
        });
    if let Err(e) = started {
        warn!("cannot start the monitoring listener: {e}");
    }
}

/// Listens on `addr` with an accept queue of [`ACCEPT_QUEUE`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_QUEUE)
}

/// Accepts and serves connections on `listener` for ever.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // The connections served, oldest first, with when each was started; each holds one of
    // `slots` until its task ends. Some may have ended on their own since.
    let mut open: VecDeque<(Instant, AbortHandle)> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                debug!("monitoring listener: cannot accept: {e}");
                sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        open.retain(|(_, task)| !task.is_finished());
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Every slot is taken, each by a task in `open`: the oldest's is freed once its
                // grace is over, unless another ends first. Meanwhile, nothing is accepted.
                let grace_over = open
                    .front()
                    .map_or_else(Instant::now, |(since, _)| *since + EVICTION_GRACE);
                let freed = tokio::select! {
                    slot = slots.clone().acquire_owned() => slot,
                    () = sleep_until(grace_over) => {
                        if let Some((_, oldest)) = open.pop_front() {
                            debug!(%peer, "all monitoring connections taken: the oldest closed");
                            oldest.abort();
                        }
                        // Its slot, as soon as its task has been dropped.
                        slots.clone().acquire_owned().await
                    }
                };
                freed.expect("the semaphore is never closed")
            }
        };
        let metrics = metrics.clone();
        let task = tokio::spawn(async move {
            connection(tcp, metrics).await;
            drop(slot);
        });
        open.push_back((Instant::now(), task.abort_handle()));
    }
}

async fn connection(tcp: TcpStream, metrics: Arc<Metrics>) {
    let served = AtomicU32::new(0);
    let service = service_fn(move |req: Request<Incoming>| {
        let mut resp = respond(&req, &metrics);
        if served.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REQUESTS {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!("monitoring connection: {e}");
            }
        }
        _ = sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match path {
        "/metrics" | "/healthz" if !readable => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        "/metrics" => match metrics.encode(crate::session::unix_now_ms()) {
            Ok(body) => with_type(StatusCode::OK, body.into(), metrics::CONTENT_TYPE),
            Err(e) => {
                warn!("{e}");
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode the metrics\n",
                )
            }
        },
        "/healthz" => {
            let health = metrics.health();
            let status = if health.ok() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            with_type(status, health.json().into(), "application/json")
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(
        status,
        Bytes::from_static(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    /// Whether the server has closed `tcp` (read within 20 ms: the end, or a reset).
    async fn closed(tcp: &mut TcpStream) -> bool {
        matches!(
            timeout(Duration::from_millis(20), tcp.read(&mut [0u8; 64])).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_new_connection_closes_the_oldest_when_every_slot_is_taken() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Metrics::new())));
        let mut idle = Vec::new();
        for _ in 0..3 * MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Accepted after all of them, a request is answered.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        timeout(Duration::from_secs(5), tcp.read_to_end(&mut response))
            .await
            .expect("no response")
            .unwrap();
        assert!(
            response.starts_with(b"HTTP/1.1 404 "),
            "{}",
            String::from_utf8_lossy(&response)
        );
        // To make room for it and the idle ones after the first MAX_CONNECTIONS, the oldest
        // were closed, one each; the newest are still served.
        let mut open = Vec::new();
        for (i, tcp) in idle.iter_mut().enumerate() {
            if !closed(tcp).await {
                open.push(i);
            }
        }
        let evicted = 2 * MAX_CONNECTIONS + 1;
        assert_eq!(open, (evicted..3 * MAX_CONNECTIONS).collect::<Vec<_>>());
        server.abort();
    }
}
