//! The HTTP listener in TLS mode: never proxies. It answers ACME HTTP-01
//! challenges and sends everyone else to HTTPS:
//!
//! - `/.well-known/acme-challenge/<token>`: the key authorization (200), or
//!   404 for an unknown token; 403 for a host that is not ours;
//! - a host we serve (one of `TLS_DOMAIN`, or a name the own/local
//!   certificate covers): `301` for GET/HEAD, `308` for other methods so
//!   they keep their method and body (Thruster always answers 301); the
//!   `Location` keeps path and query and carries `HTTPS_PORT` when it is
//!   not 443 (Thruster issue #100);
//! - any other host (including bare IP addresses): `421 Misdirected
//!   Request`, so the proxy is no open redirect.

use std::net::IpAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};

use super::Tls;
use crate::config::normalize_domain;
use crate::http::{full_body, ResponseBody};

pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

pub struct Redirect {
    pub tls: Arc<Tls>,
    /// The port HTTPS is reachable on (the bound one when `HTTPS_PORT=0`).
    pub https_port: u16,
}

/// The request's host without port, normalized (IDNA, lower case), or the
/// IP address it names.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.headers().get(header::HOST) {
        // Raw UTF-8 is accepted too (then converted to punycode).
        Some(value) => String::from_utf8(value.as_bytes().to_vec()).ok()?,
        None => req.uri().authority()?.as_str().to_string(),
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match raw.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => raw.as_str(),
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    normalize_domain(host)
}

fn text(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

impl Redirect {
    pub fn respond<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        let mut response = self.answer(req);
        if req.version() <= Version::HTTP_11 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    fn answer<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        let host = request_host(req).filter(|h| self.tls.serves_host(h));
        if let Some(token) = req.uri().path().strip_prefix(CHALLENGE_PREFIX) {
            return match (host, self.tls.store.http_token(token)) {
                (None, _) => text(StatusCode::FORBIDDEN, "Forbidden: host not configured\n"),
                (Some(_), Some(key_authorization)) => text(StatusCode::OK, &key_authorization),
                (Some(_), None) => text(StatusCode::NOT_FOUND, "Not Found\n"),
            };
        }
        let Some(host) = host else {
            return text(StatusCode::MISDIRECTED_REQUEST, "Misdirected Request\n");
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let port = match self.https_port {
            443 => String::new(),
            port => format!(":{port}"),
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/");
        let location = format!("https://{host}{port}{path}");
        let Ok(location_value) = HeaderValue::from_str(&location) else {
            return text(StatusCode::BAD_REQUEST, "Bad Request\n");
        };
        let safe = matches!(*req.method(), Method::GET | Method::HEAD);
        let (status, body, content_type) = if safe {
            let href = location.replace('&', "&amp;").replace('"', "&quot;");
            (
                StatusCode::MOVED_PERMANENTLY,
                format!("<a href=\"{href}\">Moved Permanently</a>.\n\n"),
                "text/html; charset=utf-8",
            )
        } else {
            (
                StatusCode::PERMANENT_REDIRECT,
                String::new(),
                "text/plain; charset=utf-8",
            )
        };
        let mut response = Response::new(full_body(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::LOCATION, location_value);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}
