//! Heap kept by idle keep-alive connections, counted by a global allocator
//! of this test binary's own (a binary of its own, so that no other test's
//! allocations run alongside). Byte counts, not timings: each check waits
//! for the figure it expects, and fails with the last one it saw.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// Bytes allocated and not yet freed, process-wide.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Bytes ever allocated on the proxy's connection setup threads.
static ON_SETUP_THREADS: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Whether this thread is a connection setup thread (`thruster-setup`):
    /// 0 not known yet, 1 yes, 2 no. No destructor, no allocation.
    static SETUP_THREAD: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

fn count_if_setup_thread(size: usize) {
    let _ = SETUP_THREAD.try_with(|known| {
        if known.get() == 0 {
            let mut name = [0u8; 16];
            // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
            unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
            known.set(if name.starts_with(b"thruster-setup") {
                1
            } else {
                2
            });
        }
        if known.get() == 1 {
            ON_SETUP_THREADS.fetch_add(size as isize, Ordering::Relaxed);
        }
    });
}

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only the
// sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            count_if_setup_thread(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc_zeroed(layout);
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            count_if_setup_thread(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        if !new.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One GET on `stream`, read to the end of its response (the echo
/// upstream's answers carry a Content-Length).
fn get(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /idle HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the response was complete");
        seen.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            if body.len() >= length {
                return;
            }
        }
    }
}

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An h2c connection (prior knowledge) that made one GET and read its
/// response to the end of the stream. Raw frames, so that the test's own
/// client allocates nothing.
fn h2c_get(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // HPACK: :method GET, :scheme http (static 2, 6), then :path and
    // :authority as literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, 5];
    block.extend_from_slice(b"/idle");
    block.extend_from_slice(&[0x01, 12]);
    block.extend_from_slice(b"example.test");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &[]));
    out.extend(h2_frame(4, 1, 0, &[]));
    out.extend(h2_frame(1, 0x5, 1, &block));
    stream.write_all(&out).unwrap();
    loop {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).unwrap();
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).unwrap();
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        assert_ne!(kind, 7, "GOAWAY");
        // DATA or HEADERS with END_STREAM on our stream: answered.
        if stream_id == 1 && (kind == 0 || kind == 1) && flags & 0x1 != 0 {
            return stream;
        }
    }
}

/// A proxy with `settings` (request logs off) on a runtime of one worker,
/// in front of an echo app on the same runtime, and its HTTP port.
fn proxy(settings: &[(&str, &str)]) -> (tokio::runtime::Runtime, thruster_core::Server, u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = support::start_echo_upstream(&rt);
    let http = support::free_port();
    let mut all = vec![("LOG_REQUESTS", "false")];
    all.extend_from_slice(settings);
    let server = support::start_server(support::config(&all), upstream, http, support::free_port());
    (rt, server, http)
}

/// Polls the heap until `per_conn(live)` is at most `limit` bytes, and
/// panics with the last figure if it never gets there.
fn wait_until_at_most(limit: isize, what: &str, per_conn: impl Fn(isize) -> isize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let figure = per_conn(LIVE.load(Ordering::Relaxed));
        if figure <= limit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {figure} bytes of heap per idle connection, expected at most {limit}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A parked HTTP/1 connection keeps its socket, its task and a few small
/// objects, not hyper's buffers: neither its 8 KiB read buffer (an empty
/// view of it came back with the parked socket, and once lived on through
/// the parked wait) nor the box its hyper connection was served from.
#[test]
fn parked_http1_connections_keep_no_request_buffers() {
    const CONNS: isize = 200;
    // The task (its future), the socket's registration, the connection's
    // state and idle timer: ~1.5-2.5 KiB, debug build. With the read buffer
    // it was over 10 KiB.
    const LIMIT: isize = 4096;

    let (rt, server, http) = proxy(&[]);
    // Whatever a first request sets up for good (the upstream connection
    // the pool keeps, lazily built state) is not the idle connections'.
    for _ in 0..3 {
        let mut warm = TcpStream::connect(("127.0.0.1", http)).unwrap();
        get(&mut warm);
    }
    // A burst: 130 requests in flight (their bodies, buffered before they
    // go upstream, never come), and with 128 of them, new connections are
    // set up on the setup thread.
    let burst: Vec<TcpStream> = (0..130)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
            stream
                .write_all(
                    b"POST /held HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10\r\n\r\n",
                )
                .unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = LIVE.load(Ordering::Relaxed);
    let made_on_setup_thread = ON_SETUP_THREADS.load(Ordering::Relaxed);

    // One request at a time: the proxy reuses one upstream connection, so
    // what grows is the client connections'.
    let idle: Vec<TcpStream> = (0..CONNS)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            get(&mut stream);
            stream
        })
        .collect();
    wait_until_at_most(LIMIT, "parked connections", |live| (live - before) / CONNS);
    // What they keep (the task, the socket's registration, the state, the
    // read timer: over 1.5 KiB) was made on the setup thread, during the
    // burst, not among the buffers of requests on the workers.
    let on_setup = (ON_SETUP_THREADS.load(Ordering::Relaxed) - made_on_setup_thread) / CONNS;
    assert!(
        on_setup >= 1024,
        "{on_setup} bytes per connection made on the setup thread"
    );

    drop(burst);

    // Still served after parking.
    let mut again = idle.into_iter().next().unwrap();
    get(&mut again);
    drop(again);
    server.stop(Duration::from_secs(1));
    drop(rt);
}

/// An idle HTTP/2 connection keeps h2's and hyper's state, but no upstream
/// read buffer: the app's header values are copied before h2's HPACK
/// encoder indexes them (they were views into hyper's client read buffer,
/// 8 KiB, kept by the encoder's dynamic table).
#[test]
fn idle_http2_connections_keep_no_upstream_read_buffer() {
    const CONNS: isize = 100;
    // h2's buffers (16 KiB to write, 8 KiB to read, 4 KiB for HPACK), its
    // stream store and hyper's connection: ~37 KiB, debug build; with the
    // upstream read buffer behind the indexed `date` value, 45 KiB.
    const LIMIT: isize = 41 * 1024;

    let (rt, server, http) = proxy(&[("H2C_ENABLED", "true")]);
    for _ in 0..3 {
        drop(h2c_get(http));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = LIVE.load(Ordering::Relaxed);

    let idle: Vec<TcpStream> = (0..CONNS).map(|_| h2c_get(http)).collect();
    wait_until_at_most(LIMIT, "idle HTTP/2 connections", |live| {
        (live - before) / CONNS
    });

    drop(idle);
    server.stop(Duration::from_secs(1));
    drop(rt);
}
