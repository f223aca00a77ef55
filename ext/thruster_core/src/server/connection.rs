//! One client connection, from accept to close: the accept loop (with the
//! connection caps), the TLS handshake and ALPN, the hyper builder for the
//! protocol (HTTP/1.1, h2c, or TLS with HTTP/2), the per-request service
//! that hands requests to the pipeline, in-flight accounting for the
//! socket's idle clock, and graceful drain.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::client_io::ClientIo;
use super::conn_io::{self, ConnIo, ConnTimeouts, Unparked};
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
/// and HTTP/2 by prior knowledge (`H2C_ENABLED`: a connection that opens
/// with the HTTP/2 preface, peeked, gets the HTTP/2 builder). TLS: ALPN
/// decides between the HTTP/1 and the HTTP/2 builder. HTTP/1 connections
/// use hyper's builder directly, not hyper-util's auto builder, so an idle
/// one can be parked (`serve_http1`).
pub(super) struct ConnBuilders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// Cleartext connections may speak HTTP/2 (h2c).
    h2c: bool,
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
    // writev keeps hyper from copying body chunks into its own buffer,
    // which zero-copy X-Sendfile bodies rely on (see files::body).
    http1.timer(TokioTimer::new()).keep_alive(true).writev(true);
    if config.http_read_timeout.is_some() {
        // The socket enforces HTTP_READ_TIMEOUT on request heads itself
        // (`ConnIo`); hyper's own 30 s one would cost a boxed timer for
        // every hyper connection, which a parked connection makes anew for
        // each request after idling. Without HTTP_READ_TIMEOUT, hyper's
        // default stays.
        http1.header_read_timeout(None);
    }
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    tune_h2!(http2);
    ConnBuilders {
        http1,
        http2,
        h2c: config.h2c_enabled,
    }
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
    setup: ConnSetup,
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
        setup.hand_over(conn, stream, registration);
    }
    // Closing the listener now makes new connections fail fast instead of
    // queueing in the backlog while we drain.
    drop(listener);
    drop(alive);
    // Resolves once every connection task has dropped its sender.
    let _ = all_closed.recv().await;
}

/// Requests in flight at once from which connections are set up on the
/// setup thread.
const SETUP_BURST: usize = 128;

/// Sets accepted connections up on a thread of its own: registers the
/// socket with the runtime, makes the connection's state and read timer, and
/// spawns its task. glibc gives each thread an arena of its own, so what
/// an idle connection keeps (its task, ~1.4 KiB; the registration, the
/// state and the timer, ~500 B) lands packed together there. Made on a
/// worker, among the buffers of the requests in flight, those objects were
/// spread over the heap a burst had grown (1,000 requests at once: +42 MiB)
/// and each pinned a page that `malloc_trim` could not give back: 8.3 KiB
/// of RSS per idle connection for 2.1 KiB allocated. The cost is a thread
/// hop and two `epoll_ctl` calls per connection, so only connections
/// accepted during a burst take this way (see `hand_over`).
#[derive(Clone)]
pub(super) struct ConnSetup {
    /// `None` when the thread could not be started: set up on the worker.
    to_thread: Option<std::sync::mpsc::Sender<Accepted>>,
}

struct Accepted {
    conn: Connection,
    stream: std::net::TcpStream,
    registration: fd_registry::Registration,
}

