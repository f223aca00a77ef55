//! TLS termination: the rustls server configuration (TLS 1.2 and 1.3, ALPN
//! `h2` and `http/1.1`), the certificate store that answers each handshake
//! by SNI, and where certificates come from:
//!
//! - `acme`: issued and renewed from an ACME CA for `TLS_DOMAIN`;
//! - `files`: the operator's own PEM files, reloaded when they change;
//! - `local`: a self-signed certificate for localhost (development).
//!
//! Certificates are swapped in the store without touching open
//! connections: a handshake reads the store once, a connection keeps the
//! certificate it was established with.

pub mod acme;
pub mod der;
pub mod files;
pub mod local;
pub mod redirect;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::watch;

use crate::config::{normalize_domain, Config};
use crate::log;

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Why TLS could not be set up; names the setting to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn read<T>(guard: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    guard
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(guard: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    guard
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every certificate the server can present, swapped atomically per entry.
#[derive(Debug, Default)]
pub struct CertStore {
    /// ACME certificates by (normalized) domain.
    by_name: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// The own or local certificate: served for every name.
    single: RwLock<Option<Arc<CertifiedKey>>>,
    /// Whose certificate answers a handshake without a matching SNI.
    default_name: Option<String>,
    /// TLS-ALPN-01 validation certificates by domain.
    alpn_challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// HTTP-01 key authorizations by token.
    http_tokens: RwLock<HashMap<String, String>>,
}

impl CertStore {
    pub fn new(default_name: Option<String>) -> CertStore {
        CertStore {
            default_name,
            ..CertStore::default()
        }
    }

    pub fn set(&self, domain: &str, key: Arc<CertifiedKey>) {
        write(&self.by_name).insert(domain.to_string(), key);
    }

    pub fn get(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        read(&self.by_name).get(domain).cloned()
    }

    pub fn set_single(&self, key: Arc<CertifiedKey>) {
        *write(&self.single) = Some(key);
    }

    pub fn single(&self) -> Option<Arc<CertifiedKey>> {
        read(&self.single).clone()
    }

    pub fn set_alpn_challenge(&self, domain: &str, key: Option<Arc<CertifiedKey>>) {
        let mut map = write(&self.alpn_challenges);
        match key {
            Some(key) => map.insert(domain.to_string(), key),
            None => map.remove(domain),
        };
    }

    pub fn set_http_token(&self, token: &str, key_authorization: Option<String>) {
        let mut map = write(&self.http_tokens);
        match key_authorization {
            Some(value) => map.insert(token.to_string(), value),
            None => map.remove(token),
        };
    }

    pub fn http_token(&self, token: &str) -> Option<String> {
        read(&self.http_tokens).get(token).cloned()
    }

    /// The certificate for a handshake: by SNI, else the default.
    pub fn for_name(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(single) = self.single() {
            return Some(single);
        }
        let by_name = read(&self.by_name);
        sni.and_then(|name| by_name.get(name))
            .or_else(|| self.default_name.as_ref().and_then(|d| by_name.get(d)))
            .cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().and_then(normalize_domain);
        let acme_validation = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme_validation {
            // RFC 8737 §3: only the validation certificate, never a real one.
            return sni.and_then(|name| read(&self.alpn_challenges).get(&name).cloned());
        }
        let key = self.for_name(sni.as_deref());
        if key.is_none() {
            log::debug(
                "TLS: no certificate for handshake",
                &[("server_name", sni.unwrap_or_default().into())],
            );
        }
        key
    }
}

/// Parses a PEM certificate chain and private key into a key rustls can
/// serve, checking that the key belongs to the first certificate.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("could not read the certificates: {e}"))?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("could not read the private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| format!("unusable certificate or key: {e}"))
}

/// `(notBefore, notAfter)` of the leaf certificate.
pub fn leaf_validity(key: &CertifiedKey) -> Option<(SystemTime, SystemTime)> {
    key.cert.first().and_then(|c| der::validity(c.as_ref()))
}

/// Whether the leaf certificate is valid for `name` (SAN rules, wildcards).
pub fn covers(key: &CertifiedKey, name: &str) -> bool {
    let (Some(leaf), Ok(server_name)) = (key.cert.first(), ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&server_name).is_ok())
}

