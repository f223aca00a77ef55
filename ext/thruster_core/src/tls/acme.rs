//! ACME (RFC 8555) certificates for `TLS_DOMAIN`, through instant-acme.
//!
//! - At start-up, stored certificates that are still valid are served at
//!   once; then one task per domain issues what is missing (nobody waits for
//!   a first visitor) and renews each certificate when a third of its
//!   lifetime is left (at most 30 days before expiry), a little earlier by a
//!   random jitter so many domains do not renew at once.
//! - A failed issuance is logged with the CA's error and retried with
//!   exponential backoff (10 s doubling to 1 h, ±25 % jitter), cycling
//!   through `ACME_CHALLENGES`; whatever valid certificate is stored keeps
//!   being served meanwhile.
//! - Challenges: TLS-ALPN-01 (RFC 8737) is answered by the HTTPS listener's
//!   certificate resolver; HTTP-01 by the HTTP listener (`redirect`).
//! - Storage in `STORAGE_PATH` (0700): `acme-account-<hash>.json` (0600,
//!   one per directory URL), `<domain>.crt.pem`, `<domain>.key.pem` (0600)
//!   and `<domain>.directory` (the CA it came from: a certificate from
//!   another `ACME_DIRECTORY` is replaced at start-up); written atomically.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType,
    ExternalAccountKey, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::sys::ca;
use tokio::sync::watch;

use super::{certified_key, covers, leaf_validity, write_atomic, CertStore, TlsError};
use crate::config::{AcmeChallenge, Config};
use crate::log;
use crate::sys::Registration;

type HttpClient = Client<HttpsConnector<RegisteredConnector>, BodyWrapper<Bytes>>;

/// Longest single sleep, so clock changes and suspends are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
const FIRST_RETRY: Duration = Duration::from_secs(10);
const MAX_RETRY: Duration = Duration::from_secs(3600);
const MAX_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

pub struct Manager {
    directory: String,
    domains: Vec<String>,
    eab: Option<(String, Vec<u8>)>,
    challenges: Vec<AcmeChallenge>,
    storage: PathBuf,
    store: Arc<CertStore>,
    http: HttpClient,
    account: tokio::sync::Mutex<Option<Account>>,
}

impl Manager {
    pub fn new(config: &Config, store: Arc<CertStore>) -> Result<Manager, TlsError> {
        Ok(Manager {
            directory: config.acme_directory.clone(),
            domains: config.tls_domains.clone(),
            eab: config.eab.clone(),
            challenges: config.acme_challenges.clone(),
            storage: config.storage_path.clone(),
            store,
            http: http_client(config.acme_ca_file.as_deref())?,
            account: tokio::sync::Mutex::new(None),
        })
    }

    pub fn uses_tls_alpn(&self) -> bool {
        self.challenges.contains(&AcmeChallenge::TlsAlpn01)
    }

    fn cert_path(&self, domain: &str) -> PathBuf {
        self.storage.join(format!("{domain}.crt.pem"))
    }

    fn key_path(&self, domain: &str) -> PathBuf {
        self.storage.join(format!("{domain}.key.pem"))
    }

    /// The directory URL a stored certificate came from, so switching
    /// `ACME_DIRECTORY` (staging to production) gets a new certificate
    /// instead of serving the old CA's until renewal.
    fn issuer_path(&self, domain: &str) -> PathBuf {
        self.storage.join(format!("{domain}.directory"))
    }

