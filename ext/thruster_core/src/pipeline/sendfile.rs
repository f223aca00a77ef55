//! X-Sendfile: the app answers with `X-Sendfile: <path>` and an empty body,
//! and the proxy serves the file itself — Range, conditionals, HEAD,
//! precompressed siblings — from under the allowed roots only.
//!
//! Request side: Rack ≥ 2.2.20 ignores the `X-Sendfile-Type` request header
//! (CVE-2025-61780), so besides it the proxy sends a per-boot token that the
//! gem's `Thruster::Sendfile` middleware checks; a client can never turn
//! sendfile on by sending headers itself.
//!
//! Fixes over basecamp's Thruster (v0.1.22), which serves any file it can
//! read with Go's `ServeFile`: a root jail, the app's status honoured, a
//! body sent alongside discarded instead of aborting the connection,
//! siblings, and no directory listings or redirects.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::conn::ConnState;
use crate::files::conditional;
use crate::files::respond::{Representation, Source};
use crate::files::{self, jail, mime, siblings, ResolvedFile};
use crate::http::coding;
use crate::http::{full_body, ResponseBody, X_ACCEL_MAPPING, X_SENDFILE, X_SENDFILE_TYPE};
use crate::log;
use crate::pipeline::compression::{self, RequestFacts};
use std::sync::Arc;

/// Proves to the app's middleware that a request came through this proxy.
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-thruster-sendfile-token");
/// Where the app process finds the token (set for the child by `thrust`, and
/// by `Thruster.start` before Puma forks its workers).
pub const TOKEN_ENV: &str = "THRUSTER_RS_SENDFILE_TOKEN";

/// The token from the environment, or a new random one (64 hex digits).
pub fn token_from_env_or_new() -> String {
    match std::env::var(TOKEN_ENV) {
        Ok(token) if !token.is_empty() => token,
        _ => crate::sys::random::hex(32),
    }
}

pub struct Sendfile {
    enabled: bool,
    token: HeaderValue,
    roots: Vec<PathBuf>,
}

/// What the file response needs from the request, taken before the request
/// goes upstream.
pub struct FileRequest {
    method: Method,
    headers: HeaderMap,
}

impl Sendfile {
    pub fn new(enabled: bool, token: &str, roots: Vec<PathBuf>) -> Sendfile {
        Sendfile {
            enabled,
            token: HeaderValue::from_str(token).expect("a hex token is a valid header value"),
            roots,
        }
    }

    /// Sets or strips the request headers that switch sendfile on in the
    /// app. Returns what serving a file would need, when enabled.
    pub fn prepare(&self, method: &Method, headers: &mut HeaderMap) -> Option<FileRequest> {
        headers.remove(X_ACCEL_MAPPING);
        if !self.enabled {
            headers.remove(X_SENDFILE_TYPE);
            headers.remove(TOKEN_HEADER);
            return None;
        }
        headers.insert(X_SENDFILE_TYPE, HeaderValue::from_static("X-Sendfile"));
        headers.insert(TOKEN_HEADER, self.token.clone());
        let mut wanted = HeaderMap::new();
        for name in [
            header::RANGE,
            header::IF_RANGE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_UNMODIFIED_SINCE,
            header::ACCEPT_ENCODING,
        ] {
            for value in headers.get_all(&name) {
                wanted.append(name.clone(), value.clone());
            }
        }
        Some(FileRequest {
            method: method.clone(),
            headers: wanted,
        })
    }

