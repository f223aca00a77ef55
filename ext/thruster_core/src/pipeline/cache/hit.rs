//! Answering from a stored entry: representation selection (a stored
//! encoded variant, or identity), then `files::respond` — preconditions,
//! Range and HEAD against the representation actually selected, as for
//! X-Sendfile files.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::key::{self, BaseKey, CacheKey};
use super::store::{Entry, Store};
use crate::files;
use crate::files::respond::{Representation, Source};
use crate::http::{full_body, ResponseBody, X_CACHE};
use crate::pipeline::compression::{self, RequestFacts};

/// Whether the stored response is acceptable to this client: an app-encoded
/// body only goes to clients that accept its coding.
pub fn acceptable(entry: &Entry, request: &HeaderMap) -> bool {
    match entry
        .headers
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

pub async fn respond(
    store: &Store,
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
        compression::coding_for(
            f,
            entry.status,
            &entry.headers,
            Some(entry.body.len() as u64),
        )
    });
    let mut body = entry.body.clone();
    if let Some(coding) = coding {
        let key = CacheKey::new(base.clone(), &key::vary_names(&entry.headers), request);
        if let Some(variant) = store.variant(&key, entry, coding).await {
            compression::mark_encoded(&mut headers, coding);
            body = variant;
        }
    }
    // RFC 9110 §13.1.5: If-Range is judged at the stored response's Date.
    let date = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or_else(SystemTime::now);
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
