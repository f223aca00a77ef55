//! Cache-Control parsing (`Directives::parse`) and the storability decision
//! (`directives::storable`) over arbitrary header lines.
//!
//! Invariants: no panic; directive names are case-insensitive; several lines
//! mean the same as one comma-joined line (when no quotes span them); a
//! stored response was marked shareable, carried none of no-store, private,
//! no-cache or Set-Cookie, and has a positive lifetime.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use thruster_core::pipeline::cache::directives::{storable, Directives};
use thruster_core_fuzz::{fields, headers, number, value};

/// Response fields `storable` reads besides Cache-Control.
const RESPONSE: [(&str, HeaderName); 8] = [
    ("cache-control", header::CACHE_CONTROL),
    ("expires", header::EXPIRES),
    ("date", header::DATE),
    ("age", header::AGE),
    ("vary", header::VARY),
    ("content-encoding", header::CONTENT_ENCODING),
    ("set-cookie", header::SET_COOKIE),
    ("pragma", header::PRAGMA),
];

/// Request fields: `request-cache-control` and `authorization`.
const REQUEST: [(&str, HeaderName); 2] = [
    ("request-cache-control", header::CACHE_CONTROL),
    ("authorization", header::AUTHORIZATION),
];

fn check_directives(h: &HeaderMap) -> Directives {
    let d = Directives::parse(h);
    assert_eq!(d, Directives::parse(h), "parse is deterministic");

    // Names are case-insensitive; values are digits, so case cannot matter.
    let mut upper = HeaderMap::new();
    for v in h.get_all(header::CACHE_CONTROL) {
        let v = HeaderValue::from_bytes(&v.as_bytes().to_ascii_uppercase()).unwrap();
        upper.append(header::CACHE_CONTROL, v);
    }
    assert_eq!(d, Directives::parse(&upper), "case changed the meaning");

    // RFC 9110 §5.3: lines combine into one comma-separated list.
    let texts: Option<Vec<&str>> = h
        .get_all(header::CACHE_CONTROL)
        .iter()
        .map(|v| v.to_str().ok())
        .collect();
    if let Some(texts) = texts {
        if texts.len() > 1 && !texts.iter().any(|t| t.contains('"')) {
            let mut joined = HeaderMap::new();
            joined.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_str(&texts.join(", ")).unwrap(),
            );
            assert_eq!(
                d,
                Directives::parse(&joined),
                "joining lines changed the meaning"
            );
        }
    }
    d
}

// Input: response fields (`cache-control`, `expires`, `date`, `age`,
// `vary`, `content-encoding`, `set-cookie`, `pragma`), request fields
// (`request-cache-control`, `authorization`), `method`, `status`, `now`
// (Unix seconds) and `default-stale-if-error` (seconds).
fuzz_target!(|data: &[u8]| {
    let fields = fields(data);
    let response = headers(&fields, &RESPONSE);
    let request = headers(&fields, &REQUEST);
    let resp = check_directives(&response);
    let req = check_directives(&request);
    let status = value(&fields, "status").map_or(200, |s| number(s) % 1000) as u16;
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    let method = value(&fields, "method")
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let now = UNIX_EPOCH
        + Duration::from_secs(
            value(&fields, "now").map_or(1_767_225_600, |n| number(n) % (1 << 40)),
        );
    let default_sie = Duration::from_secs(
        value(&fields, "default-stale-if-error").map_or(300, number) % (1 << 32),
    );
    let Ok(freshness) = storable(&method, &request, status, &response, now, default_sie) else {
        return;
    };
    assert_eq!(method, Method::GET);
    let code = status.as_u16();
    assert!((200..400).contains(&code) && code != 206 && code != 304);
    assert!(!req.no_store && !resp.no_store && !resp.private && !resp.no_cache);
    assert!(resp.public || resp.s_maxage.is_some());
    assert!(!response.contains_key(header::SET_COOKIE));
    assert!(freshness.lifetime > Duration::ZERO);
    assert!(freshness.lifetime.as_secs() <= u64::from(u32::MAX));
    assert!(freshness.initial_age.as_secs() <= u64::from(u32::MAX));
    if resp.must_revalidate || resp.proxy_revalidate {
        assert_eq!(freshness.stale_if_error, Duration::ZERO);
    }
    assert_eq!(freshness.immutable, resp.immutable);
    // A stored response's times must be usable without overflow.
    let _ = SystemTime::now().checked_add(freshness.lifetime + freshness.stale_if_error);
});
