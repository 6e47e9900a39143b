//! What an operator can watch: counters and gauges of the running process, exposed in the
//! Prometheus text format by [`crate::http`] (`GET /metrics`), and the health summary behind
//! `GET /healthz`.
//!
//! The session counts what the core decided, from each stanza's [`Verdict`] (counting is not
//! a protocol decision, so the core stays free of it). Every count on the request and reply
//! paths is one relaxed atomic increment on a counter created at start: no allocation, no
//! lock, no label lookup per stanza. Dropped stanzas (rare, and bounded by the rate limits)
//! look their reason's counter up by label. The HTTP task reads the same atomics; it shares
//! no lock with the session that is ever held across an await.
//!
//! The metrics live for the whole process ([`global`]): counters start from zero when the
//! process starts, also after an in-place upgrade (a new process image), which Prometheus's
//! `rate()` and `increase()` treat as the counter reset it is.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use xmpp_parsers::minidom::Element;

use crate::keys::KeySet;
use crate::proxy::{Outcome, Stanza, Verdict};
use crate::stanza::Condition;
use crate::token::Rejected;

/// Every metric's name starts with this (and `_`).
pub const PREFIX: &str = "jat_proxy";

/// The git revision this binary was built from (or "unknown"), from `build.rs`.
pub const GIT_REVISION: &str = env!("JAT_PROXY_GIT_REVISION");

/// The error conditions jat-proxy sends, in the order of their counters.
const CONDITIONS: [Condition; 8] = [
    Condition::BadRequest,
    Condition::FeatureNotImplemented,
    Condition::NotAcceptable,
    Condition::PolicyViolation,
    Condition::Forbidden,
    Condition::ResourceConstraint,
    Condition::ServiceUnavailable,
    Condition::ItemNotFound,
];

fn condition_index(c: Condition) -> usize {
    match c {
        Condition::BadRequest => 0,
        Condition::FeatureNotImplemented => 1,
        Condition::NotAcceptable => 2,
        Condition::PolicyViolation => 3,
        Condition::Forbidden => 4,
        Condition::ResourceConstraint => 5,
        Condition::ServiceUnavailable => 6,
        Condition::ItemNotFound => 7,
    }
}

/// The label values of `jat_proxy_tokens_rejected_total`, in the order of their counters.
const REJECTIONS: [&str; 10] = [
    "too_long",
    "encoding",
    "truncated",
    "version",
    "unknown_key",
    "expired",
    "from_future",
    "authentication",
    "contents",
    "kind",
];

fn rejection_index(r: Rejected) -> usize {
    match r {
        Rejected::TooLong => 0,
        Rejected::Encoding => 1,
        Rejected::Truncated => 2,
        Rejected::Version(_) => 3,
        Rejected::UnknownKey(_) => 4,
        Rejected::Expired => 5,
        Rejected::FromFuture => 6,
        Rejected::Authentication => 7,
        Rejected::Contents => 8,
        Rejected::Kind => 9,
    }
}

/// Reply latency buckets, in seconds: an implementing client answering from memory takes
/// milliseconds; common clients give up after 30–120 s; tokens last 300 s by default.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The label values of `jat_proxy_rate_limited_total`: a request refused for its sender's
/// (or domain's) rate, or the implementing client's outbound rate; an error not sent for its
/// recipient's budget; a reply dropped for its recipient's rate; a message the implementing
/// client starts dropped for its outbound rate; a peer's reply dropped for its routed rate.
const LIMITS: [&str; 5] = ["request", "error", "reply", "outbound", "routed"];

/// The reasons [`crate::proxy`] gives for dropping a stanza over a rate limit (its
/// `Verdict::Dropped` texts, which `src/proxy/tests.rs` pins: keep them in step).
const OVER_ERROR_BUDGET: &str = "over the sender's error budget";
const OVER_REPLY_RATE: &str = "over the recipient's reply rate limit";
const OVER_OUTBOUND_RATE: &str = "over the implementing client's outbound rate limit";
const OVER_ROUTED_RATE: &str = "over the peer's rate limit";

