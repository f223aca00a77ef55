//! One internal configuration, read from Thruster-compatible environment
//! variables (or any other source of `NAME -> value` pairs, such as the Ruby
//! keyword arguments of the in-process mode).
//!
//! Lookup rule (basecamp's Thruster's, with one deliberate difference): for
//! every setting `NAME`, `THRUSTER_NAME` wins over `NAME`, which wins over
//! the default. An empty value counts as unset, so `THRUSTER_HTTP_PORT=`
//! falls through to `HTTP_PORT` (Thruster uses a present but empty
//! `THRUSTER_NAME` as the value). An invalid value is an error naming the
//! variable, the value and what is accepted (Thruster silently uses the
//! default).
//!
//! Every setting, with its default, accepted values and meaning, is one row
//! of [`SETTINGS`].

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

/// The prefix that makes a variable win over its unprefixed twin.
pub const ENV_PREFIX: &str = "THRUSTER_";

/// A value that could not be accepted, with everything an operator needs to
/// fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {source_name}={value:?}: expected {accepted}")]
pub struct ConfigError {
    /// Where the value came from, e.g. `THRUSTER_HTTP_PORT` or `http_port`.
    pub source_name: String,
    pub value: String,
    pub accepted: &'static str,
}

/// Where a configured value came from: the name to quote in errors and the
/// raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSetting {
    pub source_name: String,
    pub value: String,
}

/// A source of raw settings by canonical (unprefixed, upper-case) name.
pub trait SettingSource {
    fn get(&self, name: &str) -> Option<RawSetting>;
}

/// Reads the process environment with the `THRUSTER_` prefix rule.
pub struct Environment;

impl SettingSource for Environment {
    fn get(&self, name: &str) -> Option<RawSetting> {
        prefixed_lookup(name, |key| std::env::var(key).ok())
    }
}

/// Explicit values (the Ruby API's keyword arguments) over another source
/// (the environment): keyword > `THRUSTER_X` > `X` > default.
pub struct Layered<'a> {
    explicit: std::collections::HashMap<&'static str, RawSetting>,
    fallback: &'a dyn SettingSource,
}

impl<'a> Layered<'a> {
    /// `keywords` are snake_case setting names (`http_port`) with their
    /// values. An unknown name is an error listing the accepted ones.
    pub fn new(
        keywords: impl IntoIterator<Item = (String, String)>,
        fallback: &'a dyn SettingSource,
    ) -> Result<Layered<'a>, UnknownSetting> {
        let mut explicit = std::collections::HashMap::new();
        for (keyword, value) in keywords {
            let name =
                setting_for_keyword(&keyword).ok_or_else(|| UnknownSetting(keyword.clone()))?;
            if !value.is_empty() {
                explicit.insert(
                    name,
                    RawSetting {
                        source_name: keyword,
                        value,
                    },
                );
            }
        }
        Ok(Layered { explicit, fallback })
    }
}

impl SettingSource for Layered<'_> {
    fn get(&self, name: &str) -> Option<RawSetting> {
        self.explicit
            .get(name)
            .cloned()
            .or_else(|| self.fallback.get(name))
    }
}

/// A keyword that names no setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown option {0:?}; accepted: {list}", list = keyword_list())]
pub struct UnknownSetting(pub String);

/// The setting a snake_case keyword stands for (`http_port` → `HTTP_PORT`).
pub fn setting_for_keyword(keyword: &str) -> Option<&'static str> {
    SETTINGS.iter().map(|s| s.name).find(|name| {
        name.eq_ignore_ascii_case(keyword) && !keyword.contains(|c: char| c.is_ascii_uppercase())
    })
}

