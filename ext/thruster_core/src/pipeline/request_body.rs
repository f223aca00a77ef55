//! Limits on the request body as it streams to the app: `MAX_REQUEST_BODY`
//! (counted for chunked bodies too) and a pace: `REQUEST_BODY_MIN_RATE`
//! bytes per second over each window of time spent waiting for the client,
//! or, with no minimum rate, the `HTTP_READ_TIMEOUT` deadline for the whole
//! body. When one trips, the upstream request fails and the proxy answers
//! 413 or 408 instead of a 502.
//!
//! Only time spent waiting for the client counts towards the rate: an app
//! that reads a streamed body slowly must not get its client cut off.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::http::BoxError;

/// Why a request body was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCut {
    TooLarge,
    TooSlow,
}

/// The error a [`LimitedBody`] ends with when it cuts the body. It travels
/// through request buffering or hyper's client as the source of their
/// error; [`BodyCutError::find`] digs it out so the proxy answers 413/408
/// rather than 502.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BodyCutError {
    pub cut: BodyCut,
    message: &'static str,
}

impl BodyCutError {
    fn boxed(cut: BodyCut, message: &'static str) -> BoxError {
        Box::new(BodyCutError { cut, message })
    }

    /// The cut behind `err`, if any error in its source chain is one.
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<BodyCut> {
        let mut current = Some(err);
        while let Some(e) = current {
            if let Some(cut) = e.downcast_ref::<BodyCutError>() {
                return Some(cut.cut);
            }
            current = e.source();
        }
        None
    }
}

/// Waiting time over which `REQUEST_BODY_MIN_RATE` is averaged: long enough
/// for a bursty mobile link, short enough to free a slowloris slot soon.
pub const BODY_RATE_WINDOW: Duration = Duration::from_secs(10);

/// How fast a request body must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPace {
    /// Bytes per second averaged over each `BODY_RATE_WINDOW` of waiting.
    MinRate(u64),
    /// The whole body within this time of the request's start.
    Deadline(Duration),
    Unlimited,
}

/// The minimum-rate bookkeeping: bytes and waiting time in the current window.
struct RateWindow {
    min_rate: u64,
    received: u64,
    waited: Duration,
    pending_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl RateWindow {
    fn new(min_rate: u64) -> RateWindow {
        RateWindow {
            min_rate,
            received: 0,
            waited: Duration::ZERO,
            pending_since: None,
            timer: Box::pin(tokio::time::sleep(BODY_RATE_WINDOW)),
        }
    }

    fn required(&self) -> u64 {
        (self.min_rate as f64 * self.waited.as_secs_f64()) as u64
    }

    /// Data arrived: the wait (if any) ends. A full window either passes and
    /// starts a new one, or fails.
    fn on_data(&mut self, len: u64) -> Result<(), ()> {
        if let Some(since) = self.pending_since.take() {
            self.waited += since.elapsed();
        }
        self.received += len;
        self.close_window_if_full()
    }

    fn close_window_if_full(&mut self) -> Result<(), ()> {
        if self.waited < BODY_RATE_WINDOW {
            return Ok(());
        }
        if self.received < self.required() {
            return Err(());
        }
        self.received = 0;
        self.waited = Duration::ZERO;
        Ok(())
    }

    /// The client has nothing for us: start (or keep) counting the wait, and
    /// fail once a window's worth of waiting brought too few bytes.
    fn on_pending(&mut self, cx: &mut Context<'_>) -> Result<(), ()> {
        loop {
            let now = Instant::now();
            let since = *self.pending_since.get_or_insert(now);
            let window_left = BODY_RATE_WINDOW.saturating_sub(self.waited);
            let window_end = since + window_left;
            if now < window_end {
                if self.timer.deadline() != window_end {
                    self.timer.as_mut().reset(window_end);
                }
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Ok(());
                }
            }
            self.waited += now.max(window_end) - since;
            self.pending_since = Some(now.max(window_end));
            self.close_window_if_full()?;
        }
    }
}

pin_project_lite::pin_project! {
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        remaining: Option<u64>,
        deadline: Option<Pin<Box<Sleep>>>,
        rate: Option<RateWindow>,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, max: Option<u64>, pace: BodyPace) -> Self {
        LimitedBody {
            inner,
            remaining: max,
            deadline: match pace {
                BodyPace::Deadline(d) => Some(Box::pin(tokio::time::sleep(d))),
                _ => None,
            },
            rate: match pace {
                BodyPace::MinRate(rate) => Some(RateWindow::new(rate)),
                _ => None,
            },
        }
    }
}

