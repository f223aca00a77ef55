//! The in-memory store: byte-weighted entries in `quick_cache` (its
//! S3-FIFO-style admission keeps one-off scans from flushing the hot set),
//! per-resource rules (which headers it varies on, or "do not coalesce"),
//! and the in-flight table that makes concurrent misses share one upstream
//! request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use tokio::sync::{watch, OnceCell};

use super::directives::Freshness;
use super::key::{BaseKey, CacheKey};
use crate::pipeline::compression::{self, Coding};

/// Encoded forms of an entry's body, made once on first demand and shared
/// by every later hit. `None` inside a cell: encoding did not make it smaller.
#[derive(Default)]
struct Variants {
    cells: [OnceCell<Option<Bytes>>; 3],
}

fn slot(coding: Coding) -> usize {
    match coding {
        Coding::Brotli => 0,
        Coding::Zstd => 1,
        Coding::Gzip => 2,
    }
}

/// A stored response. Immutable once stored, except its variants.
pub struct Entry {
    pub status: StatusCode,
    /// Upstream headers minus hop-by-hop fields, `Age` and `X-Cache`.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored_at: Instant,
    /// Wall-clock time the response was received (Unix ms), as lower tiers
    /// store it: `Age` survives a restart, and a stored encoding names the
    /// body it encodes by it.
    pub stored_at_unix_ms: u64,
    pub freshness: Freshness,
    /// For an X-Sendfile response: the file as it was when stored. The
    /// entry is only good while the file is unchanged.
    pub file: Option<FileRef>,
    variants: Arc<Variants>,
    /// When a hit last told the lower tiers this entry is in use (Unix s),
    /// so their eviction sees what is hot here without a write per hit.
    touched: Arc<AtomicU64>,
    /// Fixed at construction: quick_cache needs a stable weight.
    weight: u64,
}

impl Entry {
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, freshness: Freshness) -> Entry {
        let mut entry = Entry {
            status,
            headers,
            body,
            stored_at: Instant::now(),
            stored_at_unix_ms: super::entry::now_unix_ms(),
            freshness,
            file: None,
            variants: Arc::default(),
            // Just received: the lower tiers were told as it was stored.
            touched: Arc::new(AtomicU64::new(super::entry::now_unix_ms() / 1000)),
            weight: 0,
        };
        entry.weight = entry.measure();
        entry
    }

    pub fn with_file(mut self, file: FileRef) -> Entry {
        self.file = Some(file);
        self
    }

    /// An entry received `resident` ago at wall-clock `stored_at_unix_ms`
    /// (one found in a lower tier): its age counts the time it spent there.
    pub fn received_earlier(mut self, stored_at_unix_ms: u64, resident: Duration) -> Entry {
        self.stored_at_unix_ms = stored_at_unix_ms;
        match self.stored_at.checked_sub(resident) {
            Some(then) => self.stored_at = then,
            // The monotonic clock does not reach back that far (the host
            // booted since): count the time as age the entry came with.
            None => self.freshness.initial_age += resident,
        }
        self
    }

    /// True at most once a minute: time to tell the lower tiers this entry
    /// is still being served.
    pub fn due_for_touch(&self, now_unix_secs: u64) -> bool {
        let last = self.touched.load(Ordering::Relaxed);
        now_unix_secs >= last.saturating_add(60)
            && self
                .touched
                .compare_exchange(last, now_unix_secs, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn measure(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let variants: usize = self
            .variants
            .cells
            .iter()
            .filter_map(|c| c.get().and_then(|v| v.as_ref()).map(Bytes::len))
            .sum();
        (self.body.len() + variants + headers + 256) as u64
    }

    /// RFC 9111 §4.2.3: current age = corrected initial age + resident time.
    pub fn age(&self, now: Instant) -> Duration {
        self.freshness.initial_age + now.saturating_duration_since(self.stored_at)
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.freshness.lifetime
    }

    /// RFC 5861 §4: may stand in for an error response.
    pub fn usable_on_error(&self, now: Instant) -> bool {
        self.age(now) < self.freshness.lifetime + self.freshness.stale_if_error
    }

    fn usable_at_all(&self, now: Instant) -> bool {
        self.is_fresh(now) || self.usable_on_error(now)
    }
}

/// Identity of a file on disk, enough to notice it was replaced or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub path: std::path::PathBuf,
    pub len: u64,
    pub modified: std::time::SystemTime,
}

impl FileRef {
    pub fn stat(path: std::path::PathBuf) -> Option<FileRef> {
        let meta = std::fs::metadata(&path).ok()?;
        Some(FileRef {
            len: meta.len(),
            modified: meta.modified().ok()?,
            path,
        })
    }

    /// Whether the file is still the one we stored a response for.
    pub fn unchanged(&self) -> bool {
        FileRef::stat(self.path.clone()).as_ref() == Some(self)
    }
}

