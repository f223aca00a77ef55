//! Content-coding negotiation (RFC 9110 §12.5.3): which codings a request's
//! `Accept-Encoding` accepts and which one it prefers. Compression, cache
//! hits, cache keys and precompressed files all read the field through
//! here, so they never disagree about what a client accepts.

use http::header::{self, HeaderMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Brotli,
    Zstd,
    Gzip,
}

impl Coding {
    /// In the order ties are broken: the smallest output first.
    pub const ALL: [Coding; 3] = [Coding::Brotli, Coding::Zstd, Coding::Gzip];

    /// The `Content-Encoding` / `Accept-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
            Coding::Gzip => "gzip",
        }
    }

    /// The file-name suffix of a precompressed file in this coding, as asset
    /// pipelines write them (`app.js.br`, `app.js.zst`, `app.js.gz`).
    pub fn suffix(self) -> &'static str {
        match self {
            Coding::Brotli => ".br",
            Coding::Zstd => ".zst",
            Coding::Gzip => ".gz",
        }
    }

    /// The coding a token names; `x-gzip` is gzip's old alias (RFC 9110
    /// §8.4.1.3). Case-insensitive.
    pub fn from_token(token: &str) -> Option<Coding> {
        let token = token.trim();
        if token.eq_ignore_ascii_case("x-gzip") {
            return Some(Coding::Gzip);
        }
        Coding::ALL
            .into_iter()
            .find(|c| c.token().eq_ignore_ascii_case(token))
    }
}

/// Which representation a coding is chosen for; it sets how ties between
/// codings of the same q are broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Made once and served many times (a cache entry's variant, a
    /// precompressed file): the smallest output first, br, zstd, gzip.
    Stored,
    /// Compressed again for every response (a miss, an uncacheable page, an
    /// X-Sendfile file without a precompressed sibling): the cheapest for
    /// about gzip 6's size first, zstd, gzip, br. On text, zstd 3 is within
    /// 7% of gzip 6's bytes for a quarter of its CPU, and brotli 5 saves 8%
    /// for 2.4x (a mixed corpus of HTML, CSS, JS and JSON; see
    /// docs/benchmarks.md), CPU that every request pays again.
    PerResponse,
}

impl Use {
    /// The codings in the order ties are broken.
    pub fn order(self) -> [Coding; 3] {
        match self {
            Use::Stored => [Coding::Brotli, Coding::Zstd, Coding::Gzip],
            Use::PerResponse => [Coding::Zstd, Coding::Gzip, Coding::Brotli],
        }
    }
}

/// Picks the coding for a request's `Accept-Encoding` (all lines), or `None`
/// for identity, for a representation made once ([`Use::Stored`]). The
/// highest q wins; ties go br, zstd, gzip; `q=0` refuses a coding; `*`
/// stands for codings not listed (RFC 9110 §12.5.3). Weights are those of
/// [`weight`], which the cache and X-Sendfile use too.
pub fn negotiate(headers: &HeaderMap) -> Option<Coding> {
    negotiate_for(headers, Use::Stored)
}

/// As [`negotiate`], with ties broken in the order of `purpose`: the client's
/// q-values always decide first.
pub fn negotiate_for(headers: &HeaderMap, purpose: Use) -> Option<Coding> {
    let mut best: Option<(Coding, f32)> = None;
    for coding in purpose.order() {
        let weight = weight(headers, coding.token());
        if weight > 0.0 && best.is_none_or(|(_, w)| weight > w) {
            best = Some((coding, weight));
        }
    }
    best.map(|(c, _)| c)
}

/// The q-value a request's `Accept-Encoding` (all lines) gives `coding`
/// (`x-gzip` counts as `gzip`), from 0 to 1: the coding's own weight, else
/// that of `*`, else 0. A coding or `*` listed more than once takes its
/// lowest weight, so a refusal anywhere refuses; RFC 9110 leaves repeats
/// undefined, and one rule keeps compression, cache hits and precompressed
/// files agreeing on what a client accepts. A q that does not parse is 0.
pub fn weight(headers: &HeaderMap, coding: &str) -> f32 {
    let (mut own, mut star) = (None::<f32>, None::<f32>);
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim();
            let slot = if token.eq_ignore_ascii_case(coding)
                || (coding.eq_ignore_ascii_case("gzip") && token.eq_ignore_ascii_case("x-gzip"))
            {
                &mut own
            } else if token == "*" {
                &mut star
            } else {
                continue;
            };
            let q = parts
                .find_map(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))
                })
                .map_or(1.0, |v| v.trim().parse::<f32>().unwrap_or(0.0));
            // NaN (from "q=nan") counts as 0, like any other nonsense.
            let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
            *slot = Some(slot.map_or(q, |previous: f32| previous.min(q)));
        }
    }
    own.or(star).unwrap_or(0.0)
}

