//! Response compression: brotli, zstd and gzip, negotiated from the client's
//! `Accept-Encoding` (RFC 9110 §12.5.3), streamed frame by frame with a
//! flush after each one so SSE and other streams are never held back.
//!
//! Fixes over basecamp's Thruster (v0.1.22): brotli; q-values honoured with
//! br > zstd > gzip on ties; `Vary: Accept-Encoding` merged with the app's
//! own `Vary` instead of replacing it; a compressed representation gets a
//! weak ETag (it is not byte-identical to the app's); already-compressed
//! types (woff2, images but SVG, archives) are left alone; the credentials
//! guard looks at the response too (Set-Cookie, private, no-store).

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::http::coding::negotiate;
pub use crate::http::coding::Coding;
use crate::http::{BoxError, ResponseBody};

/// Bodies smaller than this are not worth a compressed representation.
pub const MIN_COMPRESS_SIZE: u64 = 1024;

/// Whether a media type gains from compression.
pub fn compressible(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media.is_empty() {
        return false;
    }
    if media.starts_with("text/") {
        return true;
    }
    if media == "image/svg+xml" || media == "image/x-icon" || media == "image/bmp" {
        return true;
    }
    // Already compressed, or media formats with their own compression.
    if media.starts_with("image/")
        || media.starts_with("audio/")
        || media.starts_with("video/")
        || media.starts_with("font/woff")
        || [
            "zip",
            "gzip",
            "compress",
            "zstd",
            "brotli",
            "x-7z",
            "x-rar",
            "x-xz",
            "x-bzip",
            "octet-stream",
            "pdf",
        ]
        .iter()
        .any(|k| media.contains(k))
    {
        return false;
    }
    media.starts_with("application/")
        && (media.contains("json")
            || media.contains("javascript")
            || media.contains("xml")
            || media.contains("wasm")
            || media.ends_with("ecmascript")
            || media == "application/x-font-ttf"
            || media == "application/vnd.ms-fontobject")
        || media == "font/ttf"
        || media == "font/otf"
}

/// What the request side contributes to the decision.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    pub coding: Option<Coding>,
    pub head: bool,
    /// The request carries credentials and the guard is on.
    pub guarded: bool,
    /// GZIP_COMPRESSION_DISABLE_ON_AUTH: responses that declare themselves
    /// per-user stay identity too.
    pub guard_responses: bool,
    /// GZIP_COMPRESSION_JITTER: most padding bytes per response (0: none).
    pub jitter: u32,
}

/// A random padding length in 1..=max (0 when off). Random per response,
/// unlike Thruster's content-derived length, so repeating a request does not
/// reproduce the same size.
fn padding_len(max: u32) -> usize {
    if max == 0 {
        return 0;
    }
    (crate::sys::random::u64() % u64::from(max)) as usize + 1
}

fn padding_text(len: usize) -> Vec<u8> {
    b"Padding-".iter().copied().cycle().take(len).collect()
}

impl RequestFacts {
    pub fn new(
        method: &Method,
        headers: &HeaderMap,
        guard_on_auth: bool,
        jitter: u32,
    ) -> RequestFacts {
        let guarded = guard_on_auth
            && ["cookie", "authorization", "x-csrf-token"]
                .iter()
                .any(|h| headers.get(*h).is_some_and(|v| !v.as_bytes().is_empty()));
        RequestFacts {
            coding: negotiate(headers),
            head: method == Method::HEAD,
            guarded,
            guard_responses: guard_on_auth,
            jitter,
        }
    }
}

fn cache_control_has(headers: &HeaderMap, directives: &[&str]) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .any(|d| directives.contains(&d.as_str()))
}

