//! The monitoring listener (`[metrics] listen`): `GET /metrics` (the Prometheus text format)
//! and `GET /healthz` (200 or 503 with a short JSON body), on hyper's HTTP/1 server.
//!
//! It runs on a thread of its own beside the session and reads only the atomics of
//! [`crate::metrics`]: whatever arrives here — garbage, huge headers, a client trickling
//! bytes — costs the session nothing but a little CPU. Every connection is bounded: headers
//! to [`MAX_HEADER_BYTES`] and [`HEADER_TIMEOUT`], [`MAX_REQUESTS`] requests, [`CONNECTION_LIFETIME`]
//! in all, and at most [`MAX_CONNECTIONS`] at once (more are closed as they arrive).

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::sleep;
use tracing::{debug, info, warn};

use crate::metrics;

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request's headers.
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
pub fn spawn(addr: SocketAddr) {
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
                    match TcpListener::bind(addr).await {
                        Ok(l) => break l,
                        Err(e) => {
                            warn!(%addr, "cannot listen for metrics: {e}; trying again in {} s", BIND_RETRY.as_secs());
                            sleep(BIND_RETRY).await;
                        }
                    }
                };
                info!(%addr, "serving /metrics and /healthz");
                serve(listener).await;
            });
        });
    if let Err(e) = started {
        warn!("cannot start the monitoring listener: {e}");
    }
}

/// Accepts and serves connections on `listener` for ever.
pub async fn serve(listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many monitoring connections: closed");
            continue;
        };
        tokio::spawn(async move {
            connection(tcp).await;
            drop(slot);
        });
    }
}

async fn connection(tcp: TcpStream) {
    let served = AtomicU32::new(0);
    let service = service_fn(move |req: Request<Incoming>| {
        let mut resp = respond(&req);
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

fn respond(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match path {
        "/metrics" | "/healthz" if !readable => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        "/metrics" => match metrics::global().encode(crate::session::unix_now_ms()) {
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
            let health = metrics::global().health();
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
