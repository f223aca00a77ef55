//! The disk tier: what the HTTP cache keeps in the storage engine
//! ([`super::disk`], one checked file per record) and how it finds it again.
//!
//! Three kinds of record, each named by a hash of its key text (`key.rs`;
//! the text itself is stored and compared):
//!
//! - **entry** (`CacheKey::text`): a response as the memory tier keeps it —
//!   status, headers, body, the wall-clock time it was received and its
//!   freshness. An X-Sendfile response is kept as a reference to its file
//!   (`EntryMeta::file`), re-checked on every hit as in memory.
//! - **vary record** (`BaseKey::vary_record_text`): the request headers a
//!   resource varies on. The memory tier keeps this as a rule; a process
//!   that has no rule yet (just started, or the rule was evicted) reads the
//!   record first, then the variant the request selects. Every stored
//!   variant rewrites it, so it says what the latest response said.
//! - **encoding** (`CacheKey::encoded_text`): a br/zstd/gzip encoding of an
//!   entry's body, made once on first demand and written here, so after a
//!   restart nothing is compressed again. It names the body it encodes
//!   (receive time, length, CRC-32) and is ignored unless that matches, so
//!   a re-stored entry never gets its predecessor's encoding. "Encoding
//!   does not make it smaller" is kept too (an empty body without
//!   `Content-Encoding`).
//!
//! Writes happen off the request path (the engine commits in the
//! background); reads only on a memory miss.
//!
//! Seams for issue 16's next steps:
//! - [`servable`] is the one place that decides whether a stored record may
//!   answer now. `CACHE_RELEASE` (an entry of another release only when
//!   immutable, from `EntryMeta::release`) and purge records (an entry
//!   stored before a purge of its key or prefix) are further conditions
//!   there; [`meta_for`] is where the release is written.
//! - [`entry_from_meta`] and [`meta_for`] convert between memory entries and
//!   the stored form (`entry.rs`), which is also the value a Redis tier
//!   keeps: a Redis hit promotes through the same function. X-Sendfile
//!   references are host-local and must not go there.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::directives::Freshness;
use super::disk::{DiskEntry, DiskStore, DiskWriter};
use super::entry::{now_unix_ms, EntryMeta, StoredFile};
use super::key::{self, BaseKey, CacheKey};
use super::shared::SharedTier;
use super::store::{self, Entry, FileRef};
use crate::config::Config;
use crate::pipeline::compression::Coding;

/// On a stored encoding: the body it was made from.
const ENCODING_OF: HeaderName = HeaderName::from_static("thruster-encoding-of");

/// Bodies up to this size are checksummed on the runtime thread; larger
/// ones on the blocking pool.
const INLINE_CRC: usize = 64 * 1024;
/// Entries streamed from disk (over `MAX_CACHE_ITEM_SIZE`) up to this size
/// get stored encodings; larger ones (media, archives: rarely compressible)
/// are encoded on the fly if at all, since making one reads the whole body
/// into memory once.
const STREAM_ENCODE_MAX: u64 = 8 << 20;

/// What the disk holds of an encoding of an entry streamed from disk.
pub enum StreamEncoding {
    /// The encoded body, to stream as it is.
    Ready(Box<DiskEntry>),
    /// Encoding does not make it smaller: send identity.
    NotSmaller,
    /// Not made yet (or made for an older body).
    Missing,
}

/// A handle on the disk tier (cheap to clone).
#[derive(Clone)]
pub struct DiskTier {
    store: DiskStore,
    max_item: u64,
    /// Encodings of streamed entries being made now (by record key), so
    /// concurrent hits start one each.
    making: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// `CACHE_RELEASE`, written into every record and compared on reads.
    release: Option<Arc<str>>,
}

/// A response about to be stored, as every record of it describes it.
pub struct Stored<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    pub stored_at_unix_ms: u64,
    pub freshness: &'a Freshness,
    pub file: Option<&'a FileRef>,
}

impl DiskTier {
    /// What the store holds, as far as this process has indexed it.
    pub fn usage(&self) -> (u64, u64) {
        self.store.usage()
    }

