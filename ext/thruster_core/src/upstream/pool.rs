//! The keep-alive connections to the app: hyper HTTP/1.1 connections kept
//! idle in a stack, most recently used on top.
//!
//! Every request of the proxy goes to the one app address, so the pool
//! needs no key, no per-host table and no checkout futures: a request takes
//! the top idle connection if hyper can send on it at once, else connects.
//! A connection goes back on the stack once its response has been read off
//! the socket: at the response head when hyper already read the whole
//! response, else as the body ends. Hyper's connection task may not have
//! caught up by then (it marks itself ready for the next request just
//! after handing over the last bytes); such a connection is kept as
//! *settling* and taken once it is ready, with no task spawned to wait
//! for it. Taking the most recently used connection first leaves the rest
//! unused when the load shrinks, so they expire and close.
//!
//! The lock guards a push or a pop; nothing is awaited or dropped under it
//! (dropping a connection's sender wakes its task, which closes the socket).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use crate::http::RequestBody;

/// A request sender of one connection to the app.
pub(super) type Sender = SendRequest<RequestBody>;

/// How many idle connections are kept and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolLimits {
    /// Idle connections kept; one returned to a full pool is closed.
    pub max_idle: usize,
    /// An idle connection older than this is never used again and is
    /// closed by the next sweep.
    pub idle_timeout: Duration,
}

#[derive(Clone)]
pub(super) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    idle: Mutex<Idle>,
    limits: PoolLimits,
}

struct Idle {
    /// Oldest first; taken from the end.
    stack: Vec<IdleConn>,
    /// A sweeper task is running: it stops once the stack is empty and is
    /// started again by the next connection put back.
    sweeping: bool,
}

struct IdleConn {
    sender: Sender,
    since: Instant,
}

/// What [`Pool::take`] found.
pub(super) enum Taken {
    /// A connection hyper can send on now.
    Ready(Sender),
    /// None ready, but this one is still settling: it is the caller's to
    /// wait for (briefly) or put back.
    Settling(Sender),
    /// None.
    Empty,
}

impl IdleConn {
    fn expired(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) >= timeout
    }
}

impl Pool {
    pub fn new(limits: PoolLimits) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                idle: Mutex::new(Idle {
                    stack: Vec::with_capacity(limits.max_idle),
                    sweeping: false,
                }),
                limits,
            }),
        }
    }

    /// The most recently used idle connection that hyper can send on and
    /// that has not expired, else the most recently returned settling one;
    /// those found closed or expired on the way are closed, other settling
    /// ones stay.
    pub fn take(&self) -> Taken {
        self.take_at(Instant::now())
    }

    /// [`Pool::take`] as at `now`.
    fn take_at(&self, now: Instant) -> Taken {
        let timeout = self.shared.limits.idle_timeout;
        let mut stale = Vec::new();
        let mut settling = Vec::new();
        let (found, settled) = {
            let mut idle = self.shared.lock();
            let found = loop {
                let Some(conn) = idle.stack.pop() else {
                    break None;
                };
                if conn.expired(now, timeout) || conn.sender.is_closed() {
                    stale.push(conn);
                } else if conn.sender.is_ready() {
                    break Some(conn.sender);
                } else {
                    settling.push(conn);
                }
            };
            // Without a ready one, the first settling one found (the most
            // recently returned) is the caller's.
            let settled = match found {
                Some(_) => None,
                None if settling.is_empty() => None,
                None => Some(settling.remove(0).sender),
            };
            // The others back, in their order.
            idle.stack.extend(settling.drain(..).rev());
            (found, settled)
        };
        drop(stale);
        match (found, settled) {
            (Some(sender), _) => Taken::Ready(sender),
            (None, Some(sender)) => Taken::Settling(sender),
            (None, None) => Taken::Empty,
        }
    }

    /// Puts back a connection whose response has been read off the socket
    /// (see the module's comment), unless it closed.
    pub fn give_back(&self, sender: Sender) {
        if !sender.is_closed() {
            self.put(sender);
        }
    }

    /// Keeps a connection hyper is ready to send on; closes it otherwise.
    pub fn keep_if_ready(&self, sender: Sender) {
        if sender.is_ready() {
            self.put(sender);
        }
    }

    /// Keeps a connection, unless the pool is full.
    pub fn put(&self, sender: Sender) {
        let surplus = {
            let mut idle = self.shared.lock();
            if idle.stack.len() >= self.shared.limits.max_idle {
                // Closed outside the lock, below.
                Some(sender)
            } else {
                idle.stack.push(IdleConn {
                    sender,
                    since: Instant::now(),
                });
                let start = !idle.sweeping;
                idle.sweeping = true;
                if start {
                    tokio::spawn(sweep(Arc::downgrade(&self.shared)));
                }
                None
            }
        };
        drop(surplus);
    }

    /// [`Pool::take`] as if `later` had passed, for tests.
    #[cfg(test)]
    pub fn take_after(&self, later: Duration) -> Taken {
        self.take_at(Instant::now() + later)
    }

    /// Idle connections held (open or not yet swept), for tests.
    #[cfg(test)]
    pub fn idle_len(&self) -> usize {
        self.shared.lock().stack.len()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        // Nothing panics while the lock is held, and the stack is valid
        // whatever happened: a poisoned lock is used as it is.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes idle connections that expired or that the app closed, every half
/// timeout, so an unused connection lives at most one and a half times the
/// timeout (15 s: below Puma's 20 s keep-alive timeout), and stops when no
/// connection is left idle or the pool is gone.
async fn sweep(pool: Weak<Shared>) {
    let Some(period) = pool
        .upgrade()
        .map(|shared| (shared.limits.idle_timeout / 2).max(Duration::from_millis(10)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(shared) = pool.upgrade() else {
            return;
        };
        let timeout = shared.limits.idle_timeout;
        let now = Instant::now();
        let mut stale = Vec::new();
        let done = {
            let mut idle = shared.lock();
            let (keep, expired): (Vec<_>, Vec<_>) = std::mem::take(&mut idle.stack)
                .into_iter()
                .partition(|conn| !conn.expired(now, timeout) && !conn.sender.is_closed());
            idle.stack = keep;
            stale.extend(expired);
            if idle.stack.is_empty() {
                idle.sweeping = false;
            }
            !idle.sweeping
        };
        drop(stale);
        if done {
            return;
        }
    }
}
