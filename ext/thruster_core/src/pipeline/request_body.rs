//! Limits on the request body as it streams to the app: `MAX_REQUEST_BODY`
//! (counted for chunked bodies too) and the `HTTP_READ_TIMEOUT` deadline for
//! the whole request. When one trips, the upstream request fails and the
//! proxy answers 413 or 408 instead of a 502.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::BoxError;

/// Why a request body was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCut {
    TooLarge,
    TooSlow,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CutError(&'static str);

/// Shared between the body (which records a cut) and the proxy (which turns
/// it into a status).
#[derive(Debug, Default, Clone)]
pub struct CutFlag(Arc<AtomicU8>);

impl CutFlag {
    fn set(&self, cut: BodyCut) {
        let v = match cut {
            BodyCut::TooLarge => 1,
            BodyCut::TooSlow => 2,
        };
        self.0.store(v, Ordering::Release);
    }

    pub fn get(&self) -> Option<BodyCut> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(BodyCut::TooLarge),
            2 => Some(BodyCut::TooSlow),
            _ => None,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        remaining: Option<u64>,
        deadline: Option<Pin<Box<Sleep>>>,
        flag: CutFlag,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, max: Option<u64>, deadline: Option<Duration>, flag: CutFlag) -> Self {
        LimitedBody {
            inner,
            remaining: max,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
            flag,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(remaining), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    let len = data.len() as u64;
                    if len > *remaining {
                        this.flag.set(BodyCut::TooLarge);
                        return Poll::Ready(Some(Err(CutError(
                            "request body larger than MAX_REQUEST_BODY",
                        )
                        .into())));
                    }
                    *remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if let Some(deadline) = this.deadline.as_mut() {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.flag.set(BodyCut::TooSlow);
                        return Poll::Ready(Some(Err(CutError(
                            "request body not received within HTTP_READ_TIMEOUT",
                        )
                        .into())));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