impl ConnSetup {
    /// Starts the setup thread for the runtime `handle` belongs to. It ends
    /// once every `ConnSetup` (each accept loop's) is dropped.
    pub(super) fn start(handle: tokio::runtime::Handle) -> ConnSetup {
        let (tx, rx) = std::sync::mpsc::channel::<Accepted>();
        let started = std::thread::Builder::new()
            .name("thruster-setup".into())
            .spawn(move || {
                super::block_all_signals();
                let _runtime = handle.enter();
                while let Ok(Accepted {
                    conn,
                    stream,
                    registration,
                }) = rx.recv()
                {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => conn.spawn(stream, registration),
                        Err(err) => log::debug(
                            "Could not register a connection",
                            &[("error", err.to_string().into())],
                        ),
                    }
                }
            });
        if let Err(err) = &started {
            log::error(
                "Could not start the connection setup thread; connections are set up on the workers",
                &[("error", err.to_string().into())],
            );
        }
        ConnSetup {
            to_thread: started.ok().map(|_| tx),
        }
    }

    fn hand_over(
        &self,
        conn: Connection,
        stream: tokio::net::TcpStream,
        registration: fd_registry::Registration,
    ) {
        // Only in a burst of requests: then the heap is full of their
        // buffers. Otherwise the hop is not worth its cost (~15 µs of CPU
        // per connection measured with every request on a new connection,
        // all on one CPU; and with 64 such clients kept waiting by Puma,
        // 64 requests are in flight all the time, hence twice that). Not
        // counted in open connections: idle HTTP/2 ones would make every
        // later connection take the hop.
        let in_burst = crate::conn::requests_in_flight() >= SETUP_BURST;
        let Some(to_thread) = self.to_thread.as_ref().filter(|_| in_burst) else {
            return conn.spawn(stream, registration);
        };
        // Registered again on the setup thread, its registration made there.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                log::debug(
                    "Could not hand a connection over",
                    &[("error", err.to_string().into())],
                );
                return;
            }
        };
        let accepted = Accepted {
            conn,
            stream,
            registration,
        };
        if let Err(std::sync::mpsc::SendError(Accepted {
            conn,
            stream,
            registration,
        })) = to_thread.send(accepted)
        {
            // The thread is gone (it never panics; at worst, at exit).
            if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                conn.spawn(stream, registration);
            }
        }
    }
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
    /// Spawns the connection's task, with its state and read timer made
    /// first, on this thread (see [`ConnSetup`]).
    fn spawn(self, stream: tokio::net::TcpStream, registration: fd_registry::Registration) {
        let state = Arc::new(ConnState::default());
        let timer = conn_io::read_timer(&self.timeouts);
        tokio::spawn(self.run(stream, registration, state, timer));
    }

    async fn run(
        self,
        stream: tokio::net::TcpStream,
        registration: fd_registry::Registration,
        state: Arc<ConnState>,
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    ) {
        let (io, h2, tls) = match &self.role {
            Role::Tls(acceptor, _) => {
                // The handshake counts against the header timeout.
                let limit = self.timeouts.header.unwrap_or(MAX_HANDSHAKE);
                let mut shutdown = self.shutdown.clone();
                let handshake = tokio::select! {
                    _ = shutdown.changed() => return,
                    // Boxed: the handshake's state would otherwise size the
                    // task's future for the connection's whole life.
                    result = tokio::time::timeout(limit, Box::pin(acceptor.accept(stream))) => result,
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
            _ if self.builders.h2c => {
                // h2c by prior knowledge: the preface is peeked, not read,
                // within the header timeout.
                let limit = self.timeouts.header.unwrap_or(MAX_HANDSHAKE);
                let mut shutdown = self.shutdown.clone();
                let preface = tokio::select! {
                    _ = shutdown.changed() => return,
                    result = tokio::time::timeout(limit, opens_with_h2_preface(&stream)) => result,
                };
                match preface {
                    Ok(Ok(h2)) => (ClientIo::Plain(stream), h2, false),
                    _ => return,
                }
            }
            _ => (ClientIo::Plain(stream), false, false),
        };
        let conn_info = ConnInfo {
            peer: self.peer,
            tls,
            state: Some(state.clone()),
        };
        // Open connections by protocol: known now (ALPN, or the peeked h2c
        // preface); counted until this task ends.
        let _counted = metrics::get()
            .map(|m| m.connection_opened(if h2 { Protocol::H2 } else { Protocol::H1 }));
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
            // Decided before the request moves on; the response has its say
            // below (see ConnState::allow_park).
            service_state.allow_park(false);
            let parkable_request = req.version() == http::Version::HTTP_11
                && http_body::Body::is_end_stream(req.body())
                && !wants_close(req.headers());
            let park_state = service_state.clone();
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
                park_state.allow_park(parkable_request && !wants_close(response.headers()));
                Ok::<_, std::convert::Infallible>(response.map(|body| InFlightBody {
                    body,
                    _in_flight: in_flight,
                }))
            }
        });
        let io = ConnIo::new(io, registration, state, self.timeouts, timer);
        let (stop, alive) = (self.shutdown, self.alive);
        let builders = &*self.builders;
        if h2 {
            let _serving = crate::sys::trim::Serving::begin();
            let conn = builders.http2.serve_connection(TokioIo::new(io), service);
            serve_until_drained(Box::pin(conn), stop, alive).await;
        } else {
            serve_http1(&builders.http1, io, service, stop).await;
            drop(alive);
        }
    }
}

