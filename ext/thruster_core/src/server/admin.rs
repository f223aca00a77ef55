//! The admin listener (`ADMIN_PORT`, 127.0.0.1 only): what `Thruster.purge`
//! calls from wherever Rails code runs — a Puma worker in cluster mode, a
//! console, a job in the same container — since the proxy itself runs only
//! in the Puma master (or in `thrust`).
//!
//! `POST /purge` with the target as the body (`/posts/1`, `/posts/*`, `*`,
//! or a URL) and `Authorization: Bearer <THRUSTER_RS_ADMIN_TOKEN>`. The
//! token is made per boot (kept across Puma's hot restart through the
//! environment, like the listener) and handed to the app in its
//! environment with the URL (`THRUSTER_RS_ADMIN_URL`): other local users
//! can reach a loopback port, not the app's environment.
//!
//! Answers: `200` with JSON `{"purged":…,"shared":"ok"|"error: …"|null}`,
//! `400` for a bad target, `401` without the token, `404`/`405` otherwise.

use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::side_http;
use crate::http::{full_body, plain_response, ResponseBody};
use crate::log;
use crate::pipeline::Pipeline;
use crate::sys::Registered;

/// The app reads the listener's URL here (`http://127.0.0.1:<port>`).
pub const URL_ENV: &str = "THRUSTER_RS_ADMIN_URL";
/// The app reads the token here.
pub const TOKEN_ENV: &str = "THRUSTER_RS_ADMIN_TOKEN";
/// Longest request body: a purge target.
const MAX_BODY: usize = 16 * 1024;

/// The token from the environment (a previous process image's, across a
/// hot restart), else a new random one.
pub fn token_from_env_or_new() -> String {
    match std::env::var(TOKEN_ENV) {
        Ok(token) if token.len() >= 32 && token.bytes().all(|b| b.is_ascii_alphanumeric()) => token,
        _ => crate::sys::random::hex(32),
    }
}

struct Admin {
    pipeline: Arc<Pipeline>,
    expected: HeaderValue,
}

pub(super) async fn serve(
    listener: Registered<TcpListener>,
    pipeline: Arc<Pipeline>,
    token: String,
    shutdown: watch::Receiver<bool>,
) {
    let Ok(expected) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        log::error("The admin token is not a valid header value", &[]);
        return;
    };
    let admin = Arc::new(Admin { pipeline, expected });
    let handle = move |req: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        async move { admin.respond(req).await }
    };
    side_http::serve("admin", listener, handle, shutdown).await;
}

impl Admin {
    async fn respond(&self, req: Request<hyper::body::Incoming>) -> Response<ResponseBody> {
        if req.uri().path() != "/purge" {
            return plain_response(StatusCode::NOT_FOUND, "not found");
        }
        if req.method() != Method::POST {
            let mut response = plain_response(StatusCode::METHOD_NOT_ALLOWED, "POST");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        if !token_matches(req.headers().get(header::AUTHORIZATION), &self.expected) {
            return plain_response(
                StatusCode::UNAUTHORIZED,
                "missing or wrong Authorization: Bearer $THRUSTER_RS_ADMIN_TOKEN",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return plain_response(StatusCode::PAYLOAD_TOO_LARGE, "purge target too long")
            }
        };
        let Ok(target) = std::str::from_utf8(&body) else {
            return plain_response(StatusCode::BAD_REQUEST, "the purge target is not UTF-8");
        };
        let Some(cache) = self.pipeline.cache() else {
            // Nothing is cached (CACHE_SIZE=0): nothing to purge, and
            // nothing will serve the old page.
            return json_response(
                json!({ "purged": target.trim(), "shared": null, "cache": "off" }),
            );
        };
        match cache.purge(target).await {
            Ok(outcome) => {
                let shared = match &outcome.shared {
                    None => serde_json::Value::Null,
                    Some(Ok(())) => "ok".into(),
                    Some(Err(e)) => format!("error: {e}").into(),
                };
                log::info(
                    "Cache purged",
                    &[("target", target.trim().into()), ("shared", shared.clone())],
                );
                json_response(json!({ "purged": target.trim(), "shared": shared }))
            }
            Err(e) => plain_response(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }
}

/// Compares in time independent of where the first difference is.
fn token_matches(given: Option<&HeaderValue>, expected: &HeaderValue) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_response(value: serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(value.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let expected = HeaderValue::from_static("Bearer abc");
        assert!(token_matches(
            Some(&HeaderValue::from_static("Bearer abc")),
            &expected
        ));
        assert!(!token_matches(
            Some(&HeaderValue::from_static("Bearer abd")),
            &expected
        ));
        assert!(!token_matches(
            Some(&HeaderValue::from_static("Bearer ab")),
            &expected
        ));
        assert!(!token_matches(None, &expected));
    }
}
