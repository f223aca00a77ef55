//! The HTTP cache layer (RFC 9111, shared cache). It sits outside
//! compression: entries keep the app's identity bytes plus encoded variants
//! made once, so a hit costs no compression CPU (Thruster stores identity
//! bytes and recompresses on every hit).
//!
//! Per request: GET/HEAD look up; a fresh entry answers (304 and 206
//! included); a miss for a GET leads or joins the single upstream request
//! for its key; the response is streamed to the client while it is captured,
//! and stored only once it is complete. Other methods, upgrades and Range
//! misses bypass the cache.
//!
//! Tiers, fastest first: memory (`store`), then disk (`tier` on the `disk`
//! engine), then the app (`next`). A memory miss asks the disk (by the full
//! key; a process without a memory rule for the resource reads its vary
//! record first). A disk hit that fits `MAX_CACHE_ITEM_SIZE` is promoted
//! into memory and served from there; a larger one is streamed from its
//! file (a Range request reads only the chunks it needs). Every storable response up
//! to `CACHE_DISK_MAX_ITEM_SIZE` is written to disk as it streams to the
//! client, whatever memory admits; encodings made for memory hits are
//! written there too. The shared tier (Redis, `shared/`) goes between disk
//! and the app with the same shape: looked up on a disk miss (bounded by
//! `CACHE_REDIS_TIMEOUT_MS`), promoted into memory and written to disk
//! through `tier::entry_from_meta`, and sent what memory stores once the
//! response is complete (never X-Sendfile references, which are
//! host-local).
//!
//! Every hit, in every tier, is checked against the purge records
//! (`purges.rs`) by the time it was stored; lower tiers' hits also against
//! `CACHE_RELEASE` (`tier::servable`).

pub mod directives;
pub mod disk;
pub mod entry;
mod hit;
pub mod key;
pub mod purges;
pub mod shared;
pub mod store;
pub mod tier;
mod usage;

use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::compression::{self, RequestFacts};
use super::forward::Forwarder;
use super::ConnInfo;
use crate::http::{BoxError, RequestBody, ResponseBody, X_CACHE};
use crate::log;
use directives::Freshness;
use disk::{DiskEntry, DiskWriter};
use entry::now_unix_ms;
use key::BaseKey;
use purges::Purges;
use shared::{SharedConfigError, SharedOptions, SharedTier};
use store::{Entry, Known, LeaderGuard, Lookup, Store, Turn};
use tier::{DiskTier, Stored};

/// Longest a request waits for another one fetching the same resource
/// before going upstream itself, when no upstream timeout is configured.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

pub struct HttpCache {
    /// Where misses, bypasses and stores come from. The disk tier (and
    /// later a shared one) goes between the memory store and this.
    next: Forwarder,
    store: Arc<Store>,
    /// `None` with `CACHE_DISK_PATH=none`.
    disk: Option<DiskTier>,
    /// `None` without `CACHE_REDIS_URL`.
    shared: Option<SharedTier>,
    shared_timeout: Duration,
    /// Set once the shared tier has connected (and so loaded the purge
    /// records): from then on its mirror of them is known.
    shared_seen: AtomicBool,
    purges: Arc<Purges>,
    /// `CACHE_RELEASE`, written into what the shared tier stores.
    release: Option<Arc<str>>,
    /// Entries stored before this are checked against purges this process
    /// may not know yet (see `purges_known`).
    started_at_unix_ms: u64,
    trust_forwarded: bool,
    /// X-Sendfile responses are stored as file references.
    sendfile: bool,
    wait_limit: Duration,
}

