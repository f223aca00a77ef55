//! The listening sockets: bound synchronously at start (a busy port is an
//! error the caller sees before anything else starts), or adopted from the
//! previous process image across Puma's hot restart, and registered for
//! fork safety from their creation.

use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::ServerError;
use crate::sys::Registered;

/// Pending connections the kernel queues per listener while the proxy is
/// at `MAX_CONNECTIONS` or draining.
const LISTEN_BACKLOG: i32 = 1024;

/// Sockets handed over by the previous process image, registered at once:
/// a worker forked before they are put to use must not keep them.
pub(super) fn inherited_sockets(fds: &[RawFd]) -> Vec<Option<Registered<Socket>>> {
    fds.iter()
        // SAFETY: the caller hands these fds over to us; we own them now.
        .filter_map(|&fd| Registered::open(|| Ok(unsafe { Socket::from_raw_fd(fd) })).ok())
        .map(Some)
        .collect()
}

pub(super) fn open_listeners(
    listener: &'static str,
    binds: &[SocketAddr],
    port: u16,
    inherited: &mut [Option<Registered<Socket>>],
) -> Result<Vec<Registered<std::net::TcpListener>>, ServerError> {
    let mut take_inherited = |addr: SocketAddr| {
        inherited.iter_mut().find_map(|slot| {
            let matches = slot
                .as_ref()
                .and_then(|s| s.local_addr().ok())
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a == addr);
            if matches {
                slot.take()
            } else {
                None
            }
        })
    };
    let binds: Vec<(SocketAddr, bool)> = if binds.is_empty() {
        vec![(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)]
    } else {
        binds.iter().map(|&a| (a, false)).collect()
    };
    let mut listeners = Vec::with_capacity(binds.len());
    for (addr, default) in binds {
        if let Some(socket) = take_inherited(addr) {
            let err = |source| ServerError::Bind {
                listener,
                addr,
                source,
            };
            socket.set_cloexec(true).map_err(err)?;
            socket.set_nonblocking(true).map_err(err)?;
            listeners.push(socket.try_map(|s| Ok::<_, ServerError>(s.into()))?);
            continue;
        }
        let bound = match bind_one(listener, addr, default) {
            // One dual-stack socket serves IPv6 and IPv4 clients alike; fall
            // back to IPv4 where the kernel has no IPv6.
            Err(ServerError::Bind { source, .. })
                if default && source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                bind_one(listener, SocketAddr::from(([0, 0, 0, 0], port)), false)
            }
            other => other,
        }?;
        listeners.push(bound);
    }
    Ok(listeners)
}

fn bind_one(
    listener: &'static str,
    addr: SocketAddr,
    dual_stack: bool,
) -> Result<Registered<std::net::TcpListener>, ServerError> {
    let err = |source| ServerError::Bind {
        listener,
        addr,
        source,
    };
    // Registered from its creation: Puma forks its first workers right after
    // the proxy starts, before the accept loops run.
    let socket = Registered::open(|| {
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
    })
    .map_err(err)?;
    if dual_stack {
        socket.set_only_v6(false).map_err(err)?;
    }
    // Lets a restarted proxy re-bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.try_map(|s| Ok(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fd_registry;
    use std::os::fd::AsRawFd;

    #[test]
    fn listeners_are_registered_from_their_creation() {
        // Puma forks its first workers right after the proxy starts: a
        // listener registered only once its accept loop runs would leak
        // into them.
        let mut none = Vec::new();
        let bound =
            open_listeners("HTTP", &["127.0.0.1:0".parse().unwrap()], 0, &mut none).unwrap();
        let fd = bound[0].as_raw_fd();
        assert!(fd_registry::is_registered(fd));

        // A socket handed over across exec is registered as it is adopted.
        let addr = bound[0].local_addr().unwrap();
        let handed = bound.into_iter().next().unwrap();
        let (registration, listener) = handed.into_parts();
        drop(registration);
        let raw = std::os::fd::IntoRawFd::into_raw_fd(listener);
        assert!(!fd_registry::is_registered(raw));
        let mut inherited = inherited_sockets(&[raw]);
        assert!(fd_registry::is_registered(raw));
        let adopted = open_listeners("HTTP", &[addr], 0, &mut inherited).unwrap();
        assert_eq!(adopted[0].as_raw_fd(), raw);
        assert!(fd_registry::is_registered(raw));
        drop(adopted);
        assert!(!fd_registry::is_registered(raw));
    }
}
