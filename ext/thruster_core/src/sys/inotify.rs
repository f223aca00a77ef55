//! Change notifications for open files (inotify): the disk cache holds
//! entry files open between hits and must learn at once when one is
//! written into or loses its name, without a `stat` on every hit.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::Registered;

/// What a watch reports: the file's content, metadata or links changed
/// (written into, replaced or removed under its name, moved).
const EVENTS: u32 = libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;

/// One inotify instance, registered for fork safety like every fd.
pub struct Inotify {
    fd: AsyncFd<Registered<File>>,
}

/// A watch on one open file, removed on drop.
pub struct Watch {
    inotify: Arc<Inotify>,
    wd: i32,
}

/// What one read of the queue found.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// These watches' files changed.
    Files(Vec<i32>),
    /// Events were lost: assume every watched file changed.
    Overflow,
}

impl Inotify {
    /// A new instance; needs a Tokio runtime with I/O.
    pub fn new() -> io::Result<Arc<Inotify>> {
        let file = Registered::open(|| {
            // SAFETY: plain syscall; the fd is owned by the File at once.
            let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd nobody else owns.
            Ok(unsafe { File::from_raw_fd(fd) })
        })?;
        // SAFETY: `Registered<File>` owns the fd, keeps it open until it is
        // dropped with the AsyncFd, and always returns that same fd.
        let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Arc::new(Inotify { fd }))
    }

    /// Watches the file open as `fd` — that very file, through
    /// `/proc/self/fd`, even if its name now points at another one.
    pub fn watch(self: &Arc<Self>, fd: RawFd) -> io::Result<Watch> {
        let path = CString::new(format!("/proc/self/fd/{fd}"))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid C string and our inotify fd.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), EVENTS) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch {
            inotify: self.clone(),
            wd,
        })
    }

    /// Waits for events and returns the watches they concern.
    pub async fn changed(&self) -> io::Result<Changed> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let read = guard.try_io(|fd| {
                // SAFETY: reads into our buffer, at most its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            let n = match read {
                Ok(result) => result?,
                Err(_would_block) => continue,
            };
            return Ok(parse(&buf[..n]));
        }
    }
}

impl Watch {
    pub fn id(&self) -> i32 {
        self.wd
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: removes our own watch; an already removed one (the file
        // is gone) just fails.
        unsafe { libc::inotify_rm_watch(self.inotify.fd.as_raw_fd(), self.wd) };
    }
}

/// The watch descriptors of a buffer of `inotify_event`s.
fn parse(mut buf: &[u8]) -> Changed {
    const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
    let mut files = Vec::new();
    while buf.len() >= HEAD {
        let field = |at: usize| {
            let mut word = [0u8; 4];
            word.copy_from_slice(&buf[at..at + 4]);
            word
        };
        let wd = i32::from_ne_bytes(field(0));
        let mask = u32::from_ne_bytes(field(4));
        let name_len = u32::from_ne_bytes(field(12)) as usize;
        if mask & libc::IN_Q_OVERFLOW != 0 {
            return Changed::Overflow;
        }
        if mask & libc::IN_IGNORED == 0 {
            files.push(wd);
        }
        buf = buf.get(HEAD + name_len..).unwrap_or(&[]);
    }
    Changed::Files(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_or_an_unlink_of_a_watched_open_file_is_reported() {
        let dir = super::super::test_support::TempDir::new("inotify");
        let path = dir.0.join("f");
        std::fs::write(&path, b"one").unwrap();
        let file = File::open(&path).unwrap();
        let inotify = Inotify::new().unwrap();
        let watch = inotify.watch(file.as_raw_fd()).unwrap();
        let within = |what| tokio::time::timeout(Duration::from_secs(5), what);

        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"two")
            .unwrap();
        let changed = within(inotify.changed()).await.unwrap().unwrap();
        assert!(matches!(&changed, Changed::Files(wds) if wds.contains(&watch.id())));

        // Replaced under its name: the open file loses its link.
        let other = dir.0.join("g");
        std::fs::write(&other, b"new").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let changed = within(inotify.changed()).await.unwrap().unwrap();
        assert!(matches!(&changed, Changed::Files(wds) if wds.contains(&watch.id())));
        drop(watch);
    }

    #[test]
    fn overflow_and_ignored_events_are_told_apart() {
        let event = |wd: i32, mask: u32, name: usize| {
            let mut out = Vec::new();
            out.extend_from_slice(&wd.to_ne_bytes());
            out.extend_from_slice(&mask.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            out.extend_from_slice(&(name as u32).to_ne_bytes());
            out.extend(std::iter::repeat_n(0u8, name));
            out
        };
        let mut buf = event(3, libc::IN_MODIFY, 0);
        buf.extend(event(4, libc::IN_IGNORED, 16));
        buf.extend(event(5, libc::IN_ATTRIB, 0));
        assert_eq!(parse(&buf), Changed::Files(vec![3, 5]));
        buf.extend(event(-1, libc::IN_Q_OVERFLOW, 0));
        assert_eq!(parse(&buf), Changed::Overflow);
    }
}
