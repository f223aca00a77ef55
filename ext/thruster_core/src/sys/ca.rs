//! The CA certificates an outgoing TLS client trusts: the system's
//! (`rustls-native-certs`, which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`)
//! plus a PEM bundle a setting may name (`ACME_CA_FILE`,
//! `CACHE_REDIS_CA_FILE`). One place, so both clients accept and reject the
//! same files with the same reasons.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Why no client configuration could be made; each caller names its
/// setting in the message it shows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    /// The named bundle could not be read, held something other than PEM
    /// certificates, or none at all.
    #[error("{0}")]
    File(String),
    /// Neither the system nor a bundle gave a single CA certificate.
    #[error("no CA certificates")]
    NoRoots,
}

/// A TLS client configuration (ring) trusting the system's CAs and those
/// of `extra`, if given.
pub fn client_config(extra: Option<&Path>) -> Result<rustls::ClientConfig, CaError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = extra {
        let file = |e: &dyn std::fmt::Display| CaError::File(e.to_string());
        let bytes = std::fs::read(path).map_err(|e| file(&e))?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file(&e))?;
        if certs.is_empty() {
            return Err(CaError::File("no CERTIFICATE block found".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| file(&e))?;
        }
    }
    if roots.is_empty() {
        return Err(CaError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // ring supports TLS 1.2 and 1.3: cannot fail.
        .map_err(|e| CaError::File(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_are_read_or_refused_with_a_reason() {
        let dir = super::super::test_support::TempDir::new("ca");
        let missing = dir.0.join("missing.pem");
        assert!(matches!(
            client_config(Some(&missing)),
            Err(CaError::File(_))
        ));
        let empty = dir.0.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert_eq!(
            client_config(Some(&empty)).unwrap_err(),
            CaError::File("no CERTIFICATE block found".into())
        );
        let bad = dir.0.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(client_config(Some(&bad)), Err(CaError::File(_))));
    }
}
