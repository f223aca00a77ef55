//! Forwarding to the app: request and response header rules, the upstream
//! call, upgrades, and the proxy's own error responses (502, 504).

use std::net::IpAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use bytes::Bytes;

use super::logging::{TunnelEnd, TunnelOpen};
use super::request_body::{BodyCut, BodyPace, CutFlag, LimitedBody};
use super::request_buffer::{self, BufferLimits};
use super::response_buffer::{self, SpoolLimits};
use super::{ConnInfo, Pipeline};
use crate::http::{full_body, BoxError, ResponseBody, X_ACCEL_BUFFERING};
use crate::log;

/// Hop-by-hop fields (RFC 9110 §7.6.1), plus the non-standard ones proxies
/// have always treated as such (`Proxy-Connection`, `Keep-Alive`) and the
/// proxy credentials meant for us, not the app (RFC 9110 §11.7.1-2).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";

/// Other client-address and scheme claims that Rack and Rails read
/// (`request.ssl?`, `scheme`, `port`, `remote_ip`). The proxy does not set
/// them; when forwarded headers are not trusted, a client's copies would be
/// believed by the app, so they are removed.
const UNTRUSTED_CLAIMS: [&str; 5] = [
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-real-ip",
    "client-ip",
];

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
    for name in HOP_BY_HOP {
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
    let client = client_ip.to_string();
    let chain = if trust {
        let prior: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if prior.is_empty() {
            client
        } else {
            format!("{}, {client}", prior.join(", "))
        }
    } else {
        client
    };
    if let Ok(v) = HeaderValue::try_from(chain) {
        headers.insert(X_FORWARDED_FOR, v);
    }

    let keep = |headers: &HeaderMap, name: &str| {
        trust && headers.get(name).is_some_and(|v| !v.as_bytes().is_empty())
    };
    if !keep(headers, X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    if !keep(headers, X_FORWARDED_PROTO) {
        let proto = if tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !trust {
        for name in UNTRUSTED_CLAIMS {
            headers.remove(name);
        }
    }
    // RFC 7239 `Forwarded` would carry a second, unchecked copy of the same
    // claims; Thruster drops it and so do we.
    headers.remove(header::FORWARDED);
}

/// The host the client asked for: `Host`, or the HTTP/2 `:authority`.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::try_from(a.as_str()).ok())
    })
}

