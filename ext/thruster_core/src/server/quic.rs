//! HTTP/3: the QUIC endpoint on UDP `HTTPS_PORT` (quinn), one connection
//! from handshake to close (h3 over h3-quinn), and each request stream
//! handed to the same pipeline as HTTP/1.1 and HTTP/2 with a boxed body.
//!
//! Limits as for HTTP/2: 250 concurrent request streams per connection, a
//! 64 KiB header section, `HTTP_READ_TIMEOUT` for the handshake and each
//! request head, `HTTP_IDLE_TIMEOUT` for a connection with no request in
//! flight. A QUIC connection takes a place under `MAX_CONNECTIONS` (and
//! `MAX_CONNECTIONS_PER_IP`) like a TCP one, but there is no backlog to
//! wait in: at the cap a new connection is refused. Drain sends GOAWAY,
//! lets the requests in flight finish, then closes.
//!
//! What QUIC changes on the request path: no `ConnState` (no socket of our
//! own to write 1xx or sendfile(2) regions to), so X-Sendfile bodies are
//! read, not sent by the kernel.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{header, HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::watch;

use super::limits::{ConnLimits, ConnSlot};
use crate::config::Config;
use crate::http::{BoxError, ResponseBody};
use crate::log;
use crate::metrics::{self, Protocol};
use crate::pipeline::{ConnInfo, Pipeline};
use crate::sys::{Registered, Registration};

/// Concurrent request streams per connection (as `tune_h2!` for HTTP/2).
const MAX_STREAMS: u32 = 250;
/// Largest request header section accepted (as for HTTP/2); a larger one
/// gets 431.
const MAX_HEADER_SECTION: u64 = 64 * 1024;
/// Unidirectional streams a client may open: HTTP/3 needs three (control,
/// QPACK encoder and decoder); a few more for extensions we ignore.
const MAX_UNI_STREAMS: u32 = 8;
/// Longest handshake or request head allowed when `HTTP_READ_TIMEOUT` is off.
const MAX_HANDSHAKE: Duration = Duration::from_secs(60);
/// How long a dead peer (no answer to our keep-alives) keeps its connection
/// when `HTTP_IDLE_TIMEOUT` is off.
const DEAD_PEER: Duration = Duration::from_secs(60);
/// After GOAWAY and the last response, how long the client has to
/// acknowledge what is still in flight and close; closing first would drop
/// unacknowledged response bytes.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// HTTP/3's "no error" code, for a graceful close (RFC 9114 §8.1).
const H3_NO_ERROR: u32 = 0x100;

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC set-up failed: {0}")]
    Setup(String),
    #[error("QUIC socket: {0}")]
    Socket(#[from] io::Error),
}

/// A QUIC endpoint serving HTTP/3 on one UDP socket.
pub(super) struct Http3 {
    endpoint: quinn::Endpoint,
}

