//! Conditional requests (RFC 9110 §13): If-Match, If-Unmodified-Since,
//! If-None-Match, If-Modified-Since and If-Range, evaluated against the
//! validators of the representation we are about to serve.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method};

/// The validators of the selected representation.
///
/// `etag` is the ETag field value exactly as it is (or would be) sent, quotes
/// and `W/` included, so a cached response's header can be used unchanged.
/// A malformed value never matches anything rather than being "repaired".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Validators<'a> {
    pub etag: Option<&'a str>,
    pub last_modified: Option<SystemTime>,
}

impl<'a> Validators<'a> {
    /// Reads `ETag` and `Last-Modified` from a (cached) response's headers.
    /// An unparsable Last-Modified is treated as absent: comparing against a
    /// date we cannot read could only produce wrong 304s or 412s.
    pub fn from_headers(headers: &'a HeaderMap) -> Self {
        Validators {
            etag: headers.get(header::ETAG).and_then(|v| v.to_str().ok()),
            last_modified: headers
                .get(header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| httpdate::parse_http_date(s).ok()),
        }
    }
}

/// What the preconditions of a request say should happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Serve the request normally (possibly as a range, see
    /// [`super::range::select`]).
    Proceed,
    /// Answer `304 Not Modified` (only ever for GET and HEAD).
    NotModified,
    /// Answer `412 Precondition Failed`.
    PreconditionFailed,
}

/// Evaluates the request's preconditions in the order of RFC 9110 §13.2.2.
///
/// If-Range (step 5) is left to [`if_range_allows`], because it only decides
/// whether a Range is honoured, never the status of the whole response.
pub fn evaluate(method: &Method, req: &HeaderMap, v: &Validators) -> Precondition {
    let safe = method == Method::GET || method == Method::HEAD;

    // Step 1 and 2: If-Match, and If-Unmodified-Since only without it.
    if let Some(list) = tag_list(req, &header::IF_MATCH) {
        if !list.matches(v.etag, true) {
            return Precondition::PreconditionFailed;
        }
    } else if let Some(since) = single_date(req, &header::IF_UNMODIFIED_SINCE) {
        if v.last_modified
            .is_some_and(|lm| unix_secs(lm) > unix_secs(since))
        {
            return Precondition::PreconditionFailed;
        }
    }

    // Step 3 and 4: If-None-Match, and If-Modified-Since only without it.
    if let Some(list) = tag_list(req, &header::IF_NONE_MATCH) {
        if list.matches(v.etag, false) {
            return if safe {
                Precondition::NotModified
            } else {
                Precondition::PreconditionFailed
            };
        }
    } else if safe {
        if let Some(since) = single_date(req, &header::IF_MODIFIED_SINCE) {
            if v.last_modified
                .is_some_and(|lm| unix_secs(lm) <= unix_secs(since))
            {
                return Precondition::NotModified;
            }
        }
    }

    Precondition::Proceed
}

/// Representation metadata a `304 Not Modified` leaves out. RFC 9110
/// §15.4.5: the 304 carries the fields a 200 would have carried among
/// `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires` and `Vary`
/// (plus `Last-Modified`, which may stay), and no other representation
/// metadata: the client keeps its stored copy's type, length and coding.
const NOT_IN_304: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
];

/// Turns the headers a `200` would carry into those of its `304`.
pub fn not_modified_headers(headers: &mut HeaderMap) {
    for name in NOT_IN_304 {
        headers.remove(name);
    }
}

/// How long before `now` a Last-Modified date must lie for us to call it a
/// strong validator (§8.8.2.2). RFC 9110 only asks for "reliable knowledge
/// that the representation did not change twice during the second"; a file
/// untouched for a minute is the traditional (RFC 2616) way to know that.
pub const STRONG_LAST_MODIFIED_AGE: Duration = Duration::from_secs(60);

