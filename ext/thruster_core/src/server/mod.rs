//! Listeners, the accept loop and graceful drain, on a Tokio runtime the
//! server owns.
//!
//! Binding happens synchronously in `Server::start`, so a busy port is an
//! error the caller sees before anything else starts (the wrapper then never
//! starts its child; the Ruby API raises).
//!
//! In TLS mode there are two kinds of listeners: HTTPS (`HTTPS_PORT`)
//! serves the app over TLS, with ALPN choosing HTTP/2 or HTTP/1.1; HTTP
//! (`HTTP_PORT`) answers ACME HTTP-01 challenges and redirects to HTTPS
//! (`tls::redirect`).

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub mod client_io;
pub mod conn_io;
pub mod limits;

use crate::config::Config;
use crate::conn::{ConnState, InFlight};
use crate::http::{BoxError, ResponseBody};
use crate::log;
use crate::pipeline::{ConnInfo, Pipeline};
use crate::sys::{fd_registry, Registered};
use crate::tls::redirect::Redirect;
use crate::tls::{Tls, TlsError, ACME_TLS_ALPN};
use crate::upstream::{Upstream, UpstreamAddr};
use client_io::ClientIo;
use conn_io::{ConnIo, ConnTimeouts};

/// How long `stop` waits by default for in-flight requests (Thruster: 5 s).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not start the proxy runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("Failed to start {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// TLS could not be set up (unreadable certificate files, a bad
    /// `ACME_CA_FILE`, ...): a configuration error.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Where and how to run, beyond the user's `Config`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub upstream: UpstreamAddr,
    /// Addresses to listen on; empty listens on all interfaces (IPv6 and
    /// IPv4) at `HTTP_PORT`.
    pub http_binds: Vec<SocketAddr>,
    /// HTTPS addresses in TLS mode; empty listens on all interfaces at
    /// `HTTPS_PORT`.
    pub https_binds: Vec<SocketAddr>,
    /// Listening sockets handed over by a previous process (across an exec),
    /// used for the bind addresses they match instead of binding anew, so no
    /// connection is refused in between. Unmatched ones are closed.
    pub inherited_fds: Vec<RawFd>,
    /// Sent upstream so the app's middleware trusts X-Sendfile requests
    /// (see `pipeline::sendfile`); the app reads the same value from
    /// `THRUSTER_RS_SENDFILE_TOKEN`.
    pub sendfile_token: String,
    pub worker_threads: usize,
}

impl ServerOptions {
    /// The wrapper's defaults: the app on `127.0.0.1:TARGET_PORT`.
    pub fn for_wrapper(config: &Config) -> ServerOptions {
        ServerOptions {
            upstream: UpstreamAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], config.target_port))),
            http_binds: Vec::new(),
            https_binds: Vec::new(),
            inherited_fds: Vec::new(),
            sendfile_token: crate::pipeline::sendfile::token_from_env_or_new(),
            worker_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

/// A running proxy. Dropping it without `stop` aborts connections.
pub struct Server {
    runtime: Option<Runtime>,
    shutdown: watch::Sender<bool>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    conn_limits: Arc<limits::ConnLimits>,
    http_addrs: Vec<SocketAddr>,
    https_addrs: Vec<SocketAddr>,
    listener_fds: Vec<RawFd>,
    /// Kept for the disk cache flush on stop.
    pipeline: Arc<Pipeline>,
}

impl Server {
    pub fn start(config: Config, options: ServerOptions) -> Result<Server, ServerError> {
        log::set_debug(config.debug);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads.max(1))
            .thread_name("thruster-worker")
            .on_thread_start(block_all_signals)
            .enable_io()
            .enable_time()
            .build()
            .map_err(ServerError::Runtime)?;

