//! Where Redis is (`CACHE_REDIS_URL`) and how one connection to it is
//! opened.
//!
//! We open the socket ourselves and hand redis-rs a ready stream
//! (`MultiplexedConnection::new_with_config` takes any `AsyncRead +
//! AsyncWrite`), for two reasons:
//!
//! - **Fork safety.** The socket comes from `crate::sys::tcp_socket` /
//!   `unix_socket`, registered in the fork registry before it connects, and
//!   the registration lives inside the stream for as long as redis-rs keeps
//!   it. A Puma worker forked at any moment closes it; there is no window.
//!   (redis-rs' own connectors, and fred's, call `TcpStream::connect`
//!   themselves, which would leave the connect wait unregistered.) What is
//!   not ours to register: the descriptors glibc's `getaddrinfo` opens for
//!   a moment while resolving a host name (`tokio::net::lookup_host`, on
//!   the blocking pool; none for an IP address or `unix://`), and the CA
//!   files read once by [`Target::new`] at start — the same residue as the
//!   ACME client's.
//! - **TLS.** `rediss://` uses our rustls with the `ring` provider, the
//!   same roots as the rest of the proxy (system roots plus an optional CA
//!   file), so redis-rs' TLS features — and any second crypto provider —
//!   stay out of the build.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::{ProtocolVersion, RedisConnectionInfo};
use rustls_pki_types::ServerName;

use crate::sys::ca;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::sys::{self, Registration};

/// The setting named in errors.
pub const URL_SETTING: &str = "CACHE_REDIS_URL";
const URL_FORMS: &str = "redis://[user:password@]host[:port][/db], rediss://… (TLS) or unix:///path/to/redis.sock[?db=N]";
const DEFAULT_PORT: u16 = 6379;

/// A `CACHE_REDIS_URL` (or CA file) that cannot work. Found at start, never
/// by waiting for Redis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedConfigError {
    /// The URL, with any password replaced by `***`.
    #[error("invalid {URL_SETTING}={url:?}: {why}; expected {URL_FORMS}")]
    Url { url: String, why: String },
    #[error("invalid CA file {path:?} for {URL_SETTING}: {why}")]
    CaFile { path: String, why: String },
    #[error("no CA certificates to verify the rediss:// server with: install ca-certificates or give a CA file")]
    NoRoots,
    #[error("the shared cache tier must be started inside the proxy's Tokio runtime")]
    NoRuntime,
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16, tls: bool },
    Unix(PathBuf),
}

/// A parsed `CACHE_REDIS_URL`.
#[derive(Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    /// Database, credentials, RESP3 (for pub/sub on the same connection).
    pub info: RedisConnectionInfo,
    /// The URL without its password, for logs.
    pub redacted: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("endpoint", &self.endpoint)
            .field("url", &self.redacted)
            .field("db", &self.info.db())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Target {
    /// Parses the URL and, for `rediss://`, builds the TLS client (system
    /// roots plus `ca_file`). Touches no network.
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<Target, SharedConfigError> {
        let (endpoint, info) = parse_url(url)?;
        let tls = match &endpoint {
            Endpoint::Tcp {
                host, tls: true, ..
            } => {
                let name =
                    ServerName::try_from(host.clone()).map_err(|e| SharedConfigError::Url {
                        url: redact(url),
                        why: format!("host {host:?} is not a TLS server name ({e})"),
                    })?;
                Some((tls_connector(ca_file)?, name))
            }
            _ => None,
        };
        Ok(Target {
            endpoint,
            info,
            redacted: redact(url),
            tls,
        })
    }

    /// Connects a registered socket (and shakes hands for TLS). The caller
    /// bounds the time.
    pub async fn open(&self) -> io::Result<RedisStream> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let (registration, socket) = sys::unix_socket()?.into_parts();
                let stream = socket.connect(path).await?;
                Ok(RedisStream {
                    _registration: registration,
                    io: Io::Unix(stream),
                })
            }
            Endpoint::Tcp { host, port, .. } => {
                let mut last = io::Error::other(format!("{host} has no address"));
                // Resolved on every attempt: a Redis host's address may
                // change (a container restarted). Each address in turn.
                for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
                    let (registration, socket) = sys::tcp_socket(&addr)?.into_parts();
                    let stream = match socket.connect(addr).await {
                        Ok(stream) => stream,
                        Err(err) => {
                            last = err;
                            continue;
                        }
                    };
                    // Small requests and answers: Nagle would add up to
                    // 40 ms to a lookup bounded at 100.
                    stream.set_nodelay(true)?;
                    let io = match &self.tls {
                        Some((connector, name)) => {
                            Io::Tls(Box::new(connector.connect(name.clone(), stream).await?))
                        }
                        None => Io::Tcp(stream),
                    };
                    return Ok(RedisStream {
                        _registration: registration,
                        io,
                    });
                }
                Err(last)
            }
        }
    }
}