    /// The tier `config` asks for (`None` with `CACHE_DISK_PATH=none`).
    /// Touches no file: the directory is made by the first write, so
    /// start-up never waits for the disk and a disk that refuses writes
    /// costs one warning then, not a failed start.
    pub fn open(config: &Config) -> Option<DiskTier> {
        let dir = config.cache_disk_path.as_ref()?;
        Some(DiskTier {
            store: DiskStore::open(dir, config.cache_disk_size, config.cache_disk_max_item_size),
            max_item: config.cache_disk_max_item_size.min(config.cache_disk_size),
            release: config.cache_release.as_deref().map(Arc::from),
            making: Arc::default(),
        })
    }

    /// `CACHE_RELEASE`, if set.
    pub fn release(&self) -> Option<&str> {
        self.release.as_deref()
    }

    pub fn engine(&self) -> &DiskStore {
        &self.store
    }

    /// Whether a body of `len` bytes would be written now.
    pub fn takes(&self, len: u64) -> bool {
        len <= self.max_item && self.store.is_writable()
    }

    /// The request headers `base` varies on, from its vary record; `None`
    /// when there is none (nothing of it is stored here).
    pub async fn vary_names(&self, base: &BaseKey) -> Option<Vec<HeaderName>> {
        let record = self.store.get(&base.vary_record_text()).await?;
        servable(record.meta(), now_unix_ms(), self.release())
            .then(|| key::vary_names(&record.meta().headers))
    }

    /// The entry stored under `key`, if it may answer now.
    pub async fn get(&self, key: &CacheKey) -> Option<DiskEntry> {
        let found = self.store.get(&key.text()).await?;
        servable(found.meta(), now_unix_ms(), self.release()).then_some(found)
    }

    /// The entry stored under `key` even if expired, while `stale-if-error`
    /// still lets it stand in for an error (and of this release, or
    /// immutable). For the error path only; the vary record is read the same
    /// way (it expires with the response that wrote it).
    pub async fn get_for_error(
        &self,
        base: &BaseKey,
        key: Option<&CacheKey>,
        request: &HeaderMap,
    ) -> Option<(CacheKey, DiskEntry)> {
        let now = now_unix_ms();
        let usable = |meta: &EntryMeta| {
            now < meta.usable_until_unix_ms() && same_release(meta, self.release())
        };
        let key = match key {
            Some(key) => key.clone(),
            None => {
                let record = self.store.get(&base.vary_record_text()).await?;
                if !usable(record.meta()) {
                    return None;
                }
                CacheKey::new(
                    base.clone(),
                    &key::vary_names(&record.meta().headers),
                    request,
                )
            }
        };
        let found = self.store.get(&key.text()).await?;
        usable(found.meta()).then_some((key, found))
    }

    /// Starts writing the entry for `key`; push the body, then `finish`.
    /// `None` when the tier takes no writes now (read-only disk, a declared
    /// length over `CACHE_DISK_MAX_ITEM_SIZE`).
    pub fn writer(
        &self,
        key: &CacheKey,
        stored: &Stored<'_>,
        declared_len: Option<u64>,
    ) -> Option<DiskWriter> {
        let meta = meta_for(key.text(), stored, self.release())?;
        self.store.writer(meta, declared_len)
    }

    /// Records which request headers `base` varies on (see the module
    /// docs), expiring with the response that said so.
    pub fn write_vary(
        &self,
        base: &BaseKey,
        vary: &[HeaderName],
        stored_at_unix_ms: u64,
        freshness: &Freshness,
    ) {
        let mut headers = HeaderMap::new();
        let names: Vec<&str> = vary.iter().map(HeaderName::as_str).collect();
        if let Ok(value) = HeaderValue::from_str(&names.join(", ")) {
            if !names.is_empty() {
                headers.insert(header::VARY, value);
            }
        }
        let record = Stored {
            status: StatusCode::OK,
            headers: &headers,
            stored_at_unix_ms,
            freshness,
            file: None,
        };
        if let Some(writer) = meta_for(base.vary_record_text(), &record, self.release())
            .and_then(|meta| self.store.writer(meta, Some(0)))
        {
            // Committed in the background; `flush` waits for it.
            drop(writer.finish());
        }
    }

    /// The stored encoding of `entry`'s body under `text`, when the disk
    /// has one for this very body (`tag`): `Some(None)` when encoding does
    /// not make it smaller.
    async fn stored_encoding(
        &self,
        text: &str,
        entry: &Entry,
        tag: &HeaderValue,
    ) -> Option<Option<Bytes>> {
        let found = self.store.get(text).await?;
        match encodes(found.meta(), tag, entry)? {
            false => Some(None),
            true => found.read_all().await.map(Some),
        }
    }

