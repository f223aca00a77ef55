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
    SETTINGS.iter().map(|(name, _)| *name).find(|name| {
        name.eq_ignore_ascii_case(keyword) && !keyword.contains(|c: char| c.is_ascii_uppercase())
    })
}

fn keyword_list() -> String {
    SETTINGS
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
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

/// Every setting the proxy understands, as (name, default): the default as
/// users read it — a value, a phrase such as "the working directory and the
/// temp directory", or empty when there is none. Only the names are read by
/// code: the README table is checked against them (a test below), and the
/// Ruby keywords are these names in snake_case.
pub const SETTINGS: &[(&str, &str)] = &[
    ("TARGET_PORT", "3000"),
    ("CACHE_SIZE", "67108864"),
    ("MAX_CACHE_ITEM_SIZE", "1048576"),
    ("CACHE_STALE_IF_ERROR", "300"),
    ("CACHE_DISK_PATH", "$STORAGE_PATH/cache"),
    ("CACHE_DISK_SIZE", "268435456"),
    ("CACHE_DISK_MAX_ITEM_SIZE", "67108864"),
    ("X_SENDFILE_ENABLED", "true"),
    (
        "X_SENDFILE_ROOTS",
        "the working directory and the temp directory",
    ),
    ("GZIP_COMPRESSION_ENABLED", "true"),
    ("GZIP_COMPRESSION_DISABLE_ON_AUTH", "false"),
    ("GZIP_COMPRESSION_JITTER", "32"),
    ("MAX_REQUEST_BODY", "0"),
    ("REQUEST_BUFFERING", "true"),
    ("REQUEST_BUFFER_MEMORY", "65536"),
    ("REQUEST_BUFFER_MAX", "104857600"),
    ("REQUEST_BODY_MIN_RATE", "64"),
    ("RESPONSE_BUFFERING", "true"),
    ("RESPONSE_BUFFER_MEMORY", "262144"),
    ("RESPONSE_BUFFER_MAX", "1073741824"),
    ("TLS_DOMAIN", ""),
    ("ACME_DIRECTORY", DEFAULT_ACME_DIRECTORY),
    ("EAB_KID", ""),
    ("EAB_HMAC_KEY", ""),
    ("ACME_CA_FILE", ""),
    ("ACME_CHALLENGES", "tls-alpn-01,http-01"),
    ("TLS_CERTIFICATE_PATH", ""),
    ("TLS_PRIVATE_KEY_PATH", ""),
    ("TLS_LOCAL", "false"),
    ("TLS_DEFAULT_DOMAIN", "the first TLS_DOMAIN"),
    ("STORAGE_PATH", "./storage/thruster"),
    ("BAD_GATEWAY_PAGE", "./public/502.html"),
    ("HTTP_PORT", "80"),
    ("HTTPS_PORT", "443"),
    ("HTTP_IDLE_TIMEOUT", "60"),
    ("MAX_CONNECTIONS", "0"),
    ("MAX_CONNECTIONS_PER_IP", "0"),
    ("UPSTREAM_RETRY_TIMEOUT", "5"),
    ("HTTP_READ_TIMEOUT", "30"),
    ("HTTP_WRITE_TIMEOUT", "30"),
    ("H2C_ENABLED", "false"),
    ("FORWARD_HEADERS", "true without TLS, false with TLS"),
    ("LOG_REQUESTS", "true"),
    ("DEBUG", "false"),
];

pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

const ACCEPT_BOOL: &str = "a boolean: 1, t, T, TRUE, true, True, 0, f, F, FALSE, false or False";
const ACCEPT_PORT: &str = "a TCP port number from 0 to 65535";
const ACCEPT_TARGET_PORT: &str = "a TCP port number from 1 to 65535";
const ACCEPT_DIRECTORIES: &str = "a comma-separated list of existing directories";
const ACCEPT_BYTES: &str = "a whole number of bytes (digits only, no unit), 0 or more";
const ACCEPT_SIGNED_BYTES: &str =
    "a whole number of bytes (digits only, no unit); 0 or less means unlimited";
const ACCEPT_SECONDS: &str =
    "a whole number of seconds (digits only, no unit); 0 or less means no timeout";
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
    pub h2c_enabled: bool,
    pub forward_headers: bool,
    pub log_requests: bool,
    pub debug: bool,
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

    pub fn from_source(source: &dyn SettingSource) -> Result<Config, ConfigError> {
        let r = Reader { source };
        let tls_domains = r.domains("TLS_DOMAIN")?;
        let (eab_kid, eab_hmac_key, eab) = r.eab()?;
        let tls_local = r.bool("TLS_LOCAL", false)?;
        let (tls_certificate_path, tls_private_key_path) = r.pem_pair(tls_local)?;
        let tls = !tls_domains.is_empty() || tls_local || tls_certificate_path.is_some();
        let tls_default_domain = r.default_domain(&tls_domains)?;
        let read_timeout = r.seconds("HTTP_READ_TIMEOUT", 30)?;
        // Thruster: an idle timeout of 0 falls back to the read timeout.
        let idle_timeout = match r.int("HTTP_IDLE_TIMEOUT", 60, ACCEPT_SECONDS)? {
            0 => read_timeout,
            n => seconds(n),
        };
        let storage_path: PathBuf = r.string("STORAGE_PATH", "./storage/thruster").into();
        let cache_disk_size = r.bytes("CACHE_DISK_SIZE", 256 << 20)?;
        // Next to the ACME keys by default, so one volume (Kamal keeps
        // `storage/` on one) carries both across deploys.
        let cache_disk_path = match r.raw("CACHE_DISK_PATH") {
            Some(s) if s.value == "none" => None,
            Some(s) => Some(PathBuf::from(s.value)),
            None => Some(storage_path.join("cache")),
        }
        .filter(|_| cache_disk_size > 0);
        Ok(Config {
            target_port: r.port("TARGET_PORT", 3000, 1, ACCEPT_TARGET_PORT)?,
            cache_size: r.bytes("CACHE_SIZE", 64 << 20)?,
            max_cache_item_size: r.bytes("MAX_CACHE_ITEM_SIZE", 1 << 20)?,
            cache_stale_if_error: r
                .seconds("CACHE_STALE_IF_ERROR", 300)?
                .unwrap_or(Duration::ZERO),
            cache_disk_path,
            cache_disk_size,
            cache_disk_max_item_size: r.bytes("CACHE_DISK_MAX_ITEM_SIZE", 64 << 20)?,
            x_sendfile_enabled: r.bool("X_SENDFILE_ENABLED", true)?,
            x_sendfile_roots: match r.raw("X_SENDFILE_ROOTS") {
                None => default_roots(),
                Some(s) => parse_roots(&s.value).map_err(|_| invalid(s, ACCEPT_DIRECTORIES))?,
            },
            gzip_compression_enabled: r.bool("GZIP_COMPRESSION_ENABLED", true)?,
            gzip_compression_disable_on_auth: r.bool("GZIP_COMPRESSION_DISABLE_ON_AUTH", false)?,
            gzip_compression_jitter: r.jitter("GZIP_COMPRESSION_JITTER", 32)?,
            max_request_body: match r.int("MAX_REQUEST_BODY", 0, ACCEPT_SIGNED_BYTES)? {
                n if n <= 0 => None,
                n => Some(n as u64),
            },
            request_buffering: r.bool("REQUEST_BUFFERING", true)?,
            request_buffer_memory: r.bytes("REQUEST_BUFFER_MEMORY", 64 << 10)?,
            request_buffer_max: r.bytes("REQUEST_BUFFER_MAX", 100 << 20)?,
            request_body_min_rate: r.bytes("REQUEST_BODY_MIN_RATE", 64)?,
            response_buffering: r.bool("RESPONSE_BUFFERING", true)?,
            response_buffer_memory: r.bytes("RESPONSE_BUFFER_MEMORY", 256 << 10)?,
            response_buffer_max: r.bytes("RESPONSE_BUFFER_MAX", 1 << 30)?,
            tls_domains,
            acme_directory: r.string("ACME_DIRECTORY", DEFAULT_ACME_DIRECTORY),
            eab_kid,
            eab_hmac_key,
            eab,
            acme_ca_file: r.raw("ACME_CA_FILE").map(|s| s.value.into()),
            acme_challenges: r.challenges("ACME_CHALLENGES")?,
            tls_certificate_path,
            tls_private_key_path,
            tls_local,
            tls_default_domain,
            storage_path,
            bad_gateway_page: r.string("BAD_GATEWAY_PAGE", "./public/502.html").into(),
            http_port: r.port("HTTP_PORT", 80, 0, ACCEPT_PORT)?,
            https_port: r.port("HTTPS_PORT", 443, 0, ACCEPT_PORT)?,
            http_idle_timeout: idle_timeout,
            http_read_timeout: read_timeout,
            http_write_timeout: r.seconds("HTTP_WRITE_TIMEOUT", 30)?,
            upstream_retry_timeout: r.seconds("UPSTREAM_RETRY_TIMEOUT", 5)?,
            max_connections: r.bytes("MAX_CONNECTIONS", 0)?,
            max_connections_per_ip: r.bytes("MAX_CONNECTIONS_PER_IP", 0)?.min(u32::MAX as u64)
                as u32,
            h2c_enabled: r.bool("H2C_ENABLED", false)?,
            forward_headers: r.bool("FORWARD_HEADERS", !tls)?,
            log_requests: r.bool("LOG_REQUESTS", true)?,
            debug: r.bool("DEBUG", false)?,
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

impl Reader<'_> {
    fn raw(&self, name: &str) -> Option<RawSetting> {
        self.source.get(name)
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.raw(name)
            .map(|s| s.value)
            .unwrap_or_else(|| default.to_string())
    }

    fn domains(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.raw(name) else {
            return Ok(Vec::new());
        };
        let mut domains = Vec::new();
        for item in parse_list(&raw.value) {
            match normalize_domain(&item) {
                Some(domain) if !domains.contains(&domain) => domains.push(domain),
                Some(_) => {}
                None => return Err(invalid(raw, ACCEPT_DOMAINS)),
            }
        }
        Ok(domains)
    }

    /// `(EAB_KID, EAB_HMAC_KEY, both with the key decoded)`.
    fn eab(&self) -> Result<(String, String, Option<Eab>), ConfigError> {
        use base64::Engine as _;
        let kid = self.raw("EAB_KID");
        let key = self.raw("EAB_HMAC_KEY");
        match (kid, key) {
            (None, None) => Ok((String::new(), String::new(), None)),
            (Some(kid), None) => Err(invalid(kid, ACCEPT_EAB_KID)),
            (None, Some(key)) => Err(invalid(key, ACCEPT_EAB_KEY)),
            (Some(kid), Some(key)) => {
                let text = key.value.trim_end_matches('=');
                match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text) {
                    Ok(bytes) if !bytes.is_empty() => Ok((
                        kid.value.clone(),
                        key.value.clone(),
                        Some((kid.value, bytes)),
                    )),
                    _ => Err(invalid(key, ACCEPT_EAB_KEY)),
                }
            }
        }
    }

    fn pem_pair(&self, local: bool) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
        let cert = self.raw("TLS_CERTIFICATE_PATH");
        let key = self.raw("TLS_PRIVATE_KEY_PATH");
        match (cert, key) {
            (None, None) => Ok((None, None)),
            (Some(cert), None) => Err(invalid(cert, ACCEPT_PEM_PAIR)),
            (None, Some(key)) => Err(invalid(key, ACCEPT_PEM_PAIR)),
            (Some(cert), Some(_)) if local => Err(invalid(cert, ACCEPT_TLS_SOURCE)),
            (Some(cert), Some(key)) => Ok((Some(cert.value.into()), Some(key.value.into()))),
        }
    }

    fn default_domain(&self, domains: &[String]) -> Result<Option<String>, ConfigError> {
        let Some(raw) = self.raw("TLS_DEFAULT_DOMAIN") else {
            return Ok(domains.first().cloned());
        };
        if raw.value == "none" {
            return Ok(None);
        }
        match normalize_domain(&raw.value) {
            Some(domain) if domains.contains(&domain) => Ok(Some(domain)),
            _ => Err(invalid(raw, ACCEPT_DEFAULT_DOMAIN)),
        }
    }

    fn challenges(&self, name: &str) -> Result<Vec<AcmeChallenge>, ConfigError> {
        let Some(raw) = self.raw(name) else {
            return Ok(vec![AcmeChallenge::TlsAlpn01, AcmeChallenge::Http01]);
        };
        let mut list = Vec::new();
        for item in parse_list(&raw.value) {
            let challenge = match item.to_ascii_lowercase().as_str() {
                "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
                "http-01" => AcmeChallenge::Http01,
                _ => return Err(invalid(raw, ACCEPT_CHALLENGES)),
            };
            if !list.contains(&challenge) {
                list.push(challenge);
            }
        }
        if list.is_empty() {
            return Err(invalid(raw, ACCEPT_CHALLENGES));
        }
        Ok(list)
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(s) => parse_bool(&s.value).ok_or_else(|| invalid(s, ACCEPT_BOOL)),
        }
    }

    fn int(&self, name: &str, default: i64, accepted: &'static str) -> Result<i64, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(s) => parse_int(&s.value).ok_or_else(|| invalid(s, accepted)),
        }
    }

    fn bytes(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(s) => match parse_int(&s.value) {
                Some(n) if n >= 0 => Ok(n as u64),
                _ => Err(invalid(s, ACCEPT_BYTES)),
            },
        }
    }

    fn port(
        &self,
        name: &str,
        default: u16,
        min: i64,
        accepted: &'static str,
    ) -> Result<u16, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(s) => match parse_int(&s.value) {
                Some(n) if (min..=65535).contains(&n) => Ok(n as u16),
                _ => Err(invalid(s, accepted)),
            },
        }
    }

    fn seconds(&self, name: &str, default: i64) -> Result<Timeout, ConfigError> {
        self.int(name, default, ACCEPT_SECONDS).map(seconds)
    }

    fn jitter(&self, name: &str, default: u32) -> Result<u32, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(s) => match parse_int(&s.value) {
                Some(n) if n <= 0 => Ok(0),
                Some(n) if n < 65534 => Ok(n as u32),
                _ => Err(invalid(s, ACCEPT_JITTER)),
            },
        }
    }
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

    #[test]
    fn every_setting_has_a_row_in_the_readme_table() {
        // Users learn the settings from the README: one missing there is
        // a knob nobody knows about.
        let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let text = std::fs::read_to_string(&readme).expect("README.md at the repository root");
        // The first cell of a table row names one or more settings.
        let documented: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split(" |").next())
            .flat_map(|cell| cell.split(['`', ',', ' ']))
            .filter(|name| !name.is_empty())
            .collect();
        let missing: Vec<&str> = SETTINGS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !documented.contains(name))
            .collect();
        assert!(missing.is_empty(), "not in the README table: {missing:?}");
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
        let mut listed: Vec<String> = SETTINGS.iter().map(|(n, _)| n.to_string()).collect();
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
}