fn keyword_list() -> String {
    SETTINGS
        .iter()
        .map(|s| s.name.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Applies the prefix rule over any key/value lookup; empty values count as
/// unset at each level.
pub fn prefixed_lookup(name: &str, lookup: impl Fn(&str) -> Option<String>) -> Option<RawSetting> {
    let prefixed = format!("{ENV_PREFIX}{name}");
    [prefixed, name.to_string()].into_iter().find_map(|key| {
        lookup(&key)
            .filter(|value| !value.is_empty())
            .map(|value| RawSetting {
                source_name: key,
                value,
            })
    })
}

/// One setting: its name, its default, what it accepts and what it means.
/// [`SETTINGS`] is the only place these are written: `Config::from_source`
/// takes its defaults and the accepted values it quotes in errors from
/// there, `thrust --help` lists the names and defaults, the Ruby keywords
/// are the names in snake_case, and the table in `docs/configuration.md` is
/// this table rendered (a test below fails when they differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The canonical name: the environment variable without `THRUSTER_`.
    pub name: &'static str,
    pub default: DefaultValue,
    /// What a value must look like, quoted by [`ConfigError`].
    pub accepted: &'static str,
    /// What the setting does, in Markdown, as the documentation shows it
    /// (links are relative to `docs/configuration.md`).
    pub meaning: &'static str,
}

/// What a setting is when it is not configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// A value, parsed exactly like a configured one.
    Value(&'static str),
    /// Nothing: the feature it configures is off.
    Unset,
    /// Worked out at start-up from other settings or the system; the text
    /// (Markdown) says how.
    Derived(&'static str),
}

impl Setting {
    /// The default as plain text (`thrust --help`).
    pub fn default_text(&self) -> String {
        match self.default {
            DefaultValue::Value(value) => value.to_string(),
            DefaultValue::Unset => "(unset)".to_string(),
            DefaultValue::Derived(how) => how.replace('`', ""),
        }
    }

    /// The default as a Markdown table cell (the documentation).
    pub fn default_markdown(&self) -> String {
        match self.default {
            DefaultValue::Value(value) => format!("`{value}`"),
            DefaultValue::Unset => "–".to_string(),
            DefaultValue::Derived(how) => how.to_string(),
        }
    }
}

/// The row of a setting by canonical name.
pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

const fn row(
    name: &'static str,
    default: DefaultValue,
    accepted: &'static str,
    meaning: &'static str,
) -> Setting {
    Setting {
        name,
        default,
        accepted,
        meaning,
    }
}

use DefaultValue::{Derived, Unset, Value};

/// Every setting the proxy understands, in the order the documentation
/// lists them.
pub const SETTINGS: &[Setting] = &[
    row(
        "TARGET_PORT",
        Value("3000"),
        ACCEPT_TARGET_PORT,
        "Port the app listens on (`127.0.0.1`); exported to the app as `PORT`.",
    ),
    row(
        "HTTP_PORT",
        Value("80"),
        ACCEPT_PORT,
        "Port the proxy listens on. `0` = pick a free port (logged).",
    ),
    row(
        "HTTPS_PORT",
        Value("443"),
        ACCEPT_PORT,
        "HTTPS port in [TLS mode](tls.md). `0` = pick a free port (logged).",
    ),
    row(
        "BAD_GATEWAY_PAGE",
        Value("./public/502.html"),
        ACCEPT_PATH,
        "Body of the 502 sent when the app is unreachable; empty 502 if the file is absent.",
    ),
    row(
        "FORWARD_HEADERS",
        Derived("`true` without TLS, `false` with"),
        ACCEPT_BOOL,
        "Trust inbound `X-Forwarded-*` (extend the `-For` chain, keep `-Host`/`-Proto`). Off: they \
         are replaced.",
    ),
    row(
        "HTTP_IDLE_TIMEOUT",
        Value("60"),
        ACCEPT_IDLE_SECONDS,
        "Idle keep-alive connections are closed after this many seconds; `0` = the read timeout, \
         `< 0` = never.",
    ),
    row(
        "HTTP_READ_TIMEOUT",
        Value("30"),
        ACCEPT_SECONDS,
        "Time a client has to send a request head: from the first byte (a new connection: from \
         accept). Also the deadline for a whole request body when `REQUEST_BODY_MIN_RATE` is `0`. \
         `≤ 0` = none. See [Timeouts](#timeouts).",
    ),
    row(
        "HTTP_WRITE_TIMEOUT",
        Value("30"),
        ACCEPT_SECONDS,
        "Time the app has to send its response **headers** (past it: **504**), and the longest a \
         client may stall reading a response. `≤ 0` = none. See [Timeouts](#timeouts).",
    ),
    row(
        "MAX_REQUEST_BODY",
        Value("0"),
        ACCEPT_SIGNED_BYTES,
        "Largest request body in bytes (`≤ 0` = unlimited): `413` before the app sees anything \
         when `Content-Length` is larger, or as soon as a chunked body passes it.",
    ),
    row(
        "MAX_CONNECTIONS",
        Value("0"),
        ACCEPT_COUNT,
        "Open client connections at most; past it new clients wait in the accept backlog. `0` = \
         half the open-files limit less a reserve, at most 16,384 (the proxy raises its soft limit \
         to the hard one at start).",
    ),
    row(
        "MAX_CONNECTIONS_PER_IP",
        Value("0"),
        ACCEPT_COUNT,
        "Open client connections per client address at most; excess connections are closed at \
         once. `0` = no per-address cap (the safe default behind a load balancer or CDN, where \
         every client shares a few addresses).",
    ),
    row(
        "UPSTREAM_RETRY_TIMEOUT",
        Value("5"),
        ACCEPT_RETRY_SECONDS,
        "A request without a body whose connection to the app is refused (app booting or \
         restarting) is retried every 50–500 ms for up to this many seconds before a `502`; \
         `≤ 0` = no retry.",
    ),
    row(
        "UPSTREAM_MAX_CONNECTIONS",
        Value("0"),
        ACCEPT_COUNT,
        "Requests sent to the app at once at most (each on a connection of its own); the rest \
         wait in the proxy, first come first served, within `HTTP_WRITE_TIMEOUT`. Set it to the \
         app server's threads × workers (`RAILS_MAX_THREADS` × `WEB_CONCURRENCY`), so Puma is \
         never sent more than it can serve at once. `0` = no cap; the Puma plugin sets Puma's \
         own count. See [Upstream connections](#upstream-connections).",
    ),
    row(
        "REQUEST_BUFFERING",
        Value("true"),
        ACCEPT_BOOL,
        "Read each request body completely before the app sees the request, so slow uploads never \
         hold an app worker (Unicorn, single-threaded Puma). Upgrades always stream. See \
         [Request buffering](#request-buffering).",
    ),
    row(
        "REQUEST_BUFFER_MEMORY",
        Value("65536"),
        ACCEPT_BYTES,
        "Bytes of a request body kept in memory; the rest goes to an unnamed temporary file (0600, \
         gone when closed).",
    ),
    row(
        "REQUEST_BUFFER_MAX",
        Value("104857600"),
        ACCEPT_BYTES,
        "Bytes of a request body buffered at most; past it the rest streams to the app as it \
         arrives (`MAX_REQUEST_BODY` still applies).",
    ),
    row(
        "REQUEST_BODY_MIN_RATE",
        Value("64"),
        ACCEPT_RATE,
        "Bytes per second a request body must average over each 10 s the proxy spends waiting for \
         it; slower gets `408`. Time the app spends not reading does not count. `0` = no minimum; \
         the body must then arrive within `HTTP_READ_TIMEOUT`.",
    ),
    row(
        "RESPONSE_BUFFERING",
        Value("true"),
        ACCEPT_BOOL,
        "Read each response from the app as fast as the app sends it, so a slow reader never holds \
         an app worker. Never for `text/event-stream`, upgrades, or responses with \
         `X-Accel-Buffering: no`. See [Response buffering](#response-buffering).",
    ),
    row(
        "RESPONSE_BUFFER_MEMORY",
        Value("262144"),
        ACCEPT_BYTES,
        "Bytes of a response waiting for its client kept in memory; the rest goes to an unnamed \
         temporary file.",
    ),
    row(
        "RESPONSE_BUFFER_MAX",
        Value("1073741824"),
        ACCEPT_BYTES,
        "Bytes of a response waiting for its client kept on disk at most; past it the app waits \
         for the client. `0` = memory only.",
    ),
    row(
        "H2C_ENABLED",
        Value("false"),
        ACCEPT_BOOL,
        "Cleartext HTTP/2 by prior knowledge; off, such connections are closed.",
    ),
    row(
        "LOG_REQUESTS",
        Value("true"),
        ACCEPT_BOOL,
        "One JSON line per request.",
    ),
    row(
        "LOG_REQUESTS_EXCLUDE",
        Unset,
        ACCEPT_LOG_EXCLUDE,
        "Comma list of paths whose request log lines are not written: exact matches (`/up` does not \
         silence `/upload`), or prefixes with a trailing `*` (`/assets/*`). For health checks such as \
         Kamal's `/up`. Other log lines are unaffected. In-process: `log_requests_exclude:`.",
    ),
    row("DEBUG", Value("false"), ACCEPT_BOOL, "Debug log lines."),
    row(
        "METRICS_PORT",
        Value("0"),
        ACCEPT_PORT,
        "Port of a separate listener (all interfaces) serving Prometheus metrics at `/metrics`; \
         `0` = off. Never expose it publicly. See [metrics](metrics.md). In-process: \
         `metrics_port:`.",
    ),
    row(
        "TLS_DOMAIN",
        Unset,
        ACCEPT_DOMAINS,
        "Comma list of domains (IDN allowed, converted to punycode): enables TLS with ACME \
         certificates for them. See [TLS](tls.md).",
    ),
    row(
        "ACME_DIRECTORY",
        Value(DEFAULT_ACME_DIRECTORY),
        ACCEPT_URL,
        "ACME directory URL (the default is Let's Encrypt production).",
    ),
    row(
        "EAB_KID",
        Unset,
        ACCEPT_EAB_KID,
        "External Account Binding for the ACME CA: the key identifier (set with `EAB_HMAC_KEY`, \
         both or neither).",
    ),
    row(
        "EAB_HMAC_KEY",
        Unset,
        ACCEPT_EAB_KEY,
        "External Account Binding for the ACME CA: the key, base64url (set with `EAB_KID`, both \
         or neither).",
    ),
    row(
        "ACME_CA_FILE",
        Unset,
        ACCEPT_PEM_FILE,
        "PEM bundle of extra CAs trusted for the ACME directory (Pebble, step-ca); \
         `SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured too.",
    ),
    row(
        "ACME_CHALLENGES",
        Value("tls-alpn-01,http-01"),
        ACCEPT_CHALLENGES,
        "Challenge types, tried in this order (a failed attempt moves to the next).",
    ),
    row(
        "STORAGE_PATH",
        Value("./storage/thruster"),
        ACCEPT_PATH,
        "Where the ACME account and certificates (and the `TLS_LOCAL` certificate) are kept; \
         0700, keys 0600.",
    ),
    row(
        "TLS_CERTIFICATE_PATH",
        Unset,
        ACCEPT_PEM_PAIR,
        "Your own PEM certificate chain instead of ACME (set with `TLS_PRIVATE_KEY_PATH`, both or \
         neither); reloaded when the files change.",
    ),
    row(
        "TLS_PRIVATE_KEY_PATH",
        Unset,
        ACCEPT_PEM_PAIR,
        "The PEM private key of `TLS_CERTIFICATE_PATH` (both or neither); reloaded when the files \
         change.",
    ),
    row(
        "TLS_LOCAL",
        Value("false"),
        ACCEPT_BOOL,
        "Self-signed certificate for `localhost`, `127.0.0.1`, `::1` and `TLS_DOMAIN` names \
         (development).",
    ),
    row(
        "TLS_DEFAULT_DOMAIN",
        Derived("first `TLS_DOMAIN`"),
        ACCEPT_DEFAULT_DOMAIN,
        "Whose certificate answers handshakes without a matching SNI; `none` refuses them.",
    ),
    row(
        "HTTP3_ENABLED",
        Value("true"),
        ACCEPT_BOOL,
        "In [TLS mode](tls.md), HTTP/3 (QUIC) on UDP `HTTPS_PORT` too, advertised by `Alt-Svc` on \
         every HTTPS response. Turn it off where UDP is not published (Docker publishes TCP only \
         unless told). See [HTTP/3](tls.md#http3).",
    ),
    row(
        "CACHE_SIZE",
        Value("67108864"),
        ACCEPT_BYTES,
        "Cache budget in bytes, encoded variants included; `0` turns the cache off. See \
         [Caching](#caching).",
    ),
    row(
        "MAX_CACHE_ITEM_SIZE",
        Value("1048576"),
        ACCEPT_BYTES,
        "Largest response body the memory tier keeps, in bytes; larger ones go to the disk tier \
         only (up to `CACHE_DISK_MAX_ITEM_SIZE`).",
    ),
    row(
        "CACHE_DISK_PATH",
        Derived("`$STORAGE_PATH/cache`"),
        ACCEPT_DISK_PATH,
        "Directory of the [disk cache tier](#disk-tier), which survives restarts and (on a volume) \
         deploys; `none` keeps the cache in memory only. Nothing outside it is ever touched.",
    ),
    row(
        "CACHE_DISK_SIZE",
        Value("268435456"),
        ACCEPT_BYTES,
        "Disk tier budget in bytes (counted in 4 KiB blocks); expired entries are evicted first. \
         `0` turns the tier off.",
    ),
    row(
        "CACHE_DISK_MAX_ITEM_SIZE",
        Value("67108864"),
        ACCEPT_BYTES,
        "Largest response body the disk tier stores, in bytes; bodies over `MAX_CACHE_ITEM_SIZE` \
         are served from disk without being read into memory.",
    ),
    row(
        "CACHE_REDIS_URL",
        Unset,
        ACCEPT_REDIS_URL,
        "The [shared tier](#shared-tier-redis--valkey) on Redis, Valkey or any RESP3 server \
         (Redis 7.0 or later): `redis://[user:password@]host:port[/db]`, `rediss://…` for TLS, \
         `unix:///path/to/redis.sock[?db=N]`. Unset = no shared tier. In-process: \
         `cache_redis_url:`.",
    ),
    row(
        "CACHE_REDIS_TIMEOUT_MS",
        Value("100"),
        ACCEPT_MILLISECONDS,
        "The longest a lookup in the shared tier waits, in milliseconds; one that takes longer is \
         a miss. Repeated failures open a circuit breaker that stops calling Redis for 1 to 30 s.",
    ),
    row(
        "CACHE_REDIS_CA_FILE",
        Unset,
        ACCEPT_PEM_FILE,
        "Extra CA certificates (PEM) trusted for `rediss://`, on top of the system's.",
    ),
    row(
        "CACHE_RELEASE",
        Unset,
        ACCEPT_RELEASE,
        "The running release (e.g. `$KAMAL_VERSION` or the git SHA). An entry in the disk or \
         shared tier stored under another release is served only if its response said \
         `immutable`; any other is a miss. Unset = releases are not tracked. See \
         [Deploys and purge](#deploys-and-purge).",
    ),
    row(
        "ADMIN_PORT",
        Value("0"),
        ACCEPT_PORT,
        "Port of the loopback-only (127.0.0.1) admin listener `Thruster.purge` calls; the app \
         finds it in `THRUSTER_RS_ADMIN_URL`, with a per-boot token in `THRUSTER_RS_ADMIN_TOKEN`. \
         `0` (the default) = a free port. See [Deploys and purge](#deploys-and-purge).",
    ),
    row(
        "CACHE_STALE_IF_ERROR",
        Value("300"),
        ACCEPT_STALE_SECONDS,
        "Seconds past expiry a cached response may stand in for a 500/502/503/504 when the app \
         does not say (its `stale-if-error` wins; `must-revalidate` forbids it); `≤ 0` = never.",
    ),
    row(
        "X_SENDFILE_ENABLED",
        Value("true"),
        ACCEPT_BOOL,
        "Serve `X-Sendfile` responses from disk. See [X-Sendfile](#x-sendfile).",
    ),
    row(
        "X_SENDFILE_ROOTS",
        Derived("working dir + temp dir"),
        ACCEPT_DIRECTORIES,
        "Comma list of existing directories X-Sendfile may serve from (symlinks resolved); \
         anything else is a logged `404`.",
    ),
    row(
        "GZIP_COMPRESSION_ENABLED",
        Value("true"),
        ACCEPT_BOOL,
        "Response compression: brotli, zstd and gzip (despite the name), negotiated from \
         `Accept-Encoding`; `Vary: Accept-Encoding` on every response.",
    ),
    row(
        "GZIP_COMPRESSION_DISABLE_ON_AUTH",
        Value("false"),
        ACCEPT_BOOL,
        "No compression for requests with `Cookie`, `Authorization` or `X-Csrf-Token`, nor for \
         per-user responses (`Set-Cookie`, `private`, `no-store`, `Vary: Cookie`/`Authorization`).",
    ),
    row(
        "GZIP_COMPRESSION_JITTER",
        Value("32"),
        ACCEPT_JITTER,
        "BREACH mitigation: up to this many padding bytes, a random count per response, in the \
         gzip header comment or a zstd skippable frame (brotli has no place for padding); `0` \
         turns it off (0–65533).",
    ),
];

pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

const ACCEPT_DISK_PATH: &str = "a directory path, or none";
const ACCEPT_LOG_EXCLUDE: &str =
    "a comma-separated list of paths, each starting with /, a trailing * making a prefix (/up,/assets/*)";
const ACCEPT_BOOL: &str = "a boolean: 1, t, T, TRUE, true, True, 0, f, F, FALSE, false or False";
const ACCEPT_REDIS_URL: &str =
    "a redis://, rediss:// or unix:// URL (user and password in the URL)";
const ACCEPT_MILLISECONDS: &str =
    "a whole number of milliseconds (digits only, no unit), 1 or more";
const ACCEPT_RELEASE: &str =
    "a release name: printable ASCII without spaces, at most 200 characters";
const ACCEPT_PORT: &str = "a TCP port number from 0 to 65535";
const ACCEPT_TARGET_PORT: &str = "a TCP port number from 1 to 65535";
const ACCEPT_PATH: &str = "a file system path";
const ACCEPT_URL: &str = "a URL";
const ACCEPT_PEM_FILE: &str = "a path to a PEM file";
const ACCEPT_DIRECTORIES: &str = "a comma-separated list of existing directories";
const ACCEPT_BYTES: &str = "a whole number of bytes (digits only, no unit), 0 or more";
const ACCEPT_RATE: &str =
    "a whole number of bytes per second (digits only, no unit), 0 or more; 0 means no minimum";
const ACCEPT_COUNT: &str = "a whole number of connections (digits only), 0 or more";
const ACCEPT_SIGNED_BYTES: &str =
    "a whole number of bytes (digits only, no unit); 0 or less means unlimited";
const ACCEPT_SECONDS: &str =
    "a whole number of seconds (digits only, no unit); 0 or less means no timeout";
const ACCEPT_IDLE_SECONDS: &str = "a whole number of seconds (digits only, no unit); 0 means \
     HTTP_READ_TIMEOUT, less than 0 means no timeout";
const ACCEPT_RETRY_SECONDS: &str =
    "a whole number of seconds (digits only, no unit); 0 or less means no retry";
const ACCEPT_STALE_SECONDS: &str =
    "a whole number of seconds (digits only, no unit); 0 or less means never";
const ACCEPT_EAB_KEY: &str =
    "the base64url-encoded HMAC key from your CA (RFC 4648 section 5, padding optional), set together with EAB_KID";
const ACCEPT_EAB_KID: &str = "the key identifier from your CA, set together with EAB_HMAC_KEY";
const ACCEPT_DOMAINS: &str =
    "a comma-separated list of DNS names (internationalized names are converted to punycode)";
const ACCEPT_CHALLENGES: &str =
    "a comma-separated list of ACME challenge types: tls-alpn-01, http-01 (tried in that order)";
const ACCEPT_PEM_PAIR: &str =
    "a path to a PEM file, set together with TLS_CERTIFICATE_PATH and TLS_PRIVATE_KEY_PATH";
const ACCEPT_TLS_SOURCE: &str = "TLS_LOCAL or TLS_CERTIFICATE_PATH/TLS_PRIVATE_KEY_PATH, not both";
const ACCEPT_DEFAULT_DOMAIN: &str =
    "one of the TLS_DOMAIN names, or none (refuse handshakes whose SNI matches no certificate)";
const ACCEPT_JITTER: &str =
    "a whole number of bytes from 0 to 65533 (digits only); 0 or less disables padding";

/// A timeout setting; `None` means no timeout.
pub type Timeout = Option<Duration>;

/// The whole configuration of one proxy instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub target_port: u16,
    pub cache_size: u64,
    pub max_cache_item_size: u64,
    /// How long past freshness a cached response may stand in for an
    /// upstream error when the response does not say (RFC 5861).
    pub cache_stale_if_error: Duration,
    /// The disk tier's directory; `None` (`CACHE_DISK_PATH=none`, or a
    /// `CACHE_DISK_SIZE` of 0) keeps the cache in memory only.
    pub cache_disk_path: Option<PathBuf>,
    /// The disk tier's budget in bytes (counted in 4 KiB blocks).
    pub cache_disk_size: u64,
    /// Largest body the disk tier stores, in bytes.
    pub cache_disk_max_item_size: u64,
    /// `CACHE_REDIS_URL` as given (checked when the tier starts, where the
    /// URL parser lives).
    pub cache_redis_url: Option<String>,
    pub cache_redis_timeout: Duration,
    pub cache_redis_ca_file: Option<PathBuf>,
    /// `CACHE_RELEASE`; `None` = releases are not tracked.
    pub cache_release: Option<String>,
    /// Port of the loopback admin listener; 0 = a free one.
    pub admin_port: u16,
    pub x_sendfile_enabled: bool,
    /// Canonical directories X-Sendfile may serve files from.
    pub x_sendfile_roots: Vec<PathBuf>,
    pub gzip_compression_enabled: bool,
    pub gzip_compression_disable_on_auth: bool,
    pub gzip_compression_jitter: u32,
    /// `None` means unlimited.
    pub max_request_body: Option<u64>,
    /// Read request bodies completely before forwarding them.
    pub request_buffering: bool,
    /// Bytes of a buffered request body kept in memory before spilling to disk.
    pub request_buffer_memory: u64,
    /// Bytes of a request body buffered at most; past it the rest streams.
    pub request_buffer_max: u64,
    /// Bytes per second a request body must average over each
    /// `BODY_RATE_WINDOW`; 0 = no minimum.
    pub request_body_min_rate: u64,
    /// Read upstream responses as fast as the app sends them, whatever the
    /// client's pace.
    pub response_buffering: bool,
    /// Bytes of a response waiting for a slow client kept in memory.
    pub response_buffer_memory: u64,
    /// Bytes of a response waiting for a slow client kept on disk at most;
    /// past it the app waits for the client.
    pub response_buffer_max: u64,
    pub tls_domains: Vec<String>,
    pub acme_directory: String,
    pub eab_kid: String,
    pub eab_hmac_key: String,
    /// `EAB_KID` with the decoded `EAB_HMAC_KEY`, when both are set.
    pub eab: Option<Eab>,
    /// Extra CA certificates (PEM bundle) trusted for the ACME directory.
    pub acme_ca_file: Option<PathBuf>,
    /// Challenge types to try, in order.
    pub acme_challenges: Vec<AcmeChallenge>,
    /// Own certificate chain and private key (PEM), instead of ACME.
    pub tls_certificate_path: Option<PathBuf>,
    pub tls_private_key_path: Option<PathBuf>,
    /// A self-signed certificate for localhost (development).
    pub tls_local: bool,
    /// Whose certificate answers handshakes without a matching SNI; `None`
    /// refuses them.
    pub tls_default_domain: Option<String>,
    /// HTTP/3 on UDP `HTTPS_PORT` in TLS mode, advertised with `Alt-Svc`.
    pub http3_enabled: bool,
    pub storage_path: PathBuf,
    pub bad_gateway_page: PathBuf,
    pub http_port: u16,
    pub https_port: u16,
    pub http_idle_timeout: Timeout,
    pub http_read_timeout: Timeout,
    pub http_write_timeout: Timeout,
    /// Open client connections at most; 0 = derived from the fd limit.
    pub max_connections: u64,
    /// Open client connections per client IP at most; 0 = no per-IP cap.
    pub max_connections_per_ip: u32,
    /// How long a refused connection to the app is retried (app restarting).
    pub upstream_retry_timeout: Timeout,
    /// Requests in flight to the app at most; `0` = no cap.
    pub upstream_max_connections: u64,
    pub h2c_enabled: bool,
    pub forward_headers: bool,
    pub log_requests: bool,
    /// Paths whose request log lines are not written (LOG_REQUESTS_EXCLUDE).
    pub log_requests_exclude: Vec<PathPattern>,
    pub debug: bool,
    /// Port of the Prometheus metrics listener; 0 = no metrics.
    pub metrics_port: u16,
}

/// A request path to match exactly, or a prefix (written with a trailing
/// `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// `/up,/assets/*`: every item must be a path (leading `/`); a `*` may only
/// end an item. `None` for anything else, so a typo is an error at start,
/// not a log that silently keeps filling.
fn parse_path_patterns(value: &str) -> Option<Vec<PathPattern>> {
    parse_list(value)
        .into_iter()
        .map(|item| {
            if !item.starts_with('/') {
                return None;
            }
            match item.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => Some(PathPattern::Prefix(prefix.into())),
                None if !item.contains('*') => Some(PathPattern::Exact(item)),
                _ => None,
            }
        })
        .collect()
}