pub async fn forward(
    pipeline: &Pipeline,
    mut req: Request<Incoming>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let config = pipeline.config();
    let host = request_host(&req);
    let upgrade = remove_hop_by_hop(req.headers_mut());
    // Only HTTP/1.1 has Upgrade (RFC 9110 §7.8); HTTP/2 uses extended CONNECT.
    let client_upgrade = upgrade.filter(|_| req.version() == Version::HTTP_11);
    set_forwarded_headers(
        req.headers_mut(),
        conn.peer.ip().to_canonical(),
        host.as_ref(),
        conn.tls,
        config.forward_headers,
    );
    let host = host.unwrap_or_else(|| pipeline.upstream.fallback_host().clone());
    req.headers_mut().insert(header::HOST, host);
    let client_on_upgrade = client_upgrade
        .as_ref()
        .map(|_| hyper::upgrade::on(&mut req));
    if let Some(proto) = &client_upgrade {
        let h = req.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }

    let path = req.uri().path().to_string();
    // RFC 9110 §15.2: no 1xx for HTTP/1.0 clients; HTTP/2 clients miss out
    // because hyper's server cannot send informational responses there.
    let forward_informational = req.version() == Version::HTTP_11;
    let (mut parts, body) = req.into_parts();
    parts.uri = pipeline.upstream.uri_for(parts.uri.path_and_query());
    parts.version = Version::HTTP_11;

    let cut = CutFlag::default();
    // A request without a body can be replayed on a fresh connection if a
    // pooled one fails under it (the app closed it as we sent).
    let replay = (body.is_end_stream() && client_upgrade.is_none()).then(|| parts.clone());
    let body = if body.is_end_stream() {
        body.map_err(BoxError::from).boxed_unsync()
    } else {
        let pace = match (config.request_body_min_rate, config.http_read_timeout) {
            (0, Some(deadline)) => BodyPace::Deadline(deadline),
            (0, None) => BodyPace::Unlimited,
            (rate, _) => BodyPace::MinRate(rate),
        };
        let limited =
            LimitedBody::new(body, config.max_request_body, pace, cut.clone()).boxed_unsync();
        if config.request_buffering && client_upgrade.is_none() {
            let limits = BufferLimits {
                memory: config.request_buffer_memory,
                disk: config.request_buffer_max,
            };
            match request_buffer::buffer(limited, limits).await {
                Ok(buffered) => {
                    // A complete body goes to the app with its length, even
                    // if the client sent it chunked.
                    if let Some(len) = buffered.len {
                        parts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    }
                    buffered.body
                }
                Err(err) => {
                    let status = match cut.get() {
                        Some(BodyCut::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
                        Some(BodyCut::TooSlow) => StatusCode::REQUEST_TIMEOUT,
                        // The client went away or sent a broken body.
                        None => StatusCode::BAD_REQUEST,
                    };
                    log::info(
                        "Request body not received",
                        &[("path", path.into()), ("error", error_chain(&*err).into())],
                    );
                    conn.state.mark_final_response();
                    return closing(error_response(status, None));
                }
            }
        } else {
            limited
        }
    };

    if log::enabled(log::Level::Debug) {
        log::debug(
            "Proxying request",
            &[
                ("path", path.as_str().into()),
                ("upstream", pipeline.upstream.to_string().into()),
            ],
        );
    }
    let mut upstream_req = Request::from_parts(parts, body);
    if forward_informational {
        relay_informational(&mut upstream_req, conn);
    }
    let mut result = send_with_timeout(pipeline, upstream_req, &path).await;
    conn.state.mark_final_response();
    if let (Some(Err(err)), Some(parts)) = (&result, replay) {
        if err.is_connect() {
            // Nothing reached the app: the app is restarting or still
            // booting. Try again for a short while instead of a 502.
            result = retry_connect(pipeline, &parts, &path, result).await;
        } else {
            log::debug(
                "Retrying request on a new upstream connection",
                &[
                    ("path", path.as_str().into()),
                    ("error", error_chain(err).into()),
                ],
            );
            let retry = Request::from_parts(parts, full_body(Bytes::new()));
            result = send_with_timeout(pipeline, retry, &path).await;
        }
    }
    let mut response = match result {
        None => return error_response(StatusCode::GATEWAY_TIMEOUT, None),
        Some(Ok(response)) => response,
        Some(Err(err)) => {
            let status = match cut.get() {
                Some(BodyCut::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
                Some(BodyCut::TooSlow) => StatusCode::REQUEST_TIMEOUT,
                None => StatusCode::BAD_GATEWAY,
            };
            log::info(
                "Unable to proxy request",
                &[("path", path.into()), ("error", error_chain(&err).into())],
            );
            return match status {
                StatusCode::BAD_GATEWAY => bad_gateway(pipeline),
                status => closing(error_response(status, None)),
            };
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let mut end = None;
        if let Some(client_on_upgrade) = client_on_upgrade {
            conn.state.mark_upgraded();
            let upstream_on_upgrade = hyper::upgrade::on(&mut response);
            let (tunnel_end, open) = TunnelEnd::new();
            end = Some(tunnel_end);
            tokio::spawn(tunnel(client_on_upgrade, upstream_on_upgrade, open));
        }
        let (mut parts, _) = response.into_parts();
        if let Some(end) = end {
            parts.extensions.insert(end);
        }
        return Response::from_parts(parts, full_body(Bytes::new()));
    }
    remove_hop_by_hop(response.headers_mut());
    if config.response_buffering {
        let limits = SpoolLimits {
            memory: config.response_buffer_memory,
            disk: config.response_buffer_max,
        };
        return match response_buffer::buffer(response, limits, config.http_write_timeout).await {
            Ok(response) => response,
            Err(err) => {
                log::info(
                    "Unable to proxy request",
                    &[("path", path.into()), ("error", error_chain(&*err).into())],
                );
                bad_gateway(pipeline)
            }
        };
    }
    response.headers_mut().remove(X_ACCEL_BUFFERING);
    response.map(|b| b.map_err(BoxError::from).boxed_unsync())
}

type SendResult = Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>>;

/// Retries a body-less request whose connection to the app was refused,
/// every 50–500 ms until `UPSTREAM_RETRY_TIMEOUT` has passed. Safe for any
/// method: a refused connection means the app saw nothing.
async fn retry_connect(
    pipeline: &Pipeline,
    parts: &http::request::Parts,
    path: &str,
    mut result: SendResult,
) -> SendResult {
    let Some(window) = pipeline.config().upstream_retry_timeout else {
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
        let retry = Request::from_parts(parts.clone(), full_body(Bytes::new()));
        result = send_with_timeout(pipeline, retry, path).await;
    }
    result
}

/// Passes the app's 1xx responses (103 Early Hints) on to the client as they
/// arrive. 100 Continue is hyper's business on each side; 101 is an upgrade.
fn relay_informational(req: &mut Request<ResponseBody>, conn: &ConnInfo) {
    let state = conn.state.clone();
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

/// Sends upstream, bounding the wait for the response head by
/// `HTTP_WRITE_TIMEOUT`. `None` means the app did not answer in time.
async fn send_with_timeout(
    pipeline: &Pipeline,
    req: Request<ResponseBody>,
    path: &str,
) -> Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
    let sent = pipeline.upstream.send(req);
    match pipeline.config().http_write_timeout {
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
/// protocols (WebSocket). Request timeouts no longer apply.
/// `_open` is dropped when the tunnel ends, however it ends, which writes
/// the request's log line.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _open: TunnelOpen,
) {
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

fn bad_gateway(pipeline: &Pipeline) -> Response<ResponseBody> {
    // Read on each use (502s are rare), so a page deployed after start-up is
    // served; Thruster reads it once at start.
    let page = std::fs::read(&pipeline.config().bad_gateway_page).ok();
    error_response(StatusCode::BAD_GATEWAY, page)
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

fn error_chain(err: &dyn std::error::Error) -> String {
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

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
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
                assert_eq!(values(&h, name), vec![value.to_string()], "{rule}");
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
                assert_eq!(values(&h, name), expected, "{name}, trusted: {trust}");
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