    /// The stored `coding` encoding of `found`, an entry too large for
    /// memory, streamed from disk like the entry itself. Named by the
    /// entry's receive time and length (reading the body for a checksum,
    /// as memory-sized encodings are named, would cost what the stored
    /// encoding saves): a re-stored entry has another receive time.
    pub async fn stream_encoding(
        &self,
        key: &CacheKey,
        found: &DiskEntry,
        coding: Coding,
    ) -> StreamEncoding {
        match self.store.get(&key.encoded_text(coding.token())).await {
            Some(record) if is_stream_tag_of(record.meta(), found.meta()) => {
                if record.meta().headers.contains_key(header::CONTENT_ENCODING) {
                    StreamEncoding::Ready(Box::new(record))
                } else {
                    StreamEncoding::NotSmaller
                }
            }
            _ => StreamEncoding::Missing,
        }
    }

    /// Makes and stores the `coding` encoding of the entry under `key` (too
    /// large for memory) in the background: read once, encoded at the
    /// level cached variants get, written as an encoding record. At most
    /// one at a time per record; nothing over 8 MiB.
    pub fn make_stream_encoding(&self, key: &CacheKey, meta: &EntryMeta, coding: Coding) {
        let Some(tag) = stream_tag(meta) else {
            return;
        };
        if meta.body_len > STREAM_ENCODE_MAX || meta.file.is_some() {
            return;
        }
        let text = key.encoded_text(coding.token());
        if !lock_set(&self.making).insert(text.clone()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lock_set(&self.making).remove(&text);
            return;
        };
        let (tier, entry_text) = (self.clone(), key.text());
        runtime.spawn(async move {
            let made = async {
                let found = tier.store.get(&entry_text).await?;
                if stream_tag(found.meta()).as_ref() != Some(&tag) {
                    return None; // replaced meanwhile
                }
                let body = found.read_all().await?;
                let entry = entry_from_meta(found.meta(), body, now_unix_ms());
                let encoded = store::encode(&entry, coding).await;
                tier.put_encoding(text.clone(), &entry, coding, tag, encoded.as_ref());
                Some(())
            };
            made.await;
            lock_set(&tier.making).remove(&text);
        });
    }

    fn put_encoding(
        &self,
        text: String,
        entry: &Entry,
        coding: Coding,
        tag: HeaderValue,
        encoded: Option<&Bytes>,
    ) {
        let Some((meta, body)) = encoding_record(text, entry, coding, tag, encoded, self.release())
        else {
            return;
        };
        self.put_record(meta, body);
    }

    /// Writes a record whose body is at most memory-sized.
    fn put_record(&self, meta: EntryMeta, body: Bytes) {
        let Some(mut writer) = self.store.writer(meta, Some(body.len() as u64)) else {
            return;
        };
        // Under the writer's queue limit, so no pacing is needed.
        if writer.push(&body) {
            drop(writer.finish());
        }
    }

    /// Tells the engine's eviction that the records of `key` are in use
    /// (they are being served from memory, so nobody reads their files).
    pub fn touch(&self, key: &CacheKey) {
        self.store.touch(&key.text());
        self.store.touch(&key.base.vary_record_text());
        for coding in Coding::ALL {
            self.store.touch(&key.encoded_text(coding.token()));
        }
    }

    /// Waits for every finished write (and eviction) to reach the disk.
    pub async fn flush(&self) {
        self.store.flush().await
    }
}

/// The tiers below memory, for what memory makes once and keeps: the
/// encodings of an entry's body.
#[derive(Clone, Copy)]
pub struct Below<'a> {
    pub disk: Option<&'a DiskTier>,
    pub shared: Option<&'a SharedTier>,
    pub release: Option<&'a str>,
}

