//! The request path: one module per concern, composed in `Pipeline::handle`.
//!
//! Order (outermost first): request logging, compression, request start
//! stamp, X-Sendfile, cache, proxy. The cache sits inside compression so that it stores
//! the app's identity bytes and serves its own encoded variants (compression
//! leaves an already-encoded response alone).

pub mod cache;
pub mod compression;
pub mod logging;
pub mod proxy;
pub mod request_body;
pub mod request_buffer;
pub mod request_start;
pub mod response_buffer;
pub mod sendfile;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::config::Config;
use crate::conn::ConnState;
use crate::http::{plain_response, ResponseBody};
use crate::upstream::Upstream;

/// What the pipeline knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Whether the client connection is TLS (drives `X-Forwarded-Proto`).
    pub tls: bool,
    pub state: Arc<ConnState>,
}

/// Shared, immutable state of the request path.
pub struct Pipeline {
    config: Arc<Config>,
    upstream: Upstream,
    cache: Option<cache::HttpCache>,
    sendfile: sendfile::Sendfile,
}

impl Pipeline {
    pub fn new(config: Arc<Config>, upstream: Upstream, sendfile_token: &str) -> Pipeline {
        let cache = cache::HttpCache::new(&config);
        let sendfile = sendfile::Sendfile::new(
            config.x_sendfile_enabled,
            sendfile_token,
            config.x_sendfile_roots.clone(),
        );
        Pipeline {
            config,
            upstream,
            cache,
            sendfile,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let record = self
            .config
            .log_requests
            .then(|| logging::RequestRecord::new(&req, conn, self.config.forward_headers));
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
                // sendfile(2) writes to the socket itself: only possible
                // without TLS and HTTP/2 framing in between.
                let zero_copy = !conn.tls && req.version() <= Version::HTTP_11;
                let response = match &self.cache {
                    Some(cache) => cache.handle(self, req, conn, compression.as_ref()).await,
                    None => proxy::forward(self, req, conn).await,
                };
                match file_request {
                    Some(file_request)
                        if response.headers().contains_key(crate::http::X_SENDFILE) =>
                    {
                        self.sendfile
                            .serve(
                                &file_request,
                                response,
                                compression.as_ref(),
                                zero_copy.then(|| Arc::clone(&conn.state)),
                            )
                            .await
                    }
                    _ => response,
                }
            }
        };
        if let Some(facts) = &compression {
            response = compression::apply(facts, response);
        }
        match record {
            Some(record) => logging::log_on_completion(response, record, started),
            None => response,
        }
    }
}

impl Pipeline {
    /// Requests answered without involving the app.
    fn reject(&self, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
        // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is a 400.
        let hosts = req.headers().get_all(header::HOST).iter().count();
        if req.version() == Version::HTTP_11 && hosts != 1 {
            let reason = if hosts == 0 {
                "missing required Host header"
            } else {
                "more than one Host header"
            };
            return Some(proxy::closing(plain_response(
                StatusCode::BAD_REQUEST,
                reason,
            )));
        }
        // Refuse an announced oversized body before anything reaches the app.
        if let (Some(max), Some(len)) =
            (self.config.max_request_body, req.body().size_hint().exact())
        {
            if len > max {
                return Some(proxy::closing(proxy::error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                )));
            }
        }
        None
    }
}
