//! Cache keys. The whole key is stored and compared (no hash-only identity:
//! Thruster's unseparated FNV-1 hash lets `GET /` on host `example.com`
//! collide with `GET /example.com` on no host).

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use http::Request;

use crate::http::coding::accepts;

/// What identifies a resource: scheme, normalised host, the request target
/// as sent, and the forwarded headers the app may render from. Shared
/// strings: a request's key is cloned for the lookup, the fill and the
/// variant, each a copy of the host and target before.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BaseKey {
    https: bool,
    host: Arc<str>,
    target: Arc<str>,
    forwarded: Option<Arc<str>>,
}

/// Forwarded headers Rails/Rack use to build URLs (`request.host`,
/// `request.scheme`, `request.port`). When they are trusted they change the
/// page, so they are part of the key; otherwise the proxy replaces or
/// removes them (`proxy::set_forwarded_headers`) and they cannot matter.
const FORWARDED: &[&str] = &[
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
];

/// Lower case, no trailing dot, no default port (RFC 9110 §4.2.3: these
/// forms name the same origin). Borrowed when only cut, as a host in normal
/// form (the usual case) is: no copy per request.
pub fn normalise_host(host: &str, https: bool) -> Cow<'_, str> {
    let default_port = if https { ":443" } else { ":80" };
    // The port and the dot have no case: cut first, lower-case after.
    let host = host.trim();
    let host = host.strip_suffix(default_port).unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

impl BaseKey {
    pub fn new<B>(req: &Request<B>, https: bool, trust_forwarded: bool) -> BaseKey {
        // HTTP/2 carries the host in :authority (the URI); HTTP/1.1 in Host.
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .unwrap_or("");
        let target = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let forwarded = trust_forwarded.then(|| {
            let mut text = String::new();
            for name in FORWARDED {
                for value in req.headers().get_all(*name) {
                    text.push_str(name);
                    text.push(':');
                    text.push_str(&String::from_utf8_lossy(value.as_bytes()));
                    text.push('\n');
                }
            }
            text
        });
        BaseKey {
            https,
            host: Arc::from(&*normalise_host(host, https)),
            target: target.into(),
            forwarded: forwarded.filter(|f| !f.is_empty()).map(Arc::from),
        }
    }

    /// The base key as text, fields separated by NUL (which no host,
    /// request target or header value can contain, so the text is
    /// unambiguous). Lower tiers name records by a hash of texts built
    /// from this and store the text itself to compare.
    pub fn text(&self) -> String {
        self.text_after(&[], 0)
    }

    /// `prefix` (NUL-separated words), then the text, then room for
    /// `more` bytes: one allocation for a record's whole key text (texts
    /// are built on every lower-tier lookup).
    fn text_after(&self, prefix: &[&str], more: usize) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let forwarded = self.forwarded.as_deref().unwrap_or("");
        let parts = [scheme, &self.host, &self.target, forwarded];
        let len = prefix
            .iter()
            .chain(&parts)
            .map(|p| p.len() + 1)
            .sum::<usize>()
            + more;
        let mut out = String::with_capacity(len);
        for word in prefix {
            out.push_str(word);
            out.push('\0');
        }
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                out.push('\0');
            }
            out.push_str(part);
        }
        out
    }

    /// The key of the record that holds which request headers this
    /// resource varies on (a lower tier's stand-in for the memory tier's
    /// rule), so a process that has no rule yet can find the variants.
    pub fn vary_record_text(&self) -> String {
        self.text_after(&["vary"], 0)
    }

    /// The request target as sent (path and query): what purges name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A short human form for logs.
    pub fn describe(&self) -> String {
        format!(
            "{}://{}{}",
            if self.https { "https" } else { "http" },
            self.host,
            self.target
        )
    }
}

/// A base key plus the request's values of the headers the response varies
/// on (RFC 9111 §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub base: BaseKey,
    variant: Box<str>,
}

