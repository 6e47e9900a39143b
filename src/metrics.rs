//! What an operator can watch: counters and gauges of the running process, exposed in the
//! Prometheus text format by the monitoring listener (`http`: `GET /metrics`), and the health summary behind
//! `GET /healthz`.
//!
//! The session counts what the core decided, from each stanza's [`Verdict`] (counting is not
//! a protocol decision, so the core stays free of it): typed, never by matching text or
//! parsing a stanza again. Every count is one relaxed atomic increment on a counter created
//! at start, one per label value (a drop's [`DropReason`], a rate limit's [`Limit`], an
//! error's condition, a token's rejection): no allocation, no lock, no label lookup per
//! stanza. The HTTP task reads the same atomics; it shares no lock with the session that is
//! ever held across an await.
//!
//! The metrics live for the whole process ([`global`]): counters start from zero when the
//! process starts, also after an in-place upgrade (a new process image), which Prometheus's
//! `rate()` and `increase()` treat as the counter reset it is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::endpoint::Event;
use crate::keys::KeySet;
use crate::proxy::{DropReason, Limit, Outcome, Stanza, Verdict};
use crate::stanza::Condition;
use crate::token::Rejected;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

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
    /// By [`DropReason`], at `reason as usize`.
    dropped: [IntCounter; DropReason::ALL.len()],
    rejected: [IntCounter; REJECTIONS.len()],
    /// By [`Limit`], at `limit as usize`.
    rate_limited: [IntCounter; Limit::ALL.len()],
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
        let dropped = vec(
            "stanzas_dropped_total",
            "Stanzas neither answered nor forwarded, by reason.",
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
            dropped: DropReason::ALL.map(|d| dropped.with_label_values(&[d.label()])),
            rejected: REJECTIONS.map(|r| rejected.with_label_values(&[r])),
            rate_limited: Limit::ALL.map(|l| rate_limited.with_label_values(&[l.label()])),
            key_id: gauge("key_id", "The id of the key that seals new tokens."),
            key_age: gauge(
                "key_age_seconds",
                "Seconds since the key that seals new tokens was created.",
            ),
            key_created: AtomicU64::new(0),
            registry,
        }
    }

    /// Counts what the core did with one stanza: an input's [`Outcome`] from
    /// [`crate::proxy::Proxy::handle`], or one from [`crate::proxy::Proxy::poll_transmit`] (a
    /// held request released counts as forwarded, one refused as refused; probes are not
    /// counted).
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
        if let Some(limit) = verdict.rate_limit() {
            self.rate_limited[limit as usize].inc();
        }
        let message = stanza == Stanza::Message;
        match verdict {
            Verdict::Forwarded if message => self.messages_forwarded.inc(),
            Verdict::Reversed if message => self.messages_reversed.inc(),
            Verdict::Outbound if message => self.outbound_messages.inc(),
            Verdict::Forwarded => self.forwarded.inc(),
            Verdict::Reversed => self.reversed.inc(),
            Verdict::Outbound => self.outbound_requests.inc(),
            Verdict::Routed => self.routed.inc(),
            Verdict::Refused(c) => self.refused[condition_index(c)].inc(),
            Verdict::Presence => self.presence.inc(),
            Verdict::Held => self.held.inc(),
            Verdict::TokenRejected(r) => {
                self.rejected[rejection_index(r)].inc();
                self.dropped[DropReason::TokenRejected as usize].inc();
            }
            Verdict::Dropped(why) => self.dropped[why as usize].inc(),
            Verdict::Probe => {}
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
        self.key(current.id(), current.created());
    }

    /// The key that seals new tokens: its id, and when it was created (Unix seconds).
    pub fn key(&self, id: u32, created: u64) {
        self.key_id.set(i64::from(id));
        self.key_created.store(created, Ordering::Relaxed);
    }

    /// Counts what the endpoint reports (the only way the session feeds the metrics).
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Stanza {
                verdict,
                stanza,
                reply_latency_ms,
            } => {
                self.count(*verdict, *stanza);
                if let Some(ms) = reply_latency_ms {
                    self.reply_latency.observe(*ms as f64 / 1000.0);
                }
            }
            Event::LoggedIn { .. } => self.logged_in(),
            Event::LoginFailed { .. } => self.login_failed(),
            Event::StreamLost { .. } => self.stream_lost(),
            Event::SessionUp { established_ms } => self.session_up(*established_ms),
            Event::SessionDown => self.session_down(),
            Event::Streams(n) => self.streams(*n),
            Event::Servers(n) => self.servers(*n),
            Event::Resources(n) => self.resources(*n),
            Event::Key { id, created } => self.key(*id, *created),
            _ => {}
        }
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
            "jat_proxy_stanzas_dropped_total{reason=\"token rejected\"} 0",
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
            Verdict::Dropped(DropReason::OverErrorBudget),
            Verdict::Dropped(DropReason::OverReplyRate),
            Verdict::Dropped(DropReason::ReplyFromOutside),
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

    /// What `Metrics::transmitted(&Element)` counted before the core said what it sends on
    /// its own: the oracle the typed count must agree with.
    fn transmitted_as_before(m: &Metrics, el: &xmpp_parsers::minidom::Element) {
        if el.name() != "iq" {
            return;
        }
        match el.attr("type") {
            Some("get" | "set") => m.forwarded.inc(),
            Some("error") => {
                let condition = crate::stanza::error_condition(el);
                if let Some(c) = CONDITIONS
                    .iter()
                    .find(|c| condition.as_deref() == Some(c.name()))
                {
                    m.count(Verdict::Refused(*c), Stanza::Iq);
                }
            }
            _ => {}
        }
    }

    /// A proxy that holds requests for 2 s, with no resource known yet.
    fn holding_proxy() -> crate::proxy::Proxy {
        let settings = crate::proxy::Settings {
            policy: crate::policy::Policy::default(),
            hold_ms: 2000,
            max_held: 8,
            ..crate::proxy::Settings::example()
        };
        let keys = KeySet::from_secrets(&[(1, 0, [7; 32])]).unwrap();
        let mut proxy = crate::proxy::Proxy::new(settings, keys);
        let _ = proxy.connected(crate::proxy::Clock {
            unix_ms: 0,
            mono_ms: 0,
        });
        proxy
    }

    #[test]
    fn held_requests_released_or_refused_are_counted() {
        use crate::inbound::{Limits, read_one};
        use crate::proxy::{Clock, Outcome};
        let mut proxy = holding_proxy();
        let mut rng = crate::random::SeededRandom::new(42);
        let mut clock = Clock {
            unix_ms: 1_790_000_000_000,
            mono_ms: 5_000_000,
        };
        let (typed, before) = (Metrics::new(), Metrics::new());
        let mut outcomes: Vec<Outcome> = Vec::new();
        let request = |id: &str| {
            format!(
                "<iq type='get' id='{id}' to='proxy.example' from='u@example/r'><q xmlns='urn:x'/></iq>"
            )
        };
        // Two held (with a probe); the first refused when its time runs out (with probes
        // meanwhile); then a resource appears, and the second is released.
        let inputs = [
            (0, Some(request("1"))),
            (1000, Some(request("2"))),
            (1000, None),
            (
                0,
                Some("<presence from='impl@example/a' to='proxy.example'/>".to_owned()),
            ),
        ];
        for (ms, xml) in inputs {
            clock.mono_ms += ms;
            clock.unix_ms += ms;
            match xml {
                Some(xml) => {
                    let inbound = read_one(xml.as_bytes(), Limits::default()).unwrap();
                    let _ = proxy.handle(inbound, clock, &mut rng);
                }
                None => proxy.handle_timeout(clock),
            }
            while let Some(out) = proxy.poll_transmit(clock, &mut rng) {
                outcomes.push(out);
            }
        }
        assert_eq!(proxy.held(), 0);
        let verdicts: Vec<(Verdict, Stanza)> =
            outcomes.iter().map(|o| (o.verdict, o.stanza)).collect();
        assert!(
            verdicts.contains(&(Verdict::Refused(Condition::ServiceUnavailable), Stanza::Iq)),
            "{verdicts:?}"
        );
        assert!(
            verdicts.contains(&(Verdict::Forwarded, Stanza::Iq)),
            "{verdicts:?}"
        );
        assert!(
            verdicts.contains(&(Verdict::Probe, Stanza::Presence)),
            "{verdicts:?}"
        );
        for out in &outcomes {
            let el = out
                .transmit
                .as_ref()
                .expect("poll_transmit always transmits");
            match out.verdict {
                Verdict::Probe => assert_eq!(el.attr("type"), Some("probe")),
                Verdict::Forwarded => assert_eq!(el.attr("type"), Some("get")),
                Verdict::Refused(c) => assert_eq!(
                    crate::stanza::error_condition(el).as_deref(),
                    Some(c.name())
                ),
                v => panic!("unexpected {v:?}"),
            }
            typed.record(out);
            transmitted_as_before(&before, el);
        }
        // A refusal over resource-constraint, as `transmitted` parsed it back, counts as a
        // rate limit too.
        let refused = crate::stanza::error_reply(
            "iq",
            "proxy.example",
            "user@example/a",
            Some("1"),
            Condition::ResourceConstraint,
            "slow down",
        );
        typed.count(Verdict::Refused(Condition::ResourceConstraint), Stanza::Iq);
        transmitted_as_before(&before, &refused);
        let t = text(&typed);
        assert_eq!(t, text(&before));
        for line in [
            "jat_proxy_requests_forwarded_total 1",
            "jat_proxy_stanzas_refused_total{condition=\"service-unavailable\"} 1",
            "jat_proxy_stanzas_refused_total{condition=\"resource-constraint\"} 1",
            "jat_proxy_rate_limited_total{limit=\"request\"} 1",
            "jat_proxy_presence_total 0",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing from:\n{t}");
        }
    }

    #[test]
    fn every_drop_reason_has_a_label_of_its_own_and_a_counter() {
        let mut seen = std::collections::HashSet::new();
        for (i, why) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, i, "{why:?} out of place in DropReason::ALL");
            assert!(!why.label().is_empty(), "{why:?}");
            assert!(seen.insert(why.label()), "{:?} shares its label", why);
        }
        for (i, limit) in Limit::ALL.into_iter().enumerate() {
            assert_eq!(limit as usize, i, "{limit:?} out of place in Limit::ALL");
        }
        let m = Metrics::new();
        for why in DropReason::ALL {
            m.count(Verdict::Dropped(why), Stanza::Iq);
        }
        let t = text(&m);
        for why in DropReason::ALL {
            let line = format!(
                "jat_proxy_stanzas_dropped_total{{reason=\"{}\"}} 1",
                why.label().replace('\\', "\\\\").replace('"', "\\\"")
            );
            assert!(t.lines().any(|l| l == line), "{line} missing from:\n{t}");
        }
    }

    #[test]
    fn each_rate_limit_is_counted_under_its_own_label() {
        let cases = [
            (Verdict::Refused(Condition::ResourceConstraint), "request"),
            (Verdict::Dropped(DropReason::OverErrorBudget), "error"),
            (Verdict::Dropped(DropReason::OverReplyRate), "reply"),
            (Verdict::Dropped(DropReason::OverOutboundRate), "outbound"),
            (Verdict::Dropped(DropReason::OverRoutedRate), "routed"),
        ];
        for (verdict, limit) in cases {
            let m = Metrics::new();
            m.count(verdict, Stanza::Iq);
            let t = text(&m);
            for l in Limit::ALL {
                let n = if l.label() == limit { 1 } else { 0 };
                let line = format!(
                    "jat_proxy_rate_limited_total{{limit=\"{}\"}} {n}",
                    l.label()
                );
                assert!(
                    t.lines().any(|x| x == line),
                    "{verdict:?}: {line} missing from:\n{t}"
                );
            }
        }
        // Nothing else is a rate limit.
        let limited: Vec<DropReason> = DropReason::ALL
            .into_iter()
            .filter(|d| d.rate_limit().is_some())
            .collect();
        assert_eq!(
            limited,
            [
                DropReason::OverErrorBudget,
                DropReason::OverReplyRate,
                DropReason::OverOutboundRate,
                DropReason::OverRoutedRate
            ]
        );
        for c in CONDITIONS {
            assert_eq!(
                Verdict::Refused(c).rate_limit(),
                (c == Condition::ResourceConstraint).then_some(Limit::Request)
            );
        }
        let m = Metrics::new();
        m.count(Verdict::TokenRejected(Rejected::Expired), Stanza::Iq);
        m.count(Verdict::Probe, Stanza::Presence);
        let t = text(&m);
        assert!(
            !t.lines()
                .any(|l| l.starts_with("jat_proxy_rate_limited_total") && l.ends_with(" 1")),
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
