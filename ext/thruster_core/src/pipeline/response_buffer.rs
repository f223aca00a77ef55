//! Response buffering: the app's response is read as fast as the app sends
//! it, whatever the client's pace, so a slow reader never holds an app
//! worker (nginx's `proxy_buffering`).
//!
//! The body still streams: a background task moves it from the app into a
//! spool the client reads from, in arrival order. What the client has not
//! taken yet stays in memory up to `RESPONSE_BUFFER_MEMORY`, then goes to an
//! unnamed temporary file (0600, gone when closed) up to
//! `RESPONSE_BUFFER_MAX`; past both, the task stops reading and the app waits
//! for the client, as without buffering.
//!
//! Not buffered: `text/event-stream` (each event must leave at once, and the
//! stream never ends), responses the app marks `X-Accel-Buffering: no`, and
//! upgrades (tunnelled, never reach here).

use std::collections::VecDeque;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::upstream::AppBody;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::Response;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::Notify;

use crate::http::{BoxError, ResponseBody, X_ACCEL_BUFFERING};
use crate::log;
use crate::sys::OwnedFile;

/// Writes to the spool file are batched to this size, and reads from it
/// come in pieces of at most this size.
const DISK_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    pub memory: u64,
    pub disk: u64,
}

/// Whether a response may be buffered. Removes `X-Accel-Buffering` either way.
fn wants_buffering(headers: &mut HeaderMap) -> bool {
    let refused = headers
        .get_all(&X_ACCEL_BUFFERING)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no"));
    headers.remove(&X_ACCEL_BUFFERING);
    let event_stream = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"));
    !refused && !event_stream
}

/// Buffers `response` when it should be. A small body of known length is
/// read before the response goes on (no task, no spool); anything else is
/// spooled by a background task while the client reads.
///
/// An error means a small body failed before anything was sent: the caller
/// answers 502 instead.
pub async fn buffer(
    response: Response<AppBody>,
    limits: SpoolLimits,
    stall_limit: Option<Duration>,
) -> Result<Response<ResponseBody>, BoxError> {
    let (mut parts, body) = response.into_parts();
    if !wants_buffering(&mut parts.headers) || body.is_end_stream() {
        return Ok(Response::from_parts(
            parts,
            body.map_err(BoxError::from).boxed_unsync(),
        ));
    }
    if body.size_hint().exact().is_some_and(|n| n <= limits.memory) {
        // The common case (pages, JSON): the bytes are on their way or
        // already here. An app that stalls mid-body is given up on at
        // HTTP_WRITE_TIMEOUT, as one that stalls before its headers.
        let body = read_small(body, stall_limit).await?;
        return Ok(Response::from_parts(parts, body));
    }
    Ok(Response::from_parts(
        parts,
        spool(body, limits).boxed_unsync(),
    ))
}

/// Starts the task that drains `body` into a spool; returns the reading end.
fn spool<B>(body: B, limits: SpoolLimits) -> SpoolReader
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let spool = Arc::new(Spool::new(limits));
    tokio::spawn(fill(Arc::clone(&spool), body));
    SpoolReader::new(spool)
}

async fn read_small(
    body: AppBody,
    stall_limit: Option<Duration>,
) -> Result<ResponseBody, BoxError> {
    let read = body.collect();
    let collected = match stall_limit {
        None => read.await?,
        Some(limit) => tokio::time::timeout(limit, read)
            .await
            .map_err(|_| BoxError::from("the app stopped sending its response body"))??,
    };
    // The chunks as they came, then the app's trailers.
    Ok(collected.map_err(|never| match never {}).boxed_unsync())
}

/// The spool between the filling task and the client.
struct Spool {
    limits: SpoolLimits,
    state: Mutex<SpoolState>,
    /// Wakes the filler: the reader took something, or went away.
    writable: Notify,
}

enum Segment {
    Memory(Bytes),
    /// This many bytes of the file, from the reader's file offset on.
    Disk(u64),
    Trailers(HeaderMap),
}

