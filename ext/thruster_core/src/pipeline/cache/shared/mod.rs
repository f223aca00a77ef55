//! The shared cache tier: entries in Redis (or Valkey, or any RESP3 server),
//! so a response stored by one instance is a hit on every other one, and a
//! fresh instance after a deploy starts warm.
//!
//! The first rule: **Redis must never make the proxy worse than having no
//! Redis.** Every call is bounded by `CACHE_REDIS_TIMEOUT_MS`; a lookup that
//! cannot answer in time is a miss; writes are spawned and never delay a
//! response; a circuit breaker (`breaker.rs`) stops calling a failing server
//! and a background connector probes it, so a down, hung (`SIGSTOP`),
//! restarted or flushed server means misses — never an error to the caller,
//! never a request waiting longer than the timeout — and the tier heals by
//! itself. [`SharedTier::connect`] checks the URL and returns at once: it
//! never waits for Redis.
//!
//! # Keys and values
//!
//! ```text
//! thruster:v1:<sha256 hex of the full key>       an entry: entry::encode_whole (full key inside,
//!                                                CRCs over metadata and body), PX = what is left of
//!                                                lifetime + stale-if-error
//! thruster:v1:vary:<sha256 hex of the base key>  "THRV1\n" names "\n" base key  (see below)
//! thruster:v1:purge:keys                         sorted set: purged key → purge time (unix ms)
//! thruster:v1:purge:prefixes                     sorted set: purged prefix → purge time ("" = all)
//! thruster:v1:longest                            sorted set, member "ms": the longest entry TTL ever
//!                                                noted; how long purge records must be kept
//! channel thruster:v1:purges                     purge announcements (`purge.rs` wire form)
//! ```
//!
//! `v1` versions the key layout; the value carries its own format version,
//! so two releases on one Redis read each other's entries as misses, never
//! as garbage. The hash only names the key: the value holds the full key and
//! `entry::decode_whole` compares it, so a collision, a value copied under
//! another name, or a tampered value is a miss. Any decode error is a miss
//! (the next store overwrites it).
//!
//! # Variants
//!
//! The caller stores each variant under its own full key text (base key
//! plus the request's values of the `Vary` headers, as the memory tier keys
//! them) and, with [`SharedTier::put_variant`], records per base key the
//! *names* of the headers it varies on. A fresh instance that knows nothing
//! about a resource asks [`SharedTier::vary`] for the names, builds the
//! variant key from its request, then calls [`SharedTier::get`]: two round
//! trips on its first request for a varying resource, one afterwards (the
//! memory tier then knows the names). The record holds the base key too and
//! is compared like an entry's key. Its TTL only ever grows (`PEXPIRE NX`
//! then `GT`, in the same `MULTI` as the entry), so it outlives every
//! variant it describes. An empty list means "does not vary".
//!
//! # Purge
//!
//! A purge of a key or a prefix (trailing `*`; `*` alone = everything) is
//! recorded in a sorted set with its time and announced on the channel.
//! Every instance keeps a local mirror of both sets (`purge.rs`), loaded
//! when its connection is (re)made — after subscribing, so no announcement
//! falls between — and updated by the announcements, so
//! [`SharedTier::purged_since`] is a local check on every hit, in every
//! tier, and an instance that was down during a purge learns of it when it
//! comes back, before its disk entries are served (the caller checks
//! `purged_since` on disk hits too). A prefix purge costs one member in one
//! set: nothing scans the keyspace. Records are trimmed after the longest
//! entry TTL ever noted (at least a day): no entry stored before a purge can
//! live longer than that, so an older record covers nothing. Purge times get
//! a one-second margin for clock skew between hosts (an entry stored in the
//! second after a purge is treated as purged: one extra miss, never a stale
//! page). `FLUSHALL` drops the records in Redis; running instances keep
//! their mirrors. The mirror holds every record within the retention
//! (about 100 bytes each): an app that purges a million distinct keys a day
//! should purge by prefix instead. Records name keys, not apps: instances of
//! different apps must not share one Redis database (a `*` purge would
//! reach them all); give each app its own `/db` or server.
//!
//! # Connection and fork safety
//!
//! One multiplexed RESP3 connection per tier carries commands and the
//! purge subscription. Its socket is opened by `connection.rs` through
//! `crate::sys` (registered in the fork registry before it connects) and
//! handed to redis-rs as a stream; TLS is our rustls with `ring`. The
//! background connector (re)makes it: at start, after a disconnect, and
//! after the breaker's cool-down. Requests never connect: with no live
//! connection a lookup is an immediate miss.
//!
//! Requires Redis ≥ 7.0 or Valkey (RESP3, `PEXPIRE … NX|GT`, `ZADD … GT`).

