//! Range requests (RFC 9110 §14): parsing `Range: bytes=…` against a known
//! length, `Content-Range`, and multipart/byteranges framing.
//!
//! The framing is computed apart from the body so the same code serves an
//! in-memory cached body and a file read piece by piece
//! ([`Multipart::parts`] gives each part's header bytes and byte range; see
//! `files::respond`).

use std::ops::Range;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method};

use super::conditional::{if_range_allows, trim_ows, Validators};

/// An inclusive byte range `start..=end`, as Content-Range writes it. Always
/// non-empty and inside the representation it was parsed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range (never 0).
    pub fn size(&self) -> u64 {
        self.end - self.start + 1
    }

    /// The half-open form, for slicing and seeking.
    pub fn to_std(&self) -> Range<u64> {
        self.start..self.end + 1
    }
}

/// What to send for a GET that may carry a Range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeOutcome {
    /// 200 with the whole representation.
    Full,
    /// 206: one range → a single part with Content-Range; several →
    /// multipart/byteranges. Never empty.
    Partial(Vec<ByteRange>),
    /// 416 with `Content-Range: bytes */len` ([`unsatisfied_content_range`]).
    Unsatisfiable,
}

/// More range-specs than this in one request and we send the whole
/// representation instead (see [`parse`]).
pub const MAX_RANGES: usize = 100;

/// How many range-specs may overlap an earlier one before the request is
/// treated as abusive. One overlap happens innocently (`0-499,400-999` from
/// a client stitching two fetches); §17.15 names "more than two overlapping
/// ranges" as the pattern to refuse.
pub const MAX_OVERLAPS: usize = 1;

/// The whole of §13.2.2 step 5 and §14.2 for one request: Range is only
/// honoured on GET, only when If-Range allows it, and only if present once.
///
/// `now` is the time the response is generated (for a cached response, its
/// `Date`); it decides whether Last-Modified is strong enough for If-Range.
pub fn select(
    method: &Method,
    req: &HeaderMap,
    len: u64,
    validators: &Validators,
    now: SystemTime,
) -> RangeOutcome {
    if method != Method::GET {
        return RangeOutcome::Full;
    }
    let mut values = req.get_all(header::RANGE).iter();
    let Some(range) = values.next() else {
        return RangeOutcome::Full;
    };
    // Range is a singleton field; two of them is not something we can honour.
    if values.next().is_some() || !if_range_allows(req, validators, now) {
        return RangeOutcome::Full;
    }
    parse(range.as_bytes(), len)
}

