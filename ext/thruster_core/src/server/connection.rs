//! One client connection, from accept to close: the accept loop (with the
//! connection caps), the TLS handshake and ALPN, the hyper builder for the
//! protocol (HTTP/1.1, h2c, or TLS with HTTP/2), the per-request service
//! that hands requests to the pipeline, in-flight accounting for the
//! socket's idle clock, and graceful drain.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::client_io::ClientIo;
use super::conn_io::{ConnIo, ConnTimeouts};
use super::limits;
use super::quic::AltSvc;
use crate::config::Config;
use crate::conn::{ConnState, InFlight};
use crate::http::{BoxError, ResponseBody};
use crate::log;
use crate::metrics::{self, Protocol};
use crate::pipeline::{ConnInfo, Pipeline};
use crate::sys::{fd_registry, Registered};
use crate::tls::redirect::Redirect;
use crate::tls::ACME_TLS_ALPN;

/// How client connections are served. Cleartext: HTTP/1 only, or HTTP/1
/// and HTTP/2 by prior knowledge (`H2C_ENABLED`). hyper-util's auto builder
/// ignores "HTTP/1 only" once upgrades are on, so plain HTTP/1 uses hyper
/// directly (which also skips sniffing for the HTTP/2 preface). TLS: ALPN
/// decides between the HTTP/1 and the HTTP/2 builder.
pub(super) struct ConnBuilders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// Set when cleartext connections may speak HTTP/2 (h2c).
    auto: Option<auto::Builder<TokioExecutor>>,
}

/// HTTP/2 limits (hyper/h2): at most 250 concurrent streams per connection
/// (Go's default), a 64 KiB header list (h2 also caps the CONTINUATION
/// frames that build one, so a CONTINUATION flood ends in a connection
/// error), and rapid-reset protection: a client that keeps resetting
/// streams it opened (CVE-2023-44487), or makes the server reset its
/// streams, gets GOAWAY.
macro_rules! tune_h2 {
    ($builder:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(250)
            .max_header_list_size(64 * 1024)
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(256)
    };
}

pub(super) fn connection_builders(config: &Config) -> ConnBuilders {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).keep_alive(true).writev(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    tune_h2!(http2);
    let auto = config.h2c_enabled.then(|| {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        // writev keeps hyper from copying body chunks into its own buffer,
        // which zero-copy X-Sendfile bodies rely on (see files::body).
        auto.http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .writev(true);
        tune_h2!(auto.http2());
        auto
    });
    ConnBuilders { http1, http2, auto }
}

/// What a listener's connections are for.
#[derive(Clone)]
pub(super) enum Role {
    /// Cleartext, proxied to the app.
    App,
    /// TLS, proxied to the app; with the `Alt-Svc` for HTTP/3 when on.
    Tls(TlsAcceptor, Option<Arc<AltSvc>>),
    /// Cleartext in TLS mode: HTTP-01 answers and redirects to HTTPS.
    Redirect(Arc<Redirect>),
}

pub(super) async fn accept_loop(
    listener: Registered<TcpListener>,
    builders: Arc<ConnBuilders>,
    pipeline: Arc<Pipeline>,
    role: Role,
    conn_limits: Arc<limits::ConnLimits>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop_accepting = shutdown.clone();
    // Each connection task holds a sender; the channel closes when the last
    // connection has finished.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let timeouts = ConnTimeouts {
        idle: pipeline.config().http_idle_timeout,
        header: pipeline.config().http_read_timeout,
        write_stall: pipeline.config().http_write_timeout,
    };
    loop {
        // Room under the total cap first: past it, clients wait in the
        // backlog instead of costing descriptors.
        let permit = tokio::select! {
            _ = stop_accepting.changed() => break,
            permit = conn_limits.reserve() => permit,
        };
        let (stream, peer, registration) = tokio::select! {
            _ = stop_accepting.changed() => break,
            accepted = std::future::poll_fn(|cx| {
                // accept(2) and the registration happen with no fork in between.
                let _gate = fd_registry::OpenGate::enter();
                listener.poll_accept(cx).map_ok(|(stream, peer)| {
                    let registration = fd_registry::register(stream.as_raw_fd());
                    (stream, peer, registration)
                })
            }) => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead
                    // of spinning, and keep serving the connections we have.
                    log::error("Accept failed", &[("error", err.to_string().into())]);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = conn_limits.admit(peer.ip(), permit) else {
            if let Some(m) = metrics::get() {
                m.connection_closed_per_ip();
            }
            log::debug(
                "Connection refused: MAX_CONNECTIONS_PER_IP reached",
                &[("remote_addr", peer.to_string().into())],
            );
            drop(registration);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            _slot: slot,
            builders: builders.clone(),
            pipeline: pipeline.clone(),
            role: role.clone(),
            peer,
            timeouts,
            shutdown: shutdown.clone(),
            alive: alive.clone(),
        };
        tokio::spawn(conn.run(stream, registration));
    }
    // Closing the listener now makes new connections fail fast instead of
    // queueing in the backlog while we drain.
    drop(listener);
    drop(alive);
    // Resolves once every connection task has dropped its sender.
    let _ = all_closed.recv().await;
}

/// One accepted client connection and what it needs.
struct Connection {
    /// Its place under the connection caps, for as long as it lives.
    _slot: limits::ConnSlot,
    builders: Arc<ConnBuilders>,
    pipeline: Arc<Pipeline>,
    role: Role,
    peer: SocketAddr,
    timeouts: ConnTimeouts,
    shutdown: watch::Receiver<bool>,
    alive: tokio::sync::mpsc::Sender<()>,
}