#[derive(Default)]
struct SpoolState {
    queue: VecDeque<Segment>,
    in_memory: u64,
    file: Option<Arc<OwnedFile>>,
    /// Next file offsets to write and to read: the bytes between them are
    /// queued on disk.
    write_at: u64,
    read_at: u64,
    /// The app's body ended (`Ok`) or failed (`Err`).
    end: Option<Result<(), BoxError>>,
    reader_gone: bool,
    /// No spool file could be made (or `RESPONSE_BUFFER_MAX` is 0): the
    /// memory buffer is all there is.
    disk_failed: bool,
    /// The client's task, waiting for data, trailers or the end.
    reader_waker: Option<Waker>,
}

impl Spool {
    fn new(limits: SpoolLimits) -> Spool {
        Spool {
            limits,
            state: Mutex::new(SpoolState {
                disk_failed: limits.disk == 0,
                ..SpoolState::default()
            }),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // A panic while holding the lock leaves plain data behind, still
        // consistent enough to finish or fail one response.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SpoolState {
    /// Bytes queued in the file and not yet read.
    fn on_disk(&self) -> u64 {
        self.write_at - self.read_at
    }
}

/// Releases the lock, then wakes the reader if it waits.
fn wake_reader(mut state: MutexGuard<'_, SpoolState>) {
    let waker = state.reader_waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// Moves the app's body into the spool until it ends, fails, or the client
/// goes away.
async fn fill<B>(spool: Arc<Spool>, mut body: B)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut batch = BytesMut::new();
    let result: Result<(), BoxError> = 'fill: loop {
        // Flush what waits for the disk before waiting for the app: the
        // client may be waiting for those bytes.
        let frame = match poll_once(&mut body).await {
            Some(frame) => frame,
            None => {
                if !batch.is_empty() {
                    if let Err(err) = flush(&spool, &mut batch).await {
                        break Err(err);
                    }
                }
                let gone = async {
                    while !spool.lock().reader_gone {
                        spool.writable.notified().await;
                    }
                };
                tokio::select! {
                    frame = body.frame() => frame,
                    () = gone => return,
                }
            }
        };
        let frame = match frame {
            None => break Ok(()),
            Some(Err(err)) => break Err(err.into()),
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if let Err(err) = flush(&spool, &mut batch).await {
                        break Err(err);
                    }
                    let mut state = spool.lock();
                    state.queue.push_back(Segment::Trailers(trailers));
                    wake_reader(state);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        let mut data = data;
        loop {
            match place(&spool, &mut batch, data) {
                Placement::Placed => break,
                Placement::ReaderGone => return,
                Placement::Full(back) => {
                    data = back;
                    if !batch.is_empty() {
                        if let Err(err) = flush(&spool, &mut batch).await {
                            break 'fill Err(err);
                        }
                        continue;
                    }
                    spool.writable.notified().await;
                }
            }
        }
        if batch.len() >= DISK_CHUNK {
            if let Err(err) = flush(&spool, &mut batch).await {
                break Err(err);
            }
        }
    };
    // What arrived before an error still reaches the client, then the error.
    let flushed = flush(&spool, &mut batch).await;
    let result = result.and(flushed);
    let mut state = spool.lock();
    state.end = Some(result);
    wake_reader(state);
}

enum Placement {
    Placed,
    ReaderGone,
    /// No room until the client takes something: the data comes back.
    Full(Bytes),
}

/// Finds room for `data`: memory if nothing waits for the disk (so order is
/// kept), else the disk batch, else none.
fn place(spool: &Spool, batch: &mut BytesMut, data: Bytes) -> Placement {
    let len = data.len() as u64;
    let mut state = spool.lock();
    if state.reader_gone {
        return Placement::ReaderGone;
    }
    if batch.is_empty()
        && (state.in_memory + len <= spool.limits.memory
            || (state.in_memory == 0 && state.on_disk() == 0))
    {
        state.in_memory += len;
        state.queue.push_back(Segment::Memory(data));
        wake_reader(state);
        return Placement::Placed;
    }
    if !state.disk_failed && state.on_disk() + batch.len() as u64 + len <= spool.limits.disk {
        drop(state);
        batch.extend_from_slice(&data);
        return Placement::Placed;
    }
    Placement::Full(data)
}

/// The next frame if the app already sent it, without waiting.
async fn poll_once<B: Body + Unpin>(
    body: &mut B,
) -> Option<Option<Result<Frame<B::Data>, B::Error>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Writes the batch to the spool file (opened on first use) and queues it.
async fn flush(spool: &Spool, batch: &mut BytesMut) -> Result<(), BoxError> {
    if batch.is_empty() {
        return Ok(());
    }
    let (file, offset) = {
        let mut state = spool.lock();
        if state.on_disk() == 0 {
            // Nothing unread on disk, so no read in flight: start over at
            // the beginning of the file instead of growing it.
            state.write_at = 0;
            state.read_at = 0;
        }
        (state.file.clone(), state.write_at)
    };
    let file = match file {
        Some(file) => file,
        None => match tokio::task::spawn_blocking(crate::sys::temp_file)
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
        {
            Ok(file) => {
                let file = Arc::new(file);
                spool.lock().file = Some(Arc::clone(&file));
                file
            }
            Err(err) => {
                // No temporary file (TMPDIR unwritable, full): keep this
                // batch in memory and buffer no further; the app then waits
                // for the client, as without buffering.
                log::error(
                    "Cannot create a file to buffer a response; buffering in memory only",
                    &[("error", err.to_string().into())],
                );
                let mut state = spool.lock();
                state.disk_failed = true;
                let bytes = batch.split().freeze();
                state.in_memory += bytes.len() as u64;
                state.queue.push_back(Segment::Memory(bytes));
                wake_reader(state);
                return Ok(());
            }
        },
    };
    let bytes = batch.split().freeze();
    let len = bytes.len() as u64;
    tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
        .await
        .map_err(std::io::Error::other)??;
    if let Some(m) = crate::metrics::get() {
        m.spooled(crate::metrics::Spool::Response, len);
    }
    let mut state = spool.lock();
    state.write_at = offset + len;
    match state.queue.back_mut() {
        Some(Segment::Disk(n)) => *n += len,
        _ => state.queue.push_back(Segment::Disk(len)),
    }
    wake_reader(state);
    Ok(())
}

type NextFrame = Pin<Box<dyn Future<Output = Option<Result<Frame<Bytes>, BoxError>>> + Send>>;

/// The client's side of the spool.
struct SpoolReader {
    spool: Arc<Spool>,
    /// A read from the spool file in progress.
    reading: Option<NextFrame>,
    done: bool,
}

impl SpoolReader {
    fn new(spool: Arc<Spool>) -> SpoolReader {
        SpoolReader {
            spool,
            reading: None,
            done: false,
        }
    }
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        // The client went away (or finished): the filler stops, and
        // dropping the app's body closes that upstream connection.
        self.spool.lock().reader_gone = true;
        self.spool.writable.notify_one();
    }
}

/// Reads the front disk segment's next piece.
async fn read_disk(spool: Arc<Spool>) -> Option<Result<Frame<Bytes>, BoxError>> {
    let (file, offset, len) = {
        let state = spool.lock();
        let Some(Segment::Disk(n)) = state.queue.front() else {
            unreachable!("read_disk is only started on a disk segment");
        };
        let file = state.file.clone().expect("a disk segment has a file");
        (file, state.read_at, (*n).min(DISK_CHUNK as u64) as usize)
    };
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map(|()| buf)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    let buf = match read {
        Ok(buf) => buf,
        Err(err) => return Some(Err(err.into())),
    };
    let mut state = spool.lock();
    state.read_at += len as u64;
    if let Some(Segment::Disk(n)) = state.queue.front_mut() {
        *n -= len as u64;
        if *n == 0 {
            state.queue.pop_front();
        }
    }
    drop(state);
    spool.writable.notify_one();
    Some(Ok(Frame::data(Bytes::from(buf))))
}

impl Body for SpoolReader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(reading) = self.reading.as_mut() {
                let frame = std::task::ready!(reading.as_mut().poll(cx));
                self.reading = None;
                if matches!(frame, Some(Err(_))) {
                    self.done = true;
                }
                return Poll::Ready(frame);
            }
            let mut state = self.spool.lock();
            match state.queue.front() {
                Some(Segment::Memory(_)) => {
                    let Some(Segment::Memory(data)) = state.queue.pop_front() else {
                        unreachable!()
                    };
                    state.in_memory -= data.len() as u64;
                    drop(state);
                    self.spool.writable.notify_one();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Segment::Trailers(_)) => {
                    let Some(Segment::Trailers(trailers)) = state.queue.pop_front() else {
                        unreachable!()
                    };
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Some(Segment::Disk(_)) => {
                    drop(state);
                    self.reading = Some(Box::pin(read_disk(Arc::clone(&self.spool))));
                    continue;
                }
                None => match state.end.take() {
                    Some(Ok(())) => {
                        drop(state);
                        self.done = true;
                        return Poll::Ready(None);
                    }
                    Some(Err(err)) => {
                        drop(state);
                        // Truncated: the client must see an error (reset),
                        // never a complete-looking response.
                        self.done = true;
                        return Poll::Ready(Some(Err(err)));
                    }
                    None => {
                        // Under the lock, so the filler's next push sees it.
                        state.reader_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_support::ChannelBody as Fed;
    use tokio::sync::mpsc;

    const CHUNK: usize = 16 * 1024;

    fn chunk(i: usize) -> Bytes {
        Bytes::from(format!("{i:015}\n").repeat(CHUNK / 16))
    }

    fn limits(memory: u64, disk: u64) -> SpoolLimits {
        SpoolLimits { memory, disk }
    }

    /// Sends `n` chunks as fast as the spool takes them; reports how many
    /// went before the sender had to wait longer than `patience`.
    async fn feed(
        tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        n: usize,
        patience: Duration,
    ) -> usize {
        for i in 0..n {
            let send = tx.send(Ok(Frame::data(chunk(i))));
            match tokio::time::timeout(patience, send).await {
                Ok(Ok(())) => {}
                _ => return i,
            }
        }
        n
    }

    async fn read_all(reader: SpoolReader) -> Result<Vec<u8>, BoxError> {
        Ok(reader.collect().await?.to_bytes().to_vec())
    }

    fn expected(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| chunk(i).to_vec()).collect()
    }

    #[tokio::test]
    async fn the_app_is_drained_while_the_client_reads_nothing() {
        // 8 MiB against 64 KiB of memory: the rest must go to disk, and the
        // app's whole body is taken before the client reads a byte.
        let (tx, rx) = mpsc::channel(1);
        let reader = spool(Fed(rx), limits(64 * 1024, 1 << 30));
        let sent = feed(tx, 512, Duration::from_secs(5)).await;
        assert_eq!(sent, 512, "the app was held by the reader");
        assert!(read_all(reader).await.unwrap() == expected(512));
    }

    #[tokio::test]
    async fn past_both_limits_the_app_waits_for_the_client() {
        let (tx, rx) = mpsc::channel(1);
        let reader = spool(Fed(rx), limits(64 * 1024, 256 * 1024));
        let sent = feed(tx.clone(), 512, Duration::from_millis(300)).await;
        // 64 KiB memory + 256 KiB disk = 20 chunks, plus the ones in flight.
        assert!((20..=24).contains(&sent), "{sent} chunks taken");
        let rest = tokio::spawn(async move {
            let mut i = sent;
            while i < 512 {
                tx.send(Ok(Frame::data(chunk(i)))).await.unwrap();
                i += 1;
            }
        });
        assert!(read_all(reader).await.unwrap() == expected(512));
        rest.await.unwrap();
    }

    #[tokio::test]
    async fn without_disk_only_memory_buffers() {
        let (tx, rx) = mpsc::channel(1);
        let reader = spool(Fed(rx), limits(64 * 1024, 0));
        let sent = feed(tx.clone(), 64, Duration::from_millis(300)).await;
        assert!((4..=7).contains(&sent), "{sent} chunks taken");
        drop(reader);
        // The client went away: the spool stops taking the app's body.
        let mut closed = false;
        for _ in 0..50 {
            if tx.is_closed() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "the app's body is dropped once the reader is gone");
    }

    #[tokio::test]
    async fn a_failed_app_body_reaches_the_client_as_an_error_after_its_bytes() {
        for memory in [1 << 20, 16 * 1024] {
            let (tx, rx) = mpsc::channel(8);
            let reader = spool(Fed(rx), limits(memory, 1 << 30));
            tx.send(Ok(Frame::data(chunk(0)))).await.unwrap();
            tx.send(Ok(Frame::data(chunk(1)))).await.unwrap();
            tx.send(Err("app died".into())).await.unwrap();
            let mut reader = reader;
            let mut got = Vec::new();
            let err = loop {
                match reader.frame().await {
                    Some(Ok(frame)) => got.extend_from_slice(&frame.into_data().unwrap()),
                    Some(Err(err)) => break err,
                    None => panic!("a truncated body ended as if complete"),
                }
            };
            assert_eq!(err.to_string(), "app died");
            assert!(got == expected(2), "memory {memory}: {} bytes", got.len());
        }
    }

    #[tokio::test]
    async fn trailers_follow_the_data() {
        let (tx, rx) = mpsc::channel(8);
        let mut reader = spool(Fed(rx), limits(16 * 1024, 1 << 30));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        for i in 0..3 {
            tx.send(Ok(Frame::data(chunk(i)))).await.unwrap();
        }
        tx.send(Ok(Frame::trailers(trailers.clone())))
            .await
            .unwrap();
        drop(tx);
        let mut data = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = reader.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(d) => {
                    assert!(got_trailers.is_none(), "data after trailers");
                    data.extend_from_slice(&d);
                }
                Err(f) => got_trailers = f.into_trailers().ok(),
            }
        }
        assert!(data == expected(3));
        assert_eq!(got_trailers, Some(trailers));
    }

    #[tokio::test]
    async fn a_stream_is_passed_on_as_it_arrives() {
        let (tx, rx) = mpsc::channel(8);
        let mut reader = spool(Fed(rx), limits(64 * 1024, 1 << 30));
        for i in 0..3 {
            tx.send(Ok(Frame::data(chunk(i)))).await.unwrap();
            let frame = tokio::time::timeout(Duration::from_secs(5), reader.frame())
                .await
                .expect("each chunk is readable before the next is sent");
            assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), chunk(i));
        }
    }

    #[test]
    fn buffering_is_refused_for_event_streams_and_on_request() {
        let cases = [
            (vec![("content-type", "text/html")], true),
            (vec![("content-type", "text/event-stream")], false),
            (
                vec![("content-type", "Text/Event-Stream; charset=utf-8")],
                false,
            ),
            (vec![("x-accel-buffering", "no")], false),
            (vec![("x-accel-buffering", "NO")], false),
            (vec![("x-accel-buffering", "yes")], true),
        ];
        for (pairs, expected) in cases {
            let mut headers = HeaderMap::new();
            for (k, v) in &pairs {
                headers.append(*k, v.parse().unwrap());
            }
            assert_eq!(wants_buffering(&mut headers), expected, "{pairs:?}");
            assert!(!headers.contains_key(&X_ACCEL_BUFFERING), "{pairs:?}");
        }
    }
}
