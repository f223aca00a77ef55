//! Forwarding to the app, in four steps a request walks in order —
//! prepare (request header rules), request body (limits and buffering),
//! send (the upstream call, 1xx relay, retries), finish (upgrades, response
//! header rules, response buffering) — each failing with a [`ForwardError`]
//! whose status is the proxy's answer (400, 408, 413, 502, 504).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::upstream::{AppBody, SendError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;

use super::logging::{TunnelEnd, TunnelOpen};
use super::request_body::{BodyCut, BodyCutError, BodyPace, LimitedBody};
use super::request_buffer::{self, BufferLimits};
use super::response_buffer::{self, SpoolLimits};
use super::ConnInfo;
use crate::config::Config;
use crate::conn::ConnState;
use crate::http::{full_body, BoxError, RequestBody, ResponseBody, X_ACCEL_BUFFERING};
use crate::log;
use crate::metrics::{self, UpstreamErrorKind};
use crate::upstream::Upstream;

/// Hop-by-hop fields (RFC 9110 §7.6.1), plus the non-standard ones proxies
/// have always treated as such (`Proxy-Connection`, `Keep-Alive`) and the
/// proxy credentials meant for us, not the app (RFC 9110 §11.7.1-2).
///
/// Names, not strings, here and below: a `&str` name is parsed on every
/// use, and inserting under one copies it into an allocation of its own.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Other client-address and scheme claims that Rack and Rails read
/// (`request.ssl?`, `scheme`, `port`, `remote_ip`). The proxy does not set
/// them; when forwarded headers are not trusted, a client's copies would be
/// believed by the app, so they are removed.
const UNTRUSTED_CLAIMS: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("client-ip"),
];

/// Gives every header value of an app's response an allocation of its
/// own. hyper's HTTP/1 client parses them as views into its connection's
/// read buffer (8 KiB), and some outlive the response: a cache entry keeps
/// its headers, and h2's HPACK encoder keeps the values it indexes (most
/// but `content-length`, `etag`, `set-cookie` and a few others) in the
/// client connection's dynamic table until newer ones push them out. Each
/// such view kept a whole upstream read buffer alive (an idle HTTP/2
/// connection one per indexed value). A copy is a few small allocations per
/// response.
fn own_header_values(headers: &mut HeaderMap) {
    for value in headers.values_mut() {
        let mut owned = HeaderValue::from_bytes(value.as_bytes())
            .expect("the bytes of a header value make a valid header value");
        owned.set_sensitive(value.is_sensitive());
        *value = owned;
    }
}

/// Removes hop-by-hop fields and every field named in `Connection`
/// (RFC 9110 §7.6.1). Returns the `Upgrade` value when the message asked for
/// a protocol upgrade (RFC 9110 §7.8), so the caller can carry it across.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let mut upgrade_requested = false;
    let mut trailers_accepted = false;
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter_map(|token| {
            upgrade_requested |= token.eq_ignore_ascii_case("upgrade");
            HeaderName::from_bytes(token.as_bytes()).ok()
        })
        .collect();
    // RFC 9110 §10.1.4: "TE: trailers" tells the app its trailers will reach
    // the client; keep that token, drop the rest.
    for te in headers.get_all(header::TE) {
        if let Ok(v) = te.to_str() {
            trailers_accepted |= v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            });
        }
    }
    let upgrade = headers
        .get(header::UPGRADE)
        .cloned()
        .filter(|_| upgrade_requested);
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers_accepted {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    upgrade
}