pub mod breaker;
mod connection;
pub mod purge;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderName;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, RedisError, RedisResult, Value};
use serde_json::Value as Json;
use tokio::sync::{broadcast, watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::entry::{decode_whole, encode_whole, now_unix_ms, EntryMeta, KeyHash};
use crate::log;
use breaker::{Breaker, Source, Transition};
use connection::Target;
use purge::PurgeIndex;

pub use breaker::BreakerSettings;
pub use connection::{redact, Endpoint, SharedConfigError, URL_SETTING};
pub use purge::{PurgeEvent, PurgeTarget};

/// `CACHE_REDIS_TIMEOUT_MS` when unset.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Every key this tier writes starts with this.
pub const KEY_PREFIX: &str = "thruster:v1:";
pub const PURGE_CHANNEL: &str = "thruster:v1:purges";
const VARY_PREFIX: &str = "thruster:v1:vary:";
const PURGE_KEYS: &str = "thruster:v1:purge:keys";
const PURGE_PREFIXES: &str = "thruster:v1:purge:prefixes";
const LONGEST: &str = "thruster:v1:longest";
const VARY_MAGIC: &str = "THRV1\n";

/// Connecting (TCP, TLS, `HELLO`, `PING`, subscribe, purge records), a
/// write and a purge are off the request path: they get at least this, so
/// a TLS handshake to a remote server or a large body on a slow link is not
/// mistaken for a failure. A hung server still holds each for no longer.
const SLOW_CALL_FLOOR: Duration = Duration::from_secs(1);
/// Writes in flight at once; past this a write is skipped, so a slow server
/// cannot pile up tasks and encoded bodies.
const MAX_PENDING_WRITES: usize = 64;
/// Purge records live at least this long (entries kept only by local tiers
/// may outlive anything noted in Redis).
const PURGE_RETENTION_FLOOR_MS: u64 = 24 * 3600 * 1000;
/// Added to a purge's time: hosts' clocks differ a little.
const PURGE_CLOCK_MARGIN_MS: u64 = 1000;
/// Purge announcements buffered per local subscriber.
const EVENT_BUFFER: usize = 1024;

/// How the tier behaves; the URL is separate.
#[derive(Debug, Clone)]
pub struct SharedOptions {
    /// `CACHE_REDIS_TIMEOUT_MS`: the longest any lookup waits.
    pub timeout: Duration,
    /// Extra CA certificates (PEM) for `rediss://`, on top of the system's.
    pub ca_file: Option<PathBuf>,
    /// Larger entries are not sent to Redis.
    pub max_item_size: u64,
    pub breaker: BreakerSettings,
}

impl Default for SharedOptions {
    fn default() -> SharedOptions {
        SharedOptions {
            timeout: DEFAULT_TIMEOUT,
            ca_file: None,
            // Far below the disk tier's 64 MiB: lookups and writes share
            // one multiplexed connection, so a value in transit delays the
            // lookups queued behind it (8 MiB is ~70 ms at 1 Gbit/s, inside
            // a 100 ms timeout; 64 MiB would time them out and open the
            // circuit). Redis also advises against large values.
            max_item_size: 8 << 20,
            breaker: BreakerSettings::default(),
        }
    }
}

/// Why a call to Redis did not give an answer. Lookups turn all of these
/// into misses; only purge reports them (the purge still applied locally).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedError {
    #[error("Redis is unavailable (not connected, or the circuit is open)")]
    Unavailable,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(String),
}

/// Why [`SharedTier::put`] did not queue a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutSkip {
    /// An X-Sendfile reference: it names a file on this host.
    HostLocal,
    /// Nothing left of its lifetime and stale-if-error window.
    Expired,
    /// Over `max_item_size`.
    TooLarge,
    /// The body's length is not `meta.body_len`.
    Invalid,
    /// Not connected, or the circuit is open.
    Unavailable,
    /// Too many writes in flight.
    Busy,
}

/// A queued write. Dropping it does not cancel the write.
#[derive(Debug)]
pub struct PutTicket(JoinHandle<bool>);

