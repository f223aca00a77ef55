//! The HTTP cache layer (RFC 9111, shared cache). It sits outside
//! compression: entries keep the app's identity bytes plus encoded variants
//! made once, so a hit costs no compression CPU (Thruster stores identity
//! bytes and recompresses on every hit).
//!
//! Per request: GET/HEAD look up; a fresh entry answers (304 and 206
//! included); a miss for a GET leads or joins the single upstream request
//! for its key; the response is streamed to the client while it is captured,
//! and stored only once it is complete. Other methods, upgrades and Range
//! misses bypass the cache.

pub mod directives;
pub mod disk;
pub mod entry;
mod hit;
pub mod key;
pub mod shared;
pub mod store;

use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::compression::RequestFacts;
use super::forward::Forwarder;
use super::ConnInfo;
use crate::http::{BoxError, RequestBody, ResponseBody, X_CACHE};
use crate::log;
use directives::Freshness;
use key::BaseKey;
use store::{Entry, LeaderGuard, Lookup, Store, Turn};

/// Longest a request waits for another one fetching the same resource
/// before going upstream itself, when no upstream timeout is configured.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

pub struct HttpCache {
    /// Where misses, bypasses and stores come from. The disk and shared
    /// tiers go between the memory store and this.
    next: Forwarder,
    store: Arc<Store>,
    trust_forwarded: bool,
    /// X-Sendfile responses are stored as file references.
    sendfile: bool,
    wait_limit: Duration,
}

impl HttpCache {
    /// The cache in front of `next` (`CACHE_SIZE` > 0; with 0 the pipeline
    /// has no cache at all).
    pub fn new(config: &crate::config::Config, next: Forwarder) -> HttpCache {
        HttpCache {
            next,
            store: Arc::new(Store::new(
                config.cache_size,
                config.max_cache_item_size,
                config.cache_stale_if_error,
            )),
            trust_forwarded: config.forward_headers,
            sendfile: config.x_sendfile_enabled,
            wait_limit: config.http_write_timeout.unwrap_or(DEFAULT_WAIT),
        }
    }

    pub async fn handle(
        &self,
        mut req: Request<RequestBody>,
        conn: &ConnInfo,
        facts: Option<&RequestFacts>,
    ) -> Response<ResponseBody> {
        let method = req.method().clone();
        if !(method == Method::GET || method == Method::HEAD) || is_upgrade(req.headers()) {
            return labelled(self.next.fetch(req, conn).await, "bypass");
        }
        let base = BaseKey::new(&req, conn.tls, self.trust_forwarded);
        let range = req.headers().contains_key(header::RANGE);
        let mut may_wait = true;
        loop {
            let (key, stale, coalesce) = match self.store.lookup(base.clone(), req.headers()) {
                Lookup::Hit(entry) if entry.file.is_some() => {
                    // The file is served by the X-Sendfile layer from what is
                    // on disk now; a changed or deleted file sends the request
                    // to the app again (Thruster 404s until expiry, its #51).
                    if entry.file.as_ref().is_some_and(|f| f.unchanged()) {
                        return hit::reference(&entry, "hit");
                    }
                    let key = key::CacheKey::new(
                        base.clone(),
                        &key::vary_names(&entry.headers),
                        req.headers(),
                    );
                    self.store.remove(&key);
                    continue;
                }
                Lookup::Hit(entry) if hit::acceptable(&entry, req.headers()) => {
                    return hit::respond(
                        &self.store,
                        &entry,
                        &method,
                        req.headers(),
                        facts,
                        &base,
                        "hit",
                    )
                    .await;
                }
                Lookup::Hit(_) => {
                    // The stored encoding is not acceptable to this client
                    // (an app that forgot `Vary: Accept-Encoding`): ask upstream.
                    return labelled(self.next.fetch(req, conn).await, "miss");
                }
                Lookup::Miss {
                    key,
                    stale,
                    coalesce,
                } => (key, stale, coalesce),
            };
            // Serving a part of something we do not hold means fetching all
            // of it first; let the app answer the range itself.
            if range {
                return labelled(self.next.fetch(req, conn).await, "bypass");
            }
            if method == Method::HEAD {
                return labelled(self.next.fetch(req, conn).await, "miss");
            }
            let guard = if coalesce && may_wait {
                match self.store.wait_or_lead(&key, self.wait_limit).await {
                    Turn::Lead(guard) => Some(guard),
                    Turn::Waited => {
                        may_wait = false;
                        continue;
                    }
                }
            } else {
                None
            };
            if guard.is_some() {
                // Fill the cache with a full response even if this client
                // holds a copy; its conditionals are answered from the entry
                // next time (nginx does the same).
                let h = req.headers_mut();
                h.remove(header::IF_NONE_MATCH);
                h.remove(header::IF_MODIFIED_SINCE);
            }
            let request_headers = req.headers().clone();
            let response = self.next.fetch(req, conn).await;
            if let Some(stale) = stale.filter(|_| is_error(response.status())) {
                if stale.usable_on_error(std::time::Instant::now()) {
                    log::info(
                        "Serving a stale cached response instead of an upstream error",
                        &[
                            ("url", base.describe().into()),
                            ("status", response.status().as_u16().into()),
                        ],
                    );
                    drop(response);
                    if stale.file.is_some() {
                        return hit::reference(&stale, "stale");
                    }
                    return hit::respond(
                        &self.store,
                        &stale,
                        &method,
                        &request_headers,
                        facts,
                        &base,
                        "stale",
                    )
                    .await;
                }
            }
            return labelled(self.capture(base, request_headers, response, guard), "miss");
        }
    }

