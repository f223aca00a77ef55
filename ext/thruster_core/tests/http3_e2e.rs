//! HTTP/3 with a real QUIC client (quinn + h3, the crates the server uses,
//! but as a client): the connection lifecycle the RSpec suite cannot see
//! from aioquic's side as easily — graceful drain (GOAWAY, the request in
//! flight finishes), the idle timeout, the connection cap refusing instead
//! of queueing, and no 0-RTT.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use support::*;
use thruster_core::Server;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An upstream that answers `/slow` after a second, anything else at once.
fn start_slow_upstream(rt: &tokio::runtime::Runtime) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let body = format!("{} {}", req.method(), req.uri().path());
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A `TLS_LOCAL` proxy with extra settings; returns it with its HTTPS
/// (= HTTP/3) port and the CA file.
fn proxy(
    rt: &tokio::runtime::Runtime,
    storage: &TempDir,
    extra: &[(&str, &str)],
) -> (Server, u16, std::path::PathBuf) {
    let upstream = start_slow_upstream(rt);
    let storage_path = storage.path().to_str().unwrap().to_string();
    let mut pairs = vec![("TLS_LOCAL", "1"), ("STORAGE_PATH", storage_path.as_str())];
    pairs.extend_from_slice(extra);
    let server = start_server(config(&pairs), upstream, 0, 0);
    let port = server.https_addrs()[0].port();
    assert_eq!(server.http3_addrs(), server.https_addrs());
    (server, port, storage.path().join("local-cert.pem"))
}

struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    /// Resolves with how the connection ended.
    closed: tokio::task::JoinHandle<h3::error::ConnectionError>,
}

fn client_config(ca: &Path) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

async fn connect(port: u16, ca: &Path) -> Result<Client, quinn::ConnectionError> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(ca));
    let conn = endpoint
        .connect(SocketAddr::from(([127, 0, 0, 1], port)), "localhost")
        .unwrap()
        .await?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .unwrap();
    let closed =
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    Ok(Client {
        endpoint,
        conn,
        send,
        closed,
    })
}

/// Sends a GET; the status and body, or the error.
async fn get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    port: u16,
    path: &str,
) -> Result<(u16, String), h3::error::StreamError> {
    let req = http::Request::get(format!("https://localhost:{port}{path}"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await?;
    stream.finish().await?;
    let response = stream.recv_response().await?;
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    Ok((response.status().as_u16(), String::from_utf8(body).unwrap()))
}

#[test]
fn drain_sends_goaway_and_finishes_the_request_in_flight() {
    let rt = runtime();
    // Timers made outside `block_on` need the runtime's context.
    let _context = rt.enter();
    let storage = TempDir::new("h3-drain");
    let (server, port, ca) = proxy(&rt, &storage, &[]);
    let mut client = rt.block_on(connect(port, &ca)).expect("QUIC handshake");
    let mut send = client.send.clone();
    let slow = rt.spawn(async move { get(&mut send, port, "/slow").await });
    // The slow request has reached the app (the proxy saw it) before the drain.
    rt.block_on(tokio::time::sleep(Duration::from_millis(300)));
    let stopper = std::thread::spawn(move || {
        let started = Instant::now();
        server.stop(Duration::from_secs(5));
        started.elapsed()
    });
    let (status, body) = rt
        .block_on(slow)
        .unwrap()
        .expect("the request in flight finishes");
    assert_eq!((status, body.as_str()), (200, "GET /slow"));
    // After GOAWAY the client may not start new requests on this connection.
    let after = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), get(&mut client.send, port, "/")).await
    });
    assert!(
        !matches!(after, Ok(Ok(_))),
        "a request after GOAWAY was served: {after:?}"
    );
    let stopped_in = stopper.join().unwrap();
    assert!(stopped_in < Duration::from_secs(4), "{stopped_in:?}");
    let closed = rt
        .block_on(tokio::time::timeout(
            Duration::from_secs(3),
            &mut client.closed,
        ))
        .expect("the connection closes")
        .unwrap();
    assert!(closed.is_h3_no_error(), "closed gracefully: {closed}");
    client.endpoint.close(0u32.into(), b"");
}