#[derive(Clone)]
struct EntryWeighter;

impl Weighter<CacheKey, Arc<Entry>> for EntryWeighter {
    fn weight(&self, _key: &CacheKey, entry: &Arc<Entry>) -> u64 {
        entry.weight
    }
}

/// What we know about a resource independent of its variants.
#[derive(Clone)]
enum Rule {
    /// Stored; these are the request headers it varies on.
    Vary(Arc<[HeaderName]>),
    /// Recently not storable: concurrent requests go upstream side by side
    /// instead of queueing behind each other (Varnish calls it hit-for-miss).
    Pass(Instant),
}

/// How long a "not storable" verdict stops coalescing for its resource.
const PASS_FOR: Duration = Duration::from_secs(30);

pub enum Lookup {
    Hit(Arc<Entry>),
    Miss {
        key: CacheKey,
        /// A stale entry that may answer instead of an upstream error.
        stale: Option<Arc<Entry>>,
        /// Whether to queue behind an in-flight request for the same key.
        coalesce: bool,
        /// What this process knows of the resource, which tells a lower
        /// tier whether (and by which key) to look.
        known: Known,
    },
}

/// What the memory tier's rule says about a resource on a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// No rule: the resource was not seen (or its rule was evicted). A
    /// lower tier must first find out which headers it varies on.
    Nothing,
    /// Stored before with the `Vary` the miss's key already follows.
    Stored,
    /// Recently not storable: not worth a look in a lower tier.
    Passed,
}

/// Whose turn it is to ask upstream.
pub enum Turn {
    Lead(LeaderGuard),
    /// Another request for the key finished (or the wait timed out): look again.
    Waited,
}

pub struct Store {
    entries: Cache<CacheKey, Arc<Entry>, EntryWeighter>,
    rules: Cache<BaseKey, Rule>,
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<()>>>,
    pub max_item_size: u64,
    pub stale_if_error: Duration,
}

impl Store {
    pub fn new(capacity: u64, max_item_size: u64, stale_if_error: Duration) -> Store {
        // quick_cache splits its budget across shards and refuses an item
        // heavier than one shard; keep the largest item at most a quarter of
        // a shard.
        let mut shards = 8usize;
        while shards > 1 && capacity / (shards as u64) < max_item_size.saturating_mul(4) {
            shards /= 2;
        }
        let estimated_items = (capacity / 16_384).clamp(16, 1 << 20) as usize;
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(estimated_items)
            .weight_capacity(capacity)
            .build()
            .expect("shards, items and weight are set");
        Store {
            entries: Cache::with_options(
                options,
                EntryWeighter,
                Default::default(),
                Default::default(),
            ),
            rules: Cache::new(estimated_items * 2),
            inflight: Mutex::new(HashMap::new()),
            max_item_size: max_item_size.min(capacity),
            stale_if_error,
        }
    }

    pub fn lookup(&self, base: BaseKey, request: &HeaderMap) -> Lookup {
        let now = Instant::now();
        match self.rules.get(&base) {
            None => Lookup::Miss {
                key: CacheKey::new(base, &[], request),
                stale: None,
                coalesce: true,
                known: Known::Nothing,
            },
            Some(Rule::Pass(until)) => Lookup::Miss {
                key: CacheKey::new(base, &[], request),
                stale: None,
                coalesce: now >= until,
                known: Known::Passed,
            },
            Some(Rule::Vary(names)) => {
                let key = CacheKey::new(base, &names, request);
                match self.entries.get(&key) {
                    Some(entry) if entry.is_fresh(now) => Lookup::Hit(entry),
                    Some(entry) if entry.usable_at_all(now) => Lookup::Miss {
                        key,
                        stale: Some(entry),
                        coalesce: true,
                        known: Known::Stored,
                    },
                    Some(_) => {
                        self.entries.remove(&key);
                        Lookup::Miss {
                            key,
                            stale: None,
                            coalesce: true,
                            known: Known::Stored,
                        }
                    }
                    None => Lookup::Miss {
                        key,
                        stale: None,
                        coalesce: true,
                        known: Known::Stored,
                    },
                }
            }
        }
    }

