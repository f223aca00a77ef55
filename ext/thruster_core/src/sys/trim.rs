//! Memory given back after a burst of connections.
//!
//! Each connection being served holds hyper's buffers and state; parked or
//! closed, it frees them, but glibc keeps freed memory in its arenas, so a
//! burst of 1,000 connections left the process ~40 MiB larger for good
//! although the idle connections need a fraction of that. When the number
//! of connections being served falls to zero after a burst (a peak of at
//! least [`BURST`]) and stays there for [`QUIET`], `malloc_trim(0)` returns
//! the free pages inside the arenas to the kernel. Not after ordinary
//! traffic: in-process, the trim walks the Puma master's heap too, and a
//! quiet app between two requests gains nothing from it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Connections served at once that make a burst worth trimming after.
pub const BURST: usize = 64;
/// How long nothing must be served before the trim.
pub const QUIET: Duration = Duration::from_millis(200);

static SERVING: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Bumped whenever a connection starts being served: a trim scheduled
/// before it is void.
static EPOCH: AtomicU64 = AtomicU64::new(0);
static SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Held while a connection is being served (not parked).
#[derive(Debug)]
pub struct Serving(());

impl Serving {
    pub fn begin() -> Serving {
        EPOCH.fetch_add(1, Ordering::AcqRel);
        let now = SERVING.fetch_add(1, Ordering::AcqRel) + 1;
        PEAK.fetch_max(now, Ordering::AcqRel);
        Serving(())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if SERVING.fetch_sub(1, Ordering::AcqRel) == 1 && PEAK.load(Ordering::Acquire) >= BURST {
            schedule();
        }
    }
}

fn schedule() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    let epoch = EPOCH.load(Ordering::Acquire);
    runtime.spawn(async move {
        tokio::time::sleep(QUIET).await;
        SCHEDULED.store(false, Ordering::Release);
        if SERVING.load(Ordering::Acquire) != 0 || EPOCH.load(Ordering::Acquire) != epoch {
            // Busy again: the next quiet moment trims.
            if SERVING.load(Ordering::Acquire) == 0 {
                schedule();
            }
            return;
        }
        PEAK.store(0, Ordering::Release);
        // It walks every arena under its lock: not on a worker thread.
        let _ = tokio::task::spawn_blocking(trim).await;
    });
}

fn trim() {
    // SAFETY: malloc_trim only releases free memory of glibc's own arenas.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_raises_the_peak_and_trimming_is_harmless() {
        let burst: Vec<Serving> = (0..BURST).map(|_| Serving::begin()).collect();
        assert!(PEAK.load(Ordering::Acquire) >= BURST);
        // Other tests may serve connections meanwhile: only ours are counted
        // here, and the trim itself must be safe to run at any time.
        drop(burst);
        trim();
    }
}