/// `entry`'s body encoded with `coding`, for the memory tier to keep: the
/// stored encoding of this very body from the disk, else from Redis (an
/// instance that made it before), else made now (on the blocking pool) and
/// stored in both (Redis after the response, in the background). `None`
/// when encoding does not make it smaller.
pub async fn encoding(
    below: Below<'_>,
    key: &CacheKey,
    entry: &Entry,
    coding: Coding,
) -> Option<Bytes> {
    if below.disk.is_none() && below.shared.is_none() {
        return store::encode(entry, coding).await;
    }
    let Some(tag) = body_tag(entry).await else {
        return store::encode(entry, coding).await;
    };
    let text = key.encoded_text(coding.token());
    if let Some(disk) = below.disk {
        if let Some(found) = disk.stored_encoding(&text, entry, &tag).await {
            return found;
        }
    }
    if let Some(shared) = below.shared {
        if let Some((meta, body)) = shared.get(&text).await {
            if let Some(encoded) = encodes(&meta, &tag, entry) {
                let found = encoded.then_some(body);
                if let Some(disk) = below.disk {
                    disk.put_encoding(text, entry, coding, tag, found.as_ref());
                }
                return found;
            }
        }
    }
    let made = store::encode(entry, coding).await;
    if let Some(disk) = below.disk {
        disk.put_encoding(text.clone(), entry, coding, tag.clone(), made.as_ref());
    }
    if let Some(shared) = below.shared {
        if let Some((meta, body)) =
            encoding_record(text, entry, coding, tag, made.as_ref(), below.release)
        {
            // A skipped write only costs another instance the encoding.
            let _ = shared.put(meta, body);
        }
    }
    made
}

/// What an encoding record (`record`, the metadata of one) says of
/// `entry`'s body: `None` when it is not for this very body (`tag`) or is
/// no smaller, so useless; `Some(false)` when encoding does not make the
/// body smaller; `Some(true)` when its body is the encoding.
fn encodes(record: &EntryMeta, tag: &HeaderValue, entry: &Entry) -> Option<bool> {
    if record.headers.get(&ENCODING_OF) != Some(tag) {
        return None;
    }
    if !record.headers.contains_key(header::CONTENT_ENCODING) {
        return Some(false);
    }
    (record.body_len < entry.body.len() as u64).then_some(true)
}

/// The record that keeps `encoded` (`None`: encoding does not make it
/// smaller) as the `coding` encoding of the body `tag` names.
fn encoding_record(
    text: String,
    entry: &Entry,
    coding: Coding,
    tag: HeaderValue,
    encoded: Option<&Bytes>,
    release: Option<&str>,
) -> Option<(EntryMeta, Bytes)> {
    let mut headers = HeaderMap::new();
    headers.insert(ENCODING_OF, tag);
    if encoded.is_some() {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(coding.token()),
        );
    }
    let record = Stored {
        status: entry.status,
        headers: &headers,
        stored_at_unix_ms: entry.stored_at_unix_ms,
        freshness: &entry.freshness,
        file: None,
    };
    let body = encoded.cloned().unwrap_or_default();
    let mut meta = meta_for(text, &record, release)?;
    meta.body_len = body.len() as u64;
    Some((meta, body))
}

/// Whether a stored record (disk or shared tier) may answer now: fresh,
/// and — with `CACHE_RELEASE` set — stored under this release or
/// `immutable` (fingerprinted assets are the same bytes in every release;
/// anything else from another release may be the old release's page).
/// Expired entries are not served from disk (stale-if-error is the memory
/// tier's alone). Purges are checked by the caller, which knows the
/// request target (`purges.rs`).
pub fn servable(meta: &EntryMeta, now_unix_ms: u64, release: Option<&str>) -> bool {
    now_unix_ms < meta.fresh_until_unix_ms() && same_release(meta, release)
}

/// The `CACHE_RELEASE` rule alone (see [`servable`]).
pub fn same_release(meta: &EntryMeta, release: Option<&str>) -> bool {
    match release {
        None => true,
        Some(current) => meta.immutable || meta.release.as_deref() == Some(current),
    }
}

/// The stored form of a response under `key` (body length filled in by
/// the writer). `None` for a file whose modification time cannot be
/// written (before 1970).
pub fn meta_for(key: String, stored: &Stored<'_>, release: Option<&str>) -> Option<EntryMeta> {
    let file = match stored.file {
        None => None,
        Some(file) => Some(StoredFile {
            path: file.path.clone(),
            len: file.len,
            modified_unix_ns: u64::try_from(
                file.modified.duration_since(UNIX_EPOCH).ok()?.as_nanos(),
            )
            .ok()?,
        }),
    };
    let f = stored.freshness;
    Some(EntryMeta {
        key,
        status: stored.status,
        headers: stored.headers.clone(),
        stored_at_unix_ms: stored.stored_at_unix_ms,
        initial_age_secs: f.initial_age.as_secs(),
        lifetime_secs: f.lifetime.as_secs(),
        stale_if_error_secs: f.stale_if_error.as_secs(),
        immutable: f.immutable,
        release: release.map(str::to_owned),
        file,
        body_len: 0,
    })
}

