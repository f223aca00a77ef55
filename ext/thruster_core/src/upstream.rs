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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::http::RequestBody;
use crate::metrics;
use crate::sys::{self, Registration};

/// Idle upstream connections are dropped after this long (below Puma's 20 s
/// persistent timeout, so the app never closes one we are about to reuse).
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

/// Connects every request to the one app address, whatever the URI says.
#[derive(Clone)]
pub struct AppConnector {
    addr: std::sync::Arc<UpstreamAddr>,
}

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<AppStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.addr.clone();
        Box::pin(async move {
            let connect = async {
                match &*addr {
                    UpstreamAddr::Tcp(sock) => {
                        // Registered as it is created, before the connect
                        // wait, so no fork in between keeps it.
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
                Ok(result) => result.map(TokioIo::new),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect to the app timed out",
                )),
            }
        })
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

impl Connection for AppStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

crate::sys::enum_stream_io!(AppStream { io }: AppIo { Tcp, Unix });

#[derive(Clone)]
pub struct Upstream {
    client: Client<AppConnector, RequestBody>,
    authority: Authority,
    addr: std::sync::Arc<UpstreamAddr>,
    fallback_host: HeaderValue,
    /// `UPSTREAM_MAX_CONNECTIONS`'s slots; `None`: no cap. Tokio's
    /// semaphore is fair, so requests are sent in the order they came.
    slots: Option<std::sync::Arc<Semaphore>>,
}

/// The app's response body. It holds the request's slot (when
/// `UPSTREAM_MAX_CONNECTIONS` is set) until the body has ended, failed or
/// been dropped: until then the app's thread may still be writing it.
pub struct AppBody {
    body: Incoming,
    slot: Option<OwnedSemaphorePermit>,
}

impl AppBody {
    fn new(body: Incoming, slot: Option<OwnedSemaphorePermit>) -> AppBody {
        // A body already complete (204, HEAD, `Content-Length: 0`) may
        // never be polled: give its slot back now.
        let slot = slot.filter(|_| !body.is_end_stream());
        AppBody { body, slot }
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
        if !matches!(frame, Some(Ok(_))) || this.body.is_end_stream() {
            this.slot = None;
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
        // The URI authority only keys the pool; the connector ignores it.
        let authority = match &addr {
            UpstreamAddr::Tcp(sock) => Authority::try_from(sock.to_string()),
            UpstreamAddr::Unix(_) => Authority::try_from("localhost"),
        }
        .expect("a socket address or `localhost` is a valid authority");
        // RFC 9112 §3.2: every HTTP/1.1 request carries Host. For clients
        // that sent none (HTTP/1.0), name the app the way Thruster does.
        let fallback_host = match &addr {
            UpstreamAddr::Tcp(sock) => HeaderValue::try_from(format!("localhost:{}", sock.port())),
            UpstreamAddr::Unix(_) => HeaderValue::try_from("localhost"),
        }
        .expect("`localhost[:port]` is a valid header value");
        let addr = std::sync::Arc::new(addr);
        let connector = AppConnector { addr: addr.clone() };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // Keep the client's Host header (Thruster preserves it); we set it
            // ourselves when the client sent none.
            .set_host(false)
            .build(connector);
        let slots = (max_connections > 0).then(|| {
            std::sync::Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)))
        });
        Upstream {
            client,
            authority,
            addr,
            fallback_host,
            slots,
        }
    }

    /// The `Host` sent to the app for a request that had none:
    /// `localhost:<port>`, or `localhost` for a Unix socket.
    pub fn fallback_host(&self) -> &HeaderValue {
        &self.fallback_host
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

    /// Sends `req` once a slot is free (see the module's comment); the
    /// slot travels with the response's body. The caller bounds the whole
    /// wait, slot included, by `HTTP_WRITE_TIMEOUT`.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<AppBody>, hyper_util::client::legacy::Error> {
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
        let response = self.client.request(req).await?;
        Ok(response.map(|body| AppBody::new(body, slot)))
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
}
