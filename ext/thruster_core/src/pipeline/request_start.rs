//! `X-Request-Start: t=<unix ms>` lets the app measure queueing time
//! (New Relic, Scout, Judoscale read it). A non-empty client value is kept,
//! as Thruster does, so a proxy in front of us can set it first.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;
use http::HeaderMap;

use crate::http::X_REQUEST_START;

pub fn stamp(headers: &mut HeaderMap) {
    let present = headers
        .get(X_REQUEST_START)
        .is_some_and(|v| !v.as_bytes().is_empty());
    if !present {
        headers.insert(X_REQUEST_START, header_value(SystemTime::now()));
    }
}

fn header_value(now: SystemTime) -> HeaderValue {
    let millis = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    crate::http::formatted_value(format_args!("t={millis}"))
        .expect("digits form a valid header value of 2 + at most 39 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_unix_millis_when_absent_or_empty() {
        for initial in [None, Some("")] {
            let mut h = HeaderMap::new();
            if let Some(v) = initial {
                h.insert(X_REQUEST_START, HeaderValue::from_static(v));
            }
            let before = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis();
            stamp(&mut h);
            let value = h[X_REQUEST_START].to_str().unwrap();
            let millis: u128 = value.strip_prefix("t=").unwrap().parse().unwrap();
            assert!(millis >= before && millis < before + 5_000, "{value}");
        }
    }

    #[test]
    fn keeps_a_client_value() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_START, HeaderValue::from_static("t=42"));
        stamp(&mut h);
        assert_eq!(h[X_REQUEST_START], "t=42");
    }
}
