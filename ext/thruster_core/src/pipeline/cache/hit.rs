//! Answering from a stored entry: representation selection (a stored
//! encoded variant, or identity), then `files::respond` — preconditions,
//! Range and HEAD against the representation actually selected, as for
//! X-Sendfile files. Entries too large for memory are streamed from the
//! disk tier through the same function.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use http_body_util::BodyExt;

use super::disk::DiskEntry;
use super::entry::now_unix_ms;
use super::key::{self, BaseKey, CacheKey};
use super::store::{Entry, Store};
use super::tier;
use crate::conn::ConnState;
use crate::files;
use crate::files::respond::{Representation, Source};
use crate::http::{full_body, ResponseBody, X_CACHE};
use crate::pipeline::compression::{self, RequestFacts};

/// Whether the stored response is acceptable to this client: an app-encoded
/// body only goes to clients that accept its coding.
pub fn acceptable(stored: &HeaderMap, request: &HeaderMap) -> bool {
    match stored
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(coding) => coding
            .split(',')
            .map(str::trim)
            .filter(|c| !c.eq_ignore_ascii_case("identity"))
            .all(|c| crate::http::coding::accepts(request, c)),
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn respond(
    store: &Store,
    below: tier::Below<'_>,
    entry: &Arc<Entry>,
    method: &Method,
    request: &HeaderMap,
    facts: Option<&RequestFacts>,
    base: &BaseKey,
    label: &'static str,
) -> Response<ResponseBody> {
    let mut headers = entry.headers.clone();
    let age = entry.age(Instant::now()).as_secs();
    headers.insert(header::AGE, HeaderValue::from(age));

    // A Range asks for bytes of the identity representation; only a
    // request for the whole body gets an encoded variant.
    let wants_range = method == Method::GET && request.contains_key(header::RANGE);
    let coding = facts.filter(|_| !wants_range).and_then(|f| {
        compression::stored_coding_for(
            f,
            entry.status,
            &entry.headers,
            Some(entry.body.len() as u64),
        )
    });
    let mut body = entry.body.clone();
    if let Some(coding) = coding {
        let key = CacheKey::new(base.clone(), &key::vary_names(&entry.headers), request);
        // Made once per entry: read from a lower tier when an earlier
        // process or another instance made it, else compressed now (and
        // written there).
        let make = tier::encoding(below, &key, entry, coding);
        if let Some(variant) = store.variant(&key, entry, coding, make).await {
            compression::mark_encoded(&mut headers, coding);
            body = variant;
        }
    }
    let date = if_range_date(&headers);
    let representation = Representation {
        status: entry.status,
        headers,
        source: Source::Bytes(body),
    };
    let mut response =
        files::respond::respond(method, request, representation, date, |_, _, _| None);
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(label));
    response
}

/// RFC 9110 §13.1.5: If-Range is judged at the stored response's Date.
fn if_range_date(headers: &HeaderMap) -> SystemTime {
    headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or_else(SystemTime::now)
}

/// An entry too large for memory, streamed from its file (each chunk
/// checked before it is sent; a bad one ends the response as an error).
/// Preconditions, HEAD and a single range are answered as for any hit (a
/// range reads only the chunks that hold it); the body is in the stored
/// identity form (compression may still encode it on the way out, as for
/// a miss).
pub fn stream(
    found: DiskEntry,
    method: &Method,
    request: &HeaderMap,
    out: Outlet<'_>,
    label: &'static str,
) -> Response<ResponseBody> {
    let (status, headers) = streamed_head(&found, None);
    streamed(status, headers, found, method, request, out, label)
}

/// Where a body streamed from disk goes: the connection it may send file
/// regions on with sendfile(2) (cleartext HTTP/1.x), and the request's
/// compression facts (a body the compression layer will encode must carry
/// its bytes).
pub struct Outlet<'a> {
    pub zero_copy: Option<Arc<ConnState>>,
    pub facts: Option<&'a RequestFacts>,
}

/// An entry too large for memory sent in its stored `coding` encoding
/// (`encoded`, an encoding record), streamed from disk like the entry:
/// preconditions and HEAD as for any hit, no ranges (they are over the
/// identity bytes).
pub fn stream_encoded(
    found: &DiskEntry,
    encoded: DiskEntry,
    coding: compression::Coding,
    method: &Method,
    request: &HeaderMap,
    out: Outlet<'_>,
    label: &'static str,
) -> Response<ResponseBody> {
    let (status, headers) = streamed_head(found, Some(coding));
    streamed(status, headers, encoded, method, request, out, label)
}

/// The status and headers of a hit on `found` (in `coding`, if any).
fn streamed_head(
    found: &DiskEntry,
    coding: Option<compression::Coding>,
) -> (StatusCode, HeaderMap) {
    let meta = found.meta();
    let mut headers = meta.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(meta.age_secs(now_unix_ms())));
    if let Some(coding) = coding {
        compression::mark_encoded(&mut headers, coding);
    }
    (meta.status, headers)
}

/// Answers with `body` (an entry or encoding record) read from disk as the
/// client takes it.
fn streamed(
    status: StatusCode,
    headers: HeaderMap,
    body: DiskEntry,
    method: &Method,
    request: &HeaderMap,
    out: Outlet<'_>,
    label: &'static str,
) -> Response<ResponseBody> {
    let date = if_range_date(&headers);
    let representation = Representation {
        status,
        headers,
        source: Source::Stream {
            len: body.meta().body_len,
            open: Box::new(move |start, len, zero_copy| {
                let body = body.body_range(start, len);
                match zero_copy {
                    Some(conn) => body.zero_copy(conn).boxed_unsync(),
                    None => body.boxed_unsync(),
                }
            }),
        },
    };
    let Outlet { zero_copy, facts } = out;
    let mut response =
        files::respond::respond(method, request, representation, date, |status, h, len| {
            zero_copy.filter(|_| compression::passes_untouched(facts, status, h, len))
        });
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(label));
    response
}

/// A stored X-Sendfile response, handed on as the app sent it so the
/// X-Sendfile layer serves the file (with Range and conditionals) as it is
/// on disk now.
pub fn reference(entry: &Entry, label: &'static str) -> Response<ResponseBody> {
    let mut headers = entry.headers.clone();
    let age = entry.age(Instant::now()).as_secs();
    headers.insert(header::AGE, HeaderValue::from(age));
    headers.insert(X_CACHE, HeaderValue::from_static(label));
    build(entry.status, headers, Bytes::new())
}

fn build(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