impl Default for Config {
    fn default() -> Self {
        Config::from_source(&NoSettings).expect("defaults are valid")
    }
}

struct NoSettings;
impl SettingSource for NoSettings {
    fn get(&self, _name: &str) -> Option<RawSetting> {
        None
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_source(&Environment)
    }

    /// Reads every setting from `source`; what it does not give takes its
    /// default from [`SETTINGS`].
    pub fn from_source(source: &dyn SettingSource) -> Result<Config, ConfigError> {
        let r = Reader { source };
        let tls_domains = r.domains("TLS_DOMAIN")?;
        let (eab_kid, eab_hmac_key, eab) = r.eab()?;
        let tls_local = r.bool("TLS_LOCAL")?;
        let (tls_certificate_path, tls_private_key_path) = r.pem_pair(tls_local)?;
        let tls = !tls_domains.is_empty() || tls_local || tls_certificate_path.is_some();
        let tls_default_domain = r.default_domain(&tls_domains)?;
        let read_timeout = r.seconds("HTTP_READ_TIMEOUT")?;
        // Thruster: an idle timeout of 0 falls back to the read timeout.
        let idle_timeout = match r.int("HTTP_IDLE_TIMEOUT")? {
            0 => read_timeout,
            n => seconds(n),
        };
        let storage_path: PathBuf = r.string("STORAGE_PATH")?.into();
        let cache_disk_size = r.unsigned("CACHE_DISK_SIZE")?;
        // Next to the ACME keys by default, so one volume (Kamal keeps
        // `storage/` on one) carries both across deploys.
        let cache_disk_path = match r.raw("CACHE_DISK_PATH") {
            Some(s) if s.value == "none" => None,
            Some(s) => Some(PathBuf::from(s.value)),
            None => Some(storage_path.join("cache")),
        }
        .filter(|_| cache_disk_size > 0);
        Ok(Config {
            target_port: r.port("TARGET_PORT", 1)?,
            cache_size: r.unsigned("CACHE_SIZE")?,
            max_cache_item_size: r.unsigned("MAX_CACHE_ITEM_SIZE")?,
            cache_stale_if_error: r.seconds("CACHE_STALE_IF_ERROR")?.unwrap_or(Duration::ZERO),
            cache_disk_path,
            cache_disk_size,
            cache_disk_max_item_size: r.unsigned("CACHE_DISK_MAX_ITEM_SIZE")?,
            cache_redis_url: r.parsed("CACHE_REDIS_URL", parse_redis_url)?,
            cache_redis_timeout: Duration::from_millis(r.with_default(
                "CACHE_REDIS_TIMEOUT_MS",
                |v| {
                    parse_int(v)
                        .filter(|n| *n >= 1)
                        .and_then(|n| u64::try_from(n).ok())
                },
            )?),
            cache_redis_ca_file: r.parsed("CACHE_REDIS_CA_FILE", |v| Some(PathBuf::from(v)))?,
            cache_release: r.parsed("CACHE_RELEASE", parse_release)?,
            admin_port: r.port("ADMIN_PORT", 0)?,
            x_sendfile_enabled: r.bool("X_SENDFILE_ENABLED")?,
            x_sendfile_roots: r
                .parsed("X_SENDFILE_ROOTS", |v| parse_roots(v).ok())?
                .unwrap_or_else(default_roots),
            gzip_compression_enabled: r.bool("GZIP_COMPRESSION_ENABLED")?,
            gzip_compression_disable_on_auth: r.bool("GZIP_COMPRESSION_DISABLE_ON_AUTH")?,
            gzip_compression_jitter: r.jitter("GZIP_COMPRESSION_JITTER")?,
            max_request_body: match r.int("MAX_REQUEST_BODY")? {
                n if n <= 0 => None,
                n => Some(n as u64),
            },
            request_buffering: r.bool("REQUEST_BUFFERING")?,
            request_buffer_memory: r.unsigned("REQUEST_BUFFER_MEMORY")?,
            request_buffer_max: r.unsigned("REQUEST_BUFFER_MAX")?,
            request_body_min_rate: r.unsigned("REQUEST_BODY_MIN_RATE")?,
            response_buffering: r.bool("RESPONSE_BUFFERING")?,
            response_buffer_memory: r.unsigned("RESPONSE_BUFFER_MEMORY")?,
            response_buffer_max: r.unsigned("RESPONSE_BUFFER_MAX")?,
            tls_domains,
            acme_directory: r.string("ACME_DIRECTORY")?,
            eab_kid,
            eab_hmac_key,
            eab,
            acme_ca_file: r.parsed("ACME_CA_FILE", |v| Some(PathBuf::from(v)))?,
            acme_challenges: r.with_default("ACME_CHALLENGES", parse_challenges)?,
            tls_certificate_path,
            tls_private_key_path,
            tls_local,
            tls_default_domain,
            http3_enabled: r.bool("HTTP3_ENABLED")?,
            storage_path,
            bad_gateway_page: r.string("BAD_GATEWAY_PAGE")?.into(),
            http_port: r.port("HTTP_PORT", 0)?,
            https_port: r.port("HTTPS_PORT", 0)?,
            http_idle_timeout: idle_timeout,
            http_read_timeout: read_timeout,
            http_write_timeout: r.seconds("HTTP_WRITE_TIMEOUT")?,
            upstream_retry_timeout: r.seconds("UPSTREAM_RETRY_TIMEOUT")?,
            upstream_max_connections: r.unsigned("UPSTREAM_MAX_CONNECTIONS")?,
            max_connections: r.unsigned("MAX_CONNECTIONS")?,
            max_connections_per_ip: r.unsigned("MAX_CONNECTIONS_PER_IP")?.min(u32::MAX as u64)
                as u32,
            h2c_enabled: r.bool("H2C_ENABLED")?,
            forward_headers: r.parsed("FORWARD_HEADERS", parse_bool)?.unwrap_or(!tls),
            log_requests: r.bool("LOG_REQUESTS")?,
            log_requests_exclude: r
                .parsed("LOG_REQUESTS_EXCLUDE", parse_path_patterns)?
                .unwrap_or_default(),
            debug: r.bool("DEBUG")?,
            metrics_port: r.port("METRICS_PORT", 0)?,
        })
    }