/// Whether `If-Range` lets the request's Range be honoured (§13.1.5).
///
/// True when there is no If-Range. An entity-tag must match the current ETag
/// by strong comparison; a date must equal Last-Modified exactly and that
/// Last-Modified must be strong, judged against `now` (the time the response
/// is generated, or a cached response's `Date`). Anything else, including an
/// unparsable or repeated field, means "send the whole representation",
/// which is always a safe answer.
pub fn if_range_allows(req: &HeaderMap, v: &Validators, now: SystemTime) -> bool {
    let mut values = req.get_all(header::IF_RANGE).iter();
    let Some(value) = values.next() else {
        return true;
    };
    if values.next().is_some() {
        return false;
    }
    let raw = trim_ows(value.as_bytes());
    if raw.starts_with(b"\"") || raw.starts_with(b"W/") {
        let (Some(theirs), Some(ours)) = (
            parse_entity_tag(raw),
            v.etag.and_then(|e| parse_entity_tag(e.as_bytes())),
        ) else {
            return false;
        };
        return theirs.strong_eq(&ours);
    }
    let (Some(date), Some(lm)) = (
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok()),
        v.last_modified,
    ) else {
        return false;
    };
    let strong = now
        .duration_since(lm)
        .is_ok_and(|age| age >= STRONG_LAST_MODIFIED_AGE);
    strong && unix_secs(date) == unix_secs(lm)
}

/// Formats `t` as an IMF-fixdate (§5.6.7), the only form we may send.
///
/// Clamped to 1970..=9999 because `httpdate` panics outside that span and a
/// file's mtime is whatever the filesystem says (0 and negative are common
/// in reproducible builds).
pub fn http_date(t: SystemTime) -> HeaderValue {
    const LATEST: Duration = Duration::from_secs(253_402_300_799); // 9999-12-31T23:59:59Z
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let clamped = UNIX_EPOCH + since_epoch.min(LATEST);
    HeaderValue::from_str(&httpdate::fmt_http_date(clamped))
        .expect("an IMF-fixdate is a valid header value")
}

/// A weak ETag for a file on disk, from its size and mtime: `W/"<size>-<mtime ns>"`
/// in hex.
///
/// Weak because nothing here proves byte identity (a file can be rewritten
/// with the same size inside one mtime tick), and because the same tag is
/// kept when the body is compressed on the way out or replaced by a
/// precompressed sibling, which strong tags forbid (§8.8.3). The cost is
/// that If-Range by ETag never matches; If-Range by date still does.
pub fn weak_etag_for(size: u64, mtime: SystemTime) -> String {
    let nanos = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("W/\"{size:x}-{nanos:x}\"")
}

/// HTTP dates have one-second resolution, filesystem times do not: compare
/// in whole seconds or a file would never be "not modified since" the date
/// we sent for it.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A date field that must hold exactly one HTTP-date (§13.1.3, §13.1.4):
/// repeated, unreadable or invalid values are ignored, as the RFC requires.
fn single_date(req: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let mut values = req.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntityTag<'a> {
    weak: bool,
    opaque: &'a [u8],
}

impl EntityTag<'_> {
    /// §8.8.3.2: both strong and identical.
    fn strong_eq(&self, other: &EntityTag) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// §8.8.3.2: identical opaque-tags, weakness ignored.
    fn weak_eq(&self, other: &EntityTag) -> bool {
        self.opaque == other.opaque
    }
}

/// Parses one complete entity-tag (§8.8.3), surrounding whitespace allowed.
pub(crate) fn parse_entity_tag(raw: &[u8]) -> Option<EntityTag<'_>> {
    match scan_entity_tag(trim_ows(raw)) {
        Some((tag, [])) => Some(tag),
        _ => None,
    }
}

/// Reads an entity-tag at the start of `s`, returning it and what follows.
fn scan_entity_tag(s: &[u8]) -> Option<(EntityTag<'_>, &[u8])> {
    let (weak, s) = match s.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let s = s.strip_prefix(b"\"")?;
    let end = s.iter().position(|&b| b == b'"')?;
    let opaque = &s[..end];
    // etagc = %x21 / %x23-7E / obs-text
    if !opaque
        .iter()
        .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
    {
        return None;
    }
    Some((EntityTag { weak, opaque }, &s[end + 1..]))
}

enum TagList<'a> {
    Any,
    Tags(Vec<EntityTag<'a>>),
}

impl TagList<'_> {
    /// `*` matches whenever a representation exists, and the caller always
    /// has one: that is what it is about to serve.
    fn matches(&self, etag: Option<&str>, strong: bool) -> bool {
        let tags = match self {
            TagList::Any => return true,
            TagList::Tags(tags) => tags,
        };
        let Some(ours) = etag.and_then(|e| parse_entity_tag(e.as_bytes())) else {
            return false;
        };
        tags.iter().any(|t| {
            if strong {
                t.strong_eq(&ours)
            } else {
                t.weak_eq(&ours)
            }
        })
    }
}

