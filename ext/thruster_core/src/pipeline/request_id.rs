//! `X-Request-Id`: every request sent to the app carries one, the client
//! gets it back, and the request log line names it, so the proxy's and the
//! app's logs join on it.
//!
//! A client's value is cleaned the way Rails' `ActionDispatch::RequestId`
//! cleans it (every character other than ASCII letters, digits, `_`, `-`
//! and `@` removed), so Rails logs the same id. If nothing is left, or more
//! than 200 characters are, the proxy makes a new one rather than truncate
//! (a truncated id would no longer join with what the client logged).

use http::header::{HeaderMap, HeaderValue};

use crate::http::X_REQUEST_ID;

/// Longest client id kept; longer ones are replaced, never cut.
pub const MAX_LEN: usize = 200;

/// Gives the request its id (the client's, cleaned, or a new one) and
/// returns it for the log line and the response.
pub fn assign(headers: &mut HeaderMap) -> HeaderValue {
    let value = match headers.get(X_REQUEST_ID).and_then(|v| clean(v.as_bytes())) {
        Some(id) => HeaderValue::from_str(&id).expect("ids are ASCII letters, digits, _ - @"),
        None => generated_value(),
    };
    headers.insert(X_REQUEST_ID, value.clone());
    value
}

/// The client's id with every character but `[A-Za-z0-9_@-]` removed, or
/// `None` when nothing usable is left.
pub fn clean(raw: &[u8]) -> Option<String> {
    let kept: String = raw
        .iter()
        .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'@'))
        .map(|&b| b as char)
        .collect();
    (!kept.is_empty() && kept.len() <= MAX_LEN).then_some(kept)
}

/// A new id in UUID v4 form: 122 bits of a [`crate::sys::random::draw`], so
/// ids never repeat within a process and cannot be told apart from random
/// ones, without a syscall per request. As a header value whose clones
/// share one allocation: the request's id is echoed in the response.
fn generated_value() -> HeaderValue {
    let draw = crate::sys::random::draw();
    let (hi, lo) = (draw.word(0), draw.word(1));
    // Version 4 and the RFC 9562 variant bits.
    let hi = (hi & !0xf000) | 0x4000;
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62);
    crate::http::formatted_value(format_args!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    ))
    .expect("a UUID is 36 valid bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaned_as_rails_does_and_replaced_rather_than_cut() {
        assert_eq!(clean(b"abc-123_x@y").as_deref(), Some("abc-123_x@y"));
        assert_eq!(clean(b"a b\tc;d/e<f>").as_deref(), Some("abcdef"));
        assert_eq!(clean("caf\u{e9}-1".as_bytes()).as_deref(), Some("caf-1"));
        assert_eq!(clean(b"  ;;; "), None);
        assert_eq!(clean(b""), None);
        let long = "a".repeat(MAX_LEN);
        assert_eq!(clean(long.as_bytes()).as_deref(), Some(long.as_str()));
        assert_eq!(clean("a".repeat(MAX_LEN + 1).as_bytes()), None);
        // Counted after cleaning: junk around a short id does not disqualify it.
        let padded = format!("{}id-7", " ".repeat(300));
        assert_eq!(clean(padded.as_bytes()).as_deref(), Some("id-7"));
    }

    #[test]
    fn generated_ids_are_uuid_v4_shaped_and_unique() {
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| generated_value().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(parts[2].starts_with('4'), "{id}");
            assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{id}");
            assert_eq!(clean(id.as_bytes()).as_deref(), Some(id.as_str()));
        }
    }

    #[test]
    fn assign_keeps_a_clean_client_id_and_replaces_a_bad_one() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("req 42!"));
        assert_eq!(assign(&mut h), "req42");
        assert_eq!(h[X_REQUEST_ID], "req42");
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("!!!"));
        let made = assign(&mut h);
        assert_eq!(made.len(), 36);
        assert_eq!(h[X_REQUEST_ID], made);
        let mut h = HeaderMap::new();
        assert_eq!(assign(&mut h).len(), 36);
    }
}