    /// TLS mode: ACME domains, own certificate files or a local
    /// self-signed certificate.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_domains.is_empty() || self.tls_local || self.tls_certificate_path.is_some()
    }

    /// Whether certificates come from an ACME CA (not own files, not local).
    pub fn acme_enabled(&self) -> bool {
        !self.tls_domains.is_empty() && !self.tls_local && self.tls_certificate_path.is_none()
    }
}

/// External Account Binding: key id and decoded HMAC key.
pub type Eab = (String, Vec<u8>);

/// An ACME challenge type the proxy can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    TlsAlpn01,
    Http01,
}

impl AcmeChallenge {
    pub fn name(self) -> &'static str {
        match self {
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Http01 => "http-01",
        }
    }
}

/// A host name as certificates and the redirect compare it: IDNA (UTS 46)
/// lookup rules, so lower-case ASCII with Unicode labels in punycode; a
/// trailing dot dropped. `None` if it is no valid name.
pub fn normalize_domain(name: &str) -> Option<String> {
    let name = name.trim().trim_end_matches('.');
    if name.is_empty() {
        return None;
    }
    let ascii = idna::domain_to_ascii(name).ok()?;
    let valid = !ascii.is_empty()
        && ascii.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(ascii)
}

fn seconds(n: i64) -> Timeout {
    (n > 0).then(|| Duration::from_secs(n as u64))
}

