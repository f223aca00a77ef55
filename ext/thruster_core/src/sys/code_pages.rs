//! Code pages given back once the proxy has started.
//!
//! The proxy's machine code and read-only data (the extension
//! `thruster_rs.so` in-process, the `thrust` executable otherwise) are
//! clean pages of a file mapping. Every page the start touches — config
//! parsing, TLS and ACME setup, the QUIC endpoint, the Redis client, the
//! metrics registry — stays mapped into the process afterwards, and the
//! kernel maps up to 64 KiB around each fault, so an idle in-process proxy
//! had 5.3 of its 8.8 MiB resident in the Puma master although a request
//! runs a fraction of it.
//!
//! [`release`] unmaps those pages with `madvise(MADV_DONTNEED)` on the
//! object's read-only `PT_LOAD` segments (never a writable one: its pages
//! are relocated copies that only exist in this process). The pages stay
//! in the page cache; a later touch is a minor fault that maps them again
//! (with fault-around), so what requests run becomes resident again and
//! what only the start ran does not. `MADV_COLD` would leave them mapped;
//! `MADV_PAGEOUT` would drop them from the page cache too (a major fault,
//! a disk read, on next use), and needs write access to the file.
//!
//! What this frees: the pages leave the process's RSS and PSS. Clean and
//! unmapped, the kernel reclaims them first when memory is short (mapped
//! code gets a second chance on the active list); until then they remain
//! cached, charged to the memory cgroup as page cache like any file read.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long after the last piece of rare work its pages are released.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Releases the pages again [`SETTLE`] after the last call, from a task of
/// the current runtime (nothing without one).
///
/// For work that runs rarely and touches much code and data once: a
/// cached entry's variants made at brotli 11, zstd 19 and gzip 9 run
/// encoder code and read dictionaries and tables (~1 MiB) that no request
/// touches, and left alone those pages would stay in the process for its
/// life. A burst of such work (the first requests after a deploy) releases
/// once, a second after it settles; what requests run faults back in
/// (minor faults from the page cache, a few hundred microseconds in all).
pub fn release_after_rare_work() {
    static RARE_WORK: Settle = Settle::new(release);
    RARE_WORK_REPORTED.fetch_add(1, Ordering::Relaxed);
    RARE_WORK.poke();
}

/// Calls of [`release_after_rare_work`] so far.
static RARE_WORK_REPORTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times rare work has been reported, for tests of its callers
/// (when the release follows is [`Settle`]'s to test).
pub fn rare_work_reported() -> usize {
    RARE_WORK_REPORTED.load(Ordering::Relaxed)
}

/// Runs an action once, [`SETTLE`] after the last of a burst of pokes.
pub struct Settle {
    last: Mutex<Option<Instant>>,
    /// A task waiting to run the action exists.
    pending: AtomicBool,
    action: fn(),
}

impl Settle {
    pub const fn new(action: fn()) -> Settle {
        Settle {
            last: Mutex::new(None),
            pending: AtomicBool::new(false),
            action,
        }
    }

    fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules the action SETTLE from now on the current runtime (none
    /// without one), or moves the one scheduled there.
    pub fn poke(&'static self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        // Made here, not in the task: a task dropped before its first poll
        // drops it too.
        let pending = Pending(&self.pending);
        runtime.spawn(async move {
            while let Some(at) = self.last().filter(|at| at.elapsed() < SETTLE) {
                tokio::time::sleep_until(at + SETTLE).await;
            }
            // Cleared before the action: a poke after this point schedules
            // a run of its own.
            drop(pending);
            (self.action)();
        });
    }
}

/// Clears a [`Settle`]'s pending flag when its task ends, run or dropped
/// with its runtime (`Thruster.stop`): a later runtime's pokes then
/// schedule again instead of waiting on a task that is gone.
struct Pending<'a>(&'a AtomicBool);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Unmaps the read-only segments of the object holding this code. Safe to
/// call at any time from any thread: code running concurrently faults its
/// pages back in. Does nothing for an object with text relocations (its
/// "read-only" pages would be modified copies) or outside Linux.
pub fn release() {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    {
        let mut ranges = Vec::new();
        // SAFETY: the callback only reads the headers it is given and
        // writes to `ranges`, which outlives the call.
        unsafe {
            libc::dl_iterate_phdr(
                Some(collect),
                (&mut ranges as *mut Vec<(usize, usize)>).cast(),
            );
        }
        for (start, len) in ranges {
            // SAFETY: whole pages of a read-only, unmodified file mapping
            // of our own object: dropping them loses nothing, a touch maps
            // the same bytes again from the file.
            unsafe {
                libc::madvise(start as *mut c_void, len, libc::MADV_DONTNEED);
            }
        }
    }
}

