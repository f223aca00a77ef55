//! The loop behind the proxy's own small HTTP/1.1 listeners (metrics,
//! admin): accept, register the connection for fork safety, serve it with
//! hyper for at most a minute, stop with the server.
//!
//! Like every listener, their sockets are in the fork registry from their
//! creation (`listeners::open_listeners`), and each accepted connection from
//! its `accept(2)` on (`register` under the `OpenGate`).

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::ResponseBody;
use crate::log;
use crate::sys::{fd_registry, Registered};

/// A client that holds a connection longer than this is cut off: the ports
/// are private, but a stuck client must not keep a task forever.
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// Serves `listener` with `handle` until `shutdown`. `name` goes into the
/// log line of a failed accept.
pub(super) async fn serve<H, Fut>(
    name: &'static str,
    listener: Registered<TcpListener>,
    handle: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
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
                    "Accept failed",
                    &[("listener", name.into()), ("error", err.to_string().into())],
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = handle(req);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
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

/// An accepted connection, registered for fork safety as long as it
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
