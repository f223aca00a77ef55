//! The HTTP/1.1 client that forwards requests to the app server (Puma), over
//! TCP or a Unix socket.
//!
//! A keep-alive pool sized for a proxy in front of one app: connections are
//! reused across requests so the app never sees a connect per request.
//! Puma closes idle keep-alive connections after 20 s, so the pool drops
//! them sooner: a connection the app already closed is never picked.
//!
//! `UPSTREAM_MAX_CONNECTIONS` caps the requests in flight to the app: each
//! takes a slot before it is sent and gives it back when the app's response
//! body ends, and the rest wait here in arrival order. Puma serves as many
//! requests at once as it has threads; sent more, it parks the extra
//! connections in its reactor, and once its threads are all busy and a new
//! connection waits in its listen backlog it closes a keep-alive connection
//! after 10 requests. Kept to its thread count, it serves every request on a
//! connection it already has: `/hello` behind the proxy, Puma with 8 threads
//! and 64 clients, went from 0.72× to 0.91× nginx's requests/s and its p99
//! from 44 to 7 ms (docs/benchmarks.md).

mod pool;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::http::RequestBody;
use crate::log;
use crate::metrics;
use crate::sys::{self, Registration};
use pool::{Pool, PoolLimits, Sender, Taken};

/// Idle upstream connections are dropped after this long (below Puma's 20 s
/// persistent timeout, so the app never closes one we are about to reuse);
/// the pool's sweep closes them at most half as long again later.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle upstream connections kept for reuse; more are closed as their
/// responses end. Each one costs ~26 KiB while idle (hyper's read and write
/// buffers and its request channel, 8 KiB each, and its task), and an app
/// server cannot use many: Puma serves as many requests at once as it has
/// threads (5 by default) per worker, and connections in use are not
/// capped, only kept ones. A burst of 1,000 requests used to leave 256 of
/// them, 6.5 MiB; reconnecting over loopback costs tens of microseconds.
const POOL_MAX_IDLE: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a pooled connection whose response has
/// been read but whose hyper task has not yet turned ready for the next
/// request, before it opens a new connection instead.
const SETTLE_WAIT: Duration = Duration::from_millis(2);

/// Where the app listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Tcp(addr) => write!(f, "{addr}"),
            UpstreamAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Why a string is not an upstream address. The message is shown as is to
/// whoever configured `upstream:`, so it names the value and every form
/// [`UpstreamAddr::from_str`] accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamAddrError {
    /// `unix:` (or `unix://`) with nothing after it: it would only fail once
    /// the first request tries to connect.
    #[error(
        "invalid upstream {0:?}: the Unix socket path is empty; expected \"unix:/path/to.sock\" \
         or \"unix:///path/to.sock\""
    )]
    EmptyUnixPath(String),
    /// Neither a Unix socket nor a numeric socket address.
    #[error(
        "invalid upstream {0:?}: expected \"unix:/path/to.sock\", \"unix:///path/to.sock\", \
         \"IP:PORT\" or \"[IPv6]:PORT\" (e.g. \"127.0.0.1:3000\" or \"[::1]:3000\", optionally \
         prefixed with \"tcp://\"); host names are not resolved"
    )]
    NotAnAddress(String),
}

/// `unix:PATH` or `unix://PATH`, so `unix:///abs` is `/abs` and
/// `unix://tmp/puma.sock` is relative, as in Puma's own binds; or a numeric
/// socket address, optionally after `tcp://`. Host names are refused, not
/// resolved: callers that accept them (the Puma plugin, for Puma's binds)
/// resolve them first, the way Puma does.
impl FromStr for UpstreamAddr {
    type Err = UpstreamAddrError;

    fn from_str(text: &str) -> Result<UpstreamAddr, UpstreamAddrError> {
        if let Some(rest) = text.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(UpstreamAddrError::EmptyUnixPath(text.to_owned()));
            }
            return Ok(UpstreamAddr::Unix(path.into()));
        }
        let addr = text.strip_prefix("tcp://").unwrap_or(text);
        addr.parse::<SocketAddr>()
            .map(UpstreamAddr::Tcp)
            .map_err(|_| UpstreamAddrError::NotAnAddress(text.to_owned()))
    }
}