/// Adds `Accept-Encoding` to `Vary`, keeping whatever the app varies on.
pub fn merge_vary(headers: &mut HeaderMap) {
    let values: Vec<String> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let tokens: Vec<&str> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens
        .iter()
        .any(|t| *t == "*" || t.eq_ignore_ascii_case("accept-encoding"))
    {
        return;
    }
    let mut merged = tokens.join(", ");
    if !merged.is_empty() {
        merged.push_str(", ");
    }
    merged.push_str("Accept-Encoding");
    if let Ok(value) = HeaderValue::try_from(merged) {
        headers.insert(header::VARY, value);
    }
}

/// The coding to apply to this response, if any.
fn choose(facts: &RequestFacts, response: &Response<ResponseBody>) -> Option<Coding> {
    // The announced length (also on HEAD, whose body is empty), else the
    // body's own; unknown lengths (streams) are compressed.
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| response.body().size_hint().exact());
    coding_for(facts, response.status(), response.headers(), length)
}

/// The coding for a response with this status, headers and body length
/// (`None`: unknown), or `None` for identity. Shared with cache hits, so a
/// stored body gets exactly the representation a fresh one would.
pub fn coding_for(
    facts: &RequestFacts,
    status: StatusCode,
    h: &HeaderMap,
    length: Option<u64>,
) -> Option<Coding> {
    let coding = facts.coding?;
    if facts.guarded
        || (facts.guard_responses && per_user(h))
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT
        || h.contains_key(header::CONTENT_ENCODING)
        || h.contains_key(header::CONTENT_RANGE)
        || h.contains_key("no-gzip-compression")
    {
        return None;
    }
    let content_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !compressible(content_type) || cache_control_has(h, &["no-transform"]) {
        return None;
    }
    if length.is_some_and(|n| n < MIN_COMPRESS_SIZE) {
        return None;
    }
    Some(coding)
}

/// Whether a response declares itself per-user: it sets a cookie, is
/// `private` or `no-store`, or varies on the request's credentials
/// (`Vary: Cookie` / `Authorization`). That is where BREACH-style secrets
/// live, so the guard (GZIP_COMPRESSION_DISABLE_ON_AUTH) leaves these
/// identity even for a request without credentials. Thruster means to check
/// this but its check runs too late to matter.
fn per_user(h: &HeaderMap) -> bool {
    h.contains_key(header::SET_COOKIE)
        || cache_control_has(h, &["private", "no-store"])
        || h.get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|t| t.eq_ignore_ascii_case("cookie") || t.eq_ignore_ascii_case("authorization"))
}

/// Applies compression to a response per the request's facts. Adds
/// `Vary: Accept-Encoding` to every response with a body that could vary.
pub fn apply(facts: &RequestFacts, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
    let coding = choose(facts, &response);
    let status = response.status();
    if !status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        merge_vary(response.headers_mut());
    }
    response.headers_mut().remove("no-gzip-compression");
    let Some(coding) = coding else {
        return response;
    };

    let headers = response.headers_mut();
    mark_encoded(headers, coding);
    headers.remove(header::CONTENT_LENGTH);
    // HEAD gets the headers GET would get (RFC 9110 §9.3.2), and no body.
    if facts.head {
        return response;
    }
    let padding = padding_len(facts.jitter);
    response.map(|body| CompressBody::new(body, coding, padding).boxed_unsync())
}

/// Sets the headers of a representation encoded with `coding`: its
/// `Content-Encoding`, no byte ranges over it, and a validator of its own.
pub fn mark_encoded(headers: &mut HeaderMap, coding: Coding) {
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    headers.remove(header::ACCEPT_RANGES);
    // RFC 9110 §8.8.1: a different representation needs a different
    // validator; weak, and marked with the coding so revalidation of the
    // identity and encoded forms never cross.
    if let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) {
        let opaque = etag.trim_start_matches("W/");
        let tagged = match opaque.strip_suffix('"') {
            Some(inner) => format!("W/{inner}-{}\"", coding.token()),
            None => format!("W/{opaque}"),
        };
        if let Ok(value) = HeaderValue::try_from(tagged) {
            headers.insert(header::ETAG, value);
        }
    }
}

