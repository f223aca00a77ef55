//! Caps on client connections, so a flood of idle or slow connections
//! (slowloris) can neither exhaust file descriptors nor crowd out everyone
//! else: a total cap (further connections wait in the kernel's accept
//! backlog) and an optional per-IP cap (excess connections are closed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// File descriptors kept back for listeners, upstream connections, temp
/// files and the app (in-process mode shares the limit with Puma).
const FD_RESERVE: u64 = 256;
/// The automatic total cap never goes above this.
const AUTO_MAX: u64 = 16_384;

/// Raises the soft open-files limit to the hard limit (what nginx's
/// `worker_rlimit_nofile` is for). Returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// The total cap when `MAX_CONNECTIONS` is 0: each proxied connection may
/// need a second descriptor upstream, so half of what the limit allows.
pub fn automatic_cap(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(FD_RESERVE) / 2).clamp(64, AUTO_MAX) as usize
}

pub struct ConnLimits {
    total: Arc<Semaphore>,
    pub max: usize,
    per_ip: Option<(u32, Mutex<HashMap<IpAddr, u32>>)>,
}

/// A connection's place under the caps, released when it is dropped.
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    ip: Option<(Arc<ConnLimits>, IpAddr)>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.ip.take() {
            if let Some((_, counts)) = &limits.per_ip {
                let mut counts = counts.lock().expect("per-IP counts");
                if let Some(n) = counts.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(&ip);
                    }
                }
            }
        }
    }
}

impl ConnLimits {
    pub fn new(max: usize, per_ip: u32) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            total: Arc::new(Semaphore::new(max)),
            max,
            per_ip: (per_ip > 0).then(|| (per_ip, Mutex::new(HashMap::new()))),
        })
    }

    /// Client connections open now (listeners waiting to accept hold one
    /// reservation each until they stop).
    pub fn open(&self) -> usize {
        self.max - self.total.available_permits()
    }

    /// Waits for room under the total cap (taken before accepting, so the
    /// excess waits in the backlog rather than holding descriptors).
    pub async fn reserve(&self) -> OwnedSemaphorePermit {
        self.total
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Room under the total cap if there is some now. For QUIC, where a
    /// connection attempt cannot wait in a backlog: at the cap it is
    /// refused.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().try_acquire_owned().ok()
    }

    /// Admits a connection from `ip`, or `None` when that address already
    /// has its share.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, permit: OwnedSemaphorePermit) -> Option<ConnSlot> {
        let Some((cap, counts)) = &self.per_ip else {
            return Some(ConnSlot {
                _permit: permit,
                ip: None,
            });
        };
        let ip = ip.to_canonical();
        let mut counts = counts.lock().expect("per-IP counts");
        let n = counts.entry(ip).or_insert(0);
        if *n >= *cap {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            _permit: permit,
            ip: Some((Arc::clone(self), ip)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_ip_cap_admits_up_to_the_cap_and_frees_on_drop() {
        let limits = ConnLimits::new(10, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.1".parse().unwrap(); // the same address, mapped
        let first = limits.admit(a, limits.reserve().await).unwrap();
        let _second = limits.admit(b, limits.reserve().await).unwrap();
        assert!(limits.admit(a, limits.reserve().await).is_none());
        assert!(limits
            .admit("192.0.2.2".parse().unwrap(), limits.reserve().await)
            .is_some());
        drop(first);
        assert!(limits.admit(a, limits.reserve().await).is_some());
    }

    #[tokio::test]
    async fn total_cap_makes_the_next_connection_wait() {
        let limits = ConnLimits::new(1, 0);
        let slot = limits.admit("192.0.2.1".parse().unwrap(), limits.reserve().await);
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), limits.reserve()).await;
        assert!(waiting.is_err(), "the second reservation waits");
        drop(slot);
        let _freed = tokio::time::timeout(std::time::Duration::from_secs(1), limits.reserve())
            .await
            .expect("freed");
    }

    #[test]
    fn automatic_cap_leaves_room() {
        assert_eq!(automatic_cap(1024), 384);
        assert_eq!(automatic_cap(20_000), 9_872);
        assert_eq!(automatic_cap(1 << 20), AUTO_MAX as usize);
        assert_eq!(automatic_cap(100), 64);
    }
}
