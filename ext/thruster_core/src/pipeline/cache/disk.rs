//! The disk tier's storage engine: one file per entry, like nginx's
//! `proxy_cache_path`, in the format of [`super::entry`].
//!
//! ```text
//! <dir>/<h[0..2]>/<h[2..4]>/<h>     h = SHA-256 of the key, 64 lower-case hex
//! <dir>/tmp/<pid>-<16 hex random>   entries being written
//! ```
//!
//! Why files and not an engine such as foyer or cacache: two processes use
//! the directory at once (the old and the new container share the volume
//! during a deploy), and a file per entry written to a temp file and
//! renamed into place is safe for that with no lock and no shared index:
//! `rename(2)` is atomic, a reader holds the inode it opened, and the last
//! rename of a key wins with both writes complete. An entry is found by its
//! key's hash, so the first request after a restart is a hit before any
//! index exists. foyer's block engine owns its device and keeps its index in
//! memory (one process only); cacache is content-addressed (index file plus
//! content, two steps to keep consistent, no streaming verified reads).
//!
//! Each process keeps its own index (size, freshness, last use) of the
//! entries it knows: those it wrote or read, and those a background loader
//! finds scanning the directory one first-level directory at a time after
//! start, and again every few minutes (so entries another process wrote or
//! removed are accounted for). Eviction keeps the known bytes under the
//! budget: dead entries first (past lifetime and stale-if-error, or another
//! format version's), then stale ones, then least recently used. With two
//! processes each enforces the budget on its own view, so during a deploy
//! the directory may briefly hold up to twice the budget.
//!
//! Never touched: anything outside `<dir>`, and inside it anything not named
//! like an entry or a temp file of ours. An entry with our name whose
//! content fails a check is removed (the file is damaged); a checked entry
//! of another format version is left for the release that reads it, and
//! only evicted like any other entry.
//!
//! Failure is a miss, never an error to the request: a read error, a bad
//! entry, a disk that is read-only, full or forbidden. The last kind
//! (EROFS, ENOSPC, EDQUOT, EACCES, EPERM, ENOTDIR) logs one line and stops
//! writes for the life of the store; reads go on, since what is on a
//! read-only or full disk is still good (a restart retries writes).
//!
//! No fsync: the format detects what a crash can leave (a renamed file
//! whose blocks never reached the disk has the wrong length, zeros where
//! the magic is, or bad checksums), so a crash costs misses, not wrong
//! bytes, and writes stay at page-cache speed.
//!
//! Fork safety: every fd the store opens (entries, temp files, directories
//! being listed) is registered in [`fd_registry`] while open, so a Puma
//! worker forked meanwhile closes it (an inherited fd would keep an evicted
//! file's blocks allocated for the worker's lifetime).
//!
//! Reads for a hit run inline on the async worker while their bytes are in
//! the page cache (`preadv2(RWF_NOWAIT)`, see [`Reads`]), as nginx serves
//! hot files inline; all other file I/O — cold reads, writes, eviction,
//! scans — runs on Tokio's blocking pool. An entry opened for a hit is held
//! open for the next hits of its key for a moment ([`Held`]), so a hot
//! entry costs one `pread`; its chunks are checked once per open file
//! ([`read_chunk`] says why that is enough). The store needs a Tokio runtime
//! with the time driver (the proxy's has one).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::{DirBuilder, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::entry::{
    self, chunk_count, chunk_len, chunk_offset, framed_body_len, now_unix_ms, EntryError,
    EntryMeta, KeyHash, CHUNK_HEADER_LEN, CHUNK_LEN,
};
use crate::conn::{ConnState, FileRegion, MARKER_LEN};
use crate::http::BoxError;
use crate::log;
use crate::sys;
use crate::sys::fd_registry;
use crate::sys::inotify::{Changed, Inotify, Watch};

const TMP_DIR: &str = "tmp";
/// A temp file untouched this long belongs to a crashed or killed process
/// (a live writer writes at least every chunk, and an abandoned one is
/// removed at once). Another process's live writes are never this idle.
const STALE_TEMP: Duration = Duration::from_secs(15 * 60);
/// How often the loader scans again, for entries other processes wrote or
/// removed, dead entries, and temp files crashed processes left.
const RESCAN_EVERY: Duration = Duration::from_secs(5 * 60);
/// Pause between the loader's batches (one first-level directory, 1/256 of
/// the store), so a scan never hogs the disk or the blocking pool.
const LOADER_PAUSE: Duration = Duration::from_millis(5);
/// Bytes waiting for the disk per writer above which `DiskWriter::poll_ready`
/// holds the caller back (a paced caller slows to the disk's speed).
const PACE: usize = 4 << 20;
/// Bytes waiting for the disk when a push arrives above which the caller is
/// not pacing and the disk is behind: the write is dropped rather than
/// holding ever more memory.
const MAX_QUEUED: usize = 16 << 20;
/// Disk usage is counted in blocks: a 100-byte entry takes a block.
const BLOCK: u64 = 4096;
/// The first read of an entry: the envelope and the metadata of nearly
/// every entry in one `pread`.
const FIRST_READ: u64 = 16 * 1024;
/// An entry file up to this size is read whole by its first read: most
/// stored encodings and small assets are then served from that one read.
const WHOLE_READ: u64 = 64 * 1024;
/// Bodies read into memory on an async worker when their pages are cached;
/// larger ones (rare: memory takes 1 MiB by default) go to the blocking pool.
const INLINE_READ_MAX: u64 = 1 << 20;
/// How long an entry opened for a hit stays open for the next hits of its
/// key (see [`Held`]).
const KEEP_OPEN: Duration = Duration::from_secs(2);
/// Entries held open at most: a share of the fd limit (Puma's master often
/// runs with 1,024), never more than this.
const MAX_HELD: usize = 256;
/// Smaller chunks are read and written rather than sent with sendfile(2):
/// then the response head and the body leave in one `writev`, with no
/// `MSG_MORE` write before a `sendfile`. For the 16 KB CSS of
/// `bench/cache_tiers.rb` both ways cost the same CPU per hit (1.2× a
/// memory hit); the copy sendfile saves only pays on larger bodies.
const ZERO_COPY_MIN: u64 = 64 * 1024;
/// Messages a write task takes from its queue per blocking-pool hop.
const WRITE_BATCH: usize = 32;

/// Why a write did not make it to disk (nothing for a request to act on:
/// the entry is simply not stored).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk cache is not writable")]
    Off,
    #[error("entry over the item size limit")]
    TooLarge,
    #[error("body was {actual} bytes; {declared} were declared")]
    Length { declared: u64, actual: u64 },
    #[error("write abandoned: {0}")]
    Abandoned(&'static str),
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("disk cache task failed")]
    Task,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Io { op, source }
}

/// A read-only, full or forbidden disk: writes cannot succeed until
/// someone fixes it.
fn disk_unusable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::EROFS | libc::ENOSPC | libc::EDQUOT | libc::EACCES | libc::EPERM | libc::ENOTDIR
        )
    )
}

