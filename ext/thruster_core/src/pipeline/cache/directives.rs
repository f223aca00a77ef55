//! Cache-Control parsing and the "may a shared cache store this?" decision
//! (RFC 9111 §3, §4.2.1, §5.2.2), plus RFC 5861 `stale-if-error`.
//!
//! Thruster matches one case-sensitive regex against the first
//! `Cache-Control` line: it ignores `no-store`/`private` next to `public`,
//! reads the misspelt `s-max-age`, counts `no-public` as public, and ignores
//! `Expires`. Here every line is read, names are case-insensitive, values may
//! be quoted, and a contradiction makes the response not storable.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

/// The directives of all `Cache-Control` lines of a message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    pub public: bool,
    pub private: bool,
    pub no_store: bool,
    pub no_cache: bool,
    pub no_transform: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub immutable: bool,
    /// `Some(None)`: present but invalid or repeated with another value.
    pub max_age: Option<Option<u64>>,
    pub s_maxage: Option<Option<u64>>,
    pub stale_if_error: Option<Option<u64>>,
}

fn delta_seconds(value: Option<&str>) -> Option<u64> {
    // RFC 9111 §5.2: accept the quoted form too; §1.2.2: an overflowing
    // delta-seconds is taken as the largest value we can represent.
    let v = value?.trim().trim_matches('"');
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(u64::MAX))
}

fn set_seconds(slot: &mut Option<Option<u64>>, value: Option<u64>) {
    *slot = match *slot {
        None => Some(value),
        // RFC 9111 §4.2.1: conflicting repeats make the lifetime invalid.
        Some(previous) if previous == value => Some(value),
        Some(_) => Some(None),
    };
}

impl Directives {
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for line in headers.get_all(header::CACHE_CONTROL) {
            let Ok(line) = line.to_str() else {
                // Unreadable directives: be safe and treat as "do not store".
                d.no_store = true;
                continue;
            };
            for item in split_directives(line) {
                let (name, value) = match item.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v)),
                    None => (item.trim(), None),
                };
                // Known names are short: lower-cased on the stack (no
                // allocation per directive per response); longer ones are
                // none of them.
                let mut buf = [0u8; 24];
                match crate::http::ascii_lowercase_in(name, &mut buf).unwrap_or("") {
                    "public" => d.public = true,
                    // `private="Set-Cookie"` and `no-cache="..."` qualify
                    // fields; refusing the whole response is the safe reading.
                    "private" => d.private = true,
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "no-transform" => d.no_transform = true,
                    "must-revalidate" => d.must_revalidate = true,
                    "proxy-revalidate" => d.proxy_revalidate = true,
                    "immutable" => d.immutable = true,
                    "max-age" => set_seconds(&mut d.max_age, delta_seconds(value)),
                    "s-maxage" => set_seconds(&mut d.s_maxage, delta_seconds(value)),
                    "stale-if-error" => set_seconds(&mut d.stale_if_error, delta_seconds(value)),
                    _ => {}
                }
            }
        }
        d
    }
}

/// Splits on commas that are not inside a quoted string.
fn split_directives(line: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, b) in line.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                items.push(&line[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&line[start..]);
    items.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Why a response is not stored (shown in debug logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Method,
    Status,
    NoStore,
    NoCache,
    Private,
    NotPublic,
    SetCookie,
    VaryStar,
    Authorization,
    NoFreshness,
    ContentEncoding,
}

impl NotStorable {
    pub fn reason(self) -> &'static str {
        match self {
            NotStorable::Method => "method is not GET",
            NotStorable::Status => "status is not storable (200-399 except 206 and 304)",
            NotStorable::NoStore => "no-store",
            NotStorable::NoCache => "no-cache",
            NotStorable::Private => "private",
            NotStorable::NotPublic => "neither public nor s-maxage",
            NotStorable::SetCookie => "response sets a cookie",
            NotStorable::VaryStar => "Vary: *",
            NotStorable::Authorization => "request carries Authorization",
            NotStorable::NoFreshness => "no positive freshness lifetime",
            NotStorable::ContentEncoding => "unknown Content-Encoding",
        }
    }
}