    /// Leads the upstream request for `key`, or waits (at most `limit`) for
    /// the request already leading it.
    pub async fn wait_or_lead(self: &Arc<Self>, key: &CacheKey, limit: Duration) -> Turn {
        let mut waiting = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(());
                    inflight.insert(key.clone(), rx);
                    return Turn::Lead(LeaderGuard {
                        store: Arc::clone(self),
                        key: key.clone(),
                        _done: tx,
                    });
                }
            }
        };
        // The sender is dropped when the leader is done, which ends the wait.
        let _ = tokio::time::timeout(limit, waiting.changed()).await;
        Turn::Waited
    }

    /// Stores a complete response under the key derived from its `Vary`
    /// (unless its body is over the item limit), and returns it shared.
    pub fn insert(
        &self,
        base: BaseKey,
        vary: Vec<HeaderName>,
        request: &HeaderMap,
        entry: Entry,
    ) -> Arc<Entry> {
        let entry = Arc::new(entry);
        if entry.body.len() as u64 > self.max_item_size {
            return entry;
        }
        let key = CacheKey::new(base.clone(), &vary, request);
        self.rules.insert(base, Rule::Vary(vary.into()));
        self.entries.insert(key, Arc::clone(&entry));
        entry
    }

    /// Remembers which headers a resource varies on when only a lower tier
    /// holds it (a body too large for memory, or a rule read from disk), so
    /// later misses look there by the right key at once.
    pub fn note_vary(&self, base: BaseKey, vary: &[HeaderName]) {
        let same = matches!(self.rules.get(&base), Some(Rule::Vary(names)) if *names == *vary);
        if !same {
            self.rules.insert(base, Rule::Vary(vary.into()));
        }
    }

    pub fn remove(&self, key: &CacheKey) {
        self.entries.remove(key);
    }

    /// Remembers that a resource was not storable, so its requests stop
    /// queueing behind each other for a while.
    pub fn pass(&self, base: BaseKey) {
        if !matches!(self.rules.get(&base), Some(Rule::Vary(_))) {
            self.rules
                .insert(base, Rule::Pass(Instant::now() + PASS_FOR));
        }
    }

    /// The body encoded with `coding`, obtained once per entry from `make`
    /// (a lower tier's stored copy, or [`encode`]) and shared by every later
    /// hit. `None` when encoding does not make it smaller.
    pub async fn variant<F>(
        &self,
        key: &CacheKey,
        entry: &Arc<Entry>,
        coding: Coding,
        make: F,
    ) -> Option<Bytes>
    where
        F: Future<Output = Option<Bytes>>,
    {
        let cell = &entry.variants.cells[slot(coding)];
        let mut made_here = false;
        let result = cell
            .get_or_init(|| {
                made_here = true;
                make
            })
            .await
            .clone();
        if made_here {
            // Re-insert with the new weight so the budget counts the variant.
            let reweighed = Entry {
                status: entry.status,
                headers: entry.headers.clone(),
                body: entry.body.clone(),
                stored_at: entry.stored_at,
                stored_at_unix_ms: entry.stored_at_unix_ms,
                freshness: entry.freshness,
                file: entry.file.clone(),
                variants: Arc::clone(&entry.variants),
                touched: Arc::clone(&entry.touched),
                weight: 0,
            };
            let mut reweighed = reweighed;
            reweighed.weight = reweighed.measure();
            let _ = self.entries.replace(key.clone(), Arc::new(reweighed), true);
        }
        result
    }

    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The entry's body encoded with `coding`, made on a blocking thread at a
/// high level (the cost is paid once per entry, not per hit). `None` when
/// encoding does not make it smaller.
pub async fn encode(entry: &Entry, coding: Coding) -> Option<Bytes> {
    let body = entry.body.clone();
    let immutable = entry.freshness.immutable;
    let encoded = tokio::task::spawn_blocking(move || {
        compression::compress_stored(&body, coding, immutable)
            .ok()
            .filter(|encoded| encoded.len() < body.len())
            .map(Bytes::from)
    })
    .await
    .ok()
    .flatten();
    // The high levels' code and tables are used by nothing else.
    crate::sys::code_pages::release_after_rare_work();
    encoded
}

