//! ACME against a real ACME server: Debian's `pebble` with
//! `pebble-challtestsrv` as its DNS, on loopback, with a test-generated API
//! certificate. Pebble's validator connects to the proxy's own HTTP and
//! HTTPS ports, so every challenge is answered by the code under test.
//!
//! Skipped (with a message) only when pebble is not installed; `bin/setup`
//! installs it.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::pebble::*;
use support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn tls_alpn_01_issuance_then_http2_through_puma_and_a_restart_reuses_the_stored_certificate() {
    if !pebble_installed() {
        return;
    }
    let rt = runtime();
    let ports = (free_port(), free_port());
    let pebble = Pebble::start(ports.0, ports.1, PebbleOptions::default());
    let puma = Puma::start();
    let upstream = puma
        .as_ref()
        .map_or_else(|| start_echo_upstream(&rt), |p| p.1);
    let tmp = TempDir::new("acme-alpn");
    // Not created yet: the proxy creates it (0700).
    let storage = tmp.path().join("storage");
    let domain = "alpn.example.test";
    let server = acme_proxy(
        &pebble,
        storage.as_path(),
        upstream,
        ports,
        &[("TLS_DOMAIN", domain), ("ACME_CHALLENGES", "tls-alpn-01")],
    );
    wait_for_certificate(storage.as_path(), domain, &pebble);
    // Pebble logs HTTP-01 validations; only TLS-ALPN-01 was offered as
    // ready, so the authorization was validated over the HTTPS port.
    assert!(pebble.log().contains("set VALID by completed challenge"));
    assert!(
        !pebble.log().contains("validate w/ HTTP"),
        "{}",
        pebble.log()
    );

    // Kept outside Pebble's directory, which goes with it.
    let root = tmp.path().join("root.pem");
    std::fs::copy(pebble.root(), &root).unwrap();
    let path = if puma.is_some() { "/up" } else { "/" };
    let (status, body, err) = curl(domain, ports.1, path, &root, &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    if puma.is_some() {
        assert_eq!(body, "up");
    }
    // The default certificate answers handshakes for names we do not know.
    let serial = served_serial(ports.1, domain).expect("a certificate");
    assert_eq!(
        served_serial(ports.1, "unknown.example.test"),
        Some(serial.clone())
    );

    // Storage: private key and account 0600, directory 0700.
    assert_eq!(
        mode(&storage.as_path().join(format!("{domain}.key.pem"))),
        0o600
    );
    assert_eq!(mode(storage.as_path()), 0o700);
    let account = std::fs::read_dir(storage.as_path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("acme-account-"))
        .expect("the account is stored");
    assert_eq!(mode(&account.path()), 0o600);

    // Second start with the CA still up: the stored certificate is served
    // at once and the CA is not contacted.
    server.stop(Duration::from_secs(1));
    let requests_to_ca = |p: &Pebble| p.log().matches("POST /").count();
    let before = requests_to_ca(&pebble);
    let server = acme_proxy(
        &pebble,
        storage.as_path(),
        upstream,
        ports,
        &[
            ("TLS_DOMAIN", domain),
            ("ACME_CHALLENGES", "tls-alpn-01"),
            ("TLS_DEFAULT_DOMAIN", "none"),
        ],
    );
    let (status, _, err) = curl(domain, ports.1, path, &root, &["--http2"]);
    assert_eq!(status, "2 200", "stored certificate served: {err}");
    assert_eq!(served_serial(ports.1, domain), Some(serial.clone()));
    // TLS_DEFAULT_DOMAIN=none: a handshake for another name is refused.
    assert_eq!(served_serial(ports.1, "unknown.example.test"), None);
    // Absence of contact cannot be polled for; give a wrong start a moment.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        requests_to_ca(&pebble),
        before,
        "the second start contacted the CA:\n{}",
        pebble.log()
    );
    server.stop(Duration::from_secs(1));

    // Another ACME_DIRECTORY (staging to production): a new certificate
    // from the new CA replaces the stored one.
    let other_ca = Pebble::start(ports.0, ports.1, PebbleOptions::default());
    let server = acme_proxy(
        &other_ca,
        storage.as_path(),
        upstream,
        ports,
        &[("TLS_DOMAIN", domain), ("ACME_CHALLENGES", "tls-alpn-01")],
    );
    let other_root = tmp.path().join("other-root.pem");
    std::fs::copy(other_ca.root(), &other_root).unwrap();
    wait_for(ISSUANCE, "a certificate from the new CA", || {
        let (status, _, _) = curl(domain, ports.1, path, &other_root, &["--http2"]);
        (status == "2 200").then_some(())
    });
    assert_ne!(served_serial(ports.1, domain), Some(serial));
    server.stop(Duration::from_secs(1));
}