/// Sets `X-Forwarded-For/-Host/-Proto` for the app.
///
/// With `trust` (FORWARD_HEADERS, default without TLS) a proxy in front of us
/// is believed: its `X-Forwarded-For` chain is extended and its `-Host` and
/// `-Proto` kept. Without it, client-sent values are replaced and the other
/// claims Rack reads (`X-Forwarded-Ssl`, `-Scheme`, `-Port`, `X-Real-IP`,
/// `Client-IP`) removed, so a client cannot spoof its address or scheme to
/// the app.
pub fn set_forwarded_headers(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    host: Option<&HeaderValue>,
    tls: bool,
    trust: bool,
) {
    let chain = if trust {
        let prior: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if prior.is_empty() {
            None
        } else {
            Some(format!("{}, {client_ip}", prior.join(", ")))
        }
    } else {
        None
    };
    let value = match chain {
        Some(chain) => HeaderValue::try_from(chain).ok(),
        None => Some(ip_value(client_ip)),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }

    let keep = |headers: &HeaderMap, name: &HeaderName| {
        trust && headers.get(name).is_some_and(|v| !v.as_bytes().is_empty())
    };
    if !keep(headers, &X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    if !keep(headers, &X_FORWARDED_PROTO) {
        let proto = if tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !trust {
        for name in &UNTRUSTED_CLAIMS {
            headers.remove(name);
        }
    }
    // RFC 7239 `Forwarded` would carry a second, unchecked copy of the same
    // claims; Thruster drops it and so do we.
    headers.remove(header::FORWARDED);
}

/// An address as a header value (see `formatted_value`).
fn ip_value(ip: IpAddr) -> HeaderValue {
    // At most 45 bytes (an IPv6 text form), always valid.
    crate::http::formatted_value(format_args!("{ip}")).expect("an IP address fits in 64 bytes")
}

/// The host the client asked for: `Host`, or the HTTP/2 `:authority`.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::try_from(a.as_str()).ok())
    })
}

/// Forwards requests to the app: owns the upstream client and the settings
/// of the forwarding steps. The cache's `next`, and the pipeline's when
/// there is no cache.
pub struct Forwarder {
    upstream: Upstream,
    config: Arc<Config>,
}

/// Why a request could not be forwarded; [`ForwardError::status`] is the
/// proxy's own answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The body passed `MAX_REQUEST_BODY` (413).
    #[error("request body larger than MAX_REQUEST_BODY")]
    BodyTooLarge,
    /// The body came slower than `REQUEST_BODY_MIN_RATE` or not within
    /// `HTTP_READ_TIMEOUT` (408).
    #[error("request body too slow")]
    BodyTooSlow,
    /// The client went away or sent a body that does not parse (400).
    #[error("request body not received: {0}")]
    BodyBroken(BoxError),
    /// No response head within `HTTP_WRITE_TIMEOUT` (504).
    #[error("no response from the app within {0:?}")]
    Timeout(Duration),
    /// The app refused, reset or hung up, or its response broke while it
    /// was being buffered (502).
    #[error("{0}")]
    Upstream(BoxError),
}

impl ForwardError {
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ForwardError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            ForwardError::BodyBroken(_) => StatusCode::BAD_REQUEST,
            ForwardError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `thruster_upstream_errors_total` label: the variant, and for an
    /// upstream failure the first cause in its chain that says what the app
    /// did (an I/O error kind, or hyper's "closed before a complete
    /// message").
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            ForwardError::BodyTooLarge => UpstreamErrorKind::BodyTooLarge,
            ForwardError::BodyTooSlow => UpstreamErrorKind::BodyTooSlow,
            ForwardError::BodyBroken(_) => UpstreamErrorKind::BodyBroken,
            ForwardError::Timeout(_) => UpstreamErrorKind::Timeout,
            ForwardError::Upstream(err) => upstream_kind(&**err),
        }
    }

    /// A request body error: a cut by the limits, or a broken body.
    fn from_body(err: BoxError) -> ForwardError {
        match BodyCutError::find(&*err) {
            Some(BodyCut::TooLarge) => ForwardError::BodyTooLarge,
            Some(BodyCut::TooSlow) => ForwardError::BodyTooSlow,
            None => ForwardError::BodyBroken(err),
        }
    }

    /// A failed upstream call: a cut of the streamed request body shows up
    /// as its cause; anything else is the app's side.
    fn from_send(err: SendError) -> ForwardError {
        match BodyCutError::find(&err) {
            Some(BodyCut::TooLarge) => ForwardError::BodyTooLarge,
            Some(BodyCut::TooSlow) => ForwardError::BodyTooSlow,
            None => ForwardError::Upstream(err.into()),
        }
    }
}

fn upstream_kind(err: &(dyn std::error::Error + 'static)) -> UpstreamErrorKind {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                // A Unix socket that is not there yet is the same story as a
                // TCP port nobody listens on: the app is not up.
                K::ConnectionRefused | K::NotFound => return UpstreamErrorKind::Refused,
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    return UpstreamErrorKind::Reset
                }
                K::TimedOut => return UpstreamErrorKind::Timeout,
                _ => {}
            }
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
                return UpstreamErrorKind::Reset;
            }
        }
        cause = err.source();
    }
    UpstreamErrorKind::Other
}

