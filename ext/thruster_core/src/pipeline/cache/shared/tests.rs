//! The shared tier against a real `redis-server` (Debian's 7.0): each test
//! starts its own on a free loopback port, waits for it with a `PING`
//! probe, and kills it at the end.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::*;
use crate::pipeline::cache::entry::{EntryMeta, StoredFile};
use crate::sys::test_support::TempDir;

const TIMEOUT: Duration = Duration::from_millis(100);
/// What a call may take beyond the timeout on a loaded 2-core test box
/// (timer granularity, scheduling) before we call it a bug.
const MARGIN: Duration = Duration::from_millis(150);

/// Fast cool-downs so recovery tests take seconds, not minutes.
fn test_options() -> SharedOptions {
    SharedOptions {
        timeout: TIMEOUT,
        breaker: BreakerSettings {
            failures: 5,
            cooldown: Duration::from_millis(200),
            max_cooldown: Duration::from_secs(1),
            retry_delay: Duration::from_millis(50),
        },
        ..SharedOptions::default()
    }
}

enum Listen {
    Tcp,
    Unix(PathBuf),
    Tls { cert: PathBuf, key: PathBuf },
}

struct RedisServer {
    port: u16,
    child: Option<Child>,
    listen: Listen,
    dir: TempDir,
}

