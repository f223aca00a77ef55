//! The metrics listener (`METRICS_PORT`): its own socket, never one of the
//! public ports, answering `GET /metrics` with the Prometheus text format and
//! anything else with 404. Scrape-time values (cache usage, the accept
//! queues, certificate expiry) are read just before each answer.
//!
//! Served by `side_http` (fork-registered sockets and connections, stops
//! with the server).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::SystemTime;

use http::{header, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::side_http;
use crate::http::{full_body, plain_response, ResponseBody};
use crate::metrics::{self, Metrics};
use crate::pipeline::Pipeline;
use crate::sys::Registered;
use crate::tls::Tls;

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
        if let Some(shared) = self.pipeline.cache().and_then(|c| c.shared()) {
            let st = shared.stats();
            m.set_redis(
                &[
                    ("hit", st.hits),
                    ("miss", st.misses),
                    ("rejected", st.rejected),
                    ("unavailable", st.unavailable),
                    ("timeout", st.timeouts),
                    ("error", st.errors),
                    ("stored", st.stored),
                    ("write_failed", st.write_failures),
                    ("breaker_open", st.breaker_opens),
                ],
                shared.is_available(),
            );
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
    let handle = move |req: Request<hyper::body::Incoming>| {
        let response = scrape.respond(&req);
        async move { response }
    };
    side_http::serve("metrics", listener, handle, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