impl HttpCache {
    /// The cache in front of `next` (`CACHE_SIZE` > 0; with 0 the pipeline
    /// has no cache at all). Must run inside the Tokio runtime; never waits
    /// for the disk or Redis. A bad `CACHE_REDIS_URL` or CA file is the
    /// only error.
    pub fn new(
        config: &crate::config::Config,
        next: Forwarder,
    ) -> Result<HttpCache, SharedConfigError> {
        let shared = match &config.cache_redis_url {
            None => None,
            Some(url) => Some(SharedTier::connect_with(
                url,
                SharedOptions {
                    timeout: config.cache_redis_timeout,
                    ca_file: config.cache_redis_ca_file.clone(),
                    ..SharedOptions::default()
                },
            )?),
        };
        let disk = DiskTier::open(config);
        let purges = Purges::new(disk.as_ref().map(|d| d.engine().dir()), shared.clone());
        Ok(HttpCache {
            next,
            store: Arc::new(Store::new(
                config.cache_size,
                config.max_cache_item_size,
                config.cache_stale_if_error,
            )),
            disk,
            shared,
            shared_timeout: config.cache_redis_timeout,
            shared_seen: AtomicBool::new(false),
            purges,
            release: config.cache_release.as_deref().map(Arc::from),
            started_at_unix_ms: now_unix_ms(),
            trust_forwarded: config.forward_headers,
            sendfile: config.x_sendfile_enabled,
            wait_limit: config.http_write_timeout.unwrap_or(DEFAULT_WAIT),
        })
    }

    /// Purges a request target, a prefix (`…*`) or everything (`*`) from
    /// every tier and, with a shared tier, every instance.
    pub async fn purge(&self, target: &str) -> Result<purges::PurgeOutcome, purges::PurgeError> {
        self.purges.purge(target).await
    }

