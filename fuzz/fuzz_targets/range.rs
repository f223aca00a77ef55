//! `Range` parsing (`range::parse`, `range::select`) and the 206 bodies
//! `files::respond` builds from its ranges (with `Multipart` framing).
//!
//! Invariants for a Partial outcome: at least one and at most `MAX_RANGES`
//! ranges, each non-empty and inside `0..len`, no two overlapping or
//! adjacent (they were coalesced); a single-range body is exactly that
//! slice; a multipart body is exactly the framing `Multipart` describes,
//! `content_length` bytes long. `select` only ever answers Full or what
//! `parse` says.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body::Body as _;
use libfuzzer_sys::fuzz_target;
use thruster_core::files::conditional::Validators;
use thruster_core::files::range::{
    content_range, parse, select, ByteRange, Multipart, RangeOutcome, MAX_RANGES,
};
use thruster_core::files::respond::{respond, Representation, Source};
use thruster_core::http::ResponseBody;
use thruster_core_fuzz::{fields, number, value};

const BODY_MAX: u64 = 4096;

fn check_ranges(ranges: &[ByteRange], len: u64) {
    assert!(!ranges.is_empty() && ranges.len() <= MAX_RANGES);
    for r in ranges {
        assert!(r.start <= r.end && r.end < len, "{r:?} outside 0..{len}");
        assert!(r.size() >= 1 && r.to_std().end <= len);
    }
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    for pair in sorted.windows(2) {
        assert!(
            pair[0].end + 1 < pair[1].start,
            "ranges not coalesced: {pair:?}"
        );
    }
}

/// The boundary parameter of `multipart/byteranges; boundary="…"`.
fn boundary(content_type: &HeaderValue) -> &str {
    let s = content_type
        .to_str()
        .expect("our own content type is ASCII");
    let (_, rest) = s.split_once("boundary=\"").expect("a boundary parameter");
    rest.strip_suffix('"').expect("a quoted boundary")
}

/// The bytes of an in-memory body (a `Full`, ready at once).
fn bytes_of(mut body: ResponseBody) -> Bytes {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = BytesMut::new();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => out.put(frame.into_data().expect("data")),
            Poll::Ready(None) => return out.freeze(),
            other => panic!("an in-memory body is ready at once: {other:?}"),
        }
    }
}

/// The 206 `files::respond` makes from `range_value` over a `len`-byte body
/// in memory, checked against the framing `Multipart` describes.
fn check_body(
    range_value: &HeaderValue,
    ranges: &[ByteRange],
    len: u64,
    content_type: Option<&HeaderValue>,
) {
    let body: Bytes = (0..len).map(|i| (i % 251) as u8).collect();
    let mut headers = HeaderMap::new();
    if let Some(t) = content_type {
        headers.insert(header::CONTENT_TYPE, t.clone());
    }
    let mut request = HeaderMap::new();
    request.insert(header::RANGE, range_value.clone());
    let representation = Representation {
        status: StatusCode::OK,
        headers,
        source: Source::Bytes(body.clone()),
    };
    let response = respond(
        &Method::GET,
        &request,
        representation,
        SystemTime::now(),
        |_, _, _| None,
    );
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    let (parts, sliced) = response.into_parts();
    let sliced = bytes_of(sliced);
    assert_eq!(
        parts.headers[header::CONTENT_LENGTH],
        sliced.len().to_string().as_str()
    );
    if let [only] = ranges {
        assert_eq!(sliced, body.slice(only.start as usize..=only.end as usize));
        assert_eq!(
            parts.headers.get(header::CONTENT_RANGE),
            Some(&content_range(*only, len))
        );
        assert_eq!(parts.headers.get(header::CONTENT_TYPE), content_type);
        return;
    }
    assert!(!parts.headers.contains_key(header::CONTENT_RANGE));
    let multipart_type = parts.headers[header::CONTENT_TYPE].clone();
    let framing = Multipart::with_boundary(boundary(&multipart_type), content_type, len, ranges)
        .expect("the boundary we generated is valid");
    assert_eq!(framing.content_type(), &multipart_type);
    assert_eq!(framing.parts().len(), ranges.len());
    let mut expected = BytesMut::new();
    for (part, range) in framing.parts().iter().zip(ranges) {
        assert_eq!(&part.range, range);
        expected.put_slice(&part.head);
        expected.put_slice(&body[range.start as usize..=range.end as usize]);
    }
    expected.put_slice(framing.trailer());
    assert_eq!(sliced.len() as u64, framing.content_length());
    assert_eq!(sliced, expected.freeze());
    // A fresh random boundary has the same length, so the same total.
    let fresh = Multipart::new(content_type, len, ranges);
    assert_eq!(fresh.content_length(), framing.content_length());
}

// Input: `len: <bytes>` (a body is sliced when it is at most 4096; a
// `typed` line gives it a Content-Type), `range: <value>`, and optionally
// `if-range: <value>`.
fuzz_target!(|data: &[u8]| {
    let fields = fields(data);
    let len = value(&fields, "len").map_or(0, number);
    let typed = value(&fields, "typed").is_some();
    let range_value = value(&fields, "range").unwrap_or_default();
    let outcome = parse(range_value, len);
    if let RangeOutcome::Partial(ranges) = &outcome {
        check_ranges(ranges, len);
        if let (true, Ok(header)) = (len <= BODY_MAX, HeaderValue::from_bytes(range_value)) {
            let content_type = HeaderValue::from_static("text/plain; charset=utf-8");
            check_body(&header, ranges, len, typed.then_some(&content_type));
        }
    }
    if len == 0 {
        assert!(!matches!(outcome, RangeOutcome::Partial(_)));
    }

    let Ok(range) = HeaderValue::from_bytes(range_value) else {
        return;
    };
    let mut req = HeaderMap::new();
    req.insert(header::RANGE, range);
    if let Some(value) = value(&fields, "if-range").and_then(|v| HeaderValue::from_bytes(v).ok()) {
        req.insert(header::IF_RANGE, value);
    }
    let modified = UNIX_EPOCH + Duration::from_secs(784_111_777);
    let validators = Validators {
        etag: Some("\"abc\""),
        last_modified: Some(modified),
    };
    let now = SystemTime::now();
    let selected = select(&Method::GET, &req, len, &validators, now);
    assert!(selected == RangeOutcome::Full || selected == outcome);
    if !req.contains_key(header::IF_RANGE) {
        assert_eq!(selected, outcome);
    }
    assert_eq!(
        select(&Method::HEAD, &req, len, &validators, now),
        RangeOutcome::Full
    );
});