        let mut inherited = inherited_sockets(&options.inherited_fds);
        let http_std = open_listeners(
            "HTTP",
            &options.http_binds,
            config.http_port,
            &mut inherited,
        )?;
        let https_std = if config.tls_enabled() {
            open_listeners(
                "HTTPS",
                &options.https_binds,
                config.https_port,
                &mut inherited,
            )?
        } else {
            Vec::new()
        };
        // Inherited sockets nobody asked for are closed here.
        drop(inherited);
        let local_addrs = |listeners: &[Registered<std::net::TcpListener>]| {
            listeners
                .iter()
                .map(|l| l.local_addr())
                .collect::<io::Result<Vec<_>>>()
                .map_err(ServerError::Runtime)
        };
        let http_addrs = local_addrs(&http_std)?;
        let https_addrs = local_addrs(&https_std)?;
        let listener_fds = http_std
            .iter()
            .chain(&https_std)
            .map(|l| l.as_raw_fd())
            .collect();
        let _guard = runtime.enter();
        let to_tokio = |listeners: Vec<Registered<std::net::TcpListener>>| {
            listeners
                .into_iter()
                .map(|l| l.try_map(TcpListener::from_std))
                .collect::<io::Result<Vec<_>>>()
                .map_err(ServerError::Runtime)
        };
        let http_listeners = to_tokio(http_std)?;
        let https_listeners = to_tokio(https_std)?;