/// A memory entry for a stored record and its body (promotion). Its age
/// counts the time it spent stored, restarts included.
pub fn entry_from_meta(meta: &EntryMeta, body: Bytes, now_unix_ms: u64) -> Entry {
    let freshness = Freshness {
        lifetime: Duration::from_secs(meta.lifetime_secs),
        initial_age: Duration::from_secs(meta.initial_age_secs),
        stale_if_error: Duration::from_secs(meta.stale_if_error_secs),
        immutable: meta.immutable,
    };
    let resident = Duration::from_millis(now_unix_ms.saturating_sub(meta.stored_at_unix_ms));
    let entry = Entry::new(meta.status, meta.headers.clone(), body, freshness)
        .received_earlier(meta.stored_at_unix_ms, resident);
    match &meta.file {
        Some(file) => entry.with_file(FileRef {
            path: file.path.clone(),
            len: file.len,
            modified: SystemTime::UNIX_EPOCH + Duration::from_nanos(file.modified_unix_ns),
        }),
        None => entry,
    }
}

fn lock_set(
    set: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `record` is an encoding of the body of `meta`'s entry: its tag
/// is `stream_tag(meta)`, compared without building it (once per hit).
fn is_stream_tag_of(record: &EntryMeta, meta: &EntryMeta) -> bool {
    let Some(tag) = record.headers.get(&ENCODING_OF) else {
        return false;
    };
    let mut parts = tag.as_bytes().split(|&b| b == b':');
    let number = |part: Option<&[u8]>| {
        part.and_then(|p| std::str::from_utf8(p).ok())
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u64>().ok())
    };
    number(parts.next()) == Some(meta.stored_at_unix_ms)
        && number(parts.next()) == Some(meta.body_len)
        && parts.next() == Some(b"stream")
        && parts.next().is_none()
}

/// Names the body of an entry streamed from disk (see `stream_encoding`).
fn stream_tag(meta: &EntryMeta) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{}:{}:stream",
        meta.stored_at_unix_ms, meta.body_len
    ))
    .ok()
}