/// Collects If-Match / If-None-Match over all of the field's lines (§5.3).
///
/// `None` when the field is absent or every line is empty, so an empty field
/// is not mistaken for "matches nothing". Malformed members are skipped
/// rather than voiding the field: for If-None-Match that errs towards a full
/// response, for If-Match towards 412, both safe. The opaque-tag may itself
/// contain commas, so members are scanned, not split.
fn tag_list<'a>(req: &'a HeaderMap, name: &HeaderName) -> Option<TagList<'a>> {
    let mut present = false;
    let mut tags = Vec::new();
    for value in req.get_all(name) {
        let mut s = value.as_bytes();
        loop {
            s = trim_start(s, |b| b == b',' || b == b' ' || b == b'\t');
            if s.is_empty() {
                break;
            }
            present = true;
            if let Some(rest) = s.strip_prefix(b"*") {
                if member_ends(rest) {
                    return Some(TagList::Any);
                }
            } else if let Some((tag, rest)) = scan_entity_tag(s) {
                if member_ends(rest) {
                    tags.push(tag);
                    s = rest;
                    continue;
                }
            }
            // Not a valid member: drop everything up to the next comma.
            s = match s.iter().position(|&b| b == b',') {
                Some(i) => &s[i..],
                None => &[],
            };
        }
    }
    present.then_some(TagList::Tags(tags))
}

fn member_ends(rest: &[u8]) -> bool {
    matches!(trim_ows(rest).first(), None | Some(b','))
}

fn trim_start(s: &[u8], strip: impl Fn(u8) -> bool) -> &[u8] {
    let i = s.iter().position(|&b| !strip(b)).unwrap_or(s.len());
    &s[i..]
}