/// Parses a Range field value for a representation of `len` bytes
/// (§14.1.1, §14.1.2, §14.2).
///
/// * A unit other than `bytes`, or any syntax error, means the field is
///   ignored: [`RangeOutcome::Full`] (§14.2 allows ignoring an invalid Range).
/// * Ranges that start at or past `len` are dropped; if none is left the
///   request is [`RangeOutcome::Unsatisfiable`]. A zero-length suffix is
///   unsatisfiable too.
/// * Overlapping and adjacent ranges are coalesced; the parts keep the order
///   the client asked for them in (§14.6 "SHOULD send the parts in the same
///   order").
/// * Abusive requests (§17.15) — more than [`MAX_RANGES`] specs, or more than
///   [`MAX_OVERLAPS`] specs overlapping earlier ones — get
///   [`RangeOutcome::Full`], not 416: the ranges are satisfiable, so 416
///   would be a lie that makes clients retry or give up, whereas 200 is always
///   a correct answer to a GET and costs no more than the client could have
///   asked for with one `bytes=0-`.
/// * An empty representation cannot be described by a 206 (there is no
///   `bytes 0--1/0`), so a suffix range on it yields the (empty) Full body,
///   and any other range is unsatisfiable.
pub fn parse(value: &[u8], len: u64) -> RangeOutcome {
    let value = trim_ows(value);
    let Some(eq) = value.iter().position(|&b| b == b'=') else {
        return RangeOutcome::Full;
    };
    if !trim_ows(&value[..eq]).eq_ignore_ascii_case(b"bytes") {
        return RangeOutcome::Full;
    }

    // (range, position in the request)
    let mut wanted: Vec<(ByteRange, usize)> = Vec::new();
    let mut specs = 0;
    let mut empty_but_satisfiable = false;
    for spec in value[eq + 1..].split(|&b| b == b',') {
        let spec = trim_ows(spec);
        if spec.is_empty() {
            continue; // §5.6.1: empty list elements are allowed and ignored.
        }
        specs += 1;
        if specs > MAX_RANGES {
            return RangeOutcome::Full;
        }
        let Some(spec) = Spec::parse(spec) else {
            return RangeOutcome::Full;
        };
        match spec.resolve(len) {
            Resolved::Range(r) => wanted.push((r, specs)),
            Resolved::EmptyRepresentation => empty_but_satisfiable = true,
            Resolved::Unsatisfiable => {}
        }
    }
    if specs == 0 {
        return RangeOutcome::Full;
    }
    if wanted.is_empty() {
        return if empty_but_satisfiable {
            RangeOutcome::Full
        } else {
            RangeOutcome::Unsatisfiable
        };
    }

    wanted.sort_by_key(|(r, _)| (r.start, r.end));
    let mut merged: Vec<(ByteRange, usize)> = Vec::with_capacity(wanted.len());
    let mut overlaps = 0;
    for (r, pos) in wanted {
        match merged.last_mut() {
            Some((last, last_pos)) if r.start <= last.end.saturating_add(1) => {
                if r.start <= last.end {
                    overlaps += 1;
                    if overlaps > MAX_OVERLAPS {
                        return RangeOutcome::Full;
                    }
                }
                last.end = last.end.max(r.end);
                *last_pos = (*last_pos).min(pos);
            }
            _ => merged.push((r, pos)),
        }
    }
    merged.sort_by_key(|&(_, pos)| pos);
    RangeOutcome::Partial(merged.into_iter().map(|(r, _)| r).collect())
}

enum Spec {
    /// `first-last` or `first-`
    Int(u64, Option<u64>),
    /// `-n`
    Suffix(u64),
}

enum Resolved {
    Range(ByteRange),
    Unsatisfiable,
    EmptyRepresentation,
}

impl Spec {
    fn parse(s: &[u8]) -> Option<Spec> {
        let dash = s.iter().position(|&b| b == b'-')?;
        let (first, last) = (&s[..dash], &s[dash + 1..]);
        if first.is_empty() {
            return Some(Spec::Suffix(digits(last)?));
        }
        let first = digits(first)?;
        if last.is_empty() {
            return Some(Spec::Int(first, None));
        }
        let last = digits(last)?;
        // §14.1.1: last-pos below first-pos makes the whole field invalid.
        (last >= first).then_some(Spec::Int(first, Some(last)))
    }

    fn resolve(self, len: u64) -> Resolved {
        match self {
            Spec::Int(first, _) if first >= len => Resolved::Unsatisfiable,
            Spec::Int(first, last) => Resolved::Range(ByteRange {
                start: first,
                end: last.map_or(len - 1, |l| l.min(len - 1)),
            }),
            Spec::Suffix(0) => Resolved::Unsatisfiable,
            Spec::Suffix(_) if len == 0 => Resolved::EmptyRepresentation,
            Spec::Suffix(n) => Resolved::Range(ByteRange {
                start: len.saturating_sub(n),
                end: len - 1,
            }),
        }
    }
}

/// 1*DIGIT. Values past u64 saturate: `bytes=0-99999999999999999999999` is
/// a valid way to say "to the end", and a first-pos that large is simply
/// past any length.
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// `Content-Range: bytes start-end/len` for a 206 part (§14.4).
pub fn content_range(range: ByteRange, len: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes {}-{}/{len}", range.start, range.end))
        .expect("digits are a valid header value")
}

/// `Content-Range: bytes */len` for a 416 (§14.4, §15.5.17).
pub fn unsatisfied_content_range(len: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes */{len}")).expect("digits are a valid header value")
}