/// Names an entry's body: receive time, length and CRC-32. `None` if the
/// checksum task could not run (the runtime is shutting down).
async fn body_tag(entry: &Entry) -> Option<HeaderValue> {
    let crc = |body: &[u8]| {
        let mut crc = flate2::Crc::new();
        crc.update(body);
        crc.sum()
    };
    let body = entry.body.clone();
    let sum = if body.len() <= INLINE_CRC {
        crc(&body)
    } else {
        tokio::task::spawn_blocking(move || crc(&body)).await.ok()?
    };
    let text = format!("{}:{}:{sum:08x}", entry.stored_at_unix_ms, entry.body.len());
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(dir: &std::path::Path) -> DiskTier {
        DiskTier {
            store: DiskStore::open(dir, 64 << 20, 16 << 20),
            max_item: 16 << 20,
            release: None,
            making: Arc::default(),
        }
    }

    use super::super::key::test_base as base;

    fn freshness(lifetime: u64) -> Freshness {
        Freshness {
            lifetime: Duration::from_secs(lifetime),
            initial_age: Duration::from_secs(2),
            stale_if_error: Duration::ZERO,
            immutable: false,
        }
    }

    async fn write(
        tier: &DiskTier,
        key: &CacheKey,
        body: &[u8],
        stored_at_unix_ms: u64,
        f: &Freshness,
    ) {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/css"));
        let stored = Stored {
            status: StatusCode::OK,
            headers: &headers,
            stored_at_unix_ms,
            freshness: f,
            file: None,
        };
        let mut w = tier.writer(key, &stored, Some(body.len() as u64)).unwrap();
        assert!(w.push(body));
        w.finish().await.unwrap();
        tier.write_vary(&key.base, &[], stored_at_unix_ms, f);
        tier.flush().await;
    }

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("thruster-tier-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Dir(dir)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn an_entry_comes_back_with_its_age_and_expired_ones_do_not() {
        let dir = Dir::new("age");
        let key = CacheKey::new(base("/a.css"), &[], &HeaderMap::new());
        let ten_s_ago = now_unix_ms() - 10_000;
        write(&tier(&dir.0), &key, b"body", ten_s_ago, &freshness(60)).await;
        // Another handle on the directory: a restarted process.
        let tier = tier(&dir.0);
        let found = tier.get(&key).await.expect("stored");
        let body = found.read_all().await.unwrap();
        let entry = entry_from_meta(found.meta(), body, now_unix_ms());
        assert_eq!(entry.body, "body");
        assert_eq!(entry.stored_at_unix_ms, ten_s_ago);
        // 2 s it came with + 10 s stored.
        let age = entry.age(std::time::Instant::now()).as_secs();
        assert!((12..=13).contains(&age), "age {age}");
        assert_eq!(tier.vary_names(&key.base).await, Some(vec![]));

        let old = CacheKey::new(base("/old.css"), &[], &HeaderMap::new());
        write(&tier, &old, b"old", now_unix_ms() - 70_000, &freshness(60)).await;
        assert!(tier.get(&old).await.is_none(), "expired");
        assert!(tier.vary_names(&old.base).await.is_none(), "expired");
    }

    #[tokio::test]
    async fn a_new_process_finds_variants_through_the_vary_record() {
        let dir = Dir::new("vary");
        let names = vec![header::ACCEPT];
        let mut html = HeaderMap::new();
        html.insert("accept", HeaderValue::from_static("text/html"));
        let key = CacheKey::new(base("/page"), &names, &html);
        {
            let tier = tier(&dir.0);
            let headers = HeaderMap::new();
            let f = freshness(60);
            let stored = Stored {
                status: StatusCode::OK,
                headers: &headers,
                stored_at_unix_ms: now_unix_ms(),
                freshness: &f,
                file: None,
            };
            let mut w = tier.writer(&key, &stored, None).unwrap();
            assert!(w.push(b"<html>"));
            w.finish().await.unwrap();
            tier.write_vary(&key.base, &names, stored.stored_at_unix_ms, &f);
            tier.flush().await;
        }
        let tier = tier(&dir.0);
        // Without a rule, the no-Vary key finds nothing...
        let plain = CacheKey::new(base("/page"), &[], &html);
        assert!(tier.get(&plain).await.is_none());
        // ...the record names the headers, and they select the variant.
        let found = tier.vary_names(&base("/page")).await.expect("record");
        assert_eq!(found, names);
        let entry = tier
            .get(&CacheKey::new(base("/page"), &found, &html))
            .await
            .expect("variant");
        assert_eq!(entry.read_all().await.unwrap(), "<html>");
        let mut json = HeaderMap::new();
        json.insert("accept", HeaderValue::from_static("application/json"));
        assert!(tier
            .get(&CacheKey::new(base("/page"), &found, &json))
            .await
            .is_none());
    }

    #[tokio::test]
    async fn encodings_are_made_once_and_only_for_their_own_body() {
        let dir = Dir::new("enc");
        let key = CacheKey::new(base("/e.css"), &[], &HeaderMap::new());
        let body = Bytes::from("body { color: red; }\n".repeat(400));
        let entry = Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            body.clone(),
            freshness(60),
        );
        let first = tier(&dir.0);
        let made = first
            .encoding_for_test(&key, &entry, Coding::Gzip)
            .await
            .expect("smaller");
        first.flush().await;
        // Plant a different "encoding" for the same body: a later process
        // must take what is stored (proof that it does not compress again).
        let tier = tier(&dir.0);
        let tag = body_tag(&entry).await.unwrap();
        tier.put_encoding(
            key.encoded_text("gzip"),
            &entry,
            Coding::Gzip,
            tag,
            Some(&Bytes::from_static(b"planted")),
        );
        tier.flush().await;
        assert_eq!(
            tier.encoding_for_test(&key, &entry, Coding::Gzip)
                .await
                .unwrap(),
            "planted"
        );
        // The same key re-stored with another body (another receive time):
        // the stored encoding is not its own; it is made again.
        let mut restored = Entry::new(StatusCode::OK, HeaderMap::new(), body, freshness(60));
        restored.stored_at_unix_ms = entry.stored_at_unix_ms + 1;
        let again = tier
            .encoding_for_test(&key, &restored, Coding::Gzip)
            .await
            .unwrap();
        assert_eq!(again, made);
        // "Not smaller" is remembered too.
        let tiny = Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"x"),
            freshness(60),
        );
        assert!(tier
            .encoding_for_test(&key, &tiny, Coding::Brotli)
            .await
            .is_none());
        tier.flush().await;
        let stored = tier.engine().get(&key.encoded_text("br")).await.unwrap();
        assert_eq!(stored.meta().body_len, 0);
        assert!(!stored.meta().headers.contains_key("content-encoding"));
    }

    impl DiskTier {
        async fn encoding_for_test(
            &self,
            key: &CacheKey,
            entry: &Entry,
            coding: Coding,
        ) -> Option<Bytes> {
            let below = Below {
                disk: Some(self),
                shared: None,
                release: None,
            };
            encoding(below, key, entry, coding).await
        }
    }

    #[test]
    fn stream_tags_are_recognised_without_being_built() {
        let headers = HeaderMap::new();
        let f = freshness(60);
        let stored = Stored {
            status: StatusCode::OK,
            headers: &headers,
            stored_at_unix_ms: now_unix_ms(),
            freshness: &f,
            file: None,
        };
        let mut meta = meta_for("entry\0k".into(), &stored, None).unwrap();
        meta.body_len = 123_456;
        let mut record = meta.clone();
        let tagged = |record: &mut EntryMeta, tag: &str| {
            record
                .headers
                .insert(ENCODING_OF, HeaderValue::from_str(tag).unwrap());
        };
        tagged(&mut record, stream_tag(&meta).unwrap().to_str().unwrap());
        assert!(is_stream_tag_of(&record, &meta));
        let (at, len) = (meta.stored_at_unix_ms, meta.body_len);
        for wrong in [
            format!("{}:{len}:stream", at + 1),
            format!("{at}:{}:stream", len + 1),
            format!("{at}:{len}:streams"),
            format!("{at}:{len}:stream:"),
            format!("{at}:{len}:1a2b3c4d"),
            format!("+{at}:{len}:stream"),
        ] {
            tagged(&mut record, &wrong);
            assert!(!is_stream_tag_of(&record, &meta), "{wrong}");
        }
        record.headers.remove(&ENCODING_OF);
        assert!(!is_stream_tag_of(&record, &meta));
    }

    #[test]
    fn another_release_is_servable_only_when_immutable() {
        let headers = HeaderMap::new();
        let stored_at = now_unix_ms();
        let meta = |immutable: bool, release: Option<&str>| {
            let mut f = freshness(60);
            f.immutable = immutable;
            meta_for(
                "k".into(),
                &Stored {
                    status: StatusCode::OK,
                    headers: &headers,
                    stored_at_unix_ms: stored_at,
                    freshness: &f,
                    file: None,
                },
                release,
            )
            .unwrap()
        };
        let now = stored_at + 1;
        // Not tracked: everything fresh is servable.
        assert!(servable(&meta(false, None), now, None));
        assert!(servable(&meta(false, Some("v1")), now, None));
        // Tracked: the same release, or immutable.
        assert!(servable(&meta(false, Some("v2")), now, Some("v2")));
        assert!(!servable(&meta(false, Some("v1")), now, Some("v2")));
        assert!(!servable(&meta(false, None), now, Some("v2")));
        assert!(servable(&meta(true, Some("v1")), now, Some("v2")));
        assert!(servable(&meta(true, None), now, Some("v2")));
        // Expired is never servable.
        assert!(!servable(
            &meta(true, Some("v2")),
            stored_at + 61_000,
            Some("v2")
        ));
    }

    #[test]
    fn x_sendfile_references_round_trip() {
        let file = FileRef {
            path: "/srv/app/public/a.pdf".into(),
            len: 1234,
            modified: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
        };
        let headers = HeaderMap::new();
        let f = freshness(60);
        let meta = meta_for(
            "k".into(),
            &Stored {
                status: StatusCode::OK,
                headers: &headers,
                stored_at_unix_ms: now_unix_ms(),
                freshness: &f,
                file: Some(&file),
            },
            None,
        )
        .unwrap();
        let entry = entry_from_meta(&meta, Bytes::new(), now_unix_ms());
        assert_eq!(entry.file, Some(file));
    }
}
