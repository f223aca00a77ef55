//! The client connection's socket as hyper sees it: connection-level
//! timeouts, 1xx responses written ahead of the final one, and file regions
//! sent with sendfile(2) (see `crate::conn`).
//!
//! Timeouts are enforced on the socket itself so they follow what the
//! connection is doing rather than a fixed request deadline:
//!
//! - idle: no request in flight and no bytes arrive for `HTTP_IDLE_TIMEOUT`
//!   → the keep-alive connection is closed;
//! - header: the first byte of a request arrived but the whole head did not
//!   within `HTTP_READ_TIMEOUT` → the connection is dropped (slowloris);
//! - write stall: the client stops reading our response and the socket
//!   accepts nothing for `HTTP_WRITE_TIMEOUT` → the connection is dropped.
//!   A response that keeps flowing (a long download, SSE) is never cut.
//!
//! After a protocol upgrade (WebSocket) none of them apply.
//!
//! An idle HTTP/1 connection is parked: once its response is out and no
//! bytes have arrived for [`PARK_AFTER`], hyper is told the stream ended, finishes the
//! connection without shutting the socket down, and hands it back (see
//! `server::connection`). hyper keeps two 8 KiB buffers, a header map and
//! its connection state for every open connection; parked, a keep-alive
//! connection costs only the socket, this wrapper and its task, and a new
//! hyper connection is made for the next request.
//!
//! The same wrapper writes HTTP/1.1 informational responses (103 Early
//! Hints) from the app ahead of the final response: hyper's server cannot
//! emit 1xx itself, but while a request waits for the app nothing else
//! writes to the socket, so bytes queued here cannot interleave with a
//! response.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Instant, Sleep};

use crate::conn::ConnState;
use crate::sys::Registration;

/// How long an HTTP/1 connection stays idle before it is parked. A busy
/// keep-alive client (a page's assets, an API client, a load balancer's
/// pool) sends its next request within milliseconds: parking and remaking
/// hyper's connection for each request cost ~1.4 us of CPU per request
/// (`/hello`, 64 connections: 27.4 against 26.0 us); past this delay the
/// connection is idle and its buffers are better freed.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, Default)]
pub struct ConnTimeouts {
    pub idle: Option<Duration>,
    pub header: Option<Duration>,
    pub write_stall: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadPhase {
    /// A request is being served; its body has its own deadline.
    Busy,
    /// Waiting for the next request.
    Idle,
    /// Part of a request head has arrived.
    Head,
}

pin_project_lite::pin_project! {
    pub struct ConnIo<T> {
        // Declared first so it drops (unregisters) before the socket closes.
        registration: Registration,
        #[pin]
        inner: T,
        state: Arc<ConnState>,
        timeouts: ConnTimeouts,
        phase: ReadPhase,
        read_deadline: Deadline,
        write_deadline: Option<Pin<Box<Sleep>>>,
        // Whether an idle connection may be parked (HTTP/1 only: HTTP/2
        // keeps state across requests, its HPACK tables among it).
        parkable: bool,
        // Bytes were written that no flush has confirmed yet.
        unflushed: bool,
        // hyper was told the stream ended because the connection went idle.
        parked: bool,
        // The read deadline is armed for PARK_AFTER, not the idle timeout.
        park_pending: bool,
    }
}

impl<T> ConnIo<T> {
    /// A new connection must send its first request head within the header
    /// timeout, like any later one. `timer`: the read timer, when one was
    /// made ahead (see [`read_timer`]).
    pub fn new(
        inner: T,
        registration: Registration,
        state: Arc<ConnState>,
        timeouts: ConnTimeouts,
        timer: Option<Pin<Box<Sleep>>>,
    ) -> ConnIo<T> {
        let mut read_deadline = Deadline {
            timer,
            armed: false,
        };
        read_deadline.arm(timeouts.header);
        ConnIo {
            registration,
            inner,
            state,
            timeouts,
            phase: ReadPhase::Head,
            read_deadline,
            write_deadline: None,
            parkable: false,
            unflushed: false,
            parked: false,
            park_pending: false,
        }
    }

    /// Lets the connection be parked when idle (HTTP/1).
    pub fn set_parkable(&mut self) {
        self.parkable = true;
    }

