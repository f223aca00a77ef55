//! Purges as every tier sees them: `Thruster.purge(path_or_url)` names a
//! request target (`/posts/1`), a prefix of targets (`/posts/*`) or every
//! target (`*`), and each entry stored at or before the purge is a miss
//! from then on, in every tier.
//!
//! Nothing is searched or deleted when a purge arrives: the check happens
//! on every hit (a hash lookup; one more per prefix record), against the
//! time the entry was stored. So a prefix purge costs the same as a key
//! purge, the disk's files and Redis' keys are never scanned, and an entry
//! a purge covers is simply replaced by the next response stored for it.
//!
//! Where the records live:
//! - this process: a [`PurgeIndex`] in memory;
//! - the disk tier's directory: a log (`purges.log`, one announcement per
//!   line, appended with `O_APPEND`), read before the first disk hit is
//!   served, so a purge survives a restart and covers a second process on
//!   the same directory when it starts;
//! - the shared tier (`CACHE_REDIS_URL`): sorted sets in Redis plus a
//!   channel (`shared/`), which reach every instance, including one that
//!   was down during the purge, as soon as it connects.
//!
//! The host is not part of a purge: `Thruster.purge("https://a.example/x")`
//! purges `/x` for every host name the app answers to (one extra miss at
//! worst, never a stale page).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::shared::purge::PurgeIndex;
use super::shared::{PurgeEvent, PurgeTarget, SharedError, SharedTier};
use crate::log;
use crate::sys::Registered;

/// The log's file name inside `CACHE_DISK_PATH` (the disk engine only
/// reads its two-hex-digit directories and `tmp`).
pub const LOG_FILE: &str = "purges.log";
/// Past this size the log is rewritten with the newest record per target.
const COMPACT_OVER: u64 = 1 << 20;
/// Longest target accepted (request targets past this are not cached by
/// any browser-facing app in practice, and a record is kept in memory).
const MAX_TARGET: usize = 8 * 1024;

/// Why a purge was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurgeError {
    #[error(
        "cannot purge {0:?}: give a path (/posts/1), a URL (https://example.com/posts/1), a \
         prefix ending in * (/posts/*), or * for everything"
    )]
    BadTarget(String),
}

/// What a purge reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOutcome {
    pub target: PurgeTarget,
    /// `None` without a shared tier; `Some(Err)` when Redis did not take it
    /// (the local tiers are purged anyway).
    pub shared: Option<Result<(), SharedError>>,
}

/// The purge records of one proxy.
pub struct Purges {
    local: RwLock<PurgeIndex>,
    shared: Option<SharedTier>,
    log: Option<PathBuf>,
    /// True once the disk log has been read (disk hits wait for it).
    loaded: watch::Receiver<bool>,
}

impl Purges {
    /// Starts reading the disk log (if any) in the background.
    pub fn new(disk_dir: Option<&Path>, shared: Option<SharedTier>) -> Arc<Purges> {
        let log = disk_dir.map(|d| d.join(LOG_FILE));
        let (done, loaded) = watch::channel(log.is_none());
        let purges = Arc::new(Purges {
            local: RwLock::new(PurgeIndex::default()),
            shared,
            log: log.clone(),
            loaded,
        });
        if let (Some(path), Ok(runtime)) = (log, tokio::runtime::Handle::try_current()) {
            let weak = Arc::downgrade(&purges);
            runtime.spawn_blocking(move || {
                let events = read_log(&path);
                if let Some(purges) = weak.upgrade() {
                    let mut index = purges.local.write().unwrap_or_else(|e| e.into_inner());
                    for event in &events {
                        index.apply(event);
                    }
                }
                done.send_replace(true);
            });
        } else {
            done.send_replace(true);
        }
        purges
    }

