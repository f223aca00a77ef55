//! Purge records: what was purged (one key, or every key with a prefix) and
//! when, kept in Redis and mirrored in every instance's memory.
//!
//! A lookup in any tier asks [`PurgeIndex::covers`] whether the entry it
//! found was stored before a purge that names it. That check runs on every
//! hit, memory hits included, so it is local: a hash lookup for the exact
//! key and one per prefix record (or one per prefix of the key, whichever
//! is fewer). Nothing here scans Redis' keyspace.
//!
//! Wire form of an announcement on the channel, and nothing else:
//! `k <unix ms> <key>` or `p <unix ms> <prefix>` (the text runs to the end,
//! spaces and newlines included).

use std::collections::HashMap;

/// What a purge names. The text is compared with the text the caller gives
/// [`PurgeIndex::covers`], so both must come from the same normalisation
/// (the cache's base key form).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PurgeTarget {
    /// One key (every variant of it).
    Key(String),
    /// Every key starting with this text; `""` is everything.
    Prefix(String),
}

impl PurgeTarget {
    /// `Thruster.purge`'s argument: a trailing `*` makes a prefix, `*`
    /// alone is everything. (So a key that itself ends in `*` can only be
    /// purged through a prefix.)
    pub fn parse(text: &str) -> PurgeTarget {
        match text.strip_suffix('*') {
            Some(prefix) => PurgeTarget::Prefix(prefix.to_owned()),
            None => PurgeTarget::Key(text.to_owned()),
        }
    }

    pub fn matches(&self, key: &str) -> bool {
        match self {
            PurgeTarget::Key(k) => k == key,
            PurgeTarget::Prefix(p) => key.starts_with(p.as_str()),
        }
    }

    pub fn text(&self) -> &str {
        match self {
            PurgeTarget::Key(t) | PurgeTarget::Prefix(t) => t,
        }
    }
}

/// A purge, as announced: entries it matches that were stored at or before
/// `at_unix_ms` are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeEvent {
    pub target: PurgeTarget,
    pub at_unix_ms: u64,
}

impl PurgeEvent {
    pub fn covers(&self, key: &str, stored_at_unix_ms: u64) -> bool {
        stored_at_unix_ms <= self.at_unix_ms && self.target.matches(key)
    }

    pub fn encode(&self) -> String {
        let kind = match self.target {
            PurgeTarget::Key(_) => 'k',
            PurgeTarget::Prefix(_) => 'p',
        };
        format!("{kind} {} {}", self.at_unix_ms, self.target.text())
    }

    /// Parses an announcement; anything else (another program on the
    /// channel, a future format) is `None` and ignored.
    pub fn decode(payload: &[u8]) -> Option<PurgeEvent> {
        let text = std::str::from_utf8(payload).ok()?;
        let (kind, rest) = text.split_once(' ')?;
        let (at, target) = rest.split_once(' ')?;
        let at_unix_ms = at.parse().ok()?;
        let target = match kind {
            "k" => PurgeTarget::Key(target.to_owned()),
            "p" => PurgeTarget::Prefix(target.to_owned()),
            _ => return None,
        };
        Some(PurgeEvent { target, at_unix_ms })
    }
}

/// Above this many prefix records, [`PurgeIndex::covers`] looks up each
/// prefix of the key instead of testing each record.
const PREFIX_SCAN_LIMIT: usize = 32;

/// The local mirror of the purge records: the newest purge time per key
/// and per prefix.
#[derive(Debug, Default)]
pub struct PurgeIndex {
    keys: HashMap<String, u64>,
    prefixes: HashMap<String, u64>,
}

impl PurgeIndex {
    /// Records a purge. True if it is news (no record for that target at
    /// that time or later): the caller then announces it to local tiers.
    pub fn apply(&mut self, event: &PurgeEvent) -> bool {
        let map = match event.target {
            PurgeTarget::Key(_) => &mut self.keys,
            PurgeTarget::Prefix(_) => &mut self.prefixes,
        };
        match map.get_mut(event.target.text()) {
            Some(at) if *at >= event.at_unix_ms => false,
            Some(at) => {
                *at = event.at_unix_ms;
                true
            }
            None => {
                map.insert(event.target.text().to_owned(), event.at_unix_ms);
                true
            }
        }
    }