/// Splits a URL into endpoint and connection settings. Accepts the forms
/// redis-rs documents (`redis`, `rediss`, `valkey`, `valkeys`, `unix`,
/// `redis+unix`, `valkey+unix`); rejects what we would silently ignore.
pub fn parse_url(text: &str) -> Result<(Endpoint, RedisConnectionInfo), SharedConfigError> {
    let bad = |why: String| SharedConfigError::Url {
        url: redact(text),
        why,
    };
    let url = url::Url::parse(text.trim()).map_err(|e| bad(e.to_string()))?;
    if url.fragment().is_some() {
        return Err(bad("a #fragment is not supported (no insecure TLS)".into()));
    }
    let mut info = RedisConnectionInfo::default()
        .set_protocol(ProtocolVersion::RESP3)
        .set_lib_name("thruster-rs", env!("CARGO_PKG_VERSION"));
    let mut username = percent_decode(url.username()).map_err(bad)?;
    let mut password = url
        .password()
        .map(percent_decode)
        .transpose()
        .map_err(bad)?;
    let mut db = None;
    let endpoint = match url.scheme() {
        scheme @ ("redis" | "rediss" | "valkey" | "valkeys") => {
            let host = match url.host() {
                Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
                Some(url::Host::Ipv4(ip)) => ip.to_string(),
                Some(url::Host::Ipv6(ip)) => ip.to_string(),
                _ => return Err(bad("no host".into())),
            };
            if let Some(q) = url.query_pairs().next() {
                return Err(bad(format!("unknown parameter {:?}", q.0)));
            }
            let path = url.path().trim_start_matches('/');
            if !path.is_empty() {
                db = Some(parse_db(path).map_err(bad)?);
            }
            Endpoint::Tcp {
                host,
                port: url.port().unwrap_or(DEFAULT_PORT),
                tls: matches!(scheme, "rediss" | "valkeys"),
            }
        }
        "unix" | "redis+unix" | "valkey+unix" => {
            if url.path().is_empty() || url.path() == "/" {
                return Err(bad("no socket path".into()));
            }
            for (name, value) in url.query_pairs() {
                match &*name {
                    "db" => db = Some(parse_db(&value).map_err(bad)?),
                    "user" | "username" => username = value.into_owned(),
                    "pass" | "password" => password = Some(value.into_owned()),
                    other => return Err(bad(format!("unknown parameter {other:?}"))),
                }
            }
            let path = url
                .to_file_path()
                .map_err(|()| bad("the socket path is not a local absolute path".into()))?;
            Endpoint::Unix(path)
        }
        other => return Err(bad(format!("unsupported scheme {other:?}"))),
    };
    if let Some(db) = db {
        info = info.set_db(db);
    }
    if !username.is_empty() {
        info = info.set_username(username);
    }
    if let Some(password) = password {
        info = info.set_password(password);
    }
    Ok((endpoint, info))
}

fn parse_db(text: &str) -> Result<i64, String> {
    text.parse::<u16>()
        .map(i64::from)
        .map_err(|_| format!("database {text:?} is not a number"))
}

/// `%XX` decoding of URL user info (passwords often hold `@`, `:`, `/`).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad %-escape in the user info")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the user info is not UTF-8".to_string())
}