        let tls = if config.tls_enabled() {
            Some(Arc::new(Tls::setup(&config)?))
        } else {
            None
        };
        let config = Arc::new(config);
        let fd_limit = limits::raise_fd_limit();
        let max_connections = match config.max_connections {
            0 => limits::automatic_cap(fd_limit),
            n => n.min(usize::MAX as u64) as usize,
        };
        let conn_limits = limits::ConnLimits::new(max_connections, config.max_connections_per_ip);
        let builders = Arc::new(connection_builders(&config));
        let pipeline = Arc::new(Pipeline::new(
            config.clone(),
            Upstream::new(options.upstream),
            &options.sendfile_token,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let redirect = tls.as_ref().map(|tls| {
            Arc::new(Redirect {
                tls: tls.clone(),
                https_port: https_addrs.first().map_or(config.https_port, |a| a.port()),
            })
        });
        let acceptor = tls
            .as_ref()
            .map(|tls| TlsAcceptor::from(tls.server_config.clone()));
        let mut accept_tasks = Vec::new();
        for listener in http_listeners {
            let role = match &redirect {
                Some(redirect) => Role::Redirect(redirect.clone()),
                None => Role::App,
            };
            accept_tasks.push(runtime.spawn(accept_loop(
                listener,
                builders.clone(),
                pipeline.clone(),
                role,
                conn_limits.clone(),
                shutdown_rx.clone(),
            )));
        }
        if let Some(acceptor) = &acceptor {
            for listener in https_listeners {
                accept_tasks.push(runtime.spawn(accept_loop(
                    listener,
                    builders.clone(),
                    pipeline.clone(),
                    Role::Tls(acceptor.clone()),
                    conn_limits.clone(),
                    shutdown_rx.clone(),
                )));
            }
        }
        if let Some(tls) = &tls {
            tls.spawn_background(shutdown_rx.clone());
        }
        drop(_guard);

        let show = |addrs: &[SocketAddr], binds: &[SocketAddr]| {
            if binds.is_empty() {
                addrs
                    .first()
                    .map(|a| format!(":{}", a.port()))
                    .unwrap_or_default()
            } else {
                addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let mut fields = vec![("http", show(&http_addrs, &options.http_binds).into())];
        if let Some(tls) = &tls {
            fields.push(("https", show(&https_addrs, &options.https_binds).into()));
            fields.push(("tls_domain", config.tls_domains.clone().into()));
            fields.push(("certificates", tls.describe().into()));
        }
        fields.push(("max_connections", max_connections.into()));
        fields.push(("fd_limit", fd_limit.into()));
        log::info("Server started", &fields);
        Ok(Server {
            runtime: Some(runtime),
            shutdown,
            accept_tasks,
            conn_limits,
            http_addrs,
            https_addrs,
            listener_fds,
            pipeline,
        })
    }

    /// The first listening address (the only one unless several were bound).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addrs[0]
    }

    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http_addrs
    }

    /// The HTTPS listening addresses (TLS mode only).
    pub fn https_addrs(&self) -> &[SocketAddr] {
        &self.https_addrs
    }

    /// Duplicates the listening sockets into fds that survive `exec`, so a
    /// re-executed process (Puma's hot restart) can keep listening without
    /// a gap: connections arriving meanwhile wait in the kernel's backlog.
    /// The caller then stops this server; the duplicates stay open.
    pub fn handoff_fds(&self) -> io::Result<Vec<(RawFd, SocketAddr)>> {
        self.listener_fds
            .iter()
            .zip(self.http_addrs.iter().chain(&self.https_addrs))
            .map(|(&fd, &addr)| {
                // SAFETY: F_DUPFD on a listener fd we own; the new fd has no
                // FD_CLOEXEC, which is the point.
                let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD, 3) };
                if dup < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok((dup, addr))
                }
            })
            .collect()
    }

    /// Stops accepting and asks every connection to finish its current
    /// request and close, without waiting; `stop` then waits for them.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Stops accepting and waits, up to `limit`, until every client
    /// connection has finished its request and closed. For a thread outside
    /// the runtime (it blocks). True when all are done.
    pub fn drain(&self, limit: Duration) -> bool {
        self.begin_shutdown();
        let deadline = std::time::Instant::now() + limit;
        while self.conn_limits.open() > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain`,
    /// then closes every connection and the runtime.
    pub fn stop(mut self, drain: Duration) {
        self.stop_inner(drain);
    }

    fn stop_inner(&mut self, drain: Duration) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        log::info("Server stopping", &[]);
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(&mut self.accept_tasks);
        let started = std::time::Instant::now();
        let pipeline = self.pipeline.clone();
        runtime.block_on(async {
            let _ = tokio::time::timeout(drain, async {
                for task in tasks {
                    let _ = task.await;
                }
            })
            .await;
            // Responses that finished are written to the disk cache before
            // the runtime (and its blocking pool) goes, so a restart finds
            // them: in what the drain left of the stop timeout, which bounds
            // the whole stop (a flush with nothing pending is done at once).
            let left = drain.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, pipeline.flush()).await.is_err() {
                log::warn("Stopped before every cache entry was written to disk", &[]);
            }
        });
        runtime.shutdown_timeout(Duration::from_millis(100));
        log::info("Server stopped", &[]);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner(Duration::ZERO);
    }
}

/// Sockets handed over by the previous process image, registered at once:
/// a worker forked before they are put to use must not keep them.
fn inherited_sockets(fds: &[RawFd]) -> Vec<Option<Registered<Socket>>> {
    fds.iter()
        // SAFETY: the caller hands these fds over to us; we own them now.
        .filter_map(|&fd| Registered::open(|| Ok(unsafe { Socket::from_raw_fd(fd) })).ok())
        .map(Some)
        .collect()
}

fn open_listeners(
    listener: &'static str,
    binds: &[SocketAddr],
    port: u16,
    inherited: &mut [Option<Registered<Socket>>],
) -> Result<Vec<Registered<std::net::TcpListener>>, ServerError> {
    let mut take_inherited = |addr: SocketAddr| {
        inherited.iter_mut().find_map(|slot| {
            let matches = slot
                .as_ref()
                .and_then(|s| s.local_addr().ok())
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a == addr);
            if matches {
                slot.take()
            } else {
                None
            }
        })
    };
    let binds: Vec<(SocketAddr, bool)> = if binds.is_empty() {
        vec![(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)]
    } else {
        binds.iter().map(|&a| (a, false)).collect()
    };
    let mut listeners = Vec::with_capacity(binds.len());
    for (addr, default) in binds {
        if let Some(socket) = take_inherited(addr) {
            let err = |source| ServerError::Bind {
                listener,
                addr,
                source,
            };
            socket.set_cloexec(true).map_err(err)?;
            socket.set_nonblocking(true).map_err(err)?;
            listeners.push(socket.try_map(|s| Ok::<_, ServerError>(s.into()))?);
            continue;
        }
        let bound = match bind_one(listener, addr, default) {
            // One dual-stack socket serves IPv6 and IPv4 clients alike; fall
            // back to IPv4 where the kernel has no IPv6.
            Err(ServerError::Bind { source, .. })
                if default && source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                bind_one(listener, SocketAddr::from(([0, 0, 0, 0], port)), false)
            }
            other => other,
        }?;
        listeners.push(bound);
    }
    Ok(listeners)
}

fn bind_one(
    listener: &'static str,
    addr: SocketAddr,
    dual_stack: bool,
) -> Result<Registered<std::net::TcpListener>, ServerError> {
    let err = |source| ServerError::Bind {
        listener,
        addr,
        source,
    };
    // Registered from its creation: Puma forks its first workers right after
    // the proxy starts, before the accept loops run.
    let socket = Registered::open(|| {
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
    })
    .map_err(err)?;
    if dual_stack {
        socket.set_only_v6(false).map_err(err)?;
    }
    // Lets a restarted proxy re-bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.try_map(|s| Ok(s.into()))
}

/// How client connections are served. Cleartext: HTTP/1 only, or HTTP/1
/// and HTTP/2 by prior knowledge (`H2C_ENABLED`). hyper-util's auto builder
/// ignores "HTTP/1 only" once upgrades are on, so plain HTTP/1 uses hyper
/// directly (which also skips sniffing for the HTTP/2 preface). TLS: ALPN
/// decides between the HTTP/1 and the HTTP/2 builder.
struct ConnBuilders {
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

fn connection_builders(config: &Config) -> ConnBuilders {
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
enum Role {
    /// Cleartext, proxied to the app.
    App,
    /// TLS, proxied to the app.
    Tls(TlsAcceptor),
    /// Cleartext in TLS mode: HTTP-01 answers and redirects to HTTPS.
    Redirect(Arc<Redirect>),
}

async fn accept_loop(
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
            Role::Tls(acceptor) => {
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
        let service_state = state.clone();
        let pipeline = self.pipeline.clone();
        let redirect = match &self.role {
            Role::Redirect(redirect) => Some(redirect.clone()),
            _ => None,
        };
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let pipeline = pipeline.clone();
            let conn_info = conn_info.clone();
            let redirect = redirect.clone();
            let in_flight = service_state.begin_request();
            async move {
                let response = match &redirect {
                    Some(redirect) => redirect.respond(&req),
                    None => {
                        let req = req.map(|body| body.map_err(BoxError::from).boxed_unsync());
                        pipeline.handle(req, &conn_info).await
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

/// Runtime threads never take signals: in-process, they belong to Puma's
/// handlers; in the wrapper, to its relay thread.
fn block_all_signals() {
    // SAFETY: sigfillset/pthread_sigmask only touch the thread-local mask and
    // a stack value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_registered_from_their_creation() {
        // Puma forks its first workers right after the proxy starts: a
        // listener registered only once its accept loop runs would leak
        // into them.
        let mut none = Vec::new();
        let bound =
            open_listeners("HTTP", &["127.0.0.1:0".parse().unwrap()], 0, &mut none).unwrap();
        let fd = bound[0].as_raw_fd();
        assert!(fd_registry::is_registered(fd));

        // A socket handed over across exec is registered as it is adopted.
        let addr = bound[0].local_addr().unwrap();
        let handed = bound.into_iter().next().unwrap();
        let (registration, listener) = handed.into_parts();
        drop(registration);
        let raw = std::os::fd::IntoRawFd::into_raw_fd(listener);
        assert!(!fd_registry::is_registered(raw));
        let mut inherited = inherited_sockets(&[raw]);
        assert!(fd_registry::is_registered(raw));
        let adopted = open_listeners("HTTP", &[addr], 0, &mut inherited).unwrap();
        assert_eq!(adopted[0].as_raw_fd(), raw);
        assert!(fd_registry::is_registered(raw));
        drop(adopted);
        assert!(!fd_registry::is_registered(raw));
    }
}