    /// The shared tier, if on.
    pub fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }

    /// Whether an entry of `base` stored at `stored_at_unix_ms` was purged
    /// since.
    fn purged(&self, base: &BaseKey, stored_at_unix_ms: u64) -> bool {
        self.purges.covers(base.target(), stored_at_unix_ms)
    }

    /// Whether this process knows every purge that may cover an entry
    /// stored at `stored_at_unix_ms` in a lower tier. The disk's purge log
    /// is read first (a small file). With a shared tier, an entry stored
    /// before this process started may have been purged by another
    /// instance while this one was down: such entries wait (at most the
    /// Redis timeout) for the first connection, which loads the purge
    /// records; without it they are misses, never possibly purged pages.
    async fn purges_known(&self, stored_at_unix_ms: u64) -> bool {
        self.purges.loaded().await;
        let Some(shared) = &self.shared else {
            return true;
        };
        if stored_at_unix_ms >= self.started_at_unix_ms || self.shared_seen.load(Ordering::Relaxed)
        {
            return true;
        }
        self.shared_ready(shared).await
    }

    /// Whether the shared tier can be asked now. Right after start its
    /// first connection may still be under way: until it is made or has
    /// clearly failed (the breaker opened), a lookup waits for it, at most
    /// `CACHE_REDIS_TIMEOUT_MS`, so a fresh instance's first requests are
    /// hits. Later outages never wait.
    async fn shared_ready(&self, shared: &SharedTier) -> bool {
        if shared.is_available() {
            self.shared_seen.store(true, Ordering::Relaxed);
            return true;
        }
        if self.shared_seen.load(Ordering::Relaxed) || shared.stats().breaker_opens > 0 {
            return false;
        }
        if shared.ready(self.shared_timeout).await {
            self.shared_seen.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub async fn handle(
        &self,
        mut req: Request<RequestBody>,
        conn: &ConnInfo,
        facts: Option<&RequestFacts>,
    ) -> Response<ResponseBody> {
        let method = req.method().clone();
        if !(method == Method::GET || method == Method::HEAD) || is_upgrade(req.headers()) {
            return labelled(self.next.fetch(req, conn).await, "bypass");
        }
        let base = BaseKey::new(&req, conn.tls, self.trust_forwarded);
        let range = req.headers().contains_key(header::RANGE);
        let mut may_wait = true;
        loop {
            let (key, stale, coalesce, known) = match self.store.lookup(base.clone(), req.headers())
            {
                Lookup::Hit(entry) if self.purged(&base, entry.stored_at_unix_ms) => {
                    let key = key::CacheKey::new(
                        base.clone(),
                        &key::vary_names(&entry.headers),
                        req.headers(),
                    );
                    self.store.remove(&key);
                    continue;
                }
                Lookup::Hit(entry) if entry.file.is_some() => {
                    // The file is served by the X-Sendfile layer from what is
                    // on disk now; a changed or deleted file sends the request
                    // to the app again (Thruster 404s until expiry, its #51).
                    if entry.file.as_ref().is_some_and(|f| f.unchanged()) {
                        self.touch(&base, &entry, req.headers());
                        return hit::reference(&entry, "hit");
                    }
                    let key = key::CacheKey::new(
                        base.clone(),
                        &key::vary_names(&entry.headers),
                        req.headers(),
                    );
                    self.store.remove(&key);
                    continue;
                }
                Lookup::Hit(entry) if hit::acceptable(&entry.headers, req.headers()) => {
                    self.touch(&base, &entry, req.headers());
                    return hit::respond(
                        &self.store,
                        self.below(),
                        &entry,
                        &method,
                        req.headers(),
                        facts,
                        &base,
                        "hit",
                    )
                    .await;
                }
                Lookup::Hit(_) => {
                    // The stored encoding is not acceptable to this client
                    // (an app that forgot `Vary: Accept-Encoding`): ask upstream.
                    return labelled(self.next.fetch(req, conn).await, "miss");
                }
                Lookup::Miss {
                    key,
                    stale,
                    coalesce,
                    known,
                } => (key, stale, coalesce, known),
            };
            // The lower tiers (disk, then Redis) are asked on every memory
            // miss except for a resource just found not storable. The disk
            // is asked at once: a hot entry is a read from the page cache,
            // cheaper than queueing behind a leader (a body memory does not
            // take is served from disk on every hit). Redis is a round trip:
            // a GET that leads the upstream request for its key asks it as
            // the leader, so concurrent misses fetch and promote an entry
            // once; the others ask at once.
            let ask_below = known != Known::Passed;
            // A purged stale entry must not stand in for an error either.
            let stale = stale.filter(|e| !self.purged(&base, e.stored_at_unix_ms));
            let leads = coalesce && may_wait && !range && method == Method::GET;
            if ask_below && self.disk.is_some() {
                if let Some(found) = self.look_on_disk(&base, &key, known, req.headers()).await {
                    return self.answer(found, req, conn, facts, &base).await;
                }
            }
            if ask_below && !leads {
                if let Some(found) = self.look_shared(&base, &key, known, req.headers()).await {
                    return self.answer(found, req, conn, facts, &base).await;
                }
            }
            // Serving a part of something we do not hold means fetching all
            // of it first; let the app answer the range itself.
            if range {
                return labelled(self.next.fetch(req, conn).await, "bypass");
            }
            if method == Method::HEAD {
                return labelled(self.next.fetch(req, conn).await, "miss");
            }
            let guard = if coalesce && may_wait {
                match self.store.wait_or_lead(&key, self.wait_limit).await {
                    Turn::Lead(guard) => Some(guard),
                    Turn::Waited => {
                        may_wait = false;
                        continue;
                    }
                }
            } else {
                None
            };
            if ask_below && leads {
                if let Some(found) = self.look_shared(&base, &key, known, req.headers()).await {
                    // Promoted by now: the waiters find it in memory.
                    drop(guard);
                    return self.answer(found, req, conn, facts, &base).await;
                }
            }
            if guard.is_some() {
                // Fill the cache with a full response even if this client
                // holds a copy; its conditionals are answered from the entry
                // next time (nginx does the same).
                let h = req.headers_mut();
                h.remove(header::IF_NONE_MATCH);
                h.remove(header::IF_MODIFIED_SINCE);
            }
            let request_headers = req.headers().clone();
            let response = self.next.fetch(req, conn).await;
            if is_error(response.status()) {
                // Memory's stale copy, or (memory had none: after a
                // restart, on another instance) one from a lower tier.
                let stale = match stale {
                    Some(stale) => {
                        Some(stale).filter(|s| s.usable_on_error(std::time::Instant::now()))
                    }
                    None => self.stale_below(&base, &key, known, &request_headers).await,
                };
                if let Some(stale) = stale {
                    log::info(
                        "Serving a stale cached response instead of an upstream error",
                        &[
                            ("url", base.describe().into()),
                            ("status", response.status().as_u16().into()),
                        ],
                    );
                    drop(response);
                    if stale.file.is_some() {
                        return hit::reference(&stale, "stale");
                    }
                    return hit::respond(
                        &self.store,
                        self.below(),
                        &stale,
                        &method,
                        &request_headers,
                        facts,
                        &base,
                        "stale",
                    )
                    .await;
                }
            }
            return labelled(self.capture(base, request_headers, response, guard), "miss");
        }
    }

    /// An expired entry from the disk or shared tier that `stale-if-error`
    /// lets stand in for the app's error (memory had none): after a
    /// restart, or on an instance that never stored it. Bodies that do not
    /// fit memory are not read for this.
    async fn stale_below(
        &self,
        base: &BaseKey,
        key: &key::CacheKey,
        known: Known,
        request: &HeaderMap,
    ) -> Option<Arc<Entry>> {
        let usable = |entry: &Entry| {
            entry.file.is_none()
                && entry.usable_on_error(std::time::Instant::now())
                && !self.purged(base, entry.stored_at_unix_ms)
        };
        let known_key = match known {
            Known::Stored => Some(key),
            Known::Passed => return None,
            Known::Nothing => None,
        };
        if let Some(disk) = &self.disk {
            if let Some((_, found)) = disk.get_for_error(base, known_key, request).await {
                let meta = found.meta();
                if meta.file.is_none()
                    && meta.body_len <= self.store.max_item_size
                    && self.purges_known(meta.stored_at_unix_ms).await
                {
                    if let Some(body) = found.read_all().await {
                        let entry = tier::entry_from_meta(found.meta(), body, now_unix_ms());
                        if usable(&entry) {
                            return Some(Arc::new(entry));
                        }
                    }
                }
            }
        }
        let shared = self.shared.as_ref().filter(|s| s.is_available())?;
        let lookup = async {
            let key = match known_key {
                Some(key) => key.clone(),
                None => {
                    let names = shared.vary(&base.text()).await?;
                    key::CacheKey::new(base.clone(), &names, request)
                }
            };
            shared.get(&key.text()).await
        };
        let (meta, body) = tokio::time::timeout(self.shared_timeout, lookup)
            .await
            .ok()
            .flatten()?;
        if !tier::same_release(&meta, self.release.as_deref()) {
            return None;
        }
        let entry = tier::entry_from_meta(&meta, body, now_unix_ms());
        usable(&entry).then(|| Arc::new(entry))
    }

    /// The tiers below memory, for the encodings memory keeps.
    fn below(&self) -> tier::Below<'_> {
        tier::Below {
            disk: self.disk.as_ref(),
            shared: self.shared.as_ref(),
            release: self.release.as_deref(),
        }
    }

    /// Looks for `key` in the shared tier (Redis).
    async fn look_shared(
        &self,
        base: &BaseKey,
        key: &key::CacheKey,
        known: Known,
        request: &HeaderMap,
    ) -> Option<FromDisk> {
        let shared = self.shared.as_ref()?;
        // Both round trips (vary record, entry) within one timeout: a hung
        // Redis costs a request no more than CACHE_REDIS_TIMEOUT_MS.
        tokio::time::timeout(
            self.shared_timeout,
            self.look_in_shared(shared, base, key, known, request),
        )
        .await
        .ok()
        .flatten()
    }

    /// Looks for `key` in Redis. A hit is promoted into memory (when it
    /// fits) and written to the disk tier, so the next request and the
    /// next restart find it locally.
    async fn look_in_shared(
        &self,
        shared: &SharedTier,
        base: &BaseKey,
        key: &key::CacheKey,
        known: Known,
        request: &HeaderMap,
    ) -> Option<FromDisk> {
        if !self.shared_ready(shared).await {
            return None;
        }
        let key = match known {
            Known::Stored => key.clone(),
            Known::Passed => return None,
            Known::Nothing => {
                let names = shared.vary(&base.text()).await?;
                self.store.note_vary(base.clone(), &names);
                key::CacheKey::new(base.clone(), &names, request)
            }
        };
        let text = key.text();
        let (meta, body) = shared.get(&text).await?;
        let now = now_unix_ms();
        if !tier::same_release(&meta, self.release.as_deref())
            || self.purged(base, meta.stored_at_unix_ms)
        {
            // Another release's page, or a purged one: dropped for every
            // instance (the next store replaces it anyway).
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ = shared.remove(&text).await;
            });
            return None;
        }
        if !tier::servable(&meta, now, self.release.as_deref()) {
            return None;
        }
        let entry = tier::entry_from_meta(&meta, body, now);
        if let Some(disk) = &self.disk {
            let len = entry.body.len() as u64;
            if disk.takes(len) {
                let stored = Stored {
                    status: entry.status,
                    headers: &entry.headers,
                    stored_at_unix_ms: entry.stored_at_unix_ms,
                    freshness: &entry.freshness,
                    file: None,
                };
                if let Some(mut writer) = disk.writer(&key, &stored, Some(len)) {
                    if writer.push(&entry.body) {
                        drop(writer.finish());
                        let vary = key::vary_names(&entry.headers);
                        disk.write_vary(base, &vary, entry.stored_at_unix_ms, &entry.freshness);
                    }
                }
            }
        }
        if entry.body.len() as u64 > self.store.max_item_size {
            return Some(FromDisk::Memory(Arc::new(entry)));
        }
        Some(FromDisk::Memory(self.promote(base, request, entry)))
    }

    /// Looks for `key` in the disk tier. What fits memory is promoted (and
    /// returned from memory); a larger body is returned to be streamed from
    /// its file. `None` is a miss, whatever the reason.
    async fn look_on_disk(
        &self,
        base: &BaseKey,
        key: &key::CacheKey,
        known: Known,
        request: &HeaderMap,
    ) -> Option<FromDisk> {
        let disk = self.disk.as_ref()?;
        let key = match known {
            Known::Stored => key.clone(),
            Known::Passed => return None,
            // No memory rule: the vary record says which variant to read
            // (a fresh process must find variants before any rule exists).
            Known::Nothing => {
                let names = disk.vary_names(base).await?;
                self.store.note_vary(base.clone(), &names);
                key::CacheKey::new(base.clone(), &names, request)
            }
        };
        let found = disk.get(&key).await?;
        let meta = found.meta();
        if !self.purges_known(meta.stored_at_unix_ms).await
            || self.purged(base, meta.stored_at_unix_ms)
        {
            return None;
        }
        let now = now_unix_ms();
        if meta.file.is_some() {
            // A reference to an X-Sendfile file: only with the X-Sendfile
            // layer on, and only while the file is the one stored.
            let entry = tier::entry_from_meta(meta, Bytes::new(), now);
            if !self.sendfile || !entry.file.as_ref().is_some_and(|f| f.unchanged()) {
                return None;
            }
            return Some(FromDisk::Memory(self.promote(base, request, entry)));
        }
        // Check the length before reading: a large body is never read
        // into memory.
        if meta.body_len > self.store.max_item_size {
            return Some(FromDisk::Stream(Box::new(found), key));
        }
        let body = found.read_all().await?;
        let entry = tier::entry_from_meta(found.meta(), body, now);
        Some(FromDisk::Memory(self.promote(base, request, entry)))
    }

    fn promote(&self, base: &BaseKey, request: &HeaderMap, entry: Entry) -> Arc<Entry> {
        let vary = key::vary_names(&entry.headers);
        self.store.insert(base.clone(), vary, request, entry)
    }

    /// Serves what the disk tier found, as a memory hit would be served.
    async fn answer(
        &self,
        found: FromDisk,
        req: Request<RequestBody>,
        conn: &ConnInfo,
        facts: Option<&RequestFacts>,
        base: &BaseKey,
    ) -> Response<ResponseBody> {
        let method = req.method().clone();
        match found {
            FromDisk::Memory(entry) if entry.file.is_some() => hit::reference(&entry, "hit"),
            FromDisk::Memory(entry) if hit::acceptable(&entry.headers, req.headers()) => {
                hit::respond(
                    &self.store,
                    self.below(),
                    &entry,
                    &method,
                    req.headers(),
                    facts,
                    base,
                    "hit",
                )
                .await
            }
            FromDisk::Stream(found, key)
                if hit::acceptable(&found.meta().headers, req.headers()) =>
            {
                // A whole-body request from a client that takes a coding
                // gets the stored encoding (made once, in the background,
                // on the first such hit; until then compressed on the way
                // out, as a miss would be).
                let wants_range = req.headers().contains_key(header::RANGE);
                let meta = found.meta();
                // Made once for many hits, like memory's stored variants.
                let coding = facts.filter(|_| !wants_range).and_then(|f| {
                    compression::stored_coding_for(
                        f,
                        meta.status,
                        &meta.headers,
                        Some(meta.body_len),
                    )
                });
                if let (Some(disk), Some(coding)) = (&self.disk, coding) {
                    match disk.stream_encoding(&key, &found, coding).await {
                        tier::StreamEncoding::Ready(encoded) => {
                            return hit::stream_encoded(
                                &found,
                                *encoded,
                                coding,
                                &method,
                                req.headers(),
                                hit::Outlet {
                                    zero_copy: conn.zero_copy(req.version()),
                                    facts,
                                },
                                "hit",
                            );
                        }
                        tier::StreamEncoding::NotSmaller => {}
                        tier::StreamEncoding::Missing => {
                            disk.make_stream_encoding(&key, found.meta(), coding)
                        }
                    }
                }
                let out = hit::Outlet {
                    zero_copy: conn.zero_copy(req.version()),
                    facts,
                };
                hit::stream(*found, &method, req.headers(), out, "hit")
            }
            // A stored encoding this client does not accept.
            FromDisk::Memory(_) | FromDisk::Stream(..) => {
                labelled(self.next.fetch(req, conn).await, "miss")
            }
        }
    }

    /// Tells the disk tier, at most once a minute per entry, that an entry
    /// it holds is being served from memory, so its eviction keeps what is
    /// hot here.
    fn touch(&self, base: &BaseKey, entry: &Entry, request: &HeaderMap) {
        if let Some(disk) = &self.disk {
            if entry.due_for_touch(now_unix_ms() / 1000) {
                let vary = key::vary_names(&entry.headers);
                disk.touch(&key::CacheKey::new(base.clone(), &vary, request));
            }
        }
    }

    /// Waits until every finished response is written to the disk tier
    /// (for SIGTERM and `Thruster.stop`). Responses still streaming are not
    /// waited for.
    pub async fn flush(&self) {
        if let Some(disk) = &self.disk {
            disk.flush().await;
        }
    }

    /// The disk tier, if on.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    /// Streams the response on while keeping a copy, stored once complete.
    fn capture(
        &self,
        base: BaseKey,
        request: HeaderMap,
        response: Response<ResponseBody>,
        guard: Option<LeaderGuard>,
    ) -> Response<ResponseBody> {
        let freshness = match directives::storable(
            &Method::GET,
            &request,
            response.status(),
            response.headers(),
            SystemTime::now(),
            self.store.stale_if_error,
        ) {
            Ok(freshness) => freshness,
            Err(reason) => {
                if log::enabled(log::Level::Debug) {
                    log::debug(
                        "Not caching response",
                        &[
                            ("url", base.describe().into()),
                            ("reason", reason.reason().into()),
                        ],
                    );
                }
                self.store.pass(base);
                return response;
            }
        };
        let expected = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Memory takes bodies up to MAX_CACHE_ITEM_SIZE; the disk tier up
        // to CACHE_DISK_MAX_ITEM_SIZE.
        let fits_memory = expected.is_none_or(|n| n <= self.store.max_item_size);
        let fits_disk = self
            .disk
            .as_ref()
            .is_some_and(|d| d.takes(expected.unwrap_or(0)));
        if !fits_memory && !fits_disk {
            self.store.pass(base);
            return response;
        }
        let vary = key::vary_names(response.headers());
        let mut headers = response.headers().clone();
        headers.remove(header::AGE);
        headers.remove(X_CACHE);
        // Per request, never shared: a hit gets the id of its own request.
        headers.remove(crate::http::X_REQUEST_ID);
        // RFC 9110 §6.6.1: a response cached without a Date gets the time
        // it was received, so a hit's Date agrees with its Age (after a
        // restart too) instead of being the time of the hit.
        if !headers.contains_key(header::DATE) {
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
                headers.insert(header::DATE, date);
            }
        }
        let stored_at_unix_ms = now_unix_ms();
        let key = key::CacheKey::new(base.clone(), &vary, &request);
        if self.sendfile {
            let target = response
                .headers()
                .get(crate::http::X_SENDFILE)
                .filter(|v| !v.is_empty())
                .map(|v| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(v.as_bytes())));
            if let Some(target) = target {
                // Only the reference is kept; the app's (empty) body is not
                // read, and the file is served from disk on every hit.
                if let Some(file) = store::FileRef::stat(target) {
                    if let Some(disk) = &self.disk {
                        let stored = Stored {
                            status: response.status(),
                            headers: &headers,
                            stored_at_unix_ms,
                            freshness: &freshness,
                            file: Some(&file),
                        };
                        if let Some(writer) = disk.writer(&key, &stored, Some(0)) {
                            drop(writer.finish());
                            disk.write_vary(&base, &vary, stored_at_unix_ms, &freshness);
                        }
                    }
                    let mut entry = Entry::new(response.status(), headers, Bytes::new(), freshness)
                        .with_file(file);
                    entry.stored_at_unix_ms = stored_at_unix_ms;
                    self.store.insert(base, vary, &request, entry);
                }
                drop(guard);
                return response;
            }
        }
        // An empty body (a redirect, a 204, `Content-Length: 0`) is never
        // polled by hyper, so there is nothing to capture: store it now.
        let empty = response.status() == StatusCode::NO_CONTENT
            || expected == Some(0)
            || response.body().is_end_stream();
        let disk = self.disk.as_ref().and_then(|tier| {
            let stored = Stored {
                status: response.status(),
                headers: &headers,
                stored_at_unix_ms,
                freshness: &freshness,
                file: None,
            };
            let declared = if empty { Some(0) } else { expected };
            tier.writer(&key, &stored, declared)
                .map(|writer| (tier.clone(), writer))
        });
        if !fits_memory && disk.is_none() {
            self.store.pass(base);
            return response;
        }
        let capture = Capture {
            shared: self.shared.clone().map(|tier| (tier, key.text())),
            release: self.release.clone(),
            store: Arc::clone(&self.store),
            base,
            vary,
            request,
            status: response.status(),
            headers,
            freshness,
            expected,
            stored_at_unix_ms,
            received: 0,
            body: fits_memory.then(BytesMut::new),
            disk,
            guard,
        };
        if empty {
            capture.store();
            return response;
        }
        response.map(|inner| {
            CaptureBody {
                inner,
                capture: Some(capture),
            }
            .boxed_unsync()
        })
    }
}

