//! The server's lifecycle: `Server::start` binds (`listeners`), builds the
//! pipeline and spawns an accept loop per listener (`connection`) on a
//! Tokio runtime the server owns; `stop_accepting`, hand-over and `stop`
//! drain it.
//!
//! Binding happens synchronously in `Server::start`, so a busy port is an
//! error the caller sees before anything else starts (the wrapper then never
//! starts its child; the Ruby API raises).
//!
//! In TLS mode there are two kinds of listeners: HTTPS (`HTTPS_PORT`)
//! serves the app over TLS, with ALPN choosing HTTP/2 or HTTP/1.1; HTTP
//! (`HTTP_PORT`) answers ACME HTTP-01 challenges and redirects to HTTPS
//! (`tls::redirect`). With `HTTP3_ENABLED` (the default) a UDP socket on
//! each HTTPS address serves HTTP/3 (`quic`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

mod admin;
pub mod client_io;
pub mod conn_io;
mod connection;
pub mod limits;
mod listeners;
mod metrics_endpoint;
mod quic;
mod side_http;

use crate::config::Config;
use crate::log;
use crate::pipeline::Pipeline;
use crate::sys::Registered;
use crate::tls::redirect::Redirect;
use crate::tls::{Tls, TlsError};
use crate::upstream::{Upstream, UpstreamAddr};
use connection::{accept_loop, connection_builders, ConnSetup, Role};
use listeners::{inherited_sockets, open_listeners, open_udp_sockets};