struct Reader<'a> {
    source: &'a dyn SettingSource,
}

/// The row of a setting `Config::from_source` reads; every name it reads is
/// in the table (`every_setting_is_read` checks it).
fn row_of(name: &str) -> &'static Setting {
    setting(name).unwrap_or_else(|| panic!("{name} is not in SETTINGS"))
}

impl Reader<'_> {
    fn raw(&self, name: &str) -> Option<RawSetting> {
        self.source.get(name)
    }

    /// The configured value of `name` parsed by `parse`, else its default
    /// value from [`SETTINGS`] parsed the same way, else `None` (no default
    /// value: unset or derived). A configured value `parse` refuses is an
    /// error quoting what the row accepts.
    fn parsed<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        let row = row_of(name);
        if let Some(raw) = self.raw(name) {
            return match parse(&raw.value) {
                Some(value) => Ok(Some(value)),
                None => Err(invalid(raw, row.accepted)),
            };
        }
        match row.default {
            Value(text) => match parse(text) {
                Some(value) => Ok(Some(value)),
                None => panic!("the default of {name}, {text:?}, is not {}", row.accepted),
            },
            Unset | Derived(_) => Ok(None),
        }
    }

    /// [`Reader::parsed`] for a setting whose row has a default value.
    fn with_default<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        Ok(self
            .parsed(name, parse)?
            .unwrap_or_else(|| panic!("{name} has no default value in SETTINGS")))
    }

    fn string(&self, name: &str) -> Result<String, ConfigError> {
        self.with_default(name, |v| Some(v.to_string()))
    }

    fn domains(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        Ok(self.parsed(name, parse_domains)?.unwrap_or_default())
    }

    /// `(EAB_KID, EAB_HMAC_KEY, both with the key decoded)`.
    fn eab(&self) -> Result<(String, String, Option<Eab>), ConfigError> {
        use base64::Engine as _;
        let kid = self.raw("EAB_KID");
        let key = self.raw("EAB_HMAC_KEY");
        let key_accepted = row_of("EAB_HMAC_KEY").accepted;
        match (kid, key) {
            (None, None) => Ok((String::new(), String::new(), None)),
            (Some(kid), None) => Err(invalid(kid, row_of("EAB_KID").accepted)),
            (None, Some(key)) => Err(invalid(key, key_accepted)),
            (Some(kid), Some(key)) => {
                let text = key.value.trim_end_matches('=');
                match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text) {
                    Ok(bytes) if !bytes.is_empty() => Ok((
                        kid.value.clone(),
                        key.value.clone(),
                        Some((kid.value, bytes)),
                    )),
                    _ => Err(invalid(key, key_accepted)),
                }
            }
        }
    }

    fn pem_pair(&self, local: bool) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
        let cert = self.raw("TLS_CERTIFICATE_PATH");
        let key = self.raw("TLS_PRIVATE_KEY_PATH");
        match (cert, key) {
            (None, None) => Ok((None, None)),
            (Some(cert), None) => Err(invalid(cert, row_of("TLS_CERTIFICATE_PATH").accepted)),
            (None, Some(key)) => Err(invalid(key, row_of("TLS_PRIVATE_KEY_PATH").accepted)),
            (Some(cert), Some(_)) if local => Err(invalid(cert, ACCEPT_TLS_SOURCE)),
            (Some(cert), Some(key)) => Ok((Some(cert.value.into()), Some(key.value.into()))),
        }
    }

    /// `TLS_DEFAULT_DOMAIN`: one of `domains` or `none`; derived from the
    /// first of `domains` when unset.
    fn default_domain(&self, domains: &[String]) -> Result<Option<String>, ConfigError> {
        let chosen = self.parsed("TLS_DEFAULT_DOMAIN", |value| {
            if value == "none" {
                return Some(None);
            }
            normalize_domain(value)
                .filter(|domain| domains.contains(domain))
                .map(Some)
        })?;
        Ok(chosen.unwrap_or_else(|| domains.first().cloned()))
    }

    fn bool(&self, name: &str) -> Result<bool, ConfigError> {
        self.with_default(name, parse_bool)
    }

    fn int(&self, name: &str) -> Result<i64, ConfigError> {
        self.with_default(name, parse_int)
    }

    /// A whole number, 0 or more.
    fn unsigned(&self, name: &str) -> Result<u64, ConfigError> {
        self.with_default(name, |v| parse_int(v).and_then(|n| u64::try_from(n).ok()))
    }

    fn port(&self, name: &str, min: i64) -> Result<u16, ConfigError> {
        self.with_default(name, |v| {
            parse_int(v)
                .filter(|n| (min..=65535).contains(n))
                .map(|n| n as u16)
        })
    }

    fn seconds(&self, name: &str) -> Result<Timeout, ConfigError> {
        self.int(name).map(seconds)
    }

    fn jitter(&self, name: &str) -> Result<u32, ConfigError> {
        self.with_default(name, |v| match parse_int(v)? {
            n if n <= 0 => Some(0),
            n if n < 65534 => Some(n as u32),
            _ => None,
        })
    }
}