/// Opens a connection to the app, registered in the fork registry from the
/// socket's creation, within `CONNECT_TIMEOUT`.
async fn connect(addr: &UpstreamAddr) -> io::Result<AppStream> {
    let connect = async {
        match addr {
            UpstreamAddr::Tcp(sock) => {
                // Registered as it is created, before the connect wait, so
                // no fork in between keeps it.
                let (registration, socket) = sys::tcp_socket(sock)?.into_parts();
                let stream = socket.connect(*sock).await?;
                stream.set_nodelay(true)?;
                Ok(AppStream::new(registration, AppIo::Tcp(stream)))
            }
            UpstreamAddr::Unix(path) => {
                let (registration, socket) = sys::unix_socket()?.into_parts();
                let stream = socket.connect(path).await?;
                Ok(AppStream::new(registration, AppIo::Unix(stream)))
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect to the app timed out",
        )),
    }
}

/// A connection to the app, registered for closing in forked children.
pub struct AppStream {
    // Declared first so it drops (unregisters) before the socket closes.
    _registration: Registration,
    io: AppIo,
}

enum AppIo {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AppStream {
    fn new(registration: Registration, io: AppIo) -> AppStream {
        AppStream {
            _registration: registration,
            io,
        }
    }
}

crate::sys::enum_stream_io!(AppStream { io }: AppIo { Tcp, Unix });

#[derive(Clone)]
pub struct Upstream {
    pool: Pool,
    addr: std::sync::Arc<UpstreamAddr>,
    fallback_host: HeaderValue,
    /// `UPSTREAM_MAX_CONNECTIONS`'s slots; `None`: no cap. Tokio's
    /// semaphore is fair, so requests are sent in the order they came.
    slots: Option<std::sync::Arc<Semaphore>>,
    /// Requests sent again after hyper handed them back unsent.
    #[cfg(test)]
    resent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Why a request got no response from the app.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the app could be opened (refused, no such socket,
    /// timed out): the app saw nothing of the request.
    #[error("connecting to the app failed")]
    Connect(#[source] io::Error),
    /// The exchange on an open connection failed: the app closed or reset
    /// it, sent something that is not HTTP/1.1, or the request body broke
    /// (its error is the cause).
    #[error("request to the app failed")]
    Request(#[source] hyper::Error),
}

impl SendError {
    /// Nothing reached the app: safe to try again for any method.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// The app's response body. It holds the request's slot (when
/// `UPSTREAM_MAX_CONNECTIONS` is set) until the body has ended, failed or
/// been dropped: until then the app's thread may still be writing it.
pub struct AppBody {
    body: Incoming,
    slot: Option<OwnedSemaphorePermit>,
    /// The connection the body comes on, when hyper was not yet ready for
    /// another request as the head arrived (it was still reading the body).
    /// It goes back to the pool as the body ends, before the slot is freed,
    /// so the request the slot wakes finds it there.
    conn: Option<(Pool, Sender)>,
}

impl AppBody {
    fn new(
        body: Incoming,
        slot: Option<OwnedSemaphorePermit>,
        conn: Option<(Pool, Sender)>,
    ) -> AppBody {
        let mut body = AppBody { body, slot, conn };
        // A body already complete (204, HEAD, `Content-Length: 0`) may
        // never be polled: give its slot back now.
        if body.body.is_end_stream() {
            body.ended();
        }
        body
    }

    fn ended(&mut self) {
        if let Some((pool, sender)) = self.conn.take() {
            pool.give_back(sender);
        }
        self.slot = None;
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        // Dropped before its end: hyper closes the connection unless it had
        // read the whole response already, so only a ready one is kept.
        if let Some((pool, sender)) = self.conn.take() {
            pool.keep_if_ready(sender);
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !this.body.is_end_stream() => {}
            // The end: the connection can carry the next request.
            Some(Ok(_)) | None => this.ended(),
            // hyper closes the connection after a broken body.
            Some(Err(_)) => {
                this.conn = None;
                this.slot = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Counts a request waiting for a slot in `thruster_upstream_waiting_requests`
/// for as long as it waits, however the wait ends (a timeout drops it).
struct Waiting(Option<&'static metrics::Metrics>);

impl Waiting {
    fn start() -> Waiting {
        let m = metrics::get();
        if let Some(m) = m {
            m.upstream_waiting(1);
        }
        Waiting(m)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(m) = self.0 {
            m.upstream_waiting(-1);
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

impl Upstream {
    /// `max_connections`: requests in flight to the app at most, `0` = no
    /// cap (`UPSTREAM_MAX_CONNECTIONS`).
    pub fn new(addr: UpstreamAddr, max_connections: usize) -> Upstream {
        let limits = PoolLimits {
            max_idle: POOL_MAX_IDLE,
            idle_timeout: POOL_IDLE_TIMEOUT,
        };
        Upstream::with_pool_limits(addr, max_connections, limits)
    }

    fn with_pool_limits(
        addr: UpstreamAddr,
        max_connections: usize,
        limits: PoolLimits,
    ) -> Upstream {
        // RFC 9112 §3.2: every HTTP/1.1 request carries Host. For clients
        // that sent none (HTTP/1.0), name the app the way Thruster does.
        let fallback_host = match &addr {
            UpstreamAddr::Tcp(sock) => HeaderValue::try_from(format!("localhost:{}", sock.port())),
            UpstreamAddr::Unix(_) => HeaderValue::try_from("localhost"),
        }
        .expect("`localhost[:port]` is a valid header value");
        let slots = (max_connections > 0).then(|| {
            std::sync::Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)))
        });
        Upstream {
            pool: Pool::new(limits),
            addr: std::sync::Arc::new(addr),
            fallback_host,
            slots,
            #[cfg(test)]
            resent: Default::default(),
        }
    }

    /// The `Host` sent to the app for a request that had none:
    /// `localhost:<port>`, or `localhost` for a Unix socket.
    pub fn fallback_host(&self) -> &HeaderValue {
        &self.fallback_host
    }

    /// The URI the upstream request is sent with: the client's path and
    /// query, byte for byte, in origin form (`/path?query`), which is what
    /// hyper writes on the request line.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        match path_and_query {
            Some(path) if path.as_str() != "/" => {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(path.clone());
                Uri::from_parts(parts).expect("a path and query alone is a valid URI")
            }
            _ => Uri::from_static("/"),
        }
    }

    /// Sends `req` once a slot is free (see the module's comment); the
    /// slot travels with the response's body. The caller bounds the whole
    /// wait, slot included, by `HTTP_WRITE_TIMEOUT`.
    pub async fn send(&self, req: Request<RequestBody>) -> Result<Response<AppBody>, SendError> {
        let slot = match &self.slots {
            None => None,
            Some(slots) => Some(match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    let _waiting = Waiting::start();
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed")
                }
            }),
        };
        let (response, conn) = self.exchange(req).await?;
        let conn = conn.map(|sender| (self.pool.clone(), sender));
        Ok(response.map(|body| AppBody::new(body, slot, conn)))
    }

    /// One request on a pooled connection, or on a new one when none is
    /// idle. A pooled connection can turn out closed after it was taken
    /// (the app closed it as we picked it): hyper then hands the request
    /// back unsent, and it goes on the next connection. On a new
    /// connection that failure is the app's answer.
    ///
    /// The connection is back in the pool when hyper is already ready for
    /// the next request (the response was read whole); else it is returned
    /// for the body to put back as it ends.
    async fn exchange(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Sender>), SendError> {
        loop {
            let (mut sender, reused) = match self.pool.take() {
                Taken::Ready(sender) => (sender, true),
                // A connection whose response just ended is usually
                // microseconds from ready (its task is finishing on another
                // thread): far less than a new connection costs the app.
                Taken::Settling(mut sender) => {
                    match tokio::time::timeout(SETTLE_WAIT, sender.ready()).await {
                        Ok(Ok(())) => (sender, true),
                        // Closed: look again.
                        Ok(Err(_)) => continue,
                        // Still writing a request body the app answered
                        // before reading: leave it to finish.
                        Err(_) => {
                            self.pool.put(sender);
                            (self.open().await?, false)
                        }
                    }
                }
                Taken::Empty => (self.open().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    // After 101 the connection belongs to the tunnel.
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return Ok((response, None));
                    }
                    // Read whole already: back now, for any request.
                    if sender.is_ready() {
                        self.pool.put(sender);
                        return Ok((response, None));
                    }
                    return Ok((response, Some(sender)));
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => {
                        #[cfg(test)]
                        self.resent
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        req = unsent;
                    }
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
    }

    /// A new connection to the app, its hyper task spawned. The request
    /// can be sent at once: hyper queues the first one until its task runs.
    async fn open(&self) -> Result<Sender, SendError> {
        let stream = connect(&self.addr).await.map_err(SendError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            // Upgrades: a 101 hands the socket to the tunnel.
            if let Err(err) = connection.with_upgrades().await {
                if log::enabled(log::Level::Debug) {
                    log::debug(
                        "Upstream connection failed",
                        &[("error", err.to_string().into())],
                    );
                }
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    #[test]
    fn upstream_parses_every_accepted_form() {
        let tcp = |s: &str| UpstreamAddr::Tcp(s.parse().unwrap());
        let unix = |s: &str| UpstreamAddr::Unix(s.into());
        let cases = [
            ("127.0.0.1:3000", tcp("127.0.0.1:3000")),
            ("tcp://127.0.0.1:3000", tcp("127.0.0.1:3000")),
            ("[::1]:3000", tcp("[::1]:3000")),
            ("tcp://[::1]:3000", tcp("[::1]:3000")),
            ("[fe80::1%2]:3000", tcp("[fe80::1%2]:3000")),
            ("0.0.0.0:0", tcp("0.0.0.0:0")),
            ("unix:/app/tmp/puma.sock", unix("/app/tmp/puma.sock")),
            ("unix:///app/tmp/puma.sock", unix("/app/tmp/puma.sock")),
            // Relative paths resolve against the cwd, as Puma's binds do.
            ("unix:tmp/puma.sock", unix("tmp/puma.sock")),
            ("unix://tmp/puma.sock", unix("tmp/puma.sock")),
            // Only one `//` is the scheme's: the rest stays an absolute path.
            ("unix:////app/puma.sock", unix("//app/puma.sock")),
            ("unix:/", unix("/")),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<UpstreamAddr>(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn upstream_refuses_anything_else_naming_value_and_forms() {
        let not_an_address = [
            "",
            "3000",
            ":3000",
            "localhost:3000",
            "tcp://localhost:3000",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "::1:3000",
            "[::1]",
            " 127.0.0.1:3000",
            "127.0.0.1:3000/",
            "http://127.0.0.1:3000",
            "tcp:127.0.0.1:3000",
            "unix",
            "UNIX:/tmp/puma.sock",
            "/tmp/puma.sock",
        ];
        for input in not_an_address {
            let err = input.parse::<UpstreamAddr>().unwrap_err();
            assert_eq!(
                err,
                UpstreamAddrError::NotAnAddress(input.into()),
                "{input:?}"
            );
            let message = err.to_string();
            assert!(message.contains(&format!("{input:?}")), "{message}");
            for form in ["unix:/path", "unix:///path", "IP:PORT", "[IPv6]:PORT"] {
                assert!(message.contains(form), "{message} lacks {form}");
            }
        }
        for input in ["unix:", "unix://"] {
            let err = input.parse::<UpstreamAddr>().unwrap_err();
            assert_eq!(err, UpstreamAddrError::EmptyUnixPath(input.into()));
            let message = err.to_string();
            assert!(message.contains(&format!("{input:?}")), "{message}");
            assert!(message.contains("path is empty"), "{message}");
            assert!(message.contains("\"unix:/path/to.sock\""), "{message}");
        }
    }

    #[test]
    fn upstream_display_parses_back() {
        for input in ["127.0.0.1:3000", "[::1]:3000", "unix:/app/tmp/puma.sock"] {
            let addr: UpstreamAddr = input.parse().unwrap();
            assert_eq!(addr.to_string(), input);
            assert_eq!(addr.to_string().parse::<UpstreamAddr>(), Ok(addr));
        }
    }

    /// After a burst that needed 64 connections at once (a busy moment in
    /// front of a few Puma threads), the surplus is closed as responses end
    /// and `POOL_MAX_IDLE` stay open for reuse: not all 64.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_keeps_at_most_its_cap_of_idle_connections() {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;

        const BURST: usize = 64;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Connections the app has open (and the most it had at once), and
        // a barrier that holds every request until all BURST have arrived,
        // so each took a connection.
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let all_arrived = Arc::new(tokio::sync::Barrier::new(BURST));
        let (app_open, app_peak) = (open.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (open, all_arrived) = (app_open.clone(), all_arrived.clone());
                app_peak.fetch_max(open.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let all_arrived = all_arrived.clone();
                        async move {
                            all_arrived.wait().await;
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });

        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 0);
        let requests = (0..BURST).map(|_| {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let req = Request::builder()
                    .uri(upstream.uri_for(None))
                    .header(http::header::HOST, "app")
                    .body(RequestBody::default())
                    .unwrap();
                let response = upstream.send(req).await.unwrap();
                // Read to the end: only then does the connection go back.
                response.into_body().collect().await.unwrap();
            })
        });
        for request in requests.collect::<Vec<_>>() {
            request.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), BURST, "one connection each");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open.load(Ordering::SeqCst) > POOL_MAX_IDLE && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(open.load(Ordering::SeqCst), POOL_MAX_IDLE);
        assert_eq!(upstream.pool.idle_len(), POOL_MAX_IDLE);
    }

    /// An app that answers after `hold`, counting the requests it is
    /// serving at once (and the most it had): `/endless` sends its head and
    /// one chunk, then nothing.
    async fn counting_app(hold: Duration) -> (SocketAddr, std::sync::Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let active = std::sync::Arc::new(AtomicUsize::new(0));
        let peak = std::sync::Arc::new(AtomicUsize::new(0));
        let app_peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (active, peak) = (active.clone(), app_peak.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (active, peak) = (active.clone(), peak.clone());
                        async move {
                            peak.fetch_max(active.fetch_add(1, SeqCst) + 1, SeqCst);
                            tokio::time::sleep(hold).await;
                            active.fetch_sub(1, SeqCst);
                            let body = if req.uri().path() == "/endless" {
                                Endless(false).boxed()
                            } else {
                                http_body_util::Full::new(Bytes::from_static(b"ok"))
                                    .map_err(|never| match never {})
                                    .boxed()
                            };
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, peak)
    }

    /// One chunk, then never another.
    struct Endless(bool);

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
            }
        }
    }

    fn get(upstream: &Upstream, path: &str) -> Request<RequestBody> {
        Request::builder()
            .uri(upstream.uri_for(Some(&PathAndQuery::try_from(path).unwrap())))
            .header(http::header::HOST, "app")
            .body(RequestBody::default())
            .unwrap()
    }

    /// `UPSTREAM_MAX_CONNECTIONS=2`: twelve requests at once reach the app
    /// two at a time, and every one is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_requests_reach_the_app_at_once_than_the_cap() {
        let (addr, peak) = counting_app(Duration::from_millis(20)).await;
        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 2);
        let requests = (0..12).map(|_| {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let response = upstream.send(get(&upstream, "/")).await.unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        });
        for request in requests.collect::<Vec<_>>() {
            assert_eq!(request.await.unwrap(), "ok");
        }
        assert_eq!(peak.load(SeqCst), 2);

        // Without the cap they all go at once.
        let (addr, peak) = counting_app(Duration::from_millis(200)).await;
        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 0);
        let requests = (0..12).map(|_| {
            let upstream = upstream.clone();
            tokio::spawn(async move { upstream.send(get(&upstream, "/")).await.unwrap() })
        });
        for request in requests.collect::<Vec<_>>() {
            request.await.unwrap();
        }
        assert_eq!(peak.load(SeqCst), 12);
    }

    /// A response holds its slot while its body is being sent, and gives it
    /// back once the body has ended or the response was dropped unread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_is_held_until_the_body_ends_or_is_dropped() {
        let (addr, _) = counting_app(Duration::ZERO).await;
        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 1);
        let limit = Duration::from_secs(5);

        let mut endless = upstream.send(get(&upstream, "/endless")).await.unwrap();
        let first = endless.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        let waiting = tokio::time::timeout(
            Duration::from_millis(300),
            upstream.send(get(&upstream, "/")),
        );
        assert!(
            waiting.await.is_err(),
            "sent while the only slot was in use"
        );
        drop(endless);
        let next = tokio::time::timeout(limit, upstream.send(get(&upstream, "/")));
        let mut done = next
            .await
            .expect("the dropped body's slot is free")
            .unwrap();
        // Read to its end but kept: the slot is already free.
        while done.body_mut().frame().await.is_some() {}
        let after = tokio::time::timeout(limit, upstream.send(get(&upstream, "/")));
        after.await.expect("the ended body's slot is free").unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fallback_host_names_the_app_as_thruster_does() {
        let tcp = Upstream::new(UpstreamAddr::Tcp("127.0.0.1:3001".parse().unwrap()), 0);
        assert_eq!(tcp.fallback_host(), "localhost:3001");
        let unix = Upstream::new(UpstreamAddr::Unix("/tmp/puma.sock".into()), 0);
        assert_eq!(unix.fallback_host(), "localhost");
    }

    /// An app on a plain socket that answers every request `ok` with
    /// keep-alive and counts the connections it accepted and has open. The
    /// returned sender closes, from the app's side, every connection open at
    /// that moment (as Puma does with idle keep-alive connections).
    struct ClosingApp {
        addr: SocketAddr,
        accepted: std::sync::Arc<AtomicUsize>,
        open: std::sync::Arc<AtomicUsize>,
        close_all: tokio::sync::watch::Sender<u32>,
    }

    async fn closing_app() -> ClosingApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let open = std::sync::Arc::new(AtomicUsize::new(0));
        let (close_all, closing) = tokio::sync::watch::channel(0u32);
        let (app_accepted, app_open) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                app_accepted.fetch_add(1, SeqCst);
                app_open.fetch_add(1, SeqCst);
                let (open, mut closing) = (app_open.clone(), closing.clone());
                closing.mark_unchanged();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = closing.changed() => {}
                    }
                    open.fetch_sub(1, SeqCst);
                });
            }
        });
        ClosingApp {
            addr,
            accepted,
            open,
            close_all,
        }
    }

    async fn get_ok(upstream: &Upstream) {
        let response = upstream.send(get(upstream, "/")).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }

    /// Requests one after another share one connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_requests_reuse_one_connection() {
        let app = closing_app().await;
        let upstream = Upstream::new(UpstreamAddr::Tcp(app.addr), 0);
        for _ in 0..20 {
            get_ok(&upstream).await;
        }
        assert_eq!(app.accepted.load(SeqCst), 1);
        assert_eq!(upstream.pool.idle_len(), 1);
    }

    /// The app closed the idle connection (its keep-alive timeout): the
    /// next request goes on a new one and succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_the_app_closed_is_not_used_again() {
        let app = closing_app().await;
        let upstream = Upstream::new(UpstreamAddr::Tcp(app.addr), 0);
        for round in 1..=3 {
            get_ok(&upstream).await;
            assert_eq!(app.accepted.load(SeqCst), round);
            app.close_all.send_modify(|n| *n += 1);
            while app.open.load(SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Time for hyper to read the end of the connection.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The race a keep-alive pool has with the app: the app closes an idle
    /// connection just as a request takes it. Hyper hands the request back
    /// unsent, and it goes on a new connection instead of failing. The
    /// runtime thread is blocked while the app closes, so the pool still
    /// sees the connection ready when the request takes it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_on_a_connection_closed_under_it_is_sent_on_a_new_one() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel::<()>();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let app_accepted = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                app_accepted.fetch_add(1, SeqCst);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).unwrap() == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
                // Keep-alive was promised; close when told to.
                if close_rx.recv().is_err() {
                    return;
                }
                drop(stream);
                closed_tx.send(()).unwrap();
            }
        });
        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 0);
        get_ok(&upstream).await;
        // Give hyper's task its turn to mark the connection ready.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(upstream.pool.idle_len(), 1);

        close_tx.send(()).unwrap();
        closed_rx.recv().unwrap();
        // Blocking, so the close has arrived but no task saw it; then a
        // yield, after which the runtime polls its I/O driver (waking
        // hyper's task for the close) and resumes this task first.
        std::thread::sleep(Duration::from_millis(50));
        tokio::task::yield_now().await;
        let sent = upstream.send(get(&upstream, "/"));
        let response = tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("answered")
            .expect("sent again on a new connection");
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(accepted.load(SeqCst), 2);
        assert_eq!(
            upstream.resent.load(SeqCst),
            1,
            "taken while ready, handed back"
        );
        close_tx.send(()).unwrap();
    }

    /// An upstream whose pool keeps idle connections for `timeout`.
    fn expiring_after(addr: SocketAddr, timeout: Duration) -> Upstream {
        let limits = PoolLimits {
            max_idle: POOL_MAX_IDLE,
            idle_timeout: timeout,
        };
        Upstream::with_pool_limits(UpstreamAddr::Tcp(addr), 0, limits)
    }

    /// An idle connection is closed after the idle timeout, and the next
    /// request opens a new one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let app = closing_app().await;
        let upstream = expiring_after(app.addr, Duration::from_millis(200));
        get_ok(&upstream).await;
        get_ok(&upstream).await;
        assert_eq!(app.accepted.load(SeqCst), 1);
        assert_eq!(app.open.load(SeqCst), 1);
        // Swept at most 1.5 timeouts after its last use.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while app.open.load(SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(app.open.load(SeqCst), 0, "closed by the sweep");
        assert_eq!(upstream.pool.idle_len(), 0);
        get_ok(&upstream).await;
        assert_eq!(app.accepted.load(SeqCst), 2);
    }

    /// A connection whose idle time passed is not used even before the
    /// sweep closes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_connection_is_not_taken() {
        let app = closing_app().await;
        // The sweep runs every 5 s: after the test.
        let upstream = expiring_after(app.addr, Duration::from_secs(10));
        get_ok(&upstream).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            upstream.pool.take_after(Duration::from_secs(11)),
            Taken::Empty
        ));
        assert_eq!(upstream.pool.idle_len(), 0, "the expired one was dropped");
    }

    /// Requests reach an app on a Unix socket, over one kept connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unix_socket_connections_are_pooled_too() {
        let dir = crate::sys::test_support::TempDir::new("upstream");
        let path = dir.0.join("app.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let app_accepted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                app_accepted.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let upstream = Upstream::new(UpstreamAddr::Unix(path.clone()), 0);
        for _ in 0..5 {
            get_ok(&upstream).await;
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    /// A refused connection is a connect error (retried by the forwarder),
    /// not a failed request.
    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 0);
        let Err(err) = upstream.send(get(&upstream, "/")).await else {
            panic!("answered on a refused port");
        };
        assert!(err.is_connect(), "{err:?}");
    }

    #[test]
    fn the_request_line_carries_the_path_and_query_alone() {
        let upstream = Upstream::new(UpstreamAddr::Tcp("127.0.0.1:3001".parse().unwrap()), 0);
        assert_eq!(upstream.uri_for(None), "/");
        let path = PathAndQuery::from_static("/a/b?c=d&e");
        assert_eq!(upstream.uri_for(Some(&path)).to_string(), "/a/b?c=d&e");
        assert_eq!(upstream.uri_for(Some(&path)).authority(), None);
    }

    /// A 101 hands the connection to the caller (a WebSocket tunnel): it is
    /// not pooled, and the next request gets a connection of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgraded_connection_is_the_callers_and_not_pooled() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let app_accepted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                app_accepted.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    // Echoes what comes through the upgraded connection.
                    let service =
                        hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                            let mut response =
                                Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")));
                            if req.headers().contains_key(http::header::UPGRADE) {
                                let on_upgrade = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    let mut io = TokioIo::new(on_upgrade.await.unwrap());
                                    let mut buf = [0u8; 4];
                                    io.read_exact(&mut buf).await.unwrap();
                                    io.write_all(&buf).await.unwrap();
                                });
                                *response.body_mut() = http_body_util::Full::new(Bytes::new());
                                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                                response.headers_mut().insert(
                                    http::header::CONNECTION,
                                    HeaderValue::from_static("upgrade"),
                                );
                                response.headers_mut().insert(
                                    http::header::UPGRADE,
                                    HeaderValue::from_static("echo"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        let upstream = Upstream::new(UpstreamAddr::Tcp(addr), 1);
        let mut req = get(&upstream, "/ws");
        req.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        req.headers_mut()
            .insert(http::header::UPGRADE, HeaderValue::from_static("echo"));
        let mut response = upstream.send(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
        let mut io = TokioIo::new(upgraded);
        io.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        io.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
        assert_eq!(upstream.pool.idle_len(), 0);
        // The 101's empty body freed the one slot.
        drop(response);
        get_ok(&upstream).await;
        assert_eq!(accepted.load(SeqCst), 2);
    }
}
