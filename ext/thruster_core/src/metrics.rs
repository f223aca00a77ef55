//! Prometheus metrics: one process-wide registry of the proxy's families,
//! written in the Prometheus text format (0.0.4) by the `prometheus` crate.
//!
//! Off unless `METRICS_PORT` is set: [`get`] is `None` until the server
//! calls [`enable`], so with metrics off the request path pays one atomic
//! load and nothing else. Once on, it stays on for the process (counters are
//! process-wide and monotonic; a server restarted in-process keeps them).
//!
//! The hot path only touches atomics through handles resolved once: label
//! values come from small fixed sets (methods folded to eight values,
//! status codes 100–599, a few error kinds), so no label is formatted and no
//! series is created per request, and no client can grow the registry.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The metrics, when `METRICS_PORT` turned them on.
#[inline]
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

/// Turns metrics on for the rest of the process (idempotent).
pub fn enable() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Request methods as labelled: the standard ones a Rails app sees, every
/// other (WebDAV, typos, a client's random tokens) as `other`.
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];

/// The index of a method's label in [`METHODS`].
pub fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::PATCH => 4,
        http::Method::DELETE => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Status codes with a label of their own; hyper accepts up to 999, which
/// would be the app's invention: those share `other`.
const STATUS_FIRST: u16 = 100;
const STATUS_LAST: u16 = 599;
const STATUS_SLOTS: usize = (STATUS_LAST - STATUS_FIRST + 1) as usize + 1;

fn status_slot(status: u16) -> usize {
    if (STATUS_FIRST..=STATUS_LAST).contains(&status) {
        (status - STATUS_FIRST) as usize
    } else {
        STATUS_SLOTS - 1
    }
}

/// What `X-Cache` said about a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl CacheResult {
    const ALL: [CacheResult; 4] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Bypass,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Bypass => "bypass",
        }
    }
}

/// Why a request could not be forwarded, as `thruster_upstream_errors_total`
/// labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The app refused the connection (not listening: booting, restarting).
    Refused,
    /// The app reset or closed the connection before a complete response.
    Reset,
    /// No response head within `HTTP_WRITE_TIMEOUT`.
    Timeout,
    /// The request body passed `MAX_REQUEST_BODY`.
    BodyTooLarge,
    /// The request body came slower than `REQUEST_BODY_MIN_RATE`.
    BodyTooSlow,
    /// The client's request body broke off or did not parse.
    BodyBroken,
    /// Anything else (a connect error other than a refusal, a spool failure).
    Other,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 7] = [
        UpstreamErrorKind::Refused,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::BodyTooLarge,
        UpstreamErrorKind::BodyTooSlow,
        UpstreamErrorKind::BodyBroken,
        UpstreamErrorKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Refused => "refused",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::BodyTooLarge => "body_too_large",
            UpstreamErrorKind::BodyTooSlow => "body_too_slow",
            UpstreamErrorKind::BodyBroken => "body_broken",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// A client connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    H1,
    H2,
    /// A QUIC connection (HTTP/3).
    H3,
}

/// Where a buffered body was spooled to disk from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spool {
    Request,
    Response,
}

/// 1 ms to 30 s: static files and hits sit at the bottom, slow Rails
/// actions and uploads at the top.
const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// Every family, with its handles resolved.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// `requests` by method and status slot, created on first use so only
    /// statuses seen are exposed.
    request_handles: Box<[OnceLock<IntCounter>]>,
    request_duration: Histogram,
    in_flight: IntGauge,
    response_bytes: IntCounter,
    cache_requests: [IntCounter; 4],
    cache_bytes: IntGaugeVec,
    cache_entries: IntGaugeVec,
    redis_operations: IntCounterVec,
    redis_up: IntGauge,
    upstream_errors: [IntCounter; 7],
    upstream_retries: IntCounter,
    upstream_duration: Histogram,
    upstream_waiting: IntGauge,
    connections_open: [IntGauge; 3],
    connections_per_ip_closed: IntCounter,
    connections_waiting: IntGauge,
    spooled: [IntCounter; 2],
    tls_expiry: prometheus::GaugeVec,
    acme: IntCounterVec,
}