pub(crate) fn trim_ows(s: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

    /// Request header lines, in order, repeats allowed.
    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn at(s: &str) -> SystemTime {
        httpdate::parse_http_date(s).unwrap()
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn evaluate_follows_rfc_9110() {
        use Precondition::*;
        let strong = Validators {
            etag: Some("\"v1\""),
            last_modified: Some(at(LM) + Duration::from_millis(250)),
        };
        let weak = Validators {
            etag: Some("W/\"v1\""),
            ..strong
        };
        let bare = Validators::default();
        let get = Method::GET;
        let head = Method::HEAD;
        let put = Method::PUT;
        #[rustfmt::skip]
        let cases: &[(&str, &Method, Fields, &Validators, Precondition)] = &[
            ("§13.2.2 no preconditions", &get, &[], &strong, Proceed),
            // If-Match
            ("§13.1.1 If-Match strong match", &put, &[("if-match", "\"v1\"")], &strong, Proceed),
            ("§13.1.1 If-Match no match", &put, &[("if-match", "\"v2\"")], &strong, PreconditionFailed),
            ("§13.1.1 If-Match uses strong comparison (weak current)", &put, &[("if-match", "\"v1\"")], &weak, PreconditionFailed),
            ("§13.1.1 If-Match uses strong comparison (weak given)", &put, &[("if-match", "W/\"v1\"")], &strong, PreconditionFailed),
            ("§13.1.1 If-Match list", &get, &[("if-match", "\"a\", \"v1\"")], &strong, Proceed),
            ("§13.1.1 If-Match over several lines", &get, &[("if-match", "\"a\""), ("if-match", "\"v1\"")], &strong, Proceed),
            ("§13.1.1 If-Match * with a representation", &put, &[("if-match", "*")], &bare, Proceed),
            ("§13.1.1 If-Match without our ETag", &get, &[("if-match", "\"v1\"")], &bare, PreconditionFailed),
            ("§13.1.1 If-Match garbage", &get, &[("if-match", "v1")], &strong, PreconditionFailed),
            ("§5.3 empty If-Match is absent", &get, &[("if-match", "")], &strong, Proceed),
            // If-Unmodified-Since
            ("§13.1.4 If-Unmodified-Since same second", &put, &[("if-unmodified-since", LM)], &strong, Proceed),
            ("§13.1.4 If-Unmodified-Since older than LM", &put, &[("if-unmodified-since", "Sun, 06 Nov 1994 08:49:36 GMT")], &strong, PreconditionFailed),
            ("§13.1.4 If-Unmodified-Since ignored with If-Match", &put, &[("if-match", "*"), ("if-unmodified-since", "Sat, 01 Jan 1994 00:00:00 GMT")], &strong, Proceed),
            ("§13.1.4 If-Unmodified-Since invalid date ignored", &put, &[("if-unmodified-since", "yesterday")], &strong, Proceed),
            ("§13.1.4 If-Unmodified-Since list ignored", &put, &[("if-unmodified-since", "Sat, 01 Jan 1994 00:00:00 GMT"), ("if-unmodified-since", LM)], &strong, Proceed),
            ("§13.1.4 If-Unmodified-Since without Last-Modified", &put, &[("if-unmodified-since", "Sat, 01 Jan 1994 00:00:00 GMT")], &bare, Proceed),
            // If-None-Match
            ("§13.1.2 If-None-Match match on GET", &get, &[("if-none-match", "\"v1\"")], &strong, NotModified),
            ("§13.1.2 If-None-Match match on HEAD", &head, &[("if-none-match", "\"v1\"")], &strong, NotModified),
            ("§13.1.2 If-None-Match match on PUT", &put, &[("if-none-match", "\"v1\"")], &strong, PreconditionFailed),
            ("§13.1.2 If-None-Match weak comparison (weak given)", &get, &[("if-none-match", "W/\"v1\"")], &strong, NotModified),
            ("§13.1.2 If-None-Match weak comparison (weak current)", &get, &[("if-none-match", "\"v1\"")], &weak, NotModified),
            ("§13.1.2 If-None-Match no match", &get, &[("if-none-match", "\"v2\"")], &strong, Proceed),
            ("§13.1.2 If-None-Match list", &get, &[("if-none-match", "\"a\",W/\"v1\" , \"b\"")], &weak, NotModified),
            ("§13.1.2 If-None-Match several lines", &get, &[("if-none-match", "\"a\""), ("if-none-match", "\"v1\"")], &strong, NotModified),
            ("§13.1.2 If-None-Match *", &get, &[("if-none-match", "*")], &bare, NotModified),
            ("§13.1.2 If-None-Match * on PUT", &put, &[("if-none-match", "*")], &strong, PreconditionFailed),
            ("§8.8.3 opaque-tag may contain a comma", &get, &[("if-none-match", "\"a,b\"")], &Validators { etag: Some("\"a,b\""), ..bare }, NotModified),
            ("§13.1.2 malformed member skipped", &get, &[("if-none-match", "junk, \"v1\"")], &strong, NotModified),
            ("§13.1.2 no ETag, If-None-Match never matches", &get, &[("if-none-match", "\"v1\"")], &bare, Proceed),
            // If-Modified-Since
            ("§13.1.3 If-Modified-Since same second", &get, &[("if-modified-since", LM)], &strong, NotModified),
            ("§13.1.3 If-Modified-Since later", &get, &[("if-modified-since", "Mon, 07 Nov 1994 00:00:00 GMT")], &strong, NotModified),
            ("§13.1.3 If-Modified-Since earlier", &head, &[("if-modified-since", "Sun, 06 Nov 1994 08:49:36 GMT")], &strong, Proceed),
            ("§13.1.3 If-Modified-Since RFC 850 date", &get, &[("if-modified-since", "Sunday, 06-Nov-94 08:49:37 GMT")], &strong, NotModified),
            ("§13.1.3 If-Modified-Since asctime date", &get, &[("if-modified-since", "Sun Nov  6 08:49:37 1994")], &strong, NotModified),
            ("§13.1.3 If-Modified-Since only for GET/HEAD", &put, &[("if-modified-since", LM)], &strong, Proceed),
            ("§13.1.3 If-Modified-Since invalid date", &get, &[("if-modified-since", "06/11/1994")], &strong, Proceed),
            ("§13.1.3 If-Modified-Since list ignored", &get, &[("if-modified-since", LM), ("if-modified-since", LM)], &strong, Proceed),
            ("§13.1.3 If-Modified-Since ignored with If-None-Match", &get, &[("if-none-match", "\"v2\""), ("if-modified-since", LM)], &strong, Proceed),
            ("§13.1.3 If-Modified-Since without Last-Modified", &get, &[("if-modified-since", LM)], &bare, Proceed),
            // Order
            ("§13.2.2 If-Match failure wins over If-None-Match", &get, &[("if-match", "\"v2\""), ("if-none-match", "\"v1\"")], &strong, PreconditionFailed),
            ("§13.2.2 If-Unmodified-Since failure wins over If-Modified-Since", &get, &[("if-unmodified-since", "Sat, 01 Jan 1994 00:00:00 GMT"), ("if-modified-since", LM)], &strong, PreconditionFailed),
            ("§13.2.2 both pass then 304", &get, &[("if-match", "\"v1\""), ("if-none-match", "\"v1\"")], &strong, NotModified),
        ];
        for (name, method, fields, v, want) in cases {
            assert_eq!(evaluate(method, &headers(fields), v), *want, "{name}");
        }
    }

    #[test]
    fn if_range() {
        let lm = at(LM);
        let long_ago = Validators {
            etag: Some("\"v1\""),
            last_modified: Some(lm),
        };
        let weak = Validators {
            etag: Some("W/\"v1\""),
            ..long_ago
        };
        let later = lm + Duration::from_secs(3600);
        let just_now = lm + Duration::from_secs(5);
        #[rustfmt::skip]
        let cases: &[(&str, Fields, &Validators, SystemTime, bool)] = &[
            ("§13.1.5 no If-Range", &[], &long_ago, later, true),
            ("§13.1.5 strong ETag match", &[("if-range", "\"v1\"")], &long_ago, later, true),
            ("§13.1.5 ETag mismatch", &[("if-range", "\"v2\"")], &long_ago, later, false),
            ("§13.1.5 weak ETag never matches (strong comparison)", &[("if-range", "W/\"v1\"")], &weak, later, false),
            ("§13.1.5 strong tag vs weak current", &[("if-range", "\"v1\"")], &weak, later, false),
            ("§13.1.5 exact date match", &[("if-range", LM)], &long_ago, later, true),
            ("§13.1.5 date one second off", &[("if-range", "Sun, 06 Nov 1994 08:49:38 GMT")], &long_ago, later, false),
            ("§13.1.5 later date is not a match", &[("if-range", "Mon, 07 Nov 1994 08:49:37 GMT")], &long_ago, later, false),
            ("§8.8.2.2 fresh Last-Modified is weak", &[("if-range", LM)], &long_ago, just_now, false),
            ("§13.1.5 date without Last-Modified", &[("if-range", LM)], &Validators { etag: Some("\"v1\""), last_modified: None }, later, false),
            ("§13.1.5 garbage", &[("if-range", "v1")], &long_ago, later, false),
            ("§13.1.5 several lines", &[("if-range", "\"v1\""), ("if-range", "\"v1\"")], &long_ago, later, false),
        ];
        for (name, fields, v, now, want) in cases {
            assert_eq!(if_range_allows(&headers(fields), v, *now), *want, "{name}");
        }
    }

    #[test]
    fn dates_and_etags() {
        // §5.6.7 IMF-fixdate is what we send.
        assert_eq!(http_date(at(LM)), LM);
        assert_eq!(
            http_date(UNIX_EPOCH - Duration::from_secs(5)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(300_000_000_000)),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
        // §8.8.3 weak entity-tag syntax
        let t = UNIX_EPOCH + Duration::new(1, 5);
        assert_eq!(weak_etag_for(255, t), "W/\"ff-3b9aca05\"");
        assert!(parse_entity_tag(weak_etag_for(u64::MAX, SystemTime::now()).as_bytes()).is_some());
        assert_ne!(
            weak_etag_for(1, t),
            weak_etag_for(1, t + Duration::from_nanos(1))
        );

        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"x\""));
        h.insert(header::LAST_MODIFIED, HeaderValue::from_static(LM));
        let v = Validators::from_headers(&h);
        assert_eq!(v.etag, Some("\"x\""));
        assert_eq!(v.last_modified, Some(at(LM)));
    }

    #[test]
    fn a_304_keeps_validators_and_caching_fields_only() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("etag", "\"v1\""),
            ("cache-control", "public, max-age=60"),
            ("vary", "Accept-Encoding"),
            ("date", LM),
            ("expires", LM),
            ("last-modified", LM),
            ("content-location", "/a.css"),
            ("content-type", "text/css"),
            ("content-length", "4000"),
            ("content-encoding", "gzip"),
            ("content-language", "en"),
            ("content-range", "bytes 0-9/4000"),
            ("accept-ranges", "bytes"),
        ] {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        not_modified_headers(&mut h);
        let mut kept: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            [
                "cache-control",
                "content-location",
                "date",
                "etag",
                "expires",
                "last-modified",
                "vary"
            ]
        );
    }
}
