//! Conditional requests: `conditional::evaluate` and `if_range_allows` over
//! arbitrary If-* lines and validators.
//!
//! Invariants: no panic; 304 only for GET and HEAD; no precondition field
//! means Proceed and an absent If-Range allows the range; a weak ETag never
//! satisfies If-Range; `http_date` is readable back to the same second.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use thruster_core::files::conditional::{
    evaluate, http_date, if_range_allows, Precondition, Validators,
};
use thruster_core_fuzz::{fields, headers, number, value};

const FIELDS: [HeaderName; 5] = [
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

fn time(secs: u64) -> SystemTime {
    // Up to the year ~10000, past httpdate's range on purpose.
    UNIX_EPOCH + Duration::from_secs(secs % 260_000_000_000)
}

// Input: request lines `if-match`, `if-none-match`, `if-modified-since`,
// `if-unmodified-since`, `if-range`; the representation's `etag` and
// `last-modified` (read as response fields); `method` (GET, HEAD, POST…) and
// `now` (Unix seconds, default 2026-01-01).
fuzz_target!(|data: &[u8]| {
    let fields = fields(data);
    let method = value(&fields, "method")
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let names: Vec<(&str, HeaderName)> = FIELDS.iter().map(|h| (h.as_str(), h.clone())).collect();
    let req = headers(&fields, &names);
    let response = headers(
        &fields,
        &[
            ("etag", header::ETAG),
            ("last-modified", header::LAST_MODIFIED),
        ],
    );
    let validators = Validators::from_headers(&response);
    let now = value(&fields, "now").map_or(UNIX_EPOCH + Duration::from_secs(1_767_225_600), |n| {
        time(number(n))
    });

    let outcome = evaluate(&method, &req, &validators);
    if outcome == Precondition::NotModified {
        assert!(method == Method::GET || method == Method::HEAD);
    }
    let preconditions = FIELDS[..4].iter().any(|f| req.contains_key(f));
    if !preconditions {
        assert_eq!(outcome, Precondition::Proceed);
    }

    let allows = if_range_allows(&req, &validators, now);
    if !req.contains_key(header::IF_RANGE) {
        assert!(allows);
    } else if allows {
        assert_eq!(req.get_all(header::IF_RANGE).iter().count(), 1);
        let if_range = req[header::IF_RANGE].as_bytes().trim_ascii();
        if if_range.starts_with(b"W/") || if_range.starts_with(b"\"") {
            let ours = validators.etag.expect("a tag matched ours").trim();
            assert!(!ours.starts_with("W/"), "a weak ETag satisfied If-Range");
        } else {
            let lm = validators.last_modified.expect("a date matched ours");
            assert!(now >= lm);
        }
    }

    if let Some(lm) = validators.last_modified {
        let text = http_date(lm);
        let back = httpdate_parse(text.to_str().unwrap());
        let secs = lm.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(back, secs.min(253_402_300_799), "{text:?}");
    }
});

fn httpdate_parse(s: &str) -> u64 {
    // Through the crate's own reader: a response carrying our date must
    // give the same validator back.
    let mut h = HeaderMap::new();
    h.insert(header::LAST_MODIFIED, HeaderValue::from_str(s).unwrap());
    Validators::from_headers(&h)
        .last_modified
        .expect("our own date is readable")
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