impl CacheKey {
    pub fn new(base: BaseKey, vary: &[HeaderName], request: &HeaderMap) -> CacheKey {
        let mut variant = String::new();
        for name in vary {
            variant.push_str(name.as_str());
            variant.push(':');
            if name == header::ACCEPT_ENCODING {
                variant.push_str(&accepted_codings(request));
            } else {
                // §4.1: values of several lines combine; whitespace around
                // commas is not significant.
                let values: Vec<String> = request
                    .get_all(name)
                    .iter()
                    .flat_map(|v| {
                        String::from_utf8_lossy(v.as_bytes())
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .collect::<Vec<_>>()
                    })
                    .filter(|s| !s.is_empty())
                    .collect();
                variant.push_str(&values.join(","));
            }
            variant.push('\n');
        }
        CacheKey {
            base,
            variant: variant.into_boxed_str(),
        }
    }
}

impl CacheKey {
    /// The full key as text (base and variant), for lower tiers.
    pub fn text(&self) -> String {
        self.with_variant(self.base.text_after(&["entry"], self.variant.len() + 1))
    }

    /// The key of the stored `coding` encoding of this key's body.
    pub fn encoded_text(&self, coding: &str) -> String {
        self.with_variant(
            self.base
                .text_after(&["encoded", coding], self.variant.len() + 1),
        )
    }

    fn with_variant(&self, mut text: String) -> String {
        text.push('\0');
        text.push_str(&self.variant);
        text
    }
}

/// For tests: the base key of a GET of `path` on host `h`.
#[cfg(test)]
pub(crate) fn test_base(path: &str) -> BaseKey {
    BaseKey::new(
        &Request::builder()
            .uri(path)
            .header("host", "h")
            .body(())
            .unwrap(),
        false,
        false,
    )
}

