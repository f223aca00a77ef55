//! What the request path and the client socket share about one
//! connection: requests in flight (the socket's idle clock), the upgrade
//! flag (timeouts stop), 1xx responses waiting to be written ahead of the
//! final one, and file regions to send with sendfile(2) in place of marker
//! bytes.
//!
//! Both 1xx relay and zero-copy are features of a connection that has a
//! socket of its own (HTTP/1.x over TCP): a request that arrives without a
//! `ConnState` (HTTP/2 streams, a QUIC stream) simply goes without them.
//!
//! The zero-copy marker: a file region travels through hyper as a frame of
//! "marker" bytes, slices of one static region; the socket recognises the
//! address and calls sendfile(2) for the region queued with it instead of
//! writing the bytes (`server::conn_io`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use bytes::Bytes;

/// Largest file region one zero-copy frame stands for.
pub const MARKER_LEN: usize = 4 << 20;

/// Zero-copy frames are slices of this region. Their bytes are never sent:
/// the connection recognises the address and sends the file region queued
/// for it with sendfile(2) instead. Allocated zeroed and never touched, so
/// it costs address space, not memory.
fn marker() -> &'static [u8] {
    static MARKER: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();
    MARKER.get_or_init(|| Box::leak(vec![0u8; MARKER_LEN].into_boxed_slice()))
}

/// Set once the marker exists, so connections that never carried a
/// zero-copy body pay one atomic load per write.
static ZERO_COPY_USED: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();

/// Whether `buf` lies inside the zero-copy marker region.
pub fn is_zero_copy_marker(buf: &[u8]) -> bool {
    let Some(region) = ZERO_COPY_USED.get() else {
        return false;
    };
    let (base, p) = (region.as_ptr() as usize, buf.as_ptr() as usize);
    !buf.is_empty() && p >= base && p < base + MARKER_LEN
}

/// What the request path tells the socket about the connection.
#[derive(Debug, Default)]
pub struct ConnState {
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
    /// The connection task's waker, so the end of a response can make the
    /// socket start its idle clock even if nothing else polls it.
    pub(crate) reader: Mutex<Option<Waker>>,
    /// Informational response bytes waiting to be written.
    pub(crate) informational: Mutex<Vec<u8>>,
    /// Set once the final response of the current request exists; no
    /// informational response may follow it.
    final_response: AtomicBool,
    /// File regions to send with sendfile(2) in place of the marker bytes
    /// the response body hands to hyper, in body order.
    pub(crate) zero_copy: Mutex<VecDeque<FileRegion>>,
    /// Whether the last request allows parking the idle connection (see
    /// `allow_park`); false until a request says so.
    parkable: AtomicBool,
}

/// A part of an open file to send from the kernel's page cache.
#[derive(Debug)]
pub struct FileRegion {
    pub file: Arc<crate::sys::OwnedFile>,
    pub offset: u64,
    pub len: u64,
}

impl ConnState {
    /// Marks a request as in flight until the guard is dropped (when its
    /// response body is done).
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        REQUESTS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        self.final_response.store(false, Ordering::Release);
        InFlight(self.clone())
    }

    /// Queues a file region (at most [`MARKER_LEN`] bytes) to go out with
    /// sendfile(2), and returns the marker frame that stands for it in the
    /// response body: the connection sends the region in its place.
    pub fn queue_file_region(&self, region: FileRegion) -> Bytes {
        let len = (region.len as usize).min(MARKER_LEN);
        if let Ok(mut queue) = self.zero_copy.lock() {
            queue.push_back(region);
        }
        let marker = ZERO_COPY_USED.get_or_init(marker);
        Bytes::from_static(&marker[..len])
    }

    /// Queues a serialized HTTP/1.1 informational response for the client.
    /// Refused (false) once the final response is under way.
    pub fn send_informational(&self, head: &[u8]) -> bool {
        let Ok(mut queue) = self.informational.lock() else {
            return false;
        };
        if self.final_response.load(Ordering::Acquire) {
            return false;
        }
        queue.extend_from_slice(head);
        drop(queue);
        self.wake_reader();
        true
    }

    /// The app's final response arrived: informational responses end here.
    pub fn mark_final_response(&self) {
        // Taking the lock orders this after any informational queued before.
        let _queue = self.informational.lock();
        self.final_response.store(true, Ordering::Release);
    }

    fn wake_reader(&self) {
        let waker = self.reader.lock().ok().and_then(|mut w| w.take());
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The connection now carries another protocol; timeouts stop.
    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    pub(crate) fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }

    /// No request in flight, not upgraded, and nothing queued for the
    /// socket (file regions, informational responses).
    /// Records whether the idle connection may be parked after the current
    /// request. Only when hyper would keep it alive and nothing of the
    /// request can still arrive: an HTTP/1.1 request without a body and
    /// without `Connection: close`, answered without `Connection: close`.
    /// Parking ends hyper's connection by showing it an end of stream; if
    /// hyper meant to close (an error response, a body it did not read),
    /// the socket must close, or the rest of an unread body would be parsed
    /// as the next request.
    pub(crate) fn allow_park(&self, allowed: bool) {
        self.parkable.store(allowed, Ordering::Release);
    }

    pub(crate) fn park_allowed(&self) -> bool {
        self.parkable.load(Ordering::Acquire)
    }

    pub(crate) fn idle_io(&self) -> bool {
        !self.busy()
            && !self.upgraded()
            && self.zero_copy.lock().is_ok_and(|q| q.is_empty())
            && self.informational.lock().is_ok_and(|q| q.is_empty())
    }
}

/// Held while a request is in flight.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

/// Requests in flight on every client connection of the process (TCP).
static REQUESTS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// How many requests are in flight right now, over every TCP connection:
/// while many are, the heap is full of their buffers.
pub fn requests_in_flight() -> usize {
    REQUESTS_IN_FLIGHT.load(Ordering::Relaxed)
}

impl Drop for InFlight {
    fn drop(&mut self) {
        REQUESTS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.wake_reader();
        }
    }
}