/// A family's registration failing means two families share a name or a
/// help text is malformed: a bug in this file, caught by its tests.
fn registered<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric families are distinct");
    c
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let requests = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "thruster_http_requests_total",
                    "Requests answered, by method (folded: GET, HEAD, POST, PUT, PATCH, DELETE, \
                     OPTIONS, other) and status code.",
                ),
                &["method", "status"],
            )
            .expect("valid"),
        );
        let histogram = |name: &str, help: &str| {
            registered(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
                )
                .expect("valid"),
            )
        };
        let counter =
            |name: &str, help: &str| registered(&r, IntCounter::new(name, help).expect("valid"));
        let gauge =
            |name: &str, help: &str| registered(&r, IntGauge::new(name, help).expect("valid"));
        let counter_vec = |name: &str, help: &str, label: &str| {
            registered(
                &r,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid"),
            )
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            registered(
                &r,
                IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid"),
            )
        };

        let request_duration = histogram(
            "thruster_http_request_duration_seconds",
            "Time from a request's arrival until its response body was sent (upgrades: until \
             the tunnel closed).",
        );
        let in_flight = gauge(
            "thruster_http_in_flight_requests",
            "Requests being handled now.",
        );
        let response_bytes = counter(
            "thruster_http_response_bytes_total",
            "Response body bytes sent to clients (after compression).",
        );
        let cache = counter_vec(
            "thruster_cache_requests_total",
            "Responses by what the cache did (X-Cache): hit, miss, stale (served past \
             freshness), bypass (not cacheable).",
            "result",
        );
        let cache_requests = CacheResult::ALL.map(|c| cache.with_label_values(&[c.label()]));
        let cache_bytes = gauge_vec(
            "thruster_cache_bytes",
            "Bytes held by each cache tier.",
            "tier",
        );
        let cache_entries = gauge_vec(
            "thruster_cache_entries",
            "Entries held by each cache tier.",
            "tier",
        );
        let redis_operations = counter_vec(
            "thruster_cache_redis_operations_total",
            "Calls of the shared cache tier by outcome: hit, miss, rejected (a value that was \
             not a valid entry for its key), unavailable (not made: no connection or the \
             circuit open), timeout, error, stored, write_failed, breaker_open.",
            "result",
        );
        let redis_up = gauge(
            "thruster_cache_redis_up",
            "1 while the shared cache tier is connected with its circuit closed, else 0 \
             (always 0 without CACHE_REDIS_URL).",
        );
        let errors = counter_vec(
            "thruster_upstream_errors_total",
            "Requests the proxy could not forward to the app, by kind: refused, reset, timeout, \
             body_too_large, body_too_slow, body_broken, other.",
            "kind",
        );
        let upstream_errors =
            UpstreamErrorKind::ALL.map(|k| errors.with_label_values(&[k.label()]));
        let upstream_retries = counter(
            "thruster_upstream_retries_total",
            "Requests sent to the app again: after a refused connection (app restarting) or on a \
             fresh connection after a pooled one failed.",
        );
        let upstream_duration = histogram(
            "thruster_upstream_response_duration_seconds",
            "Time from sending a request to the app until its response head arrived (retries \
             included).",
        );
        let upstream_waiting = gauge(
            "thruster_upstream_waiting_requests",
            "Requests waiting for one of the UPSTREAM_MAX_CONNECTIONS slots to the app (always 0 \
             without it).",
        );
        let open = gauge_vec(
            "thruster_connections_open",
            "Client connections open, by protocol (h2c connections count from their first \
             request).",
            "protocol",
        );
        let connections_open = ["h1", "h2", "h3"].map(|p| open.with_label_values(&[p]));
        let connections_per_ip_closed = counter(
            "thruster_connections_per_ip_limit_closed_total",
            "Client connections closed at once because their address had MAX_CONNECTIONS_PER_IP \
             open.",
        );
        let connections_waiting = gauge(
            "thruster_connections_waiting",
            "Client connections waiting in the listeners' accept queues (past MAX_CONNECTIONS \
             they wait there), at scrape time.",
        );
        let spool = counter_vec(
            "thruster_buffer_spooled_bytes_total",
            "Body bytes written to temporary files by request or response buffering.",
            "direction",
        );
        let spooled = ["request", "response"].map(|d| spool.with_label_values(&[d]));
        let tls_expiry = registered(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "thruster_tls_certificate_expiry_timestamp_seconds",
                    "When the certificate served for a domain expires (Unix time).",
                ),
                &["domain"],
            )
            .expect("valid"),
        );
        let acme = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "thruster_acme_orders_total",
                    "ACME certificate orders, by kind (issue, renew) and result (success, \
                     failure).",
                ),
                &["kind", "result"],
            )
            .expect("valid"),
        );
        for kind in ["issue", "renew"] {
            for result in ["success", "failure"] {
                acme.with_label_values(&[kind, result]);
            }
        }
        // Resident memory, open fds, CPU seconds, start time (Linux only).
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector registers once");

        Metrics {
            registry: r,
            request_handles: (0..METHODS.len() * STATUS_SLOTS)
                .map(|_| OnceLock::new())
                .collect(),
            requests,
            request_duration,
            in_flight,
            response_bytes,
            cache_requests,
            cache_bytes,
            cache_entries,
            redis_operations,
            redis_up,
            upstream_errors,
            upstream_retries,
            upstream_duration,
            upstream_waiting,
            connections_open,
            connections_per_ip_closed,
            connections_waiting,
            spooled,
            tls_expiry,
            acme,
        }
    }

    /// A request arrived at `started`: counted in flight until the returned
    /// value is dropped.
    pub fn request_started(
        &'static self,
        method: &http::Method,
        started: Instant,
    ) -> RequestMetric {
        self.in_flight.inc();
        RequestMetric {
            metrics: self,
            method: method_index(method),
            started,
        }
    }

    fn requests_handle(&self, method: usize, status: u16) -> &IntCounter {
        let slot = status_slot(status);
        self.request_handles[method * STATUS_SLOTS + slot].get_or_init(|| {
            let status = if slot == STATUS_SLOTS - 1 {
                "other".to_string()
            } else {
                status.to_string()
            };
            self.requests
                .with_label_values(&[METHODS[method], status.as_str()])
        })
    }

    pub fn cache_result(&self, result: CacheResult) {
        self.cache_requests[result as usize].inc();
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }

    pub fn upstream_waiting(&self, change: i64) {
        self.upstream_waiting.add(change);
    }

    pub fn upstream_response(&self, took: Duration) {
        self.upstream_duration.observe(took.as_secs_f64());
    }

    /// A client connection of `protocol` is open until the value is dropped.
    pub fn connection_opened(&'static self, protocol: Protocol) -> OpenConnection {
        let gauge = &self.connections_open[protocol as usize];
        gauge.inc();
        OpenConnection(gauge)
    }

    pub fn connection_closed_per_ip(&self) {
        self.connections_per_ip_closed.inc();
    }

    pub fn spooled(&self, from: Spool, bytes: u64) {
        self.spooled[from as usize].inc_by(bytes);
    }

    pub fn acme_order(&self, renewal: bool, success: bool) {
        let kind = if renewal { "renew" } else { "issue" };
        let result = if success { "success" } else { "failure" };
        self.acme.with_label_values(&[kind, result]).inc();
    }

    /// Scrape-time values, set by whoever knows them just before [`render`].
    ///
    /// [`render`]: Metrics::render
    pub fn set_cache_usage(&self, tier: &str, bytes: u64, entries: u64) {
        let clamp = |n: u64| n.min(i64::MAX as u64) as i64;
        self.cache_bytes
            .with_label_values(&[tier])
            .set(clamp(bytes));
        self.cache_entries
            .with_label_values(&[tier])
            .set(clamp(entries));
    }

    /// The shared tier's counters since start (`outcomes`: label and total)
    /// and whether it is usable now.
    pub fn set_redis(&self, outcomes: &[(&str, u64)], up: bool) {
        for &(result, total) in outcomes {
            let counter = self.redis_operations.with_label_values(&[result]);
            // Totals only grow; a counter is advanced to them.
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.redis_up.set(i64::from(up));
    }

    pub fn set_connections_waiting(&self, n: u64) {
        self.connections_waiting.set(n.min(i64::MAX as u64) as i64);
    }

    pub fn set_certificate_expiry(&self, domain: &str, unix_seconds: f64) {
        self.tls_expiry
            .with_label_values(&[domain])
            .set(unix_seconds);
    }

    /// The exposition in the Prometheus text format, and its content type.
    pub fn render(&self) -> (&'static str, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut out = Vec::with_capacity(16 * 1024);
        // Writing into a Vec cannot fail; a family with a broken name could,
        // and then the rest is still worth serving.
        let _ = encoder.encode(&self.registry.gather(), &mut out);
        (prometheus::TEXT_FORMAT, out)
    }
}