/// How long a stored response stays fresh, and how long after that it may
/// still stand in for an upstream error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub lifetime: Duration,
    /// The response's age when we received it (RFC 9111 §4.2.3).
    pub initial_age: Duration,
    pub stale_if_error: Duration,
    pub immutable: bool,
}

fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
}

/// Decides whether a shared cache may store `status`/`response` for a GET
/// with `request` headers, and for how long. `default_stale_if_error` applies
/// when the response does not say (RFC 5861 §4 lets the cache choose).
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
    now: SystemTime,
    default_stale_if_error: Duration,
) -> Result<Freshness, NotStorable> {
    // RFC 9111 §3: the method must be cacheable; HEAD responses carry no body
    // to serve a later GET, so only GET fills the cache.
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    // §3 + RFC 9110 §15.1: final, understood status. 206 needs range
    // combination (§3.3) and 304 updates rather than replaces; neither is
    // stored.
    let code = status.as_u16();
    if !(200..400).contains(&code) || code == 206 || code == 304 {
        return Err(NotStorable::Status);
    }
    let req = Directives::parse(request);
    if req.no_store {
        return Err(NotStorable::NoStore);
    }
    let d = Directives::parse(response);
    if d.no_store {
        return Err(NotStorable::NoStore);
    }
    if d.private {
        return Err(NotStorable::Private);
    }
    // §5.2.2.4: no-cache means every reuse needs revalidation; we do not
    // revalidate yet, so storing would never pay.
    if d.no_cache {
        return Err(NotStorable::NoCache);
    }
    // A cookie is per-user state: refuse to store rather than strip it
    // (Thruster strips it, silently breaking sessions).
    if response.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let vary_star = response
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*");
    if vary_star {
        return Err(NotStorable::VaryStar);
    }
    // We only keep what the app marks as shareable: `public`, or `s-maxage`
    // which is addressed to shared caches (§5.2.2.10). A bare `max-age` from
    // a Rails action is most often meant for the browser only.
    if !d.public && d.s_maxage.is_none() {
        return Err(NotStorable::NotPublic);
    }
    // §3.5: with Authorization only public / s-maxage / must-revalidate
    // allow storing, which the check above already demands.
    if request.contains_key(header::AUTHORIZATION) && !d.public && d.s_maxage.is_none() {
        return Err(NotStorable::Authorization);
    }
    if let Some(coding) = response.get(header::CONTENT_ENCODING) {
        // Anything but a coding we can name would make variant handling guess.
        let known = coding
            .to_str()
            .map(|c| {
                c.split(',')
                    .all(|t| matches!(t.trim(), "gzip" | "br" | "zstd" | "deflate" | "identity"))
            })
            .unwrap_or(false);
        if !known {
            return Err(NotStorable::ContentEncoding);
        }
    }
    let date = http_date(response, header::DATE);
    // §4.2.1: s-maxage, then max-age, then Expires - Date.
    let lifetime = match (d.s_maxage, d.max_age) {
        (Some(s), _) => s.unwrap_or(0),
        (None, Some(m)) => m.unwrap_or(0),
        (None, None) => match response.get(header::EXPIRES) {
            // §5.3: an invalid Expires means "already expired".
            Some(_) => match http_date(response, header::EXPIRES) {
                Some(expires) => expires
                    .duration_since(date.unwrap_or(now))
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                None => 0,
            },
            None => 0,
        },
    };
    if lifetime == 0 {
        return Err(NotStorable::NoFreshness);
    }
    // §4.2.3, with a negligible loopback delay: the larger of the upstream's
    // Age and how old its Date says the response is.
    let age_value = response
        .get(header::AGE)
        .and_then(|v| delta_seconds(v.to_str().ok()))
        .unwrap_or(0);
    let apparent_age = date
        .and_then(|date| now.duration_since(date).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let initial_age = age_value.max(apparent_age);
    // RFC 5861 §4 + RFC 9111 §5.2.2.2: revalidation requirements forbid
    // serving stale, even on error.
    let stale_if_error = if d.must_revalidate || d.proxy_revalidate {
        Duration::ZERO
    } else {
        match d.stale_if_error {
            Some(Some(secs)) => Duration::from_secs(secs.min(u32::MAX as u64)),
            Some(None) => Duration::ZERO,
            None => default_stale_if_error,
        }
    };
    Ok(Freshness {
        lifetime: Duration::from_secs(lifetime.min(u32::MAX as u64)),
        initial_age: Duration::from_secs(initial_age.min(u32::MAX as u64)),
        stale_if_error,
        immutable: d.immutable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const NOW_SECS: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn date(offset: i64) -> String {
        httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_secs((NOW_SECS as i64 + offset) as u64),
        )
    }

    fn check(
        status: u16,
        req: &[(&str, &str)],
        resp: &[(&str, &str)],
    ) -> Result<Freshness, NotStorable> {
        storable(
            &Method::GET,
            &headers(req),
            StatusCode::from_u16(status).unwrap(),
            &headers(resp),
            now(),
            Duration::from_secs(300),
        )
    }

    #[test]
    fn directive_parsing() {
        // RFC 9111 §5.2: names are case-insensitive, several lines combine,
        // quoted values are accepted.
        let d = Directives::parse(&headers(&[
            ("cache-control", "Public, MAX-AGE=\"60\""),
            ("cache-control", "immutable, stale-if-error=30"),
        ]));
        assert!(d.public && d.immutable);
        assert_eq!(d.max_age, Some(Some(60)));
        assert_eq!(d.stale_if_error, Some(Some(30)));
        // `no-public` is not `public` (Thruster's regex says it is).
        assert!(!Directives::parse(&headers(&[("cache-control", "no-public")])).public);
        // A comma inside a quoted value does not split the directive.
        let d = Directives::parse(&headers(&[(
            "cache-control",
            "private=\"Set-Cookie, X-Foo\", max-age=5",
        )]));
        assert!(d.private);
        assert_eq!(d.max_age, Some(Some(5)));
        // §4.2.1: conflicting repeats are invalid, equal repeats are fine.
        assert_eq!(
            Directives::parse(&headers(&[("cache-control", "max-age=5, max-age=6")])).max_age,
            Some(None)
        );
        assert_eq!(
            Directives::parse(&headers(&[("cache-control", "max-age=5, max-age=5")])).max_age,
            Some(Some(5))
        );
        assert_eq!(
            Directives::parse(&headers(&[("cache-control", "max-age=-1")])).max_age,
            Some(None)
        );
    }

    #[test]
    fn storability_rules() {
        use NotStorable::*;
        let public60 = ("cache-control", "public, max-age=60");
        type Fields<'a> = &'a [(&'a str, &'a str)];
        type Case<'a> = (
            u16,
            Fields<'a>,
            Fields<'a>,
            Result<u64, NotStorable>,
            &'a str,
        );
        let cases: &[Case] = &[
            (200, &[], &[public60], Ok(60), "§3: public with max-age"),
            (
                200,
                &[],
                &[("cache-control", "s-maxage=30, max-age=60")],
                Ok(30),
                "§5.2.2.10 s-maxage wins and implies shared",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, s-maxage=30, max-age=60")],
                Ok(30),
                "§4.2.1 s-maxage first",
            ),
            (
                200,
                &[],
                &[("Cache-Control", "Public, Max-Age=60")],
                Ok(60),
                "§5.2 case-insensitive (Thruster refuses)",
            ),
            (
                200,
                &[],
                &[("cache-control", "public"), ("cache-control", "max-age=60")],
                Ok(60),
                "§5.2 several lines",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, s-max-age=60")],
                Err(NoFreshness),
                "misspelt s-max-age is not a directive",
            ),
            (
                200,
                &[],
                &[("cache-control", "max-age=60")],
                Err(NotPublic),
                "browser-only max-age is not shared",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, max-age=60, no-store")],
                Err(NoStore),
                "§5.2.2.5 no-store wins over public",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, max-age=60, private")],
                Err(Private),
                "§5.2.2.7 private wins over public",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, max-age=60, no-cache")],
                Err(NoCache),
                "§5.2.2.4 no-cache needs revalidation",
            ),
            (
                200,
                &[("cache-control", "no-store")],
                &[public60],
                Err(NoStore),
                "§5.2.1.5 request no-store",
            ),
            (
                200,
                &[],
                &[public60, ("set-cookie", "a=b")],
                Err(SetCookie),
                "a cookie is never stored",
            ),
            (
                200,
                &[],
                &[public60, ("vary", "Accept, *")],
                Err(VaryStar),
                "§4.1 Vary: * never matches",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, max-age=0")],
                Err(NoFreshness),
                "§4.2.1 zero lifetime",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, max-age=abc")],
                Err(NoFreshness),
                "§4.2.1 invalid max-age is stale",
            ),
            (
                200,
                &[],
                &[("cache-control", "public")],
                Err(NoFreshness),
                "no explicit lifetime (no heuristics)",
            ),
            (
                200,
                &[],
                &[
                    ("cache-control", "public"),
                    ("date", &date(0)),
                    ("expires", &date(120)),
                ],
                Ok(120),
                "§5.3 Expires - Date",
            ),
            (
                200,
                &[],
                &[
                    ("cache-control", "public"),
                    ("date", &date(0)),
                    ("expires", "0"),
                ],
                Err(NoFreshness),
                "§5.3 invalid Expires is expired",
            ),
            (
                200,
                &[],
                &[("cache-control", "public, max-age=60"), ("expires", "0")],
                Ok(60),
                "§5.3 max-age overrides Expires",
            ),
            (201, &[], &[public60], Ok(60), "201 with explicit freshness"),
            (301, &[], &[public60], Ok(60), "redirects are storable"),
            (204, &[], &[public60], Ok(60), "204 storable"),
            (
                206,
                &[],
                &[public60],
                Err(Status),
                "§3.3 partial content not stored",
            ),
            (
                304,
                &[],
                &[public60],
                Err(Status),
                "304 is not a full response",
            ),
            (404, &[], &[public60], Err(Status), "errors not stored"),
            (500, &[], &[public60], Err(Status), "errors not stored"),
            (
                200,
                &[],
                &[public60, ("content-encoding", "x-custom")],
                Err(ContentEncoding),
                "unknown coding",
            ),
            (
                200,
                &[],
                &[public60, ("content-encoding", "gzip")],
                Ok(60),
                "app-encoded body stored as is",
            ),
        ];
        for (status, req, resp, expected, why) in cases {
            let got = check(*status, req, resp).map(|f| f.lifetime.as_secs());
            assert_eq!(got, *expected, "{why}: {status} {req:?} {resp:?}");
        }
        assert_eq!(
            storable(
                &http::Method::HEAD,
                &HeaderMap::new(),
                StatusCode::OK,
                &headers(&[public60]),
                now(),
                Duration::ZERO
            ),
            Err(Method),
            "HEAD carries no body to store"
        );
    }

    #[test]
    fn age_and_stale_if_error() {
        // RFC 9111 §4.2.3: initial age is the larger of Age and now - Date.
        let f = check(
            200,
            &[],
            &[
                ("cache-control", "public, max-age=60"),
                ("age", "10"),
                ("date", &date(-20)),
            ],
        )
        .unwrap();
        assert_eq!(f.initial_age, Duration::from_secs(20));
        let f = check(
            200,
            &[],
            &[
                ("cache-control", "public, max-age=60"),
                ("age", "30"),
                ("date", &date(-5)),
            ],
        )
        .unwrap();
        assert_eq!(f.initial_age, Duration::from_secs(30));
        // A Date in the future does not make the age negative.
        let f = check(
            200,
            &[],
            &[("cache-control", "public, max-age=60"), ("date", &date(50))],
        )
        .unwrap();
        assert_eq!(f.initial_age, Duration::ZERO);
        // RFC 5861: the response's stale-if-error, else our default; the
        // revalidation directives forbid stale use.
        let sie = |cc: &str| {
            check(200, &[], &[("cache-control", cc)])
                .unwrap()
                .stale_if_error
                .as_secs()
        };
        assert_eq!(sie("public, max-age=60"), 300);
        assert_eq!(sie("public, max-age=60, stale-if-error=7"), 7);
        assert_eq!(sie("public, max-age=60, must-revalidate"), 0);
        assert_eq!(
            sie("public, max-age=60, proxy-revalidate, stale-if-error=9"),
            0
        );
        assert!(
            check(
                200,
                &[],
                &[("cache-control", "public, max-age=60, immutable")]
            )
            .unwrap()
            .immutable
        );
    }
}