impl PutTicket {
    /// Waits for the write: true if Redis stored it.
    pub async fn stored(self) -> bool {
        self.0.await.unwrap_or(false)
    }
}

/// Counters since start, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedStats {
    pub hits: u64,
    /// Lookups Redis answered with nothing.
    pub misses: u64,
    /// Values that did not decode, were for another key, or were dead.
    pub rejected: u64,
    /// Calls not made: no connection or circuit open.
    pub unavailable: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub stored: u64,
    pub write_failures: u64,
    pub breaker_opens: u64,
    pub breaker_closes: u64,
    pub connects: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    rejected: AtomicU64,
    unavailable: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    stored: AtomicU64,
    write_failures: AtomicU64,
    breaker_opens: AtomicU64,
    breaker_closes: AtomicU64,
    connects: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The shared tier. Cheap to clone; background work stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
    _life: Arc<Lifetime>,
}

/// Tells the connector to stop when the last handle goes.
struct Lifetime(watch::Sender<bool>);

impl Drop for Lifetime {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

struct Inner {
    target: Target,
    options: SharedOptions,
    slow_bound: Duration,
    runtime: tokio::runtime::Handle,
    /// The live connection, if any. Requests clone it (a handle to one
    /// multiplexed socket).
    slot: Mutex<Option<Live>>,
    connected: watch::Sender<bool>,
    /// Wakes the connector when the live connection is dropped.
    broken: Notify,
    breaker: Mutex<Breaker>,
    purges: RwLock<PurgeIndex>,
    events: broadcast::Sender<PurgeEvent>,
    /// Longest entry TTL (ms) written to `LONGEST` or read from it.
    longest_ms: AtomicU64,
    writes: Arc<Semaphore>,
    stats: Counters,
}

#[derive(Clone)]
struct Live {
    id: u64,
    conn: MultiplexedConnection,
}

/// A poisoned lock only means a panic elsewhere; the data is still whole
/// (every critical section here is a few assignments).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Redis key of an entry.
pub fn entry_key(full_key: &str) -> String {
    format!("{KEY_PREFIX}{}", KeyHash::of(full_key).hex())
}

/// The Redis key of a base key's vary record.
pub fn vary_key(base_key: &str) -> String {
    format!("{VARY_PREFIX}{}", KeyHash::of(base_key).hex())
}

fn encode_vary(base_key: &str, names: &[HeaderName]) -> String {
    let names: Vec<&str> = names.iter().map(HeaderName::as_str).collect();
    format!("{VARY_MAGIC}{}\n{base_key}", names.join(","))
}

fn decode_vary(value: &[u8], base_key: &str) -> Option<Vec<HeaderName>> {
    let text = std::str::from_utf8(value).ok()?.strip_prefix(VARY_MAGIC)?;
    let (names, base) = text.split_once('\n')?;
    if base != base_key {
        return None;
    }
    names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect()
}

/// Errors after which the connection is no good: reconnect.
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

impl SharedTier {
    /// Starts the tier for `url` with `timeout` per lookup. Checks the URL
    /// now (a bad one is a start-up error naming `CACHE_REDIS_URL`) and
    /// returns at once: the connection is made in the background, and until
    /// it is, lookups are misses. Must run inside the Tokio runtime.
    pub fn connect(url: &str, timeout: Duration) -> Result<SharedTier, SharedConfigError> {
        SharedTier::connect_with(
            url,
            SharedOptions {
                timeout,
                ..SharedOptions::default()
            },
        )
    }