/// Longest TLS handshake allowed when `HTTP_READ_TIMEOUT` is off.
const MAX_HANDSHAKE: Duration = Duration::from_secs(60);

impl Connection {
    async fn run(self, stream: tokio::net::TcpStream, registration: fd_registry::Registration) {
        let (io, h2, tls) = match &self.role {
            Role::Tls(acceptor, _) => {
                // The handshake counts against the header timeout.
                let limit = self.timeouts.header.unwrap_or(MAX_HANDSHAKE);
                let mut shutdown = self.shutdown.clone();
                let handshake = tokio::select! {
                    _ = shutdown.changed() => return,
                    result = tokio::time::timeout(limit, acceptor.accept(stream)) => result,
                };
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        log::debug(
                            "TLS handshake failed",
                            &[
                                ("remote_addr", self.peer.to_string().into()),
                                ("error", err.to_string().into()),
                            ],
                        );
                        return;
                    }
                    Err(_) => return,
                };
                let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                if alpn.as_deref() == Some(ACME_TLS_ALPN) {
                    // TLS-ALPN-01 validation: the handshake was the answer.
                    return;
                }
                let h2 = alpn.as_deref() == Some(b"h2".as_slice());
                (ClientIo::Tls(Box::new(stream)), h2, true)
            }
            _ => (ClientIo::Plain(stream), false, false),
        };
        let state = Arc::new(ConnState::default());
        let conn_info = ConnInfo {
            peer: self.peer,
            tls,
            state: Some(state.clone()),
        };
        // Open connections by protocol: known now, except a cleartext
        // connection that may speak h2c, which tells with its first request.
        let counted = Arc::new(OnceLock::new());
        if let Some(m) = metrics::get() {
            let h2c_possible = !tls && !h2 && self.builders.auto.is_some();
            if !h2c_possible {
                let protocol = if h2 { Protocol::H2 } else { Protocol::H1 };
                let _ = counted.set(m.connection_opened(protocol));
            }
        }
        let service_state = state.clone();
        let pipeline = self.pipeline.clone();
        let redirect = match &self.role {
            Role::Redirect(redirect) => Some(redirect.clone()),
            _ => None,
        };
        let alt_svc = match &self.role {
            Role::Tls(_, alt_svc) => alt_svc.clone(),
            _ => None,
        };
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let pipeline = pipeline.clone();
            let conn_info = conn_info.clone();
            let redirect = redirect.clone();
            let alt_svc = alt_svc.clone();
            let in_flight = service_state.begin_request();
            if let Some(m) = metrics::get() {
                counted.get_or_init(|| {
                    m.connection_opened(if req.version() == http::Version::HTTP_2 {
                        Protocol::H2
                    } else {
                        Protocol::H1
                    })
                });
            }
            async move {
                let response = match &redirect {
                    Some(redirect) => redirect.respond(&req),
                    None => {
                        // The name the response speaks for, before the
                        // request moves into the pipeline.
                        let host = alt_svc.as_ref().and_then(|_| {
                            req.headers()
                                .get(http::header::HOST)
                                .and_then(|h| h.to_str().ok())
                                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                                .map(str::to_string)
                        });
                        let req = req.map(|body| body.map_err(BoxError::from).boxed_unsync());
                        let mut response = pipeline.handle(req, &conn_info).await;
                        if let Some(alt_svc) = &alt_svc {
                            alt_svc.apply(host.as_deref(), response.headers_mut());
                        }
                        response
                    }
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| InFlightBody {
                    body,
                    _in_flight: in_flight,
                }))
            }
        });
        let io = TokioIo::new(ConnIo::new(io, registration, state, self.timeouts));
        let (stop, alive) = (self.shutdown, self.alive);
        let builders = &*self.builders;
        if h2 {
            let conn = builders.http2.serve_connection(io, service);
            serve_until_drained(conn, stop, alive).await;
        } else if let (Some(auto), false) = (&builders.auto, tls) {
            let conn = auto.serve_connection_with_upgrades(io, service);
            serve_until_drained(conn, stop, alive).await;
        } else {
            let conn = builders.http1.serve_connection(io, service).with_upgrades();
            serve_until_drained(conn, stop, alive).await;
        }
    }
}

/// A connection that can be asked to finish its in-flight requests and close.
trait GracefulConnection: std::future::Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn start_graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn start_graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E, B> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;
    fn start_graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<'a, I, S, E, B> GracefulConnection for auto::UpgradeableConnection<'a, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: auto::HttpServerConnExec<S::Future, B>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn start_graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one connection; on shutdown, lets its in-flight requests finish
/// (idle keep-alive connections close at once).
async fn serve_until_drained<C: GracefulConnection>(
    conn: C,
    mut shutdown: watch::Receiver<bool>,
    _alive: tokio::sync::mpsc::Sender<()>,
) {
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.changed() => {
            conn.as_mut().start_graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        log::debug(
            "Connection ended with an error",
            &[("error", err.to_string().into())],
        );
    }
}

pin_project_lite::pin_project! {
    /// Keeps the connection counted as busy until the response body is done,
    /// so idle and header timeouts never hit a request being answered.
    struct InFlightBody {
        #[pin]
        body: ResponseBody,
        _in_flight: InFlight,
    }
}

impl http_body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