/// `crate::log` has no warning level yet: an unusable cache disk is worth
/// an operator's eye, so it goes out as an error line.
fn debug(msg: &str, path: &Path, err: &dyn std::fmt::Display) {
    if log::enabled(log::Level::Debug) {
        log::debug(
            msg,
            &[
                ("path", Value::from(path.to_string_lossy())),
                ("error", Value::from(err.to_string())),
            ],
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn disk_size(len: u64) -> u64 {
    len.div_ceil(BLOCK).saturating_mul(BLOCK)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Which file a path named when we looked: a replaced entry is another
/// file, and must not be removed for the old one's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What the index knows of one entry.
#[derive(Debug, Clone, Copy)]
struct Slot {
    size: u64,
    fresh_until: u64,
    usable_until: u64,
    last_use: u64,
    /// A checked entry of another format version: useless here, evicted
    /// first, otherwise left alone.
    foreign: bool,
}

impl Slot {
    fn for_meta(meta: &EntryMeta, file_len: u64, last_use: u64) -> Slot {
        Slot {
            size: disk_size(file_len),
            fresh_until: meta.fresh_until_unix_ms(),
            usable_until: meta.usable_until_unix_ms(),
            last_use,
            foreign: false,
        }
    }

    /// Eviction order: dead or foreign, then stale, then fresh.
    fn class(&self, now: u64) -> u8 {
        if self.foreign || self.usable_until <= now {
            0
        } else if self.fresh_until <= now {
            1
        } else {
            2
        }
    }
}

/// An entry kept open after a hit, with its checked metadata, so the next
/// hits of its key within [`KEEP_OPEN`] read only the body: no `open`,
/// `fstat`, metadata read and decode, `close` (nginx's `open_file_cache`
/// keeps fds the same way). Dropped as soon as this process writes, removes
/// or evicts the entry (every such change goes through the index), and as
/// soon as its file is written into or loses its name — another process
/// replacing or removing the entry — through an inotify watch on the open
/// file (no `stat` per hit). Without inotify nothing is held.
struct Held {
    opened: Arc<Opened>,
    until: std::time::Instant,
    watch: Watch,
}

#[derive(Default)]
struct Index {
    map: HashMap<KeyHash, Slot>,
    bytes: u64,
    held: HashMap<KeyHash, Held>,
    max_held: usize,
}

impl Index {
    /// The entry held open for `key`, while it may still answer.
    fn held(&mut self, hash: &KeyHash, key: &str) -> Option<Arc<Opened>> {
        let held = self.held.get(hash)?;
        if held.until > std::time::Instant::now() && held.opened.meta.key == key {
            return Some(held.opened.clone());
        }
        self.held.remove(hash);
        None
    }

    fn hold(&mut self, opened: &Arc<Opened>, watch: Watch) {
        let now = std::time::Instant::now();
        if self.held.len() >= self.max_held {
            self.held.retain(|_, held| held.until > now);
            if self.held.len() >= self.max_held {
                return;
            }
        }
        let until = now + KEEP_OPEN;
        self.held.insert(
            opened.hash,
            Held {
                opened: opened.clone(),
                until,
                watch,
            },
        );
    }

    fn put(&mut self, hash: KeyHash, slot: Slot) {
        // Whatever is held open for it is the entry being replaced.
        self.held.remove(&hash);
        if let Some(old) = self.map.insert(hash, slot) {
            self.bytes = self.bytes.saturating_sub(old.size);
        }
        self.bytes = self.bytes.saturating_add(slot.size);
    }

    fn put_if_absent(&mut self, hash: KeyHash, slot: Slot) {
        if !self.map.contains_key(&hash) {
            self.put(hash, slot);
        }
    }

    fn forget(&mut self, hash: &KeyHash) {
        self.held.remove(hash);
        if let Some(old) = self.map.remove(hash) {
            self.bytes = self.bytes.saturating_sub(old.size);
        }
    }
}

/// Every fd the store opens is a [`sys::OwnedFile`], registered for fork
/// safety (see the module docs).
type RegFile = sys::OwnedFile;

fn open_registered(opts: &OpenOptions, path: &Path) -> io::Result<RegFile> {
    sys::Registered::open(|| opts.open(path))
}

/// How an entry's bytes are read. A hit runs `Cached` first, on the async
/// worker: only what is in the page cache is read (`preadv2(RWF_NOWAIT)`),
/// so a hot entry costs no hop to the blocking pool (three or four of them,
/// ~10-20 us each, made disk hits several times slower than nginx's inline
/// `open` + `sendfile`). Anything else — bytes not cached, a damaged entry
/// to remove, an error to log — is left to `Blocking` on the pool. Like
/// nginx, the `open(2)` itself is made inline: the entry's directories are
/// hot whenever its pages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    Cached,
    Blocking,
}

impl Reads {
    fn read_at(self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Reads::Cached => sys::read_cached_at(file, buf, offset),
            Reads::Blocking => file.read_exact_at(buf, offset),
        }
    }
}

/// A `Cached` read that must be done again on the blocking pool.
#[derive(Debug)]
struct Retry;

fn read_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    // O_NOFOLLOW: a symlink planted at an entry's name is not ours to read.
    opts.read(true).custom_flags(libc::O_NOFOLLOW);
    opts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Other,
}

/// The names in `dir` (UTF-8 ones only: ours are hex) with their kind.
/// std's `read_dir` hides its fd, so this lists through one registered for
/// fork safety.
fn list_dir(dir: &Path) -> io::Result<Vec<(String, Kind)>> {
    let c_path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let gate = fd_registry::OpenGate::enter();
    // SAFETY: a valid NUL-terminated path; the fd is checked below.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let registration = fd_registry::register(fd);
    drop(gate);
    // SAFETY: fd is an open directory we own; on success the DIR owns it.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        drop(registration);
        // SAFETY: fdopendir failed, so the fd is still ours to close.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: `stream` is a valid DIR until closedir below; the entry
        // is read before the next readdir call.
        let ent = unsafe { libc::readdir(stream) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent with a NUL-terminated name.
        let (name, d_type) = unsafe { (CStr::from_ptr((*ent).d_name.as_ptr()), (*ent).d_type) };
        let Ok(name) = name.to_str() else { continue };
        if name == "." || name == ".." {
            continue;
        }
        let kind = match d_type {
            libc::DT_DIR => Kind::Dir,
            libc::DT_REG => Kind::File,
            libc::DT_UNKNOWN => match std::fs::symlink_metadata(dir.join(name)) {
                Ok(m) if m.is_dir() => Kind::Dir,
                Ok(m) if m.is_file() => Kind::File,
                _ => Kind::Other,
            },
            _ => Kind::Other,
        };
        names.push((name.to_owned(), kind));
    }
    drop(registration);
    // SAFETY: closes the DIR and its fd, once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

fn is_hex2(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<digits>-<16 lower-case hex>`: the only names swept from `tmp/`.
fn is_temp_name(name: &str) -> bool {
    let Some((pid, random)) = name.split_once('-') else {
        return false;
    };
    !pid.is_empty()
        && pid.len() <= 10
        && pid.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// 64 random bits for a temp name. The pid alone is not unique: two
/// containers sharing the volume both run their proxy as, say, pid 1.
fn random_hex16() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No entropy source: time and a counter still differ per call.
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u64).rotate_left(32);
        bytes = n.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn make_dirs(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// A shared handle on one cache directory.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    budget: u64,
    max_item: u64,
    index: Mutex<Index>,
    writable: AtomicBool,
    /// Warnings logged (one at most; counted for tests).
    warnings: AtomicUsize,
    loader_started: AtomicBool,
    loaded: AtomicBool,
    evicting: AtomicBool,
    /// Commits and evictions under way, for `flush`.
    pending: watch::Sender<usize>,
    /// Watches held entries' files; set when the loader starts (it needs
    /// the runtime). Entries are held only with it.
    inotify: std::sync::OnceLock<Arc<Inotify>>,
}

/// Counts one pending operation until dropped, however its task ends.
struct Pending(Arc<Inner>);

impl Pending {
    fn new(inner: &Arc<Inner>) -> Pending {
        inner.pending.send_modify(|n| *n += 1);
        Pending(inner.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl DiskStore {
    /// A store on `dir`, keeping it under `budget_bytes`, taking bodies up
    /// to `max_item_bytes`. Touches no file and never blocks: the directory
    /// is created by the first write, and the index is built in the
    /// background (started here inside a Tokio runtime, else on first use).
    pub fn open(dir: impl Into<PathBuf>, budget_bytes: u64, max_item_bytes: u64) -> DiskStore {
        let store = DiskStore::unstarted(dir.into(), budget_bytes, max_item_bytes);
        store.start_loader();
        store
    }

    fn unstarted(dir: PathBuf, budget: u64, max_item: u64) -> DiskStore {
        DiskStore {
            inner: Arc::new(Inner {
                dir,
                budget,
                max_item: max_item.min(budget),
                index: Mutex::new(Index {
                    max_held: max_held(),
                    ..Index::default()
                }),
                writable: AtomicBool::new(true),
                warnings: AtomicUsize::new(0),
                loader_started: AtomicBool::new(false),
                loaded: AtomicBool::new(false),
                evicting: AtomicBool::new(false),
                pending: watch::Sender::new(0),
                inotify: std::sync::OnceLock::new(),
            }),
        }
    }

    fn start_loader(&self) {
        // Every lookup comes here: a plain load, not a locked swap, once
        // started.
        if self.inner.loader_started.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.loader_started.swap(true, Ordering::AcqRel) {
            runtime.spawn(maintain(Arc::downgrade(&self.inner)));
            self.watch_held();
        }
    }

    /// Starts watching held entries' files (see [`Held`]); without inotify
    /// (a system without it, or out of instances) hits open their entry
    /// every time.
    fn watch_held(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inotify = match Inotify::new() {
            Ok(inotify) => inotify,
            Err(err) => {
                debug(
                    "disk cache: no inotify, entries not held open",
                    &self.inner.dir,
                    &err,
                );
                return;
            }
        };
        if self.inner.inotify.set(inotify.clone()).is_ok() {
            runtime.spawn(keep_held(Arc::downgrade(&self.inner), inotify));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The entry stored under `key`, checked; `None` for a miss, whatever
    /// the reason (absent, another key's, damaged — then removed — or an
    /// I/O error).
    pub async fn get(&self, key: &str) -> Option<DiskEntry> {
        self.start_loader();
        let hash = KeyHash::of(key);
        if let Some(opened) = lock(&self.inner.index).held(&hash, key) {
            return Some(DiskEntry {
                opened,
                framed: None,
                store: self.inner.clone(),
            });
        }
        if let Ok(found) = self.inner.open_entry(hash, key, Reads::Cached) {
            return found;
        }
        let inner = self.inner.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            inner.open_entry(hash, &key, Reads::Blocking).ok().flatten()
        })
        .await
        .ok()
        .flatten()
    }

    /// Starts writing the entry `meta` describes (its `key` names it).
    /// `declared_len` is the body length when known up front (a
    /// Content-Length): `finish` then checks it, and a longer body is
    /// dropped as soon as it shows. Without it the length is whatever was
    /// pushed, written into the metadata at `finish` (the metadata is
    /// written last, at the front of the file). `meta.body_len` is ignored
    /// either way.
    ///
    /// `None` when the store is off, the body is declared over the item
    /// limit, the metadata cannot be encoded, or no Tokio runtime runs.
    pub fn writer(&self, mut meta: EntryMeta, declared_len: Option<u64>) -> Option<DiskWriter> {
        let inner = &self.inner;
        if !inner.writable.load(Ordering::Acquire)
            || declared_len.is_some_and(|n| n > inner.max_item)
        {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        self.start_loader();
        meta.body_len = 0;
        // The metadata's length does not depend on body_len (fixed width),
        // so the body can be written after a gap of exactly this size.
        let head_len = entry::encode_meta(&meta).ok()?.len() as u64;
        let hash = KeyHash::of(&meta.key);
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let task = runtime.spawn(write_task(
            inner.clone(),
            rx,
            backlog.clone(),
            hash,
            head_len,
        ));
        Some(DiskWriter {
            tx: Some(tx),
            task: Some(task),
            meta: Some(meta),
            buf: BytesMut::new(),
            pushed: 0,
            declared: declared_len,
            max_item: inner.max_item,
            backlog,
            failed: None,
            inner: inner.clone(),
        })
    }

    /// Waits until every write already finished (see [`DiskWriter::finish`])
    /// is on disk or given up, and any eviction under way is done. For
    /// SIGTERM/stop. Writers not yet finished are not waited for.
    pub async fn flush(&self) {
        let mut rx = self.inner.pending.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Marks the entry stored under `key` as just used, for eviction (an
    /// entry served from a faster tier is hot, though nobody reads its
    /// file). Index only, no I/O; a key the index does not know is ignored.
    pub fn touch(&self, key: &str) {
        let hash = KeyHash::of(key);
        if let Some(slot) = lock(&self.inner.index).map.get_mut(&hash) {
            slot.last_use = now_unix_ms();
        }
    }

    /// Bytes (in 4 KiB blocks) and entries this process knows of.
    pub fn usage(&self) -> (u64, u64) {
        let index = lock(&self.inner.index);
        (index.bytes, index.map.len() as u64)
    }

    /// False once the disk refused a write for good (read-only, full,
    /// forbidden): the store then only reads.
    pub fn is_writable(&self) -> bool {
        self.inner.writable.load(Ordering::Acquire)
    }

    /// Whether the loader's first scan is complete.
    pub fn is_loaded(&self) -> bool {
        self.inner.loaded.load(Ordering::Acquire)
    }
}

impl Inner {
    fn entry_path(&self, hash: &KeyHash) -> PathBuf {
        let hex = hash.hex();
        self.dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    /// Logs once and stops writes when the disk cannot take them.
    fn write_failed(&self, op: &'static str, path: &Path, err: &io::Error) {
        if disk_unusable(err) {
            if self.writable.swap(false, Ordering::AcqRel) {
                self.warnings.fetch_add(1, Ordering::Relaxed);
                log::warn(
                    "Disk cache cannot write; going on without storing to disk",
                    &[
                        ("path", Value::from(self.dir.to_string_lossy())),
                        ("op", Value::from(op)),
                        ("file", Value::from(path.to_string_lossy())),
                        ("error", Value::from(err.to_string())),
                    ],
                );
            }
        } else {
            debug("disk cache write failed", path, err);
        }
    }

    /// Forgets the entry, then removes `path` if it is still the file `id`
    /// (a newer entry renamed over it since is left alone). Absent files
    /// are fine: another process may have removed it.
    ///
    /// Forgotten first: once the file is gone nothing may still hold it
    /// open, or the next hit would be answered from the removed file and
    /// blame its faults on whatever took its name.
    fn remove_bad(&self, hash: &KeyHash, path: &Path, id: FileId) {
        lock(&self.index).forget(hash);
        if let Ok(now) = std::fs::symlink_metadata(path) {
            if FileId::of(&now) == id {
                if let Err(err) = std::fs::remove_file(path) {
                    if err.kind() != io::ErrorKind::NotFound {
                        debug("disk cache: removing a bad entry failed", path, &err);
                    }
                }
            }
        }
    }

    /// Opens and checks the entry for `key`, reading as `reads` says. A
    /// `Cached` pass gives up (`Retry`) on anything but a plain hit or miss,
    /// so removing a damaged entry and logging stay on the blocking pool.
    fn open_entry(
        self: &Arc<Self>,
        hash: KeyHash,
        key: &str,
        reads: Reads,
    ) -> Result<Option<DiskEntry>, Retry> {
        let cached = reads == Reads::Cached;
        let path = self.entry_path(&hash);
        let file = match open_registered(&read_options(), &path) {
            Ok(file) => file,
            Err(err) => {
                if err.kind() == io::ErrorKind::NotFound {
                    lock(&self.index).forget(&hash);
                } else if cached {
                    return Err(Retry);
                } else {
                    debug("disk cache: open failed", &path, &err);
                }
                return Ok(None);
            }
        };
        let Ok(stat) = file.metadata() else {
            return if cached { Err(Retry) } else { Ok(None) };
        };
        let id = FileId::of(&stat);
        if !stat.is_file() {
            return Ok(None);
        }
        let first = if stat.len() <= WHOLE_READ {
            stat.len()
        } else {
            FIRST_READ
        };
        let (meta, head_len, body) = match read_head(&file, stat.len(), first, reads) {
            Ok(found) => found,
            Err(HeadError::Entry(err)) if err.is_other_version() => return Ok(None),
            Err(_) if cached => return Err(Retry),
            Err(HeadError::Io(err)) => {
                debug("disk cache: read failed", &path, &err);
                return Ok(None);
            }
            Err(HeadError::Entry(err)) => {
                debug("disk cache: bad entry removed", &path, &err);
                self.remove_bad(&hash, &path, id);
                return Ok(None);
            }
        };
        if meta.key != key {
            // Not the key asked for. If the file is not even where its own
            // key belongs, nobody can ever find it: remove it. (A real
            // SHA-256 collision would be another key's good entry.)
            if KeyHash::of(&meta.key) != hash {
                if cached {
                    return Err(Retry);
                }
                self.remove_bad(&hash, &path, id);
            }
            return Ok(None);
        }
        if stat.len() != head_len + framed_body_len(meta.body_len) {
            if cached {
                return Err(Retry);
            }
            debug("disk cache: torn entry removed", &path, &"wrong length");
            self.remove_bad(&hash, &path, id);
            return Ok(None);
        }
        let opened = Arc::new(Opened {
            meta,
            file: Arc::new(file),
            checked: AtomicU64::new(0),
            head_len,
            hash,
            id,
            path,
        });
        let watch = self
            .inotify
            .get()
            .and_then(|inotify| inotify.watch(opened.file.as_raw_fd()).ok());
        let mut index = lock(&self.index);
        index.put(
            hash,
            Slot::for_meta(&opened.meta, stat.len(), now_unix_ms()),
        );
        if let Some(watch) = watch {
            index.hold(&opened, watch);
        }
        drop(index);
        Ok(Some(DiskEntry {
            opened,
            framed: body,
            store: self.clone(),
        }))
    }

    fn create_temp(&self) -> io::Result<TempFile> {
        let tmp = self.dir.join(TMP_DIR);
        let path = tmp.join(format!("{}-{}", std::process::id(), random_hex16()));
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let file = match open_registered(&opts, &path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                make_dirs(&tmp)?;
                open_registered(&opts, &path)?
            }
            other => other?,
        };
        Ok(TempFile {
            file: Some(file),
            path,
        })
    }

    /// Blocking: writes the metadata in front of the body and renames the
    /// temp file into place.
    fn commit(&self, mut temp: TempFile, meta: &EntryMeta, head_len: u64) -> Result<(), DiskError> {
        let head = entry::encode_meta(meta)?;
        if head.len() as u64 != head_len {
            return Err(DiskError::Abandoned("metadata changed size"));
        }
        let file = temp.file.as_ref().ok_or(DiskError::Task)?;
        file.write_all_at(&head, 0)
            .map_err(io_err("write metadata"))?;
        let len = file.metadata().map_err(io_err("stat"))?.len();
        if len != head_len + framed_body_len(meta.body_len) {
            return Err(DiskError::Abandoned("temp file has the wrong length"));
        }
        let hash = KeyHash::of(&meta.key);
        let path = self.entry_path(&hash);
        let renamed = match std::fs::rename(&temp.path, &path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // The level directories do not exist yet (or another
                // process swept our temp file: then this fails again).
                if let Some(parent) = path.parent() {
                    make_dirs(parent).map_err(io_err("create directory"))?;
                }
                std::fs::rename(&temp.path, &path)
            }
            other => other,
        };
        renamed.map_err(io_err("rename"))?;
        temp.disarm();
        lock(&self.index).put(hash, Slot::for_meta(meta, len, now_unix_ms()));
        Ok(())
    }

    /// Blocking: evicts until the known bytes are under 90% of the budget
    /// (the slack keeps passes rare): dead or foreign entries first, then
    /// stale, then least recently used.
    fn evict(&self) {
        let low_water = self.budget - self.budget / 10;
        let now = now_unix_ms();
        let victims: Vec<KeyHash> = {
            let index = lock(&self.index);
            if index.bytes <= low_water {
                return;
            }
            let mut order: Vec<(u8, u64, KeyHash, u64)> = index
                .map
                .iter()
                .map(|(h, s)| (s.class(now), s.last_use, *h, s.size))
                .collect();
            order.sort_unstable_by_key(|&(class, last_use, _, _)| (class, last_use));
            let mut excess = index.bytes - low_water;
            order
                .into_iter()
                .take_while(|&(_, _, _, size)| {
                    let more = excess > 0;
                    excess = excess.saturating_sub(size);
                    more
                })
                .map(|(_, _, h, _)| h)
                .collect()
        };
        for hash in victims {
            let path = self.entry_path(&hash);
            if let Err(err) = std::fs::remove_file(&path) {
                if err.kind() != io::ErrorKind::NotFound {
                    debug("disk cache: eviction failed", &path, &err);
                }
            }
            // Forgotten even if the unlink failed, so a pass always ends; a
            // rescan finds the file again if it is still there.
            lock(&self.index).forget(&hash);
        }
    }

    /// Blocking: removes entries no rule can serve any more (past lifetime
    /// and stale-if-error). Entries of another format version are left.
    fn remove_dead(&self) {
        let now = now_unix_ms();
        let dead: Vec<KeyHash> = lock(&self.index)
            .map
            .iter()
            .filter(|(_, s)| !s.foreign && s.usable_until <= now)
            .map(|(h, _)| *h)
            .collect();
        for hash in dead {
            let path = self.entry_path(&hash);
            let _ = std::fs::remove_file(&path);
            lock(&self.index).forget(&hash);
        }
    }

    /// Blocking: removes our temp files that nobody has written to for
    /// `STALE_TEMP` (left by a crashed or killed process).
    fn sweep_temps(&self) {
        let tmp = self.dir.join(TMP_DIR);
        let Ok(names) = list_dir(&tmp) else { return };
        let cutoff = SystemTime::now().checked_sub(STALE_TEMP);
        for (name, kind) in names {
            if kind != Kind::File || !is_temp_name(&name) {
                continue;
            }
            let path = tmp.join(&name);
            let stale = std::fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|modified| cutoff.is_some_and(|cutoff| modified < cutoff));
            if stale {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Blocking: indexes the entries under `<dir>/<first>/`, removes the
    /// damaged ones, and forgets the ones that are gone (removed by another
    /// process) unless touched since the scan began. Returns whether the
    /// directory had anything in it.
    fn scan_first_level(&self, first: u8, scan_started: u64) -> bool {
        let a = format!("{first:02x}");
        let level1 = self.dir.join(&a);
        let subdirs = match list_dir(&level1) {
            Ok(subdirs) => subdirs,
            // Gone (or never made): so is everything the index had there.
            Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(_) => return false,
        };
        let existed = !subdirs.is_empty();
        let mut seen = HashSet::new();
        // Second-level directories we could not list: what the index knows
        // under them is not known to be gone.
        let mut unreadable = HashSet::new();
        for (b, kind) in subdirs {
            if kind != Kind::Dir || !is_hex2(&b) {
                continue;
            }
            let level2 = level1.join(&b);
            let files = match list_dir(&level2) {
                Ok(files) => files,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => {
                    unreadable.insert(b);
                    continue;
                }
            };
            let prefix = format!("{a}{b}");
            for (name, kind) in files {
                let Some(hash) = KeyHash::parse_hex(&name) else {
                    continue;
                };
                if kind != Kind::File || !name.starts_with(&prefix) {
                    continue;
                }
                seen.insert(hash);
                if !lock(&self.index).map.contains_key(&hash) {
                    self.load_one(hash, &level2.join(&name));
                }
            }
        }
        let mut index = lock(&self.index);
        let gone: Vec<KeyHash> = index
            .map
            .iter()
            .filter(|(h, s)| {
                h.0[0] == first
                    && !seen.contains(*h)
                    && s.last_use < scan_started
                    && !unreadable.contains(&h.hex()[2..4])
            })
            .map(|(h, _)| *h)
            .collect();
        for hash in gone {
            index.forget(&hash);
        }
        existed
    }

    /// Blocking: reads one entry's head for the index; removes it if damaged.
    fn load_one(&self, hash: KeyHash, path: &Path) {
        let Ok(file) = open_registered(&read_options(), path) else {
            return;
        };
        let Ok(stat) = file.metadata() else {
            return;
        };
        let id = FileId::of(&stat);
        let last_use = stat.modified().map_or(0, unix_ms);
        // The head only: the loader never serves the body.
        match read_head(&file, stat.len(), FIRST_READ, Reads::Blocking) {
            Ok((meta, head_len, _))
                if KeyHash::of(&meta.key) == hash
                    && stat.len() == head_len + framed_body_len(meta.body_len) =>
            {
                let slot = Slot::for_meta(&meta, stat.len(), last_use);
                lock(&self.index).put_if_absent(hash, slot);
            }
            Err(HeadError::Io(_)) => {}
            Err(HeadError::Entry(err)) if err.is_other_version() => {
                let slot = Slot {
                    size: disk_size(stat.len()),
                    fresh_until: 0,
                    usable_until: 0,
                    last_use,
                    foreign: true,
                };
                lock(&self.index).put_if_absent(hash, slot);
            }
            _ => {
                drop(file);
                self.remove_bad(&hash, path, id);
            }
        }
    }
}

/// Starts an eviction pass unless one runs; `flush` waits for it.
fn maybe_evict(inner: &Arc<Inner>) {
    if lock(&inner.index).bytes <= inner.budget || inner.evicting.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        inner.evicting.store(false, Ordering::Release);
        return;
    };
    let pending = Pending::new(inner);
    let task_inner = inner.clone();
    runtime.spawn(async move {
        let evict_inner = task_inner.clone();
        let _ = tokio::task::spawn_blocking(move || evict_inner.evict()).await;
        task_inner.evicting.store(false, Ordering::Release);
        // Writes that landed during the pass may need another.
        maybe_evict(&task_inner);
        drop(pending);
    });
}

/// Drops held entries whose files changed (as inotify reports them) and,
/// every [`KEEP_OPEN`], those no hit came back for, so an idle process
/// keeps no fd (nor a removed file's blocks). Ends once the store is gone.
async fn keep_held(weak: Weak<Inner>, inotify: Arc<Inotify>) {
    loop {
        let changed = tokio::time::timeout(KEEP_OPEN, inotify.changed()).await;
        let Some(inner) = weak.upgrade() else { return };
        let dropped: Vec<Held> = {
            let mut index = lock(&inner.index);
            let now = std::time::Instant::now();
            let gone = |held: &Held| match &changed {
                Ok(Ok(Changed::Files(wds))) => wds.contains(&held.watch.id()),
                // Events lost, or the queue failed: trust nothing held.
                Ok(Ok(Changed::Overflow)) | Ok(Err(_)) => true,
                Err(_idle) => held.until <= now,
            };
            let keys: Vec<KeyHash> = index
                .held
                .iter()
                .filter(|(_, held)| gone(held))
                .map(|(hash, _)| *hash)
                .collect();
            keys.iter()
                .filter_map(|hash| index.held.remove(hash))
                .collect()
        };
        // Closed (and unwatched) outside the lock.
        drop(dropped);
        if matches!(changed, Ok(Err(_))) {
            // A failing queue would spin: pause between tries.
            tokio::time::sleep(KEEP_OPEN).await;
        }
    }
}

/// The share of the process's fd limit the held entries may take.
fn max_held() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 16)
        .unwrap_or(MAX_HELD)
        .clamp(16, MAX_HELD)
}

/// The loader: scans the directory in batches after start, then again
/// every `RESCAN_EVERY`, for as long as the store exists.
async fn maintain(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let started = now_unix_ms();
        let sweeper = inner.clone();
        let _ = tokio::task::spawn_blocking(move || sweeper.sweep_temps()).await;
        for first in 0..=255u8 {
            let scanner = inner.clone();
            let existed =
                tokio::task::spawn_blocking(move || scanner.scan_first_level(first, started))
                    .await
                    .unwrap_or(false);
            if existed {
                tokio::time::sleep(LOADER_PAUSE).await;
            }
        }
        let cleaner = inner.clone();
        let _ = tokio::task::spawn_blocking(move || cleaner.remove_dead()).await;
        inner.loaded.store(true, Ordering::Release);
        maybe_evict(&inner);
        drop(inner);
        tokio::time::sleep(RESCAN_EVERY).await;
    }
}

enum HeadError {
    Io(io::Error),
    Entry(EntryError),
}

/// Reads and checks the envelope and metadata of a `file_len` file, `first`
/// bytes at once (more if the metadata is longer); returns them, where the
/// body starts, and the framed body when that read took the whole file (a
/// small file is read whole: one read serves its body too).
fn read_head(
    file: &File,
    file_len: u64,
    first: u64,
    reads: Reads,
) -> Result<(EntryMeta, u64, Option<Bytes>), HeadError> {
    let mut buf = vec![0u8; first.min(file_len) as usize];
    reads.read_at(file, &mut buf, 0).map_err(HeadError::Io)?;
    let envelope = entry::parse_envelope(&buf).map_err(HeadError::Entry)?;
    let head_len = envelope.head_len();
    if head_len as u64 > file_len {
        return Err(HeadError::Entry(EntryError::Truncated {
            needed: head_len as u64,
            got: file_len,
        }));
    }
    if head_len > buf.len() {
        // Bounded by MAX_META_LEN (checked by parse_envelope) and by the
        // file's real length.
        let have = buf.len();
        buf.resize(head_len, 0);
        reads
            .read_at(file, &mut buf[have..], have as u64)
            .map_err(HeadError::Io)?;
    }
    let meta = entry::decode_meta(&buf[..head_len]).map_err(HeadError::Entry)?;
    let body = (buf.len() as u64 == file_len).then(|| Bytes::from(buf).slice(head_len..));
    Ok((meta, head_len as u64, body))
}

/// Checks a framed body (all its chunks, as stored) and returns its data:
/// the same bytes, without a copy, when it is one chunk.
fn unframe(seed: u64, body_len: u64, framed: &Bytes) -> Result<Bytes, DiskError> {
    let count = chunk_count(body_len);
    if count == 1 {
        entry::verify_chunk(seed, 0, body_len, framed)?;
        return Ok(framed.slice(CHUNK_HEADER_LEN..));
    }
    let mut out =
        BytesMut::with_capacity(usize::try_from(body_len).map_err(|_| DiskError::TooLarge)?);
    for index in 0..count {
        let start = chunk_offset(index) as usize;
        let len = chunk_len(body_len, index) as usize;
        let chunk = framed
            .get(start..start + CHUNK_HEADER_LEN + len)
            .ok_or(DiskError::Task)?;
        out.extend_from_slice(entry::verify_chunk(seed, index, body_len, chunk)?);
    }
    Ok(out.freeze())
}

/// Reads chunk `index` of `opened`'s body (from its file, or from `framed`
/// when the first read took the whole file) and checks it.
///
/// A chunk this open file has already yielded checked is not checked again
/// when it comes back from the page cache: an entry's file never changes
/// once renamed into place (writers make a new file; removal unlinks), so
/// those pages hold the bytes that passed, and the CRC was most of a hot
/// hit's cost beyond a memory hit. Should something write into the file
/// anyway (a tool, a person), inotify reports it and the entry stops being
/// held: the next hit opens and checks it afresh ([`Held`]). A read that
/// went to the disk (the blocking pool) is always checked, and a held entry
/// is reopened, and checked afresh, every `KEEP_OPEN`.
fn read_chunk(
    opened: &Opened,
    framed: Option<&Bytes>,
    index: u64,
    reads: Reads,
) -> Result<Bytes, DiskError> {
    let body_len = opened.meta.body_len;
    let len = chunk_len(body_len, index) as usize;
    let start = chunk_offset(index);
    let buf = match framed {
        Some(framed) => {
            let (from, to) = (start as usize, start as usize + CHUNK_HEADER_LEN + len);
            if to > framed.len() {
                return Err(DiskError::Task);
            }
            framed.slice(from..to)
        }
        None => {
            let mut buf = BytesMut::zeroed(CHUNK_HEADER_LEN + len);
            reads
                .read_at(&opened.file, &mut buf, opened.head_len + start)
                .map_err(io_err("read"))?;
            buf.freeze()
        }
    };
    if !(opened.is_checked(index) && reads == Reads::Cached && framed.is_none()) {
        entry::verify_chunk(opened.hash.chunk_seed(), index, body_len, &buf)?;
        opened.mark_checked(index);
    }
    Ok(buf.slice(CHUNK_HEADER_LEN..))
}

fn would_block(err: &DiskError) -> bool {
    matches!(err, DiskError::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
}

/// An entry file, open, with its checked metadata; shared by the hits that
/// read it while it is held open.
struct Opened {
    meta: EntryMeta,
    file: Arc<RegFile>,
    /// Chunks (the first 64) already read and checked through this fd.
    checked: AtomicU64,
    head_len: u64,
    hash: KeyHash,
    id: FileId,
    path: PathBuf,
}

impl Opened {
    /// Whether chunk `index` was read and checked through this fd (only
    /// the first 64 are remembered; later ones always count as unchecked).
    fn is_checked(&self, index: u64) -> bool {
        index < 64 && self.checked.load(Ordering::Acquire) & (1 << index) != 0
    }

    fn mark_checked(&self, index: u64) {
        if index < 64 {
            self.checked.fetch_or(1 << index, Ordering::AcqRel);
        }
    }

    /// Removes the entry on the blocking pool: a chunk failed its check.
    fn remove_later(self: &Arc<Self>, store: &Arc<Inner>) {
        let (opened, store) = (self.clone(), store.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(
                runtime.spawn_blocking(move || {
                    store.remove_bad(&opened.hash, &opened.path, opened.id)
                }),
            );
        }
    }
}

/// A checked entry, open: the metadata is verified; the body is verified
/// as it is read.
pub struct DiskEntry {
    opened: Arc<Opened>,
    /// The framed body, when the first read took the whole file.
    framed: Option<Bytes>,
    store: Arc<Inner>,
}

impl DiskEntry {
    pub fn meta(&self) -> &EntryMeta {
        &self.opened.meta
    }

    pub fn into_meta(self) -> EntryMeta {
        Arc::try_unwrap(self.opened).map_or_else(|shared| shared.meta.clone(), |own| own.meta)
    }

    /// The whole body in memory, every chunk verified: for bodies small
    /// enough to promote into the memory tier (it allocates
    /// `meta().body_len` and a little more: check that first). `None` if a
    /// chunk is bad (the entry is then removed) or the read fails.
    pub async fn read_all(&self) -> Option<Bytes> {
        let opened = &self.opened;
        let (seed, head_len, body_len) = (
            opened.hash.chunk_seed(),
            opened.head_len,
            opened.meta.body_len,
        );
        let read = move |file: &File, framed: Option<&Bytes>, reads: Reads| match framed {
            Some(framed) => unframe(seed, body_len, framed),
            None => {
                let len =
                    usize::try_from(framed_body_len(body_len)).map_err(|_| DiskError::TooLarge)?;
                let mut buf = BytesMut::zeroed(len);
                reads
                    .read_at(file, &mut buf, head_len)
                    .map_err(io_err("read"))?;
                unframe(seed, body_len, &buf.freeze())
            }
        };
        let inline = self.framed.is_some() || framed_body_len(body_len) <= INLINE_READ_MAX;
        let result = match inline.then(|| read(&opened.file, self.framed.as_ref(), Reads::Cached)) {
            Some(done) if !matches!(&done, Err(err) if would_block(err)) => done,
            _ => {
                let opened = opened.clone();
                tokio::task::spawn_blocking(move || read(&opened.file, None, Reads::Blocking))
                    .await
                    .unwrap_or(Err(DiskError::Task))
            }
        };
        match result {
            Ok(body) => Some(body),
            Err(DiskError::Entry(err)) => {
                debug("disk cache: bad chunk, entry removed", &opened.path, &err);
                opened.remove_later(&self.store);
                None
            }
            Err(err) => {
                debug("disk cache: read failed", &opened.path, &err);
                None
            }
        }
    }

    /// The body, read chunk by chunk (from the page cache inline, else on
    /// the blocking pool) and verified before each chunk is yielded; a bad
    /// chunk yields an error (the response must then end as an error, never
    /// as a complete body).
    pub fn body(&self) -> DiskBody {
        self.body_range(0, self.opened.meta.body_len)
    }

    /// `len` bytes of the body from `start` (a Range request): only the
    /// chunks that hold them are read, each verified whole before any of
    /// it is sent. Past the end is cut to the end.
    pub fn body_range(&self, start: u64, len: u64) -> DiskBody {
        let body_len = self.opened.meta.body_len;
        let start = start.min(body_len);
        let len = len.min(body_len - start);
        let chunk = CHUNK_LEN as u64;
        DiskBody {
            opened: self.opened.clone(),
            framed: self.framed.clone(),
            next: start / chunk,
            skip: (start % chunk) as usize,
            remaining: len,
            pending: None,
            done: len == 0,
            zero_copy: None,
            store: self.store.clone(),
        }
    }
}

/// A chunk read: done inline (from the page cache or the first read), or
/// under way on the blocking pool.
enum ChunkRead {
    Ready(Option<Result<Bytes, DiskError>>),
    Pool(JoinHandle<Result<Bytes, DiskError>>),
}

impl Future for ChunkRead {
    type Output = Result<Bytes, DiskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            ChunkRead::Ready(result) => Poll::Ready(result.take().unwrap_or(Err(DiskError::Task))),
            ChunkRead::Pool(task) => Pin::new(task)
                .poll(cx)
                .map(|joined| joined.unwrap_or(Err(DiskError::Task))),
        }
    }
}

/// A stored body streamed from its file; one chunk read ahead.
pub struct DiskBody {
    /// The client connection, when chunks may go out with sendfile(2).
    zero_copy: Option<Arc<ConnState>>,
    opened: Arc<Opened>,
    framed: Option<Bytes>,
    /// The chunk the pending read is for (or the next to start).
    next: u64,
    /// Bytes of the next chunk before the range starts.
    skip: usize,
    /// Bytes still to send.
    remaining: u64,
    pending: Option<ChunkRead>,
    done: bool,
    /// To remove the entry when a chunk fails its check.
    store: Arc<Inner>,
}

impl DiskBody {
    /// Sends the chunks this open file has already checked with
    /// sendfile(2) on `conn`: straight from the page cache to the socket,
    /// no read into memory and no copy out of it (nginx serves its cache
    /// files the same way). Chunks not yet checked are read and checked
    /// first, as always.
    pub fn zero_copy(mut self, conn: Arc<ConnState>) -> DiskBody {
        self.zero_copy = Some(conn);
        self
    }

    /// Whether chunk `index` goes out with sendfile(2): it is large enough
    /// to gain from it, passed its check through this very fd (see
    /// [`read_chunk`]) and is not in memory already.
    fn sends_from_file(&self, index: u64) -> bool {
        self.zero_copy.is_some()
            && chunk_len(self.body_len(), index) >= ZERO_COPY_MIN
            && self.framed.is_none()
            && self.opened.is_checked(index)
    }

    fn body_len(&self) -> u64 {
        self.opened.meta.body_len
    }

    /// The marker frame standing for the rest of chunk `next` (as much of
    /// it as the range wants), queued on the connection.
    fn file_frame(&mut self) -> Option<Bytes> {
        let conn = self.zero_copy.as_ref()?;
        let data_len = chunk_len(self.body_len(), self.next);
        let skip = self.skip as u64;
        let len = data_len
            .saturating_sub(skip)
            .min(self.remaining)
            .min(MARKER_LEN as u64);
        if len == 0 {
            return None;
        }
        let offset =
            self.opened.head_len + chunk_offset(self.next) + CHUNK_HEADER_LEN as u64 + skip;
        let frame = conn.queue_file_region(FileRegion {
            file: self.opened.file.clone(),
            offset,
            len,
        });
        self.remaining -= len;
        if skip + len >= data_len {
            self.next += 1;
            self.skip = 0;
        } else {
            self.skip += len as usize;
        }
        if self.remaining == 0 || self.next >= chunk_count(self.body_len()) {
            self.done = true;
        }
        Some(frame)
    }

    fn start_read(&mut self) -> Result<(), DiskError> {
        let index = self.next;
        let inline = read_chunk(&self.opened, self.framed.as_ref(), index, Reads::Cached);
        if !matches!(&inline, Err(err) if would_block(err)) {
            self.pending = Some(ChunkRead::Ready(Some(inline)));
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| DiskError::Task)?;
        let opened = self.opened.clone();
        self.pending =
            Some(ChunkRead::Pool(runtime.spawn_blocking(move || {
                read_chunk(&opened, None, index, Reads::Blocking)
            })));
        Ok(())
    }

    fn fail(&mut self, err: DiskError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.pending = None;
        if matches!(err, DiskError::Entry(_)) {
            debug(
                "disk cache: bad chunk, entry removed",
                &self.opened.path,
                &err,
            );
            self.opened.remove_later(&self.store);
        }
        Poll::Ready(Some(Err(Box::new(err))))
    }
}

impl Body for DiskBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.pending.is_none() {
            if this.sends_from_file(this.next) {
                if let Some(frame) = this.file_frame() {
                    return Poll::Ready(Some(Ok(Frame::data(frame))));
                }
            }
            if let Err(err) = this.start_read() {
                return this.fail(err);
            }
        }
        let Some(pending) = this.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let chunk = match Pin::new(pending).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(chunk)) => chunk,
            Poll::Ready(Err(err)) => return this.fail(err),
        };
        this.pending = None;
        let mut chunk = chunk.slice(this.skip.min(chunk.len())..);
        this.skip = 0;
        if chunk.len() as u64 > this.remaining {
            chunk.truncate(this.remaining as usize);
        }
        this.remaining -= chunk.len() as u64;
        this.next += 1;
        if this.remaining > 0 && this.next < chunk_count(this.body_len()) {
            // Read ahead while this chunk goes to the client (unless the
            // next goes out from the file).
            if !this.sends_from_file(this.next) {
                if let Err(err) = this.start_read() {
                    return this.fail(err);
                }
            }
        } else {
            this.done = true;
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A temp file, removed on drop unless renamed into place.
struct TempFile {
    file: Option<RegFile>,
    path: PathBuf,
}

impl TempFile {
    fn disarm(&mut self) {
        self.file = None;
        self.path = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Close (and unregister) first, then unlink.
        self.file = None;
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Drops a temp file on the blocking pool: unlinking is disk I/O.
fn discard(temp: TempFile) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(temp))),
        Err(_) => drop(temp),
    }
}

enum Msg {
    Chunk(Bytes),
    Commit(Box<EntryMeta>, Pending),
}

/// One writer's disk side: creates the temp file, writes chunks as they
/// come (a batch per blocking-pool hop), and commits on `Commit`. The
/// queue closing without a commit means the write was abandoned.
async fn write_task(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    backlog: Arc<Backlog>,
    hash: KeyHash,
    head_len: u64,
) -> Result<(), DiskError> {
    // However the task ends, a writer waiting in poll_ready goes on (and
    // learns from push that the write is over).
    let _closed = BacklogClosed(backlog.clone());
    let creator = inner.clone();
    let mut temp = match tokio::task::spawn_blocking(move || creator.create_temp()).await {
        Ok(Ok(temp)) => temp,
        Ok(Err(err)) => {
            inner.write_failed("create temp file", &inner.dir.join(TMP_DIR), &err);
            return Err(io_err("create temp file")(err));
        }
        Err(_) => return Err(DiskError::Task),
    };
    let seed = hash.chunk_seed();
    let mut index = 0u64;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            discard(temp);
            return Err(DiskError::Abandoned("writer dropped before finish"));
        }
        let mut chunks = Vec::new();
        let mut commit = None;
        for msg in batch.drain(..) {
            match msg {
                Msg::Chunk(data) => chunks.push(data),
                Msg::Commit(meta, pending) => commit = Some((meta, pending)),
            }
        }
        if !chunks.is_empty() {
            let first = index;
            index += chunks.len() as u64;
            let bytes: usize = chunks.iter().map(Bytes::len).sum();
            let written = tokio::task::spawn_blocking(move || {
                let result = write_chunks(&temp, seed, head_len, first, &chunks);
                (temp, result)
            })
            .await;
            backlog.written(bytes);
            let (returned, result) = written.map_err(|_| DiskError::Task)?;
            temp = returned;
            if let Err(err) = result {
                inner.write_failed("write", &temp.path, &err);
                discard(temp);
                return Err(io_err("write")(err));
            }
        }
        if let Some((meta, pending)) = commit {
            let committer = inner.clone();
            let done = tokio::task::spawn_blocking(move || {
                let result = committer.commit(temp, &meta, head_len);
                if let Err(DiskError::Io { op, source }) = &result {
                    committer.write_failed(
                        op,
                        &committer.entry_path(&KeyHash::of(&meta.key)),
                        source,
                    );
                }
                result
            })
            .await
            .map_err(|_| DiskError::Task)?;
            if done.is_ok() {
                maybe_evict(&inner);
            }
            drop(pending);
            return done;
        }
    }
}

/// Blocking: writes framed chunks `first..` at their offsets.
fn write_chunks(
    temp: &TempFile,
    seed: u64,
    head_len: u64,
    first: u64,
    chunks: &[Bytes],
) -> io::Result<()> {
    let file: &File = temp
        .file
        .as_ref()
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    for (i, data) in chunks.iter().enumerate() {
        let index = first + i as u64;
        let at = head_len + chunk_offset(index);
        file.write_all_at(&entry::chunk_header(seed, index, data), at)?;
        file.write_all_at(data, at + CHUNK_HEADER_LEN as u64)?;
    }
    Ok(())
}

/// Streams one entry to disk while the response streams to the client.
/// `push` never waits for the disk; `finish` commits; dropping it without
/// `finish` removes what was written.
pub struct DiskWriter {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    task: Option<JoinHandle<Result<(), DiskError>>>,
    meta: Option<EntryMeta>,
    /// The chunk being filled.
    buf: BytesMut,
    pushed: u64,
    declared: Option<u64>,
    max_item: u64,
    backlog: Arc<Backlog>,
    failed: Option<GaveUp>,
    inner: Arc<Inner>,
}

/// Why a writer stopped taking bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GaveUp {
    TooLarge,
    LongerThanDeclared,
    DiskTooSlow,
    WriteFailed,
}

impl GaveUp {
    fn error(self) -> DiskError {
        match self {
            GaveUp::TooLarge => DiskError::TooLarge,
            GaveUp::LongerThanDeclared => DiskError::Abandoned("body longer than declared"),
            GaveUp::DiskTooSlow => DiskError::Abandoned("the disk is slower than the response"),
            GaveUp::WriteFailed => DiskError::Abandoned("write failed"),
        }
    }
}

impl DiskWriter {
    /// Appends body bytes (copied into 256 KiB chunks, handed to the disk
    /// in the background). Returns false once the write was given up: over
    /// the declared length or the item limit, a write error, or the disk
    /// far behind a caller that does not pace itself with
    /// [`DiskWriter::poll_ready`] (`MAX_QUEUED`). Never blocks.
    pub fn push(&mut self, mut data: &[u8]) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.backlog.bytes.load(Ordering::Acquire) > MAX_QUEUED {
            self.abandon(GaveUp::DiskTooSlow);
            return false;
        }
        self.pushed = self.pushed.saturating_add(data.len() as u64);
        if self.pushed > self.max_item {
            self.abandon(GaveUp::TooLarge);
            return false;
        }
        if self.declared.is_some_and(|n| self.pushed > n) {
            self.abandon(GaveUp::LongerThanDeclared);
            return false;
        }
        while !data.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve(CHUNK_LEN);
            }
            let take = data.len().min(CHUNK_LEN - self.buf.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_LEN && !self.send_chunk() {
                return false;
            }
        }
        true
    }

    fn send_chunk(&mut self) -> bool {
        let chunk = self.buf.split().freeze();
        self.buf = BytesMut::new();
        self.backlog.bytes.fetch_add(chunk.len(), Ordering::AcqRel);
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Chunk(chunk)).is_ok());
        if !sent {
            // The task ended early: a write error (already logged).
            self.abandon(GaveUp::WriteFailed);
        }
        sent
    }

    /// Ready when the writer can take more without running ahead of the
    /// disk (under `PACE` bytes waiting), or once the write is over (then
    /// `push` says so). A caller that polls this before pulling the next
    /// frame from upstream slows the response to the disk's speed when the
    /// disk is the bottleneck, instead of losing the entry; one that does
    /// not keeps full speed and loses the entry past `MAX_QUEUED`.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.failed.is_some() || self.backlog.below_pace() {
            return Poll::Ready(());
        }
        *lock(&self.backlog.waker) = Some(cx.waker().clone());
        // Re-check: the task may have written between the load and the
        // registration.
        if self.backlog.below_pace() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// [`DiskWriter::poll_ready`] as a future.
    pub async fn ready(&mut self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    fn abandon(&mut self, why: GaveUp) {
        self.failed = Some(why);
        // Closing the queue without a commit makes the task clean up.
        self.tx = None;
        self.buf = BytesMut::new();
    }

    /// Commits the entry: checks the length (if declared), writes the
    /// metadata and renames the file into place, in the background. The
    /// returned future reports the outcome; dropping it does not cancel the
    /// commit, and [`DiskStore::flush`] waits for it.
    pub fn finish(mut self) -> Finishing {
        if let Some(why) = self.failed {
            return Finishing::ready(Err(why.error()));
        }
        if let Some(declared) = self.declared {
            if declared != self.pushed {
                let actual = self.pushed;
                // Dropping self closes the queue: the temp file goes.
                return Finishing::ready(Err(DiskError::Length { declared, actual }));
            }
        }
        if !self.buf.is_empty() && !self.send_chunk() {
            let why = self.failed.unwrap_or(GaveUp::WriteFailed);
            return Finishing::ready(Err(why.error()));
        }
        let Some(mut meta) = self.meta.take() else {
            return Finishing::ready(Err(DiskError::Task));
        };
        meta.body_len = self.pushed;
        let pending = Pending::new(&self.inner);
        let sent = self
            .tx
            .take()
            .is_some_and(|tx| tx.send(Msg::Commit(Box::new(meta), pending)).is_ok());
        if !sent {
            return Finishing::ready(Err(DiskError::Abandoned("write failed")));
        }
        match self.task.take() {
            Some(task) => Finishing(FinishingState::Task(task)),
            None => Finishing::ready(Err(DiskError::Task)),
        }
    }
}

/// Bytes a writer handed to its task and the disk has not taken yet, and
/// the writer waiting for them to drain.
#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Backlog {
    fn below_pace(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.bytes.load(Ordering::Acquire) <= PACE
    }

    fn written(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.wake();
    }

    fn wake(&self) {
        let waker = lock(&self.waker).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Marks the backlog closed when the write task ends.
struct BacklogClosed(Arc<Backlog>);

impl Drop for BacklogClosed {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.wake();
    }
}

/// The outcome of [`DiskWriter::finish`].
pub struct Finishing(FinishingState);

enum FinishingState {
    Ready(Option<Result<(), DiskError>>),
    Task(JoinHandle<Result<(), DiskError>>),
}

impl Finishing {
    fn ready(result: Result<(), DiskError>) -> Finishing {
        Finishing(FinishingState::Ready(Some(result)))
    }
}

impl Future for Finishing {
    type Output = Result<(), DiskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            FinishingState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(DiskError::Task)))
            }
            FinishingState::Task(task) => Pin::new(task)
                .poll(cx)
                .map(|joined| joined.unwrap_or(Err(DiskError::Task))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::cache::entry::tests::{as_version, sample_meta};
    use http_body_util::BodyExt;
    use std::os::unix::fs::PermissionsExt;

    /// A private directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            let path = std::env::temp_dir().join(format!(
                "thruster-disk-{name}-{}-{}",
                std::process::id(),
                random_hex16()
            ));
            std::fs::create_dir_all(&path).unwrap();
            TestDir(path)
        }

        fn cache(&self) -> PathBuf {
            self.0.join("cache")
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl DiskStore {
        /// A store whose loader never runs unless started by hand.
        /// (Held entries are watched as usual.)
        fn without_loader(dir: PathBuf, budget: u64, max_item: u64) -> DiskStore {
            let store = DiskStore::unstarted(dir, budget, max_item);
            store.inner.loader_started.store(true, Ordering::Release);
            store.watch_held();
            store
        }

        async fn wait_loaded(&self) {
            for _ in 0..2000 {
                if self.is_loaded() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("loader did not finish");
        }

        fn path_of(&self, key: &str) -> PathBuf {
            self.inner.entry_path(&KeyHash::of(key))
        }
    }

    fn payload(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 12) as u8)
            .collect()
    }

    async fn put_meta(store: &DiskStore, meta: EntryMeta, body: &[u8]) -> Result<(), DiskError> {
        let mut writer = store
            .writer(meta, Some(body.len() as u64))
            .ok_or(DiskError::Off)?;
        for piece in body.chunks(16 * 1024) {
            // As the proxy would: wait for the disk before pulling more.
            writer.ready().await;
            if !writer.push(piece) {
                break;
            }
        }
        writer.finish().await
    }

    /// `sample_meta` with a current stored time: its own (January 2026)
    /// would make the entry dead, and the loader removes dead entries.
    fn fresh_meta(key: &str) -> EntryMeta {
        let mut meta = sample_meta(key, 0);
        meta.stored_at_unix_ms = now_unix_ms();
        meta
    }

    async fn put(store: &DiskStore, key: &str, body: &[u8]) -> Result<(), DiskError> {
        put_meta(store, fresh_meta(key), body).await
    }

    async fn stream(entry: &DiskEntry) -> (Vec<u8>, Option<BoxError>) {
        let mut body = entry.body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => out.extend_from_slice(&frame.into_data().unwrap()),
                Err(err) => return (out, Some(err)),
            }
        }
        assert!(body.is_end_stream());
        (out, None)
    }

    /// Every regular file under `dir`.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    fn entry_files(dir: &Path) -> Vec<PathBuf> {
        files(dir)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| KeyHash::parse_hex(n).is_some())
            })
            .collect()
    }

    /// Removal happens on the blocking pool: on a loaded machine (a build
    /// on both cores) it has taken over 2 s, so the limit is generous.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn ranges_read_only_their_bytes_across_chunk_boundaries() {
        let dir = TestDir::new("ranges");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        let len = 3 * CHUNK_LEN + 5;
        let body = payload(len, 7);
        put(&store, "ranged", &body).await.unwrap();
        let entry = store.get("ranged").await.expect("hit");
        let c = CHUNK_LEN as u64;
        for (start, n) in [
            (0, 10),
            (5, 1),
            (c - 3, 6),
            (c, c),
            (c + 1, 2 * c + 4),
            (3 * c, 5),
            (3 * c + 4, 1),
            (2, 3 * c + 3),
            // Past the end is cut to the end.
            (3 * c, 100),
            (10, 0),
        ] {
            let mut part = entry.body_range(start, n);
            let expected_len = n.min(len as u64 - start);
            assert_eq!(part.size_hint().exact(), Some(expected_len));
            let got = (&mut part).collect().await.unwrap().to_bytes();
            let end = (start + expected_len) as usize;
            assert_eq!(&got[..], &body[start as usize..end], "{start}+{n}");
            assert!(part.is_end_stream());
        }
    }

    #[tokio::test]
    async fn round_trips_small_and_multi_chunk_bodies() {
        let dir = TestDir::new("roundtrip");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        for (i, len) in [0, 1, 1000, CHUNK_LEN, CHUNK_LEN + 1, 3 * CHUNK_LEN + 5]
            .into_iter()
            .enumerate()
        {
            let key = format!("https://example.com/{i}\0gzip");
            let body = payload(len, i as u8);
            put(&store, &key, &body).await.unwrap();
            let entry = store.get(&key).await.expect("hit");
            let mut expected = sample_meta(&key, len as u64);
            expected.stored_at_unix_ms = entry.meta().stored_at_unix_ms;
            assert_eq!(entry.meta(), &expected);
            assert_eq!(
                entry
                    .meta()
                    .headers
                    .get_all("set-thing")
                    .iter()
                    .collect::<Vec<_>>(),
                ["one", "two"]
            );
            assert_eq!(entry.meta().headers["x-raw"].as_bytes(), b"caf\xe9 \xff");
            assert_eq!(entry.read_all().await.expect("verified"), body);
            let (streamed, err) = stream(&entry).await;
            assert!(err.is_none());
            assert_eq!(streamed, body, "len {len}");
            assert_eq!(entry.body().size_hint().exact(), Some(len as u64));
            // It fits the proxy's response body type as is.
            let boxed: crate::http::ResponseBody = entry.body().boxed_unsync();
            let collected = boxed.collect().await.unwrap().to_bytes();
            assert_eq!(collected, body);
        }
        assert!(store.get("absent").await.is_none());
        assert_eq!(store.usage().1, 6);
        assert!(
            files(&dir.cache().join(TMP_DIR)).is_empty(),
            "temp files left"
        );
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_gets_its_length_at_finish() {
        let dir = TestDir::new("unknown-len");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(CHUNK_LEN + 77, 9);
        let mut meta = fresh_meta("k");
        meta.body_len = 12345; // ignored
        let mut writer = store.writer(meta, None).unwrap();
        for piece in body.chunks(1000) {
            assert!(writer.push(piece));
        }
        writer.finish().await.unwrap();
        let entry = store.get("k").await.unwrap();
        assert_eq!(entry.meta().body_len, body.len() as u64);
        assert_eq!(entry.read_all().await.unwrap(), body);
    }

    #[tokio::test]
    async fn wrong_lengths_oversize_and_dropped_writers_leave_nothing() {
        let dir = TestDir::new("refused");
        let store = DiskStore::open(dir.cache(), 64 << 20, 100_000);
        // Shorter than declared.
        let mut w = store.writer(fresh_meta("short"), Some(10)).unwrap();
        assert!(w.push(b"12345"));
        assert!(matches!(
            w.finish().await,
            Err(DiskError::Length {
                declared: 10,
                actual: 5
            })
        ));
        // Longer than declared: refused as soon as it shows.
        let mut w = store.writer(fresh_meta("long"), Some(4)).unwrap();
        assert!(!w.push(b"12345"));
        assert!(!w.push(b"6"));
        assert!(w.finish().await.is_err());
        // Declared over the item limit: no writer at all.
        assert!(store.writer(fresh_meta("big"), Some(100_001)).is_none());
        // Undeclared and growing past the limit.
        let mut w = store.writer(fresh_meta("grows"), None).unwrap();
        assert!(w.push(&payload(100_000, 1)));
        assert!(!w.push(b"x"));
        assert!(matches!(w.finish().await, Err(DiskError::TooLarge)));
        // Dropped mid-body (client went away): the temp file goes.
        let mut w = store.writer(fresh_meta("dropped"), None).unwrap();
        assert!(w.push(&payload(90_000, 2)));
        drop(w);
        store.flush().await;
        let tmp = dir.cache().join(TMP_DIR);
        assert!(
            eventually(|| files(&tmp).is_empty()).await,
            "temp files left"
        );
        for key in ["short", "long", "big", "grows", "dropped"] {
            assert!(store.get(key).await.is_none(), "{key}");
        }
        assert!(entry_files(&dir.cache()).is_empty());
        assert!(store.is_writable());
    }

    #[tokio::test]
    async fn a_writer_far_behind_holds_a_pacing_caller_and_drops_an_unpaced_one() {
        let dir = TestDir::new("pace");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        let mut w = store.writer(fresh_meta("paced"), None).unwrap();
        assert!(w.push(b"first"));
        // Pretend the disk is 5 MiB behind.
        w.backlog.bytes.fetch_add(5 << 20, Ordering::AcqRel);
        let waker = std::task::Waker::noop();
        assert!(w.poll_ready(&mut Context::from_waker(waker)).is_pending());
        let backlog = w.backlog.clone();
        let drain = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            backlog.written(5 << 20);
        });
        tokio::time::timeout(Duration::from_secs(5), w.ready())
            .await
            .expect("woken when the disk caught up");
        drain.await.unwrap();
        assert!(w.push(b" second"));
        w.finish().await.unwrap();
        let entry = store.get("paced").await.unwrap();
        assert_eq!(entry.read_all().await.unwrap(), &b"first second"[..]);

        // A caller that does not pace loses the entry, not memory.
        let mut w = store.writer(fresh_meta("unpaced"), None).unwrap();
        assert!(w.push(b"first"));
        w.backlog.bytes.fetch_add(MAX_QUEUED + 1, Ordering::AcqRel);
        assert!(!w.push(b" second"));
        assert!(w.poll_ready(&mut Context::from_waker(waker)).is_ready());
        assert!(matches!(w.finish().await, Err(DiskError::Abandoned(_))));
        store.flush().await;
        assert!(store.get("unpaced").await.is_none());

        // One big push into an empty backlog is fine (the caller holds
        // that memory already).
        let big = payload(12 << 20, 1);
        let mut w = store.writer(fresh_meta("big"), None).unwrap();
        assert!(w.push(&big));
        w.finish().await.unwrap();
        assert_eq!(
            store.get("big").await.unwrap().read_all().await.unwrap(),
            big
        );
    }

    #[tokio::test]
    async fn flush_waits_for_finished_writes_nobody_awaits() {
        let dir = TestDir::new("flush");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(3 * CHUNK_LEN, 3);
        for i in 0..10 {
            let mut w = store.writer(fresh_meta(&format!("k{i}")), None).unwrap();
            assert!(w.push(&body));
            drop(w.finish());
        }
        store.flush().await;
        assert_eq!(entry_files(&dir.cache()).len(), 10);
        for i in 0..10 {
            assert!(store.get(&format!("k{i}")).await.is_some());
        }
    }

    #[tokio::test]
    async fn another_keys_entry_at_the_path_is_a_miss() {
        let dir = TestDir::new("wrong-key");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        put(&store, "a", b"body of a").await.unwrap();
        let b_path = store.path_of("b");
        std::fs::create_dir_all(b_path.parent().unwrap()).unwrap();
        std::fs::copy(store.path_of("a"), &b_path).unwrap();
        assert!(store.get("b").await.is_none());
        // It could never be found by its own key there: removed.
        assert!(!b_path.exists());
        assert_eq!(
            store.get("a").await.unwrap().read_all().await.unwrap(),
            &b"body of a"[..]
        );
    }

    /// Writes `bytes` at `key`'s path the way a damaged disk would leave it.
    fn plant(store: &DiskStore, key: &str, bytes: &[u8]) {
        let path = store.path_of(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }

    #[tokio::test]
    async fn every_corruption_and_truncation_is_a_miss_and_removed() {
        let dir = TestDir::new("corrupt");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(100, 5);
        put(&store, "k", &body).await.unwrap();
        let path = store.path_of("k");
        let good = std::fs::read(&path).unwrap();
        let gone = || !path.exists();

        for i in 0..good.len() {
            for flip in [0x01u8, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                // Read whole.
                plant(&store, "k", &bad);
                if let Some(entry) = store.get("k").await {
                    assert!(
                        entry.read_all().await.is_none(),
                        "byte {i}^{flip:#x} read whole"
                    );
                }
                assert!(eventually(gone).await, "byte {i}^{flip:#x} not removed");
                // Streamed.
                plant(&store, "k", &bad);
                if let Some(entry) = store.get("k").await {
                    let (_, err) = stream(&entry).await;
                    assert!(err.is_some(), "byte {i}^{flip:#x} streamed");
                }
                assert!(eventually(gone).await, "byte {i}^{flip:#x} not removed");
            }
        }
        for cut in 0..good.len() {
            plant(&store, "k", &good[..cut]);
            assert!(store.get("k").await.is_none(), "cut at {cut}");
            assert!(eventually(gone).await, "cut at {cut} not removed");
        }
        let mut longer = good.clone();
        longer.push(0);
        plant(&store, "k", &longer);
        assert!(store.get("k").await.is_none());
        assert!(eventually(gone).await);
        // And the intact file still reads.
        plant(&store, "k", &good);
        assert_eq!(
            store.get("k").await.unwrap().read_all().await.unwrap(),
            body
        );
    }

    #[tokio::test]
    async fn a_bad_chunk_ends_the_stream_with_an_error_before_the_end() {
        let dir = TestDir::new("bad-chunk");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(4 * CHUNK_LEN - 3, 6);
        put(&store, "k", &body).await.unwrap();
        let path = store.path_of("k");
        let mut bytes = std::fs::read(&path).unwrap();
        let head = bytes.len() - framed_body_len(body.len() as u64) as usize;
        // One byte in the middle of chunk 2 (the third).
        let at = head + chunk_offset(2) as usize + CHUNK_HEADER_LEN + 1000;
        bytes[at] ^= 0x40;
        plant(&store, "k", &bytes);

        let entry = store.get("k").await.expect("the metadata is fine");
        let (before, err) = stream(&entry).await;
        let err = err.expect("the stream must fail");
        assert!(err.to_string().contains("chunk 2"), "{err}");
        assert_eq!(
            before,
            body[..2 * CHUNK_LEN],
            "only verified chunks came out"
        );
        assert!(eventually(|| !path.exists()).await, "bad entry not removed");
    }

    /// Writes `path`'s pages back and drops them from the page cache, so a
    /// page-cache-only read of it would have to wait for the disk.
    fn drop_cached_pages(path: &Path) {
        let file = File::open(path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: an advisory call on an fd we hold open.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise");
    }

    #[tokio::test]
    async fn hot_entries_are_read_inline_and_cold_ones_on_the_pool() {
        let dir = TestDir::new("inline");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let small = payload(20_000, 1);
        let large = payload(2 * CHUNK_LEN + 9, 2);
        put(&store, "small", &small).await.unwrap();
        put(&store, "large", &large).await.unwrap();
        store.flush().await;
        let mut cx = Context::from_waker(Waker::noop());

        // Hot (just written): opened and read without leaving this task —
        // a small file whole by its first read, a large one a chunk per
        // poll, every poll ready at once.
        let entry = store
            .inner
            .open_entry(KeyHash::of("small"), "small", Reads::Cached)
            .expect("a hot entry opens inline")
            .expect("hit");
        assert!(entry.framed.is_some(), "a small file is read whole at once");
        let mut body = entry.body();
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), small),
            other => panic!("the small body was not ready: {other:?}"),
        }
        let entry = store
            .inner
            .open_entry(KeyHash::of("large"), "large", Reads::Cached)
            .expect("a hot entry opens inline")
            .expect("hit");
        assert!(
            entry.framed.is_none(),
            "only the head of a large file is read"
        );
        let mut body = entry.body();
        let mut out = Vec::new();
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => out.extend_from_slice(&frame.into_data().unwrap()),
                Poll::Ready(None) => break,
                other => panic!("a hot chunk was not ready: {other:?}"),
            }
        }
        assert_eq!(out, large);

        // Cold: the inline pass gives up and the blocking pool reads them,
        // whole and right.
        drop_cached_pages(&store.path_of("small"));
        drop_cached_pages(&store.path_of("large"));
        assert!(
            store
                .inner
                .open_entry(KeyHash::of("small"), "small", Reads::Cached)
                .is_err(),
            "a cold entry must not be read inline"
        );
        let entry = store.get("small").await.expect("hit from the pool");
        assert_eq!(entry.read_all().await.unwrap(), small);
        let entry = store.get("large").await.expect("hit from the pool");
        drop_cached_pages(&store.path_of("large"));
        let (streamed, err) = stream(&entry).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(streamed, large);
        assert!(store.path_of("small").exists() && store.path_of("large").exists());
    }

    #[tokio::test]
    async fn hits_reuse_a_held_entry_until_its_file_changes_or_it_times_out() {
        let dir = TestDir::new("held");
        let here = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        let other = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let body = |n: u8| payload(3000, n);
        let read = |store: &DiskStore| {
            let store = store.clone();
            async move { store.get("k").await.unwrap().read_all().await.unwrap() }
        };
        put(&here, "k", &body(1)).await.unwrap();
        assert_eq!(read(&here).await, body(1));
        let held_file = here.inner.index.lock().unwrap().held.len();
        assert_eq!(held_file, 1, "a hit holds its entry open");

        let held = |store: &DiskStore| {
            let index = store.inner.index.lock().unwrap();
            index.held.values().next().map(|h| h.opened.clone())
        };
        let first = held(&here).unwrap();
        assert_eq!(read(&here).await, body(1));
        assert!(
            Arc::ptr_eq(&first, &held(&here).unwrap()),
            "the next hit reuses it"
        );
        drop(first);

        // Another process's new version replaces the file: the held one
        // loses its link, inotify says so, and hits see the new one (well
        // before KEEP_OPEN would have closed the old).
        let shows = |want: Vec<u8>| {
            let here = here.clone();
            async move {
                let started = std::time::Instant::now();
                while read(&here).await != want {
                    assert!(
                        started.elapsed() < KEEP_OPEN / 2,
                        "the new version never showed"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        put(&other, "k", &body(2)).await.unwrap();
        shows(body(2)).await;
        // This process's own write drops what it holds, at once.
        put(&here, "k", &body(3)).await.unwrap();
        assert!(held(&here).is_none());
        assert_eq!(read(&here).await, body(3));
        put(&other, "k", &body(4)).await.unwrap();
        shows(body(4)).await;
        // With no more hits, the held entry is closed.
        assert!(
            eventually_for(KEEP_OPEN * 3, || here
                .inner
                .index
                .lock()
                .unwrap()
                .held
                .is_empty())
            .await,
            "an idle held entry stayed open"
        );
        // Removing the entry (here: a damaged one) drops what is held.
        assert_eq!(read(&here).await, body(4));
        here.inner.remove_bad(
            &KeyHash::of("k"),
            &here.path_of("k"),
            FileId::of(&std::fs::metadata(here.path_of("k")).unwrap()),
        );
        assert!(here.get("k").await.is_none());
    }

    #[tokio::test]
    async fn a_chunk_that_comes_back_from_the_disk_is_checked_again() {
        let dir = TestDir::new("recheck");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(100_000, 3);
        put(&store, "k", &body).await.unwrap();
        let entry = store.get("k").await.expect("hit");
        let (first, err) = stream(&entry).await;
        assert!(err.is_none() && first == body);
        // The held file's bytes change under it (no writer of ours does
        // that; a disk can) and leave the page cache: the next read goes to
        // the disk, and is checked although this fd passed it before.
        let path = store.path_of("k");
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        file.write_all_at(b"XXXX", len - 500).unwrap();
        drop(file);
        drop_cached_pages(&path);
        let entry = store.get("k").await.expect("still held");
        let (_, err) = stream(&entry).await;
        assert!(
            err.is_some_and(|e| e.to_string().contains("checksum")),
            "a cold read must be checked"
        );
    }

    #[tokio::test]
    async fn checked_chunks_of_a_held_entry_go_out_as_file_regions() {
        let dir = TestDir::new("zero-copy");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(2 * CHUNK_LEN + 1000, 4);
        put(&store, "k", &body).await.unwrap();
        // Every frame of `body`: bytes, or the file region a marker stands for.
        async fn frames(mut body: DiskBody, conn: &ConnState) -> (Vec<u8>, usize) {
            let (mut out, mut regions) = (Vec::new(), 0);
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap();
                if crate::conn::is_zero_copy_marker(&data) {
                    let region = conn.zero_copy.lock().unwrap().pop_front().unwrap();
                    assert_eq!(region.len, data.len() as u64);
                    let mut bytes = vec![0u8; region.len as usize];
                    region
                        .file
                        .read_exact_at(&mut bytes, region.offset)
                        .unwrap();
                    out.extend_from_slice(&bytes);
                    regions += 1;
                } else {
                    out.extend_from_slice(&data);
                }
            }
            (out, regions)
        }
        let conn = Arc::new(ConnState::default());
        // First through this fd: read and checked, so sent as bytes.
        let entry = store.get("k").await.unwrap();
        let (out, regions) = frames(entry.body().zero_copy(conn.clone()), &conn).await;
        assert_eq!((out == body, regions), (true, 0));
        // Checked now: the next hit's chunks are file regions (but the last,
        // under ZERO_COPY_MIN, read as bytes), ranges too.
        let entry = store.get("k").await.unwrap();
        let (out, regions) = frames(entry.body().zero_copy(conn.clone()), &conn).await;
        assert_eq!((out == body, regions), (true, 2));
        let (start, len) = (CHUNK_LEN as u64 - 10, 30);
        let (out, regions) =
            frames(entry.body_range(start, len).zero_copy(conn.clone()), &conn).await;
        assert_eq!(out, body[start as usize..(start + len) as usize]);
        assert_eq!(regions, 2);
        // Without a connection for it, the same hit is read as bytes.
        let (out, regions) = frames(entry.body(), &conn).await;
        assert_eq!((out == body, regions), (true, 0));
        assert!(conn.zero_copy.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_held_file_written_into_is_checked_afresh() {
        let dir = TestDir::new("written-into");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        let body = payload(300_000, 5);
        put(&store, "k", &body).await.unwrap();
        let conn = Arc::new(ConnState::default());
        for _ in 0..2 {
            // Checked by the first, then held and trusted.
            let entry = store.get("k").await.unwrap();
            let (out, err) = stream(&entry).await;
            assert!(err.is_none() && out == body);
        }
        // In place, so the page cache holds the new bytes: were the entry
        // still held, its fd would send them unchecked. inotify reports the
        // write and the entry stops being held (as soon as the runtime
        // takes the event: not within this task's next statement).
        let path = store.path_of("k");
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"XXXX", 1000).unwrap();
        drop(file);
        assert!(
            eventually(|| store.inner.index.lock().unwrap().held.is_empty()).await,
            "the write was not noticed"
        );
        let entry = store.get("k").await.expect("the metadata is fine");
        let mut body = entry.body().zero_copy(conn.clone());
        let mut err = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => assert!(
                    !crate::conn::is_zero_copy_marker(&frame.into_data().unwrap()),
                    "an unchecked region went out"
                ),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(
            err.is_some_and(|e| e.to_string().contains("checksum")),
            "the damage must show"
        );
    }

    async fn eventually_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn open_entries_hold_a_registered_fd() {
        let dir = TestDir::new("fds");
        let store = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        put(&store, "k", b"x").await.unwrap();
        let entry = store.get("k").await.unwrap();
        assert!(fd_registry::is_registered(entry.opened.file.as_raw_fd()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_on_one_directory_never_see_a_partial_entry() {
        let dir = TestDir::new("two");
        let a = DiskStore::open(dir.cache(), 256 << 20, 16 << 20);
        let b = DiskStore::open(dir.cache(), 256 << 20, 16 << 20);
        const KEYS: usize = 3;
        const ROUNDS: usize = 8;
        // A body says who wrote it: its salt is in a header. Three chunks,
        // of a different length per writer and round.
        let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..4 * ROUNDS)
                .map(|salt| payload(2 * CHUNK_LEN + 1234 + salt * 17, salt as u8))
                .collect(),
        );
        let mut tasks = Vec::new();
        for (w, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .enumerate()
        {
            let bodies = bodies.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    for k in 0..KEYS {
                        let salt = (w * ROUNDS + round) as u8;
                        let mut meta = fresh_meta(&format!("key{k}"));
                        meta.headers
                            .insert("x-salt", http::HeaderValue::from(u16::from(salt)));
                        put_meta(&store, meta, &bodies[usize::from(salt)])
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        let mut readers = Vec::new();
        for (r, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .enumerate()
        {
            let bodies = bodies.clone();
            readers.push(tokio::spawn(async move {
                let mut hits = 0;
                for i in 0..ROUNDS * KEYS * 2 {
                    let Some(entry) = store.get(&format!("key{}", i % KEYS)).await else {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    };
                    let salt: u8 = entry.meta().headers["x-salt"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let body = if r % 2 == 0 {
                        entry.read_all().await.expect("a complete entry").to_vec()
                    } else {
                        let (body, err) = stream(&entry).await;
                        assert!(err.is_none());
                        body
                    };
                    assert!(body == bodies[usize::from(salt)], "partial or mixed entry");
                    hits += 1;
                }
                hits
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut hits = 0;
        for r in readers {
            hits += r.await.unwrap();
        }
        println!("{hits} hits while writing");
        assert!(hits > 0);
        a.flush().await;
        b.flush().await;
        assert_eq!(entry_files(&dir.cache()).len(), KEYS);
        assert!(files(&dir.cache().join(TMP_DIR)).is_empty());
    }

    #[test]
    fn disk_errors_that_stop_writes() {
        for errno in [
            libc::EROFS,
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EACCES,
            libc::EPERM,
            libc::ENOTDIR,
        ] {
            assert!(
                disk_unusable(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::EIO, libc::ENOENT, libc::EEXIST, libc::EINTR] {
            assert!(
                !disk_unusable(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        let store = DiskStore::unstarted(PathBuf::from("/nonexistent"), 1 << 20, 1 << 20);
        for errno in [libc::EROFS, libc::ENOSPC, libc::EROFS] {
            let err = io::Error::from_raw_os_error(errno);
            store.inner.write_failed("write", Path::new("/x"), &err);
        }
        assert!(!store.is_writable());
        assert_eq!(store.inner.warnings.load(Ordering::Relaxed), 1);
    }

    /// Tries writes until the store turns itself off; then it must refuse
    /// writers, have warned once, and still answer gets (misses).
    async fn goes_off_after_one_warning(store: &DiskStore) {
        let mut failures = 0;
        for i in 0..5 {
            match store.writer(fresh_meta(&format!("k{i}")), Some(3)) {
                Some(mut w) => {
                    w.push(b"abc");
                    assert!(w.finish().await.is_err());
                    failures += 1;
                }
                None => break,
            }
        }
        assert!(failures >= 1);
        assert!(!store.is_writable());
        assert!(store.writer(fresh_meta("later"), Some(3)).is_none());
        assert_eq!(store.inner.warnings.load(Ordering::Relaxed), 1);
        assert!(store.get("k0").await.is_none());
    }

    #[tokio::test]
    async fn an_unwritable_directory_turns_writes_off_with_one_warning() {
        // A path under a regular file: creating it fails (ENOTDIR) for
        // root too.
        let dir = TestDir::new("not-a-dir");
        let file = dir.0.join("plain-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let store = DiskStore::open(file.join("cache"), 1 << 20, 1 << 20);
        goes_off_after_one_warning(&store).await;
        assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");

        // A read-only directory (EACCES). chmod does not stop root, which
        // is what CI runs as.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            println!("skipped the chmod 0555 case: running as root, which chmod does not stop");
            return;
        }
        let ro = dir.0.join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let store = DiskStore::open(&ro, 1 << 20, 1 << 20);
        goes_off_after_one_warning(&store).await;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Sum of the entry files' sizes in blocks, as the budget counts them.
    fn on_disk(dir: &Path) -> u64 {
        entry_files(dir)
            .iter()
            .map(|p| disk_size(std::fs::metadata(p).unwrap().len()))
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eviction_keeps_the_directory_under_budget_under_churn() {
        let dir = TestDir::new("churn");
        let budget = 1 << 20;
        let store = DiskStore::open(dir.cache(), budget, 256 * 1024);
        for round in 0..10 {
            let mut writes = Vec::new();
            for i in 0..20 {
                let store = store.clone();
                writes.push(tokio::spawn(async move {
                    let body = payload(20 * 1024 + i * 100, i as u8);
                    put(&store, &format!("r{round}-{i}"), &body).await.unwrap();
                }));
            }
            for w in writes {
                w.await.unwrap();
            }
            store.flush().await;
            let (bytes, entries) = store.usage();
            assert!(bytes <= budget, "round {round}: {bytes} > {budget}");
            assert!(on_disk(&dir.cache()) <= budget, "round {round}");
            // 24 KiB each: 42 fit, eviction goes down to 90%.
            let least = if round == 0 { 20 } else { 35 };
            assert!(
                entries >= least,
                "round {round}: evicted too much: {entries}"
            );
        }
        // The most recent writes survive.
        assert!(store.get("r9-19").await.is_some());
    }

    fn meta_with(key: &str, lifetime: u64, stale_if_error: u64) -> EntryMeta {
        let mut meta = fresh_meta(key);
        meta.stored_at_unix_ms = now_unix_ms();
        meta.initial_age_secs = 0;
        meta.lifetime_secs = lifetime;
        meta.stale_if_error_secs = stale_if_error;
        meta
    }

    #[tokio::test]
    async fn expired_entries_are_evicted_before_older_fresh_ones() {
        let dir = TestDir::new("expired-first");
        let body = payload(20 * 1024, 1);
        // Each entry takes 24 KiB: room for 12.
        let store = DiskStore::without_loader(dir.cache(), 12 * 24 * 1024, 1 << 20);
        for i in 0..5 {
            put_meta(&store, meta_with(&format!("fresh{i}"), 3600, 0), &body)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Newer, but stale (still usable on error, so not dead).
        for i in 0..5 {
            put_meta(&store, meta_with(&format!("stale{i}"), 0, 3600), &body)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for i in 5..8 {
            put_meta(&store, meta_with(&format!("fresh{i}"), 3600, 0), &body)
                .await
                .unwrap();
        }
        store.flush().await;
        assert!(store.usage().0 <= 12 * 24 * 1024);
        for i in 0..8 {
            assert!(
                store.get(&format!("fresh{i}")).await.is_some(),
                "fresh{i} evicted"
            );
        }
        let stale_left = entry_files(&dir.cache()).len() - 8;
        assert!(stale_left < 5, "no stale entry was evicted");
        // The oldest stale ones went first.
        assert!(store.get("stale0").await.is_none());
        assert!(store.get("stale4").await.is_some());
    }

    #[tokio::test]
    async fn dead_entries_are_removed_by_the_maintenance_pass() {
        let dir = TestDir::new("dead");
        let store = DiskStore::without_loader(dir.cache(), 1 << 20, 1 << 20);
        put_meta(&store, meta_with("dead", 0, 0), b"x")
            .await
            .unwrap();
        put_meta(&store, meta_with("alive", 60, 0), b"y")
            .await
            .unwrap();
        let inner = store.inner.clone();
        tokio::task::spawn_blocking(move || inner.remove_dead())
            .await
            .unwrap();
        assert!(!store.path_of("dead").exists());
        assert!(store.get("alive").await.is_some());
        assert_eq!(store.usage().1, 1);
    }

    #[tokio::test]
    async fn get_finds_entries_before_the_loader_ran_and_the_loader_indexes_the_rest() {
        let dir = TestDir::new("before-loader");
        let writer = DiskStore::open(dir.cache(), 64 << 20, 16 << 20);
        for i in 0..30 {
            put(&writer, &format!("k{i}"), &payload(500 + i, i as u8))
                .await
                .unwrap();
        }
        writer.flush().await;
        // A damaged entry the loader should find and remove.
        let damaged = writer.path_of("k29");
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&damaged, bytes).unwrap();

        let fresh = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        assert_eq!(fresh.usage(), (0, 0));
        let entry = fresh.get("k7").await.expect("found by its key alone");
        assert_eq!(entry.read_all().await.unwrap(), payload(507, 7));
        assert_eq!(fresh.usage().1, 1);
        assert!(!fresh.is_loaded());

        fresh.inner.loader_started.store(false, Ordering::Release);
        fresh.start_loader();
        fresh.wait_loaded().await;
        assert_eq!(fresh.usage().1, 29);
        assert!(!damaged.exists(), "the loader left a damaged entry");
    }

    #[tokio::test]
    async fn another_versions_entry_is_left_alone_but_evictable() {
        let dir = TestDir::new("other-version");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        put(&store, "k", b"hello").await.unwrap();
        let path = store.path_of("k");
        let bytes = std::fs::read(&path).unwrap();
        let head_len = entry::parse_envelope(&bytes).unwrap().head_len();
        let mut v2 = as_version(&bytes[..head_len], 2);
        v2.extend_from_slice(&bytes[head_len..]);
        plant(&store, "k", &v2);
        assert!(store.get("k").await.is_none());
        assert!(path.exists(), "another release's entry was removed");

        // The loader counts it, and eviction takes it before anything else.
        let other = DiskStore::without_loader(dir.cache(), 12 * 4096, 16 << 20);
        other.inner.loader_started.store(false, Ordering::Release);
        other.start_loader();
        other.wait_loaded().await;
        assert_eq!(other.usage().1, 1);
        for i in 0..12 {
            put(&other, &format!("n{i}"), b"new").await.unwrap();
        }
        other.flush().await;
        assert!(!path.exists(), "foreign entry not evicted first");
        assert!(other.get("n11").await.is_some());
    }

    #[tokio::test]
    async fn clean_up_touches_nothing_that_is_not_ours() {
        let dir = TestDir::new("foreign-files");
        let cache = dir.cache();
        let sibling = dir.0.join("acme-key.pem");
        std::fs::write(&sibling, b"secret").unwrap();
        let store = DiskStore::without_loader(cache.clone(), 64 * 1024, 1 << 20);
        put(&store, "seed", b"x").await.unwrap();

        let tmp = cache.join(TMP_DIR);
        let hex = KeyHash::of("whatever").hex();
        let keep: Vec<PathBuf> = vec![
            cache.join("README"),
            tmp.join("notes.txt"),
            tmp.join("123-0123456789ABCDEF"), // upper case: not our pattern
            tmp.join("456-0123456789abcdef"), // ours, but fresh
            cache.join("zz").join(&hex),      // not a level directory
            cache.join("ab").join("notes.txt"),
            cache.join("ab").join("cd").join("notes.txt"),
            cache
                .join(&hex[0..2])
                .join(&hex[2..4])
                .join(hex.to_uppercase()),
        ];
        for p in &keep {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"not a cache entry").unwrap();
        }
        let old = SystemTime::now() - Duration::from_secs(3600);
        let stale_temp = tmp.join("789-fedcba9876543210");
        std::fs::write(&stale_temp, b"left by a crash").unwrap();
        let old_foreign = tmp.join("other-file");
        std::fs::write(&old_foreign, b"old").unwrap();
        for p in [&stale_temp, &old_foreign, &keep[3]] {
            let f = File::options().write(true).open(p).unwrap();
            f.set_modified(if p == &keep[3] {
                SystemTime::now()
            } else {
                old
            })
            .unwrap();
        }

        // Churn far past the budget, then a full loader pass.
        for i in 0..40 {
            put(&store, &format!("k{i}"), &payload(10_000, i as u8))
                .await
                .unwrap();
        }
        store.flush().await;
        store.inner.loader_started.store(false, Ordering::Release);
        store.start_loader();
        store.wait_loaded().await;
        store.flush().await;

        assert!(store.usage().0 <= 64 * 1024);
        assert_eq!(std::fs::read(&sibling).unwrap(), b"secret");
        for p in &keep {
            assert_eq!(std::fs::read(p).unwrap(), b"not a cache entry", "{p:?}");
        }
        assert_eq!(std::fs::read(&old_foreign).unwrap(), b"old");
        assert!(!stale_temp.exists(), "stale temp file of ours kept");
    }

    #[test]
    fn handles_are_send_and_the_store_is_shareable() {
        fn send<T: Send + 'static>() {}
        fn shared<T: Send + Sync + 'static>() {}
        shared::<DiskStore>();
        send::<DiskEntry>();
        send::<DiskBody>();
        send::<DiskWriter>();
        send::<Finishing>();
    }

    #[tokio::test]
    async fn a_removed_directory_is_forgotten_by_the_next_scan() {
        let dir = TestDir::new("rm-rf");
        let store = DiskStore::without_loader(dir.cache(), 64 << 20, 16 << 20);
        for i in 0..20 {
            put(&store, &format!("k{i}"), b"body").await.unwrap();
        }
        assert_eq!(store.usage().1, 20);
        std::fs::remove_dir_all(dir.cache()).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        store.inner.loader_started.store(false, Ordering::Release);
        store.start_loader();
        store.wait_loaded().await;
        assert_eq!(store.usage(), (0, 0));
        // And it writes again, recreating what it needs.
        put(&store, "again", b"body").await.unwrap();
        assert!(store.get("again").await.is_some());
    }

    /// Write and read throughput through the store, next to plain
    /// `std::fs` on the same data, and what the checksums cost. Hot page
    /// cache, no fsync (as the store runs).
    ///
    /// cargo test --release -p thruster_core --lib disk::tests::throughput -- --ignored --nocapture
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark; run with --release --ignored --nocapture"]
    async fn throughput() {
        use std::time::Instant;
        let dir = TestDir::new("bench");
        let store = DiskStore::without_loader(dir.cache(), 4 << 30, 256 << 20);
        let mib = |bytes: usize, d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
        // Fixed cost per entry: an empty body (temp file, metadata, rename).
        let t = Instant::now();
        for r in 0..500 {
            put(&store, &format!("empty-{r}"), b"").await.unwrap();
        }
        let empty_write = t.elapsed() / 500;
        let t = Instant::now();
        for r in 0..500 {
            let entry = store.get(&format!("empty-{r}")).await.unwrap();
            assert!(entry.read_all().await.unwrap().is_empty());
        }
        println!(
            "empty body: write {:?}, get + read_all {:?}",
            empty_write,
            t.elapsed() / 500
        );
        for (size, runs) in [(1usize << 20, 200u32), (64 << 20, 8)] {
            let body = payload(size, 1);
            let t = Instant::now();
            for r in 0..runs {
                put(&store, &format!("b{size}-{r}"), &body).await.unwrap();
            }
            let write = t.elapsed() / runs;

            let t = Instant::now();
            for r in 0..runs {
                let entry = store.get(&format!("b{size}-{r}")).await.unwrap();
                let mut stream = entry.body();
                let mut n = 0;
                while let Some(frame) = stream.frame().await {
                    n += frame.unwrap().into_data().unwrap().len();
                }
                assert_eq!(n, size);
            }
            let streamed = t.elapsed() / runs;

            let t = Instant::now();
            for r in 0..runs {
                let entry = store.get(&format!("b{size}-{r}")).await.unwrap();
                assert_eq!(entry.read_all().await.unwrap().len(), size);
            }
            let whole = t.elapsed() / runs;

            // Baseline: the same bytes as a plain file, written and read
            // whole on the blocking pool.
            let raw_dir = dir.0.join("raw");
            std::fs::create_dir_all(&raw_dir).unwrap();
            let shared = Arc::new(body.clone());
            let t = Instant::now();
            for r in 0..runs {
                let (path, data) = (raw_dir.join(format!("{size}-{r}")), shared.clone());
                tokio::task::spawn_blocking(move || std::fs::write(path, &*data).unwrap())
                    .await
                    .unwrap();
            }
            let raw_write = t.elapsed() / runs;
            let t = Instant::now();
            for r in 0..runs {
                let path = raw_dir.join(format!("{size}-{r}"));
                let n = tokio::task::spawn_blocking(move || std::fs::read(path).unwrap().len())
                    .await
                    .unwrap();
                assert_eq!(n, size);
            }
            let raw_read = t.elapsed() / runs;

            // The checksums alone: every chunk's CRC once (a write or a
            // read computes each once).
            let seed = KeyHash::of("k").chunk_seed();
            let t = Instant::now();
            for _ in 0..runs {
                for (i, chunk) in body.chunks(CHUNK_LEN).enumerate() {
                    std::hint::black_box(entry::chunk_header(seed, i as u64, chunk));
                }
            }
            let crc = t.elapsed() / runs;

            println!(
                "{:>3} MiB body: write {:>6.0} MiB/s ({:?}), stream read {:>6.0} MiB/s ({:?}), \
                 read_all {:>6.0} MiB/s ({:?}) | std::fs write {:>6.0} MiB/s, read {:>6.0} MiB/s | \
                 CRC {:>6.0} MiB/s = {:.1}% of a write, {:.1}% of a streamed read",
                size >> 20,
                mib(size, write),
                write,
                mib(size, streamed),
                streamed,
                mib(size, whole),
                whole,
                mib(size, raw_write),
                mib(size, raw_read),
                mib(size, crc),
                100.0 * crc.as_secs_f64() / write.as_secs_f64(),
                100.0 * crc.as_secs_f64() / streamed.as_secs_f64(),
            );
        }
    }

    #[test]
    fn names_we_own() {
        assert!(is_temp_name("1-0123456789abcdef"));
        assert!(is_temp_name("4294967295-ffffffffffffffff"));
        assert!(!is_temp_name("-0123456789abcdef"));
        assert!(!is_temp_name("12-0123456789abcde"));
        assert!(!is_temp_name("12-0123456789abcdeF"));
        assert!(!is_temp_name("a1-0123456789abcdef"));
        assert!(!is_temp_name("notes.txt"));
        assert!(is_hex2("0f") && !is_hex2("0F") && !is_hex2("tmp") && !is_hex2("g0"));
        assert!(random_hex16().len() == 16 && is_temp_name(&format!("1-{}", random_hex16())));
    }
}
