//! Shared by the TLS tests: settings, a hyper echo upstream, a proxy in TLS
//! mode on loopback, and real command-line clients (curl, openssl).
#![allow(dead_code)]

pub mod pebble;
mod ports;

pub use ports::free_port;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use thruster_core::config::{prefixed_lookup, Config, RawSetting, SettingSource};
use thruster_core::upstream::UpstreamAddr;
use thruster_core::{Server, ServerOptions};

pub struct Pairs(pub Vec<(String, String)>);
impl SettingSource for Pairs {
    fn get(&self, name: &str) -> Option<RawSetting> {
        prefixed_lookup(name, |k| {
            self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }
}

/// A config from `pairs`. Without a `STORAGE_PATH` among them the proxy
/// gets one of its own under the temp dir (not created unless something is
/// stored there): the disk cache tier lives under it and is on by default,
/// so no test may see another's entries, nor leave any in the checkout.
pub fn config(pairs: &[(&str, &str)]) -> Config {
    let mut pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !pairs.iter().any(|(k, _)| k.ends_with("STORAGE_PATH")) {
        pairs.push(("STORAGE_PATH".into(), own_storage_path()));
    }
    Config::from_source(&Pairs(pairs)).expect("valid test config")
}

/// A path no other proxy of this test run uses.
pub fn own_storage_path() -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir()
        .join(format!("thruster-test-storage-{}-{n}", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("thruster-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An upstream answering with the request line and headers it received.
pub fn start_echo_upstream(rt: &tokio::runtime::Runtime) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let mut head = format!("{} {}\n", req.method(), req.uri());
                    for (name, value) in req.headers() {
                        head.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
                    }
                    let mut response = Response::new(Full::new(Bytes::from(head)));
                    // `/echo-request-id`: answers with the request's
                    // X-Request-Id, as Rails does.
                    if req.uri().path() == "/echo-request-id" {
                        if let Some(id) = req.headers().get("x-request-id") {
                            response.headers_mut().insert("x-request-id", id.clone());
                        }
                    }
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

pub fn start_server(config: Config, upstream: SocketAddr, http: u16, https: u16) -> Server {
    Server::start(
        config,
        ServerOptions {
            upstream: UpstreamAddr::Tcp(upstream),
            http_binds: vec![SocketAddr::from(([127, 0, 0, 1], http))],
            https_binds: vec![SocketAddr::from(([127, 0, 0, 1], https))],
            inherited_fds: Vec::new(),
            sendfile_token: "test-token".into(),
            admin_token: "a".repeat(64),
            worker_threads: 2,
        },
    )
    .expect("server starts")
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// `curl` over TLS to `name:port` pinned to 127.0.0.1, verifying with
/// `ca`. Returns (status line "<http_version> <code>", body, stderr).
pub fn curl(
    name: &str,
    port: u16,
    path: &str,
    ca: &Path,
    extra: &[&str],
) -> (String, String, String) {
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .args(extra)
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("https://{name}:{port}{path}")));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (
        status.to_string(),
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The serial number of the certificate served for `sni`, via openssl.
pub fn served_serial(port: u16, sni: &str) -> Option<String> {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {sni} </dev/null 2>/dev/null | openssl x509 -noout -serial 2>/dev/null"
    )));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.strip_prefix("serial=").map(str::to_string)
}

/// Polls `f` every 100 ms until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One raw HTTP/1.1 request on a fresh connection; returns the response
/// head and body as text.
pub fn raw_http(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out
}

pub struct ServerOptionsFor;
impl ServerOptionsFor {
    pub fn tcp(upstream: SocketAddr) -> ServerOptions {
        ServerOptions {
            upstream: UpstreamAddr::Tcp(upstream),
            http_binds: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            https_binds: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            inherited_fds: Vec::new(),
            sendfile_token: "test-token".into(),
            admin_token: "a".repeat(64),
            worker_threads: 1,
        }
    }
}
