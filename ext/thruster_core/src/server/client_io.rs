//! A client connection's byte stream: plain TCP, or TLS over TCP once the
//! handshake is done. One type, so timeouts and HTTP serving are shared.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

crate::sys::enum_stream_io!(ClientIo {}: ClientIo { Plain, Tls });

impl super::conn_io::ReadReady for ClientIo {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientIo::Plain(s) => s.poll_read_ready(cx),
            // TLS bytes arrive on the TCP socket; a parked connection has no
            // plaintext buffered (its last read found none).
            ClientIo::Tls(s) => s.get_ref().0.poll_read_ready(cx),
        }
    }
}

impl super::conn_io::SendfileSocket for ClientIo {
    fn poll_write_vectored_more(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored_more(cx, bufs),
            // Never reached (no file regions through TLS); a plain write
            // is right anyway.
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_sendfile(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: &mut u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_sendfile(cx, file, offset, len),
            // Zero-copy bodies are only made for cleartext connections; TLS
            // must encrypt every byte in user space.
            ClientIo::Tls(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "sendfile(2) cannot write through TLS",
            ))),
        }
    }
}
