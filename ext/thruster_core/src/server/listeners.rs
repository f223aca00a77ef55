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

/// The handed-over socket of this type bound to `addr`, if any: the HTTPS
/// listener (TCP) and the QUIC socket (UDP) share an address.
fn take_inherited(
    inherited: &mut [Option<Registered<Socket>>],
    addr: SocketAddr,
    kind: Type,
) -> Option<Registered<Socket>> {
    inherited.iter_mut().find_map(|slot| {
        let matches = slot.as_ref().is_some_and(|s| {
            s.r#type().is_ok_and(|t| t == kind)
                && s.local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some_and(|a| a == addr)
        });
        if matches {
            slot.take()
        } else {
            None
        }
    })
}

/// The addresses to bind, each with whether it is the default (all
/// interfaces, dual-stack).
fn bind_addresses(binds: &[SocketAddr], port: u16) -> Vec<(SocketAddr, bool)> {
    if binds.is_empty() {
        vec![(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)]
    } else {
        binds.iter().map(|&a| (a, false)).collect()
    }
}

pub(super) fn open_listeners(
    listener: &'static str,
    binds: &[SocketAddr],
    port: u16,
    inherited: &mut [Option<Registered<Socket>>],
) -> Result<Vec<Registered<std::net::TcpListener>>, ServerError> {
    let binds = bind_addresses(binds, port);
    let mut listeners = Vec::with_capacity(binds.len());
    for (addr, default) in binds {
        if let Some(socket) = take_inherited(inherited, addr, Type::STREAM) {
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

/// Receive and send buffer asked for the QUIC socket: a burst of a few
/// thousand full-size datagrams, where the kernel default (208 KiB) drops
/// packets under load and QUIC then backs off.
const UDP_BUFFER: usize = 4 << 20;

/// The QUIC sockets (HTTP/3 on `HTTPS_PORT`): one per HTTPS address, bound
/// like the TCP listeners or adopted from the previous process image.
pub(super) fn open_udp_sockets(
    binds: &[SocketAddr],
    port: u16,
    inherited: &mut [Option<Registered<Socket>>],
) -> Result<Vec<Registered<std::net::UdpSocket>>, ServerError> {
    let mut sockets = Vec::new();
    for (addr, default) in bind_addresses(binds, port) {
        let err = |source| ServerError::Bind {
            listener: "HTTP/3",
            addr,
            source,
        };
        if let Some(socket) = take_inherited(inherited, addr, Type::DGRAM) {
            socket.set_cloexec(true).map_err(err)?;
            socket.set_nonblocking(true).map_err(err)?;
            sockets.push(socket.try_map(|s| Ok::<_, ServerError>(s.into()))?);
            continue;
        }
        let bound = match bind_udp(addr, default) {
            Err(source) if default && source.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                let v4 = SocketAddr::from(([0, 0, 0, 0], port));
                bind_udp(v4, false).map_err(|source| ServerError::Bind {
                    listener: "HTTP/3",
                    addr: v4,
                    source,
                })
            }
            other => other.map_err(err),
        }?;
        sockets.push(bound);
    }
    Ok(sockets)
}

fn bind_udp(
    addr: SocketAddr,
    dual_stack: bool,
) -> std::io::Result<Registered<std::net::UdpSocket>> {
    let socket = Registered::open(|| {
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
    })?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    set_udp_buffers(&socket);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    socket.try_map(|s| Ok(s.into()))
}

/// Asks for `UDP_BUFFER` each way. As root (containers) the `FORCE`
/// variants pass over `net.core.rmem_max`; otherwise the kernel clamps to
/// it. A smaller buffer only costs throughput, so failures are ignored.
fn set_udp_buffers(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let size = UDP_BUFFER as libc::c_int;
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt reads an int we own on an fd we own.
        let set = |option| unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        };
        if !set(forced) {
            set(plain);
        }
    }
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

    #[test]
    fn quic_sockets_are_registered_and_handed_over_by_type() {
        // The HTTPS listener and the QUIC socket share an address: each
        // handed-over fd must go back to its own kind.
        let mut none = Vec::new();
        let tcp = open_listeners("HTTPS", &["127.0.0.1:0".parse().unwrap()], 0, &mut none).unwrap();
        let addr = tcp[0].local_addr().unwrap();
        let udp = open_udp_sockets(&[addr], 0, &mut none).unwrap();
        assert_eq!(udp[0].local_addr().unwrap(), addr);
        assert!(fd_registry::is_registered(udp[0].as_raw_fd()));

        let release = |fd: RawFd| {
            // What a hand-over leaves the next process image: a bare fd.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            assert!(dup >= 0);
            dup
        };
        let (tcp_fd, udp_fd) = (release(tcp[0].as_raw_fd()), release(udp[0].as_raw_fd()));
        drop((tcp, udp));
        // UDP first in the list: a match by address alone would give it to TCP.
        let mut inherited = inherited_sockets(&[udp_fd, tcp_fd]);
        let tcp = open_listeners("HTTPS", &[addr], 0, &mut inherited).unwrap();
        let udp = open_udp_sockets(&[addr], 0, &mut inherited).unwrap();
        assert_eq!(tcp[0].as_raw_fd(), tcp_fd);
        assert_eq!(udp[0].as_raw_fd(), udp_fd);
        assert!(fd_registry::is_registered(udp_fd));
    }
}
