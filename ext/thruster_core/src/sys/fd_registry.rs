//! Every socket the proxy owns (listeners, client connections, upstream
//! connections), so a process forked from one running the proxy in-process
//! (a Puma worker) can close them all at once.
//!
//! Without it, a worker forked while a client connection is open keeps that
//! socket alive: when the proxy closes the connection (idle timeout), the
//! client never sees EOF until the worker exits.
//!
//! The registry is a bitmap indexed by fd number, so the fork handler can
//! walk it with atomic loads and `close(2)` only: async-signal-safe, no
//! locks, no allocation.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// fds above this are not tracked (far above any sane RLIMIT_NOFILE here).
const MAX_FDS: usize = 1 << 20;

static BITS: OnceLock<Box<[AtomicU64]>> = OnceLock::new();

fn bits() -> &'static [AtomicU64] {
    BITS.get_or_init(|| {
        // `vec![0; n]` comes from calloc: untouched zero pages that cost no
        // memory (no PSS in the Puma master) until an fd lands in them.
        let zeroed: Box<[u64]> = vec![0u64; MAX_FDS / 64].into_boxed_slice();
        // SAFETY: AtomicU64 has the size, alignment and bit validity of u64.
        unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) }
    })
}

fn slot(fd: RawFd) -> Option<(usize, u64)> {
    let fd = usize::try_from(fd).ok().filter(|&fd| fd < MAX_FDS)?;
    Some((fd / 64, 1u64 << (fd % 64)))
}

/// Tracks `fd` until the returned guard is dropped. Drop the guard *before*
/// closing the fd, so a number reused by someone else is never closed.
#[must_use]
pub fn register(fd: RawFd) -> Registration {
    if let Some((word, bit)) = slot(fd) {
        bits()[word].fetch_or(bit, Ordering::AcqRel);
    }
    Registration(fd)
}

/// Unregisters its fd on drop. Hold it in a field declared before the
/// socket, so it drops first.
#[derive(Debug)]
pub struct Registration(RawFd);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((word, bit)) = slot(self.0) {
            bits()[word].fetch_and(!bit, Ordering::AcqRel);
        }
    }
}

/// Threads between creating a socket and registering it.
static OPENING: AtomicUsize = AtomicUsize::new(0);
/// Set while a fork is under way: no new socket may be created.
static FORKING: AtomicBool = AtomicBool::new(false);

/// Held while a socket is created and registered, so a fork can never
/// happen in between (the child would keep an fd the registry does not
/// know about). Hold it only across synchronous code: a fork waits for it.
pub struct OpenGate(());

impl OpenGate {
    pub fn enter() -> OpenGate {
        loop {
            while FORKING.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            OPENING.fetch_add(1, Ordering::SeqCst);
            if !FORKING.load(Ordering::SeqCst) {
                return OpenGate(());
            }
            OPENING.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for OpenGate {
    fn drop(&mut self) {
        OPENING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `pthread_atfork` prepare: waits until no socket is between creation and
/// registration, and holds new ones back until the fork is done.
pub fn before_fork() {
    FORKING.store(true, Ordering::SeqCst);
    while OPENING.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
}

/// `pthread_atfork` parent and child: sockets may be created again.
pub fn after_fork() {
    FORKING.store(false, Ordering::SeqCst);
}

pub fn is_registered(fd: RawFd) -> bool {
    slot(fd).is_some_and(|(word, bit)| bits()[word].load(Ordering::Acquire) & bit != 0)
}

/// Closes every registered fd and forgets it. For the child side of a fork
/// only: async-signal-safe (atomics and `close`), and the parent's runtime
/// threads, which would otherwise own these sockets, do not exist here.
pub fn close_all_after_fork() {
    let Some(bits) = BITS.get() else { return };
    for (word_index, word) in bits.iter().enumerate() {
        let mut set = word.swap(0, Ordering::AcqRel);
        while set != 0 {
            let bit = set.trailing_zeros() as usize;
            set &= set - 1;
            // SAFETY: closing an fd number has no memory-safety preconditions;
            // the fd belongs to the proxy, whose threads are gone in a child.
            unsafe { libc::close((word_index * 64 + bit) as RawFd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn registration_lasts_until_the_guard_drops() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = socket.as_raw_fd();
        let guard = register(fd);
        assert!(is_registered(fd));
        drop(guard);
        assert!(!is_registered(fd));
    }

    #[test]
    fn out_of_range_fds_are_ignored() {
        let guard = register(-1);
        assert!(!is_registered(-1));
        drop(guard);
    }
}