#[test]
fn idle_connections_close_after_http_idle_timeout_but_not_while_a_request_runs() {
    let rt = runtime();
    // Timers made outside `block_on` need the runtime's context.
    let _context = rt.enter();
    let storage = TempDir::new("h3-idle");
    // One second idle: the slow request (1 s) plus the close must outlive it.
    let (server, port, ca) = proxy(&rt, &storage, &[("HTTP_IDLE_TIMEOUT", "1")]);
    let mut client = rt.block_on(connect(port, &ca)).unwrap();
    rt.block_on(tokio::time::sleep(Duration::from_millis(700)));
    let started = Instant::now();
    let (status, _) = rt
        .block_on(get(&mut client.send, port, "/slow"))
        .expect("a slow request on an idle-timeout connection");
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_secs(1));
    let idle_from = Instant::now();
    let closed = rt
        .block_on(tokio::time::timeout(
            Duration::from_secs(5),
            &mut client.closed,
        ))
        .expect("the idle connection is closed")
        .unwrap();
    let idle_for = idle_from.elapsed();
    assert!(closed.is_h3_no_error(), "{closed}");
    assert!(
        idle_for >= Duration::from_millis(800) && idle_for < Duration::from_secs(4),
        "{idle_for:?}"
    );
    drop(client.conn);
    server.stop(Duration::from_secs(1));
}

#[test]
fn at_max_connections_a_new_quic_connection_is_refused_not_queued() {
    let rt = runtime();
    // Timers made outside `block_on` need the runtime's context.
    let _context = rt.enter();
    let storage = TempDir::new("h3-cap");
    // Each TCP listener (HTTP and HTTPS) holds one reservation while it
    // waits to accept, so a cap of 3 leaves room for one connection.
    let (server, port, ca) = proxy(&rt, &storage, &[("MAX_CONNECTIONS", "3")]);
    let mut first = rt.block_on(connect(port, &ca)).expect("first connection");
    let started = Instant::now();
    let second = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), connect(port, &ca)).await });
    let err = match second {
        Ok(Err(err)) => err,
        Ok(Ok(_)) => panic!("a connection past MAX_CONNECTIONS was accepted"),
        Err(_) => panic!("a connection past MAX_CONNECTIONS was left waiting"),
    };
    assert!(
        matches!(err, quinn::ConnectionError::ConnectionClosed(ref c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The first one is still served, and its close frees the place.
    assert_eq!(rt.block_on(get(&mut first.send, port, "/")).unwrap().0, 200);
    first.conn.close(0u32.into(), b"");
    drop(first);
    let mut third = wait_for(Duration::from_secs(5), "a place freed", || {
        rt.block_on(connect(port, &ca)).ok()
    });
    assert_eq!(rt.block_on(get(&mut third.send, port, "/")).unwrap().0, 200);
    server.stop(Duration::from_secs(1));
}

#[test]
fn no_zero_rtt_even_on_a_resumed_session() {
    let rt = runtime();
    // Timers made outside `block_on` need the runtime's context.
    let _context = rt.enter();
    let storage = TempDir::new("h3-0rtt");
    let (server, port, ca) = proxy(&rt, &storage, &[]);
    rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client_config(&ca));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // A first connection leaves a session ticket with the client.
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .unwrap();
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let req = http::Request::get(format!("https://localhost:{port}/"))
            .body(())
            .unwrap();
        let mut stream = send.send_request(req).await.unwrap();
        stream.finish().await.unwrap();
        stream.recv_response().await.unwrap();
        conn.close(0u32.into(), b"");
        // The resumed connection may try 0-RTT; the server must not take it.
        let connecting = endpoint.connect(addr, "localhost").unwrap();
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                assert!(!accepted.await, "the server accepted 0-RTT data");
                conn.close(0u32.into(), b"");
            }
            // No ticket allowing early data: 0-RTT was never on offer.
            Err(connecting) => {
                connecting.await.unwrap().close(0u32.into(), b"");
            }
        }
    });
    server.stop(Duration::from_secs(1));
}

#[test]
fn max_connections_per_ip_refuses_a_second_quic_connection_from_the_same_address() {
    let rt = runtime();
    let _context = rt.enter();
    let storage = TempDir::new("h3-per-ip");
    let (server, port, ca) = proxy(&rt, &storage, &[("MAX_CONNECTIONS_PER_IP", "1")]);
    let mut first = rt.block_on(connect(port, &ca)).expect("first connection");
    let err = match rt.block_on(connect(port, &ca)) {
        Err(err) => err,
        Ok(_) => panic!("a second connection from 127.0.0.1 was accepted"),
    };
    assert!(
        matches!(err, quinn::ConnectionError::ConnectionClosed(ref c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{err}"
    );
    assert_eq!(rt.block_on(get(&mut first.send, port, "/")).unwrap().0, 200);
    server.stop(Duration::from_secs(1));
}