    pub fn connect_with(
        url: &str,
        options: SharedOptions,
    ) -> Result<SharedTier, SharedConfigError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| SharedConfigError::NoRuntime)?;
        let target = Target::new(url, options.ca_file.as_deref())?;
        let mut options = options;
        options.timeout = options.timeout.max(Duration::from_millis(1));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            target,
            slow_bound: options.timeout.max(SLOW_CALL_FLOOR),
            breaker: Mutex::new(Breaker::new(options.breaker)),
            options,
            runtime: runtime.clone(),
            slot: Mutex::new(None),
            connected: watch::channel(false).0,
            broken: Notify::new(),
            purges: RwLock::new(PurgeIndex::default()),
            events: broadcast::channel(EVENT_BUFFER).0,
            longest_ms: AtomicU64::new(0),
            writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            stats: Counters::default(),
        });
        runtime.spawn(run_connector(inner.clone(), shutdown_rx));
        Ok(SharedTier {
            inner,
            _life: Arc::new(Lifetime(shutdown)),
        })
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.inner.target.redacted
    }

    /// The entry stored under `key`, if Redis has one for exactly that key,
    /// intact and not dead. Never waits longer than the timeout; every
    /// failure is a miss.
    pub async fn get(&self, key: &str) -> Option<(EntryMeta, Bytes)> {
        let inner = &self.inner;
        let rkey = entry_key(key);
        let value: Option<Vec<u8>> = inner
            .call(inner.options.timeout, |mut c| async move {
                redis::cmd("GET").arg(rkey).query_async(&mut c).await
            })
            .await
            .ok()?;
        let Some(value) = value else {
            bump(&inner.stats.misses);
            return None;
        };
        match decode_whole(&Bytes::from(value), key) {
            // Never written by us (refused on put), so not ours to serve.
            Ok((meta, _)) if meta.file.is_some() => inner.reject(key, "a file reference"),
            Ok((meta, _)) if meta.usable_until_unix_ms() <= now_unix_ms() => {
                inner.reject(key, "dead (past lifetime and stale-if-error)")
            }
            Ok(found) => {
                bump(&inner.stats.hits);
                Some(found)
            }
            Err(e) => inner.reject(key, &e.to_string()),
        }
    }

    /// Queues a write of an entry under its full key. Returns at once.
    pub fn put(&self, meta: EntryMeta, body: Bytes) -> Result<PutTicket, PutSkip> {
        self.inner.put(None, meta, body)
    }

    /// As [`put`](Self::put), plus the base key's vary record (`vary`: the
    /// response's `Vary` names, lower case, sorted, as `key::vary_names`
    /// gives them; empty when it does not vary).
    pub fn put_variant(
        &self,
        base_key: &str,
        vary: &[HeaderName],
        meta: EntryMeta,
        body: Bytes,
    ) -> Result<PutTicket, PutSkip> {
        let record = (vary_key(base_key), encode_vary(base_key, vary));
        self.inner.put(Some(record), meta, body)
    }

    /// The header names a base key's responses vary on, as recorded by
    /// [`put_variant`](Self::put_variant). `None`: no record (or no answer).
    pub async fn vary(&self, base_key: &str) -> Option<Vec<HeaderName>> {
        let inner = &self.inner;
        let rkey = vary_key(base_key);
        let value: Option<Vec<u8>> = inner
            .call(inner.options.timeout, |mut c| async move {
                redis::cmd("GET").arg(rkey).query_async(&mut c).await
            })
            .await
            .ok()?;
        decode_vary(&value?, base_key)
    }

    /// Deletes an entry (a purged or damaged one the caller found).
    pub async fn remove(&self, key: &str) -> Result<bool, SharedError> {
        let rkey = entry_key(key);
        let removed: i64 = self
            .inner
            .call(self.inner.options.timeout, |mut c| async move {
                redis::cmd("DEL").arg(rkey).query_async(&mut c).await
            })
            .await?;
        Ok(removed > 0)
    }

    /// Purges a key, or a prefix (`"…*"`; `"*"` = everything): records it
    /// locally at once (so it works without Redis), then in Redis, and
    /// announces it to every instance. An error means only the local record
    /// was made.
    pub async fn purge(&self, target: &str) -> Result<PurgeEvent, SharedError> {
        let inner = &self.inner;
        let event = PurgeEvent {
            target: PurgeTarget::parse(target),
            at_unix_ms: now_unix_ms().saturating_add(PURGE_CLOCK_MARGIN_MS),
        };
        inner.apply_purge(&event);
        let noted: Option<f64> = inner
            .call(inner.slow_bound, |mut c| async move {
                redis::cmd("ZSCORE")
                    .arg(LONGEST)
                    .arg("ms")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let retention = inner.retention_ms(noted.map(score_ms));
        let set = match event.target {
            PurgeTarget::Key(_) => PURGE_KEYS,
            PurgeTarget::Prefix(_) => PURGE_PREFIXES,
        };
        let text = event.target.text().to_owned();
        let (at, payload) = (event.at_unix_ms, event.encode());
        inner
            .call(inner.slow_bound, |mut c| async move {
                redis::pipe()
                    .atomic()
                    .cmd("ZADD")
                    .arg(set)
                    .arg("GT")
                    .arg(at)
                    .arg(text)
                    .ignore()
                    // Drops records older than any entry can be.
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(set)
                    .arg("-inf")
                    .arg(format!("({}", at.saturating_sub(retention)))
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(set)
                    .arg(retention)
                    .arg("NX")
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(set)
                    .arg(retention)
                    .arg("GT")
                    .ignore()
                    .cmd("PUBLISH")
                    .arg(PURGE_CHANNEL)
                    .arg(payload)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(event)
    }

    /// Is an entry for `key` stored at `stored_at_unix_ms` covered by a
    /// purge? A local check (no Redis call): call it on every hit, in every
    /// tier, with the same key form as the purges use.
    pub fn purged_since(&self, key: &str, stored_at_unix_ms: u64) -> bool {
        self.inner
            .purges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .covers(key, stored_at_unix_ms)
    }

    /// Purges as they become known — from this instance, from another one
    /// through Redis, or found when the connection is made again — so local
    /// tiers can drop their copies at once. A receiver that lags past the
    /// buffer gets `RecvError::Lagged` and should drop what it cannot check
    /// (hits stay correct anyway: they ask `purged_since`).
    pub fn purge_events(&self) -> broadcast::Receiver<PurgeEvent> {
        self.inner.events.subscribe()
    }

    /// True when a connection is up and the circuit closed.
    pub fn is_available(&self) -> bool {
        self.inner.admit().is_some()
    }

    /// Waits up to `within` for a connection (tests, start-up diagnostics;
    /// the request path never waits).
    pub async fn ready(&self, within: Duration) -> bool {
        let mut rx = self.inner.connected.subscribe();
        let up = tokio::time::timeout(within, rx.wait_for(|up| *up)).await;
        matches!(up, Ok(Ok(_)))
    }

    pub fn stats(&self) -> SharedStats {
        let c = &self.inner.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SharedStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            rejected: get(&c.rejected),
            unavailable: get(&c.unavailable),
            timeouts: get(&c.timeouts),
            errors: get(&c.errors),
            stored: get(&c.stored),
            write_failures: get(&c.write_failures),
            breaker_opens: get(&c.breaker_opens),
            breaker_closes: get(&c.breaker_closes),
            connects: get(&c.connects),
        }
    }
}

/// A sorted-set score (ms as a double; exact below 2^53) as ms.
fn score_ms(score: f64) -> u64 {
    if score.is_finite() && score > 0.0 {
        score as u64
    } else {
        0
    }
}

impl Inner {
    /// The live connection, if a request may use it now.
    fn admit(&self) -> Option<Live> {
        if !lock(&self.breaker).is_closed() {
            return None;
        }
        lock(&self.slot).clone()
    }

    /// Runs one call on the live connection, bounded by `bound`, and tells
    /// the breaker how it went.
    async fn call<T, F, Fut>(&self, bound: Duration, op: F) -> Result<T, SharedError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(live) = self.admit() else {
            bump(&self.stats.unavailable);
            return Err(SharedError::Unavailable);
        };
        match tokio::time::timeout(bound, op(live.conn)).await {
            Ok(Ok(value)) => {
                self.report(Ok(()), Source::Call);
                Ok(value)
            }
            Ok(Err(e)) => {
                bump(&self.stats.errors);
                if is_connection_error(&e) {
                    self.mark_broken(live.id);
                    self.report_call_failure(&e.to_string(), live.id);
                } else {
                    // The server answered (with an error): it is up.
                    self.report(Ok(()), Source::Call);
                }
                Err(SharedError::Redis(e.to_string()))
            }
            Err(_) => {
                bump(&self.stats.timeouts);
                self.report_call_failure("timed out", live.id);
                Err(SharedError::Timeout(bound))
            }
        }
    }

    /// A call failed on connection `id`. Counts only while `id` is the
    /// connection requests get (or none is up yet): late failures on a
    /// connection already replaced say nothing about the new one.
    fn report_call_failure(&self, why: &str, id: u64) {
        let stale = lock(&self.slot).as_ref().is_some_and(|live| live.id != id);
        if !stale {
            self.report(Err(why), Source::Call);
        }
    }

    /// Feeds the breaker and logs its transitions: one warning when it
    /// opens, one info line when it closes.
    fn report(&self, outcome: Result<(), &str>, source: Source) {
        let now = Instant::now();
        let (transition, failures) = {
            let mut breaker = lock(&self.breaker);
            let t = match outcome {
                Ok(()) => breaker.success(now, source),
                Err(_) => breaker.failure(now, source),
            };
            (t, breaker.settings().failures)
        };
        match transition {
            Transition::None => {}
            Transition::Opened { cooldown } => {
                bump(&self.stats.breaker_opens);
                log::warn(
                    "Shared cache (Redis) unavailable: lookups are misses until it answers again",
                    &[
                        ("redis", Json::from(self.target.redacted.as_str())),
                        ("failures", Json::from(failures)),
                        ("error", Json::from(outcome.err().unwrap_or_default())),
                        ("retry_in_ms", Json::from(millis(cooldown))),
                    ],
                );
                // Whatever connection is up goes: the next attempt is a
                // fresh one, made by the connector after the cool-down (a
                // connection left in place would keep the connector
                // waiting on it, and the circuit open for good).
                self.drop_live();
            }
            Transition::Extended { cooldown } => log::debug(
                "Shared cache (Redis) probe failed",
                &[
                    ("redis", Json::from(self.target.redacted.as_str())),
                    ("error", Json::from(outcome.err().unwrap_or_default())),
                    ("retry_in_ms", Json::from(millis(cooldown))),
                ],
            ),
            Transition::Closed { was_open_for } => {
                bump(&self.stats.breaker_closes);
                log::info(
                    "Shared cache (Redis) available again",
                    &[
                        ("redis", Json::from(self.target.redacted.as_str())),
                        ("unavailable_ms", Json::from(millis(was_open_for))),
                    ],
                );
            }
        }
    }

    fn reject(&self, key: &str, why: &str) -> Option<(EntryMeta, Bytes)> {
        bump(&self.stats.rejected);
        log::debug(
            "Shared cache entry rejected",
            &[("key", Json::from(key)), ("why", Json::from(why))],
        );
        None
    }

    fn put(
        self: &Arc<Self>,
        vary: Option<(String, String)>,
        meta: EntryMeta,
        body: Bytes,
    ) -> Result<PutTicket, PutSkip> {
        let ttl_ms = meta.usable_until_unix_ms().saturating_sub(now_unix_ms());
        if ttl_ms == 0 {
            return Err(PutSkip::Expired);
        }
        // Also for entries Redis will not take: purge records must outlive
        // every entry, wherever it is kept.
        let note = ttl_ms > self.longest_ms.load(Ordering::Relaxed);
        if meta.file.is_some() {
            if note {
                self.note_lifetime(ttl_ms);
            }
            return Err(PutSkip::HostLocal);
        }
        if meta.body_len != body.len() as u64 {
            return Err(PutSkip::Invalid);
        }
        if body.len() as u64 > self.options.max_item_size {
            if note {
                self.note_lifetime(ttl_ms);
            }
            return Err(PutSkip::TooLarge);
        }
        if self.admit().is_none() {
            bump(&self.stats.unavailable);
            return Err(PutSkip::Unavailable);
        }
        let permit = self
            .writes
            .clone()
            .try_acquire_owned()
            .map_err(|_| PutSkip::Busy)?;
        let inner = self.clone();
        let task = self.runtime.spawn(async move {
            let _permit = permit;
            // Encoded here, not on the caller's path (a CRC and a copy of
            // the body).
            let value = match encode_whole(&meta, &body) {
                Ok(value) => value,
                Err(e) => {
                    bump(&inner.stats.write_failures);
                    log::debug(
                        "Shared cache entry not encodable",
                        &[
                            ("key", Json::from(meta.key.as_str())),
                            ("error", Json::from(e.to_string())),
                        ],
                    );
                    return false;
                }
            };
            let rkey = entry_key(&meta.key);
            let result = inner
                .call(inner.slow_bound, |mut c| async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    pipe.cmd("SET")
                        .arg(rkey)
                        .arg(value)
                        .arg("PX")
                        .arg(ttl_ms)
                        .ignore();
                    if let Some((vkey, record)) = vary {
                        // Keeps the longest TTL of any variant.
                        pipe.cmd("SET")
                            .arg(&vkey)
                            .arg(record)
                            .arg("KEEPTTL")
                            .ignore();
                        pipe.cmd("PEXPIRE")
                            .arg(&vkey)
                            .arg(ttl_ms)
                            .arg("NX")
                            .ignore();
                        pipe.cmd("PEXPIRE")
                            .arg(&vkey)
                            .arg(ttl_ms)
                            .arg("GT")
                            .ignore();
                    }
                    if note {
                        pipe.cmd("ZADD")
                            .arg(LONGEST)
                            .arg("GT")
                            .arg(ttl_ms)
                            .arg("ms")
                            .ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                })
                .await;
            match result {
                Ok(()) => {
                    if note {
                        inner.longest_ms.fetch_max(ttl_ms, Ordering::Relaxed);
                    }
                    bump(&inner.stats.stored);
                    true
                }
                Err(e) => {
                    bump(&inner.stats.write_failures);
                    log::debug(
                        "Shared cache write failed",
                        &[
                            ("key", Json::from(meta.key.as_str())),
                            ("error", Json::from(e.to_string())),
                        ],
                    );
                    false
                }
            }
        });
        Ok(PutTicket(task))
    }

    /// Records a long TTL in `LONGEST` for an entry Redis does not take.
    fn note_lifetime(self: &Arc<Self>, ttl_ms: u64) {
        if self.admit().is_none() {
            return;
        }
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            return;
        };
        let inner = self.clone();
        self.runtime.spawn(async move {
            let _permit = permit;
            let noted = inner
                .call(inner.slow_bound, |mut c| async move {
                    redis::cmd("ZADD")
                        .arg(LONGEST)
                        .arg("GT")
                        .arg(ttl_ms)
                        .arg("ms")
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            if noted.is_ok() {
                inner.longest_ms.fetch_max(ttl_ms, Ordering::Relaxed);
            }
        });
    }

    /// How long purge records are kept: the longest TTL known, at least the
    /// floor.
    fn retention_ms(&self, noted: Option<u64>) -> u64 {
        let local = self.longest_ms.load(Ordering::Relaxed);
        if let Some(noted) = noted {
            self.longest_ms.fetch_max(noted, Ordering::Relaxed);
        }
        local.max(noted.unwrap_or(0)).max(PURGE_RETENTION_FLOOR_MS)
    }

    /// Adds a purge to the local mirror; announces it locally if it is news.
    fn apply_purge(&self, event: &PurgeEvent) -> bool {
        let news = self
            .purges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(event);
        if news {
            // No local subscriber is fine.
            let _ = self.events.send(event.clone());
        }
        news
    }

    /// Pushed data on the connection: purge announcements, and the
    /// library's notice that the connection is gone.
    fn on_push(&self, id: u64, info: PushInfo) {
        match info.kind {
            PushKind::Message => {
                let mut data = info.data.into_iter();
                let (Some(channel), Some(Value::BulkString(payload))) = (data.next(), data.next())
                else {
                    return;
                };
                let on_ours =
                    matches!(&channel, Value::BulkString(c) if c == PURGE_CHANNEL.as_bytes());
                if let (true, Some(event)) = (on_ours, PurgeEvent::decode(&payload)) {
                    self.apply_purge(&event);
                }
            }
            PushKind::Disconnection => self.mark_broken(id),
            _ => {}
        }
    }

    /// Drops connection `id` if it is still the live one, and wakes the
    /// connector to make another (after the cool-down if the circuit is
    /// open).
    fn mark_broken(&self, id: u64) {
        let mut slot = lock(&self.slot);
        if slot.as_ref().is_some_and(|live| live.id == id) {
            *slot = None;
            drop(slot);
            self.connected.send_replace(false);
            self.broken.notify_one();
        }
    }

    /// Makes `live` the connection requests use. The caller closes the
    /// breaker, then announces it with `connected`.
    /// Drops the live connection, whichever it is, and wakes the connector.
    fn drop_live(&self) {
        if lock(&self.slot).take().is_some() {
            self.connected.send_replace(false);
            self.broken.notify_one();
        }
    }

    fn install(&self, live: Live) {
        *lock(&self.slot) = Some(live);
        bump(&self.stats.connects);
    }

    fn is_live(&self, id: u64) -> bool {
        lock(&self.slot).as_ref().is_some_and(|live| live.id == id)
    }

    /// One connection attempt: socket (registered), TLS, `HELLO 3`/auth/db,
    /// `PING`, the purge subscription, then the purge records.
    async fn establish(self: &Arc<Self>, id: u64) -> Result<MultiplexedConnection, String> {
        let stream = self.target.open().await.map_err(|e| e.to_string())?;
        let weak = Arc::downgrade(self);
        let config = AsyncConnectionConfig::new()
            // Our own bounds apply (per call); none from the library.
            .set_response_timeout(None)
            .set_connection_timeout(None)
            .set_push_sender(
                move |info: PushInfo| -> Result<(), std::convert::Infallible> {
                    if let Some(inner) = weak.upgrade() {
                        inner.on_push(id, info);
                    }
                    Ok(())
                },
            );
        let (mut conn, driver) =
            MultiplexedConnection::new_with_config(&self.target.info, stream, config)
                .await
                .map_err(|e| e.to_string())?;
        let weak = Arc::downgrade(self);
        self.runtime.spawn(async move {
            driver.await;
            if let Some(inner) = weak.upgrade() {
                inner.mark_broken(id);
            }
        });
        let setup = async {
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            conn.subscribe(PURGE_CHANNEL).await?;
            self.reload_purges(&mut conn).await
        };
        setup.await.map_err(|e| e.to_string())?;
        Ok(conn)
    }

    /// Loads the purge records into the local mirror (merging: records the
    /// mirror has and Redis lost, to a FLUSHALL say, are kept).
    async fn reload_purges(&self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let (noted, keys, prefixes): (Option<f64>, Value, Value) = redis::pipe()
            .cmd("ZSCORE")
            .arg(LONGEST)
            .arg("ms")
            .cmd("ZRANGE")
            .arg(PURGE_KEYS)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(PURGE_PREFIXES)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        let retention = self.retention_ms(noted.map(score_ms));
        let oldest = now_unix_ms().saturating_sub(retention);
        self.purges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .trim(oldest);
        let records = scored_members(keys)
            .into_iter()
            .map(|(text, at)| (PurgeTarget::Key(text), at))
            .chain(
                scored_members(prefixes)
                    .into_iter()
                    .map(|(text, at)| (PurgeTarget::Prefix(text), at)),
            );
        for (target, at_unix_ms) in records {
            if at_unix_ms >= oldest {
                self.apply_purge(&PurgeEvent { target, at_unix_ms });
            }
        }
        Ok(())
    }
}

/// `ZRANGE … WITHSCORES`: nested `[member, score]` pairs in RESP3, a flat
/// list in RESP2. Members that are not UTF-8 are not ours.
fn scored_members(value: Value) -> Vec<(String, u64)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let score = |v: &Value| -> Option<u64> {
        match v {
            Value::Double(d) => Some(score_ms(*d)),
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()?
                .parse::<f64>()
                .ok()
                .map(score_ms),
            _ => None,
        }
    };
    let member = |v: Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b).ok(),
            Value::SimpleString(s) => Some(s),
            _ => None,
        }
    };
    let nested = items
        .iter()
        .all(|i| matches!(i, Value::Array(p) if p.len() == 2));
    let mut out = Vec::new();
    if nested {
        for item in items {
            if let Value::Array(pair) = item {
                let mut pair = pair.into_iter();
                if let (Some(m), Some(s)) = (pair.next(), pair.next()) {
                    if let (Some(at), Some(m)) = (score(&s), member(m)) {
                        out.push((m, at));
                    }
                }
            }
        }
    } else {
        let mut items = items.into_iter();
        while let (Some(m), Some(s)) = (items.next(), items.next()) {
            if let (Some(at), Some(m)) = (score(&s), member(m)) {
                out.push((m, at));
            }
        }
    }
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The background connector: keeps one connection up, probing after the
/// breaker's cool-down when it is open. Ends when the tier is dropped.
async fn run_connector(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut id = 0u64;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let wait = lock(&inner.breaker).wait_before_attempt(Instant::now());
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
        }
        id += 1;
        let attempt = tokio::time::timeout(inner.slow_bound, inner.establish(id));
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            _ = shutdown.changed() => break,
        };
        match outcome {
            Ok(Ok(conn)) => {
                inner.install(Live { id, conn });
                inner.report(Ok(()), Source::Connector);
                // Only now: `ready()` means a request would use it.
                if inner.is_live(id) {
                    inner.connected.send_replace(true);
                }
                log::debug(
                    "Shared cache (Redis) connected",
                    &[("redis", Json::from(inner.target.redacted.as_str()))],
                );
                // Until it breaks (or the tier goes away).
                while inner.is_live(id) {
                    tokio::select! {
                        _ = inner.broken.notified() => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
            Ok(Err(e)) => inner.report(Err(&e), Source::Connector),
            Err(_) => inner.report(Err("connecting timed out"), Source::Connector),
        }
    }
    // Dropping the last handle ends the connection's driver and closes the
    // socket.
    *lock(&inner.slot) = None;
    inner.connected.send_replace(false);
}