fn too_slow() -> BoxError {
    BodyCutError::boxed(
        BodyCut::TooSlow,
        "request body slower than REQUEST_BODY_MIN_RATE",
    )
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
                        return Poll::Ready(Some(Err(BodyCutError::boxed(
                            BodyCut::TooLarge,
                            "request body larger than MAX_REQUEST_BODY",
                        ))));
                    }
                    *remaining -= len;
                }
                if let (Some(rate), Some(data)) = (this.rate.as_mut(), frame.data_ref()) {
                    if rate.on_data(data.len() as u64).is_err() {
                        return Poll::Ready(Some(Err(too_slow())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if let Some(deadline) = this.deadline.as_mut() {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(BodyCutError::boxed(
                            BodyCut::TooSlow,
                            "request body not received within HTTP_READ_TIMEOUT",
                        ))));
                    }
                }
                if let Some(rate) = this.rate.as_mut() {
                    if rate.on_pending(cx).is_err() {
                        return Poll::Ready(Some(Err(too_slow())));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_support::ChannelBody as Fed;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    fn data(bytes: impl Into<Bytes>) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(bytes.into()))
    }

    /// Sends `chunk` bytes every `gap` for `count` times, and reports
    /// whether the body was read whole or cut as too slow.
    async fn trickle(
        rate: u64,
        chunk: usize,
        gap: Duration,
        count: usize,
    ) -> Result<usize, BodyCut> {
        let (tx, rx) = mpsc::channel(1);
        let body = LimitedBody::new(Fed(rx), None, BodyPace::MinRate(rate));
        tokio::spawn(async move {
            for _ in 0..count {
                tokio::time::sleep(gap).await;
                if tx.send(data(vec![b'x'; chunk])).await.is_err() {
                    return;
                }
            }
        });
        match body.collect().await {
            Ok(all) => Ok(all.to_bytes().len()),
            Err(err) => Err(BodyCutError::find(&*err).expect("a cut is recorded")),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_or_above_the_minimum_rate_passes() {
        // 100 B/s against a 64 B/s floor, for 100 s: a 10 KB upload over a
        // slow link, as in bench/slow_uploads.rb.
        let got = trickle(64, 100, Duration::from_secs(1), 100).await;
        assert_eq!(got, Ok(10_000));
        // Bursty: 1,000 bytes every 9 s is 111 B/s on average.
        let got = trickle(64, 1000, Duration::from_secs(9), 5).await;
        assert_eq!(got, Ok(5_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_minimum_rate_is_cut_within_a_window() {
        let started = Instant::now();
        let got = trickle(64, 1, Duration::from_secs(1), 1_000).await;
        assert_eq!(got, Err(BodyCut::TooSlow));
        let took = started.elapsed();
        assert!(
            took >= BODY_RATE_WINDOW && took <= BODY_RATE_WINDOW + Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_sending_is_cut_after_one_window() {
        let started = Instant::now();
        // Data for 30 s at a good pace, then silence.
        let got = trickle(64, 1000, Duration::from_secs(1), 30).await;
        assert_eq!(got, Ok(30_000), "the sender ended: the body ends, not cut");
        let (tx, rx) = mpsc::channel(1);
        let body = LimitedBody::new(Fed(rx), None, BodyPace::MinRate(64));
        tx.send(data("hello")).await.unwrap();
        let started_silence = Instant::now();
        let err = body.collect().await.expect_err("cut");
        drop(tx);
        assert_eq!(BodyCutError::find(&*err), Some(BodyCut::TooSlow));
        assert!(started_silence.elapsed() <= BODY_RATE_WINDOW + Duration::from_secs(1));
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_consumer_spends_elsewhere_does_not_count() {
        // The app reads one chunk a minute; the client always has the next
        // one ready. The client is never waited for, so it is never slow.
        let (tx, rx) = mpsc::channel(5);
        for _ in 0..5 {
            tx.send(data("x")).await.unwrap();
        }
        drop(tx);
        let mut body = LimitedBody::new(Fed(rx), None, BodyPace::MinRate(64));
        let mut got = 0;
        while let Some(frame) = body.frame().await {
            got += frame.unwrap().into_data().unwrap().len();
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        assert_eq!(got, 5);
    }

    #[test]
    fn a_cut_is_found_behind_wrapping_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapper(#[source] BoxError);
        let cut = BodyCutError::boxed(BodyCut::TooLarge, "too large");
        let wrapped = Wrapper(Box::new(Wrapper(cut)));
        assert_eq!(BodyCutError::find(&wrapped), Some(BodyCut::TooLarge));
        let other = Wrapper("the client went away".into());
        assert_eq!(BodyCutError::find(&other), None);
    }
}