    /// Whether the stream hyper last saw end was a parked idle connection
    /// rather than the client closing it.
    pub fn parked(&self) -> bool {
        self.parked
    }
}

/// Why a parked connection stopped waiting.
#[derive(Debug, PartialEq, Eq)]
pub enum Unparked {
    /// Bytes arrived (a request, or the client closing): serve it again.
    Readable,
    /// Nothing arrived within the idle timeout.
    TimedOut,
}

impl<T: ReadReady> ConnIo<T> {
    /// Waits, while parked, until the client sends something or the idle
    /// timeout (armed when the connection went idle) passes.
    pub async fn unpark(&mut self) -> io::Result<Unparked> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(ready) = self.inner.poll_read_ready(cx) {
                self.parked = false;
                return Poll::Ready(ready.map(|()| Unparked::Readable));
            }
            if self.read_deadline.expired(cx) {
                return Poll::Ready(Ok(Unparked::TimedOut));
            }
            Poll::Pending
        })
        .await
    }
}

impl<T: AsyncRead + AsyncWrite + SendfileSocket + Unpin> ConnIo<T> {
    /// Closes a parked connection as hyper closes an idle one: shut down
    /// (a TLS close_notify, then FIN), within a second.
    pub async fn close(&mut self) {
        self.parked = false;
        let shutdown = tokio::io::AsyncWriteExt::shutdown(self);
        let _ = tokio::time::timeout(Duration::from_secs(1), shutdown).await;
    }
}

/// A socket whose readiness can be awaited without reading from it.
pub trait ReadReady {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// The read timer a connection with these timeouts will need, made now:
/// on the thread that sets connections up (see `server::connection`), it
/// lands with the rest of what an idle connection keeps instead of among
/// the buffers of the requests in flight. `None` when no read timeout is on.
pub fn read_timer(timeouts: &ConnTimeouts) -> Option<Pin<Box<Sleep>>> {
    (timeouts.idle.is_some() || timeouts.header.is_some())
        .then(|| Box::pin(tokio::time::sleep_until(Instant::now())))
}

/// The read deadline (idle or header). Its timer, once made, is kept while
/// disarmed (a request being served): remade for every request, each new
/// box would land among that request's buffers, and pin a page of the heap
/// for as long as the connection then idles. Disarmed, it is not polled.
struct Deadline {
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Deadline {
    fn arm(&mut self, limit: Option<Duration>) {
        let Some(limit) = limit else {
            self.armed = false;
            return;
        };
        let at = Instant::now() + limit;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(at),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.armed = true;
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.armed
            && self
                .timer
                .as_mut()
                .is_some_and(|t| t.as_mut().poll(cx).is_ready())
    }
}

fn arm(slot: &mut Option<Pin<Box<Sleep>>>, limit: Option<Duration>) {
    match (slot.as_mut(), limit) {
        (_, None) => *slot = None,
        (Some(s), Some(limit)) => s.as_mut().reset(Instant::now() + limit),
        (None, Some(limit)) => *slot = Some(Box::pin(sleep(limit))),
    }
}

fn expired(slot: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    slot.as_mut()
        .is_some_and(|s| s.as_mut().poll(cx).is_ready())
}

/// Writes queued informational bytes; `Ready(Ok)` once none are left.
fn flush_informational<T: AsyncWrite>(
    mut inner: Pin<&mut T>,
    state: &ConnState,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let Ok(mut queue) = state.informational.lock() else {
        return Poll::Ready(Ok(()));
    };
    while !queue.is_empty() {
        match std::task::ready!(inner.as_mut().poll_write(cx, &queue)) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                queue.drain(..n);
            }
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
    Poll::Ready(Ok(()))
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        // hyper polls reads while it waits for the app (to notice a client
        // that went away); that is when early hints go out.
        if let Poll::Ready(Err(err)) = flush_informational(this.inner.as_mut(), this.state, cx) {
            return Poll::Ready(Err(err));
        }
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if this.state.upgraded() {
            this.read_deadline.disarm();
            return polled;
        }
        let got_bytes = matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        if polled.is_pending() {
            if let Ok(mut reader) = this.state.reader.lock() {
                if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *reader = Some(cx.waker().clone());
                }
            }
        }
        let phase = match (this.state.busy(), *this.phase, got_bytes) {
            (true, _, _) => ReadPhase::Busy,
            (false, ReadPhase::Head, _) | (false, _, true) => ReadPhase::Head,
            (false, _, false) => ReadPhase::Idle,
        };
        // What the idle timeout leaves once PARK_AFTER has passed.
        let idle_rest = this.timeouts.idle.map(|t| t.saturating_sub(PARK_AFTER));
        if phase != *this.phase {
            *this.phase = phase;
            *this.park_pending = false;
            match phase {
                ReadPhase::Busy => this.read_deadline.disarm(),
                // A parkable connection's idle timeout runs in two legs:
                // PARK_AFTER, then the rest (while parked, or not).
                ReadPhase::Idle if *this.parkable && idle_rest != Some(Duration::ZERO) => {
                    this.read_deadline.arm(Some(PARK_AFTER));
                    *this.park_pending = true;
                }
                ReadPhase::Idle => this.read_deadline.arm(this.timeouts.idle),
                ReadPhase::Head => this.read_deadline.arm(this.timeouts.header),
            }
        }
        if polled.is_pending() && this.read_deadline.expired(cx) {
            if std::mem::take(this.park_pending) {
                this.read_deadline.arm(idle_rest);
                // Idle for PARK_AFTER, everything written and flushed,
                // nothing to read: an end of stream makes hyper finish the
                // connection (an idle keep-alive connection ending is no
                // error), and the caller parks the socket. Not while a file
                // region or an informational response waits: then the
                // connection stays as it is for the rest of the timeout.
                if !*this.unflushed && this.state.idle_io() && this.state.park_allowed() {
                    *this.parked = true;
                    return Poll::Ready(Ok(()));
                }
                if !this.read_deadline.expired(cx) {
                    return polled;
                }
            }
            let what = match phase {
                ReadPhase::Head => "request headers not received in time",
                _ => "idle connection timed out",
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
        }
        polled
    }
}

impl<T: AsyncWrite> ConnIo<T> {
    /// Every write path: queued informational bytes go out first, then the
    /// write itself, with the stall deadline armed while it cannot proceed.
    fn write_with<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let mut this = self.project();
        std::task::ready!(flush_informational(this.inner.as_mut(), this.state, cx))?;
        let polled = write(this.inner, cx);
        // Any write, flushes included, leaves bytes to confirm; a flush that
        // completes confirms them (`poll_flush` clears this after).
        *this.unflushed = true;
        let deadline = this.write_deadline;
        if polled.is_ready() || this.state.upgraded() || this.timeouts.write_stall.is_none() {
            *deadline = None;
            return polled;
        }
        if deadline.is_none() {
            arm(deadline, this.timeouts.write_stall);
        }
        if expired(deadline, cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading the response",
            )));
        }
        polled
    }
}