    fn account_path(&self) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.directory.as_bytes());
        let hex: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.storage.join(format!("acme-account-{hex}.json"))
    }

    /// Serves every stored certificate that is still valid for its domain.
    pub fn load_stored(&self) {
        log::info(
            "TLS: initializing",
            &[
                ("directory", self.directory.clone().into()),
                ("storage", self.storage.display().to_string().into()),
                ("using_eab", self.eab.is_some().into()),
            ],
        );
        for domain in &self.domains {
            let (Ok(chain), Ok(key)) = (
                std::fs::read(self.cert_path(domain)),
                std::fs::read(self.key_path(domain)),
            ) else {
                continue;
            };
            let issuer = std::fs::read_to_string(self.issuer_path(domain)).unwrap_or_default();
            if issuer.trim() != self.directory {
                log::info(
                    "TLS: stored certificate is from another ACME directory; a new one will be issued",
                    &[
                        ("domain", domain.clone().into()),
                        ("stored_directory", issuer.trim().to_string().into()),
                    ],
                );
                continue;
            }
            match certified_key(&chain, &key) {
                Ok(key) if usable(&key, domain) => {
                    log::info(
                        "TLS: using stored certificate",
                        &[
                            ("domain", domain.clone().into()),
                            ("expires", expiry_text(&key).into()),
                        ],
                    );
                    self.store.set(domain, key);
                }
                Ok(_) => log::info(
                    "TLS: stored certificate expired or not for this domain; a new one will be issued",
                    &[("domain", domain.clone().into())],
                ),
                Err(err) => log::error(
                    "TLS: stored certificate unreadable; a new one will be issued",
                    &[("domain", domain.clone().into()), ("error", err.into())],
                ),
            }
        }
    }

    /// One issuing/renewing task per domain, until shutdown.
    pub fn spawn(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        for domain in self.domains.clone() {
            tokio::spawn(self.clone().manage(domain, shutdown.clone()));
        }
    }

    /// When the domain's certificate should be renewed (now if none).
    fn renewal_due(&self, domain: &str, jitter: f64) -> SystemTime {
        match self.store.get(domain).as_deref().and_then(leaf_validity) {
            Some((not_before, not_after)) => renewal_time(not_before, not_after, jitter),
            None => SystemTime::UNIX_EPOCH,
        }
    }

    async fn manage(self: Arc<Self>, domain: String, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        let mut retry_at: Option<SystemTime> = None;
        let mut jitter = crate::sys::random::fraction() * 0.1;
        loop {
            let now = SystemTime::now();
            let due = retry_at.unwrap_or_else(|| self.renewal_due(&domain, jitter));
            if let Ok(wait) = due.duration_since(now) {
                if !wait.is_zero() {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(wait.min(MAX_SLEEP)) => continue,
                    }
                }
            }
            let challenge = self.challenges[failures as usize % self.challenges.len()];
            let renewing = self.store.get(&domain).is_some();
            let result = tokio::select! {
                _ = shutdown.changed() => return,
                result = self.issue(&domain, challenge) => result,
            };
            if let Some(m) = crate::metrics::get() {
                m.acme_order(renewing, result.is_ok());
            }
            match result {
                Ok(key) => {
                    failures = 0;
                    retry_at = None;
                    jitter = crate::sys::random::fraction() * 0.1;
                    log::info(
                        if renewing {
                            "TLS: certificate renewed"
                        } else {
                            "TLS: certificate issued"
                        },
                        &[
                            ("domain", domain.clone().into()),
                            ("challenge", challenge.name().into()),
                            ("expires", expiry_text(&key).into()),
                        ],
                    );
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(failures);
                    retry_at = Some(SystemTime::now() + delay);
                    log::error(
                        "TLS: certificate issuance failed; will retry",
                        &[
                            ("domain", domain.clone().into()),
                            ("challenge", challenge.name().into()),
                            ("error", err.into()),
                            ("retry_in_s", delay.as_secs().into()),
                            ("serving_stored", renewing.into()),
                        ],
                    );
                }
            }
        }
    }

    async fn account(&self) -> Result<Account, String> {
        let mut slot = self.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let path = self.account_path();
        let builder = || Account::builder_with_http(Box::new(self.http.clone()));
        let account = match std::fs::read(&path) {
            Ok(bytes) => {
                let credentials: AccountCredentials = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("unreadable ACME account {}: {e}", path.display()))?;
                builder()
                    .from_credentials(credentials)
                    .await
                    .map_err(acme_error)?
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let eab = self
                    .eab
                    .as_ref()
                    .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
                let new_account = NewAccount {
                    contact: &[],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder()
                    .create(&new_account, self.directory.clone(), eab.as_ref())
                    .await
                    .map_err(acme_error)?;
                let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
                write_atomic(&path, &json, true).map_err(|e| {
                    format!(
                        "could not store the ACME account in {}: {e}",
                        path.display()
                    )
                })?;
                log::info(
                    "TLS: ACME account registered",
                    &[("directory", self.directory.clone().into())],
                );
                account
            }
            Err(err) => return Err(format!("could not read {}: {err}", path.display())),
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// One full order: authorize with `challenge`, finalize, download,
    /// store, serve.
    async fn issue(
        &self,
        domain: &str,
        challenge: AcmeChallenge,
    ) -> Result<Arc<CertifiedKey>, String> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(domain.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(acme_error)?;
        let mut published = Published {
            store: &self.store,
            domain,
            tokens: Vec::new(),
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(acme_error)?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => return Err(format!("authorization for {domain} is {other:?}")),
                }
                let kind = match challenge {
                    AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                    AcmeChallenge::Http01 => ChallengeType::Http01,
                };
                let mut handle = authz.challenge(kind).ok_or_else(|| {
                    format!(
                        "the CA offers no {} challenge for {domain}",
                        challenge.name()
                    )
                })?;
                let key_authorization = handle.key_authorization();
                match challenge {
                    AcmeChallenge::Http01 => {
                        self.store.set_http_token(
                            &handle.token,
                            Some(key_authorization.as_str().to_string()),
                        );
                        published.tokens.push(handle.token.clone());
                    }
                    AcmeChallenge::TlsAlpn01 => {
                        let cert = alpn_certificate(domain, key_authorization.digest().as_ref())?;
                        self.store.set_alpn_challenge(domain, Some(cert));
                    }
                }
                handle.set_ready().await.map_err(acme_error)?;
            }
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retries).await.map_err(acme_error)?;
        if status != OrderStatus::Ready {
            return Err(why_invalid(&mut order).await);
        }
        drop(published);
        let key_pem = order.finalize().await.map_err(acme_error)?;
        let chain_pem = order.poll_certificate(&retries).await.map_err(acme_error)?;
        let key = certified_key(chain_pem.as_bytes(), key_pem.as_bytes())?;
        write_atomic(&self.key_path(domain), key_pem.as_bytes(), true)
            .and_then(|_| write_atomic(&self.cert_path(domain), chain_pem.as_bytes(), false))
            .and_then(|_| {
                let directory = format!("{}\n", self.directory);
                write_atomic(&self.issuer_path(domain), directory.as_bytes(), false)
            })
            .map_err(|e| {
                format!(
                    "certificate issued but could not be stored in {}: {e}",
                    self.storage.display()
                )
            })?;
        self.store.set(domain, key.clone());
        Ok(key)
    }
}