/// The request's path for log lines (its query left out), kept as the
/// client's URI: a clone shares its bytes, where a `String` per request
/// cost two allocations and copies.
#[derive(Clone)]
struct LogPath(Uri);

impl LogPath {
    fn as_str(&self) -> &str {
        self.0.path()
    }
}

/// A request on its way upstream, between the steps.
struct Outgoing {
    parts: http::request::Parts,
    body: RequestBody,
    /// For log lines.
    path: LogPath,
    /// The client's side of an upgrade the app is asked for.
    client_upgrade: Option<OnUpgrade>,
    /// 1xx responses are relayed to this connection (HTTP/1.1 only).
    informational: Option<Arc<ConnState>>,
}

impl Forwarder {
    pub fn new(upstream: Upstream, config: Arc<Config>) -> Forwarder {
        Forwarder { upstream, config }
    }

    /// Forwards and answers: the app's response, or the proxy's own error
    /// response.
    pub async fn fetch(
        &self,
        req: Request<RequestBody>,
        conn: &ConnInfo,
    ) -> Response<ResponseBody> {
        match self.forward(req, conn).await {
            Ok(response) => response,
            Err(err) => self.error_response(&err),
        }
    }

    /// The four steps: prepare, request body, send, finish; every failure
    /// counted in the metrics by kind.
    pub async fn forward(
        &self,
        req: Request<RequestBody>,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let result = self.forward_steps(req, conn).await;
        if let (Err(err), Some(m)) = (&result, metrics::get()) {
            m.upstream_error(err.kind());
        }
        result
    }

    async fn forward_steps(
        &self,
        req: Request<RequestBody>,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let outgoing = self.prepare(req, conn);
        let path = outgoing.path.clone();
        let outgoing = match self.request_body(outgoing).await {
            Ok(outgoing) => outgoing,
            Err(err) => {
                log::info(
                    "Request body not received",
                    &[
                        ("path", path.as_str().into()),
                        ("error", error_chain(&err).into()),
                    ],
                );
                if let Some(state) = &conn.state {
                    state.mark_final_response();
                }
                return Err(err);
            }
        };
        let (response, client_on_upgrade) = self.send(outgoing, conn).await.inspect_err(|err| {
            if !matches!(err, ForwardError::Timeout(_)) {
                log::info(
                    "Unable to proxy request",
                    &[
                        ("path", path.as_str().into()),
                        ("error", error_chain(err).into()),
                    ],
                );
            }
        })?;
        self.finish(response, client_on_upgrade, conn)
            .await
            .inspect_err(|err| {
                log::info(
                    "Unable to proxy request",
                    &[
                        ("path", path.as_str().into()),
                        ("error", error_chain(err).into()),
                    ],
                );
            })
    }

    /// The proxy's answer for a request it could not forward. 400/408/413
    /// close the connection: the client may still be sending a body we will
    /// not read.
    pub fn error_response(&self, err: &ForwardError) -> Response<ResponseBody> {
        match err.status() {
            StatusCode::BAD_GATEWAY => {
                // Read on each use (502s are rare), so a page deployed after
                // start-up is served; Thruster reads it once at start.
                let page = std::fs::read(&self.config.bad_gateway_page).ok();
                error_response(StatusCode::BAD_GATEWAY, page)
            }
            StatusCode::GATEWAY_TIMEOUT => error_response(StatusCode::GATEWAY_TIMEOUT, None),
            status => closing(error_response(status, None)),
        }
    }

    /// Step 1, the request head: hop-by-hop fields, forwarded headers,
    /// `Host`, the upgrade handshake, the upstream URI.
    fn prepare(&self, mut req: Request<RequestBody>, conn: &ConnInfo) -> Outgoing {
        let host = request_host(&req);
        let upgrade = remove_hop_by_hop(req.headers_mut());
        // Only HTTP/1.1 has Upgrade (RFC 9110 §7.8); HTTP/2 uses extended CONNECT.
        let client_upgrade = upgrade.filter(|_| req.version() == Version::HTTP_11);
        set_forwarded_headers(
            req.headers_mut(),
            conn.peer.ip().to_canonical(),
            host.as_ref(),
            conn.tls,
            self.config.forward_headers,
        );
        let host = host.unwrap_or_else(|| self.upstream.fallback_host().clone());
        req.headers_mut().insert(header::HOST, host);
        let client_on_upgrade = client_upgrade
            .as_ref()
            .map(|_| hyper::upgrade::on(&mut req));
        if let Some(proto) = client_upgrade {
            let h = req.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, proto);
        }
        // RFC 9110 §15.2: no 1xx for HTTP/1.0 clients; HTTP/2 clients miss
        // out because hyper's server cannot send informational responses
        // there; a connection without a state of its own (a QUIC stream)
        // has no socket to write them to.
        let informational = conn
            .state
            .clone()
            .filter(|_| req.version() == Version::HTTP_11);
        let path = LogPath(req.uri().clone());
        let (mut parts, body) = req.into_parts();
        parts.uri = self.upstream.uri_for(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        Outgoing {
            parts,
            body,
            path,
            client_upgrade: client_on_upgrade,
            informational,
        }
    }