/// The reason counted in `jat_proxy_stanzas_dropped_total` for a rejected token (also counted,
/// by why, in `jat_proxy_tokens_rejected_total`).
const TOKEN_REJECTED: &str = "token rejected";

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    up: IntGauge,
    streams_up: IntGauge,
    streams_configured: IntGauge,
    logins: IntCounter,
    login_failures: IntCounter,
    reconnects: IntCounter,
    uptime: IntGauge,
    /// When the current session was established (Unix ms); meaningful while `connected`.
    established_ms: AtomicU64,
    connected: AtomicBool,
    resources: IntGauge,
    forwarded: IntCounter,
    reversed: IntCounter,
    messages_forwarded: IntCounter,
    messages_reversed: IntCounter,
    outbound_requests: IntCounter,
    outbound_messages: IntCounter,
    routed: IntCounter,
    reply_latency: Histogram,
    held: IntCounter,
    presence: IntCounter,
    refused: [IntCounter; CONDITIONS.len()],
    dropped: IntCounterVec,
    rejected: [IntCounter; REJECTIONS.len()],
    rate_limited: [IntCounter; LIMITS.len()],
    key_id: IntGauge,
    key_age: IntGauge,
    /// When the current key was created (Unix seconds).
    key_created: AtomicU64,
}

/// What `GET /healthz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Whether the component session with the server is up.
    pub connected: bool,
    /// Resources of the implementing client believed online.
    pub resources: u64,
    /// The id of the key that seals new tokens.
    pub key_id: u32,
}

impl Health {
    /// Healthy: connected, with at least one resource to serve requests.
    pub fn ok(&self) -> bool {
        self.connected && self.resources > 0
    }

    /// `{"connected":true,"resources":1,"key_id":123}`.
    pub fn json(&self) -> String {
        format!(
            "{{\"connected\":{},\"resources\":{},\"key_id\":{}}}\n",
            self.connected, self.resources, self.key_id
        )
    }
}

/// Why the exposition could not be produced.
#[derive(Debug)]
pub enum EncodeError {
    /// The Prometheus text encoder failed.
    Prometheus(prometheus::Error),
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::Prometheus(e) => write!(f, "cannot encode the metrics: {e}"),
        }
    }
}

impl std::error::Error for EncodeError {}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics, created on first use.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// Registers `metric` and returns it. The names and labels are constants of this module:
/// a failure is a bug, caught by the unit tests.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("constant, unique metric names");
    metric
}