/// A request asking for a protocol switch (RFC 9110 §7.8): an `Upgrade`
/// field, or the `upgrade` token in `Connection` in any letter case
/// (connection options are case-insensitive, §7.6.1). Neither is answered
/// from the cache nor stored.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// RFC 5861 §4: the errors a stale response may stand in for.
fn is_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn labelled(mut response: Response<ResponseBody>, value: &'static str) -> Response<ResponseBody> {
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(value));
    response
}

/// What the disk tier found for a memory miss.
enum FromDisk {
    /// Promoted into memory (or a file reference): served as a memory hit.
    Memory(Arc<Entry>),
    /// Too large for memory: streamed from its file.
    Stream(Box<DiskEntry>, key::CacheKey),
}

struct Capture {
    /// Sent what memory stores, once complete (with the entry's key text).
    shared: Option<(SharedTier, String)>,
    release: Option<Arc<str>>,
    store: Arc<Store>,
    base: BaseKey,
    vary: Vec<HeaderName>,
    request: HeaderMap,
    status: StatusCode,
    headers: HeaderMap,
    freshness: Freshness,
    expected: Option<u64>,
    /// Wall-clock receive time, the same in every tier (a stored encoding
    /// names its body by it).
    stored_at_unix_ms: u64,
    received: u64,
    /// The copy for memory; dropped once over `MAX_CACHE_ITEM_SIZE`.
    body: Option<BytesMut>,
    /// The copy streaming to the disk tier; dropped if the write gives up.
    disk: Option<(DiskTier, DiskWriter)>,
    /// Waiters for this key are released when the capture ends either way
    /// (for an entry only the disk holds: once it is on disk).
    guard: Option<LeaderGuard>,
}