/// Held by the request that asks upstream on behalf of everyone waiting
/// for the same key. Dropping it (stored, not storable, failed, client
/// gone) releases the waiters.
pub struct LeaderGuard {
    store: Arc<Store>,
    key: CacheKey,
    _done: watch::Sender<()>,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.store.inflight.lock() {
            inflight.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freshness(lifetime: u64, sie: u64) -> Freshness {
        Freshness {
            lifetime: Duration::from_secs(lifetime),
            initial_age: Duration::ZERO,
            stale_if_error: Duration::from_secs(sie),
            immutable: false,
        }
    }

    use super::super::key::test_base as base;

    #[test]
    fn stores_and_finds_by_variant() {
        let store = Store::new(1 << 20, 1 << 16, Duration::ZERO);
        let mut req = HeaderMap::new();
        req.insert("accept", "text/html".parse().unwrap());
        let entry = Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"html"),
            freshness(60, 0),
        );
        store.insert(base("/a"), vec![http::header::ACCEPT], &req, entry);
        assert!(matches!(store.lookup(base("/a"), &req), Lookup::Hit(e) if e.body == "html"));
        let mut other = HeaderMap::new();
        other.insert("accept", "application/json".parse().unwrap());
        assert!(matches!(
            store.lookup(base("/a"), &other),
            Lookup::Miss { stale: None, .. }
        ));
        assert!(matches!(
            store.lookup(base("/b"), &req),
            Lookup::Miss { .. }
        ));
    }

    #[test]
    fn stale_entries_only_stand_in_for_errors() {
        let store = Store::new(1 << 20, 1 << 16, Duration::ZERO);
        let req = HeaderMap::new();
        let mut f = freshness(10, 60);
        f.initial_age = Duration::from_secs(30); // already 20 s stale
        store.insert(
            base("/s"),
            vec![],
            &req,
            Entry::new(StatusCode::OK, HeaderMap::new(), Bytes::new(), f),
        );
        assert!(matches!(
            store.lookup(base("/s"), &req),
            Lookup::Miss { stale: Some(_), .. }
        ));
        let mut f = freshness(10, 5);
        f.initial_age = Duration::from_secs(30); // past stale-if-error too
        store.insert(
            base("/t"),
            vec![],
            &req,
            Entry::new(StatusCode::OK, HeaderMap::new(), Bytes::new(), f),
        );
        assert!(matches!(
            store.lookup(base("/t"), &req),
            Lookup::Miss { stale: None, .. }
        ));
    }

    #[test]
    fn oversized_items_are_not_stored_and_budget_is_kept() {
        let store = Store::new(200_000, 10_000, Duration::ZERO);
        let req = HeaderMap::new();
        let big = Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; 10_001]),
            freshness(60, 0),
        );
        store.insert(base("/big"), vec![], &req, big);
        assert!(store.is_empty());
        for i in 0..100 {
            let e = Entry::new(
                StatusCode::OK,
                HeaderMap::new(),
                Bytes::from(vec![b'x'; 9_000]),
                freshness(60, 0),
            );
            store.insert(base(&format!("/{i}")), vec![], &req, e);
        }
        assert!(store.weight() <= 200_000, "weight {}", store.weight());
        assert!(store.len() >= 10, "kept {}", store.len());
    }

    #[tokio::test]
    async fn one_leader_per_key_waiters_released_on_drop() {
        let store = Arc::new(Store::new(1 << 20, 1 << 16, Duration::ZERO));
        let key = CacheKey::new(base("/c"), &[], &HeaderMap::new());
        let Turn::Lead(guard) = store.wait_or_lead(&key, Duration::from_secs(5)).await else {
            panic!("first request leads");
        };
        let waiter = {
            let store = Arc::clone(&store);
            let key = key.clone();
            tokio::spawn(async move { store.wait_or_lead(&key, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        let turn = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(turn, Turn::Waited));
        // The slot is free again.
        assert!(matches!(
            store.wait_or_lead(&key, Duration::from_secs(1)).await,
            Turn::Lead(_)
        ));
    }

    /// Making a stored variant runs encoders nothing else runs, and says
    /// so: the code pages are released once such work settles
    /// (sys::code_pages; when is its `Settle`'s test).
    #[tokio::test]
    async fn making_a_variant_reports_rare_work() {
        use crate::sys::code_pages::rare_work_reported;
        let body = Bytes::from("body { color: red; }\n".repeat(500));
        let entry = Entry::new(StatusCode::OK, HeaderMap::new(), body, freshness(60, 0));
        let before = rare_work_reported();
        assert!(encode(&entry, Coding::Gzip).await.is_some());
        assert!(rare_work_reported() > before, "reported after the fill");
    }

    #[tokio::test]
    async fn variants_are_made_once_and_counted() {
        let store = Store::new(1 << 22, 1 << 20, Duration::ZERO);
        let req = HeaderMap::new();
        let body = Bytes::from("body { color: red; }\n".repeat(500));
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "text/css".parse().unwrap());
        store.insert(
            base("/v.css"),
            vec![],
            &req,
            Entry::new(StatusCode::OK, headers, body.clone(), freshness(60, 0)),
        );
        let Lookup::Hit(entry) = store.lookup(base("/v.css"), &req) else {
            panic!("stored")
        };
        let before = store.weight();
        let key = CacheKey::new(base("/v.css"), &[], &req);
        let gz = store
            .variant(&key, &entry, Coding::Gzip, encode(&entry, Coding::Gzip))
            .await
            .expect("smaller");
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut decoded)
            .unwrap();
        assert_eq!(decoded, body);
        assert!(store.weight() > before, "variant counted in the budget");
        // The second call returns the same bytes without re-encoding.
        let Lookup::Hit(entry) = store.lookup(base("/v.css"), &req) else {
            panic!("still stored")
        };
        // A second `make` is never run (it would answer None).
        let again = store
            .variant(&key, &entry, Coding::Gzip, std::future::ready(None))
            .await
            .unwrap();
        assert_eq!(again.as_ptr(), gz.as_ptr());
    }
}