/// Whether the request's `Accept-Encoding` allows the coding named `token`
/// (q > 0, or a `*` with q > 0 and the coding not listed).
pub fn accepts(headers: &HeaderMap, token: &str) -> bool {
    weight(headers, token) > 0.0
}

/// The codings we can produce that the request accepts, in the order of
/// [`Coding::ALL`].
pub fn accepted(headers: &HeaderMap) -> Vec<Coding> {
    Coding::ALL
        .into_iter()
        .filter(|c| accepts(headers, c.token()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn negotiation_follows_rfc_9110_12_5_3() {
        use Coding::*;
        let cases: &[(&[&str], Option<Coding>)] = &[
            (&[], None),
            (&["identity"], None),
            (&["gzip"], Some(Gzip)),
            (&["x-gzip"], Some(Gzip)),
            (&["gzip, deflate, br, zstd"], Some(Brotli)),
            (&["gzip, zstd"], Some(Zstd)),
            (&["br;q=0.5, gzip"], Some(Gzip)),
            (&["br;q=0, gzip;q=0"], None),
            (&["*"], Some(Brotli)),
            (&["*;q=0.1, gzip;q=0.5"], Some(Gzip)),
            (&["br;q=0, *"], Some(Zstd)),
            (&["GZIP;Q=0.8, Br;q=0.9"], Some(Brotli)),
            (&["gzip;q=bogus, zstd"], Some(Zstd)),
            (&["gzip", "br"], Some(Brotli)),
            // Repeats take their lowest weight (fuzz target accept_encoding
            // found `zstd;q=0, zstd` picking zstd while the cache, reading
            // the first entry, saw it refused).
            (&["zstd;q=0, zstd"], None),
            (&["zstd", "zstd;q=0"], None),
            (&["br;q=0.9, gzip;q=0.5, br;q=0.1"], Some(Gzip)),
            (&["*;q=0, *, br;q=0"], None),
            (&["br;q=nan, gzip;q=inf"], Some(Gzip)),
        ];
        for (values, expected) in cases {
            assert_eq!(negotiate(&accept(values)), *expected, "{values:?}");
        }
    }

    #[test]
    fn per_response_ties_go_to_the_cheapest_and_q_values_still_decide() {
        use Coding::*;
        let cases: &[(&[&str], Option<Coding>)] = &[
            (&[], None),
            (&["identity"], None),
            // What current browsers send.
            (&["gzip, deflate, br, zstd"], Some(Zstd)),
            (&["gzip, deflate, br"], Some(Gzip)),
            (&["br"], Some(Brotli)),
            (&["*"], Some(Zstd)),
            (&["zstd;q=0, *"], Some(Gzip)),
            // The client's preference comes first.
            (&["br;q=1, zstd;q=0.9, gzip;q=0.8"], Some(Brotli)),
            (&["gzip, zstd;q=0.5"], Some(Gzip)),
            (&["zstd;q=0, zstd"], None),
        ];
        for (values, expected) in cases {
            assert_eq!(
                negotiate_for(&accept(values), Use::PerResponse),
                *expected,
                "{values:?}"
            );
        }
    }

    #[test]
    fn tokens_suffixes_and_aliases() {
        for coding in Coding::ALL {
            assert_eq!(Coding::from_token(coding.token()), Some(coding));
            assert!(coding.suffix().starts_with('.'));
        }
        assert_eq!(Coding::from_token(" X-GZIP "), Some(Coding::Gzip));
        assert_eq!(Coding::from_token("deflate"), None);
        assert_eq!(
            accepted(&accept(&["gzip, br;q=0.1, zstd;q=0"])),
            [Coding::Brotli, Coding::Gzip]
        );
    }
}
