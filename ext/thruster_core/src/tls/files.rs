//! The operator's own certificate: `TLS_CERTIFICATE_PATH` (PEM chain, leaf
//! first) and `TLS_PRIVATE_KEY_PATH` (PEM key). Both files are polled for
//! changes (modification time and size) and reloaded when they change; a
//! bad pair is logged and the previous certificate stays in service. No
//! signal is involved: SIGHUP belongs to the app.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::{certified_key, CertStore, TlsError};
use crate::log;

/// How often the files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

type Stamp = Option<(SystemTime, u64)>;

pub struct Watch {
    cert: PathBuf,
    key: PathBuf,
}

fn stamp(path: &std::path::Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Watch {
    pub fn new(cert: PathBuf, key: PathBuf) -> Watch {
        Watch { cert, key }
    }

    fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let read = |path: &PathBuf, name: &str| {
            std::fs::read(path).map_err(|e| {
                TlsError(format!(
                    "invalid {name}={:?}: expected a readable PEM file ({e})",
                    path.display().to_string()
                ))
            })
        };
        let chain = read(&self.cert, "TLS_CERTIFICATE_PATH")?;
        let key = read(&self.key, "TLS_PRIVATE_KEY_PATH")?;
        certified_key(&chain, &key).map_err(|e| {
            TlsError(format!(
                "invalid TLS_CERTIFICATE_PATH={:?} / TLS_PRIVATE_KEY_PATH={:?}: {e}",
                self.cert.display().to_string(),
                self.key.display().to_string()
            ))
        })
    }

    /// The first load, at start-up: an error stops the server.
    pub fn load_now(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        self.load()
    }

    pub fn spawn(&self, store: Arc<CertStore>, mut shutdown: watch::Receiver<bool>) {
        let watch = Watch::new(self.cert.clone(), self.key.clone());
        tokio::spawn(async move {
            let mut seen = (stamp(&watch.cert), stamp(&watch.key));
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                let now = (stamp(&watch.cert), stamp(&watch.key));
                if now == seen {
                    continue;
                }
                // The two files are often replaced one after the other:
                // a mismatched pair is retried on the next change.
                seen = now;
                match watch.load() {
                    Ok(key) => {
                        store.set_single(key);
                        log::info(
                            "TLS: certificate reloaded",
                            &[("path", watch.cert.display().to_string().into())],
                        );
                    }
                    Err(err) => log::error(
                        "TLS: certificate files changed but could not be loaded; keeping the previous certificate",
                        &[("error", err.to_string().into())],
                    ),
                }
            }
        });
    }
}