/// One part of a multipart/byteranges body: its delimiter and headers, then
/// `range` of the representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub head: Bytes,
    pub range: ByteRange,
}

/// The framing of a multipart/byteranges body (§14.6).
///
/// Send, in order: for each of [`parts`](Self::parts) its `head` then the
/// bytes of its `range`; then [`trailer`](Self::trailer). The result is
/// exactly [`content_length`](Self::content_length) bytes long.
#[derive(Debug, Clone)]
pub struct Multipart {
    content_type: HeaderValue,
    parts: Vec<Part>,
    trailer: Bytes,
    content_length: u64,
}

impl Multipart {
    /// Frames `ranges` of a `len`-byte representation with a fresh random
    /// boundary. `content_type` is the representation's own, repeated in each
    /// part as §14.6 asks; without one the parts carry only Content-Range.
    pub fn new(content_type: Option<&HeaderValue>, len: u64, ranges: &[ByteRange]) -> Multipart {
        Self::with_boundary(&new_boundary(), content_type, len, ranges)
            .expect("generated boundaries are valid")
    }

    /// As [`new`](Self::new) with a chosen boundary: 1 to 70 characters of
    /// `A-Z a-z 0-9 ' ( ) + _ , - . / : = ?` (RFC 2046 bcharsnospace), or
    /// `None`. The boundary is always sent quoted, so all of them are safe in
    /// the Content-Type parameter.
    pub fn with_boundary(
        boundary: &str,
        content_type: Option<&HeaderValue>,
        len: u64,
        ranges: &[ByteRange],
    ) -> Option<Multipart> {
        let valid = (1..=70).contains(&boundary.len())
            && boundary
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=?".contains(&b));
        if !valid {
            return None;
        }
        let mut content_length = 0u64;
        let parts: Vec<Part> = ranges
            .iter()
            .enumerate()
            .map(|(i, &range)| {
                // The first delimiter needs no CRLF before it: there is no
                // preamble, and every later CRLF ends the previous part's data.
                let mut head = BytesMut::new();
                if i > 0 {
                    head.put_slice(b"\r\n");
                }
                head.put_slice(b"--");
                head.put_slice(boundary.as_bytes());
                head.put_slice(b"\r\n");
                if let Some(ct) = content_type {
                    head.put_slice(b"content-type: ");
                    head.put_slice(ct.as_bytes());
                    head.put_slice(b"\r\n");
                }
                head.put_slice(b"content-range: ");
                head.put_slice(content_range(range, len).as_bytes());
                head.put_slice(b"\r\n\r\n");
                content_length += head.len() as u64 + range.size();
                Part {
                    head: head.freeze(),
                    range,
                }
            })
            .collect();
        let trailer = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        content_length += trailer.len() as u64;
        let content_type =
            HeaderValue::from_str(&format!("multipart/byteranges; boundary=\"{boundary}\""))
                .ok()?;
        Some(Multipart {
            content_type,
            parts,
            trailer,
            content_length,
        })
    }

