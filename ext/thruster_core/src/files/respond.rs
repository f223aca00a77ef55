//! Serving a representation the proxy holds itself — a cache entry's bytes
//! or an X-Sendfile file — the one way both take: preconditions (304/412,
//! RFC 9110 §13.2.2), then Range (206/416, §14), then HEAD (§9.3.2).
//!
//! The caller has selected the representation (a stored encoded variant, a
//! precompressed sibling) and set its headers; this decides the status and
//! the body. Error answers are bare: a `412` carries nothing, a `416` only
//! its `Content-Range`; the caller adds its own labels (`X-Cache`).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;

use super::body::{FileBody, Piece};
use super::conditional::{self, Precondition, Validators};
use super::range::{self, RangeOutcome};
use crate::conn::ConnState;
use crate::http::{full_body, ResponseBody};
use crate::sys::OwnedFile;

/// Where the bytes of a representation are.
pub enum Source {
    /// In memory (a cache entry or one of its encoded variants).
    Bytes(Bytes),
    /// An open file of `len` bytes, read (or sent with sendfile(2)) as the
    /// client takes it.
    File { file: OwnedFile, len: u64 },
    /// A body of `len` bytes read as it is sent (a cache entry streamed
    /// from disk, checked chunk by chunk): `open(start, len)` gives those
    /// bytes. One range is answered from it; several get the whole body
    /// (a 200, as RFC 9110 §14.2 allows), since each part would read the
    /// file again.
    Stream { open: StreamOpener, len: u64 },
}

/// Opens `len` bytes from `start` of a [`Source::Stream`], with the
/// connection its file regions may go out on with sendfile(2), if any.
pub type StreamOpener = Box<dyn FnOnce(u64, u64, Option<Arc<ConnState>>) -> ResponseBody + Send>;

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Bytes(bytes) => bytes.len() as u64,
            Source::File { len, .. } | Source::Stream { len, .. } => *len,
        }
    }
}

/// A representation ready to serve: the status the app gave it, its
/// headers (validators included) and its bytes.
pub struct Representation {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub source: Source,
}

/// Answers `method` with `request`'s preconditions and Range against `rep`.
///
/// `if_range_now`: the time a `Last-Modified` date in `If-Range` is judged
/// strong against (§13.1.5): a cached response's `Date`, or now for a file.
/// `zero_copy`: given the final status, headers and body length, the
/// connection a file body may be sent on with sendfile(2) (`None` when the
/// body will be re-encoded or the connection cannot).
pub fn respond(
    method: &Method,
    request: &HeaderMap,
    rep: Representation,
    if_range_now: SystemTime,
    zero_copy: impl FnOnce(StatusCode, &HeaderMap, u64) -> Option<Arc<ConnState>>,
) -> Response<ResponseBody> {
    let Representation {
        mut status,
        mut headers,
        source,
    } = rep;
    let len = source.len();
    // Byte ranges are over the identity bytes of a 200 only.
    let rangeable = status == StatusCode::OK && !headers.contains_key(header::CONTENT_ENCODING);
    let single_range_only = matches!(source, Source::Stream { .. });
    if rangeable {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }

    let validators = Validators::from_headers(&headers);
    match conditional::evaluate(method, request, &validators) {
        Precondition::Proceed => {}
        Precondition::NotModified => {
            conditional::not_modified_headers(&mut headers);
            return build(StatusCode::NOT_MODIFIED, headers, full_body(Bytes::new()));
        }
        Precondition::PreconditionFailed => {
            return build(
                StatusCode::PRECONDITION_FAILED,
                HeaderMap::new(),
                full_body(Bytes::new()),
            );
        }
    }

    let mut ranges = None;
    if rangeable {
        match range::select(method, request, len, &validators, if_range_now) {
            RangeOutcome::Full => {}
            RangeOutcome::Unsatisfiable => {
                let mut h = HeaderMap::new();
                h.insert(header::CONTENT_RANGE, range::unsatisfied_content_range(len));
                return build(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    h,
                    full_body(Bytes::new()),
                );
            }
            RangeOutcome::Partial(selected) if single_range_only && selected.len() > 1 => {}
            RangeOutcome::Partial(selected) => {
                status = StatusCode::PARTIAL_CONTENT;
                ranges = Some(selected);
            }
        }
    }

    // The parts of the body: the whole source (`None`: the common case,
    // without building a list), one range, or the pieces of a
    // multipart/byteranges answer (§14.6).
    let pieces = match ranges.as_deref() {
        None => None,
        Some([only]) => {
            headers.insert(header::CONTENT_RANGE, range::content_range(*only, len));
            Some(vec![Piece::File {
                start: only.start,
                len: only.size(),
            }])
        }
        Some(several) => {
            let multipart = range::Multipart::new(headers.get(header::CONTENT_TYPE), len, several);
            headers.insert(header::CONTENT_TYPE, multipart.content_type().clone());
            let mut pieces = Vec::new();
            for part in multipart.parts() {
                pieces.push(Piece::Bytes(part.head.clone()));
                pieces.push(Piece::File {
                    start: part.range.start,
                    len: part.range.size(),
                });
            }
            pieces.push(Piece::Bytes(multipart.trailer().clone()));
            Some(pieces)
        }
    };
    let body_len: u64 = pieces.as_ref().map_or(len, |pieces| {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len() as u64,
                Piece::File { len, .. } => *len,
            })
            .sum()
    });
    // RFC 9110 §8.6: no Content-Length on 204 (or 304, answered above).
    if status != StatusCode::NO_CONTENT {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    // HEAD gets the headers GET would get, and no body.
    if method == Method::HEAD {
        return build(status, headers, full_body(Bytes::new()));
    }
    let body = match (source, pieces) {
        (Source::Bytes(bytes), None) => full_body(bytes),
        (Source::Bytes(bytes), Some(pieces)) => full_body(gather(&bytes, &pieces)),
        (Source::File { file, .. }, pieces) => {
            let pieces = pieces.unwrap_or_else(|| vec![Piece::File { start: 0, len }]);
            let mut body = FileBody::new(file, pieces);
            if let Some(conn) = zero_copy(status, &headers, body_len) {
                body = body.zero_copy(conn);
            }
            body.boxed_unsync()
        }
        (Source::Stream { open, .. }, pieces) => {
            let conn = zero_copy(status, &headers, body_len);
            match pieces.as_deref() {
                Some([Piece::File { start, len }]) => open(*start, *len, conn),
                // Several ranges were turned into the whole body above.
                _ => open(0, len, conn),
            }
        }
    };
    build(status, headers, body)
}

