//! Request buffering: the whole request body is read from the client before
//! the request goes to the app, so a slow upload never holds an app worker
//! (process-based servers like Unicorn, or Puma with one thread, are only
//! safe behind a proxy that does this; nginx does it by default).
//!
//! Up to `memory` bytes stay in memory; past that the body spills to an
//! anonymous temporary file (`O_TMPFILE`, mode 0600, gone when closed); past
//! `disk` bytes buffering gives up and the rest streams to the app.

use std::collections::VecDeque;
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::files::body::FileBody;
use crate::http::{BoxError, ResponseBody};
use crate::sys::OwnedFile;

#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    pub memory: u64,
    pub disk: u64,
}

/// A request body after buffering, and its length when it is complete.
pub struct Buffered {
    pub body: ResponseBody,
    pub len: Option<u64>,
}

/// Writes to disk are batched to this size to keep blocking-pool hops few.
const WRITE_BATCH: usize = 256 * 1024;

async fn write_batch(file: OwnedFile, batch: Bytes) -> std::io::Result<OwnedFile> {
    let len = batch.len() as u64;
    let file = tokio::task::spawn_blocking(move || {
        (&*file).write_all(&batch)?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(std::io::Error::other)??;
    if let Some(m) = crate::metrics::get() {
        m.spooled(crate::metrics::Spool::Request, len);
    }
    Ok(file)
}

/// Reads `body` to the end (or to the limits). Errors are the body's own:
/// the caller maps them to 413/408 through the cut flag.
pub async fn buffer(mut body: ResponseBody, limits: BufferLimits) -> Result<Buffered, BoxError> {
    let mut memory: Vec<Bytes> = Vec::new();
    let mut in_memory = 0u64;
    let mut file: Option<OwnedFile> = None;
    let mut on_disk = 0u64;
    let mut batch = BytesMut::new();
    loop {
        let Some(frame) = body.frame().await else {
            break;
        };
        let Ok(data) = frame?.into_data() else {
            // Trailers: Rack has no use for them.
            continue;
        };
        if file.is_none() {
            if in_memory + data.len() as u64 <= limits.memory {
                in_memory += data.len() as u64;
                memory.push(data);
                continue;
            }
            file = Some(
                tokio::task::spawn_blocking(crate::sys::temp_file)
                    .await
                    .map_err(std::io::Error::other)??,
            );
            for chunk in memory.drain(..) {
                batch.extend_from_slice(&chunk);
            }
            on_disk = in_memory;
            in_memory = 0;
        }
        batch.extend_from_slice(&data);
        on_disk += data.len() as u64;
        if batch.len() >= WRITE_BATCH {
            let f = file.take().expect("spilling");
            file = Some(write_batch(f, batch.split().freeze()).await?);
        }
        if on_disk > limits.disk {
            // Too big to hold: what we have, then the rest as it arrives.
            let f = file.take().expect("spilling");
            let f = write_batch(f, batch.split().freeze()).await?;
            let head = FileBody::whole(f, on_disk).boxed_unsync();
            return Ok(Buffered {
                body: Sequence::new(vec![head, body]).boxed_unsync(),
                len: None,
            });
        }
    }
    match file {
        None => Ok(Buffered {
            body: Sequence::new(memory.into_iter().map(crate::http::full_body).collect())
                .boxed_unsync(),
            len: Some(in_memory),
        }),
        Some(f) => {
            let f = write_batch(f, batch.freeze()).await?;
            Ok(Buffered {
                body: FileBody::whole(f, on_disk).boxed_unsync(),
                len: Some(on_disk),
            })
        }
    }
}

/// Bodies one after the other.
struct Sequence {
    parts: VecDeque<ResponseBody>,
}

impl Sequence {
    fn new(parts: Vec<ResponseBody>) -> Sequence {
        Sequence {
            parts: parts.into(),
        }
    }
}

impl Body for Sequence {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        while let Some(front) = self.parts.front_mut() {
            match std::task::ready!(Pin::new(front).poll_frame(cx)) {
                Some(frame) => return Poll::Ready(Some(frame)),
                None => {
                    self.parts.pop_front();
                }
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.parts.iter().all(|p| p.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        let (mut lower, mut upper) = (0u64, Some(0u64));
        for p in &self.parts {
            let h = p.size_hint();
            lower += h.lower();
            upper = upper.zip(h.upper()).map(|(a, b)| a + b);
        }
        hint.set_lower(lower);
        if let Some(upper) = upper {
            hint.set_upper(upper);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full_body;

    fn chunks(n: usize, size: usize) -> (ResponseBody, Vec<u8>) {
        let data: Vec<u8> = (0..n * size).map(|i| (i % 253) as u8).collect();
        let parts: Vec<ResponseBody> = data
            .chunks(size)
            .map(|c| full_body(Bytes::copy_from_slice(c)))
            .collect();
        (Sequence::new(parts).boxed_unsync(), data)
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory_large_ones_spill_and_huge_ones_stream() {
        let limits = BufferLimits {
            memory: 10_000,
            disk: 1_000_000,
        };
        for (n, size, complete) in [(5, 1000, true), (100, 4000, true), (400, 4000, false)] {
            let (body, data) = chunks(n, size);
            let buffered = buffer(body, limits).await.unwrap();
            assert_eq!(
                buffered.len,
                complete.then_some(data.len() as u64),
                "{n}x{size}"
            );
            let got = buffered.body.collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), data.len());
            assert!(got[..] == data[..], "{n}x{size} bytes differ");
        }
    }
}