    /// Waits until the disk log is read (at most a read of one small file).
    pub async fn loaded(&self) {
        let mut rx = self.loaded.clone();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    /// Is an entry for request target `target` stored at
    /// `stored_at_unix_ms` covered by a purge?
    pub fn covers(&self, target: &str, stored_at_unix_ms: u64) -> bool {
        {
            let local = self.local.read().unwrap_or_else(|e| e.into_inner());
            if !local.is_empty() && local.covers(target, stored_at_unix_ms) {
                return true;
            }
        }
        self.shared
            .as_ref()
            .is_some_and(|s| s.purged_since(target, stored_at_unix_ms))
    }

    /// Purges `text` (see [`target_of`]) in this process, the disk log and
    /// the shared tier.
    pub async fn purge(&self, text: &str) -> Result<PurgeOutcome, PurgeError> {
        let target = target_of(text)?;
        let event = PurgeEvent {
            target: target.clone(),
            at_unix_ms: super::entry::now_unix_ms(),
        };
        self.local
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&event);
        if let Some(path) = self.log.clone() {
            let line = event.encode();
            let written =
                tokio::task::spawn_blocking(move || append_log(&path, &line).map(|_| path)).await;
            match written {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::warn(
                    "Could not record a purge in the disk cache directory; after a restart its \
                     entries may be served again until they expire",
                    &[("error", e.to_string().into())],
                ),
                Err(_) => {}
            }
        }
        let shared = match &self.shared {
            None => None,
            Some(tier) => Some(tier.purge(&wire_text(&target)).await.map(|_| ())),
        };
        Ok(PurgeOutcome { target, shared })
    }

    pub fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }
}

/// The text `PurgeTarget::parse` reads back into `target`.
fn wire_text(target: &PurgeTarget) -> String {
    match target {
        PurgeTarget::Key(k) => k.clone(),
        PurgeTarget::Prefix(p) => format!("{p}*"),
    }
}

/// `Thruster.purge`'s argument as a purge target: a request target
/// (`/posts/1?page=2`, matched exactly), a prefix of one (`/posts/*`),
/// `*` for everything, or an absolute URL whose path (and query) is used.
pub fn target_of(text: &str) -> Result<PurgeTarget, PurgeError> {
    let bad = || PurgeError::BadTarget(text.chars().take(200).collect());
    let text = text.trim();
    if text.len() > MAX_TARGET || text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad());
    }
    if text == "*" {
        return Ok(PurgeTarget::Prefix(String::new()));
    }
    let lower = text.to_ascii_lowercase();
    let path = if lower.starts_with("http://") || lower.starts_with("https://") {
        let rest = &text[text.find("://").map_or(0, |i| i + 3)..];
        let start = rest.find(['/', '?', '*']).unwrap_or(rest.len());
        if start == 0 {
            return Err(bad());
        }
        match &rest[start..] {
            "" => "/".to_string(),
            p if p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        }
    } else {
        text.to_string()
    };
    if !path.starts_with('/') {
        return Err(bad());
    }
    Ok(PurgeTarget::parse(&path))
}

fn read_log(path: &Path) -> Vec<PurgeEvent> {
    let mut text = Vec::new();
    let read = Registered::open(|| std::fs::File::open(path))
        .and_then(|file| (&*file).read_to_end(&mut text));
    match read {
        Ok(_) => {}
        // No log yet, or no usable directory (the disk tier warns about
        // that itself, once): no purges were recorded here.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Vec::new()
        }
        Err(e) => {
            log::warn(
                "Could not read the purge log; purges made before this start are not known",
                &[
                    ("path", path.display().to_string().into()),
                    ("error", e.to_string().into()),
                ],
            );
            return Vec::new();
        }
    }
    // A line torn by a crash mid-append is not an announcement: skipped.
    text.split(|&b| b == b'\n')
        .filter_map(PurgeEvent::decode)
        .collect()
}

fn append_log(path: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = Registered::open(|| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    })?;
    // One write per record: O_APPEND keeps concurrent writers' lines whole.
    (&*file).write_all(format!("{line}\n").as_bytes())?;
    if file.metadata()?.len() > COMPACT_OVER {
        compact(path)?;
    }
    Ok(())
}