/// Whether a cleartext connection opens with the HTTP/2 client preface
/// (RFC 9113 §3.4). Peeks: the bytes stay for the protocol that serves it.
async fn opens_with_h2_preface(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = [0u8; 24];
    loop {
        let n = stream.peek(&mut seen).await?;
        if n == 0 || seen[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far: the socket stays readable with the
        // bytes already seen, so wait a little instead of spinning.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serves an HTTP/1 connection, parking it whenever it goes idle: hyper
/// finishes its connection (its buffers, header map and state are freed),
/// this task waits for the socket's next bytes, the idle timeout or a
/// drain, and a new hyper connection serves the next request. An idle
/// keep-alive connection then costs the socket and this task alone instead
/// of hyper's ~20 KiB. While serving, a drain lets the in-flight request
/// finish (`serve_until_drained`); a parked connection closes at once.
async fn serve_http1<S>(
    http1: &hyper::server::conn::http1::Builder,
    mut io: ConnIo<ClientIo>,
    mut service: S,
    mut shutdown: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = InFlightBody> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        if *shutdown.borrow() {
            return;
        }
        io.set_parkable();
        let serving = crate::sys::trim::Serving::begin();
        // Boxed, so that hyper's state is freed while the connection is
        // parked: inline, it would size this task's future for good.
        let mut conn = Box::new(
            http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let result = tokio::select! {
            result = &mut *conn => result,
            _ = shutdown.changed() => {
                std::pin::Pin::new(&mut *conn).graceful_shutdown();
                (&mut *conn).await
            }
        };
        if let Err(err) = result {
            log::debug(
                "Connection ended with an error",
                &[("error", err.to_string().into())],
            );
            return;
        }
        let Some((parked_io, parked_service)) = take_back(conn) else {
            return;
        };
        (io, service) = (parked_io, parked_service);
        // Parked: no longer served (see sys::trim).
        drop(serving);
        let next = tokio::select! {
            next = io.unpark() => next,
            _ = shutdown.changed() => {
                io.close().await;
                return;
            }
        };
        if !matches!(next, Ok(Unparked::Readable)) {
            return;
        }
    }
}

/// The socket and the service of a finished hyper connection, if it was
/// parked: `None` when it was upgraded (the tunnel lives on elsewhere), or
/// closed by either side, or when hyper read bytes it did not serve (never
/// after a parked end of stream; such a connection closes).
///
/// A function of its own so that what it leaves is freed when it returns:
/// the box (moved out of), and hyper's read buffer (an empty view of 8 KiB
/// once a request was read). Left in the caller, a moved-out box and the
/// rest of a partly moved struct live to the end of their scope, which for
/// `serve_http1` means through the parked wait, for every idle connection.
#[allow(clippy::boxed_local)] // Taking the box is the point: it is freed here.
fn take_back<S>(
    conn: Box<hyper::server::conn::http1::UpgradeableConnection<TokioIo<ConnIo<ClientIo>>, S>>,
) -> Option<(ConnIo<ClientIo>, S)>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = InFlightBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = conn.into_parts()?;
    let io = parts.io.into_inner();
    if !io.parked() || !parts.read_buf.is_empty() {
        return None;
    }
    Some((io, parts.service))
}

/// `Connection: close` among the connection options (any letter case).
fn wants_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// A connection that can be asked to finish its in-flight requests and close.
trait GracefulConnection: std::future::Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn start_graceful_shutdown(self: std::pin::Pin<&mut Self>);
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

/// Serves one connection; on shutdown, lets its in-flight requests finish
/// (idle keep-alive connections close at once).
async fn serve_until_drained<C: GracefulConnection>(
    mut conn: std::pin::Pin<Box<C>>,
    mut shutdown: watch::Receiver<bool>,
    _alive: tokio::sync::mpsc::Sender<()>,
) {
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
