//! TLS without an ACME server: `TLS_LOCAL`, own certificate files (and their
//! reload), the HTTP listener's redirect/421/308 rules, protocol versions
//! and HTTP/2 abuse. Real clients: curl, openssl s_client, Python's h2.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use thruster_core::tls::redirect::Redirect;
use thruster_core::tls::Tls;
use thruster_core::{Server, ServerError};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A proxy with `TLS_LOCAL=1` (plus `TLS_DOMAIN` names) in front of the
/// echo upstream; returns (server, http port, https port, CA file).
fn local_proxy(
    rt: &tokio::runtime::Runtime,
    storage: &TempDir,
    extra: &[(&str, &str)],
) -> (Server, u16, u16, std::path::PathBuf) {
    let upstream = start_echo_upstream(rt);
    let storage_path = storage.path().to_str().unwrap().to_string();
    let mut pairs = vec![("TLS_LOCAL", "1"), ("STORAGE_PATH", storage_path.as_str())];
    pairs.extend_from_slice(extra);
    let server = start_server(config(&pairs), upstream, 0, 0);
    let (http, https) = (server.http_addr().port(), server.https_addrs()[0].port());
    (server, http, https, storage.path().join("local-cert.pem"))
}

#[test]
fn tls_local_serves_http2_and_http1_with_forwarded_proto_https() {
    let rt = runtime();
    let storage = TempDir::new("local");
    let (server, _http, https, ca) = local_proxy(&rt, &storage, &[]);

    let (status, body, err) = curl("localhost", https, "/hello?x=1", &ca, &["--http2"]);
    assert_eq!(status, "2 200", "{err}");
    assert!(body.starts_with("GET /hello?x=1\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");

    let (status, _, err) = curl("localhost", https, "/", &ca, &["--http1.1"]);
    assert_eq!(status, "1.1 200", "{err}");

    // The key is private; the certificate is kept for the next start.
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(storage.path().join("local-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let first = std::fs::read(&ca).unwrap();
    server.stop(Duration::from_secs(1));
    let (server, _, https, ca) = local_proxy(&rt, &storage, &[]);
    assert_eq!(std::fs::read(&ca).unwrap(), first, "certificate reused");
    let (status, _, err) = curl("127.0.0.1", https, "/", &ca, &["--http2"]);
    assert_eq!(
        status, "2 200",
        "the certificate covers 127.0.0.1 too: {err}"
    );
    server.stop(Duration::from_secs(1));
}

#[test]
fn http_listener_redirects_our_hosts_and_refuses_others() {
    let rt = runtime();
    let storage = TempDir::new("redirect");
    let (server, http, https, _) =
        local_proxy(&rt, &storage, &[("TLS_DOMAIN", "App.Example.test")]);

    let get = raw_http(
        http,
        "GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: app.example.test:8080\r\n\r\n",
    );
    assert!(get.starts_with("HTTP/1.1 301 "), "{get}");
    let location = format!("location: https://app.example.test:{https}/a/b?x=1&y=2\r\n");
    assert!(get.to_ascii_lowercase().contains(&location), "{get}");
    assert!(
        get.to_ascii_lowercase().contains("connection: close\r\n"),
        "{get}"
    );
    assert!(get.contains(">Moved Permanently</a>"), "{get}");

    // Other methods keep method and body: 308, no body.
    let post = raw_http(
        http,
        "POST /form HTTP/1.1\r\nHost: APP.example.test\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert!(post.starts_with("HTTP/1.1 308 "), "{post}");
    assert!(post.to_ascii_lowercase().contains(&format!(
        "location: https://app.example.test:{https}/form\r\n"
    )));

    // The local certificate covers localhost, so it is ours too.
    let local = raw_http(http, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(local.starts_with("HTTP/1.1 301 "), "{local}");

    for host in ["evil.test", "app.example.test.evil.test", "10.1.2.3"] {
        let other = raw_http(http, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        assert!(other.starts_with("HTTP/1.1 421 "), "{host}: {other}");
        assert!(other.ends_with("Misdirected Request\n"), "{other}");
    }

    // HTTP-01 path: unknown token 404; foreign host 403; never proxied.
    let token = raw_http(
        http,
        "GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: app.example.test\r\n\r\n",
    );
    assert!(token.starts_with("HTTP/1.1 404 "), "{token}");
    let foreign = raw_http(
        http,
        "GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    );
    assert!(foreign.starts_with("HTTP/1.1 403 "), "{foreign}");
    server.stop(Duration::from_secs(1));
}

#[test]
fn redirect_omits_the_default_https_port_and_converts_idn_hosts() {
    let storage = TempDir::new("redirect443");
    let cfg = config(&[
        ("TLS_LOCAL", "1"),
        ("TLS_DOMAIN", "bücher.example"),
        ("STORAGE_PATH", storage.path().to_str().unwrap()),
    ]);
    let redirect = Redirect {
        tls: Arc::new(Tls::setup(&cfg).unwrap()),
        https_port: 443,
    };
    let req = http::Request::get("/p?q")
        .header("host", "BÜCHER.example")
        .body(())
        .unwrap();
    let res = redirect.respond(&req);
    assert_eq!(res.status(), 301);
    assert_eq!(
        res.headers()["location"],
        "https://xn--bcher-kva.example/p?q"
    );
}

#[test]
fn a_client_that_never_completes_the_handshake_is_cut_at_the_read_timeout() {
    use std::io::Read;
    let rt = runtime();
    let storage = TempDir::new("handshake-timeout");
    let (server, _, https, _) = local_proxy(&rt, &storage, &[("HTTP_READ_TIMEOUT", "1")]);
    let started = std::time::Instant::now();
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", https)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    server.stop(Duration::from_secs(1));
}

fn own_cert(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

#[test]
fn own_certificate_files_are_served_and_reloaded_when_they_change() {
    let rt = runtime();
    let dir = TempDir::new("own");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert1, key1) = own_cert(&["own.test"]);
    std::fs::write(&cert_path, &cert1).unwrap();
    std::fs::write(&key_path, &key1).unwrap();
    let pairs = [
        ("TLS_CERTIFICATE_PATH", cert_path.to_str().unwrap()),
        ("TLS_PRIVATE_KEY_PATH", key_path.to_str().unwrap()),
    ];
    let upstream = start_echo_upstream(&rt);
    let server = start_server(config(&pairs), upstream, 0, 0);
    let https = server.https_addrs()[0].port();
    let ca1 = dir.path().join("ca1.pem");
    std::fs::write(&ca1, &cert1).unwrap();
    let (status, _, err) = curl("own.test", https, "/", &ca1, &["--http2"]);
    assert_eq!(status, "2 200", "{err}");

    // Replace both files: new handshakes get the new certificate.
    let (cert2, key2) = own_cert(&["own.test"]);
    std::fs::write(&key_path, &key2).unwrap();
    std::fs::write(&cert_path, &cert2).unwrap();
    let ca2 = dir.path().join("ca2.pem");
    std::fs::write(&ca2, &cert2).unwrap();
    wait_for(Duration::from_secs(10), "the new certificate", || {
        let (status, _, _) = curl("own.test", https, "/", &ca2, &[]);
        (status == "2 200").then_some(())
    });
    let (status, _, _) = curl("own.test", https, "/", &ca1, &[]);
    assert!(
        status.ends_with("000"),
        "the old certificate is no longer served: {status}"
    );

    // A broken replacement is refused and the current certificate stays.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let (status, _, err) = curl("own.test", https, "/", &ca2, &[]);
    assert_eq!(status, "2 200", "{err}");
    server.stop(Duration::from_secs(1));

    // At start-up, unusable files are a configuration error.
    match Server::start(config(&pairs), support::ServerOptionsFor::tcp(upstream)) {
        Err(ServerError::Tls(err)) => {
            assert!(err.to_string().contains("TLS_CERTIFICATE_PATH"), "{err}")
        }
        other => panic!("expected a TLS error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn tls_1_0_and_1_1_handshakes_are_refused_by_the_server() {
    let rt = runtime();
    let storage = TempDir::new("versions");
    let (server, _, https, _) = local_proxy(&rt, &storage, &[]);
    // SECLEVEL=0 lets OpenSSL 3 offer the old versions at all, so a refusal
    // comes from the server; the same client settings do TLS 1.2 fine.
    let handshake = |version: &str| {
        let out = run(Command::new("openssl")
            .args(["s_client", version, "-cipher", "DEFAULT:@SECLEVEL=0"])
            .arg("-connect")
            .arg(format!("127.0.0.1:{https}"))
            .args(["-servername", "localhost"])
            .stdin(std::process::Stdio::null()));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for version in ["-tls1", "-tls1_1"] {
        let (ok, text) = handshake(version);
        assert!(!ok, "{version} handshake succeeded:\n{text}");
        // rustls answers an old ClientHello with a fatal alert
        // (handshake_failure); OpenSSL reports it as received from the peer.
        assert!(
            text.contains("SSL alert number"),
            "{version}: expected an alert from the server:\n{text}"
        );
    }
    for version in ["-tls1_2", "-tls1_3"] {
        let (ok, text) = handshake(version);
        assert!(ok, "{version} handshake failed:\n{text}");
    }
    server.stop(Duration::from_secs(1));
}

/// Debian's interpreter, which python3-h2 installs into (a pyenv or venv
/// `python3` earlier on PATH would not see it).
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Whether python3-h2 is missing, said on the test's output: the test
/// then has nothing to drive HTTP/2 frames with and returns.
fn python_h2_missing() -> bool {
    let available = Command::new(python())
        .args(["-c", "import h2, hpack, hyperframe"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        println!("SKIPPED: python3-h2 is not installed (bin/setup installs it)");
    }
    !available
}

fn abuse(port: u16, mode: &str) -> (String, u64) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/h2_abuse.py");
    let out = run(Command::new("timeout")
        .args(["60", python(), script, "127.0.0.1"])
        .arg(port.to_string())
        .arg(mode));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (result, sent) = text
        .split_once(' ')
        .unwrap_or_else(|| panic!("{mode}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    (result.to_string(), sent.parse().unwrap())
}

/// How each response header of `requests` GETs of `path` on one HTTP/2
/// connection came over the wire: (request, name, never indexed).
fn h2_header_kinds(port: u16, path: &str, requests: u32) -> Vec<(u32, String, bool)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/h2_headers.py");
    let out = run(Command::new("timeout")
        .args(["30", python(), script, "127.0.0.1"])
        .arg(port.to_string())
        .arg(path)
        .arg(requests.to_string()));
    assert!(
        out.status.success(),
        "h2_headers.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let mut fields = line.split(' ');
            let n = fields.next().unwrap().parse().unwrap();
            let name = fields.next().unwrap().to_string();
            (n, name, fields.next() == Some("never-indexed"))
        })
        .collect()
}

/// X-Request-Id values are used once: HPACK gets them as never-indexed
/// literals, so they neither fill the client connection's table nor are
/// looked up in it. The proxy's own id and one the app echoes alike; other
/// headers stay indexable.
#[test]
fn http2_sends_request_ids_never_indexed() {
    if python_h2_missing() {
        return;
    }
    let rt = runtime();
    let storage = TempDir::new("never-indexed");
    let (server, _, https, _) = local_proxy(&rt, &storage, &[]);
    for path in ["/plain", "/echo-request-id"] {
        let kinds = h2_header_kinds(https, path, 3);
        for n in 1..=3 {
            let of = |name: &str| {
                kinds
                    .iter()
                    .find(|(m, h, _)| *m == n && h == name)
                    .map(|(_, _, never)| *never)
                    .unwrap_or_else(|| panic!("{path} #{n}: no {name} in {kinds:?}"))
            };
            assert!(of("x-request-id"), "{path} #{n}: {kinds:?}");
            assert!(!of("date"), "{path} #{n}: {kinds:?}");
        }
    }
    server.stop(Duration::from_secs(1));
}

#[test]
fn http2_rapid_reset_and_continuation_flood_leave_the_proxy_serving() {
    if python_h2_missing() {
        return;
    }
    let rt = runtime();
    let storage = TempDir::new("abuse");
    let (server, _, https, ca) = local_proxy(&rt, &storage, &[]);

    let (result, sent) = abuse(https, "rapid-reset");
    println!("rapid reset: {result} after {sent} streams");
    assert_ne!(
        result, "survived",
        "rapid reset: {sent} streams reset, connection kept"
    );
    let (status, _, err) = curl("localhost", https, "/", &ca, &["--http2"]);
    assert_eq!(status, "2 200", "after rapid reset ({result}): {err}");

    let (result, sent) = abuse(https, "continuation");
    println!("CONTINUATION flood: {result} after {sent} frames");
    assert_ne!(result, "survived", "CONTINUATION flood accepted");
    assert!(
        sent < 1024,
        "the server read {sent} CONTINUATION frames of 8 KB"
    );
    let (status, _, err) = curl("localhost", https, "/", &ca, &["--http2"]);
    assert_eq!(
        status, "2 200",
        "after CONTINUATION flood ({result}): {err}"
    );
    server.stop(Duration::from_secs(1));
}