/// One request, from its arrival to its completion.
pub struct RequestMetric {
    metrics: &'static Metrics,
    method: usize,
    started: Instant,
}

impl RequestMetric {
    /// The response was sent (or the client went away mid-body): counted
    /// with its status and the body bytes sent.
    pub fn finish(self, status: u16, sent: u64) {
        let m = self.metrics;
        m.requests_handle(self.method, status).inc();
        m.request_duration
            .observe(self.started.elapsed().as_secs_f64());
        m.response_bytes.inc_by(sent);
        // `Drop` takes it out of flight.
    }
}

impl Drop for RequestMetric {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// An open client connection; closing it is dropping this.
pub struct OpenConnection(&'static IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_fold_to_a_fixed_set() {
        for (method, label) in [
            ("GET", "GET"),
            ("HEAD", "HEAD"),
            ("POST", "POST"),
            ("PUT", "PUT"),
            ("PATCH", "PATCH"),
            ("DELETE", "DELETE"),
            ("OPTIONS", "OPTIONS"),
            ("TRACE", "other"),
            ("CONNECT", "other"),
            ("PROPFIND", "other"),
            ("get", "other"),
            ("XYZZY123", "other"),
        ] {
            let m = http::Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(METHODS[method_index(&m)], label, "{method}");
        }
    }