impl Http3 {
    /// Must run inside the runtime (quinn spawns its endpoint driver).
    pub(super) fn new(
        socket: Registered<std::net::UdpSocket>,
        tls: Arc<rustls::ServerConfig>,
        config: &Config,
    ) -> Result<Http3, QuicError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| QuicError::Setup(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport(config)?));
        // Fresh address validation is quinn's business (Retry under load is
        // not on: it costs every client a round trip).
        let runtime = Arc::new(quinn::TokioRuntime);
        let (registration, socket) = socket.into_parts();
        let inner = quinn::Runtime::wrap_udp_socket(&*runtime, socket)?;
        let socket = Arc::new(LossySocket {
            registration,
            inner,
        });
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )?;
        Ok(Http3 { endpoint })
    }

    /// Accepts QUIC connections until shutdown, then drains them; returns
    /// when the last one has closed.
    pub(super) async fn serve(
        self,
        pipeline: Arc<Pipeline>,
        conn_limits: Arc<ConnLimits>,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut stop_accepting = shutdown.clone();
        let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
        let config = pipeline.config();
        let timeouts = Timeouts {
            head: config.http_read_timeout.unwrap_or(MAX_HANDSHAKE),
            idle: config.http_idle_timeout,
        };
        loop {
            let incoming = tokio::select! {
                _ = stop_accepting.changed() => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let peer = incoming.remote_address();
            // No backlog to wait in, unlike TCP: at a cap, refuse at once
            // (the client falls back to TCP, where it waits).
            let slot = match conn_limits.try_reserve() {
                Some(permit) => conn_limits
                    .admit(peer.ip(), permit)
                    .ok_or("MAX_CONNECTIONS_PER_IP"),
                None => Err("MAX_CONNECTIONS"),
            };
            let slot = match slot {
                Ok(slot) => slot,
                Err(cap) => {
                    if let (Some(m), "MAX_CONNECTIONS_PER_IP") = (metrics::get(), cap) {
                        m.connection_closed_per_ip();
                    }
                    log::debug(
                        "QUIC connection refused: connection cap reached",
                        &[
                            ("remote_addr", peer.to_string().into()),
                            ("cap", cap.into()),
                        ],
                    );
                    incoming.refuse();
                    continue;
                }
            };
            let conn = QuicConnection {
                _slot: slot,
                pipeline: pipeline.clone(),
                peer,
                timeouts,
                shutdown: shutdown.clone(),
                _alive: alive.clone(),
            };
            tokio::spawn(conn.run(incoming));
        }
        // New connection attempts are refused from here on; the ones open
        // finish their requests.
        self.endpoint.set_server_config(None);
        drop(alive);
        let _ = all_closed.recv().await;
        self.endpoint
            .close(quinn::VarInt::from_u32(H3_NO_ERROR), b"");
        let _ = tokio::time::timeout(CLOSE_GRACE, self.endpoint.wait_idle()).await;
    }
}

/// The `Alt-Svc` field that points browsers at HTTP/3, added to HTTPS
/// responses over TCP for names that have a certificate (the QUIC
/// handshake asks the same store; a name without one would fail there).
pub(super) struct AltSvc {
    tls: Arc<crate::tls::Tls>,
    value: http::HeaderValue,
}

impl AltSvc {
    pub(super) fn new(tls: Arc<crate::tls::Tls>, port: u16) -> AltSvc {
        let value = http::HeaderValue::try_from(format!("h3=\":{port}\"; ma=86400"))
            .expect("digits and ASCII punctuation");
        AltSvc { tls, value }
    }

    /// Adds the field unless the app set its own. `host` is the request's
    /// `Host` or `:authority`.
    pub(super) fn apply(&self, host: Option<&str>, headers: &mut HeaderMap) {
        let name = host.map(|h| {
            h.parse::<http::uri::Authority>()
                .map(|a| a.host().trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|_| h.to_string())
        });
        if let header::Entry::Vacant(entry) = headers.entry(header::ALT_SVC) {
            if name.is_some_and(|n| self.tls.has_certificate_for(&n)) {
                entry.insert(self.value.clone());
            }
        }
    }
}

/// quinn's transport limits from our settings.
fn transport(config: &Config) -> Result<quinn::TransportConfig, QuicError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    // The transport's idle timeout only finds dead peers: keep-alives make
    // a live client answer, so an idle-but-alive connection is closed by
    // our own `HTTP_IDLE_TIMEOUT` clock (which, as for TCP, never runs
    // while a request is in flight, however slow the app).
    let dead_peer = config
        .http_idle_timeout
        .unwrap_or(DEAD_PEER)
        .max(Duration::from_secs(3));
    let idle = quinn::IdleTimeout::try_from(dead_peer)
        .map_err(|e| QuicError::Setup(format!("idle timeout: {e}")))?;
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(dead_peer / 3));
    Ok(transport)
}

#[derive(Clone, Copy)]
struct Timeouts {
    /// For the handshake and each request head.
    head: Duration,
    /// With no request in flight; `None` = never.
    idle: Option<Duration>,
}

/// One accepted QUIC connection and what it needs.
struct QuicConnection {
    /// Its place under the connection caps, for as long as it lives.
    _slot: ConnSlot,
    pipeline: Arc<Pipeline>,
    peer: SocketAddr,
    timeouts: Timeouts,
    shutdown: watch::Receiver<bool>,
    _alive: tokio::sync::mpsc::Sender<()>,
}