    /// Was an entry for `key` stored at `stored_at_unix_ms` purged since?
    pub fn covers(&self, key: &str, stored_at_unix_ms: u64) -> bool {
        let after = |at: &u64| *at >= stored_at_unix_ms;
        if self.keys.get(key).is_some_and(after) {
            return true;
        }
        if self.prefixes.is_empty() {
            return false;
        }
        if self.prefixes.len() <= PREFIX_SCAN_LIMIT {
            return self
                .prefixes
                .iter()
                .any(|(p, at)| after(at) && key.starts_with(p.as_str()));
        }
        (0..=key.len())
            .filter(|&i| key.is_char_boundary(i))
            .any(|i| self.prefixes.get(&key[..i]).is_some_and(after))
    }

    /// Drops records older than `before_unix_ms`: no entry that old can
    /// still exist anywhere.
    pub fn trim(&mut self, before_unix_ms: u64) {
        self.keys.retain(|_, at| *at >= before_unix_ms);
        self.prefixes.retain(|_, at| *at >= before_unix_ms);
    }

    pub fn len(&self) -> usize {
        self.keys.len() + self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(target: &str, at: u64) -> PurgeEvent {
        PurgeEvent {
            target: PurgeTarget::parse(target),
            at_unix_ms: at,
        }
    }

    #[test]
    fn targets_parse_with_a_trailing_star_as_prefix() {
        assert_eq!(PurgeTarget::parse("/a"), PurgeTarget::Key("/a".into()));
        assert_eq!(PurgeTarget::parse("/a*"), PurgeTarget::Prefix("/a".into()));
        assert_eq!(PurgeTarget::parse("*"), PurgeTarget::Prefix("".into()));
        assert!(PurgeTarget::parse("*").matches("anything"));
        assert!(PurgeTarget::parse("/a*").matches("/about"));
        assert!(!PurgeTarget::parse("/a").matches("/about"));
    }

    #[test]
    fn announcements_round_trip_and_junk_is_ignored() {
        for e in [
            event("http://h/a b\nc", 17),
            event("http://h/*", 1),
            event("*", u64::MAX),
        ] {
            assert_eq!(PurgeEvent::decode(e.encode().as_bytes()), Some(e));
        }
        for junk in [&b""[..], b"k", b"k 12", b"x 12 /a", b"k -1 /a", b"\xff 1 a"] {
            assert_eq!(PurgeEvent::decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn covers_entries_stored_at_or_before_the_purge() {
        let mut index = PurgeIndex::default();
        assert!(index.apply(&event("http://h/a", 100)));
        assert!(index.covers("http://h/a", 100));
        assert!(index.covers("http://h/a", 99));
        assert!(!index.covers("http://h/a", 101));
        assert!(!index.covers("http://h/ab", 50));
        // An older record for the same key is not news and changes nothing.
        assert!(!index.apply(&event("http://h/a", 90)));
        assert!(index.covers("http://h/a", 100));
        assert!(index.apply(&event("http://h/a", 200)));
        assert!(index.covers("http://h/a", 150));
    }

    #[test]
    fn prefixes_and_everything_both_lookup_strategies() {
        for extra in [0, 100] {
            let mut index = PurgeIndex::default();
            for i in 0..extra {
                index.apply(&event(&format!("http://other{i}/*"), 500));
            }
            index.apply(&event("http://h/assets/*", 100));
            assert!(index.covers("http://h/assets/app.css", 100));
            assert!(index.covers("http://h/assets/", 1));
            assert!(!index.covers("http://h/assets/app.css", 101));
            assert!(!index.covers("http://h/asset", 1));
            assert!(!index.covers("http://h/ässets/x", 1));
            index.apply(&event("*", 300));
            assert!(index.covers("http://anything/ü", 300));
            assert!(index.covers("", 0));
            assert!(!index.covers("http://anything", 301));
        }
    }

    #[test]
    fn trim_drops_old_records() {
        let mut index = PurgeIndex::default();
        index.apply(&event("/a", 10));
        index.apply(&event("/b*", 20));
        index.apply(&event("/c", 30));
        index.trim(20);
        assert_eq!(index.len(), 2);
        assert!(!index.covers("/a", 0));
        assert!(index.covers("/bx", 0));
    }
}
