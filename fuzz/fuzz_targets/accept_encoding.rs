//! Accept-Encoding: the compression choices (`http::coding::negotiate_for`,
//! for stored variants and per response), the
//! cache's reading of the same field (`http::coding::accepts`, `CacheKey`), plus
//! `vary_names` and `normalise_host` over the same bytes.
//!
//! Invariants: no panic; the coding compression picks is one the cache
//! considers accepted, and compression picks nothing only when the cache
//! sees none of br/zstd/gzip accepted; the per-response and the stored
//! choices differ only between codings of the same weight; requests with the same accepted set
//! share a cache key; Vary names come out sorted, deduplicated, lower case.
#![no_main]

use http::header::{self, HeaderMap, HeaderValue};
use http::Request;
use libfuzzer_sys::fuzz_target;
use thruster_core::http::coding::{accepts, negotiate, negotiate_for, weight, Coding, Use};
use thruster_core::pipeline::cache::key::{normalise_host, vary_names, BaseKey, CacheKey};
use thruster_core_fuzz::{fields, headers, value};

const CODINGS: [Coding; 3] = [Coding::Brotli, Coding::Zstd, Coding::Gzip];

// Input: `accept-encoding` request lines, `vary` response lines, a `host`
// and an `https` flag line.
fuzz_target!(|data: &[u8]| {
    let fields = fields(data);
    let req = headers(&fields, &[("accept-encoding", header::ACCEPT_ENCODING)]);
    let response = headers(&fields, &[("vary", header::VARY)]);
    let host = String::from_utf8_lossy(value(&fields, "host").unwrap_or_default());
    let https = value(&fields, "https").is_some();

    let chosen = negotiate(&req);
    let accepted: Vec<Coding> = CODINGS
        .into_iter()
        .filter(|c| accepts(&req, c.token()))
        .collect();
    match chosen {
        Some(c) => assert!(
            accepted.contains(&c),
            "compression picks {c:?}, the cache says it is not accepted ({accepted:?})"
        ),
        None => assert!(
            accepted.is_empty(),
            "compression picks identity, the cache says {accepted:?} are accepted"
        ),
    }

    let per_response = negotiate_for(&req, Use::PerResponse);
    assert_eq!(per_response.is_some(), chosen.is_some());
    if let (Some(a), Some(b)) = (chosen, per_response) {
        assert_eq!(
            weight(&req, a.token()),
            weight(&req, b.token()),
            "stored {a:?} and per-response {b:?} differ in weight"
        );
    }

    // Same accepted set (deflate included), same variant key.
    let mut tokens: Vec<&str> = ["br", "deflate", "gzip", "zstd"]
        .into_iter()
        .filter(|t| accepts(&req, t))
        .collect();
    tokens.sort_unstable();
    let mut canonical = HeaderMap::new();
    if !tokens.is_empty() {
        canonical.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(&tokens.join(", ")).unwrap(),
        );
    }
    let base = BaseKey::new(&Request::new(()), https, false);
    let vary = [header::ACCEPT_ENCODING];
    assert_eq!(
        CacheKey::new(base.clone(), &vary, &req),
        CacheKey::new(base, &vary, &canonical)
    );

    let names = vary_names(&response);
    for pair in names.windows(2) {
        assert!(pair[0].as_str() < pair[1].as_str(), "{names:?}");
    }
    assert!(names
        .iter()
        .all(|n| !n.as_str().bytes().any(|b| b.is_ascii_uppercase())));

    let normal = normalise_host(&host, https);
    assert!(!normal.bytes().any(|b| b.is_ascii_uppercase()));
    assert_eq!(normal, normalise_host(&host.to_ascii_uppercase(), https));
});