/// A socket that can send straight from a file (zero-copy), for X-Sendfile
/// bodies on cleartext HTTP/1.1.
pub trait SendfileSocket {
    /// Sends up to `len` bytes of `file` from `offset`, advancing it.
    fn poll_sendfile(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: &mut u64,
        len: usize,
    ) -> Poll<io::Result<usize>>;

    /// Writes `bufs` telling the kernel more follows at once (`MSG_MORE`):
    /// the bytes before a file region (a response head) then leave in the
    /// same segment as the region's first bytes, instead of a segment (and
    /// a wake-up of the client) of their own.
    fn poll_write_vectored_more(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>>;
}

impl SendfileSocket for tokio::net::TcpStream {
    fn poll_write_vectored_more(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_write_ready(cx))?;
            let sent = self.try_io(tokio::io::Interest::WRITABLE, || {
                // SAFETY: a zeroed msghdr is valid; it points at `bufs`
                // (IoSlice is ABI-compatible with iovec), which outlive the
                // call.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
                // SAFETY: the fd is open for the call; `msg` is valid.
                let n = unsafe {
                    libc::sendmsg(self.as_raw_fd(), &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL)
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(n as usize)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_sendfile(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: &mut u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_write_ready(cx))?;
            let sent = self.try_io(tokio::io::Interest::WRITABLE, || {
                let mut off = *offset as libc::off_t;
                // SAFETY: both descriptors are open for the duration of the
                // call; `off` is a valid out-parameter.
                let n =
                    unsafe { libc::sendfile(self.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                *offset = off as u64;
                Ok(n as usize)
            });
            match sent {
                // The file ended before the length we announced: the
                // response cannot be completed truthfully.
                Ok(0) if len > 0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while it was being sent",
                    )))
                }
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<T: AsyncWrite + SendfileSocket> ConnIo<T> {
    /// Writes the slices before the first marker slice as usual, or, when a
    /// marker slice comes first, sends its file region with sendfile(2).
    fn write_vectored_or_file(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first_marker = bufs
            .iter()
            .position(|b| crate::conn::is_zero_copy_marker(b));
        match first_marker {
            None => self.write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs)),
            Some(i) if i > 0 => {
                self.write_with(cx, |io, cx| io.poll_write_vectored_more(cx, &bufs[..i]))
            }
            Some(_) => {
                let state = Arc::clone(&self.state);
                let len = bufs[0].len();
                self.write_with(cx, |io, cx| {
                    let Ok(mut queue) = state.zero_copy.lock() else {
                        return Poll::Ready(Err(io::Error::other("zero-copy queue poisoned")));
                    };
                    // Never let marker bytes reach the client.
                    let Some(region) = queue.front_mut() else {
                        return Poll::Ready(Err(io::Error::other(
                            "zero-copy marker without a file",
                        )));
                    };
                    let want = len.min(region.len as usize);
                    let mut offset = region.offset;
                    let sent =
                        std::task::ready!(io.poll_sendfile(cx, &region.file, &mut offset, want))?;
                    region.offset = offset;
                    region.len -= sent as u64;
                    if region.len == 0 {
                        queue.pop_front();
                    }
                    Poll::Ready(Ok(sent))
                })
            }
        }
    }
}

impl<T: AsyncWrite + SendfileSocket> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if crate::conn::is_zero_copy_marker(buf) {
            return self.write_vectored_or_file(cx, &[io::IoSlice::new(buf)]);
        }
        self.write_with(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write_vectored_or_file(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the socket only once its own buffer is empty.
        let flushed = self.as_mut().write_with(cx, |io, cx| io.poll_flush(cx));
        if matches!(flushed, Poll::Ready(Ok(()))) {
            *self.as_mut().project().unflushed = false;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        // hyper ends a connection it saw end by shutting the socket down; a
        // parked connection stays open.
        if *this.parked {
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn poll_expired(deadline: &mut Deadline) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(deadline.expired(cx))).await
    }

    /// After its response an HTTP/1 connection is parked only once it has
    /// been idle for PARK_AFTER (a request sooner is served by the same
    /// hyper connection), and the idle timeout still counts from the end of
    /// the response.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_idle_connection_is_parked_after_park_after_within_its_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (registration, socket) = crate::sys::tcp_socket(&addr).unwrap().into_parts();
        let _client = socket.connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let state = Arc::new(ConnState::default());
        state.allow_park(true);
        let timeouts = ConnTimeouts {
            idle: Some(Duration::from_secs(5)),
            ..ConnTimeouts::default()
        };
        let server = super::super::client_io::ClientIo::Plain(server);
        let mut io = ConnIo::new(server, registration, state.clone(), timeouts, None);
        io.set_parkable();
        async fn poll_read(
            io: &mut ConnIo<super::super::client_io::ClientIo>,
        ) -> Poll<io::Result<()>> {
            let mut byte = [0u8; 1];
            let mut buf = ReadBuf::new(&mut byte);
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *io).poll_read(cx, &mut buf))).await
        }