    /// Step 2, the request body: limits on size and pace, and request
    /// buffering (not for upgrades, whose body is the tunnel).
    async fn request_body(&self, mut out: Outgoing) -> Result<Outgoing, ForwardError> {
        if out.body.is_end_stream() {
            return Ok(out);
        }
        let config = &self.config;
        let pace = match (config.request_body_min_rate, config.http_read_timeout) {
            (0, Some(deadline)) => BodyPace::Deadline(deadline),
            (0, None) => BodyPace::Unlimited,
            (rate, _) => BodyPace::MinRate(rate),
        };
        let limited = LimitedBody::new(
            std::mem::replace(&mut out.body, full_body(Bytes::new())),
            config.max_request_body,
            pace,
        )
        .boxed_unsync();
        if !config.request_buffering || out.client_upgrade.is_some() {
            out.body = limited;
            return Ok(out);
        }
        let limits = BufferLimits {
            memory: config.request_buffer_memory,
            disk: config.request_buffer_max,
        };
        let buffered = request_buffer::buffer(limited, limits)
            .await
            .map_err(ForwardError::from_body)?;
        // A complete body goes to the app with its length, even if the
        // client sent it chunked.
        if let Some(len) = buffered.len {
            out.parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        out.body = buffered.body;
        Ok(out)
    }

    /// Step 3, the upstream call: 1xx relay, the response-head timeout, a
    /// replay on a fresh connection for a body-less request whose pooled
    /// connection failed, and retries while the app refuses connections.
    async fn send(
        &self,
        out: Outgoing,
        conn: &ConnInfo,
    ) -> Result<(Response<AppBody>, Option<OnUpgrade>), ForwardError> {
        if log::enabled(log::Level::Debug) {
            log::debug(
                "Proxying request",
                &[
                    ("path", out.path.as_str().into()),
                    ("upstream", self.upstream.to_string().into()),
                ],
            );
        }
        // A request without a body can be replayed: nothing of it is lost
        // if a pooled connection fails under it (the app closed it as we
        // sent).
        let replay =
            (out.body.is_end_stream() && out.client_upgrade.is_none()).then(|| out.parts.clone());
        let mut upstream_req = Request::from_parts(out.parts, out.body);
        if let Some(state) = out.informational {
            relay_informational(&mut upstream_req, state);
        }
        let sent_at = std::time::Instant::now();
        let mut result = self
            .send_with_timeout(upstream_req, out.path.as_str())
            .await;
        if let Some(state) = &conn.state {
            state.mark_final_response();
        }
        if let (Some(Err(err)), Some(parts)) = (&result, replay) {
            if err.is_connect() {
                // Nothing reached the app: the app is restarting or still
                // booting. Try again for a short while instead of a 502.
                result = self.retry_connect(&parts, out.path.as_str(), result).await;
            } else {
                log::debug(
                    "Retrying request on a new upstream connection",
                    &[
                        ("path", out.path.as_str().into()),
                        ("error", error_chain(err).into()),
                    ],
                );
                if let Some(m) = metrics::get() {
                    m.upstream_retry();
                }
                let retry = Request::from_parts(parts, full_body(Bytes::new()));
                result = self.send_with_timeout(retry, out.path.as_str()).await;
            }
        }
        if let (Some(Ok(_)), Some(m)) = (&result, metrics::get()) {
            m.upstream_response(sent_at.elapsed());
        }
        match result {
            None => Err(ForwardError::Timeout(
                self.config.http_write_timeout.unwrap_or_default(),
            )),
            Some(Ok(response)) => Ok((response, out.client_upgrade)),
            Some(Err(err)) => Err(ForwardError::from_send(err)),
        }
    }

    /// Step 4, the response: the upgrade tunnel, hop-by-hop fields, and
    /// response buffering.
    async fn finish(
        &self,
        mut response: Response<AppBody>,
        client_on_upgrade: Option<OnUpgrade>,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let mut end = None;
            if let Some(client_on_upgrade) = client_on_upgrade {
                if let Some(state) = &conn.state {
                    state.mark_upgraded();
                }
                let upstream_on_upgrade = hyper::upgrade::on(&mut response);
                let (tunnel_end, open) = TunnelEnd::new();
                end = Some(tunnel_end);
                tokio::spawn(tunnel(client_on_upgrade, upstream_on_upgrade, open));
            }
            let (mut parts, _) = response.into_parts();
            if let Some(end) = end {
                parts.extensions.insert(end);
            }
            return Ok(Response::from_parts(parts, full_body(Bytes::new())));
        }
        remove_hop_by_hop(response.headers_mut());
        own_header_values(response.headers_mut());
        if self.config.response_buffering {
            let limits = SpoolLimits {
                memory: self.config.response_buffer_memory,
                disk: self.config.response_buffer_max,
            };
            return response_buffer::buffer(response, limits, self.config.http_write_timeout)
                .await
                .map_err(ForwardError::Upstream);
        }
        response.headers_mut().remove(X_ACCEL_BUFFERING);
        Ok(response.map(|b| b.map_err(BoxError::from).boxed_unsync()))
    }