    /// Replaces an `X-Sendfile` response with the file it names.
    /// `zero_copy`: the client connection when it is cleartext HTTP/1.x, so
    /// an uncompressed body can go out with sendfile(2).
    pub async fn serve(
        &self,
        request: &FileRequest,
        response: Response<ResponseBody>,
        facts: Option<&RequestFacts>,
        zero_copy: Option<Arc<ConnState>>,
    ) -> Response<ResponseBody> {
        let Some(target) = response
            .headers()
            .get(&X_SENDFILE)
            .filter(|v| !v.is_empty())
            .map(|v| PathBuf::from(std::ffi::OsStr::from_bytes(v.as_bytes())))
        else {
            return response;
        };
        // Any body the app sent alongside is dropped here; the pooled
        // upstream connection is discarded if it was not read to the end.
        let (mut parts, _) = response.into_parts();
        parts.headers.remove(&X_SENDFILE);
        parts.headers.remove(header::CONTENT_LENGTH);

        let roots = self.roots.clone();
        let accepted = if request.headers.contains_key(header::RANGE) {
            Vec::new()
        } else {
            coding::accepted(&request.headers)
        };
        let lookup_target = target.clone();
        let resolved = tokio::task::spawn_blocking(move || {
            let original = jail::resolve(&lookup_target, &roots)?;
            let sibling = if accepted.is_empty() {
                None
            } else {
                siblings::precompressed_sibling(&original, &accepted, &roots)
            };
            Ok::<_, jail::FileRefusal>((original, sibling))
        })
        .await;
        let (original, sibling) = match resolved {
            Ok(Ok(found)) => found,
            Ok(Err(refusal)) => {
                log::info(
                    "X-Sendfile file refused",
                    &[
                        ("path", target.display().to_string().into()),
                        ("reason", refusal.to_string().into()),
                    ],
                );
                return not_found(parts.headers);
            }
            Err(join) => {
                log::error(
                    "X-Sendfile lookup failed",
                    &[("error", join.to_string().into())],
                );
                return not_found(parts.headers);
            }
        };

        let headers = &mut parts.headers;
        if !headers.contains_key(header::CONTENT_TYPE) {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(mime::content_type_for(&original.path)),
            );
        }
        if !headers.contains_key(header::LAST_MODIFIED) {
            headers.insert(
                header::LAST_MODIFIED,
                conditional::http_date(original.modified),
            );
        }
        if !headers.contains_key(header::ETAG) {
            let etag = conditional::weak_etag_for(original.len, original.modified);
            headers.insert(
                header::ETAG,
                HeaderValue::from_str(&etag).expect("hex ETag"),
            );
        }
        let file = match sibling {
            Some(sibling) => {
                compression::mark_encoded(headers, sibling.coding);
                compression::merge_vary(headers);
                sibling.file
            }
            None => {
                headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                original
            }
        };
        respond(request, parts, file, facts, zero_copy)
    }
}

fn respond(
    request: &FileRequest,
    parts: http::response::Parts,
    file: ResolvedFile,
    facts: Option<&RequestFacts>,
    zero_copy: Option<Arc<ConnState>>,
) -> Response<ResponseBody> {
    let representation = Representation {
        status: parts.status,
        headers: parts.headers,
        source: Source::File {
            file: file.file,
            len: file.len,
        },
    };
    let mut response = files::respond::respond(
        &request.method,
        &request.headers,
        representation,
        std::time::SystemTime::now(),
        |status, headers, body_len| {
            zero_copy.filter(|_| compression::passes_untouched(facts, status, headers, body_len))
        },
    );
    *response.extensions_mut() = parts.extensions;
    response
}

/// The not-found answer Thruster (Go's `ServeFile`) gives for a missing
/// file — 404, `text/plain`, `nosniff`, "404 page not found" — without the
/// validators and caching fields that described the file.
fn not_found(mut headers: HeaderMap) -> Response<ResponseBody> {
    for name in [
        header::CACHE_CONTROL,
        header::ETAG,
        header::LAST_MODIFIED,
        header::CONTENT_ENCODING,
        header::CONTENT_TYPE,
        header::CONTENT_DISPOSITION,
        header::EXPIRES,
    ] {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let mut response = Response::new(full_body("404 page not found\n"));
    *response.status_mut() = StatusCode::NOT_FOUND;
    *response.headers_mut() = headers;
    response
}
