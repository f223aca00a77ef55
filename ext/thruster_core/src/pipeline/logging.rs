//! The request log: one JSON line per request, written when the response body
//! has been fully sent (or dropped), with Thruster's fields in its order.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;

use super::ConnInfo;
use crate::http::{BoxError, ResponseBody};
use crate::log;
use crate::metrics::{self, CacheResult};

/// The request-side facts of a log line, captured before the request is
/// consumed by the proxy.
pub struct RequestRecord {
    path: String,
    method: String,
    query: String,
    proto: &'static str,
    req_content_length: i64,
    req_content_type: String,
    remote_addr: String,
    user_agent: String,
    cache: &'static str,
    request_id: String,
}

fn header_text<B>(req: &Request<B>, name: header::HeaderName) -> String {
    req.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

impl RequestRecord {
    pub fn new<B: Body>(
        req: &Request<B>,
        conn: &ConnInfo,
        trust_forwarded: bool,
        request_id: &http::HeaderValue,
    ) -> RequestRecord {
        let forwarded_for = header_text(req, header::HeaderName::from_static("x-forwarded-for"));
        // Thruster logs the raw client X-Forwarded-For whatever FORWARD_HEADERS
        // says; we only believe it when forwarded headers are trusted.
        let remote_addr = if trust_forwarded && !forwarded_for.is_empty() {
            forwarded_for
        } else {
            format!(
                "{}",
                std::net::SocketAddr::new(conn.peer.ip().to_canonical(), conn.peer.port())
            )
        };
        let req_content_length = req
            .body()
            .size_hint()
            .exact()
            .map(|n| n as i64)
            .unwrap_or(-1);
        RequestRecord {
            path: percent_decode(req.uri().path()),
            method: req.method().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            proto: match req.version() {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2.0",
                http::Version::HTTP_3 => "HTTP/3.0",
                _ => "HTTP/1.1",
            },
            req_content_length,
            req_content_type: header_text(req, header::CONTENT_TYPE),
            remote_addr,
            user_agent: header_text(req, header::USER_AGENT),
            cache: if matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
                "miss"
            } else {
                "bypass"
            },
            request_id: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
        }
    }
}

/// Carried on a `101 Switching Protocols` response whose tunnel the proxy
/// runs: its request log line waits for the tunnel to close, so `dur` is the
/// session's length (operators look for long WebSocket sessions).
#[derive(Clone)]
pub struct TunnelEnd(Arc<tokio::sync::Notify>);

/// Held by the tunnel task; dropping it (the tunnel closed, failed or was
/// cancelled) releases the log line.
pub struct TunnelOpen(Arc<tokio::sync::Notify>);

impl TunnelEnd {
    pub fn new() -> (TunnelEnd, TunnelOpen) {
        let notify = Arc::new(tokio::sync::Notify::new());
        (TunnelEnd(Arc::clone(&notify)), TunnelOpen(notify))
    }
}

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        // notify_one keeps a permit if the logger is not waiting yet.
        self.0.notify_one();
    }
}

/// Wraps the response so the log line is written and the request counted
/// in the metrics once its body is done, or for an upgrade once its tunnel
/// has closed. Either may be absent (`LOG_REQUESTS=false` or an excluded
/// path; metrics off), not both.
pub fn on_completion(
    mut response: Response<ResponseBody>,
    record: Option<RequestRecord>,
    metric: Option<metrics::RequestMetric>,
    started: Instant,
) -> Response<ResponseBody> {
    let tunnel = response.extensions_mut().remove::<TunnelEnd>();
    let status = response.status().as_u16();
    // Only what the cache said counts in the metrics: without a cache
    // (`CACHE_SIZE=0`) there is no X-Cache and nothing to count.
    let cache = response
        .headers()
        .get(crate::http::X_CACHE)
        .map(|v| match v.as_bytes() {
            b"hit" => CacheResult::Hit,
            b"stale" => CacheResult::Stale,
            b"bypass" => CacheResult::Bypass,
            _ => CacheResult::Miss,
        });
    let mut record = record;
    if let (Some(record), Some(cache)) = (&mut record, cache) {
        record.cache = cache.label();
    }
    let content_type = match &record {
        Some(_) => response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
        None => String::new(),
    };
    let pending = Pending {
        record,
        metric: metric.map(|m| (m, cache)),
        started,
        status,
        content_type,
    };
    if let Some(TunnelEnd(closed)) = tunnel {
        tokio::spawn(async move {
            closed.notified().await;
            pending.write(0);
        });
        return response;
    }
    response.map(|inner| {
        LoggedBody {
            inner,
            pending: Some(pending),
            sent: 0,
        }
        .boxed_unsync()
    })
}

struct Pending {
    record: Option<RequestRecord>,
    metric: Option<(metrics::RequestMetric, Option<CacheResult>)>,
    started: Instant,
    status: u16,
    content_type: String,
}

struct LoggedBody {
    inner: ResponseBody,
    pending: Option<Pending>,
    sent: u64,
}

impl Pending {
    fn write(self, sent: u64) {
        let p = self;
        if let Some((metric, cache)) = p.metric {
            if let (Some(cache), Some(m)) = (cache, metrics::get()) {
                m.cache_result(cache);
            }
            metric.finish(p.status, sent);
        }
        let Some(r) = p.record else {
            return;
        };
        log::info(
            "Request",
            &[
                ("path", r.path.into()),
                ("status", p.status.into()),
                ("dur", Value::from(p.started.elapsed().as_millis() as u64)),
                ("method", r.method.into()),
                ("req_content_length", r.req_content_length.into()),
                ("req_content_type", r.req_content_type.into()),
                ("resp_content_length", sent.into()),
                ("resp_content_type", p.content_type.into()),
                ("remote_addr", r.remote_addr.into()),
                ("user_agent", r.user_agent.into()),
                ("cache", r.cache.into()),
                ("query", r.query.into()),
                ("proto", r.proto.into()),
                ("request_id", r.request_id.into()),
            ],
        );
    }
}

impl LoggedBody {
    fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.write(self.sent);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // HEAD responses, bodies hyper never polls, and aborted transfers.
        self.finish();
    }
}

/// `URL.Path` as Thruster logs it: percent-decoded, invalid UTF-8 replaced.
pub fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_percent_escapes_and_leaves_bad_ones() {
        assert_eq!(percent_decode("/a%20b/%E2%9C%93"), "/a b/✓");
        assert_eq!(percent_decode("/100%"), "/100%");
        assert_eq!(percent_decode("/%zz%4"), "/%zz%4");
        assert_eq!(percent_decode("/%41"), "/A");
    }
}