impl Capture {
    fn push(&mut self, data: &Bytes) {
        self.received += data.len() as u64;
        if let Some(body) = &mut self.body {
            if (body.len() + data.len()) as u64 > self.store.max_item_size {
                // Too large for memory; the disk copy goes on.
                self.body = None;
            } else {
                body.extend_from_slice(data);
            }
        }
        if let Some((_, writer)) = &mut self.disk {
            if !writer.push(data) {
                self.disk = None;
            }
        }
    }

    /// Queues the complete response for the shared tier (the write runs in
    /// the background: the client already has its last bytes).
    fn share(&self, body: &Bytes) {
        let Some((shared, key)) = &self.shared else {
            return;
        };
        let stored = Stored {
            status: self.status,
            headers: &self.headers,
            stored_at_unix_ms: self.stored_at_unix_ms,
            freshness: &self.freshness,
            file: None,
        };
        if let Some(mut meta) = tier::meta_for(key.clone(), &stored, self.release.as_deref()) {
            meta.body_len = body.len() as u64;
            // Skipped writes (too large, Redis down, too many in flight)
            // only cost other instances a miss.
            let _ = shared.put_variant(&self.base.text(), &self.vary, meta, body.clone());
        }
    }

    /// Whether any tier still takes the body.
    fn wanted(&self) -> bool {
        self.body.is_some() || self.disk.is_some()
    }

