//! End to end through `Server`: a real hyper upstream on loopback, raw TCP
//! clients, the proxy in between.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use thruster_core::config::{prefixed_lookup, Config, RawSetting, SettingSource};
use thruster_core::upstream::UpstreamAddr;
use thruster_core::{Server, ServerOptions};

struct Pairs(Vec<(&'static str, String)>);
impl SettingSource for Pairs {
    fn get(&self, name: &str) -> Option<RawSetting> {
        prefixed_lookup(name, |k| {
            self.0.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        })
    }
}

/// An upstream that echoes the request head it received as the body, or
/// sleeps first on `/slow`.
fn start_upstream(rt: &tokio::runtime::Runtime) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_echo(stream));
        }
    });
    addr
}

fn start_unix_upstream(rt: &tokio::runtime::Runtime, path: &std::path::Path) {
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(path).unwrap()
    };
    rt.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_echo(stream));
        }
    });
}

async fn serve_echo<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let mut head = format!("{} {}\n", req.method(), req.uri());
        for (name, value) in req.headers() {
            head.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
        }
        Ok::<_, Infallible>(
            Response::builder()
                .header("connection", "x-hop")
                .header("x-hop", "should not reach the client")
                .header("keep-alive", "timeout=5")
                .body(Full::new(Bytes::from(head)))
                .unwrap(),
        )
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn start_proxy(upstream: SocketAddr, settings: Vec<(&'static str, String)>) -> Proxy {
    start_proxy_to(UpstreamAddr::Tcp(upstream), settings)
}

/// A proxy with a STORAGE_PATH of its own (the disk cache tier lives under
/// it and is on by default: no test may see another's entries), removed
/// when the proxy stops or the test ends.
struct Proxy {
    server: Option<Server>,
    storage: std::path::PathBuf,
}

impl Proxy {
    fn http_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").http_addr()
    }

    fn stop(mut self, drain: Duration) {
        if let Some(server) = self.server.take() {
            server.stop(drain);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}

fn start_proxy_to(upstream: UpstreamAddr, mut settings: Vec<(&'static str, String)>) -> Proxy {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let storage =
        std::env::temp_dir().join(format!("thruster-e2e-storage-{}-{n}", std::process::id()));
    if !settings.iter().any(|(k, _)| *k == "STORAGE_PATH") {
        settings.push(("STORAGE_PATH", storage.to_string_lossy().into_owned()));
    }
    let config = Config::from_source(&Pairs(settings)).unwrap();
    let server = Server::start(
        config,
        ServerOptions {
            upstream,
            http_binds: vec!["127.0.0.1:0".parse().unwrap()],
            https_binds: Vec::new(),
            inherited_fds: Vec::new(),
            sendfile_token: "test-token".into(),
            admin_token: "a".repeat(64),
            worker_threads: 1,
        },
    )
    .unwrap();
    Proxy {
        server: Some(server),
        storage,
    }
}

fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

fn unused_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn forwards_with_rewritten_headers_and_strips_hop_by_hop_both_ways() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = start_upstream(&rt);
    let proxy = start_proxy(upstream, vec![("LOG_REQUESTS", "false".into())]);
    let response = exchange(
        proxy.http_addr(),
        "GET /a/b?c=d HTTP/1.1\r\nHost: app.test\r\nConnection: close, x-secret\r\nx-secret: 1\r\n\
         Proxy-Authorization: Basic eA==\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    );
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head_lower = head.to_ascii_lowercase();
    assert!(!head_lower.contains("x-hop"), "{head}");
    assert!(!head_lower.contains("keep-alive: timeout"), "{head}");
    assert!(body.starts_with("GET /a/b?c=d\n"), "{body}");
    assert!(body.contains("host: app.test\n"), "{body}");
    assert!(
        body.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(body.contains("x-request-start: t="), "{body}");
    assert!(!body.contains("x-secret"), "{body}");
    assert!(!body.contains("proxy-authorization"), "{body}");
    proxy.stop(Duration::from_secs(1));
}

#[test]
fn unreachable_app_gives_502_with_the_page() {
    let dir = std::env::temp_dir().join(format!("thruster-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("502.html");
    std::fs::write(&page, "<p>be right back</p>").unwrap();
    let proxy = start_proxy(
        unused_port(),
        vec![
            ("LOG_REQUESTS", "false".into()),
            ("BAD_GATEWAY_PAGE", page.display().to_string()),
            ("UPSTREAM_RETRY_TIMEOUT", "0".into()),
        ],
    );
    let response = exchange(
        proxy.http_addr(),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(response.ends_with("<p>be right back</p>"), "{response}");
    proxy.stop(Duration::from_secs(1));
}

#[test]
fn refused_connections_are_retried_until_the_app_listens_then_502() {
    // The app comes up 400 ms after the request arrived: the request waits
    // for it instead of failing.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = unused_port();
    let proxy = start_proxy(app, vec![("LOG_REQUESTS", "false".into())]);
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        let listener = rt.block_on(tokio::net::TcpListener::bind(app)).unwrap();
        rt.spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_echo(stream));
            }
        });
        rt
    });
    let response = exchange(
        proxy.http_addr(),
        "GET /late HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let _rt = late.join().unwrap();
    proxy.stop(Duration::from_secs(1));

    // An app that never comes up: 502 once the window has passed.
    let proxy = start_proxy(
        unused_port(),
        vec![
            ("LOG_REQUESTS", "false".into()),
            ("UPSTREAM_RETRY_TIMEOUT", "1".into()),
        ],
    );
    let started = std::time::Instant::now();
    let response = exchange(
        proxy.http_addr(),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    proxy.stop(Duration::from_secs(1));
}

#[test]
fn app_slower_than_write_timeout_gives_504() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = start_upstream(&rt);
    let proxy = start_proxy(
        upstream,
        vec![
            ("LOG_REQUESTS", "false".into()),
            ("HTTP_WRITE_TIMEOUT", "1".into()),
        ],
    );
    let response = exchange(
        proxy.http_addr(),
        "GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    proxy.stop(Duration::from_secs(1));
}

#[test]
fn stop_frees_the_port() {
    let proxy = start_proxy(unused_port(), vec![]);
    let addr = proxy.http_addr();
    proxy.stop(Duration::from_secs(1));
    assert!(TcpStream::connect(addr).is_err());
    std::net::TcpListener::bind(addr).expect("port can be bound again");
}

#[test]
fn forwards_to_an_app_on_a_unix_socket() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("thruster-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("app.sock");
    let _ = std::fs::remove_file(&socket);
    start_unix_upstream(&rt, &socket);
    let proxy = start_proxy_to(
        UpstreamAddr::Unix(socket.clone()),
        vec![("LOG_REQUESTS", "false".into())],
    );
    for _ in 0..3 {
        let response = exchange(
            proxy.http_addr(),
            "GET /over-unix HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        );
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("GET /over-unix\n"), "{response}");
        assert!(response.contains("host: app.test\n"), "{response}");
    }
    proxy.stop(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An app that announces more than it sends, then hangs up: `/small` (read
/// whole before it is passed on), `/large` (spooled), and `/chunked`
/// (no length: the cut shows as a missing last chunk). All cacheable.
fn start_truncating_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let cc = "Cache-Control: public, max-age=60\r\n";
                let (response_head, body_len) = if head.starts_with("GET /small") {
                    (
                        format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: 1000\r\n\r\n"),
                        500,
                    )
                } else if head.starts_with("GET /large") {
                    let announced = 4 << 20;
                    (
                        format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: {announced}\r\n\r\n"),
                        1 << 20,
                    )
                } else {
                    (
                        format!(
                            "HTTP/1.1 200 OK\r\n{cc}Transfer-Encoding: chunked\r\n\r\n1000\r\n{}\r\n",
                            "c".repeat(0x1000)
                        ),
                        0,
                    )
                };
                let _ = stream.write_all(response_head.as_bytes());
                let _ = stream.write_all(&vec![b'x'; body_len]);
                // Closing without the rest: the body is cut short.
            });
        }
    });
    addr
}