/// Rewrites the log with the newest record per target (nothing a record
/// covers is lost), through a temp file and a rename.
fn compact(path: &Path) -> io::Result<()> {
    let mut newest: std::collections::HashMap<PurgeTarget, u64> = Default::default();
    for event in read_log(path) {
        let at = newest.entry(event.target).or_default();
        *at = (*at).max(event.at_unix_ms);
    }
    let mut text = String::new();
    for (target, at_unix_ms) in newest {
        text.push_str(&PurgeEvent { target, at_unix_ms }.encode());
        text.push('\n');
    }
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let file = Registered::open(|| std::fs::File::create(&temp))?;
        (&*file).write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new() -> TestDir {
            let path = std::env::temp_dir().join(format!(
                "thruster-purges-{}-{}",
                std::process::id(),
                crate::sys::random::hex(8)
            ));
            std::fs::create_dir_all(&path).unwrap();
            TestDir(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn targets_from_paths_urls_prefixes_and_star() {
        let key = |s: &str| PurgeTarget::Key(s.into());
        let prefix = |s: &str| PurgeTarget::Prefix(s.into());
        assert_eq!(target_of("/posts/1"), Ok(key("/posts/1")));
        assert_eq!(target_of("/posts/1?page=2"), Ok(key("/posts/1?page=2")));
        assert_eq!(target_of("/posts/*"), Ok(prefix("/posts/")));
        assert_eq!(target_of("*"), Ok(prefix("")));
        assert_eq!(
            target_of("https://Example.com/posts/1"),
            Ok(key("/posts/1"))
        );
        assert_eq!(target_of("http://example.com:3000"), Ok(key("/")));
        assert_eq!(target_of("http://example.com/a*"), Ok(prefix("/a")));
        assert_eq!(target_of("https://example.com?x=1"), Ok(key("/?x=1")));
        for bad in ["posts", "", "https://", "/a b", "/a\nb", "ftp://x/y"] {
            assert!(target_of(bad).is_err(), "{bad:?}");
        }
        let message = target_of("posts").unwrap_err().to_string();
        assert!(message.contains("/posts/*"), "{message}");
    }

    #[tokio::test]
    async fn a_purge_covers_older_entries_only_and_survives_a_restart_through_the_log() {
        let dir = TestDir::new();
        let purges = Purges::new(Some(dir.path()), None);
        purges.loaded().await;
        let before = super::super::entry::now_unix_ms() - 10;
        assert!(!purges.covers("/posts/1", before));
        let outcome = purges.purge("/posts/*").await.unwrap();
        assert_eq!(outcome.shared, None);
        assert!(purges.covers("/posts/1", before));
        assert!(!purges.covers("/about", before));
        assert!(!purges.covers("/posts/1", super::super::entry::now_unix_ms() + 5_000));

        // A new process on the same directory knows the purge once loaded.
        let again = Purges::new(Some(dir.path()), None);
        again.loaded().await;
        assert!(again.covers("/posts/1", before));
        assert!(!again.covers("/about", before));
        // Without a log, nothing survives.
        let memory_only = Purges::new(None, None);
        memory_only.loaded().await;
        assert!(!memory_only.covers("/posts/1", before));
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped_and_compaction_keeps_the_newest_record() {
        let dir = TestDir::new();
        let path = dir.path().join(LOG_FILE);
        std::fs::write(&path, "k 100 /a\nk 300 /a\np 200 /b/\nk 5").unwrap();
        compact(&path).unwrap();
        let mut events = read_log(&path);
        events.sort_by_key(|e| e.at_unix_ms);
        assert_eq!(
            events,
            vec![
                PurgeEvent {
                    target: PurgeTarget::Prefix("/b/".into()),
                    at_unix_ms: 200
                },
                PurgeEvent {
                    target: PurgeTarget::Key("/a".into()),
                    at_unix_ms: 300
                },
            ]
        );
    }
}