    /// `multipart/byteranges; boundary="…"`, the response's Content-Type.
    pub fn content_type(&self) -> &HeaderValue {
        &self.content_type
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The close delimiter, sent after the last part's data.
    pub fn trailer(&self) -> &Bytes {
        &self.trailer
    }

    /// The exact length of the whole multipart body, for Content-Length.
    pub fn content_length(&self) -> u64 {
        self.content_length
    }
}

/// A boundary unlikely to occur in any body: 128 random bits. The body is
/// the application's own; we only have to avoid colliding with it.
pub fn new_boundary() -> String {
    format!("thruster-{}", crate::sys::random::hex(16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use RangeOutcome::{Full, Partial, Unsatisfiable};

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn parse_follows_rfc_9110() {
        let too_many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        let hundred: String = (0..MAX_RANGES as u64)
            .map(|i| format!("{}-{}", i * 10, i * 10))
            .collect::<Vec<_>>()
            .join(",");
        let hundred = format!("bytes={hundred}");
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, u64, RangeOutcome)> = vec![
            ("§14.1.2 first 500 bytes", "bytes=0-499", 10000, Partial(vec![r(0, 499)])),
            ("§14.1.2 second 500 bytes", "bytes=500-999", 10000, Partial(vec![r(500, 999)])),
            ("§14.1.2 open range to the end", "bytes=9500-", 10000, Partial(vec![r(9500, 9999)])),
            ("§14.1.2 suffix range", "bytes=-500", 10000, Partial(vec![r(9500, 9999)])),
            ("§14.1.2 first and last byte", "bytes=0-0,-1", 10000, Partial(vec![r(0, 0), r(9999, 9999)])),
            ("§14.1.2 last-pos past the end is clamped", "bytes=9000-20000", 10000, Partial(vec![r(9000, 9999)])),
            ("§14.1.2 huge last-pos saturates", "bytes=0-99999999999999999999999", 10, Partial(vec![r(0, 9)])),
            ("§14.1.2 suffix longer than the representation", "bytes=-20000", 10000, Partial(vec![r(0, 9999)])),
            ("§14.1.1 unit is case-insensitive", "Bytes=0-1", 10, Partial(vec![r(0, 1)])),
            ("§5.6.1 whitespace and empty list elements", "bytes= 0-1 , ,\t4-5,", 10, Partial(vec![r(0, 1), r(4, 5)])),
            ("§14.6 parts keep the requested order", "bytes=8-9,0-1", 10, Partial(vec![r(8, 9), r(0, 1)])),
            ("§14.2 overlapping ranges coalesced", "bytes=500-700,601-999", 10000, Partial(vec![r(500, 999)])),
            ("§14.2 adjacent ranges coalesced", "bytes=0-4,5-9,20-29", 100, Partial(vec![r(0, 9), r(20, 29)])),
            ("§14.2 coalesced part takes the earliest position", "bytes=50-59,10-19,15-24", 100, Partial(vec![r(50, 59), r(10, 24)])),
            ("§14.1.1 unsatisfiable ranges dropped from a satisfiable set", "bytes=0-1,20000-", 10, Partial(vec![r(0, 1)])),
            ("§14.1.1 a whole-representation range is still a 206", "bytes=0-", 10, Partial(vec![r(0, 9)])),
            ("§17.15 up to MAX_RANGES specs accepted", &hundred, 10000, Partial((0..MAX_RANGES as u64).map(|i| r(i * 10, i * 10)).collect())),
            // Unsatisfiable
            ("§14.1.1 first-pos at the length", "bytes=10-", 10, Unsatisfiable),
            ("§14.1.1 first-pos past the length", "bytes=20-30", 10, Unsatisfiable),
            ("§14.1.1 zero-length suffix", "bytes=-0", 10, Unsatisfiable),
            ("§14.1.1 huge first-pos", "bytes=99999999999999999999999-", 10, Unsatisfiable),
            ("§14.1.1 any int range of an empty representation", "bytes=0-", 0, Unsatisfiable),
            ("§14.1.1 suffix of an empty representation", "bytes=-5", 0, Full),
            // Ignored
            ("§14.2 unknown unit", "items=0-1", 10, Full),
            ("§14.2 no unit", "0-1", 10, Full),
            ("§14.1.1 last-pos below first-pos", "bytes=5-1", 10, Full),
            ("§14.1.1 invalid spec voids the set", "bytes=0-1,x-2", 10, Full),
            ("§14.1.1 missing both positions", "bytes=-", 10, Full),
            ("§14.1.1 empty range-set", "bytes=", 10, Full),
            ("§14.1.1 negative numbers", "bytes=--5", 10, Full),
            ("§14.1.1 sign", "bytes=+0-1", 10, Full),
            ("§14.1.1 inner whitespace", "bytes=0 - 1", 10, Full),
            ("§17.15 more than MAX_RANGES specs", &too_many, 10, Full),
            ("§17.15 three overlapping ranges", "bytes=0-5,1-6,2-7", 10, Full),
            ("§17.15 repeated whole-body ranges", "bytes=0-,0-,0-", 10, Full),
            ("§17.15 one overlap is tolerated", "bytes=0-5,3-9", 10, Partial(vec![r(0, 9)])),
        ];
        for (name, value, len, want) in cases {
            assert_eq!(parse(value.as_bytes(), len), want, "{name}: {value}");
        }
    }

    #[test]
    fn select_applies_method_and_if_range() {
        let lm = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v = Validators {
            etag: Some("\"v1\""),
            last_modified: Some(lm),
        };
        let now = lm + Duration::from_secs(3600);
        let req = |fields: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, val) in fields {
                h.append(*n, HeaderValue::from_static(val));
            }
            h
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Method, HeaderMap, RangeOutcome)> = vec![
            ("§14.2 Range on GET", Method::GET, req(&[("range", "bytes=0-1")]), Partial(vec![r(0, 1)])),
            ("§14.2 no Range", Method::GET, req(&[]), Full),
            ("§14.2 Range ignored on HEAD", Method::HEAD, req(&[("range", "bytes=0-1")]), Full),
            ("§14.2 Range ignored on POST", Method::POST, req(&[("range", "bytes=0-1")]), Full),
            ("§14.2 two Range fields", Method::GET, req(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]), Full),
            ("§13.1.5 If-Range matches", Method::GET, req(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]), Partial(vec![r(0, 1)])),
            ("§13.1.5 If-Range stale", Method::GET, req(&[("range", "bytes=0-1"), ("if-range", "\"v0\"")]), Full),
            ("§13.1.5 stale If-Range never yields 416", Method::GET, req(&[("range", "bytes=50-"), ("if-range", "\"v0\"")]), Full),
            ("§14.1.1 416 when If-Range matches", Method::GET, req(&[("range", "bytes=50-"), ("if-range", "\"v1\"")]), Unsatisfiable),
        ];
        for (name, method, headers, want) in cases {
            assert_eq!(select(&method, &headers, 10, &v, now), want, "{name}");
        }
    }

    #[test]
    fn content_range_values() {
        // §14.4 Content-Range
        assert_eq!(content_range(r(0, 499), 1234), "bytes 0-499/1234");
        assert_eq!(unsatisfied_content_range(1234), "bytes */1234");
        assert_eq!(r(5, 5).size(), 1);
        assert_eq!(r(5, 9).to_std(), 5..10);
    }

    #[test]
    fn multipart_framing() {
        // §14.6 multipart/byteranges
        let ct = HeaderValue::from_static("text/plain");
        let ranges = [r(0, 2), r(7, 9)];
        let m = Multipart::with_boundary("B0", Some(&ct), 10, &ranges).unwrap();
        assert_eq!(m.content_type(), "multipart/byteranges; boundary=\"B0\"");
        let body = b"0123456789";
        let mut out = Vec::new();
        for p in m.parts() {
            out.extend_from_slice(&p.head);
            out.extend_from_slice(&body[p.range.start as usize..=p.range.end as usize]);
        }
        out.extend_from_slice(m.trailer());
        let want = "--B0\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-2/10\r\n\r\n012\
                    \r\n--B0\r\ncontent-type: text/plain\r\ncontent-range: bytes 7-9/10\r\n\r\n789\
                    \r\n--B0--\r\n";
        assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
        assert_eq!(m.content_length(), out.len() as u64);

        // Without a representation type the parts carry only Content-Range.
        let m = Multipart::with_boundary("B0", None, 10, &ranges).unwrap();
        assert!(!m.parts()[0].head.windows(13).any(|w| w == b"content-type:"));

        for bad in ["", "has space", "quote\"", &"x".repeat(71), "ü"] {
            assert!(
                Multipart::with_boundary(bad, None, 10, &ranges).is_none(),
                "{bad:?}"
            );
        }
        assert!(Multipart::with_boundary(&"x".repeat(70), None, 10, &ranges).is_some());
        assert!(Multipart::with_boundary("a'()+_,-./:=?", None, 10, &ranges).is_some());

        let (a, b) = (new_boundary(), new_boundary());
        assert_ne!(a, b);
        assert!(Multipart::with_boundary(&a, None, 10, &ranges).is_some());
    }
}