/// The raw bytes a client gets until the proxy closes or resets.
fn read_until_closed(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "{path}: no close within 10 s ({e}); got {} bytes",
                out.len()
            ),
        }
    }
    out
}

#[test]
fn a_truncated_app_body_is_never_passed_on_as_complete_nor_cached() {
    let upstream = start_truncating_upstream();
    let proxy = start_proxy(upstream, vec![("LOG_REQUESTS", "false".into())]);
    // A small body is read whole before anything is sent: its failure is
    // still a clean 502.
    for attempt in 0..2 {
        let got = read_until_closed(proxy.http_addr(), "/small");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 502"), "#{attempt}: {text:.300}");
    }
    // A large one is under way when it fails: the client gets what came,
    // then the connection closes short of the announced length.
    for (path, announced) in [("/large", 4usize << 20)] {
        for attempt in 0..2 {
            let got = read_until_closed(proxy.http_addr(), path);
            let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head = String::from_utf8_lossy(&got[..split]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
            assert!(
                head.contains(&format!("content-length: {announced}")),
                "{path}: {head}"
            );
            assert!(
                got.len() - split < announced,
                "{path} #{attempt}: {} of {announced} bytes, then the connection closed",
                got.len() - split
            );
            assert!(!head.contains("x-cache: hit"), "{path} #{attempt}: {head}");
        }
    }
    for attempt in 0..2 {
        let got = read_until_closed(proxy.http_addr(), "/chunked");
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.starts_with("HTTP/1.1 200"), "{text:.200}");
        assert!(text.contains("cccc"), "the bytes that came are passed on");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "#{attempt}: a cut chunked body must not end with the last chunk"
        );
        assert!(!text.to_ascii_lowercase().contains("x-cache: hit"));
    }
    proxy.stop(Duration::from_secs(1));
}