/// The URL with its password (user info or `pass=`) replaced by `***`, for
/// errors and logs. Works on text that does not parse, too.
pub fn redact(text: &str) -> String {
    let mut out = text.trim().to_owned();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let end = out[start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| start + i);
        if let Some(at) = out[start..end].rfind('@').map(|i| start + i) {
            if let Some(colon) = out[start..at].find(':').map(|i| start + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, SharedConfigError> {
    let config = ca::client_config(ca_file).map_err(|e| match e {
        ca::CaError::File(why) => SharedConfigError::CaFile {
            path: ca_file.map(|p| p.display().to_string()).unwrap_or_default(),
            why,
        },
        ca::CaError::NoRoots => SharedConfigError::NoRoots,
    })?;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connection to Redis, registered for closing in forked children until
/// redis-rs drops it.
pub struct RedisStream {
    // Declared first so it drops (unregisters) before the socket closes.
    _registration: Registration,
    io: Io,
}

enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl RedisStream {
    #[cfg(test)]
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &self.io {
            Io::Tcp(s) => s.as_raw_fd(),
            Io::Tls(s) => s.get_ref().0.as_raw_fd(),
            Io::Unix(s) => s.as_raw_fd(),
        }
    }
}

crate::sys::enum_stream_io!(RedisStream { io }: Io { Tcp, Tls, Unix });

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        parse_url(url).unwrap().0
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(
            endpoint("redis://cache.internal"),
            Endpoint::Tcp {
                host: "cache.internal".into(),
                port: 6379,
                tls: false
            }
        );
        assert_eq!(
            endpoint("rediss://10.0.0.2:6380/3"),
            Endpoint::Tcp {
                host: "10.0.0.2".into(),
                port: 6380,
                tls: true
            }
        );
        assert_eq!(
            endpoint("valkey://[::1]:7000"),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 7000,
                tls: false
            }
        );
        assert_eq!(
            endpoint("unix:///run/redis/redis.sock?db=2"),
            Endpoint::Unix("/run/redis/redis.sock".into())
        );
        let (_, info) = parse_url("redis://app:p%40ss%3Aw@h/4").unwrap();
        assert_eq!(info.username(), Some("app"));
        assert_eq!(info.password(), Some("p@ss:w"));
        assert_eq!(info.db(), 4);
        assert_eq!(info.protocol(), ProtocolVersion::RESP3);
        let (_, info) = parse_url("redis://:secret@h").unwrap();
        assert_eq!(info.username(), None);
        assert_eq!(info.password(), Some("secret"));
        let (_, info) = parse_url("unix:///s.sock?db=1&user=u&pass=p").unwrap();
        assert_eq!(
            (info.db(), info.username(), info.password()),
            (1, Some("u"), Some("p"))
        );
    }

    #[test]
    fn bad_urls_name_the_setting_and_hide_the_password() {
        for (url, why) in [
            ("http://h:6379", "unsupported scheme \"http\""),
            ("redis//h", "relative URL without a base"),
            ("localhost:6379", "unsupported scheme \"localhost\""),
            ("redis://", "no host"),
            ("redis://h/x", "database \"x\" is not a number"),
            ("redis://h?timeout=1", "unknown parameter \"timeout\""),
            ("rediss://h#insecure", "a #fragment is not supported"),
            ("unix://", "no socket path"),
            ("redis://u:hunter%zz2@h", "bad %-escape"),
            ("http://u:hunter2@h", "unsupported scheme"),
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(err.starts_with("invalid CACHE_REDIS_URL="), "{err}");
            assert!(err.contains(why), "{url}: {err}");
            assert!(err.contains("expected redis://"), "{err}");
            assert!(!err.contains("hunter"), "{err}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("redis://u:pw@h:1/2"), "redis://u:***@h:1/2");
        assert_eq!(redact("redis://:p@w@h"), "redis://:***@h");
        assert_eq!(redact("redis://h"), "redis://h");
        assert_eq!(redact("redis://u@h"), "redis://u@h");
        assert_eq!(
            redact("unix:///s?db=1&pass=pw&user=u"),
            "unix:///s?db=1&pass=***&user=u"
        );
    }

    #[test]
    fn tls_needs_a_server_name_and_a_readable_ca_file() {
        let t = Target::new("rediss://localhost:1", None).unwrap();
        assert!(t.tls.is_some());
        let err = Target::new("rediss://h", Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(matches!(err, SharedConfigError::CaFile { .. }), "{err}");
        assert!(Target::new("redis://h", None).unwrap().tls.is_none());
    }
}
