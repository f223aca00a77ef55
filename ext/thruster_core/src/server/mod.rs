//! Listeners, the accept loop and graceful drain, on a Tokio runtime the
//! server owns.
//!
//! Binding happens synchronously in `Server::start`, so a busy port is an
//! error the caller sees before anything else starts (the wrapper then never
//! starts its child; the Ruby API raises).

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;

pub mod fd_registry;
pub mod timed_io;

use crate::config::Config;
use crate::log;
use crate::pipeline::{ConnInfo, Pipeline, ResponseBody};
use crate::upstream::{Upstream, UpstreamAddr};
use timed_io::{ConnState, ConnTimeouts, InFlight, TimedIo};

/// How long `stop` waits by default for in-flight requests (Thruster: 5 s).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not start the proxy runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("Failed to start HTTP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Where and how to run, beyond the user's `Config`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub upstream: UpstreamAddr,
    /// Addresses to listen on; empty listens on all interfaces (IPv6 and
    /// IPv4) at `HTTP_PORT`.
    pub http_binds: Vec<SocketAddr>,
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
    http_addrs: Vec<SocketAddr>,
    listener_fds: Vec<RawFd>,
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

        let std_listeners = open_listeners(&options, config.http_port)?;
        let http_addrs = std_listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()
            .map_err(ServerError::Runtime)?;
        let listener_fds = std_listeners.iter().map(|l| l.as_raw_fd()).collect();
        let listeners = {
            let _guard = runtime.enter();
            std_listeners
                .into_iter()
                .map(TcpListener::from_std)
                .collect::<io::Result<Vec<_>>>()
                .map_err(ServerError::Runtime)?
        };

        let config = Arc::new(config);
        let builder = connection_builder(&config);
        let pipeline = Arc::new(Pipeline::new(
            config.clone(),
            Upstream::new(options.upstream),
            &options.sendfile_token,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_tasks = listeners
            .into_iter()
            .map(|listener| {
                runtime.spawn(accept_loop(
                    listener,
                    builder.clone(),
                    pipeline.clone(),
                    shutdown_rx.clone(),
                ))
            })
            .collect();

        let shown = if options.http_binds.is_empty() {
            format!(":{}", http_addrs[0].port())
        } else {
            http_addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        log::info("Server started", &[("http", shown.into())]);
        Ok(Server {
            runtime: Some(runtime),
            shutdown,
            accept_tasks,
            http_addrs,
            listener_fds,
        })
    }

    /// The first listening address (the only one unless several were bound).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addrs[0]
    }

    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http_addrs
    }

    /// Duplicates the listening sockets into fds that survive `exec`, so a
    /// re-executed process (Puma's hot restart) can keep listening without
    /// a gap: connections arriving meanwhile wait in the kernel's backlog.
    /// The caller then stops this server; the duplicates stay open.
    pub fn handoff_fds(&self) -> io::Result<Vec<(RawFd, SocketAddr)>> {
        self.listener_fds
            .iter()
            .zip(&self.http_addrs)
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
        let _ = runtime.block_on(async {
            tokio::time::timeout(drain, async {
                for task in tasks {
                    let _ = task.await;
                }
            })
            .await
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

fn open_listeners(
    options: &ServerOptions,
    port: u16,
) -> Result<Vec<std::net::TcpListener>, ServerError> {
    let mut inherited: Vec<Option<Socket>> = options
        .inherited_fds
        .iter()
        // SAFETY: the caller hands these fds over to us; we own them now.
        .map(|&fd| Some(unsafe { Socket::from_raw_fd(fd) }))
        .collect();
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
    let binds: Vec<(SocketAddr, bool)> = if options.http_binds.is_empty() {
        vec![(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)]
    } else {
        options.http_binds.iter().map(|&a| (a, false)).collect()
    };
    let mut listeners = Vec::with_capacity(binds.len());
    for (addr, default) in binds {
        if let Some(socket) = take_inherited(addr) {
            let err = |source| ServerError::Bind { addr, source };
            socket.set_cloexec(true).map_err(err)?;
            socket.set_nonblocking(true).map_err(err)?;
            listeners.push(socket.into());
            continue;
        }
        let bound = match bind_one(addr, default) {
            // One dual-stack socket serves IPv6 and IPv4 clients alike; fall
            // back to IPv4 where the kernel has no IPv6.
            Err(ServerError::Bind { source, .. })
                if default && source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                bind_one(SocketAddr::from(([0, 0, 0, 0], port)), false)
            }
            other => other,
        }?;
        listeners.push(bound);
    }
    // Inherited sockets nobody asked for are closed here (dropped).
    Ok(listeners)
}

fn bind_one(addr: SocketAddr, dual_stack: bool) -> Result<std::net::TcpListener, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if dual_stack {
        socket.set_only_v6(false).map_err(err)?;
    }
    // Lets a restarted proxy re-bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

/// How client connections are served: HTTP/1 only, or HTTP/1 and HTTP/2 by
/// prior knowledge (`H2C_ENABLED`). hyper-util's auto builder ignores
/// "HTTP/1 only" once upgrades are on, so plain HTTP/1 uses hyper directly
/// (which also skips sniffing for the HTTP/2 preface).
enum ConnBuilder {
    Http1(hyper::server::conn::http1::Builder),
    Auto(auto::Builder<TokioExecutor>),
}

fn connection_builder(config: &Config) -> Arc<ConnBuilder> {
    let builder = if config.h2c_enabled {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        // writev keeps hyper from copying body chunks into its own buffer,
        // which zero-copy X-Sendfile bodies rely on (see files::body).
        auto.http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .writev(true);
        auto.http2().timer(TokioTimer::new());
        ConnBuilder::Auto(auto)
    } else {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1.timer(TokioTimer::new()).keep_alive(true).writev(true);
        ConnBuilder::Http1(http1)
    };
    Arc::new(builder)
}

async fn accept_loop(
    listener: TcpListener,
    builder: Arc<ConnBuilder>,
    pipeline: Arc<Pipeline>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop_accepting = shutdown.clone();
    let listener_registration = fd_registry::register(listener.as_raw_fd());
    // Each connection task holds a sender; the channel closes when the last
    // connection has finished.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let timeouts = ConnTimeouts {
        idle: pipeline.config().http_idle_timeout,
        header: pipeline.config().http_read_timeout,
        write_stall: pipeline.config().http_write_timeout,
    };
    loop {
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
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState::default());
        let conn_info = ConnInfo {
            peer,
            tls: false,
            state: state.clone(),
        };
        let pipeline = pipeline.clone();
        let service = service_fn(move |req| {
            let pipeline = pipeline.clone();
            let conn_info = conn_info.clone();
            async move {
                let in_flight = conn_info.state.begin_request();
                let response = pipeline.handle(req, &conn_info).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| InFlightBody {
                    body,
                    _in_flight: in_flight,
                }))
            }
        });
        let io = TimedIo::new(stream, registration, state, timeouts);
        let io = TokioIo::new(io);
        let (stop, alive) = (shutdown.clone(), alive.clone());
        match &*builder {
            ConnBuilder::Http1(http1) => {
                let conn = http1.serve_connection(io, service).with_upgrades();
                tokio::spawn(serve_until_drained(conn, stop, alive));
            }
            ConnBuilder::Auto(auto) => {
                let conn = auto
                    .serve_connection_with_upgrades(io, service)
                    .into_owned();
                tokio::spawn(serve_until_drained(conn, stop, alive));
            }
        }
    }
    // Closing the listener now makes new connections fail fast instead of
    // queueing in the backlog while we drain.
    drop(listener_registration);
    drop(listener);
    drop(alive);
    // Resolves once every connection task has dropped its sender.
    let _ = all_closed.recv().await;
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

impl<I, S, E, B> GracefulConnection for auto::UpgradeableConnection<'static, I, S, E>
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
    type Error = crate::pipeline::BoxError;

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