    fn store(mut self) {
        // A body shorter than announced was cut off: never store it
        // (dropping the disk writer removes what it wrote).
        if self.expected.is_some_and(|n| n != self.received) {
            return;
        }
        let in_memory = match self.body.take() {
            Some(body) => {
                let body = body.freeze();
                self.share(&body);
                let mut entry = Entry::new(self.status, self.headers, body, self.freshness);
                entry.stored_at_unix_ms = self.stored_at_unix_ms;
                self.store
                    .insert(self.base.clone(), self.vary.clone(), &self.request, entry);
                true
            }
            None => false,
        };
        let Some((tier, writer)) = self.disk.take() else {
            return;
        };
        let finishing = writer.finish();
        tier.write_vary(
            &self.base,
            &self.vary,
            self.stored_at_unix_ms,
            &self.freshness,
        );
        if !in_memory {
            // Only the disk holds it: later misses look there by this key.
            self.store.note_vary(self.base, &self.vary);
            // Requests waiting for this key look again once it is on disk,
            // not before (they would go upstream too).
            if let (Some(guard), Ok(runtime)) =
                (self.guard.take(), tokio::runtime::Handle::try_current())
            {
                runtime.spawn(async move {
                    let _ = finishing.await;
                    drop(guard);
                });
            }
        }
    }
}

