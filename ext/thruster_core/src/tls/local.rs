//! `TLS_LOCAL=1`: a self-signed certificate for development, valid for
//! `localhost`, `127.0.0.1`, `::1` and any `TLS_DOMAIN` names. It is kept in
//! `STORAGE_PATH` (`local-cert.pem`, `local-key.pem`, 0600) and reused while
//! it covers those names, so a browser exception survives restarts.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;

use super::{certified_key, covers, leaf_validity, write_atomic, TlsError};
use crate::log;

pub const CERT_FILE: &str = "local-cert.pem";
pub const KEY_FILE: &str = "local-key.pem";

fn names(domains: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(domains.iter().cloned());
    names
}

fn reusable(storage: &Path, names: &[String]) -> Option<Arc<CertifiedKey>> {
    let chain = std::fs::read(storage.join(CERT_FILE)).ok()?;
    let key = std::fs::read(storage.join(KEY_FILE)).ok()?;
    let key = certified_key(&chain, &key).ok()?;
    let (_, not_after) = leaf_validity(&key)?;
    let fresh = not_after > SystemTime::now();
    (fresh && names.iter().all(|n| covers(&key, n))).then_some(key)
}

pub fn certificate(storage: &Path, domains: &[String]) -> Result<Arc<CertifiedKey>, TlsError> {
    let names = names(domains);
    if let Some(key) = reusable(storage, &names) {
        return Ok(key);
    }
    let failed = |e: &dyn std::fmt::Display| {
        TlsError(format!(
            "TLS_LOCAL: could not create a self-signed certificate in STORAGE_PATH={:?}: {e}",
            storage.display().to_string()
        ))
    };
    let mut params = rcgen::CertificateParams::new(names.clone()).map_err(|e| failed(&e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "thruster-rs local development");
    let key_pair = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
    let cert = params.self_signed(&key_pair).map_err(|e| failed(&e))?;
    let (cert_pem, key_pem) = (cert.pem(), key_pair.serialize_pem());
    write_atomic(&storage.join(KEY_FILE), key_pem.as_bytes(), true).map_err(|e| failed(&e))?;
    write_atomic(&storage.join(CERT_FILE), cert_pem.as_bytes(), false).map_err(|e| failed(&e))?;
    log::info(
        "TLS: created a self-signed certificate for local development",
        &[
            ("path", storage.join(CERT_FILE).display().to_string().into()),
            ("names", names.into()),
        ],
    );
    certified_key(cert_pem.as_bytes(), key_pem.as_bytes()).map_err(|e| failed(&e))
}