#[test]
fn http_01_issuance() {
    if !pebble_installed() {
        return;
    }
    let domain = "http.example.test";
    let rig = acme_rig(
        "acme-http",
        PebbleOptions::default(),
        &[("TLS_DOMAIN", domain), ("ACME_CHALLENGES", "http-01")],
    );
    wait_for_certificate(rig.storage.path(), domain, &rig.pebble);
    assert!(
        rig.pebble.log().contains("validate w/ HTTP"),
        "validated over HTTP-01:\n{}",
        rig.pebble.log()
    );
    let (status, body, err) = curl(domain, rig.ports.1, "/x", &rig.pebble.root(), &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    rig.server.stop(Duration::from_secs(1));
}

#[test]
fn issuance_with_external_account_binding() {
    if !pebble_installed() {
        return;
    }
    let domain = "eab.example.test";
    let rig = acme_rig(
        "acme-eab",
        PebbleOptions {
            eab: true,
            ..Default::default()
        },
        &[
            ("TLS_DOMAIN", domain),
            ("EAB_KID", EAB_KID),
            ("EAB_HMAC_KEY", EAB_KEY),
        ],
    );
    wait_for_certificate(rig.storage.path(), domain, &rig.pebble);
    assert!(
        rig.pebble.log().contains(EAB_KID),
        "account bound with {EAB_KID}"
    );
    let (status, _, err) = curl(domain, rig.ports.1, "/", &rig.pebble.root(), &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    rig.server.stop(Duration::from_secs(1));
}

#[test]
fn without_external_account_binding_the_ca_refuses_and_the_proxy_keeps_serving() {
    if !pebble_installed() {
        return;
    }
    let domain = "noeab.example.test";
    let rig = acme_rig(
        "acme-noeab",
        PebbleOptions {
            eab: true,
            ..Default::default()
        },
        &[("TLS_DOMAIN", domain)],
    );
    // The CA refuses the account; nothing is stored, the server keeps
    // running and answers the HTTP listener.
    wait_for(
        Duration::from_secs(20),
        "the refused account request",
        || rig.pebble.log().contains("POST /sign-me-up").then_some(()),
    );
    assert!(
        !rig.pebble.log().contains("There are now 1 accounts"),
        "{}",
        rig.pebble.log()
    );
    assert!(!rig
        .storage
        .path()
        .join(format!("{domain}.crt.pem"))
        .exists());
    let redirect = raw_http(
        rig.ports.0,
        &format!("GET / HTTP/1.1\r\nHost: {domain}\r\n\r\n"),
    );
    assert!(redirect.starts_with("HTTP/1.1 301 "), "{redirect}");
    rig.server.stop(Duration::from_secs(1));
}

#[test]
fn a_failed_issuance_is_retried_with_the_next_challenge_type_while_http_keeps_answering() {
    if !pebble_installed() {
        return;
    }
    let rt = runtime();
    let ports = (free_port(), free_port());
    let api = free_port();
    let (api_cert, api_key) = api_certificate();
    let tmp = TempDir::new("acme-retry");
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &api_cert).unwrap();
    let storage = tmp.path().join("storage");
    let domain = "retry.example.test";
    let directory = format!("https://127.0.0.1:{api}/dir");
    let upstream = start_echo_upstream(&rt);
    // The CA is not up yet: the first attempt (TLS-ALPN-01) fails.
    let started = Instant::now();
    let server = start_server(
        config(&[
            ("TLS_DOMAIN", domain),
            ("ACME_DIRECTORY", directory.as_str()),
            ("ACME_CA_FILE", ca_file.to_str().unwrap()),
            ("STORAGE_PATH", storage.to_str().unwrap()),
        ]),
        upstream,
        ports.0,
        ports.1,
    );
    let redirect = raw_http(
        ports.0,
        &format!("GET / HTTP/1.1\r\nHost: {domain}\r\n\r\n"),
    );
    assert!(redirect.starts_with("HTTP/1.1 301 "), "{redirect}");
    assert!(!storage.join(format!("{domain}.crt.pem")).exists());

    // The CA comes up; the retry (about 10 s after the failure) succeeds,
    // over HTTP-01, the next type in ACME_CHALLENGES.
    let pebble = Pebble::start(
        ports.0,
        ports.1,
        PebbleOptions {
            api_port: Some(api),
            api_cert: Some((api_cert, api_key)),
            ..Default::default()
        },
    );
    wait_for_certificate(&storage, domain, &pebble);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(7), "retried after {waited:?}");
    assert!(
        pebble.log().contains("validate w/ HTTP"),
        "{}",
        pebble.log()
    );
    println!("issued by the retry after {waited:?}");
    let (status, _, err) = curl(domain, ports.1, "/", &pebble.root(), &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    server.stop(Duration::from_secs(1));
}

/// An HTTP/2 connection over TLS trusting only `root`.
async fn h2_connection(
    port: u16,
    name: &'static str,
    root: &Path,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(root).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(name).unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    name: &str,
) -> u16 {
    let req = http::Request::get(format!("https://{name}/"))
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}

#[test]
fn renewal_swaps_the_certificate_while_connections_stay_up() {
    if !pebble_installed() {
        return;
    }
    const DOMAIN: &str = "renew.example.test";
    // 15 s certificates: renewal is due with a third left, about 10 s in.
    let AcmeRig {
        server,
        pebble,
        storage,
        ports,
        rt,
    } = acme_rig(
        "acme-renew",
        PebbleOptions {
            validity_seconds: Some(15),
            ..Default::default()
        },
        &[("TLS_DOMAIN", DOMAIN)],
    );
    wait_for_certificate(storage.path(), DOMAIN, &pebble);
    let root = pebble.root();
    let first = served_serial(ports.1, DOMAIN).expect("a certificate");

    let mut kept = rt.block_on(h2_connection(ports.1, DOMAIN, &root));
    assert_eq!(rt.block_on(get(&mut kept, DOMAIN)), 200);

    let started = Instant::now();
    let renewed = wait_for(Duration::from_secs(40), "a renewed certificate", || {
        served_serial(ports.1, DOMAIN).filter(|serial| *serial != first)
    });
    println!(
        "renewed after {:?}: {first} -> {renewed}",
        started.elapsed()
    );
    // The connection made with the old certificate still serves requests.
    assert_eq!(rt.block_on(get(&mut kept, DOMAIN)), 200);
    let (status, _, err) = curl(DOMAIN, ports.1, "/", &root, &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    server.stop(Duration::from_secs(1));
}