/// How long `stop` waits by default for in-flight requests (Thruster: 5 s).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

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
    /// A bad `CACHE_REDIS_URL` or `CACHE_REDIS_CA_FILE`.
    #[error(transparent)]
    SharedCache(#[from] crate::pipeline::cache::shared::SharedConfigError),
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
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
    /// What `Thruster.purge` sends the admin listener; the app reads it
    /// from `THRUSTER_RS_ADMIN_TOKEN`.
    pub admin_token: String,
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
            admin_token: admin::token_from_env_or_new(),
            worker_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

/// How long after the start its code pages are released
/// (`sys::code_pages`).
const CODE_RELEASE_DELAY: Duration = Duration::from_secs(1);

/// A running proxy. Dropping it without `stop` aborts connections.
pub struct Server {
    runtime: Option<Runtime>,
    shutdown: watch::Sender<bool>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    conn_limits: Arc<limits::ConnLimits>,
    http_addrs: Vec<SocketAddr>,
    https_addrs: Vec<SocketAddr>,
    listener_fds: Vec<RawFd>,
    /// The HTTP/3 sockets (UDP, one per HTTPS address) and their addresses.
    quic_fds: Vec<(RawFd, SocketAddr)>,
    /// Kept for the disk cache flush on stop.
    pipeline: Arc<Pipeline>,
    metrics_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    admin_token: String,
}

pub use admin::{
    token_from_env_or_new as admin_token_from_env_or_new, TOKEN_ENV as ADMIN_TOKEN_ENV,
    URL_ENV as ADMIN_URL_ENV,
};

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
        // HTTP/3 on the same addresses as HTTPS (the port number Alt-Svc
        // names), bound now so a busy UDP port fails the start like TCP.
        let https_addrs_bound = https_std
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()
            .map_err(ServerError::Runtime)?;
        let udp_std = if config.tls_enabled() && config.http3_enabled {
            match (options.https_binds.is_empty(), https_addrs_bound.first()) {
                // All interfaces, at the port TCP got (HTTPS_PORT=0 picks one).
                (true, Some(first)) => open_udp_sockets(&[], first.port(), &mut inherited)?,
                _ => open_udp_sockets(&https_addrs_bound, config.https_port, &mut inherited)?,
            }
        } else {
            Vec::new()
        };
        // Its own port, never a public one: `/metrics` on HTTP_PORT is the
        // app's. All interfaces, as Prometheus usually scrapes from another
        // container.
        let metrics_std = if config.metrics_port != 0 {
            open_listeners("metrics", &[], config.metrics_port, &mut inherited)?
        } else {
            Vec::new()
        };
        // Loopback only: it purges the cache. With no port configured, a
        // hot restart keeps the port the app already knows (its URL is in
        // the environment the new image inherits) when that socket was
        // handed over; else a free one.
        let admin_bind = SocketAddr::from(([127, 0, 0, 1], admin_port(&config, &inherited)));
        let admin_std = open_listeners("admin", &[admin_bind], admin_bind.port(), &mut inherited)?;
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
        let https_addrs = https_addrs_bound;
        let admin_addr = local_addrs(&admin_std)?[0];
        let quic_fds = udp_std
            .iter()
            .map(|s| Ok((s.as_raw_fd(), s.local_addr()?)))
            .collect::<io::Result<Vec<_>>>()
            .map_err(ServerError::Runtime)?;
        let listener_fds = http_std
            .iter()
            .chain(&https_std)
            .chain(&admin_std)
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
        let metrics_addr = metrics_std.first().and_then(|l| l.local_addr().ok());
        let metrics_listeners = to_tokio(metrics_std)?;
        let admin_listeners = to_tokio(admin_std)?;

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
            Upstream::new(
                options.upstream,
                config.upstream_max_connections.min(usize::MAX as u64) as usize,
            ),
            &options.sendfile_token,
        )?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        if !metrics_listeners.is_empty() {
            crate::metrics::enable();
            let scrape = Arc::new(metrics_endpoint::Scrape {
                pipeline: pipeline.clone(),
                listener_fds: http_listeners
                    .iter()
                    .chain(&https_listeners)
                    .map(|l| l.as_raw_fd())
                    .collect(),
                tls: tls.clone(),
            });
            for listener in metrics_listeners {
                runtime.spawn(metrics_endpoint::serve(
                    listener,
                    scrape.clone(),
                    shutdown_rx.clone(),
                ));
            }
        }
        for listener in admin_listeners {
            runtime.spawn(admin::serve(
                listener,
                pipeline.clone(),
                options.admin_token.clone(),
                shutdown_rx.clone(),
            ));
        }
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
        // Shared by the TCP accept loops; its thread ends with them.
        let setup = ConnSetup::start(runtime.handle().clone());
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
                setup.clone(),
                shutdown_rx.clone(),
            )));
        }
        // Advertised only where HTTP/3 answers.
        let alt_svc = match (&tls, quic_fds.first()) {
            (Some(tls), Some(&(_, addr))) => {
                Some(Arc::new(quic::AltSvc::new(tls.clone(), addr.port())))
            }
            _ => None,
        };
        if let Some(acceptor) = &acceptor {
            for listener in https_listeners {
                accept_tasks.push(runtime.spawn(accept_loop(
                    listener,
                    builders.clone(),
                    pipeline.clone(),
                    Role::Tls(acceptor.clone(), alt_svc.clone()),
                    conn_limits.clone(),
                    setup.clone(),
                    shutdown_rx.clone(),
                )));
            }
        }
        drop(setup);
        if let Some(tls) = &tls {
            if !udp_std.is_empty() {
                let crypto = crate::tls::quic_server_config(tls.store.clone())?;
                for socket in udp_std {
                    let http3 = quic::Http3::new(socket, crypto.clone(), &config)?;
                    accept_tasks.push(runtime.spawn(http3.serve(
                        pipeline.clone(),
                        conn_limits.clone(),
                        shutdown_rx.clone(),
                    )));
                }
            }
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
            fields.push(("http3", (!quic_fds.is_empty()).into()));
            fields.push(("tls_domain", config.tls_domains.clone().into()));
            fields.push(("certificates", tls.describe().into()));
        }
        if let Some(addr) = metrics_addr {
            fields.push(("metrics", format!(":{}", addr.port()).into()));
        }
        fields.push(("admin", admin_addr.to_string().into()));
        if let Some(shared) = pipeline.cache().and_then(|c| c.shared()) {
            fields.push(("cache_redis", shared.url().into()));
        }
        fields.push(("max_connections", max_connections.into()));
        fields.push(("fd_limit", fd_limit.into()));
        log::info("Server started", &fields);
        // What only the start ran (config, TLS, QUIC, Redis and metrics
        // set-up) need not stay resident: see sys::code_pages. A moment
        // later, not here: the tasks spawned above make their first polls
        // (and this function returns through the front end) after this
        // point, and would map their set-up code again.
        runtime.spawn(async {
            tokio::time::sleep(CODE_RELEASE_DELAY).await;
            crate::sys::code_pages::release();
        });
        Ok(Server {
            runtime: Some(runtime),
            shutdown,
            accept_tasks,
            conn_limits,
            http_addrs,
            https_addrs,
            listener_fds,
            quic_fds,
            pipeline,
            metrics_addr,
            admin_addr,
            admin_token: options.admin_token,
        })
    }

    /// The admin listener's address (127.0.0.1), for `THRUSTER_RS_ADMIN_URL`.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// `THRUSTER_RS_ADMIN_TOKEN`'s value.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// `THRUSTER_RS_ADMIN_URL`'s value.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
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

    /// The HTTP/3 (UDP) addresses: TLS mode with `HTTP3_ENABLED`.
    pub fn http3_addrs(&self) -> Vec<SocketAddr> {
        self.quic_fds.iter().map(|&(_, addr)| addr).collect()
    }

    /// The metrics listener's address (`METRICS_PORT` set).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Duplicates the listening sockets into fds that survive `exec`, so a
    /// re-executed process (Puma's hot restart) can keep listening without
    /// a gap: connections arriving meanwhile wait in the kernel's backlog
    /// (QUIC datagrams in the UDP socket's receive buffer).
    /// The caller then stops this server; the duplicates stay open.
    pub fn handoff_fds(&self) -> io::Result<Vec<(RawFd, SocketAddr)>> {
        self.listener_fds
            .iter()
            .zip(
                self.http_addrs
                    .iter()
                    .chain(&self.https_addrs)
                    .chain(std::iter::once(&self.admin_addr)),
            )
            .chain(self.quic_fds.iter().map(|(fd, addr)| (fd, addr)))
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

/// `ADMIN_PORT`, or with none configured the port of the admin listener a
/// previous process image handed over (named by `THRUSTER_RS_ADMIN_URL`),
/// or 0 for a free one.
fn admin_port(config: &Config, inherited: &[Option<Registered<socket2::Socket>>]) -> u16 {
    if config.admin_port != 0 {
        return config.admin_port;
    }
    let Some(previous) = std::env::var(admin::URL_ENV)
        .ok()
        .and_then(|url| url.strip_prefix("http://")?.parse::<SocketAddr>().ok())
    else {
        return 0;
    };
    let handed_over = inherited.iter().flatten().any(|s| {
        s.local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a == previous)
    });
    if handed_over {
        previous.port()
    } else {
        0
    }
}

/// Runtime threads never take signals: in-process, they belong to Puma's
/// handlers; in the wrapper, to its relay thread.
pub(super) fn block_all_signals() {
    // SAFETY: sigfillset/pthread_sigmask only touch the thread-local mask and
    // a stack value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
