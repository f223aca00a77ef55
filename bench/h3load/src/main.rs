//! h3load: a small HTTP/3 load generator for bench/run, in the spirit of
//! h2load: `-c` QUIC connections, each with `-m` request streams kept busy
//! for `-D` seconds, one request after another per stream. Prints one JSON
//! line: requests answered, failures, req/s, body bytes, latency p50/p99.
//!
//!   h3load --cacert CA.pem [-c 32] [-m 10] [-D 10] [-t 1] [--sni localhost]
//!          [-H "Name: value"]... [--expect "name: value"]... https://IP:PORT/path
//!
//! A response counts as answered when its status is 2xx, every `--expect`
//! header has the value given and its body arrived whole; anything else is
//! a failure (the bench's sanity check reads that).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{HeaderName, HeaderValue, Request, Uri};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("QUIC socket: {0}")]
    Socket(#[from] std::io::Error),
}

struct Args {
    url: Uri,
    addr: SocketAddr,
    sni: String,
    cacert: PathBuf,
    conns: usize,
    streams: usize,
    duration: Duration,
    threads: usize,
    headers: Vec<(HeaderName, HeaderValue)>,
    expect: Vec<(HeaderName, HeaderValue)>,
}

fn header_arg(text: &str) -> Result<(HeaderName, HeaderValue), LoadError> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| LoadError::Usage(format!("header {text:?} is not \"Name: value\"")))?;
    let name = HeaderName::try_from(name.trim().to_ascii_lowercase())
        .map_err(|e| LoadError::Usage(format!("header name {name:?}: {e}")))?;
    let value = HeaderValue::try_from(value.trim())
        .map_err(|e| LoadError::Usage(format!("header value {value:?}: {e}")))?;
    Ok((name, value))
}

fn parse_args() -> Result<Args, LoadError> {
    let mut it = std::env::args().skip(1);
    let (mut url, mut cacert, mut sni) = (None, None, "localhost".to_string());
    let (mut conns, mut streams, mut seconds, mut threads) = (32usize, 10usize, 10u64, 1usize);
    let (mut headers, mut expect) = (Vec::new(), Vec::new());
    let number = |flag: &str, v: Option<String>| -> Result<u64, LoadError> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| LoadError::Usage(format!("{flag} takes a number")))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-c" => conns = number("-c", it.next())? as usize,
            "-m" => streams = number("-m", it.next())? as usize,
            "-D" => seconds = number("-D", it.next())?,
            "-t" => threads = number("-t", it.next())? as usize,
            "-H" => headers.push(header_arg(&it.next().unwrap_or_default())?),
            "--expect" => expect.push(header_arg(&it.next().unwrap_or_default())?),
            "--cacert" => cacert = it.next().map(PathBuf::from),
            "--sni" => sni = it.next().unwrap_or_default(),
            _ if arg.starts_with("https://") => {
                url = Some(
                    arg.parse::<Uri>()
                        .map_err(|e| LoadError::Usage(format!("URL {arg:?}: {e}")))?,
                )
            }
            _ => return Err(LoadError::Usage(format!("unknown argument {arg:?}"))),
        }
    }
    let url = url.ok_or_else(|| LoadError::Usage("an https:// URL is required".into()))?;
    let cacert = cacert.ok_or_else(|| LoadError::Usage("--cacert is required".into()))?;
    let authority = url
        .authority()
        .ok_or_else(|| LoadError::Usage("the URL has no host".into()))?;
    let addr = (authority.host(), authority.port_u16().unwrap_or(443))
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| LoadError::Usage(format!("{authority} does not resolve")))?;
    if conns == 0 || streams == 0 || threads == 0 {
        return Err(LoadError::Usage("-c, -m and -t must be at least 1".into()));
    }
    Ok(Args {
        url,
        addr,
        sni,
        cacert,
        conns,
        streams,
        duration: Duration::from_secs(seconds),
        threads,
        headers,
        expect,
    })
}