    /// Retries a body-less request whose connection to the app was refused,
    /// every 50–500 ms until `UPSTREAM_RETRY_TIMEOUT` has passed. Safe for
    /// any method: a refused connection means the app saw nothing.
    async fn retry_connect(
        &self,
        parts: &http::request::Parts,
        path: &str,
        mut result: SendResult,
    ) -> SendResult {
        let Some(window) = self.config.upstream_retry_timeout else {
            return result;
        };
        let deadline = tokio::time::Instant::now() + window;
        let mut pause = Duration::from_millis(50);
        while matches!(&result, Some(Err(e)) if e.is_connect()) {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            if let Some(m) = metrics::get() {
                m.upstream_retry();
            }
            let retry = Request::from_parts(parts.clone(), full_body(Bytes::new()));
            result = self.send_with_timeout(retry, path).await;
        }
        result
    }

    /// Sends upstream, bounding the wait for the response head by
    /// `HTTP_WRITE_TIMEOUT`. `None` means the app did not answer in time.
    async fn send_with_timeout(&self, req: Request<RequestBody>, path: &str) -> SendResult {
        let sent = self.upstream.send(req);
        match self.config.http_write_timeout {
            None => Some(sent.await),
            Some(limit) => match tokio::time::timeout(limit, sent).await {
                Ok(result) => Some(result),
                Err(_) => {
                    log::info(
                        "Upstream response timed out",
                        &[
                            ("path", path.into()),
                            ("timeout_seconds", limit.as_secs().into()),
                        ],
                    );
                    None
                }
            },
        }
    }
}

/// The outcome of one upstream call; `None`: no response head in time.
type SendResult = Option<Result<Response<AppBody>, SendError>>;

/// Passes the app's 1xx responses (103 Early Hints) on to the client as they
/// arrive. 100 Continue is hyper's business on each side; 101 is an upgrade.
fn relay_informational(req: &mut Request<RequestBody>, state: Arc<ConnState>) {
    hyper::ext::on_informational(req, move |res| {
        let status = res.status();
        if status == StatusCode::CONTINUE || status == StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let mut headers = res.headers().clone();
        remove_hop_by_hop(&mut headers);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Informational")
        )
        .into_bytes();
        for (name, value) in &headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        state.send_informational(&head);
    });
}

/// The client may still be sending a body we will not read (or sent a
/// request we cannot frame): close after the response rather than parse the
/// rest as a new request.
pub(crate) fn closing(mut response: Response<ResponseBody>) -> Response<ResponseBody> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Copies bytes both ways between client and app once both sides switched
/// protocols (WebSocket). Request timeouts no longer apply. `_open` is
/// dropped when the tunnel ends, however it ends, which writes the
/// request's log line.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, _open: TunnelOpen) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            log::debug("Upgrade failed", &[("error", err.to_string().into())]);
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