/// Passes the body through untouched, keeping a copy for memory (up to
/// `MAX_CACHE_ITEM_SIZE`) and streaming one to the disk tier; stores them
/// only when the upstream body ended cleanly. An error, a trailer or a
/// client that goes away discards both.
struct CaptureBody {
    inner: ResponseBody,
    capture: Option<Capture>,
}

impl Body for CaptureBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // When the disk is slower than the app and the client, pace the
        // response to the disk instead of losing a large entry.
        if let Some((_, writer)) = self.capture.as_mut().and_then(|c| c.disk.as_mut()) {
            std::task::ready!(writer.poll_ready(cx));
        }
        let polled = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => {
                    if let Some(c) = self.capture.as_mut() {
                        c.push(data);
                        if !c.wanted() {
                            self.capture = None;
                        } else if c.expected == Some(c.received) {
                            // With a known length hyper stops polling once it
                            // has written that many bytes, so the end never
                            // shows up as a `None` frame: the announced
                            // length is the end.
                            if let Some(capture) = self.capture.take() {
                                capture.store();
                            }
                        }
                    }
                }
                None => self.capture = None,
            },
            Some(Err(_)) => self.capture = None,
            None => {
                if let Some(capture) = self.capture.take() {
                    capture.store();
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only through poll_frame, so the copy gets stored.
        self.capture.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised_in_any_letter_case() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("upgrade", "websocket")], true),
            (&[("connection", "Upgrade")], true),
            (&[("connection", "keep-alive, UPGRADE")], true),
            (
                &[("connection", "keep-alive"), ("connection", "upgrade")],
                true,
            ),
            (&[("connection", "keep-alive, x-upgraded")], false),
            (&[], false),
        ];
        for (fields, expected) in cases {
            let mut h = HeaderMap::new();
            for (name, value) in *fields {
                h.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            assert_eq!(is_upgrade(&h), *expected, "{fields:?}");
        }
    }
}