fn client_config(args: &Args) -> Result<quinn::ClientConfig, LoadError> {
    let ca_err = |source| LoadError::CaFile {
        path: args.cacert.clone(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.cacert).map_err(ca_err)? {
        roots
            .add(cert.map_err(ca_err)?)
            .map_err(|e| LoadError::Tls(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LoadError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| LoadError::Tls(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// What one request stream did over the run.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    bytes: u64,
    /// Microseconds per answered request.
    latencies: Vec<u32>,
    /// The first failure, for the report.
    error: Option<String>,
}

impl Tally {
    fn fail(&mut self, error: String) {
        self.failed += 1;
        self.error.get_or_insert(error);
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.bytes += other.bytes;
        self.latencies.extend(other.latencies);
        if self.error.is_none() {
            self.error = other.error;
        }
    }
}

type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Longest wait for one response, a failure past it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request, start to end; the body length, or why it failed.
async fn one_request(send: &mut Sender, args: &Args) -> Result<u64, String> {
    let mut req = Request::get(args.url.clone())
        .body(())
        .expect("valid request");
    for (name, value) in &args.headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    let mut stream = send.send_request(req).await.map_err(|e| e.to_string())?;
    stream.finish().await.map_err(|e| e.to_string())?;
    let response = stream.recv_response().await.map_err(|e| e.to_string())?;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        bytes += chunk.remaining() as u64;
    }
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    for (name, value) in &args.expect {
        if response.headers().get(name) != Some(value) {
            return Err(format!(
                "{name}: {:?}, expected {value:?}",
                response.headers().get(name)
            ));
        }
    }
    if let Some(length) = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if length != bytes {
            return Err(format!("body {bytes} bytes of {length}"));
        }
    }
    Ok(bytes)
}

async fn stream_loop(
    mut send: Sender,
    args: Arc<Args>,
    deadline: Instant,
    closed: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let started = Instant::now();
        // A request the server never finishes must not hang the run.
        let result = tokio::time::timeout(REQUEST_TIMEOUT, one_request(&mut send, &args))
            .await
            .unwrap_or_else(|_| Err(format!("no response within {REQUEST_TIMEOUT:?}")));
        match result {
            Ok(bytes) => {
                tally.ok += 1;
                tally.bytes += bytes;
                tally
                    .latencies
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Err(err) => {
                tally.fail(err);
                // A closed connection fails every request at once: stop
                // instead of spinning on it.
                if closed.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
    tally
}

async fn connection(endpoint: quinn::Endpoint, args: Arc<Args>, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let connecting = match endpoint.connect(args.addr, &args.sni) {
        Ok(connecting) => connecting,
        Err(err) => {
            tally.fail(format!("connect: {err}"));
            return tally;
        }
    };
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(err) => {
            tally.fail(format!("handshake: {err}"));
            return tally;
        }
    };
    let (mut driver, send) = match h3::client::new(h3_quinn::Connection::new(conn.clone())).await {
        Ok(pair) => pair,
        Err(err) => {
            tally.fail(format!("HTTP/3 set-up: {err}"));
            return tally;
        }
    };
    let closed = Arc::new(AtomicBool::new(false));
    let driver_closed = closed.clone();
    let driver = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        driver_closed.store(true, Ordering::Relaxed);
    });
    let workers: Vec<_> = (0..args.streams)
        .map(|_| {
            tokio::spawn(stream_loop(
                send.clone(),
                args.clone(),
                deadline,
                closed.clone(),
            ))
        })
        .collect();
    for worker in workers {
        if let Ok(t) = worker.await {
            tally.merge(t);
        }
    }
    conn.close(0u32.into(), b"done");
    driver.abort();
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

async fn run(args: Args) -> Result<String, LoadError> {
    let bind: SocketAddr = if args.addr.is_ipv6() {
        "[::]:0".parse().expect("address")
    } else {
        "0.0.0.0:0".parse().expect("address")
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(client_config(&args)?);
    let args = Arc::new(args);
    let started = Instant::now();
    let deadline = started + args.duration;
    let tasks: Vec<_> = (0..args.conns)
        .map(|_| tokio::spawn(connection(endpoint.clone(), args.clone(), deadline)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        if let Ok(t) = task.await {
            tally.merge(t);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tally.latencies.sort_unstable();
    Ok(format!(
        "{{\"requests\":{},\"failed\":{},\"seconds\":{:.3},\"rps\":{:.1},\"bytes\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"error\":{}}}",
        tally.ok,
        tally.failed,
        seconds,
        tally.ok as f64 / seconds,
        tally.bytes,
        percentile(&tally.latencies, 0.5),
        percentile(&tally.latencies, 0.99),
        tally
            .error
            .map(|e| format!("{e:?}"))
            .unwrap_or_else(|| "null".into()),
    ))
}

fn main() {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
            .block_on(run(args))
    });
    match result {
        Ok(line) => println!("{line}"),
        Err(err) => {
            eprintln!("h3load: {err}");
            std::process::exit(2);
        }
    }
}