/// The rustls server configuration: ring provider, TLS 1.2 and 1.3 only,
/// ALPN h2 then http/1.1 (plus acme-tls/1 when ACME validates over TLS).
pub fn server_config(
    store: Arc<CertStore>,
    acme_alpn: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(format!("TLS set-up failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme_alpn {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(config))
}

/// The ALPN protocol of HTTP/3 (RFC 9114 §3.1).
pub const H3_ALPN: &[u8] = b"h3";

/// The rustls configuration for QUIC: the same certificate store (so the
/// same SNI answers and hot swaps as TCP), TLS 1.3 only (RFC 9001 §4.2),
/// ALPN `h3` only. TLS-ALPN-01 validation stays on TCP. Early data stays
/// off (`max_early_data_size` 0): 0-RTT requests can be replayed.
pub fn quic_server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(format!("QUIC TLS set-up failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![H3_ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Where the certificates come from.
enum Source {
    Acme(Arc<acme::Manager>),
    Files(files::Watch),
    Local,
}

/// TLS state of a running server.
pub struct Tls {
    pub store: Arc<CertStore>,
    pub server_config: Arc<ServerConfig>,
    source: Source,
    domains: Vec<String>,
}

impl Tls {
    /// Loads what can be served right away (own files, the local
    /// certificate, ACME certificates stored earlier). Errors name the
    /// setting at fault.
    pub fn setup(config: &Config) -> Result<Tls, TlsError> {
        let store = Arc::new(CertStore::new(config.tls_default_domain.clone()));
        let source = if let (Some(cert), Some(key)) =
            (&config.tls_certificate_path, &config.tls_private_key_path)
        {
            let watch = files::Watch::new(cert.clone(), key.clone());
            store.set_single(watch.load_now()?);
            Source::Files(watch)
        } else if config.tls_local {
            store.set_single(local::certificate(
                &config.storage_path,
                &config.tls_domains,
            )?);
            Source::Local
        } else {
            let manager = acme::Manager::new(config, store.clone())?;
            manager.load_stored();
            Source::Acme(Arc::new(manager))
        };
        let acme_alpn = matches!(&source, Source::Acme(m) if m.uses_tls_alpn());
        Ok(Tls {
            server_config: server_config(store.clone(), acme_alpn)?,
            store,
            source,
            domains: config.tls_domains.clone(),
        })
    }

    /// Starts issuance/renewal or file polling on the server's runtime.
    pub fn spawn_background(&self, shutdown: watch::Receiver<bool>) {
        match &self.source {
            Source::Acme(manager) => manager.clone().spawn(shutdown),
            Source::Files(watch) => watch.spawn(self.store.clone(), shutdown),
            Source::Local => {}
        }
    }

    /// Whether a handshake for `name` would find a certificate now (its
    /// own, the own/local one, or the default domain's): only then may a
    /// response advertise HTTP/3 for it, since the QUIC handshake asks the
    /// same store.
    pub fn has_certificate_for(&self, name: &str) -> bool {
        if self.store.single().is_some() {
            return true;
        }
        let name = normalize_domain(name);
        self.store.for_name(name.as_deref()).is_some()
    }

    /// Whether the HTTP listener may redirect this host to HTTPS: one of
    /// `TLS_DOMAIN`, or a name the own/local certificate is valid for.
    pub fn serves_host(&self, host: &str) -> bool {
        self.domains.iter().any(|d| d == host)
            || self.store.single().is_some_and(|key| covers(&key, host))
    }

    /// When each served certificate expires, for the metrics: ACME
    /// certificates by domain; an own or local certificate (served for every
    /// name) under each `TLS_DOMAIN`, or `*` without one.
    pub fn certificate_expiries(&self) -> Vec<(String, SystemTime)> {
        if let Some(key) = self.store.single() {
            let Some((_, not_after)) = leaf_validity(&key) else {
                return Vec::new();
            };
            if self.domains.is_empty() {
                return vec![("*".to_string(), not_after)];
            }
            return self
                .domains
                .iter()
                .map(|d| (d.clone(), not_after))
                .collect();
        }
        self.domains
            .iter()
            .filter_map(|d| {
                let key = self.store.get(d)?;
                leaf_validity(&key).map(|(_, not_after)| (d.clone(), not_after))
            })
            .collect()
    }

    /// The certificate source, for the start-up log line.
    pub fn describe(&self) -> &'static str {
        match self.source {
            Source::Acme(_) => "acme",
            Source::Files(_) => "files",
            Source::Local => "local",
        }
    }
}

/// The storage directory, created with mode 0700.
pub fn ensure_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Writes `contents` atomically (temp file + rename in the same directory);
/// `private` files get mode 0600, others 0644.
pub fn write_atomic(path: &std::path::Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    ensure_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn pem_pairs_are_checked() {
        let (cert, key) = self_signed(&["a.test"]);
        let ck = certified_key(cert.as_bytes(), key.as_bytes()).unwrap();
        assert!(covers(&ck, "a.test"));
        assert!(!covers(&ck, "b.test"));
        let (_, other_key) = self_signed(&["a.test"]);
        let err = certified_key(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(err.contains("unusable"), "{err}");
        assert!(certified_key(b"", key.as_bytes()).is_err());
        assert!(certified_key(cert.as_bytes(), b"").is_err());
    }

    #[test]
    fn resolves_by_name_then_default_then_nothing() {
        let (cert, key) = self_signed(&["a.test"]);
        let a = certified_key(cert.as_bytes(), key.as_bytes()).unwrap();
        let (cert, key) = self_signed(&["b.test"]);
        let b = certified_key(cert.as_bytes(), key.as_bytes()).unwrap();
        let store = CertStore::new(Some("a.test".into()));
        assert!(store.for_name(Some("a.test")).is_none());
        store.set("a.test", a.clone());
        store.set("b.test", b.clone());
        assert!(Arc::ptr_eq(&store.for_name(Some("b.test")).unwrap(), &b));
        assert!(Arc::ptr_eq(&store.for_name(Some("x.test")).unwrap(), &a));
        assert!(Arc::ptr_eq(&store.for_name(None).unwrap(), &a));
        let strict = CertStore::new(None);
        strict.set("a.test", a);
        assert!(strict.for_name(Some("x.test")).is_none());
        assert!(strict.for_name(None).is_none());
    }

    #[test]
    fn atomic_private_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("thruster-tls-test-{}", std::process::id()));
        let path = dir.join("sub/key.pem");
        write_atomic(&path, b"one", true).unwrap();
        write_atomic(&path, b"two", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