/// Challenge responses published for one order; withdrawn when dropped.
struct Published<'a> {
    store: &'a CertStore,
    domain: &'a str,
    tokens: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        self.store.set_alpn_challenge(self.domain, None);
        for token in &self.tokens {
            self.store.set_http_token(token, None);
        }
    }
}

/// The CA's reasons for an invalid order, from its challenges.
async fn why_invalid(order: &mut Order) -> String {
    let mut problems = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            problems.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|c| c.error.as_ref().map(|p| p.to_string())),
            );
        }
    }
    if problems.is_empty() {
        "the order became invalid".into()
    } else {
        problems.join("; ")
    }
}

/// An error with its causes, on one line.
fn acme_error(err: instant_acme::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn usable(key: &CertifiedKey, domain: &str) -> bool {
    let fresh = leaf_validity(key).is_some_and(|(_, not_after)| not_after > SystemTime::now());
    fresh && covers(key, domain)
}

fn expiry_text(key: &CertifiedKey) -> String {
    leaf_validity(key)
        .map(|(_, not_after)| humantime::format_rfc3339_seconds(not_after).to_string())
        .unwrap_or_default()
}

/// Renew when a third of the lifetime is left (at most 30 days before
/// expiry), earlier by `jitter` (a fraction of that window).
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let window = (lifetime / 3).min(MAX_RENEW_BEFORE);
    let window = window + window.mul_f64(jitter.clamp(0.0, 1.0));
    not_after.checked_sub(window).unwrap_or(not_before)
}

