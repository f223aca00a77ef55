//! Answering from a stored entry: representation selection (a stored
//! encoded variant, or identity), then preconditions (304/412) and Range
//! (206/416) against the representation actually selected, then HEAD.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::key::{self, BaseKey, CacheKey};
use super::store::{Entry, Store};
use crate::files::conditional::{self, Precondition, Validators};
use crate::files::range::{self, RangeOutcome};
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
            .all(|c| key::accepts(request, c)),
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
    headers.insert(X_CACHE, HeaderValue::from_static(label));

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
    let mut encoded = false;
    if let Some(coding) = coding {
        let key = CacheKey::new(base.clone(), &key::vary_names(&entry.headers), request);
        if let Some(variant) = store.variant(&key, entry, coding).await {
            compression::mark_encoded(&mut headers, coding);
            body = variant;
            encoded = true;
        }
    }
    let identity = !encoded && !entry.headers.contains_key(header::CONTENT_ENCODING);
    let rangeable = identity && entry.status == StatusCode::OK;
    if rangeable {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }

    let mut status = entry.status;
    let validators = Validators::from_headers(&headers);
    match conditional::evaluate(method, request, &validators) {
        Precondition::Proceed => {}
        Precondition::NotModified => {
            conditional::not_modified_headers(&mut headers);
            return build(StatusCode::NOT_MODIFIED, headers, Bytes::new());
        }
        Precondition::PreconditionFailed => {
            let mut h = HeaderMap::new();
            h.insert(X_CACHE, HeaderValue::from_static(label));
            return build(StatusCode::PRECONDITION_FAILED, h, Bytes::new());
        }
    }

    if rangeable {
        // §13.1.5: If-Range is judged at the stored response's Date.
        let date = headers
            .get(header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .unwrap_or_else(SystemTime::now);
        match range::select(method, request, body.len() as u64, &validators, date) {
            RangeOutcome::Full => {}
            RangeOutcome::Unsatisfiable => {
                headers.insert(
                    header::CONTENT_RANGE,
                    range::unsatisfied_content_range(body.len() as u64),
                );
                headers.remove(header::CONTENT_TYPE);
                return head_aware(
                    method,
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    headers,
                    Bytes::new(),
                );
            }
            RangeOutcome::Partial(ranges) => {
                let content_type = headers.get(header::CONTENT_TYPE).cloned();
                let sliced = range::slice_body(&body, &ranges, content_type.as_ref());
                match sliced.content_type {
                    Some(value) => headers.insert(header::CONTENT_TYPE, value),
                    None => headers.remove(header::CONTENT_TYPE),
                };
                if let Some(value) = sliced.content_range {
                    headers.insert(header::CONTENT_RANGE, value);
                }
                body = sliced.body;
                status = StatusCode::PARTIAL_CONTENT;
            }
        }
    }
    head_aware(method, status, headers, body)
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

/// HEAD gets GET's headers, including the length GET would send.
fn head_aware(
    method: &Method,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
) -> Response<ResponseBody> {
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    build(status, headers, body)
}

fn build(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