use crate::sys::test_support::free_port;

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::on_port(free_port())
    }

    /// A server on `port`, not started yet.
    fn on_port(port: u16) -> RedisServer {
        let mut server = RedisServer::unstarted(port, Listen::Tcp);
        server.spawn();
        server
    }

    fn unstarted(port: u16, listen: Listen) -> RedisServer {
        RedisServer {
            port,
            child: None,
            listen,
            dir: TempDir::new("redis"),
        }
    }

    fn start_unix() -> RedisServer {
        let dir = TempDir::new("redis-sock");
        let path = dir.0.join("redis.sock");
        let mut server = RedisServer {
            port: 0,
            child: None,
            listen: Listen::Unix(path),
            dir,
        };
        server.spawn();
        server
    }

    fn start_tls() -> (RedisServer, PathBuf) {
        let dir = TempDir::new("redis-tls");
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.file("cert.pem", certified.cert.pem().as_bytes());
        let key = dir.file("key.pem", certified.signing_key.serialize_pem().as_bytes());
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            listen: Listen::Tls {
                cert: cert.clone(),
                key,
            },
            dir,
        };
        server.spawn();
        (server, cert)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir.0);
        match &self.listen {
            Listen::Tcp => {
                cmd.args(["--port", &self.port.to_string()]);
            }
            Listen::Unix(path) => {
                cmd.args(["--port", "0", "--unixsocket"]).arg(path);
            }
            Listen::Tls { cert, key } => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(cert);
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (bin/setup)");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls until the server answers `PING` (TLS: accepts a connection).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let answered = match &self.listen {
                Listen::Tcp => TcpStream::connect(("127.0.0.1", self.port))
                    .ok()
                    .is_some_and(ping),
                Listen::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                    .ok()
                    .is_some_and(ping),
                Listen::Tls { .. } => TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if answered {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not come up");
    }

    fn url(&self) -> String {
        match &self.listen {
            Listen::Tcp => format!("redis://127.0.0.1:{}", self.port),
            Listen::Unix(path) => format!("unix://{}", path.display()),
            Listen::Tls { .. } => format!("rediss://localhost:{}", self.port),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A plain client for checking what the tier wrote (never while the
    /// server is stopped: it would block).
    fn client(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping(mut s: impl Read + Write) -> bool {
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn meta(key: &str, body: &[u8], lifetime: u64, stale_if_error: u64) -> EntryMeta {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("text/html"));
    headers.append("set-thing", HeaderValue::from_static("one"));
    headers.append("set-thing", HeaderValue::from_static("two"));
    headers.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    EntryMeta {
        key: key.to_owned(),
        status: StatusCode::OK,
        headers,
        stored_at_unix_ms: now_unix_ms(),
        initial_age_secs: 0,
        lifetime_secs: lifetime,
        stale_if_error_secs: stale_if_error,
        immutable: false,
        release: Some("r1".into()),
        file: None,
        body_len: body.len() as u64,
    }
}

async fn ready_tier(server: &RedisServer) -> SharedTier {
    let tier = SharedTier::connect_with(&server.url(), test_options()).unwrap();
    assert!(tier.ready(Duration::from_secs(5)).await, "connects");
    tier
}

async fn store(tier: &SharedTier, meta: EntryMeta, body: &[u8]) {
    let ticket = tier.put(meta, Bytes::copy_from_slice(body)).unwrap();
    assert!(ticket.stored().await, "stored");
}

/// Polls `check` for up to `within`.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// A lookup, timed.
async fn timed_get(tier: &SharedTier, key: &str) -> (Option<(EntryMeta, Bytes)>, Duration) {
    let start = Instant::now();
    let found = tier.get(key).await;
    (found, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_round_trip_small_and_2_mib_with_headers() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    let small = b"<p>hello</p>".to_vec();
    let big: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    for (key, body) in [("http://h/small", &small), ("http://h/big", &big)] {
        let m = meta(key, body, 60, 30);
        store(&tier, m.clone(), body).await;
        let (got, body_back) = tier.get(key).await.expect("hit");
        assert_eq!(got, m);
        assert_eq!(&body_back[..], &body[..]);
    }
    // Namespaced, versioned, named by the key's SHA-256.
    let mut c = server.client();
    let name = format!("thruster:v1:{}", KeyHash::of("http://h/small").hex());
    let raw: Vec<u8> = redis::cmd("GET").arg(&name).query(&mut c).unwrap();
    assert_eq!(&raw[..4], b"THRC");
    assert_eq!(entry_key("http://h/small"), name);
    // Unknown keys are plain misses.
    assert!(tier.get("http://h/nothing").await.is_none());
    let stats = tier.stats();
    assert_eq!((stats.hits, stats.misses, stats.stored), (2, 1, 2));
    assert_eq!(stats.breaker_opens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_misplaced_tampered_or_foreign_values_are_misses() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    let body = b"the real body".to_vec();
    store(&tier, meta("http://h/a", &body, 60, 0), &body).await;
    let mut c = server.client();
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(entry_key("http://h/a"))
        .query(&mut c)
        .unwrap();
    let set = |c: &mut redis::Connection, key: &str, value: &[u8]| {
        redis::cmd("SET")
            .arg(entry_key(key))
            .arg(value)
            .query::<()>(c)
            .unwrap()
    };
    // A's value under B's name (what a hash collision would look like).
    set(&mut c, "http://h/b", &raw);
    assert!(tier.get("http://h/b").await.is_none());
    // One flipped bit in the body, in the metadata, or a cut value.
    for at in [raw.len() - 1, 30] {
        let mut bad = raw.clone();
        bad[at] ^= 1;
        set(&mut c, "http://h/a", &bad);
        assert!(tier.get("http://h/a").await.is_none(), "flip at {at}");
    }
    set(&mut c, "http://h/a", &raw[..raw.len() - 3]);
    assert!(tier.get("http://h/a").await.is_none());
    set(&mut c, "http://h/a", b"not an entry");
    assert!(tier.get("http://h/a").await.is_none());
    // The intact value is still a hit.
    set(&mut c, "http://h/a", &raw);
    assert!(tier.get("http://h/a").await.is_some());
    assert_eq!(tier.stats().rejected, 5);
    assert_eq!(tier.stats().breaker_opens, 0, "bad values are not failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ttl_is_what_is_left_of_lifetime_plus_stale_if_error() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    let mut c = server.client();
    let pttl = |c: &mut redis::Connection, key: &str| -> i64 {
        redis::cmd("PTTL").arg(entry_key(key)).query(c).unwrap()
    };
    store(&tier, meta("http://h/fresh", b"x", 100, 50), b"x").await;
    let t = pttl(&mut c, "http://h/fresh");
    assert!((148_000..=150_000).contains(&t), "{t}");
    // Received 10 s old, stored 30 s ago: 150 - 10 - 30 = 110 s left.
    let mut m = meta("http://h/aged", b"x", 100, 50);
    m.initial_age_secs = 10;
    m.stored_at_unix_ms -= 30_000;
    store(&tier, m, b"x").await;
    let t = pttl(&mut c, "http://h/aged");
    assert!((108_000..=110_000).contains(&t), "{t}");
    // Stale already but inside stale-if-error: still stored, for that long.
    let mut m = meta("http://h/stale", b"x", 10, 100);
    m.stored_at_unix_ms -= 20_000;
    store(&tier, m, b"x").await;
    let t = pttl(&mut c, "http://h/stale");
    assert!((88_000..=90_000).contains(&t), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_refuses_dead_entries_file_references_and_oversize_bodies() {
    let server = RedisServer::start();
    let mut options = test_options();
    options.max_item_size = 1000;
    let tier = SharedTier::connect_with(&server.url(), options).unwrap();
    assert!(tier.ready(Duration::from_secs(5)).await);
    // Past lifetime and stale-if-error: nothing left to store.
    let mut dead = meta("http://h/dead", b"x", 10, 5);
    dead.stored_at_unix_ms -= 16_000;
    assert_eq!(
        tier.put(dead, Bytes::from_static(b"x")).unwrap_err(),
        PutSkip::Expired
    );
    let mut zero = meta("http://h/zero", b"x", 0, 0);
    zero.initial_age_secs = 3;
    assert_eq!(
        tier.put(zero, Bytes::from_static(b"x")).unwrap_err(),
        PutSkip::Expired
    );
    // An X-Sendfile reference names a file on this host.
    let mut sendfile = meta("http://h/file", b"", 60, 0);
    sendfile.file = Some(StoredFile {
        path: "/srv/app/public/big.bin".into(),
        len: 10,
        modified_unix_ns: 1,
    });
    assert_eq!(
        tier.put(sendfile, Bytes::new()).unwrap_err(),
        PutSkip::HostLocal
    );
    let big = vec![0u8; 1001];
    assert_eq!(
        tier.put(meta("http://h/big", &big, 60, 0), Bytes::from(big))
            .unwrap_err(),
        PutSkip::TooLarge
    );
    // Body and metadata disagree.
    assert_eq!(
        tier.put(
            meta("http://h/lie", b"abc", 60, 0),
            Bytes::from_static(b"ab")
        )
        .unwrap_err(),
        PutSkip::Invalid
    );
    let mut c = server.client();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("thruster:v1:*")
        .query(&mut c)
        .unwrap();
    // Only the lifetime note purge records are kept by.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys_later: Vec<String> = redis::cmd("KEYS")
        .arg("thruster:v1:*")
        .query(&mut c)
        .unwrap();
    assert!(
        keys.iter()
            .chain(&keys_later)
            .all(|k| k == "thruster:v1:longest"),
        "{keys:?} {keys_later:?}"
    );
    // A refused file reference still notes its lifetime.
    let longest: Option<f64> = redis::cmd("ZSCORE")
        .arg("thruster:v1:longest")
        .arg("ms")
        .query(&mut c)
        .unwrap();
    assert!(longest.is_some_and(|ms| ms > 59_000.0), "{longest:?}");
    // A file reference planted by someone else is not served.
    let mut planted = meta("http://h/planted", b"", 60, 0);
    planted.file = Some(StoredFile {
        path: "/etc/passwd".into(),
        len: 1,
        modified_unix_ns: 1,
    });
    let value = encode_whole(&planted, b"").unwrap();
    redis::cmd("SET")
        .arg(entry_key("http://h/planted"))
        .arg(value)
        .query::<()>(&mut c)
        .unwrap();
    assert!(tier.get("http://h/planted").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_vary_record_per_base_key_keeps_the_longest_ttl() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    let base = "http://h/page";
    let names = [
        HeaderName::from_static("accept-encoding"),
        HeaderName::from_static("accept-language"),
    ];
    let long = meta(&format!("{base}\naccept-encoding:br,gzip\n"), b"br", 300, 0);
    let short = meta(&format!("{base}\naccept-encoding:\n"), b"id", 30, 0);
    for (m, body) in [(long.clone(), "br"), (short.clone(), "id")] {
        let t = tier
            .put_variant(base, &names, m, Bytes::from_static(body.as_bytes()))
            .unwrap();
        assert!(t.stored().await);
    }
    // A fresh instance learns the names, builds the variant key, finds it.
    let fresh = ready_tier(&server).await;
    assert_eq!(fresh.vary(base).await, Some(names.to_vec()));
    assert_eq!(fresh.get(&long.key).await.unwrap().1, "br");
    assert_eq!(fresh.get(&short.key).await.unwrap().1, "id");
    // The shorter variant written last did not shorten the record.
    let mut c = server.client();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(vary_key(base))
        .query(&mut c)
        .unwrap();
    assert!(ttl > 290_000, "{ttl}");
    // No record, another base key's record, or a non-varying resource.
    assert_eq!(fresh.vary("http://h/other").await, None);
    let raw: Vec<u8> = redis::cmd("GET").arg(vary_key(base)).query(&mut c).unwrap();
    redis::cmd("SET")
        .arg(vary_key("http://h/other"))
        .arg(raw)
        .query::<()>(&mut c)
        .unwrap();
    assert_eq!(fresh.vary("http://h/other").await, None);
    let plain = meta("http://h/plain\n", b"p", 60, 0);
    assert!(
        tier.put_variant("http://h/plain", &[], plain, Bytes::from_static(b"p"))
            .unwrap()
            .stored()
            .await
    );
    assert_eq!(fresh.vary("http://h/plain").await, Some(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_remove_and_flushall_are_misses_then_writes_resume() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    store(&tier, meta("http://h/a", b"a", 60, 0), b"a").await;
    store(&tier, meta("http://h/b", b"b", 60, 0), b"b").await;
    assert_eq!(tier.remove("http://h/a").await, Ok(true));
    assert_eq!(tier.remove("http://h/a").await, Ok(false));
    assert!(tier.get("http://h/a").await.is_none());
    assert!(tier.get("http://h/b").await.is_some());
    redis::cmd("FLUSHALL")
        .query::<()>(&mut server.client())
        .unwrap();
    assert!(tier.get("http://h/b").await.is_none());
    store(&tier, meta("http://h/b", b"b", 60, 0), b"b").await;
    assert!(tier.get("http://h/b").await.is_some());
    assert_eq!(tier.stats().breaker_opens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_redis_killed_mid_traffic_misses_in_time_opens_once_then_recovers() {
    let mut server = RedisServer::start();
    let tier = ready_tier(&server).await;
    store(&tier, meta("http://h/a", b"a", 600, 0), b"a").await;
    let traffic = {
        let tier = tier.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let (mut hits, mut misses) = (0, 0);
            let end = Instant::now() + Duration::from_secs(2);
            while Instant::now() < end {
                let (found, took) = timed_get(&tier, "http://h/a").await;
                slowest = slowest.max(took);
                if found.is_some() {
                    hits += 1
                } else {
                    misses += 1
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (slowest, hits, misses)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    let (slowest, hits, misses) = traffic.await.unwrap();
    assert!(hits > 0 && misses > 0, "{hits} {misses}");
    assert!(slowest <= TIMEOUT + MARGIN, "slowest lookup {slowest:?}");
    // Writes are skipped at once while it is down.
    let start = Instant::now();
    let skipped = tier.put(meta("http://h/w", b"w", 60, 0), Bytes::from_static(b"w"));
    assert!(start.elapsed() < Duration::from_millis(5));
    assert_eq!(skipped.unwrap_err(), PutSkip::Unavailable);
    assert!(eventually(Duration::from_secs(3), || tier.stats().breaker_opens == 1).await);
    // Probes keep failing while it is down; still one warning.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tier.stats().breaker_opens, 1);
    assert_eq!(tier.stats().breaker_closes, 0);
    // Back (empty: no persistence): the tier heals by itself.
    server.spawn();
    assert!(tier.ready(Duration::from_secs(5)).await, "reconnects");
    assert!(tier.is_available());
    assert_eq!(tier.stats().breaker_closes, 1);
    assert_eq!(tier.stats().breaker_opens, 1);
    assert!(tier.get("http://h/a").await.is_none());
    store(&tier, meta("http://h/a", b"a2", 600, 0), b"a2").await;
    assert_eq!(tier.get("http://h/a").await.unwrap().1, "a2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_redis_stopped_every_lookup_within_timeout_breaker_opens_recovers() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    store(&tier, meta("http://h/a", b"a", 600, 0), b"a").await;
    server.signal(libc::SIGSTOP);
    let mut slowest = Duration::ZERO;
    let mut timed_out = 0;
    for _ in 0..30 {
        let (found, took) = timed_get(&tier, "http://h/a").await;
        assert!(found.is_none());
        slowest = slowest.max(took);
        if took >= TIMEOUT {
            timed_out += 1;
        }
        // Writes never wait, hung server or not.
        let start = Instant::now();
        let _ = tier.put(meta("http://h/w", b"w", 60, 0), Bytes::from_static(b"w"));
        assert!(start.elapsed() < Duration::from_millis(5));
    }
    assert!(slowest <= TIMEOUT + MARGIN, "slowest lookup {slowest:?}");
    // Five timed out, then the circuit opened and the rest were instant.
    assert!(timed_out <= 5, "{timed_out} lookups waited for the timeout");
    assert_eq!(tier.stats().breaker_opens, 1);
    assert!(!tier.is_available());
    // A purge while it hangs still applies locally, and says it was not shared.
    let start = Instant::now();
    assert_eq!(
        tier.purge("http://h/x").await,
        Err(SharedError::Unavailable)
    );
    assert!(start.elapsed() < TIMEOUT);
    assert!(tier.purged_since("http://h/x", now_unix_ms()));
    server.signal(libc::SIGCONT);
    assert!(tier.ready(Duration::from_secs(5)).await, "recovers");
    assert!(
        eventually(Duration::from_secs(2), || tier.is_available()).await,
        "circuit closes"
    );
    assert_eq!(tier.get("http://h/a").await.unwrap().1, "a");
    assert_eq!(tier.stats().breaker_opens, 1);
    assert_eq!(tier.stats().breaker_closes, 1);
}

/// However the circuit opens — here by failures reported for no particular
/// connection, as late failures of a replaced connection would be — the
/// live connection is dropped and the connector probes again: the circuit
/// can never stay open over a connection nobody watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_an_open_circuit_always_gets_probed_and_closes() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    for _ in 0..5 {
        tier.inner.report(Err("injected"), Source::Call);
    }
    assert_eq!(tier.stats().breaker_opens, 1);
    assert!(!tier.is_available());
    assert!(tier.get("http://h/a").await.is_none());
    assert!(
        tier.ready(Duration::from_secs(3)).await,
        "probed and reconnected"
    );
    assert!(tier.is_available());
    assert_eq!(tier.stats().breaker_closes, 1);
    assert_eq!(tier.stats().connects, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_connect_while_down_returns_at_once_and_works_once_up() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let start = Instant::now();
    let tier = SharedTier::connect_with(&url, test_options()).unwrap();
    assert!(start.elapsed() < Duration::from_millis(20));
    let (found, took) = timed_get(&tier, "http://h/a").await;
    assert!(
        found.is_none() && took < Duration::from_millis(20),
        "{took:?}"
    );
    assert_eq!(
        tier.put(meta("http://h/a", b"a", 60, 0), Bytes::from_static(b"a"))
            .unwrap_err(),
        PutSkip::Unavailable
    );
    assert!(eventually(Duration::from_secs(3), || tier.stats().breaker_opens == 1).await);
    let _server = RedisServer::on_port(port);
    assert!(tier.ready(Duration::from_secs(5)).await);
    store(&tier, meta("http://h/a", b"a", 60, 0), b"a").await;
    assert!(tier.get("http://h/a").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_connect_while_stopped_returns_at_once_and_works_after_continue() {
    let server = RedisServer::start();
    server.signal(libc::SIGSTOP);
    let start = Instant::now();
    let tier = SharedTier::connect_with(&server.url(), test_options()).unwrap();
    assert!(start.elapsed() < Duration::from_millis(20));
    for _ in 0..10 {
        let (found, took) = timed_get(&tier, "http://h/a").await;
        assert!(found.is_none());
        assert!(took <= TIMEOUT + MARGIN, "{took:?}");
    }
    // The connection attempt hangs in HELLO/PING and times out.
    assert!(!tier.ready(Duration::from_millis(1200)).await);
    server.signal(libc::SIGCONT);
    assert!(tier.ready(Duration::from_secs(5)).await);
    store(&tier, meta("http://h/a", b"a", 60, 0), b"a").await;
    assert!(tier.get("http://h/a").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bad_urls_fail_at_start_naming_the_setting() {
    for url in [
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "redis://h/zero",
        "",
    ] {
        let err = SharedTier::connect(url, TIMEOUT).err().expect(url);
        let text = err.to_string();
        assert!(text.contains("CACHE_REDIS_URL"), "{text}");
    }
    let err = SharedTier::connect("redis://u:hunter2@h", TIMEOUT).err();
    assert!(err.is_none(), "a good URL starts without Redis");
}

#[test]
fn shared_connect_outside_the_runtime_is_an_error_not_a_panic() {
    let err = SharedTier::connect("redis://127.0.0.1:1", TIMEOUT).err();
    assert_eq!(err, Some(SharedConfigError::NoRuntime));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_purge_records_reach_other_instances_including_later_ones() {
    let server = RedisServer::start();
    let a = ready_tier(&server).await;
    let b = ready_tier(&server).await;
    let before = now_unix_ms() - 1;
    a.purge("http://h/exact").await.unwrap();
    a.purge("http://h/assets/*").await.unwrap();
    // Seen by the running instance through the announcement.
    assert!(
        eventually(Duration::from_secs(2), || b
            .purged_since("http://h/exact", before)
            && b.purged_since("http://h/assets/app.css", before))
        .await
    );
    assert!(!b.purged_since("http://h/exactly", before));
    assert!(!b.purged_since("http://h/other", before));
    // Stored after the purge (past the clock-skew margin): not covered.
    let after = now_unix_ms() + 2000;
    assert!(!b.purged_since("http://h/exact", after));
    // An instance started after the purges loads the records.
    let c = ready_tier(&server).await;
    assert!(c.purged_since("http://h/exact", before));
    assert!(c.purged_since("http://h/assets/x/y.js", before));
    assert!(!c.purged_since("http://h/other", before));
    // Everything.
    b.purge("*").await.unwrap();
    let d = ready_tier(&server).await;
    for t in [&a, &c, &d] {
        assert!(
            eventually(Duration::from_secs(2), || t
                .purged_since("http://z/anything", before))
            .await
        );
    }
    // Kept in two sorted sets, with a TTL: no keyspace scans, no leaks.
    let mut conn = server.client();
    let keys: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg("thruster:v1:purge:prefixes")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut conn)
        .unwrap();
    // (Members in score order; two purges in one millisecond tie.)
    let mut names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["", "http://h/assets/"]);
    let ttl: i64 = redis::cmd("PTTL")
        .arg("thruster:v1:purge:keys")
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 23 * 3600 * 1000, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_purge_announcements_reach_a_running_instance() {
    let server = RedisServer::start();
    let a = ready_tier(&server).await;
    let b = ready_tier(&server).await;
    let mut events = b.purge_events();
    let sent = a.purge("http://h/news/*").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .expect("announced in time")
        .unwrap();
    assert_eq!(got, sent);
    assert_eq!(got.target, PurgeTarget::Prefix("http://h/news/".into()));
    // The purging instance announces its own purge locally too, once.
    let mut own = a.purge_events();
    let sent = a.purge("http://h/x").await.unwrap();
    assert_eq!(own.recv().await.unwrap(), sent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(own.try_recv().is_err(), "the echo from Redis is not news");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_purge_learned_on_reconnect_after_missing_the_announcement() {
    let mut server = RedisServer::start();
    let port = server.port;
    let b = ready_tier(&server).await;
    // B is cut off (server restarted empty); a purge happens meanwhile.
    server.kill();
    server = RedisServer::on_port(port);
    let a = ready_tier(&server).await;
    let before = now_unix_ms() - 1;
    a.purge("http://h/gone").await.unwrap();
    assert!(b.ready(Duration::from_secs(5)).await);
    assert!(
        eventually(Duration::from_secs(3), || b
            .purged_since("http://h/gone", before))
        .await
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_over_unix_socket() {
    let server = RedisServer::start_unix();
    let tier = ready_tier(&server).await;
    store(&tier, meta("http://h/u", b"unix", 60, 0), b"unix").await;
    assert_eq!(tier.get("http://h/u").await.unwrap().1, "unix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_over_tls_with_a_ca_file() {
    let (server, ca) = RedisServer::start_tls();
    let mut options = test_options();
    options.ca_file = Some(ca);
    let tier = SharedTier::connect_with(&server.url(), options).unwrap();
    assert!(tier.ready(Duration::from_secs(5)).await, "TLS connects");
    store(&tier, meta("http://h/t", b"tls", 60, 0), b"tls").await;
    assert_eq!(tier.get("http://h/t").await.unwrap().1, "tls");
    // Without the CA the server is not trusted: never connects.
    let untrusted = SharedTier::connect_with(&server.url(), test_options()).unwrap();
    assert!(!untrusted.ready(Duration::from_millis(500)).await);
    assert!(untrusted.get("http://h/t").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_sockets_are_registered_for_fork_safety() {
    let server = RedisServer::start();
    let unix = RedisServer::start_unix();
    let (tls, ca) = RedisServer::start_tls();
    for (url, ca) in [
        (server.url(), None),
        (unix.url(), None),
        (tls.url(), Some(ca)),
    ] {
        let target = Target::new(&url, ca.as_deref()).unwrap();
        let stream = target.open().await.unwrap();
        let fd = stream.raw_fd();
        assert!(crate::sys::fd_registry::is_registered(fd), "{url}");
        drop(stream);
        assert!(!crate::sys::fd_registry::is_registered(fd), "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_dropping_the_tier_closes_its_connection() {
    let server = RedisServer::start();
    let mut c = server.client();
    let clients = |c: &mut redis::Connection| -> usize {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(c).unwrap();
        list.lines().count()
    };
    assert_eq!(clients(&mut c), 1);
    let tier = ready_tier(&server).await;
    assert_eq!(clients(&mut c), 2);
    drop(tier);
    assert!(eventually(Duration::from_secs(2), || clients(&mut c) == 1).await);
}

/// Lookup latency of a 100 KB entry against a local redis-server.
/// `cargo test -p thruster_core --lib shared_latency -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn shared_latency_100_kb() {
    let server = RedisServer::start();
    let tier = ready_tier(&server).await;
    let body: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
    store(&tier, meta("http://h/100k", &body, 600, 0), &body).await;
    for _ in 0..200 {
        assert!(tier.get("http://h/100k").await.is_some());
    }
    let mut times = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let (found, took) = timed_get(&tier, "http://h/100k").await;
        assert!(found.is_some());
        times.push(took);
    }
    times.sort();
    let pct = |p: usize| times[times.len() * p / 100 - 1];
    println!(
        "shared tier GET 100 KB (local redis-server, loopback TCP): p50 {:?} p90 {:?} p99 {:?} max {:?}",
        pct(50),
        pct(90),
        pct(99),
        times[times.len() - 1]
    );
}

/// Encodings of an entry's body live in Redis as in memory: what one
/// instance compressed, the next finds (a hit on its tier) instead of
/// compressing again, and only for the very body it was made from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_encodings_are_made_once_across_instances() {
    use crate::pipeline::cache::directives::Freshness;
    use crate::pipeline::cache::key::{BaseKey, CacheKey};
    use crate::pipeline::cache::store::Entry;
    use crate::pipeline::cache::tier::{self, Below};
    use crate::pipeline::compression::Coding;

    let server = RedisServer::start();
    let (first, second) = (ready_tier(&server).await, ready_tier(&server).await);
    let request = http::Request::builder()
        .uri("/app.css")
        .header("host", "h")
        .body(())
        .unwrap();
    let key = CacheKey::new(BaseKey::new(&request, false, false), &[], request.headers());
    let entry = |text: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/css"));
        let freshness = Freshness {
            lifetime: Duration::from_secs(60),
            initial_age: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            immutable: false,
        };
        Entry::new(
            StatusCode::OK,
            headers,
            Bytes::from(text.repeat(2000)),
            freshness,
        )
    };
    let below = |shared| Below {
        disk: None,
        shared: Some(shared),
        release: None,
    };
    let page = entry("body { color: red; } ");
    let made = tier::encoding(below(&first), &key, &page, Coding::Gzip)
        .await
        .expect("gzip makes it smaller");
    assert!(
        eventually(Duration::from_secs(5), || first.stats().stored >= 1).await,
        "the encoding reaches Redis"
    );
    let hits = second.stats().hits;
    let found = tier::encoding(below(&second), &key, &page, Coding::Gzip).await;
    assert_eq!(found.as_ref(), Some(&made));
    assert_eq!(
        second.stats().hits,
        hits + 1,
        "read from Redis, not made again"
    );
    // Another body under the same key (re-stored since) never gets it.
    let other = entry("body { color: blue; } ");
    let hits = second.stats().hits;
    let encoded = tier::encoding(below(&second), &key, &other, Coding::Gzip)
        .await
        .unwrap();
    assert_eq!(
        second.stats().hits,
        hits + 1,
        "looked up, tag did not match"
    );
    let mut decoded = String::new();
    flate2::read::GzDecoder::new(&encoded[..])
        .read_to_string(&mut decoded)
        .unwrap();
    assert_eq!(decoded.as_bytes(), &other.body[..]);
}
