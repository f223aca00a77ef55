//! The request path: one module per concern, composed in `Pipeline::handle`.
//!
//! Order (outermost first): request logging, request start stamp, proxy.
//! Later layers (cache, compression, X-Sendfile) slot in between.

pub mod logging;
pub mod proxy;
pub mod request_start;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::Config;
use crate::upstream::Upstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the pipeline knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Whether the client connection is TLS (drives `X-Forwarded-Proto`).
    pub tls: bool,
}

/// Shared, immutable state of the request path.
pub struct Pipeline {
    config: Arc<Config>,
    upstream: Upstream,
}

impl Pipeline {
    pub fn new(config: Arc<Config>, upstream: Upstream) -> Pipeline {
        Pipeline { config, upstream }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let record = self
            .config
            .log_requests
            .then(|| logging::RequestRecord::new(&req, conn, self.config.forward_headers));
        request_start::stamp(req.headers_mut());
        let response = proxy::forward(self, req, conn).await;
        match record {
            Some(record) => logging::log_on_completion(response, record, started),
            None => response,
        }
    }
}

/// A body of fixed bytes, boxed into the pipeline's response body type.
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
