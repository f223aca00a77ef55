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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::settle::Settle;

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
    static RARE_WORK: Settle = Settle::new(SETTLE);
    RARE_WORK_REPORTED.fetch_add(1, Ordering::Relaxed);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if let Some(settled) = RARE_WORK.poke() {
        runtime.spawn(async move {
            settled.await;
            release();
        });
    }
}

/// Calls of [`release_after_rare_work`] so far.
static RARE_WORK_REPORTED: AtomicUsize = AtomicUsize::new(0);

/// How many times rare work has been reported, for tests of its callers
/// (when the release follows is [`Settle`]'s to test).
pub fn rare_work_reported() -> usize {
    RARE_WORK_REPORTED.load(Ordering::Relaxed)
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
}