    /// Streams the response on while keeping a copy, stored once complete.
    fn capture(
        &self,
        base: BaseKey,
        request: HeaderMap,
        response: Response<ResponseBody>,
        guard: Option<LeaderGuard>,
    ) -> Response<ResponseBody> {
        let freshness = match directives::storable(
            &Method::GET,
            &request,
            response.status(),
            response.headers(),
            SystemTime::now(),
            self.store.stale_if_error,
        ) {
            Ok(freshness) => freshness,
            Err(reason) => {
                if log::enabled(log::Level::Debug) {
                    log::debug(
                        "Not caching response",
                        &[
                            ("url", base.describe().into()),
                            ("reason", reason.reason().into()),
                        ],
                    );
                }
                self.store.pass(base);
                return response;
            }
        };
        let expected = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if expected.is_some_and(|n| n > self.store.max_item_size) {
            self.store.pass(base);
            return response;
        }
        let vary = key::vary_names(response.headers());
        let mut headers = response.headers().clone();
        headers.remove(header::AGE);
        headers.remove(X_CACHE);
        if self.sendfile {
            let target = response
                .headers()
                .get(crate::http::X_SENDFILE)
                .filter(|v| !v.is_empty())
                .map(|v| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(v.as_bytes())));
            if let Some(target) = target {
                // Only the reference is kept; the app's (empty) body is not
                // read, and the file is served from disk on every hit.
                if let Some(file) = store::FileRef::stat(target) {
                    let entry = Entry::new(response.status(), headers, Bytes::new(), freshness)
                        .with_file(file);
                    self.store.insert(base, vary, &request, entry);
                }
                drop(guard);
                return response;
            }
        }
        // An empty body (a redirect, a 204, `Content-Length: 0`) is never
        // polled by hyper, so there is nothing to capture: store it now.
        let empty = response.status() == StatusCode::NO_CONTENT
            || expected == Some(0)
            || response.body().is_end_stream();
        let capture = Capture {
            store: Arc::clone(&self.store),
            base,
            vary,
            request,
            status: response.status(),
            headers,
            freshness,
            expected,
            body: BytesMut::new(),
            _guard: guard,
        };
        if empty {
            capture.store();
            return response;
        }
        response.map(|inner| {
            CaptureBody {
                inner,
                capture: Some(capture),
            }
            .boxed_unsync()
        })
    }
}

/// A request asking for a protocol switch (RFC 9110 §7.8): an `Upgrade`
/// field, or the `upgrade` token in `Connection` in any letter case
/// (connection options are case-insensitive, §7.6.1). Neither is answered
/// from the cache nor stored.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// RFC 5861 §4: the errors a stale response may stand in for.
fn is_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn labelled(mut response: Response<ResponseBody>, value: &'static str) -> Response<ResponseBody> {
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(value));
    response
}

struct Capture {
    store: Arc<Store>,
    base: BaseKey,
    vary: Vec<HeaderName>,
    request: HeaderMap,
    status: StatusCode,
    headers: HeaderMap,
    freshness: Freshness,
    expected: Option<u64>,
    body: BytesMut,
    /// Waiters for this key are released when the capture ends either way.
    _guard: Option<LeaderGuard>,
}

impl Capture {
    fn store(self) {
        let body = self.body.freeze();
        // A body shorter than announced was cut off: never store it.
        if self.expected.is_some_and(|n| n != body.len() as u64) {
            return;
        }
        let entry = Entry::new(self.status, self.headers, body, self.freshness);
        self.store
            .insert(self.base, self.vary, &self.request, entry);
    }
}

/// Passes the body through untouched, keeping a copy; stores it only when
/// the upstream body ended cleanly within the size limit. An error, a
/// trailer, an oversize body or a client that goes away discards the copy.
struct CaptureBody {
    inner: ResponseBody,
    capture: Option<Capture>,
}

impl Body for CaptureBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => {
                    let over = self.capture.as_ref().is_some_and(|c| {
                        (c.body.len() + data.len()) as u64 > c.store.max_item_size
                    });
                    if over {
                        self.capture = None;
                    } else if let Some(c) = self.capture.as_mut() {
                        c.body.extend_from_slice(data);
                        // With a known length hyper stops polling once it has
                        // written that many bytes, so the end never shows up
                        // as a `None` frame: the announced length is the end.
                        if c.expected == Some(c.body.len() as u64) {
                            if let Some(capture) = self.capture.take() {
                                capture.store();
                            }
                        }
                    }
                }
                None => self.capture = None,
            },
            Some(Err(_)) => self.capture = None,
            None => {
                if let Some(capture) = self.capture.take() {
                    capture.store();
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only through poll_frame, so the copy gets stored.
        self.capture.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised_in_any_letter_case() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("upgrade", "websocket")], true),
            (&[("connection", "Upgrade")], true),
            (&[("connection", "keep-alive, UPGRADE")], true),
            (
                &[("connection", "keep-alive"), ("connection", "upgrade")],
                true,
            ),
            (&[("connection", "keep-alive, x-upgraded")], false),
            (&[], false),
        ];
        for (fields, expected) in cases {
            let mut h = HeaderMap::new();
            for (name, value) in *fields {
                h.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            assert_eq!(is_upgrade(&h), *expected, "{fields:?}");
        }
    }
}
