//! The HTTP/1.1 client that forwards requests to the app server (Puma).
//!
//! A keep-alive pool sized for a proxy in front of one app: connections are
//! reused across requests so the app never sees a connect per request.
//! Puma closes idle keep-alive connections after 20 s, so the pool drops
//! them sooner: a connection the app already closed is never picked.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::pipeline::BoxError;

/// Idle upstream connections are dropped after this long (below Puma's 20 s
/// persistent timeout, so the app never closes one we are about to reuse).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_MAX_IDLE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    Tcp(SocketAddr),
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    authority: Authority,
}

impl Upstream {
    pub fn new(addr: UpstreamAddr) -> Upstream {
        let UpstreamAddr::Tcp(sock) = addr;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // Keep the client's Host header (Thruster preserves it); we set it
            // ourselves when the client sent none.
            .set_host(false)
            .build(connector);
        let authority =
            Authority::try_from(sock.to_string()).expect("socket address is an authority");
        Upstream { client, authority }
    }

    /// The URI the upstream request is sent to: the app's address plus the
    /// client's path and query, byte for byte.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(
                path_and_query
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
            .expect("scheme, authority and path form a valid URI")
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }
}