pub(crate) fn error_response(status: StatusCode, page: Option<Vec<u8>>) -> Response<ResponseBody> {
    let mut builder = Response::builder().status(status);
    if page.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "text/html; charset=utf-8");
    }
    builder
        .body(full_body(page.unwrap_or_default()))
        .expect("static status and header form a valid response")
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_header_values_keep_no_view_of_the_buffer_they_were_parsed_from() {
        let read_buf = Bytes::from(vec![b'a'; 8192]);
        let mut headers = HeaderMap::new();
        let view = HeaderValue::from_maybe_shared(read_buf.slice(0..10)).unwrap();
        headers.insert(header::CONTENT_TYPE, view);
        let mut secret = HeaderValue::from_maybe_shared(read_buf.slice(10..20)).unwrap();
        secret.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, secret);
        assert!(!read_buf.is_unique());

        own_header_values(&mut headers);

        assert!(
            read_buf.is_unique(),
            "a header value still views the buffer"
        );
        assert_eq!(headers[header::CONTENT_TYPE], "aaaaaaaaaa");
        assert!(headers[header::AUTHORIZATION].is_sensitive());
        assert!(!headers[header::CONTENT_TYPE].is_sensitive());
    }

    /// An error that wraps another, as the upstream's `SendError` wraps
    /// hyper's and the I/O error under it.
    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] BoxError);

    #[test]
    fn every_error_maps_to_a_bounded_kind() {
        use std::io::{Error as IoError, ErrorKind as K};
        let upstream =
            |kind: K| ForwardError::Upstream(Box::new(Wrapped(Box::new(IoError::from(kind)))));
        let cases = [
            (ForwardError::BodyTooLarge, "body_too_large"),
            (ForwardError::BodyTooSlow, "body_too_slow"),
            (ForwardError::BodyBroken("cut".into()), "body_broken"),
            (ForwardError::Timeout(Duration::from_secs(30)), "timeout"),
            (upstream(K::ConnectionRefused), "refused"),
            (upstream(K::NotFound), "refused"),
            (upstream(K::ConnectionReset), "reset"),
            (upstream(K::BrokenPipe), "reset"),
            (upstream(K::UnexpectedEof), "reset"),
            (upstream(K::TimedOut), "timeout"),
            (upstream(K::PermissionDenied), "other"),
            (ForwardError::Upstream("spool failed".into()), "other"),
        ];
        for (err, label) in cases {
            assert_eq!(err.kind().label(), label, "{err:?}");
        }
    }

    type Fields = &'static [(&'static str, &'static str)];

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ip_values_read_as_the_address_in_its_usual_form() {
        for ip in [
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let value = ip_value(ip);
            assert_eq!(value.to_str().unwrap(), ip.to_string());
            assert_eq!(value.clone(), value);
        }
    }

    fn values(h: &HeaderMap, name: impl header::AsHeaderName) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    /// (rule, input headers, headers that must be gone, headers that must remain)
    #[test]
    fn hop_by_hop_rules() {
        let cases: &[(&str, Fields, &[&str], Fields)] = &[
            (
                "RFC 9110 §7.6.1: Connection and the fields it names are removed",
                &[
                    ("connection", "close, x-private"),
                    ("x-private", "1"),
                    ("x-kept", "2"),
                ],
                &["connection", "x-private"],
                &[("x-kept", "2")],
            ),
            (
                "RFC 9110 §7.6.1: Keep-Alive and Proxy-Connection are hop-by-hop",
                &[
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                ],
                &["keep-alive", "proxy-connection"],
                &[],
            ),
            (
                "RFC 9112 §6.1: Transfer-Encoding is a property of one connection",
                &[("transfer-encoding", "chunked")],
                &["transfer-encoding"],
                &[],
            ),
            (
                "RFC 9110 §6.6.2: Trailer announcement is per connection",
                &[("trailer", "x-checksum")],
                &["trailer"],
                &[],
            ),
            (
                "RFC 9110 §11.7.1-2: proxy credentials are for this hop only",
                &[
                    ("proxy-authorization", "Basic eA=="),
                    ("proxy-authenticate", "Basic"),
                ],
                &["proxy-authorization", "proxy-authenticate"],
                &[],
            ),
            (
                "RFC 9110 §10.1.4: TE keeps only `trailers`",
                &[("te", "gzip, trailers;q=1")],
                &[],
                &[("te", "trailers")],
            ),
            (
                "RFC 9110 §10.1.4: TE without trailers is dropped",
                &[("te", "gzip")],
                &["te"],
                &[],
            ),
            (
                "RFC 9110 §7.8: Upgrade without Connection: upgrade is dropped",
                &[("upgrade", "websocket")],
                &["upgrade"],
                &[],
            ),
            (
                "end-to-end fields pass",
                &[
                    ("cookie", "a=1"),
                    ("authorization", "Bearer x"),
                    ("accept-encoding", "gzip"),
                ],
                &[],
                &[
                    ("cookie", "a=1"),
                    ("authorization", "Bearer x"),
                    ("accept-encoding", "gzip"),
                ],
            ),
        ];
        for (rule, input, gone, kept) in cases {
            let mut h = headers(input);
            let upgrade = remove_hop_by_hop(&mut h);
            assert!(upgrade.is_none(), "{rule}");
            for name in *gone {
                assert!(!h.contains_key(*name), "{rule}: {name} should be removed");
            }
            for (name, value) in *kept {
                assert_eq!(values(&h, *name), vec![value.to_string()], "{rule}");
            }
        }
    }

    #[test]
    fn upgrade_is_reported_when_connection_asks_for_it() {
        // RFC 9110 §7.8: Upgrade is honoured only with `Connection: upgrade`.
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(remove_hop_by_hop(&mut h).unwrap(), "websocket");
        assert!(!h.contains_key("upgrade") && !h.contains_key("connection"));
    }

    #[test]
    fn forwarded_header_rules() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let host = HeaderValue::from_static("app.test:8443");
        // (rule, trust, tls, inbound, expected XFF, XFH, XFP)
        let cases: &[(&str, bool, bool, Fields, &str, &str, &str)] = &[
            (
                "no inbound, plain",
                true,
                false,
                &[],
                "192.0.2.7",
                "app.test:8443",
                "http",
            ),
            (
                "no inbound, tls",
                false,
                true,
                &[],
                "192.0.2.7",
                "app.test:8443",
                "https",
            ),
            (
                "trusted chain is extended (RFC 7239 §5.2 practice)",
                true,
                false,
                &[
                    ("x-forwarded-for", "203.0.113.1"),
                    ("x-forwarded-for", "10.0.0.1"),
                ],
                "203.0.113.1, 10.0.0.1, 192.0.2.7",
                "app.test:8443",
                "http",
            ),
            (
                "trusted host and proto are kept",
                true,
                false,
                &[
                    ("x-forwarded-host", "public.test"),
                    ("x-forwarded-proto", "https"),
                ],
                "192.0.2.7",
                "public.test",
                "https",
            ),
            (
                "untrusted values are replaced",
                false,
                false,
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-host", "evil.test"),
                    ("x-forwarded-proto", "https"),
                ],
                "192.0.2.7",
                "app.test:8443",
                "http",
            ),
        ];
        for (rule, trust, tls, inbound, xff, xfh, xfp) in cases {
            let mut h = headers(inbound);
            h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
            set_forwarded_headers(&mut h, ip, Some(&host), *tls, *trust);
            assert_eq!(values(&h, X_FORWARDED_FOR), vec![xff.to_string()], "{rule}");
            assert_eq!(
                values(&h, X_FORWARDED_HOST),
                vec![xfh.to_string()],
                "{rule}"
            );
            assert_eq!(
                values(&h, X_FORWARDED_PROTO),
                vec![xfp.to_string()],
                "{rule}"
            );
            assert!(
                !h.contains_key(header::FORWARDED),
                "{rule}: Forwarded is dropped"
            );
        }
    }

    #[test]
    fn other_forwarding_claims_are_removed_unless_trusted() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let claims: Fields = &[
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-scheme", "https"),
            ("x-forwarded-port", "443"),
            ("x-real-ip", "6.6.6.6"),
            ("client-ip", "6.6.6.6"),
        ];
        for trust in [false, true] {
            let mut h = headers(claims);
            set_forwarded_headers(&mut h, ip, None, false, trust);
            for (name, value) in claims {
                let expected = if trust {
                    vec![value.to_string()]
                } else {
                    vec![]
                };
                assert_eq!(values(&h, *name), expected, "{name}, trusted: {trust}");
            }
        }
    }

    #[test]
    fn ipv6_client_address_has_no_brackets() {
        let mut h = HeaderMap::new();
        set_forwarded_headers(&mut h, "::1".parse().unwrap(), None, false, true);
        assert_eq!(values(&h, X_FORWARDED_FOR), vec!["::1"]);
        assert!(!h.contains_key(X_FORWARDED_HOST));
    }
}