/// A Redis URL's scheme; the rest is checked by the shared tier when it
/// starts (its parser knows every form).
fn parse_redis_url(value: &str) -> Option<String> {
    let lower = value.trim().to_ascii_lowercase();
    [
        "redis://",
        "rediss://",
        "valkey://",
        "valkeys://",
        "unix://",
        "redis+unix://",
        "valkey+unix://",
    ]
    .iter()
    .any(|scheme| lower.starts_with(scheme) && lower.len() > scheme.len())
    .then(|| value.trim().to_string())
}

/// A release name goes into every stored entry and is compared as is.
fn parse_release(value: &str) -> Option<String> {
    (!value.is_empty() && value.len() <= 200 && value.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| value.to_string())
}

/// A comma-separated list of domain names, normalised, first occurrence
/// kept; `None` if any is not a valid name.
fn parse_domains(value: &str) -> Option<Vec<String>> {
    let mut domains = Vec::new();
    for item in parse_list(value) {
        let domain = normalize_domain(&item)?;
        if !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    Some(domains)
}

/// A comma-separated, non-empty list of challenge types (any letter case),
/// first occurrence kept.
fn parse_challenges(value: &str) -> Option<Vec<AcmeChallenge>> {
    let mut list = Vec::new();
    for item in parse_list(value) {
        let challenge = match item.to_ascii_lowercase().as_str() {
            "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
            "http-01" => AcmeChallenge::Http01,
            _ => return None,
        };
        if !list.contains(&challenge) {
            list.push(challenge);
        }
    }
    (!list.is_empty()).then_some(list)
}

fn invalid(s: RawSetting, accepted: &'static str) -> ConfigError {
    ConfigError {
        source_name: s.source_name,
        value: s.value,
        accepted,
    }
}

/// Go's `strconv.ParseBool`: exact spellings only, no whitespace.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.Atoi`: optional sign, then ASCII digits, 64-bit range.
pub fn parse_int(value: &str) -> Option<i64> {
    let digits = value.strip_prefix(['+', '-']).unwrap_or(value);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<i64>().ok()
}

/// Comma-separated list: items trimmed, empty items dropped.
pub fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

/// Where X-Sendfile may read when `X_SENDFILE_ROOTS` is not set: the working
/// directory (the application) and the temporary directory (where Rack and
/// Rails put generated downloads), both `std::env::temp_dir()` and `/tmp` as
/// they differ when `TMPDIR` is set. Canonical, without duplicates; a
/// directory that does not exist is left out.
pub fn default_roots() -> Vec<PathBuf> {
    let candidates = [
        std::env::current_dir().ok(),
        Some(std::env::temp_dir()),
        Some(PathBuf::from("/tmp")),
    ];
    let mut roots = Vec::new();
    for dir in candidates.into_iter().flatten() {
        if let Ok(dir) = fs::canonicalize(dir) {
            if !roots.contains(&dir) {
                roots.push(dir);
            }
        }
    }
    roots
}

/// Parses an `X_SENDFILE_ROOTS` value: directories separated by commas, each
/// trimmed, empty items dropped — the same list syntax as every other list
/// setting (`config::parse_list`). A relative directory is relative to the
/// working directory at parse time.
///
/// Every directory must exist: a typo here would otherwise only show up as
/// every X-Sendfile response being refused. The error is a message naming
/// the entry. An empty list is an error too; a caller that wants "serve
/// nothing from disk" should say so with `X_SENDFILE_ENABLED=false`.
pub fn parse_roots(value: &str) -> Result<Vec<PathBuf>, String> {
    let mut roots = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let dir = fs::canonicalize(entry).map_err(|e| format!("{entry}: {e}"))?;
        if !dir.is_dir() {
            return Err(format!("{entry}: not a directory"));
        }
        if !roots.contains(&dir) {
            roots.push(dir);
        }
    }
    if roots.is_empty() {
        return Err("no directory given".to_string());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_support::TempDir;
    use std::collections::HashMap;
    use std::fs;

    struct Map(HashMap<&'static str, &'static str>);
    impl SettingSource for Map {
        fn get(&self, name: &str) -> Option<RawSetting> {
            prefixed_lookup(name, |k| self.0.get(k).map(|v| v.to_string()))
        }
    }
    fn config(pairs: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        Config::from_source(&Map(pairs.iter().copied().collect()))
    }

    #[test]
    fn defaults_match_thruster() {
        let c = config(&[]).unwrap();
        assert_eq!(c.target_port, 3000);
        assert_eq!(c.http_port, 80);
        assert_eq!(c.https_port, 443);
        assert_eq!(c.cache_size, 64 * 1024 * 1024);
        assert_eq!(c.max_cache_item_size, 1024 * 1024);
        assert_eq!(c.max_request_body, None);
        assert_eq!(c.gzip_compression_jitter, 32);
        assert_eq!(c.http_idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.http_read_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.http_write_timeout, Some(Duration::from_secs(30)));
        assert!(c.forward_headers && c.log_requests && c.x_sendfile_enabled);
        assert!(!c.h2c_enabled && !c.debug && !c.tls_enabled());
        assert_eq!(c.bad_gateway_page, PathBuf::from("./public/502.html"));
        assert_eq!(c, Config::default());
    }

    #[test]
    fn prefixed_variable_wins_and_empty_counts_as_unset() {
        let c = config(&[("THRUSTER_HTTP_PORT", "8080"), ("HTTP_PORT", "9090")]).unwrap();
        assert_eq!(c.http_port, 8080);
        let c = config(&[("THRUSTER_HTTP_PORT", ""), ("HTTP_PORT", "9090")]).unwrap();
        assert_eq!(c.http_port, 9090);
        let c = config(&[("HTTP_PORT", "")]).unwrap();
        assert_eq!(c.http_port, 80);
    }

    #[test]
    fn invalid_values_name_the_variable_value_and_accepted_values() {
        let cases: &[(&str, &str, &str)] = &[
            ("HTTP_PORT", "abc", "TCP port"),
            ("HTTP_PORT", "65536", "TCP port"),
            ("TARGET_PORT", "0", "from 1 to 65535"),
            ("CACHE_SIZE", "64MB", "bytes"),
            ("CACHE_SIZE", "-1", "bytes"),
            ("HTTP_READ_TIMEOUT", "30s", "seconds"),
            ("LOG_REQUESTS", "yes", "boolean"),
            ("DEBUG", " true", "boolean"),
            ("GZIP_COMPRESSION_JITTER", "65534", "65533"),
            ("MAX_REQUEST_BODY", "1e6", "bytes"),
        ];
        for (name, value, hint) in cases {
            let err = config(&[(name, value)]).unwrap_err();
            assert_eq!(err.source_name, *name);
            assert_eq!(err.value, *value);
            let text = err.to_string();
            assert!(text.contains(name) && text.contains(hint), "{text}");
        }
        let err = config(&[("THRUSTER_TARGET_PORT", "x")]).unwrap_err();
        assert_eq!(err.source_name, "THRUSTER_TARGET_PORT");
    }

    #[test]
    fn cache_disk_path_follows_storage_path_and_none_or_size_zero_turn_it_off() {
        let c = config(&[]).unwrap();
        assert_eq!(
            c.cache_disk_path,
            Some(PathBuf::from("./storage/thruster/cache"))
        );
        assert_eq!(c.cache_disk_size, 256 << 20);
        assert_eq!(c.cache_disk_max_item_size, 64 << 20);
        let c = config(&[("STORAGE_PATH", "/var/lib/app")]).unwrap();
        assert_eq!(c.cache_disk_path, Some(PathBuf::from("/var/lib/app/cache")));
        let c = config(&[("STORAGE_PATH", "/a"), ("CACHE_DISK_PATH", "/b")]).unwrap();
        assert_eq!(c.cache_disk_path, Some(PathBuf::from("/b")));
        assert_eq!(
            config(&[("CACHE_DISK_PATH", "none")])
                .unwrap()
                .cache_disk_path,
            None
        );
        assert_eq!(
            config(&[("CACHE_DISK_SIZE", "0")]).unwrap().cache_disk_path,
            None
        );
        assert!(config(&[("CACHE_DISK_SIZE", "1GB")]).is_err());
    }

    #[test]
    fn go_style_booleans() {
        for v in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(v), Some(true), "{v}");
        }
        for v in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(v), Some(false), "{v}");
        }
        for v in ["yes", "on", "", " true", "tRUE"] {
            assert_eq!(parse_bool(v), None, "{v}");
        }
    }

    #[test]
    fn go_style_integers() {
        assert_eq!(parse_int("+5"), Some(5));
        assert_eq!(parse_int("-5"), Some(-5));
        for v in [
            "",
            "+",
            " 5",
            "5 ",
            "1_000",
            "1e6",
            "0x10",
            "99999999999999999999",
        ] {
            assert_eq!(parse_int(v), None, "{v}");
        }
    }

    #[test]
    fn tls_domain_list_and_forward_headers_default() {
        let c = config(&[("TLS_DOMAIN", "  ,   example.com, example.io,")]).unwrap();
        assert_eq!(c.tls_domains, vec!["example.com", "example.io"]);
        assert!(!c.forward_headers);
        let c = config(&[("TLS_DOMAIN", "a.com"), ("FORWARD_HEADERS", "1")]).unwrap();
        assert!(c.forward_headers);
    }

    #[test]
    fn tls_domains_are_normalized_to_punycode_and_bad_names_refused() {
        let c = config(&[("TLS_DOMAIN", "Example.COM., bücher.example, example.com")]).unwrap();
        assert_eq!(c.tls_domains, vec!["example.com", "xn--bcher-kva.example"]);
        assert_eq!(c.tls_default_domain.as_deref(), Some("example.com"));
        assert!(c.acme_enabled());
        for bad in ["exa mple.com", "a..b", "foo/bar"] {
            let err = config(&[("TLS_DOMAIN", bad)]).unwrap_err();
            assert_eq!(err.source_name, "TLS_DOMAIN", "{bad}");
        }
    }

    #[test]
    fn tls_sources_eab_challenges_and_default_domain() {
        let c = config(&[("TLS_LOCAL", "1")]).unwrap();
        assert!(c.tls_enabled() && !c.acme_enabled() && !c.forward_headers);
        let c = config(&[
            ("TLS_CERTIFICATE_PATH", "/c.pem"),
            ("TLS_PRIVATE_KEY_PATH", "/k.pem"),
        ])
        .unwrap();
        assert!(c.tls_enabled() && !c.acme_enabled());
        assert_eq!(c.tls_private_key_path, Some(PathBuf::from("/k.pem")));
        let err = config(&[("TLS_CERTIFICATE_PATH", "/c.pem")]).unwrap_err();
        assert_eq!(err.source_name, "TLS_CERTIFICATE_PATH");
        let err = config(&[
            ("TLS_LOCAL", "true"),
            ("TLS_CERTIFICATE_PATH", "/c.pem"),
            ("TLS_PRIVATE_KEY_PATH", "/k.pem"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");

        let c = config(&[("EAB_KID", "kid-1"), ("EAB_HMAC_KEY", "aGVsbG8")]).unwrap();
        assert_eq!(c.eab, Some(("kid-1".to_string(), b"hello".to_vec())));
        let err = config(&[("EAB_KID", "kid-1"), ("EAB_HMAC_KEY", "no good!")]).unwrap_err();
        assert_eq!(err.source_name, "EAB_HMAC_KEY");
        let err = config(&[("EAB_HMAC_KEY", "aGVsbG8")]).unwrap_err();
        assert_eq!(err.source_name, "EAB_HMAC_KEY");

        let c = config(&[("ACME_CHALLENGES", "http-01")]).unwrap();
        assert_eq!(c.acme_challenges, vec![AcmeChallenge::Http01]);
        let err = config(&[("ACME_CHALLENGES", "dns-01")]).unwrap_err();
        assert!(err.to_string().contains("tls-alpn-01"), "{err}");

        let c = config(&[
            ("TLS_DOMAIN", "a.com,b.com"),
            ("TLS_DEFAULT_DOMAIN", "B.com"),
        ])
        .unwrap();
        assert_eq!(c.tls_default_domain.as_deref(), Some("b.com"));
        let c = config(&[("TLS_DOMAIN", "a.com"), ("TLS_DEFAULT_DOMAIN", "none")]).unwrap();
        assert_eq!(c.tls_default_domain, None);
        let err = config(&[("TLS_DOMAIN", "a.com"), ("TLS_DEFAULT_DOMAIN", "c.com")]).unwrap_err();
        assert_eq!(err.source_name, "TLS_DEFAULT_DOMAIN");
    }

    #[test]
    fn timeouts_zero_or_negative_mean_none_and_idle_zero_follows_read() {
        let c = config(&[("HTTP_READ_TIMEOUT", "0"), ("HTTP_WRITE_TIMEOUT", "-1")]).unwrap();
        assert_eq!(c.http_read_timeout, None);
        assert_eq!(c.http_write_timeout, None);
        let c = config(&[("HTTP_IDLE_TIMEOUT", "0"), ("HTTP_READ_TIMEOUT", "7")]).unwrap();
        assert_eq!(c.http_idle_timeout, Some(Duration::from_secs(7)));
        let c = config(&[("HTTP_IDLE_TIMEOUT", "-1")]).unwrap();
        assert_eq!(c.http_idle_timeout, None);
    }

    #[test]
    fn keywords_win_over_the_environment_and_unknown_ones_are_named() {
        let env = Map([
            ("THRUSTER_HTTP_PORT", "81"),
            ("HTTP_PORT", "82"),
            ("DEBUG", "1"),
        ]
        .into_iter()
        .collect());
        let layered = Layered::new([("http_port".to_string(), "8080".to_string())], &env).unwrap();
        let c = Config::from_source(&layered).unwrap();
        assert_eq!(c.http_port, 8080);
        assert!(c.debug, "unset keywords fall through to the environment");

        let layered = Layered::new([("http_port".to_string(), "abc".to_string())], &env).unwrap();
        let err = Config::from_source(&layered).unwrap_err();
        assert_eq!(err.source_name, "http_port");

        let err = Layered::new([("http_prot".to_string(), "1".to_string())], &env)
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("http_prot") && text.contains("http_port"),
            "{text}"
        );
        assert!(Layered::new([("HTTP_PORT".to_string(), "1".to_string())], &env).is_err());
    }

    fn repository_file(path: &str) -> (std::path::PathBuf, String) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (path, text)
    }

    /// The Markdown table of every setting, as `docs/configuration.md`
    /// shows it.
    fn markdown_table() -> String {
        let mut table = String::from("| Variable | Default | Meaning |\n|---|---|---|\n");
        for s in SETTINGS {
            table.push_str(&format!(
                "| `{}` | {} | {} |\n",
                s.name,
                s.default_markdown(),
                s.meaning
            ));
        }
        table
    }

    /// The lines of the first Markdown table in `text` whose header starts
    /// with `| Variable |`, after `heading` when given: (first line index,
    /// lines).
    fn variable_table<'a>(text: &'a str, heading: Option<&str>) -> (usize, Vec<&'a str>) {
        let lines: Vec<&str> = text.lines().collect();
        let from = heading.map_or(0, |h| {
            lines
                .iter()
                .position(|l| *l == h)
                .unwrap_or_else(|| panic!("no {h:?} heading"))
        });
        let start = from
            + lines[from..]
                .iter()
                .position(|l| l.starts_with("| Variable |"))
                .expect("a table whose header starts with | Variable |");
        let rows = lines[start..]
            .iter()
            .take_while(|l| l.starts_with('|'))
            .copied()
            .collect();
        (start, rows)
    }

    #[test]
    fn the_settings_table_is_well_formed() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len(), "a name is listed twice");
        for s in SETTINGS {
            assert!(
                s.name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                s.name
            );
            assert!(!s.accepted.is_empty(), "{}", s.name);
            // One table cell each, one sentence or more.
            for cell in [s.meaning, &s.default_markdown()] {
                assert!(
                    !cell.is_empty() && !cell.contains(['|', '\n']),
                    "{}",
                    s.name
                );
            }
            assert!(s.meaning.ends_with('.'), "{}", s.name);
        }
    }

    #[test]
    fn configuring_a_default_value_changes_nothing() {
        // What the documentation and `thrust --help` show as the default
        // is what an unset setting gets.
        let defaults = Config::default();
        for s in SETTINGS {
            if let DefaultValue::Value(text) = s.default {
                assert_eq!(
                    config(&[(s.name, text)]),
                    Ok(defaults.clone()),
                    "{}",
                    s.name
                );
            }
        }
    }

    #[test]
    fn the_documentation_table_is_the_settings_table() {
        // Users learn the settings from docs/configuration.md: its table is
        // SETTINGS rendered, so none is missing and no default or meaning
        // drifts. After changing SETTINGS, `UPDATE_DOCS=1 cargo test -p
        // thruster_core --lib config` rewrites the table.
        let (path, text) = repository_file("docs/configuration.md");
        let (start, rows) = variable_table(&text, None);
        let expected = markdown_table();
        let found = rows.iter().map(|l| format!("{l}\n")).collect::<String>();
        if found != expected && std::env::var_os("UPDATE_DOCS").is_some() {
            let mut lines: Vec<&str> = text.lines().collect();
            lines.splice(start..start + rows.len(), expected.lines());
            fs::write(&path, lines.join("\n") + "\n").unwrap();
            return;
        }
        let wanted: Vec<&str> = expected.lines().filter(|l| !rows.contains(l)).collect();
        let unwanted: Vec<&str> = rows
            .iter()
            .filter(|l| !expected.lines().any(|e| e == **l))
            .copied()
            .collect();
        assert!(
            found == expected,
            "the table in docs/configuration.md is not SETTINGS rendered (in order); \
             UPDATE_DOCS=1 rewrites it. Rows it lacks: {wanted:#?}; rows to drop: {unwanted:#?}"
        );
        assert_eq!(
            text.matches("| Variable |").count(),
            1,
            "one settings table in docs/configuration.md"
        );
    }

    #[test]
    fn the_readme_names_main_settings_with_their_defaults() {
        // The README's short table: settings that exist, with their
        // defaults; the meanings there are shorter, the rest is linked.
        let (_, text) = repository_file("README.md");
        let (_, rows) = variable_table(&text, Some("## Configuration"));
        assert!(rows.len() > 3, "{rows:?}");
        for row in &rows[2..] {
            let cells: Vec<&str> = row.split(" | ").collect();
            let name = cells[0].trim_start_matches("| ").trim_matches('`');
            let s = setting(name).unwrap_or_else(|| panic!("{name} in the README is no setting"));
            assert_eq!(
                cells[1],
                s.default_markdown(),
                "default of {name} in the README"
            );
        }
        assert!(text.contains("(docs/configuration.md)"));
    }

    #[test]
    fn every_setting_is_read() {
        // A setting listed for users but never read would silently do nothing.
        struct Recorder(std::cell::RefCell<Vec<String>>);
        impl SettingSource for Recorder {
            fn get(&self, name: &str) -> Option<RawSetting> {
                self.0.borrow_mut().push(name.to_string());
                None
            }
        }
        let rec = Recorder(Default::default());
        Config::from_source(&rec).unwrap();
        let mut read = rec.0.into_inner();
        read.sort();
        read.dedup();
        let mut listed: Vec<String> = SETTINGS.iter().map(|s| s.name.to_string()).collect();
        listed.sort();
        assert_eq!(read, listed);
    }

    #[test]
    fn roots() {
        let t = TempDir::new("roots");
        let a = t.0.join("a");
        let b = t.0.join("b");
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let file = t.file("f", b"");
        let (sa, sb) = (a.display().to_string(), b.display().to_string());

        assert_eq!(
            parse_roots(&format!("{sa},{sb}")),
            Ok(vec![a.clone(), b.clone()])
        );
        assert_eq!(
            parse_roots(&format!(" {sa} , ,{sb}/, {sa}/.")),
            Ok(vec![a.clone(), b.clone()])
        );
        assert_eq!(parse_roots(&format!("{sb}/../a")), Ok(vec![a.clone()]));
        assert!(parse_roots("").is_err());
        assert!(parse_roots(" , ").is_err());
        let missing = parse_roots(&format!("{sa},{sa}/nope")).unwrap_err();
        assert!(missing.starts_with(&format!("{sa}/nope: ")), "{missing}");
        assert_eq!(
            parse_roots(&file.display().to_string()),
            Err(format!("{}: not a directory", file.display()))
        );

        let defaults = default_roots();
        let cwd = fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
        assert_eq!(defaults[0], cwd);
        assert!(defaults.contains(&fs::canonicalize(std::env::temp_dir()).unwrap()));
        assert!(defaults.contains(&fs::canonicalize("/tmp").unwrap()));
        let mut unique = defaults.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), defaults.len());
    }

    #[test]
    fn log_exclusions_are_exact_paths_or_prefixes() {
        let c = config(&[("LOG_REQUESTS_EXCLUDE", " /up , /assets/*,")]).unwrap();
        assert_eq!(
            c.log_requests_exclude,
            [
                PathPattern::Exact("/up".into()),
                PathPattern::Prefix("/assets/".into())
            ]
        );
        let [up, assets] = &c.log_requests_exclude[..] else {
            unreachable!()
        };
        assert!(up.matches("/up") && !up.matches("/upload") && !up.matches("/up/"));
        assert!(assets.matches("/assets/app.css") && !assets.matches("/assets"));
        for bad in ["up", "/a*b", "/*/x", "*"] {
            let err = config(&[("LOG_REQUESTS_EXCLUDE", bad)]).unwrap_err();
            assert_eq!(err.accepted, ACCEPT_LOG_EXCLUDE, "{bad}");
        }
        assert!(config(&[]).unwrap().log_requests_exclude.is_empty());
    }
}
