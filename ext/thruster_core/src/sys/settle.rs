//! Work done once a burst of activity has settled: a quiet period after
//! the last activity, counted from it (a fixed period would wait up to
//! twice as long). Used to empty the encoders' idle pools and to release
//! the code pages that cache fills touched.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The last activity, and whether a wait for the quiet after it exists.
pub struct Settle {
    last: Mutex<Option<Instant>>,
    waiting: AtomicBool,
    quiet: Duration,
}

impl Settle {
    pub const fn new(quiet: Duration) -> Settle {
        Settle {
            last: Mutex::new(None),
            waiting: AtomicBool::new(false),
            quiet,
        }
    }

    /// Activity that starts no wait: it moves the end of one going on.
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Activity. The first since the last wait ended returns a new wait: a
    /// future that ends `quiet` after the last activity, for the caller to
    /// spawn with the work that follows it. However it ends, run to its
    /// end or dropped unpolled with its runtime (`Thruster.stop`), the next
    /// activity can start a wait again.
    pub fn poke(&'static self) -> Option<impl Future<Output = ()> + Send + 'static> {
        self.touch();
        if self.waiting.swap(true, Ordering::AcqRel) {
            return None;
        }
        // Made here, not in the future: a future dropped before its first
        // poll drops it too.
        let waiting = Waiting(&self.waiting);
        Some(async move {
            while let Some(at) = self.last().filter(|at| at.elapsed() < self.quiet) {
                tokio::time::sleep_until(at + self.quiet).await;
            }
            // Cleared before the caller's work: activity after this point
            // starts a wait of its own.
            drop(waiting);
        })
    }
}

/// Clears a [`Settle`]'s waiting flag when its wait ends or is dropped.
struct Waiting(&'static AtomicBool);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const QUIET: Duration = Duration::from_secs(1);

    /// Pokes `settle`, counting a run in `runs` when a wait it starts ends.
    fn poke(settle: &'static Settle, runs: &'static AtomicUsize) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(settled) = settle.poke() {
            runtime.spawn(async move {
                settled.await;
                runs.fetch_add(1, Ordering::SeqCst);
            });
        }
    }

    /// A burst runs the work once, a second after its last activity;
    /// activity after that schedules a run of its own.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_burst_runs_once_a_second_after_its_last_activity() {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        static SETTLE: Settle = Settle::new(QUIET);
        let runs = || RUNS.load(Ordering::SeqCst);
        let wait = |d: Duration| async move {
            tokio::time::sleep(d).await;
            tokio::task::yield_now().await;
        };
        poke(&SETTLE, &RUNS);
        wait(QUIET / 2).await;
        poke(&SETTLE, &RUNS);
        wait(QUIET * 3 / 4).await;
        assert_eq!(runs(), 0, "not before a second after the last poke");
        wait(QUIET / 2).await;
        assert_eq!(runs(), 1);
        wait(QUIET * 3).await;
        assert_eq!(runs(), 1, "once per burst");
        poke(&SETTLE, &RUNS);
        wait(QUIET + Duration::from_millis(10)).await;
        assert_eq!(runs(), 2);
        // Without a runtime: nothing is scheduled.
        std::thread::spawn(|| poke(&SETTLE, &RUNS)).join().unwrap();
        wait(QUIET * 2).await;
        assert_eq!(runs(), 2);
    }

    /// A runtime shut down while a run is pending (`Thruster.stop`) does
    /// not leave the next runtime's pokes without a run.
    #[test]
    fn a_run_pending_on_a_runtime_that_stopped_does_not_block_the_next() {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        static SETTLE: Settle = Settle::new(QUIET);
        let first = crate::sys::test_support::paused_runtime();
        first.block_on(async { poke(&SETTLE, &RUNS) });
        drop(first);
        assert_eq!(RUNS.load(Ordering::SeqCst), 0, "stopped before its run");
        crate::sys::test_support::paused_runtime().block_on(async {
            poke(&SETTLE, &RUNS);
            tokio::time::sleep(QUIET * 2).await;
        });
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    }
}