/// An address inside this object's code.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn here() -> usize {
    release as fn() as usize
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: the loader hands us a valid `dl_phdr_info` whose headers
    // live through the call; `data` is the `Vec` `release` passed.
    let (info, ranges) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize)>>()) };
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let base = info.dlpi_addr as usize;
    let segment = |h: &libc::Elf64_Phdr| {
        let start = base + h.p_vaddr as usize;
        (start, start + h.p_memsz as usize)
    };
    let ours = headers.iter().any(|h| {
        let (start, end) = segment(h);
        h.p_type == libc::PT_LOAD && (start..end).contains(&here())
    });
    if !ours {
        return 0;
    }
    // SAFETY: a PT_DYNAMIC header gives the object's dynamic section.
    if headers.iter().any(|h| {
        h.p_type == libc::PT_DYNAMIC && unsafe { has_text_relocations(base + h.p_vaddr as usize) }
    }) {
        return 1;
    }
    let page = page_size();
    for h in headers {
        if h.p_type != libc::PT_LOAD || h.p_flags & libc::PF_W != 0 {
            continue;
        }
        // Only pages wholly inside the segment: a page it shares with a
        // writable neighbour is that neighbour's.
        let (start, end) = segment(h);
        let (start, end) = (start.next_multiple_of(page), end / page * page);
        if end > start {
            ranges.push((start, end - start));
        }
    }
    1
}

/// Whether the dynamic section at `dynamic` asks for text relocations.
///
/// # Safety
/// `dynamic` must be the address of a loaded object's `PT_DYNAMIC`.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
unsafe fn has_text_relocations(dynamic: usize) -> bool {
    /// `Elf64_Dyn`, which the libc crate does not define.
    #[repr(C)]
    struct Dyn {
        d_tag: i64,
        d_un: u64,
    }
    const DT_TEXTREL: i64 = 22;
    const DT_FLAGS: i64 = 30;
    const DF_TEXTREL: u64 = 0x4;
    let mut entry = dynamic as *const Dyn;
    loop {
        // SAFETY: the section ends with DT_NULL (0), per the ELF format.
        let d = unsafe { &*entry };
        match d.d_tag {
            0 => return false,
            DT_TEXTREL => return true,
            DT_FLAGS if d.d_un & DF_TEXTREL != 0 => return true,
            _ => {}
        }
        entry = unsafe { entry.add(1) };
    }
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_runs_after_its_pages_are_released() {
        fn work(n: u64) -> u64 {
            (0..n).map(|i| i.wrapping_mul(2_654_435_761) % 97).sum()
        }
        let before = work(10_000);
        release();
        release();
        assert_eq!(work(10_000), before);
        // Read-only data too: a string literal still reads the same.
        assert_eq!("thruster".len(), 8);
    }

    /// A burst of rare work releases once, a second after its last piece;
    /// work after that schedules a release of its own.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn rare_work_releases_once_a_second_after_the_burst() {
        use std::sync::atomic::AtomicUsize;
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        static SETTLED: Settle = Settle::new(|| {
            RUNS.fetch_add(1, Ordering::SeqCst);
        });
        let runs = || RUNS.load(Ordering::SeqCst);
        let wait = |d: Duration| async move {
            tokio::time::sleep(d).await;
            tokio::task::yield_now().await;
        };
        SETTLED.poke();
        wait(SETTLE / 2).await;
        SETTLED.poke();
        wait(SETTLE * 3 / 4).await;
        assert_eq!(runs(), 0, "not before a second after the last poke");
        wait(SETTLE / 2).await;
        assert_eq!(runs(), 1);
        wait(SETTLE * 3).await;
        assert_eq!(runs(), 1, "once per burst");
        SETTLED.poke();
        wait(SETTLE + Duration::from_millis(10)).await;
        assert_eq!(runs(), 2);
        // Without a runtime: nothing is scheduled.
        std::thread::spawn(|| SETTLED.poke()).join().unwrap();
        wait(SETTLE * 2).await;
        assert_eq!(runs(), 2);
    }

    /// A runtime shut down while a run is pending (`Thruster.stop`) does
    /// not leave the next runtime's pokes without a run.
    #[test]
    fn a_run_pending_on_a_runtime_that_stopped_does_not_block_the_next() {
        use std::sync::atomic::AtomicUsize;
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        static SETTLED: Settle = Settle::new(|| {
            RUNS.fetch_add(1, Ordering::SeqCst);
        });
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let first = runtime();
        first.block_on(async { SETTLED.poke() });
        drop(first);
        assert_eq!(RUNS.load(Ordering::SeqCst), 0, "stopped before its run");
        runtime().block_on(async {
            SETTLED.poke();
            tokio::time::sleep(SETTLE * 2).await;
        });
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    }
}
