//! `SSL_CERT_FILE` is honoured for the ACME directory's certificate (no
//! `ACME_CA_FILE`). Its own test binary: the variable is process-wide.

mod support;

use std::time::Duration;

use support::pebble::*;
use support::*;

#[test]
fn ssl_cert_file_trusts_a_private_acme_server() {
    if !pebble_installed() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ports = (free_port(), free_port());
    let pebble = Pebble::start(ports.0, ports.1, PebbleOptions::default());
    // Set before the proxy starts; nothing else in this process reads it.
    std::env::set_var("SSL_CERT_FILE", pebble.api_ca());
    std::env::remove_var("SSL_CERT_DIR");
    let upstream = start_echo_upstream(&rt);
    let storage = TempDir::new("acme-sslcertfile");
    let domain = "sslcertfile.example.test";
    let directory = pebble.directory();
    let server = start_server(
        config(&[
            ("TLS_DOMAIN", domain),
            ("ACME_DIRECTORY", directory.as_str()),
            ("STORAGE_PATH", storage.path().to_str().unwrap()),
        ]),
        upstream,
        ports.0,
        ports.1,
    );
    wait_for_certificate(storage.path(), domain, &pebble);
    let (status, _, err) = curl(domain, ports.1, "/", &pebble.root(), &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    server.stop(Duration::from_secs(1));
}