/// Exponential backoff with ±25 % jitter.
fn retry_delay(failures: u32) -> Duration {
    let base = FIRST_RETRY
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY);
    base.mul_f64(0.75 + crate::sys::random::fraction() * 0.5)
}

/// The TLS-ALPN-01 validation certificate (RFC 8737 §3): self-signed, the
/// domain as its only SAN, the critical acmeIdentifier extension holding
/// the SHA-256 of the key authorization.
fn alpn_certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let failed = |e: rcgen::Error| format!("could not build the TLS-ALPN-01 certificate: {e}");
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(failed)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key_pair = rcgen::KeyPair::generate().map_err(failed)?;
    let cert = params.self_signed(&key_pair).map_err(failed)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    // Not `CertifiedKey::from_der`: its consistency check parses the
    // certificate with webpki, which rejects the critical acmeIdentifier
    // extension that is the point of this certificate.
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

/// The ACME client: system roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured)
/// plus the `ACME_CA_FILE` bundle, ring provider.
fn http_client(ca_file: Option<&Path>) -> Result<HttpClient, TlsError> {
    let tls = ca::client_config(ca_file).map_err(|e| match (e, ca_file) {
        (ca::CaError::File(why), Some(path)) => TlsError(format!(
            "invalid ACME_CA_FILE={:?}: expected a PEM bundle of CA certificates ({why})",
            path.display().to_string()
        )),
        _ => TlsError(
            "no CA certificates to verify the ACME directory with: install ca-certificates or set ACME_CA_FILE"
                .into(),
        ),
    })?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(RegisteredConnector);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// TCP connections to the CA, each socket in the fd registry from its
/// creation (through `sys`, like every socket of the proxy): a Puma worker
/// forked while one is open, or still connecting, closes it.
#[derive(Clone)]
struct RegisteredConnector;

/// Longest wait for one TCP connection to the CA.
const CA_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the ACME server, registered until dropped.
struct RegisteredStream {
    // Declared first so it drops (unregisters) before the socket closes.
    _registration: Registration,
    stream: TokioIo<tokio::net::TcpStream>,
}

impl tower_service::Service<http::Uri> for RegisteredConnector {
    type Response = RegisteredStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<RegisteredStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let connect = async {
                let mut last = std::io::Error::other(format!("{host} has no address"));
                // Each address in turn, as the resolver orders them.
                for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                    let (registration, socket) = crate::sys::tcp_socket(&addr)?.into_parts();
                    match socket.connect(addr).await {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            return Ok(RegisteredStream {
                                _registration: registration,
                                stream: TokioIo::new(stream),
                            });
                        }
                        Err(err) => last = err,
                    }
                }
                Err(last)
            };
            tokio::time::timeout(CA_CONNECT_TIMEOUT, connect)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {host}:{port} timed out"),
                    ))
                })
        })
    }
}

impl Connection for RegisteredStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for RegisteredStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for RegisteredStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_with_a_third_left_capped_at_30_days() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renewal_time(start, start + day * 90, 0.0), start + day * 60);
        assert_eq!(
            renewal_time(start, start + day * 365, 0.0),
            start + day * 335
        );
        assert_eq!(
            renewal_time(start, start + Duration::from_secs(30), 0.0),
            start + Duration::from_secs(20)
        );
        let jittered = renewal_time(start, start + day * 90, 0.1);
        assert_eq!(jittered, start + day * 57);
    }

    #[test]
    fn retry_backoff_grows_and_is_capped() {
        let first = retry_delay(1);
        assert!(first >= Duration::from_millis(7500) && first <= Duration::from_millis(12500));
        let third = retry_delay(3);
        assert!(third >= Duration::from_secs(30) && third <= Duration::from_secs(50));
        assert!(retry_delay(40) <= MAX_RETRY.mul_f64(1.25));
    }

    #[test]
    fn alpn_certificate_builds() {
        let key = alpn_certificate("a.test", &[7u8; 32]).unwrap();
        assert_eq!(key.cert.len(), 1);
        assert!(leaf_validity(&key).is_some());
    }
}