/// The header names of a response's `Vary`, lower case, sorted, deduplicated.
pub fn vary_names(response: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = response
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// `Accept-Encoding` reduced to the set of codings the client accepts. Any
/// response an app picks for one such client is acceptable to every client
/// with the same set, so this keeps one entry per set instead of one per
/// browser's exact header spelling.
fn accepted_codings(request: &HeaderMap) -> String {
    let mut accepted: Vec<&str> = ["br", "deflate", "gzip", "zstd"]
        .into_iter()
        .filter(|coding| accepts(request, coding))
        .collect();
    accepted.sort_unstable();
    accepted.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_normalisation_rfc_9110_4_2_3() {
        let cases = [
            ("Example.COM", false, "example.com"),
            ("example.com:80", false, "example.com"),
            ("example.com:443", true, "example.com"),
            ("example.com:443", false, "example.com:443"),
            ("example.com:8080", false, "example.com:8080"),
            ("example.com.", false, "example.com"),
            ("[::1]:80", false, "[::1]"),
            (" example.com ", false, "example.com"),
            ("example.com.:80", false, "example.com"),
            ("example.com.:8080", false, "example.com.:8080"),
            ("example.com", false, "example.com"),
        ];
        for (host, https, expected) in cases {
            assert_eq!(
                normalise_host(host, https),
                expected,
                "{host} https={https}"
            );
        }
    }

    #[test]
    fn key_fields_are_separate_and_complete() {
        let key = |uri: &str, h: &[(&str, &str)], https: bool, trust: bool| {
            BaseKey::new(&request(uri, h), https, trust)
        };
        // Thruster's collision: GET / on example.com vs GET /example.com on no host.
        assert_ne!(
            key("/", &[("host", "example.com")], false, false),
            key("/example.com", &[], false, false)
        );
        assert_eq!(
            key("/a?x=1", &[("host", "EXAMPLE.com:80")], false, false),
            key("/a?x=1", &[("host", "example.com")], false, false)
        );
        // The query is part of the key, as sent.
        assert_ne!(
            key("/a?x=1", &[("host", "h")], false, false),
            key("/a?x=2", &[("host", "h")], false, false)
        );
        // Scheme is part of the key.
        assert_ne!(
            key("/a", &[("host", "h")], false, false),
            key("/a", &[("host", "h")], true, false)
        );
        // HTTP/2 :authority and HTTP/1.1 Host name the same resource.
        assert_eq!(
            key("http://h/a", &[], false, false),
            key("/a", &[("host", "h")], false, false)
        );
        // Trusted forwarded headers change what Rails renders: keyed.
        let xfh = [("host", "h"), ("x-forwarded-host", "evil.example")];
        assert_ne!(
            key("/a", &xfh, false, true),
            key("/a", &[("host", "h")], false, true)
        );
        // Untrusted ones are stripped before the app sees them: not keyed.
        assert_eq!(
            key("/a", &xfh, false, false),
            key("/a", &[("host", "h")], false, false)
        );
    }

    #[test]
    fn variants_rfc_9111_4_1() {
        let base = BaseKey::new(&request("/", &[("host", "h")]), false, false);
        let mut resp = HeaderMap::new();
        resp.append(
            header::VARY,
            HeaderValue::from_static("Accept, accept-language"),
        );
        resp.append(header::VARY, HeaderValue::from_static("Accept"));
        let names = vary_names(&resp);
        assert_eq!(names, vec![header::ACCEPT, header::ACCEPT_LANGUAGE]);
        let variant =
            |h: &[(&str, &str)]| CacheKey::new(base.clone(), &names, request("/", h).headers());
        // §4.1: whitespace and line splitting are not significant.
        assert_eq!(
            variant(&[("accept", "text/html,  application/json")]),
            variant(&[("accept", "text/html"), ("accept", "application/json")])
        );
        assert_ne!(
            variant(&[("accept", "text/html")]),
            variant(&[("accept", "application/json")])
        );
        // A missing header is its own variant.
        assert_ne!(variant(&[]), variant(&[("accept", "text/html")]));
        // Accept-Encoding is reduced to the accepted set.
        let ae = vec![header::ACCEPT_ENCODING];
        let by_ae = |v: &str| {
            CacheKey::new(
                base.clone(),
                &ae,
                request("/", &[("accept-encoding", v)]).headers(),
            )
        };
        assert_eq!(by_ae("gzip, deflate, br"), by_ae("br;q=0.9, deflate, gzip"));
        assert_ne!(by_ae("gzip"), by_ae("gzip, br"));
        assert_eq!(by_ae("gzip, br;q=0"), by_ae("gzip"));
    }

    #[test]
    fn texts_keep_every_part_and_kinds_apart() {
        let base = |uri: &str, h: &[(&str, &str)], trust: bool| {
            BaseKey::new(&request(uri, h), false, trust)
        };
        let plain = base("/a", &[("host", "h")], false);
        let key = CacheKey::new(plain.clone(), &[], &HeaderMap::new());
        assert_eq!(key.text(), "entry\0http\0h\0/a\0\0");
        // The forwarded part and the variant are part of the text.
        let fwd = base("/a", &[("host", "h"), ("x-forwarded-host", "x")], true);
        assert_ne!(
            CacheKey::new(fwd, &[], &HeaderMap::new()).text(),
            key.text()
        );
        let accept = vec![header::ACCEPT];
        let html = CacheKey::new(
            plain.clone(),
            &accept,
            request("/", &[("accept", "text/html")]).headers(),
        );
        assert_eq!(html.text(), "entry\0http\0h\0/a\0\0accept:text/html\n");
        // Records of other kinds never share a text with an entry.
        assert_ne!(plain.vary_record_text(), key.text());
        assert_ne!(key.encoded_text("gzip"), key.text());
        assert_ne!(key.encoded_text("gzip"), key.encoded_text("br"));
    }

    #[test]
    fn accepts_honours_q_and_star() {
        let h = |v: &str| request("/", &[("accept-encoding", v)]).headers().clone();
        assert!(accepts(&h("gzip"), "gzip"));
        assert!(accepts(&h("x-gzip"), "gzip"));
        assert!(!accepts(&h("gzip;q=0"), "gzip"));
        assert!(accepts(&h("*"), "br"));
        assert!(!accepts(&h("*, br;q=0"), "br"));
        assert!(!accepts(&HeaderMap::new(), "gzip"));
        // The same reading of repeats as compression (fuzz target
        // accept_encoding: `zstd;q=0, zstd`).
        assert!(!accepts(&h("zstd;q=0, zstd"), "zstd"));
        assert!(!accepts(&h("gzip, x-gzip;q=0"), "gzip"));
        assert!(accepts(&h("deflate;q=0.1, deflate"), "deflate"));
    }
}