/// An app whose `/stream` sends its head and a first chunk, then the rest
/// once `release` is sent; anything else is answered `ok` at once. Counts
/// the requests for anything but `/stream` it received.
fn start_streaming_upstream() -> (
    SocketAddr,
    std::sync::mpsc::Sender<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(released));
    let others = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = others.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (released, counted) = (released.clone(), counted.clone());
            std::thread::spawn(move || loop {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                if head.starts_with(b"GET /stream ") {
                    let first =
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
                    let _ = stream.write_all(first.as_bytes());
                    let _ = released
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(10));
                    let _ = stream.write_all(b"6\r\n world\r\n0\r\n\r\n");
                } else {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
    });
    (addr, release, others)
}

/// `UPSTREAM_MAX_CONNECTIONS=1`: while a streamed response holds the only
/// slot, another request waits in the proxy and never reaches the app; it
/// gets `504` once `HTTP_WRITE_TIMEOUT` has passed. The streamed response
/// ends whole, and its slot is free again afterwards.
#[test]
fn a_request_waiting_for_an_upstream_slot_past_the_write_timeout_gets_504() {
    let (upstream, release, others) = start_streaming_upstream();
    let proxy = start_proxy(
        upstream,
        vec![
            ("LOG_REQUESTS", "false".into()),
            ("CACHE_SIZE", "0".into()),
            ("HTTP_WRITE_TIMEOUT", "1".into()),
            ("UPSTREAM_MAX_CONNECTIONS", "1".into()),
        ],
    );
    let mut streaming = TcpStream::connect(proxy.http_addr()).unwrap();
    streaming
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    streaming
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 1024];
    let n = streaming.read(&mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));

    let started = std::time::Instant::now();
    let waited = exchange(
        proxy.http_addr(),
        "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(waited.starts_with("HTTP/1.1 504"), "{waited}");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(others.load(std::sync::atomic::Ordering::SeqCst), 0);

    release.send(()).unwrap();
    let mut rest = Vec::new();
    streaming.read_to_end(&mut rest).unwrap();
    let whole = String::from_utf8_lossy(&[&first[..n], &rest[..]].concat()).to_string();
    let body = whole.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body, "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "{whole}");
    let after = exchange(
        proxy.http_addr(),
        "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert!(after.ends_with("ok"), "{after}");
    assert_eq!(others.load(std::sync::atomic::Ordering::SeqCst), 1);
    proxy.stop(Duration::from_secs(1));
}
