//! The bottom layer's HTTP vocabulary: the body types every layer above
//! passes around, small constructors for them, and the names of the
//! non-standard header fields the proxy reads or writes.

pub mod coding;

use bytes::Bytes;
use http::{header, HeaderName, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of the whole request path: boxed, so the cache,
/// files, compression and the upstream can each hand back their own body.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Request bodies as they enter the pipeline and go upstream: boxed, so an
/// HTTP/1 or HTTP/2 body (hyper's `Incoming`) and a QUIC stream alike can
/// enter the same path.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// The proxy's cache verdict on a response: `hit`, `miss`, `stale`, `bypass`.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// The app asks the proxy to send this file as the body.
pub const X_SENDFILE: HeaderName = HeaderName::from_static("x-sendfile");
/// Old Rack's opt-in request header for X-Sendfile (no longer honoured).
pub const X_SENDFILE_TYPE: HeaderName = HeaderName::from_static("x-sendfile-type");
/// nginx's path mapping for X-Accel-Redirect; never passed to the app.
pub const X_ACCEL_MAPPING: HeaderName = HeaderName::from_static("x-accel-mapping");
/// nginx's switch (`X-Accel-Buffering: no`), which Rails apps already send
/// for streamed responses: it turns response buffering off. It is meant for
/// the proxy and is not passed on.
pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
/// The request's id, shared by the proxy's and the app's logs.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// When the proxy received the request (`t=<unix ms>`), for queue-time metrics.
pub const X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");

/// A header value the proxy makes per request (an id, a time, an address)
/// formatted into one allocation that its clones share. From a `String`, a
/// value costs the string's allocation and then, at its first clone (the
/// request kept for a replay, the id echoed in the response), a copy into
/// a shared allocation of its own.
///
/// `None` if the text is not a valid header value or over 64 bytes.
pub fn formatted_value(args: std::fmt::Arguments<'_>) -> Option<http::HeaderValue> {
    struct Text {
        buf: [u8; 64],
        len: usize,
    }
    impl AsRef<[u8]> for Text {
        fn as_ref(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }
    let mut text = Text {
        buf: [0; 64],
        len: 0,
    };
    let mut cursor = std::io::Cursor::new(&mut text.buf[..]);
    std::io::Write::write_fmt(&mut cursor, args).ok()?;
    text.len = usize::try_from(cursor.position()).ok()?;
    http::HeaderValue::from_maybe_shared(Bytes::from_owner(text)).ok()
}

/// `text` in ASCII lower case, written into `buf`: no allocation for the
/// short tokens the proxy reads per response (directive names, media
/// types). `None` if `text` is longer than `buf`.
pub fn ascii_lowercase_in<'a>(text: &str, buf: &'a mut [u8]) -> Option<&'a str> {
    let buf = buf.get_mut(..text.len())?;
    buf.copy_from_slice(text.as_bytes());
    buf.make_ascii_lowercase();
    Some(std::str::from_utf8(buf).expect("ASCII case changes keep UTF-8 valid"))
}

/// A short `text/plain` response made by the proxy itself.
pub fn plain_response(status: StatusCode, text: &str) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full_body(format!("{text}\n")))
        .expect("a status and a static header form a valid response")
}

/// A body of fixed bytes, boxed into the pipeline's response body type.
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_values_read_as_formatted_and_refuse_what_they_cannot_hold() {
        let value = formatted_value(format_args!("t={}", 1_764_000_000_123u64)).unwrap();
        assert_eq!(value.to_str().unwrap(), "t=1764000000123");
        assert_eq!(value.clone(), value);
        let longest = "x".repeat(64);
        assert_eq!(
            formatted_value(format_args!("{longest}"))
                .unwrap()
                .as_bytes(),
            longest.as_bytes()
        );
        assert!(formatted_value(format_args!("{longest}y")).is_none());
        assert!(formatted_value(format_args!("a\nb")).is_none());
    }

    #[test]
    fn lowercase_in_a_buffer_or_none_when_it_does_not_fit() {
        let mut buf = [0u8; 8];
        assert_eq!(ascii_lowercase_in("Max-Age", &mut buf), Some("max-age"));
        assert_eq!(ascii_lowercase_in("ÉTÉ", &mut buf), Some("ÉtÉ"));
        assert_eq!(ascii_lowercase_in("", &mut buf), Some(""));
        assert_eq!(ascii_lowercase_in("TOO-LONG!", &mut buf), None);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use tokio::sync::mpsc;

    use super::BoxError;

    /// A body a test feeds through a channel, one frame per message; it
    /// ends when the sender is dropped.
    pub struct ChannelBody(pub mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }
}