/// Requests in flight on one connection and when the last one ended: the
/// idle clock.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Signalled when the last request in flight ends (a stored permit if
    /// nobody waits yet): after GOAWAY, h3 keeps waiting for streams the
    /// client may no longer open, so the end of the drain is ours to see.
    became_idle: tokio::sync::Notify,
}

/// Counts a request in flight until dropped (when its response is sent).
struct InFlight {
    activity: Arc<Activity>,
    epoch: Instant,
}

impl InFlight {
    fn begin(activity: &Arc<Activity>, epoch: Instant) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            activity: activity.clone(),
            epoch,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.activity.idle_since_ms.store(now, Ordering::Release);
        if self.activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.activity.became_idle.notify_one();
        }
    }
}

impl QuicConnection {
    async fn run(self, incoming: quinn::Incoming) {
        let peer = self.peer.to_string();
        let mut shutdown = self.shutdown.clone();
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(err) => {
                log::debug(
                    "QUIC connection failed",
                    &[
                        ("remote_addr", peer.into()),
                        ("error", err.to_string().into()),
                    ],
                );
                return;
            }
        };
        let conn = tokio::select! {
            _ = shutdown.changed() => return,
            result = tokio::time::timeout(self.timeouts.head, connecting) => match result {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => {
                    log::debug(
                        "QUIC handshake failed",
                        &[("remote_addr", peer.into()), ("error", err.to_string().into())],
                    );
                    return;
                }
                Err(_) => return,
            },
        };
        let _counted = metrics::get().map(|m| m.connection_opened(Protocol::H3));
        let mut h3 = match h3::server::builder()
            .max_field_section_size(MAX_HEADER_SECTION)
            .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await
        {
            Ok(h3) => h3,
            Err(err) => {
                log::debug(
                    "HTTP/3 set-up failed",
                    &[
                        ("remote_addr", peer.into()),
                        ("error", err.to_string().into()),
                    ],
                );
                return;
            }
        };
        let conn_info = ConnInfo {
            peer: self.peer,
            tls: true,
            state: None,
        };
        let epoch = Instant::now();
        let activity = Arc::new(Activity::default());
        let mut closing = false;
        loop {
            let idle_deadline = self.idle_deadline(&activity, epoch);
            tokio::select! {
                accepted = h3.accept() => match accepted {
                    Ok(Some(resolver)) => {
                        let request = Request3 {
                            pipeline: self.pipeline.clone(),
                            conn_info: conn_info.clone(),
                            head_timeout: self.timeouts.head,
                            _in_flight: InFlight::begin(&activity, epoch),
                        };
                        tokio::spawn(request.serve(resolver));
                    }
                    // GOAWAY sent or received and every request answered.
                    Ok(None) => break,
                    Err(err) => {
                        if !err.is_h3_no_error() {
                            log::debug(
                                "HTTP/3 connection ended with an error",
                                &[("remote_addr", peer.as_str().into()), ("error", err.to_string().into())],
                            );
                        }
                        return;
                    }
                },
                // Drained: GOAWAY sent and every accepted request answered.
                _ = activity.became_idle.notified(), if closing => {
                    if activity.in_flight.load(Ordering::Acquire) == 0 {
                        break;
                    }
                }
                _ = shutdown.changed(), if !closing => {
                    closing = true;
                    // GOAWAY: no new requests; those accepted finish.
                    if h3.shutdown(0).await.is_err() {
                        return;
                    }
                }
                _ = sleep_until(idle_deadline), if !closing && idle_deadline.is_some() => {
                    if activity.in_flight.load(Ordering::Acquire) == 0
                        && self.idle_deadline(&activity, epoch).is_some_and(|d| d <= tokio::time::Instant::now())
                    {
                        closing = true;
                        if h3.shutdown(0).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if closing && activity.in_flight.load(Ordering::Acquire) == 0 {
                break;
            }
        }
        // Let the client acknowledge the last response bytes and close on
        // its side; then close ours.
        let _ = tokio::time::timeout(CLOSE_GRACE, conn.closed()).await;
        conn.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"");
    }

    /// When the idle clock runs out, if it runs: `None` while a request is
    /// in flight or without `HTTP_IDLE_TIMEOUT`.
    fn idle_deadline(&self, activity: &Activity, epoch: Instant) -> Option<tokio::time::Instant> {
        let idle = self.timeouts.idle?;
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            // Re-checked when the request ends: its drop wakes nobody, so
            // poll again after a full period.
            return Some(tokio::time::Instant::now() + idle);
        }
        let since = Duration::from_millis(activity.idle_since_ms.load(Ordering::Acquire));
        Some(tokio::time::Instant::from_std(epoch + since + idle))
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

type H3Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type H3Send = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type H3Recv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// One request stream.
struct Request3 {
    pipeline: Arc<Pipeline>,
    conn_info: ConnInfo,
    head_timeout: Duration,
    _in_flight: InFlight,
}

impl Request3 {
    async fn serve(self, resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>) {
        let (req, stream): (Request<()>, H3Stream) =
            match tokio::time::timeout(self.head_timeout, resolver.resolve_request()).await {
                Ok(Ok(resolved)) => resolved,
                Ok(Err(err)) => {
                    log::debug(
                        "HTTP/3 request rejected",
                        &[
                            ("remote_addr", self.conn_info.peer.to_string().into()),
                            ("error", err.to_string().into()),
                        ],
                    );
                    return;
                }
                Err(_) => return,
            };
        let (mut send, recv) = stream.split();
        let length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let req = req.map(|()| StreamBody::new(recv, length).boxed_unsync());
        let response = self.pipeline.handle(req, &self.conn_info).await;
        if let Err(err) = send_response(&mut send, response).await {
            log::debug(
                "HTTP/3 response not completed",
                &[
                    ("remote_addr", self.conn_info.peer.to_string().into()),
                    ("error", err.to_string().into()),
                ],
            );
        }
    }
}

/// Why a response did not reach the client whole.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("stream: {0}")]
    Stream(#[from] h3::error::StreamError),
    #[error("response body: {0}")]
    Body(BoxError),
}

/// Header fields HTTP/3 forbids (RFC 9114 §4.2): connection-specific ones
/// the HTTP/1.1 side of the pipeline may set (`Connection: close` on an
/// error response, for instance).
const CONNECTION_SPECIFIC: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
];

async fn send_response(
    send: &mut H3Send,
    response: Response<ResponseBody>,
) -> Result<(), SendError> {
    let (mut parts, mut body) = response.into_parts();
    for name in &CONNECTION_SPECIFIC {
        parts.headers.remove(name);
    }
    send.send_response(Response::from_parts(parts, ())).await?;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => {
                // A truncated body must not look complete: reset the stream.
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Err(SendError::Body(err));
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => send.send_data(data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// A request stream's body as the pipeline takes it. Checks the length
/// against `Content-Length` (RFC 9114 §4.1.2: a mismatch is malformed), so
/// a short body never reaches the app as complete.
struct StreamBody {
    recv: H3Recv,
    declared: Option<u64>,
    received: u64,
    /// Data read ahead by `new`.
    first: Option<Bytes>,
    /// The data side has ended (trailers may follow).
    data_done: bool,
    done: bool,
}

/// Why a request body could not be read whole.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request stream: {0}")]
    Stream(#[from] h3::error::StreamError),
    #[error("request body length {received} differs from Content-Length {declared}")]
    Length { declared: u64, received: u64 },
}

impl StreamBody {
    fn new(recv: H3Recv, declared: Option<u64>) -> StreamBody {
        let mut body = StreamBody {
            recv,
            declared,
            received: 0,
            first: None,
            data_done: false,
            done: false,
        };
        // A request without a body (GET) arrives with its stream already
        // finished; seeing that now makes `is_end_stream` true, as for
        // HTTP/2, so it is handled as body-less (replayable, no buffering).
        // One poll that never waits: what it finds is kept for the reader.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match body.recv.poll_recv_data(&mut cx) {
            Poll::Ready(Ok(None)) => {
                body.data_done = true;
                body.done = body.check_length(true).is_ok();
            }
            Poll::Ready(Ok(Some(mut buf))) => {
                body.first = Some(buf.copy_to_bytes(buf.remaining()));
            }
            // An error shows again on the next poll.
            Poll::Ready(Err(_)) | Poll::Pending => {}
        }
        body
    }

    fn check_length(&self, end: bool) -> Result<(), BodyError> {
        match self.declared {
            Some(declared) if self.received > declared || (end && self.received != declared) => {
                Err(BodyError::Length {
                    declared,
                    received: self.received,
                })
            }
            _ => Ok(()),
        }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            let data = match this.first.take() {
                Some(data) => Poll::Ready(Ok(Some(data))),
                None => this
                    .recv
                    .poll_recv_data(cx)
                    .map_ok(|buf| buf.map(|mut buf| buf.copy_to_bytes(buf.remaining()))),
            };
            match data {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(BodyError::from(err).into())));
                }
                Poll::Ready(Ok(Some(data))) => {
                    this.received += data.len() as u64;
                    if let Err(err) = this.check_length(false) {
                        this.done = true;
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Ok(None)) => this.data_done = true,
            }
        }
        if let Err(err) = this.check_length(true) {
            this.done = true;
            return Poll::Ready(Some(Err(err.into())));
        }
        let trailers: Poll<Result<Option<HeaderMap>, _>> = this.recv.poll_recv_trailers(cx);
        match trailers {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                this.done = true;
                match result {
                    Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Ok(None) => Poll::Ready(None),
                    Err(err) => Poll::Ready(Some(Err(BodyError::from(err).into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match (self.declared, self.done) {
            (Some(n), _) => SizeHint::with_exact(n.saturating_sub(self.received)),
            (None, true) => SizeHint::with_exact(0),
            (None, false) => SizeHint::default(),
        }
    }
}

/// The UDP socket under quinn, holding its fork registration for as long as
/// quinn holds the socket. quinn ends a connection on any error its socket
/// returns from a send; quinn-udp 0.5 already turns a failing send into a
/// logged, dropped datagram (and on `EIO`/`EINVAL`, where UDP GSO fails on
/// some NICs and kernels, stops segmenting for later sends). This keeps
/// that guarantee whatever the socket layer underneath: a send error other
/// than "would block" is logged once and the datagram dropped, which QUIC
/// recovers from by retransmitting.
struct LossySocket {
    // Declared first so the fd leaves the fork registry before it closes.
    registration: Registration,
    inner: Arc<dyn AsyncUdpSocket>,
}

impl fmt::Debug for LossySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossySocket")
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

/// Logged once: the first send error (a failing NIC fails every batch).
static SEND_ERROR_LOGGED: AtomicBool = AtomicBool::new(false);

impl AsyncUdpSocket for LossySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.inner.try_send(transmit) {
            Err(err) if err.kind() != io::ErrorKind::WouldBlock => {
                if !SEND_ERROR_LOGGED.swap(true, Ordering::Relaxed) {
                    log::warn(
                        "QUIC send failed; dropping the datagram (QUIC retransmits)",
                        &[
                            ("error", err.to_string().into()),
                            ("segments", self.inner.max_transmit_segments().into()),
                        ],
                    );
                }
                Ok(())
            }
            other => other,
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn writable(poller: &mut Pin<Box<dyn UdpPoller>>) {
        // tokio sends only once it has seen the socket writable.
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_send_the_kernel_refuses_costs_a_datagram_not_the_socket() {
        // What a NIC without GSO does to a segmented batch (EIO/EINVAL), a
        // datagram to an address family the socket cannot reach does too:
        // the send fails. It must come back as sent (QUIC retransmits),
        // and the socket must go on sending.
        let std_socket = Registered::open(|| std::net::UdpSocket::bind("127.0.0.1:0")).unwrap();
        std_socket.set_nonblocking(true).unwrap();
        let (registration, std_socket) = std_socket.into_parts();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, std_socket).unwrap();
        let socket = Arc::new(LossySocket {
            registration,
            inner,
        });
        let mut poller = socket.clone().create_io_poller();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let unreachable = Transmit {
            destination: "[2001:db8::1]:443".parse().unwrap(),
            ecn: None,
            contents: b"lost",
            segment_size: None,
            src_ip: None,
        };
        writable(&mut poller).await;
        socket
            .try_send(&unreachable)
            .expect("dropped, not an error");
        let ok = Transmit {
            destination: peer.local_addr().unwrap(),
            contents: b"still here",
            ..unreachable
        };
        writable(&mut poller).await;
        socket.try_send(&ok).unwrap();
        let mut buf = [0u8; 32];
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");
    }
}
