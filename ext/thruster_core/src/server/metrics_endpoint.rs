//! The metrics listener (`METRICS_PORT`): its own socket, never one of the
//! public ports, answering `GET /metrics` with the Prometheus text format and
//! anything else with 404. Scrape-time values (cache usage, the accept
//! queues, certificate expiry) are read just before each answer.
//!
//! Like every listener, its socket and each accepted connection are in the
//! fork registry from their creation (`listeners::open_listeners`, then
//! `register` under the `OpenGate` at accept), and it stops with the server.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{header, Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::{full_body, plain_response, ResponseBody};
use crate::log;
use crate::metrics::{self, Metrics};
use crate::pipeline::Pipeline;
use crate::sys::{fd_registry, Registered};
use crate::tls::Tls;

/// A scraper that holds a connection longer than this is cut off: the port
/// is private, but a stuck client must not keep a task forever.
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// What a scrape reads besides the counters.
pub(super) struct Scrape {
    pub pipeline: Arc<Pipeline>,
    /// The public listeners, whose accept queues are the clients waiting at
    /// `MAX_CONNECTIONS`. Read while the server runs; the metrics listener
    /// stops with it.
    pub listener_fds: Vec<RawFd>,
    pub tls: Option<Arc<Tls>>,
}

impl Scrape {
    fn update(&self, m: &Metrics) {
        if let Some((bytes, entries)) = self.pipeline.disk_cache_usage() {
            m.set_cache_usage("disk", bytes, entries);
        }
        if let Some((bytes, entries)) = self.pipeline.memory_cache_usage() {
            m.set_cache_usage("memory", bytes, entries);
        }
        m.set_connections_waiting(self.listener_fds.iter().map(|&fd| accept_queue(fd)).sum());
        if let Some(tls) = &self.tls {
            for (domain, not_after) in tls.certificate_expiries() {
                let secs = not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                m.set_certificate_expiry(&domain, secs);
            }
        }
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        if req.uri().path() != "/metrics" {
            return plain_response(StatusCode::NOT_FOUND, "not found");
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut response = plain_response(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD");
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let m = metrics::enable();
        self.update(m);
        let (content_type, body) = m.render();
        let mut response = Response::new(full_body(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    }
}

/// `tcpi_state` of a listening socket (`TCP_LISTEN` in linux/tcp_states.h).
const TCP_LISTEN: u8 = 10;

/// Connections waiting in a listener's accept queue: for a listening
/// socket, Linux reports the queue length as `tcpi_unacked`.
fn accept_queue(fd: RawFd) -> u64 {
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed struct we
    // own; on a non-socket or closed fd it fails and we report 0.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        );
        if rc == 0 && info.tcpi_state == TCP_LISTEN {
            u64::from(info.tcpi_unacked)
        } else {
            0
        }
    }
}

pub(super) async fn serve(
    listener: Registered<TcpListener>,
    scrape: Arc<Scrape>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = std::future::poll_fn(|cx| {
                // accept(2) and the registration with no fork in between.
                let _gate = fd_registry::OpenGate::enter();
                listener.poll_accept(cx).map_ok(|(stream, _)| {
                    let registration = fd_registry::register(stream.as_raw_fd());
                    RegisteredStream { _registration: registration, stream }
                })
            }) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(err) => {
                log::error(
                    "Metrics accept failed",
                    &[("error", err.to_string().into())],
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = scrape.respond(&req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIMIT, conn) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// An accepted scrape connection, registered for fork safety as long as it
/// is open; the registration is declared first so it goes before the fd
/// closes.
struct RegisteredStream {
    _registration: fd_registry::Registration,
    stream: TcpStream,
}

impl AsyncRead for RegisteredStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for RegisteredStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_queue_counts_connections_not_yet_accepted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(accept_queue(listener.as_raw_fd()), 0);
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        assert_eq!(accept_queue(listener.as_raw_fd()), 3);
        drop(listener.accept().unwrap());
        assert_eq!(accept_queue(listener.as_raw_fd()), 2);
        // A connected socket is no listener: nothing waits on it.
        assert_eq!(accept_queue(clients[0].as_raw_fd()), 0);
        assert_eq!(accept_queue(-1), 0);
    }
}