    #[test]
    fn statuses_have_bounded_slots() {
        assert_eq!(status_slot(100), 0);
        assert_eq!(status_slot(200), 100);
        assert_eq!(status_slot(599), STATUS_SLOTS - 2);
        assert_eq!(status_slot(600), STATUS_SLOTS - 1);
        assert_eq!(status_slot(999), STATUS_SLOTS - 1);
    }

    #[test]
    fn random_methods_leave_the_series_bounded() {
        let m = enable();
        for i in 0..2000u32 {
            let method = http::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
            m.request_started(&method, Instant::now()).finish(200, 1);
        }
        // Only this test sends unknown methods (tests share the registry and
        // run in parallel): 2000 of them are one series.
        let text = String::from_utf8(m.render().1).unwrap();
        let other = text
            .lines()
            .filter(|l| l.starts_with("thruster_http_requests_total{method=\"other\""))
            .collect::<Vec<_>>();
        assert_eq!(
            other,
            ["thruster_http_requests_total{method=\"other\",status=\"200\"} 2000"]
        );
    }

    #[test]
    fn counts_render_in_the_text_format() {
        let m = enable();
        m.request_started(&http::Method::DELETE, Instant::now())
            .finish(204, 10);
        m.upstream_error(UpstreamErrorKind::Refused);
        m.cache_result(CacheResult::Stale);
        let (content_type, body) = m.render();
        assert_eq!(content_type, "text/plain; version=0.0.4");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("thruster_http_requests_total{method=\"DELETE\",status=\"204\"}"));
        assert!(text.contains("thruster_upstream_errors_total{kind=\"refused\"}"));
        assert!(text.contains("thruster_cache_requests_total{result=\"stale\"}"));
        assert!(text.contains("# TYPE thruster_http_request_duration_seconds histogram"));
        assert!(text.contains("thruster_http_request_duration_seconds_bucket{le=\"30\"}"));
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