impl Metrics {
    /// A fresh set of metrics, all zero, in a registry of its own.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some(PREFIX.into()), None).expect("constant prefix");
        let r = &registry;
        let counter = |name: &str, help: &str| {
            register(
                r,
                IntCounter::with_opts(Opts::new(name, help)).expect("valid name"),
            )
        };
        let gauge = |name: &str, help: &str| {
            register(
                r,
                IntGauge::with_opts(Opts::new(name, help)).expect("valid name"),
            )
        };
        let vec = |name: &str, help: &str, label: &str| {
            register(
                r,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid name"),
            )
        };
        let build = register(
            r,
            IntGaugeVec::new(
                Opts::new("build_info", "The running build: version and git revision."),
                &["version", "revision"],
            )
            .expect("valid name"),
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_REVISION])
            .set(1);
        let refused = vec(
            "stanzas_refused_total",
            "Stanzas answered with an error, by condition.",
            "condition",
        );
        let rejected = vec(
            "tokens_rejected_total",
            "Replies dropped because their token did not open, by why.",
            "reason",
        );
        let rate_limited = vec(
            "rate_limited_total",
            "Stanzas refused or dropped by a rate limit: request (answered resource-constraint: a sender over its rate, or the implementing client over its outbound rate), error (not sent: the recipient's error budget is spent), reply (dropped: over the recipient's reply rate), outbound (a message the implementing client starts, dropped over its outbound rate), routed (a peer's reply dropped over its rate).",
            "limit",
        );
        Metrics {
            up: gauge(
                "session_up",
                "1 while the component session with the server is up.",
            ),
            streams_up: gauge(
                "streams_up",
                "Component streams up: one per configured server (`[component] server`) at most.",
            ),
            streams_configured: gauge(
                "streams_configured",
                "Servers configured (`[component] server`): one stream to each.",
            ),
            logins: counter(
                "logins_total",
                "Component logins (handshakes) that succeeded.",
            ),
            login_failures: counter(
                "login_failures_total",
                "Component login attempts that failed.",
            ),
            reconnects: counter(
                "reconnects_total",
                "Streams lost (after which jat-proxy logs in again).",
            ),
            uptime: gauge(
                "session_uptime_seconds",
                "Seconds since the current session was established (kept across in-place upgrades); 0 while down.",
            ),
            established_ms: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            resources: gauge(
                "resources_online",
                "Resources of the implementing client believed online.",
            ),
            forwarded: counter(
                "requests_forwarded_total",
                "Requests forwarded to the implementing client (also those released after being held).",
            ),
            reversed: counter(
                "replies_reversed_total",
                "Replies of the implementing client sent back to the original sender.",
            ),
            messages_forwarded: counter(
                "messages_forwarded_total",
                "Messages forwarded to the implementing client (messages = \"forward\").",
            ),
            messages_reversed: counter(
                "messages_reversed_total",
                "Messages (and message errors) of the implementing client sent back to the original sender.",
            ),
            outbound_requests: counter(
                "outbound_requests_total",
                "IQ requests the implementing client started, sent to their peer (outbound).",
            ),
            outbound_messages: counter(
                "outbound_messages_total",
                "Messages the implementing client started, sent to their peer (outbound).",
            ),
            routed: counter(
                "outbound_replies_routed_total",
                "Peers' replies to requests the implementing client started, routed back to it.",
            ),
            reply_latency: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "reply_latency_seconds",
                        "From a request's forwarding (the issue time sealed in its token, on the forwarding instance's clock) to its reply's reversal.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid histogram"),
            ),
            held: counter(
                "requests_held_total",
                "Requests that waited for a resource of the implementing client to become known.",
            ),
            presence: counter(
                "presence_total",
                "Presence stanzas of the implementing client handled.",
            ),
            refused: CONDITIONS.map(|c| refused.with_label_values(&[c.name()])),
            dropped: vec(
                "stanzas_dropped_total",
                "Stanzas neither answered nor forwarded, by reason.",
                "reason",
            ),
            rejected: REJECTIONS.map(|r| rejected.with_label_values(&[r])),
            rate_limited: LIMITS.map(|l| rate_limited.with_label_values(&[l])),
            key_id: gauge("key_id", "The id of the key that seals new tokens."),
            key_age: gauge(
                "key_age_seconds",
                "Seconds since the key that seals new tokens was created.",
            ),
            key_created: AtomicU64::new(0),
            registry,
        }
    }

    /// Counts what the core did with one stanza.
    #[inline]
    pub fn record(&self, outcome: &Outcome) {
        self.count(outcome.verdict, outcome.stanza);
        if let Some(ms) = outcome.reply_latency_ms {
            self.reply_latency.observe(ms as f64 / 1000.0);
        }
    }

    /// Counts one verdict on a stanza of this kind.
    #[inline]
    pub fn count(&self, verdict: Verdict, stanza: Stanza) {
        let message = stanza == Stanza::Message;
        match verdict {
            Verdict::Forwarded if message => self.messages_forwarded.inc(),
            Verdict::Reversed if message => self.messages_reversed.inc(),
            Verdict::Outbound if message => self.outbound_messages.inc(),
            Verdict::Forwarded => self.forwarded.inc(),
            Verdict::Reversed => self.reversed.inc(),
            Verdict::Outbound => self.outbound_requests.inc(),
            Verdict::Routed => self.routed.inc(),
            Verdict::Refused(c) => {
                self.refused[condition_index(c)].inc();
                if c == Condition::ResourceConstraint {
                    self.rate_limited[0].inc();
                }
            }
            Verdict::Presence => self.presence.inc(),
            Verdict::Held => self.held.inc(),
            Verdict::TokenRejected(r) => {
                self.rejected[rejection_index(r)].inc();
                self.dropped.with_label_values(&[TOKEN_REJECTED]).inc();
            }
            Verdict::Dropped(why) => self.dropped(why),
        }
    }

    #[cold]
    fn dropped(&self, why: &'static str) {
        match why {
            OVER_ERROR_BUDGET => self.rate_limited[1].inc(),
            OVER_REPLY_RATE => self.rate_limited[2].inc(),
            OVER_OUTBOUND_RATE => self.rate_limited[3].inc(),
            OVER_ROUTED_RATE => self.rate_limited[4].inc(),
            _ => {}
        }
        self.dropped.with_label_values(&[why]).inc();
    }

    /// Counts a stanza the core sent besides an answer ([`crate::proxy::Proxy::poll_transmit`]):
    /// a held request forwarded, or refused; probes are not counted.
    pub fn transmitted(&self, el: &Element) {
        if el.name() != "iq" {
            return;
        }
        match el.attr("type") {
            Some("get" | "set") => self.forwarded.inc(),
            Some("error") => {
                let condition = crate::stanza::error_condition(el);
                if let Some(c) = CONDITIONS
                    .iter()
                    .find(|c| condition.as_deref() == Some(c.name()))
                {
                    self.count(Verdict::Refused(*c), Stanza::Iq);
                }
            }
            _ => {}
        }
    }

    /// A login (handshake) succeeded.
    pub fn logged_in(&self) {
        self.logins.inc();
    }

    /// A login attempt failed.
    pub fn login_failed(&self) {
        self.login_failures.inc();
    }

    /// A session is up (logged in, or handed over by an upgrade), established at this Unix
    /// time in milliseconds.
    pub fn session_up(&self, established_unix_ms: u64) {
        self.established_ms
            .store(established_unix_ms, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        self.up.set(1);
    }

    /// A stream was lost (not closed on purpose): jat-proxy logs in to its server again.
    pub fn stream_lost(&self) {
        self.reconnects.inc();
    }

    /// How many streams are up.
    pub fn streams(&self, up: usize) {
        self.streams_up.set(up as i64);
    }

    /// How many servers are configured (one stream to each).
    pub fn servers(&self, n: usize) {
        self.streams_configured.set(n as i64);
    }

    /// The session ended: no stream is up.
    pub fn session_down(&self) {
        self.up.set(0);
        self.resources.set(0);
        self.connected.store(false, Ordering::Relaxed);
    }

    /// How many resources of the implementing client are online.
    pub fn resources(&self, n: usize) {
        self.resources.set(n as i64);
    }

    /// The key set in use (at start and after every reload).
    pub fn keys(&self, keys: &KeySet) {
        let current = keys.current();
        self.key_id.set(i64::from(current.id()));
        self.key_created.store(current.created(), Ordering::Relaxed);
    }

    /// What `/healthz` says now.
    pub fn health(&self) -> Health {
        let connected = self.connected.load(Ordering::Relaxed);
        Health {
            connected,
            resources: if connected {
                self.resources.get().max(0) as u64
            } else {
                0
            },
            key_id: u32::try_from(self.key_id.get()).unwrap_or(0),
        }
    }

    /// The exposition (Prometheus text format 0.0.4) at Unix time `now_ms`.
    pub fn encode(&self, now_ms: u64) -> Result<Vec<u8>, EncodeError> {
        let uptime = if self.connected.load(Ordering::Relaxed) {
            now_ms.saturating_sub(self.established_ms.load(Ordering::Relaxed)) / 1000
        } else {
            0
        };
        self.uptime.set(uptime as i64);
        let created = self.key_created.load(Ordering::Relaxed);
        self.key_age
            .set((now_ms / 1000).saturating_sub(created) as i64);
        let mut out = Vec::with_capacity(8 * 1024);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(EncodeError::Prometheus)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.encode(1_000_000).unwrap()).unwrap()
    }

    #[test]
    fn every_metric_is_exposed_from_the_start() {
        let t = text(&Metrics::new());
        for name in [
            "jat_proxy_build_info{",
            "jat_proxy_session_up 0",
            "jat_proxy_streams_up 0",
            "jat_proxy_streams_configured 0",
            "jat_proxy_logins_total 0",
            "jat_proxy_login_failures_total 0",
            "jat_proxy_reconnects_total 0",
            "jat_proxy_session_uptime_seconds 0",
            "jat_proxy_resources_online 0",
            "jat_proxy_requests_forwarded_total 0",
            "jat_proxy_replies_reversed_total 0",
            "jat_proxy_requests_held_total 0",
            "jat_proxy_presence_total 0",
            "jat_proxy_stanzas_refused_total{condition=\"service-unavailable\"} 0",
            "jat_proxy_tokens_rejected_total{reason=\"authentication\"} 0",
            "jat_proxy_tokens_rejected_total{reason=\"expired\"} 0",
            "jat_proxy_rate_limited_total{limit=\"request\"} 0",
            "jat_proxy_key_id 0",
            "jat_proxy_key_age_seconds",
        ] {
            assert!(t.contains(name), "{name} missing from:\n{t}");
        }
        assert!(t.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))));
    }

    #[test]
    fn verdicts_are_counted_by_outcome_and_reason() {
        let m = Metrics::new();
        for v in [
            Verdict::Forwarded,
            Verdict::Forwarded,
            Verdict::Reversed,
            Verdict::Held,
            Verdict::Presence,
            Verdict::Refused(Condition::ResourceConstraint),
            Verdict::Refused(Condition::Forbidden),
            Verdict::TokenRejected(Rejected::Authentication),
            Verdict::TokenRejected(Rejected::UnknownKey(7)),
            Verdict::Dropped(OVER_ERROR_BUDGET),
            Verdict::Dropped(OVER_REPLY_RATE),
            Verdict::Dropped("reply from outside the target account"),
        ] {
            m.count(v, Stanza::Iq);
        }
        for v in [
            Verdict::Forwarded,
            Verdict::Reversed,
            Verdict::Reversed,
            Verdict::Outbound,
        ] {
            m.count(v, Stanza::Message);
        }
        m.count(Verdict::Outbound, Stanza::Iq);
        m.count(Verdict::Routed, Stanza::Iq);
        m.count(Verdict::TokenRejected(Rejected::Kind), Stanza::Message);
        let t = text(&m);
        for line in [
            "jat_proxy_requests_forwarded_total 2",
            "jat_proxy_replies_reversed_total 1",
            "jat_proxy_messages_forwarded_total 1",
            "jat_proxy_messages_reversed_total 2",
            "jat_proxy_outbound_messages_total 1",
            "jat_proxy_outbound_requests_total 1",
            "jat_proxy_outbound_replies_routed_total 1",
            "jat_proxy_tokens_rejected_total{reason=\"kind\"} 1",
            "jat_proxy_requests_held_total 1",
            "jat_proxy_presence_total 1",
            "jat_proxy_stanzas_refused_total{condition=\"resource-constraint\"} 1",
            "jat_proxy_stanzas_refused_total{condition=\"forbidden\"} 1",
            "jat_proxy_tokens_rejected_total{reason=\"authentication\"} 1",
            "jat_proxy_tokens_rejected_total{reason=\"unknown_key\"} 1",
            "jat_proxy_stanzas_dropped_total{reason=\"token rejected\"} 3",
            "jat_proxy_stanzas_dropped_total{reason=\"reply from outside the target account\"} 1",
            "jat_proxy_rate_limited_total{limit=\"request\"} 1",
            "jat_proxy_rate_limited_total{limit=\"error\"} 1",
            "jat_proxy_rate_limited_total{limit=\"reply\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing from:\n{t}");
        }
    }

    #[test]
    fn held_requests_released_or_refused_are_counted() {
        let m = Metrics::new();
        let fwd = crate::stanza::error_reply(
            "iq",
            "proxy.example",
            "user@example/a",
            Some("1"),
            Condition::ServiceUnavailable,
            "gone",
        );
        m.transmitted(&fwd);
        let mut req = fwd.clone();
        crate::stanza::set_attr(&mut req, "type", "get".to_owned());
        m.transmitted(&req);
        m.transmitted(&crate::stanza::presence(
            Some("probe"),
            "proxy.example",
            "impl@example",
        ));
        let t = text(&m);
        assert!(t.contains("jat_proxy_requests_forwarded_total 1\n"), "{t}");
        assert!(
            t.contains("jat_proxy_stanzas_refused_total{condition=\"service-unavailable\"} 1\n"),
            "{t}"
        );
    }

    #[test]
    fn session_and_health() {
        let m = Metrics::new();
        assert!(!m.health().ok());
        m.session_up(990_000);
        m.resources(2);
        assert_eq!(
            m.health(),
            Health {
                connected: true,
                resources: 2,
                key_id: 0
            }
        );
        assert!(m.health().ok());
        assert_eq!(
            m.health().json(),
            "{\"connected\":true,\"resources\":2,\"key_id\":0}\n"
        );
        let t = text(&m);
        assert!(t.contains("jat_proxy_session_uptime_seconds 10\n"), "{t}");
        assert!(t.contains("jat_proxy_session_up 1\n"), "{t}");
        m.resources(0);
        assert!(!m.health().ok());
        m.resources(1);
        m.stream_lost();
        m.session_down();
        assert!(!m.health().ok());
        assert_eq!(m.health().resources, 0);
        let t = text(&m);
        assert!(t.contains("jat_proxy_reconnects_total 1\n"), "{t}");
        assert!(t.contains("jat_proxy_session_up 0\n"), "{t}");
    }
}