        // A request being served, then its end: the connection is idle.
        let request = state.begin_request();
        assert!(poll_read(&mut io).await.is_pending());
        drop(request);
        assert!(poll_read(&mut io).await.is_pending());
        tokio::time::advance(PARK_AFTER / 2).await;
        assert!(poll_read(&mut io).await.is_pending());
        assert!(!io.parked(), "parked before PARK_AFTER");
        tokio::time::advance(PARK_AFTER / 2).await;
        assert!(matches!(poll_read(&mut io).await, Poll::Ready(Ok(()))));
        assert!(io.parked());

        // Parked: the idle timeout ends 5 s after the response, not later.
        let waiting = io.unpark();
        tokio::pin!(waiting);
        let ended = tokio::time::timeout(Duration::from_millis(4800), &mut waiting).await;
        assert!(ended.is_err(), "timed out early");
        let ended = tokio::time::timeout(Duration::from_millis(200), &mut waiting).await;
        assert_eq!(ended.unwrap().unwrap(), Unparked::TimedOut);
    }

    /// Disarmed, the read deadline never expires, and arming it again
    /// reuses its timer: the box made when the connection was set up is the
    /// one it keeps.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_read_deadline_keeps_its_timer_while_disarmed() {
        let timeouts = ConnTimeouts {
            idle: Some(Duration::from_secs(5)),
            ..ConnTimeouts::default()
        };
        let mut deadline = Deadline {
            timer: read_timer(&timeouts),
            armed: false,
        };
        let made: *const Sleep = &**deadline.timer.as_ref().unwrap();

        deadline.arm(timeouts.idle);
        assert!(!poll_expired(&mut deadline).await);
        deadline.disarm();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!poll_expired(&mut deadline).await, "disarmed, yet expired");
        deadline.arm(timeouts.idle);
        assert!(!poll_expired(&mut deadline).await);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(poll_expired(&mut deadline).await);
        assert!(std::ptr::eq(made, &**deadline.timer.as_ref().unwrap()));

        let none = ConnTimeouts::default();
        assert!(read_timer(&none).is_none());
    }
}
