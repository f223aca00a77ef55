//! The request path: one module per phase, composed in `Pipeline::handle`
//! in the order a request walks them:
//!
//! reject → stamp (`request_start`) → X-Sendfile prepare → cache (whose
//! `next` is the forwarder) or forward → X-Sendfile serve → compress → log.
//!
//! The cache sits inside compression so that it stores the app's identity
//! bytes and serves its own encoded variants (compression leaves an
//! already-encoded response alone). A request enters with a boxed body, so
//! HTTP/1, HTTP/2 and QUIC streams all take the same path.

pub mod cache;
pub mod compression;
pub mod forward;
pub mod logging;
pub mod request_body;
pub mod request_buffer;
pub mod request_id;
pub mod request_start;
pub mod response_buffer;
pub mod sendfile;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, Request, Response, StatusCode, Version};
use http_body::Body as _;

use crate::config::Config;
use crate::conn::ConnState;
use crate::http::{plain_response, RequestBody, ResponseBody};
use crate::upstream::Upstream;

/// What the pipeline knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Whether the client connection is TLS (drives `X-Forwarded-Proto`).
    pub tls: bool,
    /// The connection's shared state, when it has a socket of its own
    /// (HTTP/1.x and HTTP/2 over TCP): 1xx relay and zero-copy sendfile
    /// need it; a request without one goes without them.
    pub state: Option<Arc<ConnState>>,
}

impl ConnInfo {
    /// The connection a response body may send file regions on with
    /// sendfile(2): sendfile writes to the socket itself, so only one with a
    /// socket of its own, without TLS and HTTP/2 framing in between.
    pub fn zero_copy(&self, version: Version) -> Option<Arc<ConnState>> {
        self.state
            .clone()
            .filter(|_| !self.tls && version <= Version::HTTP_11)
    }
}

/// Where a request goes once it passes the X-Sendfile prepare step.
enum Fetch {
    Cache(cache::HttpCache),
    Forward(forward::Forwarder),
}

/// Shared, immutable state of the request path.
pub struct Pipeline {
    config: Arc<Config>,
    fetch: Fetch,
    sendfile: sendfile::Sendfile,
}

impl Pipeline {
    /// The pipeline for `config`; fails only on a bad `CACHE_REDIS_URL` or
    /// its CA file. Must run inside the Tokio runtime.
    pub fn new(
        config: Arc<Config>,
        upstream: Upstream,
        sendfile_token: &str,
    ) -> Result<Pipeline, cache::shared::SharedConfigError> {
        let forwarder = forward::Forwarder::new(upstream, Arc::clone(&config));
        // CACHE_SIZE=0 turns the cache off (every tier, as in Thruster).
        let fetch = if config.cache_size > 0 {
            Fetch::Cache(cache::HttpCache::new(&config, forwarder)?)
        } else {
            Fetch::Forward(forwarder)
        };
        let sendfile = sendfile::Sendfile::new(
            config.x_sendfile_enabled,
            sendfile_token,
            config.x_sendfile_roots.clone(),
        );
        Ok(Pipeline {
            config,
            fetch,
            sendfile,
        })
    }

    /// The HTTP cache; `None` with `CACHE_SIZE=0`.
    pub fn cache(&self) -> Option<&cache::HttpCache> {
        match &self.fetch {
            Fetch::Cache(cache) => Some(cache),
            Fetch::Forward(_) => None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Waits until every finished response is in the disk cache tier, for
    /// a stop (SIGTERM, `Thruster.stop`): pending writes are not lost.
    pub async fn flush(&self) {
        if let Fetch::Cache(cache) = &self.fetch {
            cache.flush().await;
        }
    }

    /// Bytes and entries in the memory cache; `None` with the cache off.
    pub fn memory_cache_usage(&self) -> Option<(u64, u64)> {
        match &self.fetch {
            Fetch::Cache(cache) => Some(cache.memory_usage()),
            Fetch::Forward(_) => None,
        }
    }

    /// Bytes and entries in the disk cache tier; `None` without one.
    pub fn disk_cache_usage(&self) -> Option<(u64, u64)> {
        match &self.fetch {
            Fetch::Cache(cache) => cache.disk_usage(),
            Fetch::Forward(_) => None,
        }
    }

    pub async fn handle(
        &self,
        mut req: Request<RequestBody>,
        conn: &ConnInfo,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        // Before anything can fail or wait: in flight from here on.
        let metric = crate::metrics::get().map(|m| m.request_started(req.method(), started));
        let request_id = request_id::assign(req.headers_mut());
        let logged = self.config.log_requests
            && !self
                .config
                .log_requests_exclude
                .iter()
                .any(|p| p.matches(req.uri().path()));
        let record = logged.then(|| {
            logging::RequestRecord::new(&req, conn, self.config.forward_headers, &request_id)
        });
        let compression = self.config.gzip_compression_enabled.then(|| {
            compression::RequestFacts::new(
                req.method(),
                req.headers(),
                self.config.gzip_compression_disable_on_auth,
                self.config.gzip_compression_jitter,
            )
        });
        let mut response = match self.reject(&req) {
            Some(rejection) => rejection,
            None => {
                request_start::stamp(req.headers_mut());
                let method = req.method().clone();
                let file_request = self.sendfile.prepare(&method, req.headers_mut());
                let zero_copy = conn.zero_copy(req.version());
                let response = match &self.fetch {
                    Fetch::Cache(cache) => cache.handle(req, conn, compression.as_ref()).await,
                    Fetch::Forward(forwarder) => forwarder.fetch(req, conn).await,
                };
                match file_request {
                    Some(file_request)
                        if response.headers().contains_key(crate::http::X_SENDFILE) =>
                    {
                        self.sendfile
                            .serve(&file_request, response, compression.as_ref(), zero_copy)
                            .await
                    }
                    _ => response,
                }
            }
        };
        // The app's own id wins (it may log that one); otherwise the client
        // gets the id the app saw. Either is marked never to be indexed:
        // each value is used once, so HTTP/2's header compression would
        // only churn its table with them and search it for each (1.5 µs of
        // 36 per TLS + HTTP/2 `/hello`).
        match response.headers_mut().entry(crate::http::X_REQUEST_ID) {
            http::header::Entry::Occupied(mut id) => id.get_mut().set_sensitive(true),
            http::header::Entry::Vacant(slot) => {
                let mut request_id = request_id;
                request_id.set_sensitive(true);
                slot.insert(request_id);
            }
        }
        if let Some(facts) = &compression {
            response = compression::apply(facts, response);
        }
        if record.is_none() && metric.is_none() {
            return response;
        }
        logging::on_completion(response, record, metric, started)
    }
}

impl Pipeline {
    /// Requests answered without involving the app.
    fn reject(&self, req: &Request<RequestBody>) -> Option<Response<ResponseBody>> {
        // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is a 400.
        let hosts = req.headers().get_all(header::HOST).iter().count();
        if req.version() == Version::HTTP_11 && hosts != 1 {
            let reason = if hosts == 0 {
                "missing required Host header"
            } else {
                "more than one Host header"
            };
            return Some(forward::closing(plain_response(
                StatusCode::BAD_REQUEST,
                reason,
            )));
        }
        // Refuse an announced oversized body before anything reaches the app.
        if let (Some(max), Some(len)) =
            (self.config.max_request_body, req.body().size_hint().exact())
        {
            if len > max {
                return Some(forward::closing(forward::error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                )));
            }
        }
        None
    }
}