/// The bytes the pieces name, from an in-memory body: no copy for the
/// whole body or one range.
fn gather(bytes: &Bytes, pieces: &[Piece]) -> Bytes {
    let slice = |start: u64, len: u64| bytes.slice(start as usize..(start + len) as usize);
    match pieces {
        [Piece::File { start, len }] => slice(*start, *len),
        _ => {
            let mut out = Vec::new();
            for piece in pieces {
                match piece {
                    Piece::Bytes(b) => out.extend_from_slice(b),
                    Piece::File { start, len } => out.extend_from_slice(&slice(*start, *len)),
                }
            }
            Bytes::from(out)
        }
    }
}

fn build(status: StatusCode, headers: HeaderMap, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const BODY: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

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

    fn file_source() -> (crate::sys::test_support::TempDir, Source) {
        let dir = crate::sys::test_support::TempDir::new("respond");
        let path = dir.file("f.txt", BODY);
        let file = crate::sys::open_read(&path, 0).unwrap();
        (
            dir,
            Source::File {
                file,
                len: BODY.len() as u64,
            },
        )
    }

    fn rep(source: Source, status: StatusCode, extra: &[(&str, &str)]) -> Representation {
        let mut h = headers(&[
            ("content-type", "text/plain"),
            ("etag", "\"v1\""),
            ("last-modified", LM),
        ]);
        h.extend(headers(extra));
        Representation {
            status,
            headers: h,
            source,
        }
    }

    async fn serve(
        method: Method,
        request: &[(&str, &str)],
        rep: Representation,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let response = respond(
            &method,
            &headers(request),
            rep,
            SystemTime::now(),
            |_, _, _| None,
        );
        let (parts, body) = response.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    type Fields = &'static [(&'static str, &'static str)];

    /// The same answers from memory and from a file: the one path both
    /// cache hits and X-Sendfile take.
    #[tokio::test(flavor = "current_thread")]
    async fn bytes_and_files_answer_alike() {
        // (case, method, request fields, status, body, response fields)
        type Case = (
            &'static str,
            Method,
            Fields,
            StatusCode,
            &'static [u8],
            Fields,
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("whole", Method::GET, &[], StatusCode::OK, BODY, &[("content-length", "36"), ("accept-ranges", "bytes")]),
            ("HEAD", Method::HEAD, &[], StatusCode::OK, b"", &[("content-length", "36")]),
            ("one range", Method::GET, &[("range", "bytes=2-4")], StatusCode::PARTIAL_CONTENT, b"234", &[("content-range", "bytes 2-4/36"), ("content-length", "3")]),
            ("suffix range", Method::GET, &[("range", "bytes=-3")], StatusCode::PARTIAL_CONTENT, b"xyz", &[("content-range", "bytes 33-35/36")]),
            ("HEAD ignores Range (§14.2: GET only)", Method::HEAD, &[("range", "bytes=2-4")], StatusCode::OK, b"", &[("content-length", "36")]),
            ("unsatisfiable", Method::GET, &[("range", "bytes=99-")], StatusCode::RANGE_NOT_SATISFIABLE, b"", &[("content-range", "bytes */36")]),
            ("304", Method::GET, &[("if-none-match", "\"v1\"")], StatusCode::NOT_MODIFIED, b"", &[("etag", "\"v1\"")]),
            ("412", Method::GET, &[("if-match", "\"v2\"")], StatusCode::PRECONDITION_FAILED, b"", &[]),
            ("If-Range mismatch: whole", Method::GET, &[("range", "bytes=2-4"), ("if-range", "\"v0\"")], StatusCode::OK, BODY, &[]),
        ];
        for (name, method, request, status, body, expect) in cases {
            let (_dir, file) = file_source();
            for source in [Source::Bytes(Bytes::from_static(BODY)), file] {
                let (got_status, got_headers, got_body) =
                    serve(method.clone(), request, rep(source, StatusCode::OK, &[])).await;
                assert_eq!(got_status, *status, "{name}");
                assert_eq!(&got_body[..], *body, "{name}");
                for (k, v) in *expect {
                    assert_eq!(
                        got_headers.get(*k).map(|v| v.to_str().unwrap()),
                        Some(*v),
                        "{name}: {k}"
                    );
                }
                match *status {
                    StatusCode::NOT_MODIFIED => assert!(
                        !got_headers.contains_key("content-type")
                            && !got_headers.contains_key("content-length"),
                        "{name}: a 304 has no representation metadata"
                    ),
                    StatusCode::PRECONDITION_FAILED | StatusCode::RANGE_NOT_SATISFIABLE => {
                        assert_eq!(
                            got_headers.len(),
                            expect.len(),
                            "{name}: bare: {got_headers:?}"
                        )
                    }
                    _ => {}
                }
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn several_ranges_make_one_multipart_body_from_either_source() {
        let (_dir, file) = file_source();
        let mut bodies = Vec::new();
        for source in [Source::Bytes(Bytes::from_static(BODY)), file] {
            let (status, h, body) = serve(
                Method::GET,
                &[("range", "bytes=0-1,30-31")],
                rep(source, StatusCode::OK, &[]),
            )
            .await;
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            let ct = h["content-type"].to_str().unwrap().to_string();
            assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
            assert_eq!(h["content-length"], body.len().to_string().as_str());
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(
                text.contains("content-range: bytes 0-1/36\r\n\r\n01\r\n"),
                "{text}"
            );
            assert!(
                text.contains("content-range: bytes 30-31/36\r\n\r\nuv\r\n"),
                "{text}"
            );
            let boundary = text
                .lines()
                .next()
                .unwrap()
                .trim_start_matches('-')
                .to_string();
            assert!(ct.contains(&boundary), "{ct} names the body's boundary");
            bodies.push(text.replace(&boundary, "B"));
        }
        assert_eq!(bodies[0], bodies[1]);
    }

    /// A stream answers preconditions, HEAD and one range like the other
    /// sources (opened at the range's start); several ranges get the whole
    /// body.
    #[tokio::test(flavor = "current_thread")]
    async fn streams_answer_conditionals_head_and_one_range() {
        let stream = || Source::Stream {
            open: Box::new(|start, len, _| {
                let bytes = Bytes::from_static(BODY);
                crate::http::full_body(bytes.slice(start as usize..(start + len) as usize))
            }),
            len: BODY.len() as u64,
        };
        let (status, h, body) = serve(Method::GET, &[], rep(stream(), StatusCode::OK, &[])).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, BODY));
        assert_eq!(h["content-length"], "36");
        assert_eq!(h["accept-ranges"], "bytes");
        let (status, h, body) = serve(
            Method::GET,
            &[("if-none-match", "\"v1\"")],
            rep(stream(), StatusCode::OK, &[]),
        )
        .await;
        assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
        assert!(!h.contains_key("content-length"));
        let (status, h, body) = serve(Method::HEAD, &[], rep(stream(), StatusCode::OK, &[])).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        assert_eq!(h["content-length"], "36");
        let (status, h, body) = serve(
            Method::GET,
            &[("range", "bytes=10-19")],
            rep(stream(), StatusCode::OK, &[]),
        )
        .await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::PARTIAL_CONTENT, &BODY[10..20])
        );
        assert_eq!(h["content-range"], "bytes 10-19/36");
        let (status, h, body) = serve(
            Method::GET,
            &[("range", "bytes=0-1,5-6")],
            rep(stream(), StatusCode::OK, &[]),
        )
        .await;
        assert_eq!((status, &body[..]), (StatusCode::OK, BODY));
        assert!(!h.contains_key("content-range"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn encoded_or_non_200_representations_are_not_ranged() {
        for (status, extra) in [
            (StatusCode::OK, &[("content-encoding", "gzip")][..]),
            (StatusCode::NOT_FOUND, &[][..]),
        ] {
            let (got, h, body) = serve(
                Method::GET,
                &[("range", "bytes=0-1")],
                rep(Source::Bytes(Bytes::from_static(BODY)), status, extra),
            )
            .await;
            assert_eq!((got, &body[..]), (status, BODY));
            assert!(!h.contains_key("accept-ranges") && !h.contains_key("content-range"));
        }
        let (got, h, _) = serve(
            Method::GET,
            &[],
            rep(Source::Bytes(Bytes::new()), StatusCode::NO_CONTENT, &[]),
        )
        .await;
        assert_eq!(got, StatusCode::NO_CONTENT);
        assert!(!h.contains_key("content-length"), "RFC 9110 §8.6");
    }
}
