//! System helpers of the bottom layer: the fork registry of every fd the
//! proxy owns, the one way to open such an fd, unnamed temporary files,
//! random bytes, memory given back after a burst of connections, and code
//! pages given back once the proxy has started (`code_pages`).
//!
//! Fork safety: in-process, the proxy lives in the Puma master, which forks
//! workers while connections are open. Every fd the proxy opens — sockets,
//! spool and buffer files, files it serves — is created through
//! [`Registered::open`], which registers it with no fork in between, so a
//! forked worker closes them all at once (`fd_registry::close_all_after_fork`).
//! A socket left open in a worker would keep a client from ever seeing EOF;
//! a temporary file would keep its disk space allocated for the worker's
//! life.

pub mod ca;
pub mod code_pages;
pub mod fd_registry;
pub mod inotify;
pub mod random;
pub mod settle;
pub mod trim;

/// `AsyncRead` and `AsyncWrite` for a socket type that is an enum of
/// streams (TCP, TLS over TCP, Unix), or holds one in a field: every call
/// goes to the variant's stream. For the client socket, the app's and
/// Redis's.
///
/// `enum_stream_io!(AppStream { io }: AppIo { Tcp, Unix });`
/// `enum_stream_io!(ClientIo {}: ClientIo { Plain, Tls });`
macro_rules! enum_stream_io {
    ($outer:ty { $($field:ident)? } : $enum:ident { $($variant:ident),+ $(,)? }) => {
        impl tokio::io::AsyncRead for $outer {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match &mut self.get_mut()$(.$field)? {
                    $($enum::$variant(s) => tokio::io::AsyncRead::poll_read(std::pin::Pin::new(s), cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $outer {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match &mut self.get_mut()$(.$field)? {
                    $($enum::$variant(s) => tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(s), cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match &mut self.get_mut()$(.$field)? {
                    $($enum::$variant(s) => tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(s), cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match &self$(.$field)? {
                    $($enum::$variant(s) => tokio::io::AsyncWrite::is_write_vectored(s),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match &mut self.get_mut()$(.$field)? {
                    $($enum::$variant(s) => tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(s), cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match &mut self.get_mut()$(.$field)? {
                    $($enum::$variant(s) => tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(s), cx),)+
                }
            }
        }
    };
}
pub(crate) use enum_stream_io;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

pub use fd_registry::Registration;

/// A file the proxy opened, registered while it is open.
pub type OwnedFile = Registered<File>;

/// An fd the proxy owns, registered for closing in forked children for as
/// long as this value lives.
#[derive(Debug)]
pub struct Registered<T: AsRawFd> {
    // Declared first so it drops (unregisters) before the fd closes: a
    // number reused by someone else is never closed by a child.
    registration: Registration,
    inner: T,
}

impl<T: AsRawFd> Registered<T> {
    /// Creates the fd with `open` and registers it, with no fork in between
    /// (a fork waits for the gate). `open` must be quick and synchronous:
    /// a socket or a file, never a connect.
    pub fn open(open: impl FnOnce() -> io::Result<T>) -> io::Result<Registered<T>> {
        let _gate = fd_registry::OpenGate::enter();
        let inner = open()?;
        Ok(Registered {
            registration: fd_registry::register(inner.as_raw_fd()),
            inner,
        })
    }

    /// The registration and the fd, for a value that becomes another type
    /// around the same fd (a socket that connects into a stream): keep the
    /// registration alive as long as the new value.
    pub fn into_parts(self) -> (Registration, T) {
        (self.registration, self.inner)
    }

    /// The same fd as another type (a socket2 socket as a listener), still
    /// registered.
    pub fn try_map<U: AsRawFd, E>(
        self,
        convert: impl FnOnce(T) -> Result<U, E>,
    ) -> Result<Registered<U>, E> {
        let Registered {
            registration,
            inner,
        } = self;
        Ok(Registered {
            registration,
            inner: convert(inner)?,
        })
    }
}

impl<T: AsRawFd> std::ops::Deref for Registered<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsRawFd> AsRawFd for Registered<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// An unnamed temporary file (0600) in the temp directory: nothing to clean
/// up, nothing another process can open by name. Blocking: call it on the
/// blocking pool.
pub fn temp_file() -> io::Result<Registered<File>> {
    let dir = std::env::temp_dir();
    Registered::open(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir)
    })
    .or_else(|_| {
        // Filesystems without O_TMPFILE: a private name, unlinked at once.
        let path = dir.join(format!(
            "thruster-body-{}-{}",
            std::process::id(),
            random::hex(16)
        ));
        let file = Registered::open(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        })?;
        std::fs::remove_file(&path)?;
        Ok(file)
    })
}

/// Opens a file for reading, registered.
pub fn open_read(path: &std::path::Path, flags: i32) -> io::Result<Registered<File>> {
    Registered::open(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    })
}

/// Whether `preadv2(RWF_NOWAIT)` works here; cleared the first time the
/// kernel or the filesystem says it does not (old kernels, some FUSE and
/// network filesystems), so later reads go straight to the caller's
/// blocking fallback.
static NOWAIT_READS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Fills `buf` from `file` at `offset` only if the bytes are already in the
/// page cache: never waits for the disk, so it may run on an async worker
/// thread (a hot cache entry is served without a hop to the blocking pool,
/// as nginx reads inline). `WouldBlock` means "read it on the blocking pool
/// instead": some of it is not cached, or this system cannot tell.
/// `UnexpectedEof` if the file is shorter.
pub fn read_cached_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    if !NOWAIT_READS.load(Ordering::Relaxed) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    while !buf.is_empty() {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: one iovec over `buf`, which outlives the call; the fd is
        // open for as long as `file` is borrowed.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                let n = n as usize;
                buf = &mut buf[n..];
                offset += n as u64;
            }
            _ => {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                    // ENOSYS: no preadv2; EOPNOTSUPP/EINVAL: no RWF_NOWAIT
                    // for this kernel or filesystem.
                    Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        NOWAIT_READS.store(false, Ordering::Relaxed);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(())
}

/// A TCP socket for `addr`'s family, registered before it connects (the
/// connect wait is where a fork would otherwise catch it unregistered).
pub fn tcp_socket(addr: &std::net::SocketAddr) -> io::Result<Registered<tokio::net::TcpSocket>> {
    Registered::open(|| {
        if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    })
}

/// A Unix stream socket, registered before it connects.
pub fn unix_socket() -> io::Result<Registered<tokio::net::UnixSocket>> {
    Registered::open(tokio::net::UnixSocket::new_stream)
}

#[cfg(test)]
#[path = "../../tests/support/ports.rs"]
mod test_ports;

/// Helpers for tests in every layer.
#[cfg(test)]
pub(crate) mod test_support {
    use std::fs;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::SystemTime;

    /// A port for a server the test starts later (Redis, say): the
    /// integration tests' own helper.
    pub(crate) use super::test_ports::free_port;

    /// A fresh directory under the temp dir, removed on drop. Canonical, so
    /// expectations can compare paths directly.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "thruster-files-{tag}-{}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let dir = std::env::temp_dir().join(name);
            fs::create_dir(&dir).unwrap();
            TempDir(fs::canonicalize(dir).unwrap())
        }

        pub(crate) fn file(&self, rel: &str, contents: &[u8]) -> PathBuf {
            let p = self.0.join(rel);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(&p, contents).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A current-thread runtime with time paused, for tests that stop one
    /// runtime and start another.
    pub(crate) fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn temp_files_are_registered_unnamed_and_private() {
        let mut file = temp_file().unwrap();
        let fd = file.as_raw_fd();
        assert!(fd_registry::is_registered(fd));
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(
            link.to_string_lossy().contains("(deleted)"),
            "no name another process could open: {link:?}"
        );
        let meta = file.metadata().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let f: &mut File = &mut file.inner;
        f.write_all(b"spooled").unwrap();
        f.rewind().unwrap();
        let mut back = String::new();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "spooled");
        drop(file);
        assert!(!fd_registry::is_registered(fd));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sockets_are_registered_before_they_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = tcp_socket(&addr).unwrap();
        assert!(fd_registry::is_registered(socket.as_raw_fd()));
        let (registration, socket) = socket.into_parts();
        let stream = socket.connect(addr).await.unwrap();
        assert!(fd_registry::is_registered(stream.as_raw_fd()));
        drop(registration);
        assert!(!fd_registry::is_registered(stream.as_raw_fd()));
    }
}