/// Whole-body compression for stored responses. It runs once per cached
/// entry rather than per response, so it uses high levels: the bytes saved
/// are paid back on every hit.
pub fn compress_stored(data: &[u8], coding: Coding, immutable: bool) -> std::io::Result<Vec<u8>> {
    // Brotli 11 costs ~20x level 5 in CPU; worth it for fingerprinted
    // (immutable) assets, which are cached for a year.
    const BROTLI_MAX_FOR: usize = 1 << 20;
    let mut out = Vec::with_capacity(data.len() / 3 + 64);
    match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(out, flate2::Compression::best());
            e.write_all(data)?;
            e.finish()
        }
        Coding::Brotli => {
            let quality = if immutable && data.len() <= BROTLI_MAX_FOR {
                11
            } else {
                9
            };
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 64 * 1024, quality, 22);
                e.write_all(data)?;
                e.flush()?;
            }
            Ok(out)
        }
        Coding::Zstd => {
            let level = if immutable { 19 } else { 12 };
            zstd::stream::copy_encode(data, &mut out, level)?;
            Ok(out)
        }
    }
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>, usize),
}

impl Encoder {
    /// `padding`: BREACH padding bytes, carried in the gzip header's comment
    /// or a zstd skippable frame (brotli has no place for it).
    fn new(coding: Coding, padding: usize) -> std::io::Result<Encoder> {
        Ok(match coding {
            // Levels tuned for on-the-fly work: most of the gain, a fraction
            // of the CPU of the maximum levels.
            Coding::Gzip if padding > 0 => Encoder::Gzip(
                flate2::GzBuilder::new()
                    .comment(padding_text(padding))
                    .write(Vec::new(), flate2::Compression::new(6)),
            ),
            Coding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(6),
            )),
            Coding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            Coding::Zstd => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3)?, padding)
            }
        })
    }

    /// Compresses `data` and flushes, returning what is ready to send.
    fn write_flush(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            Encoder::Zstd(e, _) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
        }
    }

    fn finish(self) -> std::io::Result<Bytes> {
        Ok(Bytes::from(match self {
            Encoder::Gzip(e) => e.finish()?,
            Encoder::Brotli(e) => e.into_inner(),
            Encoder::Zstd(e, padding) => {
                let mut out = e.finish()?;
                if padding > 0 {
                    // RFC 8878 §3.1.2: a skippable frame decoders ignore.
                    out.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
                    out.extend_from_slice(&(padding as u32).to_le_bytes());
                    out.extend_from_slice(&padding_text(padding));
                }
                out
            }
        }))
    }
}

/// Streams the inner body through an encoder, one flushed block per frame.
struct CompressBody {
    inner: ResponseBody,
    encoder: Option<Encoder>,
    error: Option<std::io::Error>,
}

impl CompressBody {
    fn new(inner: ResponseBody, coding: Coding, padding: usize) -> CompressBody {
        match Encoder::new(coding, padding) {
            Ok(encoder) => CompressBody {
                inner,
                encoder: Some(encoder),
                error: None,
            },
            Err(error) => CompressBody {
                inner,
                encoder: None,
                error: Some(error),
            },
        }
    }
}

impl Body for CompressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(error) = self.error.take() {
            return Poll::Ready(Some(Err(error.into())));
        }
        loop {
            if self.encoder.is_none() {
                return Poll::Ready(None);
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let encoder = self.encoder.as_mut().expect("checked above");
                        match encoder.write_flush(&data) {
                            Ok(out) if out.is_empty() => continue,
                            Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                            Err(e) => return Poll::Ready(Some(Err(e.into()))),
                        }
                    }
                    // Trailers cannot follow a compressed body we still have
                    // to finish; they are dropped.
                    Err(_) => continue,
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    let encoder = self.encoder.take().expect("checked above");
                    return match encoder.finish() {
                        Ok(out) if out.is_empty() => Poll::Ready(None),
                        Ok(out) => Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(e) => Poll::Ready(Some(Err(e.into()))),
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.error.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full_body;
    use std::io::Read;

    #[test]
    fn compressible_types() {
        for t in [
            "text/html; charset=utf-8",
            "text/css",
            "application/json",
            "application/javascript",
            "image/svg+xml",
            "application/xml",
            "application/wasm",
            "text/event-stream",
        ] {
            assert!(compressible(t), "{t}");
        }
        for t in [
            "",
            "image/png",
            "image/jpeg",
            "image/webp",
            "font/woff2",
            "font/woff",
            "video/mp4",
            "audio/mpeg",
            "application/zip",
            "application/gzip",
            "application/octet-stream",
            "application/pdf",
            "application/zstd",
        ] {
            assert!(!compressible(t), "{t}");
        }
    }

    #[test]
    fn vary_is_merged_not_replaced() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "Accept-Encoding"),
            (&["Accept"], "Accept, Accept-Encoding"),
            (&["Accept", "Origin"], "Accept, Origin, Accept-Encoding"),
            (&["accept-encoding"], "accept-encoding"),
            (&["*"], "*"),
        ];
        for (existing, expected) in cases {
            let mut h = HeaderMap::new();
            for v in *existing {
                h.append(header::VARY, HeaderValue::from_str(v).unwrap());
            }
            merge_vary(&mut h);
            let all: Vec<_> = h
                .get_all(header::VARY)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(all.join(", "), *expected);
        }
    }

    fn response(content_type: &str, body: &'static [u8]) -> Response<ResponseBody> {
        Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::ETAG, "\"abc\"")
            .header(header::ACCEPT_RANGES, "bytes")
            .body(full_body(body))
            .unwrap()
    }

    fn facts(coding: Option<Coding>) -> RequestFacts {
        RequestFacts {
            coding,
            head: false,
            guarded: false,
            guard_responses: false,
            jitter: 0,
        }
    }

    async fn body_bytes(r: Response<ResponseBody>) -> Vec<u8> {
        r.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap(),
            Coding::Brotli => brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap(),
            Coding::Zstd => zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap(),
        };
        out
    }

    const TEXT: &[u8] = b"<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n";

    #[tokio::test(flavor = "current_thread")]
    async fn each_coding_round_trips_with_rfc_headers() {
        assert!(TEXT.len() as u64 >= MIN_COMPRESS_SIZE);
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let r = apply(&facts(Some(coding)), response("text/html", TEXT));
            let h = r.headers().clone();
            assert_eq!(h[header::CONTENT_ENCODING], coding.token());
            assert!(!h.contains_key(header::CONTENT_LENGTH));
            assert!(!h.contains_key(header::ACCEPT_RANGES));
            assert_eq!(
                h[header::ETAG],
                format!("W/\"abc-{}\"", coding.token()).as_str()
            );
            assert_eq!(h[header::VARY], "Accept-Encoding");
            let encoded = body_bytes(r).await;
            assert!(encoded.len() < TEXT.len());
            assert_eq!(decode(coding, &encoded), TEXT);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn jitter_pads_gzip_and_zstd_randomly_and_decoders_ignore_it() {
        for coding in [Coding::Gzip, Coding::Zstd] {
            let mut sizes = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let f = RequestFacts {
                    coding: Some(coding),
                    head: false,
                    guarded: false,
                    guard_responses: false,
                    jitter: 32,
                };
                let encoded = body_bytes(apply(&f, response("text/html", TEXT))).await;
                assert_eq!(decode(coding, &encoded), TEXT, "{coding:?} still decodes");
                sizes.insert(encoded.len());
            }
            let unpadded =
                body_bytes(apply(&facts(Some(coding)), response("text/html", TEXT))).await;
            assert!(
                sizes.len() > 3,
                "{coding:?}: padding varies per response: {sizes:?}"
            );
            let smallest = *sizes.iter().next().unwrap();
            let largest = *sizes.iter().last().unwrap();
            // gzip: FCOMMENT bytes + NUL; zstd: an 8-byte skippable frame header + bytes.
            let overhead = if coding == Coding::Gzip { 1 } else { 8 };
            assert!(
                smallest > unpadded.len() && largest <= unpadded.len() + overhead + 32,
                "{coding:?}"
            );
        }
        let gz = body_bytes(apply(
            &RequestFacts {
                coding: Some(Coding::Gzip),
                head: false,
                guarded: false,
                guard_responses: false,
                jitter: 32,
            },
            response("text/html", TEXT),
        ))
        .await;
        assert_eq!(gz[3] & 0x10, 0x10, "gzip FCOMMENT flag");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn identity_when_not_worth_it_or_not_allowed() {
        let small: &'static [u8] = b"tiny";
        let cases: Vec<(&str, Response<ResponseBody>, RequestFacts)> = vec![
            (
                "no acceptable coding",
                response("text/html", TEXT),
                facts(None),
            ),
            (
                "below 1 KiB",
                response("text/html", small),
                facts(Some(Coding::Gzip)),
            ),
            (
                "image",
                response("image/png", TEXT),
                facts(Some(Coding::Gzip)),
            ),
            (
                "guarded request",
                response("text/html", TEXT),
                RequestFacts {
                    coding: Some(Coding::Gzip),
                    head: false,
                    guarded: true,
                    guard_responses: false,
                    jitter: 0,
                },
            ),
            (
                "already encoded",
                {
                    let mut r = response("text/html", TEXT);
                    r.headers_mut()
                        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    r
                },
                facts(Some(Coding::Brotli)),
            ),
        ];
        for (why, r, f) in cases {
            let before_encoding = r.headers().get(header::CONTENT_ENCODING).cloned();
            let r = apply(&f, r);
            assert_eq!(
                r.headers().get(header::CONTENT_ENCODING).cloned(),
                before_encoding,
                "{why}"
            );
            assert_eq!(
                r.headers()[header::VARY],
                "Accept-Encoding",
                "{why}: Vary is always there"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn guard_refuses_per_user_responses() {
        let guarding = RequestFacts {
            guard_responses: true,
            ..facts(Some(Coding::Gzip))
        };
        // (response header, value): each marks the response as per-user.
        let per_user: &[(header::HeaderName, &str)] = &[
            (header::SET_COOKIE, "s=1"),
            (header::CACHE_CONTROL, "Private, max-age=0"),
            (header::CACHE_CONTROL, "no-store"),
            (header::VARY, "Cookie"),
            (header::VARY, "Accept, authorization"),
        ];
        for (name, value) in per_user {
            let mut r = response("text/html", TEXT);
            r.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            let guarded = apply(&guarding, r);
            assert!(
                !guarded.headers().contains_key(header::CONTENT_ENCODING),
                "{name}: {value} stays identity under the guard"
            );
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            assert_eq!(
                coding_for(&guarding, StatusCode::OK, &headers, Some(4096)),
                None,
                "{name}: {value}: cache hits and X-Sendfile decide alike"
            );
            let mut r = response("text/html", TEXT);
            r.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            assert_eq!(
                apply(&facts(Some(Coding::Gzip)), r).headers()[header::CONTENT_ENCODING],
                "gzip",
                "{name}: {value}: without the guard it does not matter"
            );
        }
        let mut r = response("text/html", TEXT);
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Accept, Origin"));
        assert_eq!(
            apply(&guarding, r).headers()[header::CONTENT_ENCODING],
            "gzip",
            "a Vary without credentials is not per-user"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn head_gets_the_get_headers_and_no_body() {
        let f = RequestFacts {
            coding: Some(Coding::Gzip),
            head: true,
            guarded: false,
            guard_responses: false,
            jitter: 0,
        };
        let mut r = response("text/html", TEXT);
        // A HEAD body is empty; its Content-Length is the one GET would get.
        *r.body_mut() = full_body(Bytes::new());
        let r = apply(&f, r);
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
        assert!(!r.headers().contains_key(header::CONTENT_LENGTH));
    }
}
