//! Response compression: brotli, zstd and gzip, negotiated from the client's
//! `Accept-Encoding` (RFC 9110 §12.5.3), streamed: the body's frames that
//! are ready together are compressed together, and flushed as soon as no
//! more is ready, so SSE and other streams are never held back.
//!
//! A response compressed here is compressed again for every request, so ties
//! between codings the client weighs alike go to the cheapest (zstd, gzip,
//! br; `http::coding::Use::PerResponse`); the cache's stored variants are
//! made once and go to the smallest (br, zstd, gzip).
//!
//! Fixes over basecamp's Thruster (v0.1.22): brotli and zstd; q-values
//! honoured; `Vary: Accept-Encoding` merged with the app's
//! own `Vary` instead of replacing it; a compressed representation gets a
//! weak ETag (it is not byte-identical to the app's); already-compressed
//! types (woff2, images but SVG, archives) are left alone; the credentials
//! guard looks at the response too (Set-Cookie, private, no-store).

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

pub use crate::http::coding::Coding;
use crate::http::coding::{negotiate_for, Use};
use crate::http::{BoxError, ResponseBody};
use mapped::{Compress, Flush};

/// Bodies smaller than this are not worth a compressed representation.
pub const MIN_COMPRESS_SIZE: u64 = 1024;

/// Whether a media type gains from compression.
pub fn compressible(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    // Lower case without an allocation per response in the usual case.
    let mut buf = [0u8; 64];
    let lowered;
    let media = match crate::http::ascii_lowercase_in(media, &mut buf) {
        Some(media) => media,
        None => {
            lowered = media.to_ascii_lowercase();
            lowered.as_str()
        }
    };
    if media.is_empty() {
        return false;
    }
    if media.starts_with("text/") {
        return true;
    }
    if media == "image/svg+xml" || media == "image/x-icon" || media == "image/bmp" {
        return true;
    }
    // Already compressed, or media formats with their own compression.
    if media.starts_with("image/")
        || media.starts_with("audio/")
        || media.starts_with("video/")
        || media.starts_with("font/woff")
        || [
            "zip",
            "gzip",
            "compress",
            "zstd",
            "brotli",
            "x-7z",
            "x-rar",
            "x-xz",
            "x-bzip",
            "octet-stream",
            "pdf",
        ]
        .iter()
        .any(|k| media.contains(k))
    {
        return false;
    }
    media.starts_with("application/")
        && (media.contains("json")
            || media.contains("javascript")
            || media.contains("xml")
            || media.contains("wasm")
            || media.ends_with("ecmascript")
            || media == "application/x-font-ttf"
            || media == "application/vnd.ms-fontobject")
        || media == "font/ttf"
        || media == "font/otf"
}

/// What the request side contributes to the decision.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    /// The coding of a response compressed here, once per response
    /// ([`Use::PerResponse`]).
    pub coding: Option<Coding>,
    /// The coding of a stored variant served from the cache
    /// ([`Use::Stored`]).
    pub stored: Option<Coding>,
    pub head: bool,
    /// The request carries credentials and the guard is on.
    pub guarded: bool,
    /// GZIP_COMPRESSION_DISABLE_ON_AUTH: responses that declare themselves
    /// per-user stay identity too.
    pub guard_responses: bool,
    /// GZIP_COMPRESSION_JITTER: most padding bytes per response (0: none).
    pub jitter: u32,
}

/// A random padding length in 1..=max (0 when off). Random per response,
/// unlike Thruster's content-derived length, so repeating a request does not
/// reproduce the same size. From a keyed draw, not a syscall per response.
fn padding_len(max: u32) -> usize {
    if max == 0 {
        return 0;
    }
    (crate::sys::random::draw().word(0) % u64::from(max)) as usize + 1
}

fn padding_text(len: usize) -> Vec<u8> {
    b"Padding-".iter().copied().cycle().take(len).collect()
}

impl RequestFacts {
    pub fn new(
        method: &Method,
        headers: &HeaderMap,
        guard_on_auth: bool,
        jitter: u32,
    ) -> RequestFacts {
        let guarded = guard_on_auth
            && ["cookie", "authorization", "x-csrf-token"]
                .iter()
                .any(|h| headers.get(*h).is_some_and(|v| !v.as_bytes().is_empty()));
        RequestFacts {
            coding: negotiate_for(headers, Use::PerResponse),
            stored: negotiate_for(headers, Use::Stored),
            head: method == Method::HEAD,
            guarded,
            guard_responses: guard_on_auth,
            jitter,
        }
    }
}

fn cache_control_has(headers: &HeaderMap, directives: &[&str]) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
        .any(|d| directives.iter().any(|x| d.eq_ignore_ascii_case(x)))
}

/// Adds `Accept-Encoding` to `Vary`, keeping whatever the app varies on.
pub fn merge_vary(headers: &mut HeaderMap) {
    if !headers.contains_key(header::VARY) {
        // The usual case, without an allocation.
        headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        return;
    }
    let tokens: Vec<&str> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens
        .iter()
        .any(|t| *t == "*" || t.eq_ignore_ascii_case("accept-encoding"))
    {
        return;
    }
    let mut merged = tokens.join(", ");
    if !merged.is_empty() {
        merged.push_str(", ");
    }
    merged.push_str("Accept-Encoding");
    if let Ok(value) = HeaderValue::try_from(merged) {
        headers.insert(header::VARY, value);
    }
}

/// The coding to apply to this response, if any.
/// The coding and the body's length (`None`: unknown), which sizes the
/// encoder's window.
fn choose(
    facts: &RequestFacts,
    response: &Response<ResponseBody>,
) -> (Option<Coding>, Option<u64>) {
    // The announced length (also on HEAD, whose body is empty), else the
    // body's own; unknown lengths (streams) are compressed.
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| response.body().size_hint().exact());
    let coding = coding_for(facts, response.status(), response.headers(), length);
    (coding, length)
}

/// Whether a response with this status, headers and body length leaves the
/// compression layer untouched: only such a body may stand for bytes it
/// does not carry (file regions sent with sendfile(2), for X-Sendfile files
/// and cache entries streamed from disk).
pub fn passes_untouched(
    facts: Option<&RequestFacts>,
    status: StatusCode,
    h: &HeaderMap,
    length: u64,
) -> bool {
    facts.is_none_or(|f| coding_for(f, status, h, Some(length)).is_none())
}

/// The coding to compress a response with this status, headers and body
/// length (`None`: unknown) in, or `None` for identity.
pub fn coding_for(
    facts: &RequestFacts,
    status: StatusCode,
    h: &HeaderMap,
    length: Option<u64>,
) -> Option<Coding> {
    facts
        .coding
        .filter(|_| may_encode(facts, status, h, length))
}

/// The coding of the stored variant a cache hit is served in, or `None` for
/// identity: the same rules as a response compressed here, so a stored body
/// is encoded exactly when a fresh one would be, but the smallest coding the
/// client weighs highest, as a variant is made once for many hits.
pub fn stored_coding_for(
    facts: &RequestFacts,
    status: StatusCode,
    h: &HeaderMap,
    length: Option<u64>,
) -> Option<Coding> {
    facts
        .stored
        .filter(|_| may_encode(facts, status, h, length))
}

/// Whether a response with this status, headers and body length may be
/// given a content coding at all.
fn may_encode(
    facts: &RequestFacts,
    status: StatusCode,
    h: &HeaderMap,
    length: Option<u64>,
) -> bool {
    if facts.guarded
        || (facts.guard_responses && per_user(h))
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT
        || h.contains_key(header::CONTENT_ENCODING)
        || h.contains_key(header::CONTENT_RANGE)
        || h.contains_key("no-gzip-compression")
    {
        return false;
    }
    let content_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !compressible(content_type) || cache_control_has(h, &["no-transform"]) {
        return false;
    }
    length.is_none_or(|n| n >= MIN_COMPRESS_SIZE)
}

/// Whether a response declares itself per-user: it sets a cookie, is
/// `private` or `no-store`, or varies on the request's credentials
/// (`Vary: Cookie` / `Authorization`). That is where BREACH-style secrets
/// live, so the guard (GZIP_COMPRESSION_DISABLE_ON_AUTH) leaves these
/// identity even for a request without credentials. Thruster means to check
/// this but its check runs too late to matter.
fn per_user(h: &HeaderMap) -> bool {
    h.contains_key(header::SET_COOKIE)
        || cache_control_has(h, &["private", "no-store"])
        || h.get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|t| t.eq_ignore_ascii_case("cookie") || t.eq_ignore_ascii_case("authorization"))
}

/// Applies compression to a response per the request's facts. Adds
/// `Vary: Accept-Encoding` to every response with a body that could vary.
pub fn apply(facts: &RequestFacts, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
    let (coding, length) = choose(facts, &response);
    let status = response.status();
    if !status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        merge_vary(response.headers_mut());
    }
    response.headers_mut().remove("no-gzip-compression");
    let Some(coding) = coding else {
        return response;
    };

    let headers = response.headers_mut();
    mark_encoded(headers, coding);
    headers.remove(header::CONTENT_LENGTH);
    // HEAD gets the headers GET would get (RFC 9110 §9.3.2), and no body.
    if facts.head {
        return response;
    }
    let padding = padding_len(facts.jitter);
    response.map(|body| CompressBody::new(body, coding, padding, length).boxed_unsync())
}

/// Sets the headers of a representation encoded with `coding`: its
/// `Content-Encoding`, no byte ranges over it, and a validator of its own.
pub fn mark_encoded(headers: &mut HeaderMap, coding: Coding) {
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    headers.remove(header::ACCEPT_RANGES);
    // RFC 9110 §8.8.1: a different representation needs a different
    // validator; weak, and marked with the coding so revalidation of the
    // identity and encoded forms never cross.
    if let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) {
        let opaque = etag.trim_start_matches("W/");
        let tagged = match opaque.strip_suffix('"') {
            Some(inner) => format!("W/{inner}-{}\"", coding.token()),
            None => format!("W/{opaque}"),
        };
        if let Ok(value) = HeaderValue::try_from(tagged) {
            headers.insert(header::ETAG, value);
        }
    }
}

/// Brotli's window (lgwin) for a body of `length` bytes: the smallest that
/// holds the whole body (a window of 2^lgwin holds 2^lgwin - 16 bytes), at
/// least 17, at most 22 (4 MiB). An unknown length gets 19 (512 KiB).
///
/// The window sets most of an encoder's memory: its ring buffer is twice the
/// window, so 8 MiB at 22 for every stream, where a 20 KB page needs 320 KiB
/// at 17 and compresses to the same bytes. Not below 17: at quality 5-9 and
/// lgwin 16 or less the brotli crate switches to a hasher (H40-H42) that
/// allocates 32 MiB.
pub fn brotli_window(length: Option<u64>) -> u32 {
    const MIN: u32 = 17;
    const MAX: u32 = 22;
    const UNKNOWN: u32 = 19;
    match length {
        Some(n) => ceil_log2(n.saturating_add(16)).clamp(MIN, MAX),
        None => UNKNOWN,
    }
}

/// The smallest `k` with `2^k >= n`.
fn ceil_log2(n: u64) -> u32 {
    u64::BITS - n.saturating_sub(1).leading_zeros()
}

/// Whole-body compression for stored responses. It runs once per cached
/// entry rather than per response, so it uses high levels: the bytes saved
/// are paid back on every hit. The whole body is at hand, so each encoder is
/// told its size and sizes its window and tables to it: zstd 19 with an
/// unknown size allocates 90 MiB and brotli 11 with a 4 MiB window 40 MiB,
/// for a 100 KB stylesheet that needs 3 and 9 MiB (same output, ±0.1%).
/// Those MiBs come from [`mapped`], not malloc.
pub fn compress_stored(data: &[u8], coding: Coding, immutable: bool) -> std::io::Result<Vec<u8>> {
    // Brotli 11 costs ~20x level 5 in CPU; worth it for fingerprinted
    // (immutable) assets, which are cached for a year.
    const BROTLI_MAX_FOR: usize = 1 << 20;
    let mut out = match coding {
        Coding::Gzip => mapped::GzipStream::new(9, None)?.compress(data, true)?,
        Coding::Brotli => {
            let quality = if immutable && data.len() <= BROTLI_MAX_FOR {
                11
            } else {
                9
            };
            let mut alloc = mapped::Alloc::MAPPED;
            let buffer = brotli::Allocator::<u8>::alloc_cell(&mut alloc, 64 * 1024);
            let out = Vec::with_capacity(data.len() / 3 + 64);
            // The size hint is taken from the first write: the whole body.
            let mut e = brotli::enc::writer::CompressorWriterCustomAlloc::new(
                out,
                buffer,
                alloc,
                quality,
                brotli_window(Some(data.len() as u64)),
            );
            e.write_all(data)?;
            e.flush()?;
            e.into_inner()
        }
        Coding::Zstd => mapped::zstd(data, if immutable { 19 } else { 12 })?,
    };
    // Kept for the entry's life: no spare capacity.
    out.shrink_to_fit();
    Ok(out)
}

/// Memory for the encoders of stored variants, outside malloc.
///
/// They run once per cached entry on a blocking thread and need MiBs for a
/// moment (brotli 11 on a 100 KB body 9 MiB in blocks up to 3 MiB, zstd 19
/// 3 MiB). From glibc's malloc, such blocks stay in the blocking thread's
/// arena once freed, and each free of a mapped block raises malloc's
/// dynamic mmap threshold (up to 32 MiB) for the whole process, the Ruby VM
/// included, so later blocks up to that size stay in arenas too (in the
/// Puma master, MiBs of freed memory after the first requests for a
/// stylesheet). Here every block of 64 KiB or more is an anonymous
/// mapping of its own, unmapped when freed; smaller ones come from malloc.
///
/// Per-stream brotli encoders use the same allocator ([`Alloc::STREAM`]).
/// Their large blocks (a 1 MiB hash table and a ring buffer of 320 KiB up to
/// 8 MiB at quality 5) are needed again by the next response at once:
/// mapping each afresh would cost a page fault per page per response (2-3x
/// the CPU of a compressed 20 KB page), and from malloc the first free
/// raises the dynamic mmap threshold to 1 MiB and the arena trim threshold
/// to 2 MiB, so each tokio worker's arena kept up to 2 MiB after a burst of
/// compressed responses. So blocks of 128 KiB and more are mapped once and
/// kept in a pool for the next stream, and the pool is unmapped after a
/// second without compression. One allocator type also keeps one copy of
/// brotli's encoder in the extension instead of two (~250 KiB of code,
/// resident in the Puma master).
mod mapped {
    use std::ffi::{c_void, CStr};
    use std::mem::{align_of, size_of};
    use std::ptr::{self, NonNull};

    use zstd::zstd_safe::zstd_sys as sys;

    /// What a stream does after taking its input.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Flush {
        /// Nothing: the encoder may keep the input's tail to itself.
        No,
        /// Everything so far goes out, decodable on its own.
        Sync,
        /// Everything goes out, and the stream ends.
        End,
    }

    /// A stream encoder of ours (gzip, zstd).
    pub trait Compress {
        /// Compresses `data`, appending to `out` what the encoder gives
        /// out, and then flushes as `flush` says.
        fn compress_into(
            &mut self,
            data: &[u8],
            flush: Flush,
            out: &mut Vec<u8>,
        ) -> std::io::Result<()>;

        /// Compresses `data` and flushes (`end`: ends the stream),
        /// returning what is ready to send.
        fn compress(&mut self, data: &[u8], end: bool) -> std::io::Result<Vec<u8>> {
            let mut out = Vec::new();
            let flush = if end { Flush::End } else { Flush::Sync };
            self.compress_into(data, flush, &mut out)?;
            Ok(out)
        }
    }

    /// Stored-variant blocks at least this large are mapped.
    pub const MIN_MAPPED: usize = 64 * 1024;
    /// Per-stream blocks at least this large are mapped and pooled (glibc's
    /// default mmap threshold: smaller ones never raise it).
    pub const MIN_POOLED: usize = 128 * 1024;

    pub(super) fn map(bytes: usize) -> Option<NonNull<u8>> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            None
        } else {
            NonNull::new(p.cast())
        }
    }

    /// `len` values of `T`: a mapping of its own (`mapped` bytes; back to
    /// the pool when `pooled`) or a boxed slice (`mapped == 0`).
    pub struct Block<T> {
        ptr: NonNull<T>,
        len: usize,
        mapped: usize,
        pooled: bool,
    }

    // SAFETY: a block owns its values and their memory alone, as a
    // `Box<[T]>` does.
    unsafe impl<T: Send> Send for Block<T> {}
    // SAFETY: shared access only reads, as with `Box<[T]>`.
    unsafe impl<T: Sync> Sync for Block<T> {}

    impl<T> Block<T> {
        #[cfg(test)]
        pub fn is_mapped(&self) -> bool {
            self.mapped > 0
        }
    }

    impl<T> Default for Block<T> {
        fn default() -> Block<T> {
            Block {
                ptr: NonNull::dangling(),
                len: 0,
                mapped: 0,
                pooled: false,
            }
        }
    }

    impl<T> brotli::SliceWrapper<T> for Block<T> {
        fn slice(&self) -> &[T] {
            // SAFETY: `len` initialised values at `ptr` (dangling only when
            // `len` is 0), owned by this block.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }
    }

    impl<T> brotli::SliceWrapperMut<T> for Block<T> {
        fn slice_mut(&mut self) -> &mut [T] {
            // SAFETY: as in `slice`, and `&mut self` makes it exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    impl<T> Drop for Block<T> {
        fn drop(&mut self) {
            let values = ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            // SAFETY: the block owns its values and their memory, made by
            // `Alloc::alloc_cell` in the way `mapped` records.
            unsafe {
                if self.mapped > 0 {
                    ptr::drop_in_place(values);
                    if self.pooled {
                        pool::STREAMS.put_mapping(self.ptr.cast(), self.mapped);
                    } else {
                        libc::munmap(self.ptr.as_ptr().cast(), self.mapped);
                    }
                } else if self.len > 0 {
                    drop(Box::from_raw(values));
                }
            }
        }
    }

    /// brotli's allocator: every cell holds `T::default()`, like brotli's
    /// own `StandardAlloc`.
    #[derive(Clone, Copy)]
    pub struct Alloc {
        /// Blocks of at least this many bytes are mapped.
        map_from: usize,
        /// Mapped blocks come from and go back to the pool.
        pooled: bool,
    }

    impl Alloc {
        /// Per-stream encoders: blocks of [`MIN_POOLED`] bytes and more
        /// from the pool.
        pub const STREAM: Alloc = Alloc {
            map_from: MIN_POOLED,
            pooled: true,
        };
        /// Stored variants: blocks of [`MIN_MAPPED`] bytes and more mapped,
        /// unmapped when freed.
        pub const MAPPED: Alloc = Alloc {
            map_from: MIN_MAPPED,
            pooled: false,
        };
    }

    impl<T: Clone + Default> brotli::Allocator<T> for Alloc {
        type AllocatedMemory = Block<T>;

        fn alloc_cell(&mut self, len: usize) -> Block<T> {
            if len == 0 {
                return Block::default();
            }
            let bytes = len.saturating_mul(size_of::<T>());
            if bytes >= self.map_from && align_of::<T>() <= 4096 {
                let reused = if self.pooled {
                    pool::STREAMS.take_mapping(bytes)
                } else {
                    None
                };
                if let Some(p) = reused.or_else(|| map(bytes)) {
                    let ptr = p.cast::<T>();
                    for i in 0..len {
                        // SAFETY: `i < len` values fit in the `bytes`
                        // mapped, page-aligned hence aligned for `T`.
                        unsafe { ptr.as_ptr().add(i).write(T::default()) };
                    }
                    return Block {
                        ptr,
                        len,
                        mapped: bytes,
                        pooled: self.pooled,
                    };
                }
            }
            let values: Box<[T]> = vec![T::default(); len].into_boxed_slice();
            Block {
                // SAFETY: Box::into_raw never returns null.
                ptr: unsafe { NonNull::new_unchecked(Box::into_raw(values).cast::<T>()) },
                len,
                mapped: 0,
                pooled: false,
            }
        }

        fn free_cell(&mut self, block: Block<T>) {
            drop(block);
        }
    }

    impl brotli::enc::BrotliAlloc for Alloc {}

    /// What finished streams leave for the next one (mapped blocks of the
    /// brotli encoders, zstd contexts), in pools that are emptied once none
    /// has been taken or returned for [`pool::IDLE`]: an idle proxy keeps
    /// none of it. Without a runtime to run the sweep, what is returned is
    /// freed at once.
    pub mod pool {
        use std::ptr::NonNull;
        use std::sync::{Mutex, MutexGuard};
        use std::time::Duration;

        use crate::sys::settle::Settle;

        /// How long a pool stays unused before it is emptied.
        pub const IDLE: Duration = Duration::from_secs(1);
        /// Bytes of blocks kept at most; blocks beyond are unmapped when
        /// freed.
        const MAX_BYTES: usize = 16 << 20;

        /// Items kept for reuse; `free` releases those the pool lets go.
        pub struct IdlePool<T: 'static> {
            items: Mutex<Vec<T>>,
            /// Takes and puts; the pool is emptied once they settle.
            used: Settle,
            free: fn(T),
        }

        impl<T: Send + 'static> IdlePool<T> {
            pub const fn new(free: fn(T)) -> IdlePool<T> {
                IdlePool {
                    items: Mutex::new(Vec::new()),
                    used: Settle::new(IDLE),
                    free,
                }
            }

            fn lock(&self) -> MutexGuard<'_, Vec<T>> {
                self.items.lock().unwrap_or_else(|e| e.into_inner())
            }

            /// The last item returned that `fits`, if any.
            pub fn take(&self, fits: impl Fn(&T) -> bool) -> Option<T> {
                let mut items = self.lock();
                let i = items.iter().rposition(fits)?;
                let item = items.swap_remove(i);
                self.used.touch();
                Some(item)
            }

            /// Keeps `item` for the next stream if `admit` lets it join the
            /// items kept; frees it otherwise. The pool is emptied IDLE
            /// after its last use.
            pub fn put(&'static self, item: T, admit: impl FnOnce(&T, &[T]) -> bool) {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return (self.free)(item);
                };
                {
                    let mut items = self.lock();
                    if !admit(&item, &items) {
                        drop(items);
                        return (self.free)(item);
                    }
                    items.push(item);
                }
                if let Some(settled) = self.used.poke() {
                    // Made here, not in the task: a task dropped unpolled
                    // (its runtime stopped) empties the pool too.
                    let empty = Empty(self);
                    runtime.spawn(async move {
                        settled.await;
                        drop(empty);
                    });
                }
            }

            #[cfg(test)]
            pub fn len(&self) -> usize {
                self.lock().len()
            }
        }

        /// Empties the pool when dropped: when it has been idle, or when the
        /// runtime shuts down with the wait pending.
        struct Empty<T: Send + 'static>(&'static IdlePool<T>);

        impl<T: Send + 'static> Drop for Empty<T> {
            fn drop(&mut self) {
                let items = std::mem::take(&mut *self.0.lock());
                items.into_iter().for_each(self.0.free);
            }
        }

        /// A mapping of a per-stream brotli encoder: (address, bytes).
        pub type Mapping = (usize, usize);

        /// The mappings of per-stream encoders.
        pub static STREAMS: IdlePool<Mapping> = IdlePool::new(unmap);

        fn unmap((address, bytes): Mapping) {
            // SAFETY: a mapping of `bytes` made by `map`, owned by the pool
            // alone.
            unsafe { libc::munmap(address as *mut libc::c_void, bytes) };
        }

        impl IdlePool<Mapping> {
            /// A pooled mapping of exactly `bytes`, if any.
            pub fn take_mapping(&self, bytes: usize) -> Option<NonNull<u8>> {
                let (address, _) = self.take(|&(_, n)| n == bytes)?;
                NonNull::new(address as *mut u8)
            }

            /// Gives a mapping of `bytes` to the pool (or unmaps it past
            /// [`MAX_BYTES`] kept).
            pub fn put_mapping(&'static self, ptr: NonNull<u8>, bytes: usize) {
                self.put((ptr.as_ptr() as usize, bytes), |_, kept| {
                    kept.iter().map(|&(_, n)| n).sum::<usize>() + bytes <= MAX_BYTES
                });
            }

            #[cfg(test)]
            pub fn bytes(&self) -> usize {
                self.lock().iter().map(|&(_, n)| n).sum()
            }
        }
    }

    /// The C encoders' allocations (zstd's contexts, zlib's deflate
    /// states): blocks of MIN_MAPPED and more are mappings of their own,
    /// the rest come from malloc. Each carries its length and origin in a
    /// header, as the free functions get only the address. 16 bytes keep
    /// malloc's alignment.
    const HEADER: usize = 16;

    unsafe extern "C" fn c_alloc(_: *mut c_void, size: usize) -> *mut c_void {
        let Some(total) = size.checked_add(HEADER) else {
            return ptr::null_mut();
        };
        let (base, mapped) = if total >= MIN_MAPPED {
            match map(total) {
                Some(p) => (p.as_ptr(), 1usize),
                None => return ptr::null_mut(),
            }
        } else {
            // SAFETY: plain malloc; null is handed on to zstd as failure.
            let p = unsafe { libc::malloc(total) }.cast::<u8>();
            if p.is_null() {
                return ptr::null_mut();
            }
            (p, 0)
        };
        // SAFETY: `base` holds `total >= HEADER` bytes, aligned for usize.
        unsafe {
            base.cast::<usize>().write(total);
            base.cast::<usize>().add(1).write(mapped);
            base.add(HEADER).cast()
        }
    }

    unsafe extern "C" fn c_free(_: *mut c_void, address: *mut c_void) {
        if address.is_null() {
            return;
        }
        // SAFETY: `address` came from `c_alloc`, whose header precedes it.
        unsafe {
            let base = address.cast::<u8>().sub(HEADER);
            let total = base.cast::<usize>().read();
            if base.cast::<usize>().add(1).read() == 1 {
                libc::munmap(base.cast(), total);
            } else {
                libc::free(base.cast());
            }
        }
    }

    fn check(code: usize) -> std::io::Result<usize> {
        // SAFETY: plain functions on a result code; the name is a static
        // C string.
        unsafe {
            if sys::ZSTD_isError(code) == 0 {
                Ok(code)
            } else {
                let name = CStr::from_ptr(sys::ZSTD_getErrorName(code));
                Err(std::io::Error::other(format!(
                    "zstd: {}",
                    name.to_string_lossy()
                )))
            }
        }
    }

    /// `data` as one zstd frame at `level`, with its size in the header
    /// (zstd picks its window and tables for that size).
    pub fn zstd(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
        // Not from the stream pool: a level 12 or 19 workspace is freed at
        // once, not kept for the next response.
        struct Context(NonNull<sys::ZSTD_CCtx>);
        impl Drop for Context {
            fn drop(&mut self) {
                // SAFETY: made by ZSTD_createCCtx_advanced, freed once.
                unsafe { sys::ZSTD_freeCCtx(self.0.as_ptr()) };
            }
        }
        let context = Context(create_context()?);
        // SAFETY: a live context; the output block holds `bound` bytes and
        // the input `data.len()`.
        unsafe {
            check(sys::ZSTD_CCtx_setParameter(
                context.0.as_ptr(),
                sys::ZSTD_cParameter::ZSTD_c_compressionLevel,
                level,
            ))?;
            let bound = zstd::zstd_safe::compress_bound(data.len());
            let mut alloc = Alloc::MAPPED;
            let mut scratch = brotli::Allocator::<u8>::alloc_cell(&mut alloc, bound);
            let written = check(sys::ZSTD_compress2(
                context.0.as_ptr(),
                brotli::SliceWrapperMut::slice_mut(&mut scratch)
                    .as_mut_ptr()
                    .cast(),
                bound,
                data.as_ptr().cast(),
                data.len(),
            ))?;
            Ok(brotli::SliceWrapper::slice(&scratch)[..written].to_vec())
        }
    }

    /// A zstd context for one response compressed as it streams, taken from
    /// [`contexts`] and given back when the stream ends or is dropped.
    ///
    /// Why pooled: on a 20 KB page at level 3 a fresh context costs as much
    /// as the compression itself (22-24 us per page against 12 with a
    /// reused one: its workspace allocated and its tables cleared each
    /// time). A reused context keeps its workspace, and zstd leaves tables
    /// of a compatible earlier frame in place (it only moves their indices
    /// on). Its memory comes from [`c_alloc`] (large blocks mapped, so
    /// freeing the pool gives them back to the system).
    pub struct ZstdStream {
        pub(in crate::pipeline::compression) context: NonNull<sys::ZSTD_CCtx>,
        pool: &'static contexts::Contexts,
    }

    // SAFETY: a zstd context is used by one thread at a time; the stream
    // owns it alone.
    unsafe impl Send for ZstdStream {}
    // SAFETY: every method that touches the context takes `&mut self`.
    unsafe impl Sync for ZstdStream {}

    impl ZstdStream {
        /// A stream at `level`; `size_hint` (the body's announced length)
        /// sizes the window and tables, and a body of another length still
        /// encodes.
        pub fn new(level: i32, size_hint: Option<u32>) -> std::io::Result<ZstdStream> {
            ZstdStream::from_pool(&contexts::STREAMS, level, size_hint)
        }

        pub fn from_pool(
            pool: &'static contexts::Contexts,
            level: i32,
            size_hint: Option<u32>,
        ) -> std::io::Result<ZstdStream> {
            let context = match pool.take(|_| true).and_then(|c| NonNull::new(c as *mut _)) {
                Some(context) => context,
                None => create_context()?,
            };
            let stream = ZstdStream { context, pool };
            // SAFETY: a live context owned by `stream`. Resetting the
            // parameters keeps the workspace.
            unsafe {
                let c = stream.context.as_ptr();
                check(sys::ZSTD_CCtx_reset(
                    c,
                    sys::ZSTD_ResetDirective::ZSTD_reset_session_and_parameters,
                ))?;
                check(sys::ZSTD_CCtx_setParameter(
                    c,
                    sys::ZSTD_cParameter::ZSTD_c_compressionLevel,
                    level,
                ))?;
                if let Some(n) = size_hint.and_then(|n| i32::try_from(n).ok()) {
                    check(sys::ZSTD_CCtx_setParameter(
                        c,
                        sys::ZSTD_cParameter::ZSTD_c_experimentalParam7,
                        n,
                    ))?;
                }
            }
            Ok(stream)
        }
    }

    impl Compress for ZstdStream {
        fn compress_into(
            &mut self,
            data: &[u8],
            flush: Flush,
            out: &mut Vec<u8>,
        ) -> std::io::Result<()> {
            let directive = match flush {
                Flush::No => sys::ZSTD_EndDirective::ZSTD_e_continue,
                Flush::Sync => sys::ZSTD_EndDirective::ZSTD_e_flush,
                Flush::End => sys::ZSTD_EndDirective::ZSTD_e_end,
            };
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            let mut input = sys::ZSTD_inBuffer {
                src: data.as_ptr().cast(),
                size: data.len(),
                pos: 0,
            };
            loop {
                if out.capacity() - out.len() < 256 {
                    out.reserve(64 * 1024);
                }
                let spare = out.capacity() - out.len();
                let mut output = sys::ZSTD_outBuffer {
                    // SAFETY: within the vector's allocation.
                    dst: unsafe { out.as_mut_ptr().add(out.len()) }.cast(),
                    size: spare,
                    pos: 0,
                };
                // SAFETY: a live context; the buffers describe `data` and
                // the vector's spare capacity.
                let remaining = check(unsafe {
                    sys::ZSTD_compressStream2(
                        self.context.as_ptr(),
                        &mut output,
                        &mut input,
                        directive,
                    )
                })?;
                // SAFETY: zstd wrote `output.pos` bytes into the spare
                // capacity.
                unsafe { out.set_len(out.len() + output.pos) };
                // Without a flush, zstd's return is a hint of the next
                // input's size, not what it still has to write out.
                if input.pos == input.size && (remaining == 0 || flush == Flush::No) {
                    return Ok(());
                }
            }
        }
    }

    impl Drop for ZstdStream {
        fn drop(&mut self) {
            self.pool
                .put(self.context.as_ptr() as usize, contexts::admit);
        }
    }

    fn create_context() -> std::io::Result<NonNull<sys::ZSTD_CCtx>> {
        let memory = sys::ZSTD_customMem {
            customAlloc: Some(c_alloc),
            customFree: Some(c_free),
            opaque: ptr::null_mut(),
        };
        // SAFETY: both functions follow ZSTD_customMem's contract.
        NonNull::new(unsafe { sys::ZSTD_createCCtx_advanced(memory) })
            .ok_or_else(|| std::io::Error::other("zstd: no memory for a context"))
    }

    /// Contexts of finished zstd streams waiting for the next one.
    pub mod contexts {
        use super::pool::IdlePool;
        use super::sys;

        /// Contexts kept at most: about one per runtime thread compressing
        /// at once; more are freed as their streams end.
        const MAX: usize = 4;
        /// A context whose workspace grew past this is freed rather than
        /// kept (level 3 without a length takes 3.5 MiB, with a 20 KB
        /// page's 0.6 MiB).
        const MAX_BYTES: usize = 4 << 20;

        /// A context's address.
        pub type Context = usize;
        pub type Contexts = IdlePool<Context>;

        /// The contexts of per-response zstd streams.
        pub static STREAMS: Contexts = Contexts::new(free);

        pub fn free(context: Context) {
            // SAFETY: a context made by ZSTD_createCCtx_advanced, owned by
            // the pool alone.
            unsafe { sys::ZSTD_freeCCtx(context as *mut sys::ZSTD_CCtx) };
        }

        /// Keeps a context of a finished stream, unless its workspace grew
        /// too large or enough are kept.
        pub fn admit(&context: &Context, kept: &[Context]) -> bool {
            // SAFETY: a live context.
            let size = unsafe { sys::ZSTD_sizeof_CCtx(context as *const sys::ZSTD_CCtx) };
            size <= MAX_BYTES && kept.len() < MAX
        }
    }

    // zlib's allocation functions over c_alloc/c_free (zalloc counts items
    // of a size).
    unsafe extern "C" fn zlib_alloc(
        opaque: *mut c_void,
        items: std::ffi::c_uint,
        size: std::ffi::c_uint,
    ) -> *mut c_void {
        match (items as usize).checked_mul(size as usize) {
            // SAFETY: c_alloc's contract is zalloc's, with one size.
            Some(bytes) => unsafe { c_alloc(opaque, bytes) },
            None => ptr::null_mut(),
        }
    }

    unsafe extern "C" fn zlib_free(opaque: *mut c_void, address: *mut c_void) {
        // SAFETY: `address` came from zlib_alloc, hence c_alloc.
        unsafe { c_free(opaque, address) }
    }

    /// gzip (RFC 1952) of one body: a raw deflate stream from zlib-rs,
    /// framed here (header, CRC-32 and length trailer).
    ///
    /// Why not flate2: its encoder takes the deflate state (371 KiB at
    /// level 6) from malloc, and glibc maps a block that large, so its
    /// first free raised the process's dynamic mmap threshold to 371 KiB
    /// and the arena trim threshold to 742 KiB: every tokio worker's arena
    /// (and, in the Puma master, every arena of Ruby's) then kept up to
    /// 742 KiB of freed memory at its top. zlib's C API takes allocation
    /// functions, so the state's blocks are mappings of their own here,
    /// and per-response streams (level [`GZIP_STREAM_LEVEL`]) go back to a
    /// pool for the next response, freed after a second unused, as zstd's
    /// contexts are: a reused state also skips the allocation and its page
    /// faults.
    pub struct GzipStream {
        stream: NonNull<z::z_stream>,
        pool: Option<&'static gzip_states::States>,
        /// The header, until the first output carries it.
        header: Vec<u8>,
        crc: u32,
        /// Bytes of input modulo 2^32 (gzip's ISIZE).
        length: u32,
    }

    use libz_rs_sys as z;

    /// The level of gzip compressed per response: most of the gain for a
    /// fraction of the CPU of level 9.
    pub const GZIP_STREAM_LEVEL: i32 = 6;

    // SAFETY: a deflate state is used by one thread at a time; the stream
    // owns it alone.
    unsafe impl Send for GzipStream {}
    // SAFETY: every method that touches the state takes `&mut self`.
    unsafe impl Sync for GzipStream {}

    impl GzipStream {
        /// A stream at `level`; `comment` goes in the header's FCOMMENT
        /// field (no NUL in it). Level [`GZIP_STREAM_LEVEL`] streams come
        /// from and go back to the pool.
        pub fn new(level: i32, comment: Option<&[u8]>) -> std::io::Result<GzipStream> {
            let pool = (level == GZIP_STREAM_LEVEL).then_some(&gzip_states::STATES);
            GzipStream::from_pool(pool, level, comment)
        }

        pub fn from_pool(
            pool: Option<&'static gzip_states::States>,
            level: i32,
            comment: Option<&[u8]>,
        ) -> std::io::Result<GzipStream> {
            let reused = pool
                .and_then(|p| p.take(|_| true))
                .and_then(|s| NonNull::new(s as *mut z::z_stream));
            let stream = match reused {
                Some(stream) => {
                    // SAFETY: a live state of the pool's level, owned now by
                    // this stream; a reset keeps its memory.
                    if unsafe { z::deflateReset(stream.as_ptr()) } != z::Z_OK {
                        gzip_states::free(stream.as_ptr() as usize);
                        return Err(std::io::Error::other(
                            "gzip: a pooled state failed to reset",
                        ));
                    }
                    stream
                }
                None => create_deflate(level)?,
            };
            let mut header = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
            if let Some(comment) = comment {
                header[3] = 0x10; // FCOMMENT
                header.extend_from_slice(comment);
                header.push(0);
            }
            // XFL: 2 for the slowest level, 4 for the fastest (RFC 1952).
            header[8] = match level {
                9.. => 2,
                ..=1 => 4,
                _ => 0,
            };
            Ok(GzipStream {
                stream,
                pool,
                header,
                crc: 0,
                length: 0,
            })
        }

        #[cfg(test)]
        pub fn state(&self) -> usize {
            self.stream.as_ptr() as usize
        }

        #[cfg(test)]
        pub fn is_pooled(&self) -> bool {
            self.pool.is_some()
        }
    }

    /// gzip's trailer ends the stream at [`Flush::End`].
    impl Compress for GzipStream {
        fn compress_into(
            &mut self,
            mut data: &[u8],
            flush: Flush,
            out: &mut Vec<u8>,
        ) -> std::io::Result<()> {
            let s = self.stream.as_ptr();
            if !self.header.is_empty() {
                if out.is_empty() {
                    *out = std::mem::take(&mut self.header);
                } else {
                    out.append(&mut self.header);
                }
            }
            let end = flush == Flush::End;
            // SAFETY: a live state; deflateBound only reads its parameters.
            let bound = unsafe { z::deflateBound(s, data.len() as std::ffi::c_ulong) };
            out.reserve(bound as usize + 16);
            self.crc = zlib_rs::crc32::crc32(self.crc, data);
            self.length = self.length.wrapping_add(data.len() as u32);
            loop {
                // avail_in is 32 bits: a larger input goes in parts, each
                // compressed without a flush of its own.
                let part = data.len().min(1 << 30);
                let last = part == data.len();
                let flush = match (last, flush) {
                    (false, _) | (true, Flush::No) => z::Z_NO_FLUSH,
                    (true, Flush::Sync) => z::Z_SYNC_FLUSH,
                    (true, Flush::End) => z::Z_FINISH,
                };
                // SAFETY: a live state; `data[..part]` outlives the calls
                // that read it.
                unsafe {
                    (*s).next_in = data.as_ptr();
                    (*s).avail_in = part as std::ffi::c_uint;
                }
                loop {
                    if out.capacity() - out.len() < 64 {
                        out.reserve(16 * 1024);
                    }
                    let spare = (out.capacity() - out.len()).min(u32::MAX as usize);
                    // SAFETY: next_out/avail_out describe the vector's spare
                    // capacity, which deflate writes and we then count.
                    let (code, written, input_left) = unsafe {
                        (*s).next_out = out.as_mut_ptr().add(out.len());
                        (*s).avail_out = spare as std::ffi::c_uint;
                        let code = z::deflate(s, flush);
                        let written = spare - (*s).avail_out as usize;
                        out.set_len(out.len() + written);
                        (code, written, (*s).avail_in)
                    };
                    match code {
                        z::Z_STREAM_END => break,
                        // Done with this part once its input is taken and
                        // the flush fit (output space was left over).
                        z::Z_OK | z::Z_BUF_ERROR
                            if input_left == 0 && flush != z::Z_FINISH && spare > written =>
                        {
                            break
                        }
                        z::Z_OK => {}
                        // No progress although there was room: a bug, not
                        // a reason to spin.
                        z::Z_BUF_ERROR if written > 0 || spare == 0 => {}
                        code => {
                            return Err(std::io::Error::other(format!(
                                "gzip: deflate failed ({code})"
                            )))
                        }
                    }
                }
                data = &data[part..];
                if last {
                    break;
                }
            }
            if end {
                out.extend_from_slice(&self.crc.to_le_bytes());
                out.extend_from_slice(&self.length.to_le_bytes());
            }
            Ok(())
        }
    }

    impl Drop for GzipStream {
        fn drop(&mut self) {
            let state = self.stream.as_ptr() as usize;
            match self.pool {
                Some(pool) => pool.put(state, gzip_states::admit),
                None => gzip_states::free(state),
            }
        }
    }

    /// A raw deflate state at `level` whose memory comes from [`zlib_alloc`].
    fn create_deflate(level: i32) -> std::io::Result<NonNull<z::z_stream>> {
        // Boxed: the state points back at its z_stream, which must not move.
        let mut stream = Box::new(z::z_stream {
            zalloc: Some(zlib_alloc),
            zfree: Some(zlib_free),
            ..z::z_stream::default()
        });
        // SAFETY: a zeroed z_stream with both allocation functions; the
        // version and size are the library's own.
        let code = unsafe {
            z::deflateInit2_(
                &mut *stream,
                level,
                z::Z_DEFLATED,
                -15, // raw deflate, 32 KiB window: the framing is ours
                8,
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                size_of::<z::z_stream>() as std::ffi::c_int,
            )
        };
        if code != z::Z_OK {
            return Err(std::io::Error::other(format!(
                "gzip: no deflate state ({code})"
            )));
        }
        // SAFETY: Box::into_raw never returns null.
        Ok(unsafe { NonNull::new_unchecked(Box::into_raw(stream)) })
    }

    /// Deflate states of finished per-response gzip streams.
    pub mod gzip_states {
        use super::pool::IdlePool;
        use super::z;

        /// States kept at most: about one per runtime thread compressing
        /// at once.
        const MAX: usize = 4;

        /// A boxed z_stream's address.
        pub type State = usize;
        pub type States = IdlePool<State>;

        pub static STATES: States = States::new(free);

        pub fn free(state: State) {
            let stream = state as *mut z::z_stream;
            // SAFETY: a live state made by create_deflate, owned by the
            // caller alone; deflateEnd frees its memory, then its box.
            unsafe {
                z::deflateEnd(stream);
                drop(Box::from_raw(stream));
            }
        }

        pub fn admit(_: &State, kept: &[State]) -> bool {
            kept.len() < MAX
        }
    }
}

/// The zstd level of responses compressed as they go. Level 1 would cost
/// ~7% less CPU, but on a mixed corpus of HTML, CSS, JS and JSON it gives
/// 113% of gzip 6's bytes against level 3's 107% (docs/benchmarks.md).
const ZSTD_STREAM_LEVEL: i32 = 3;

type BrotliWriter =
    brotli::enc::writer::CompressorWriterCustomAlloc<Vec<u8>, mapped::Block<u8>, mapped::Alloc>;

// One per compressed response, inside its body: boxing the gzip variant
// would add an allocation per response to save ~230 bytes while it lives.
#[allow(clippy::large_enum_variant)]
enum Encoder {
    Gzip(mapped::GzipStream),
    Brotli(Box<BrotliWriter>),
    Zstd(mapped::ZstdStream, usize),
}

impl Encoder {
    /// `padding`: BREACH padding bytes, carried in the gzip header's comment
    /// or a zstd skippable frame (brotli has no place for it). `length`: the
    /// body's announced length, if known; it sizes brotli's window and zstd's
    /// tables (a hint only: a body of another length still encodes).
    fn new(coding: Coding, padding: usize, length: Option<u64>) -> std::io::Result<Encoder> {
        Ok(match coding {
            // Levels tuned for on-the-fly work: most of the gain, a fraction
            // of the CPU of the maximum levels.
            Coding::Gzip => Encoder::Gzip(mapped::GzipStream::new(
                mapped::GZIP_STREAM_LEVEL,
                (padding > 0).then(|| padding_text(padding)).as_deref(),
            )?),
            Coding::Brotli => {
                let mut alloc = mapped::Alloc::STREAM;
                let buffer = brotli::Allocator::<u8>::alloc_cell(&mut alloc, 4096);
                Encoder::Brotli(Box::new(BrotliWriter::new(
                    Vec::new(),
                    buffer,
                    alloc,
                    5,
                    brotli_window(length),
                )))
            }
            // With the size zstd picks its window and tables for it: a 20 KB
            // page then needs 0.6 MiB instead of the 3.5 MiB of a 2 MiB
            // window and tables to match. A hint, not a pledge: a body
            // longer or shorter than announced still encodes.
            Coding::Zstd => Encoder::Zstd(
                mapped::ZstdStream::new(
                    ZSTD_STREAM_LEVEL,
                    length.and_then(|n| u32::try_from(n).ok()),
                )?,
                padding,
            ),
        })
    }

    /// Compresses `data`, appending to `out` what the encoder gives out,
    /// and then flushes as `flush` says (not [`Flush::End`]: see
    /// [`Encoder::finish`]).
    fn write(&mut self, data: &[u8], flush: Flush, out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.compress_into(data, flush, out),
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                if flush != Flush::No {
                    e.flush()?;
                }
                append(out, e.get_mut());
                Ok(())
            }
            Encoder::Zstd(e, _) => e.compress_into(data, flush, out),
        }
    }

    /// Compresses `data` as the body's last bytes and ends the stream,
    /// appending everything left to `out`.
    fn finish(self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(mut e) => e.compress_into(data, Flush::End, out),
            Encoder::Brotli(mut e) => {
                e.write_all(data)?;
                append(out, &mut e.into_inner());
                Ok(())
            }
            Encoder::Zstd(mut e, padding) => {
                e.compress_into(data, Flush::End, out)?;
                if padding > 0 {
                    // RFC 8878 §3.1.2: a skippable frame decoders ignore.
                    out.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
                    out.extend_from_slice(&(padding as u32).to_le_bytes());
                    out.extend_from_slice(&padding_text(padding));
                }
                Ok(())
            }
        }
    }
}

/// Moves `from`'s bytes to the end of `out`, without a copy when `out` is
/// empty.
fn append(out: &mut Vec<u8>, from: &mut Vec<u8>) {
    if out.is_empty() {
        std::mem::swap(out, from);
    } else {
        out.append(from);
    }
}

/// Compressed output held back at most while the app's body keeps coming
/// (sent unflushed past it: the encoder goes on from where it is).
const MAX_HELD: usize = 64 * 1024;

/// Input compressed at most in one poll: past it, what is held is flushed
/// and sent, so a long body that is always ready (a spool on disk, a very
/// compressible one that never fills [`MAX_HELD`]) does not keep the
/// runtime's thread from its other tasks. The most one frame of the old
/// flush-per-frame stream could take (a spooled disk chunk).
const MAX_TAKEN: usize = 256 * 1024;

/// Streams the inner body through an encoder.
///
/// Frames of the body that are ready together are compressed together,
/// and flushed once, when the body has nothing more ready (or has ended):
/// a page the app sent in two reads goes out as one block of one frame,
/// smaller and cheaper than a flushed block per read and a last frame to
/// end the stream. A stream that pauses (server-sent events, a slow app)
/// still gets each part out as soon as it came.
struct CompressBody {
    inner: ResponseBody,
    encoder: Option<Encoder>,
    error: Option<std::io::Error>,
    /// Compressed, not yet sent.
    held: Vec<u8>,
    /// Input went in since the last flush.
    unflushed: bool,
    /// Input bytes taken since the last frame went out.
    taken: usize,
}

impl CompressBody {
    fn new(
        inner: ResponseBody,
        coding: Coding,
        padding: usize,
        length: Option<u64>,
    ) -> CompressBody {
        let (encoder, error) = match Encoder::new(coding, padding, length) {
            Ok(encoder) => (Some(encoder), None),
            Err(error) => (None, Some(error)),
        };
        CompressBody {
            inner,
            encoder,
            error,
            held: Vec::new(),
            unflushed: false,
            taken: 0,
        }
    }

    /// What is held, as a frame (`None` when nothing is).
    fn take_held(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.taken = 0;
        (!self.held.is_empty())
            .then(|| Ok(Frame::data(Bytes::from(std::mem::take(&mut self.held)))))
    }

    /// Ends the stream after `data`: everything held and left comes out.
    fn finish(&mut self, data: &[u8]) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let encoder = self.encoder.take().expect("finished once");
        if let Err(e) = encoder.finish(data, &mut self.held) {
            return Poll::Ready(Some(Err(e.into())));
        }
        Poll::Ready(self.take_held())
    }
}

impl Body for CompressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(error) = self.error.take() {
            return Poll::Ready(Some(Err(error.into())));
        }
        let this = &mut *self;
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    // Nothing more ready: what came goes out now.
                    if this.unflushed {
                        this.unflushed = false;
                        if let Err(e) = encoder.write(&[], Flush::Sync, &mut this.held) {
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                    return match this.take_held() {
                        Some(frame) => Poll::Ready(Some(frame)),
                        None => Poll::Pending,
                    };
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers cannot follow a compressed body we still
                    // have to finish; they are dropped.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if this.inner.is_end_stream() {
                        return this.finish(&data);
                    }
                    if data.is_empty() {
                        continue;
                    }
                    if let Err(e) = encoder.write(&data, Flush::No, &mut this.held) {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    this.unflushed = true;
                    this.taken += data.len();
                    if this.taken >= MAX_TAKEN {
                        this.unflushed = false;
                        if let Err(e) = encoder.write(&[], Flush::Sync, &mut this.held) {
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                    if this.held.len() >= MAX_HELD || this.taken >= MAX_TAKEN {
                        if let Some(frame) = this.take_held() {
                            return Poll::Ready(Some(frame));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return this.finish(&[]),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.error.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full_body;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn compressible_types() {
        for t in [
            "text/html; charset=utf-8",
            "text/css",
            "application/json",
            "application/javascript",
            "image/svg+xml",
            "application/xml",
            "application/wasm",
            "text/event-stream",
            "Text/HTML; Charset=UTF-8",
            " APPLICATION/JSON ",
            // Longer than the stack buffer for lower-casing.
            "application/vnd.example.a-media-type-name-over-sixty-four-bytes+json",
        ] {
            assert!(compressible(t), "{t}");
        }
        for t in [
            "",
            "image/png",
            "image/jpeg",
            "image/webp",
            "font/woff2",
            "font/woff",
            "video/mp4",
            "audio/mpeg",
            "application/zip",
            "application/gzip",
            "application/octet-stream",
            "application/pdf",
            "application/zstd",
            "IMAGE/PNG",
            "application/vnd.example.a-media-type-name-over-sixty-four-bytes+zip",
        ] {
            assert!(!compressible(t), "{t}");
        }
    }

    #[test]
    fn vary_is_merged_not_replaced() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "Accept-Encoding"),
            (&["Accept"], "Accept, Accept-Encoding"),
            (&["Accept", "Origin"], "Accept, Origin, Accept-Encoding"),
            (&["accept-encoding"], "accept-encoding"),
            (&["*"], "*"),
        ];
        for (existing, expected) in cases {
            let mut h = HeaderMap::new();
            for v in *existing {
                h.append(header::VARY, HeaderValue::from_str(v).unwrap());
            }
            merge_vary(&mut h);
            let all: Vec<_> = h
                .get_all(header::VARY)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(all.join(", "), *expected);
        }
    }

    fn response(content_type: &str, body: &'static [u8]) -> Response<ResponseBody> {
        Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::ETAG, "\"abc\"")
            .header(header::ACCEPT_RANGES, "bytes")
            .body(full_body(body))
            .unwrap()
    }

    fn facts(coding: Option<Coding>) -> RequestFacts {
        RequestFacts {
            coding,
            stored: coding,
            head: false,
            guarded: false,
            guard_responses: false,
            jitter: 0,
        }
    }

    async fn body_bytes(r: Response<ResponseBody>) -> Vec<u8> {
        r.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap(),
            Coding::Brotli => brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap(),
            Coding::Zstd => zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap(),
        };
        out
    }

    const TEXT: &[u8] = b"<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n\
        <p>hello hello hello hello hello hello hello hello hello hello</p>\n<p>hello hello hello hello hello \
        hello hello hello hello hello</p>\n<p>hello hello hello hello hello hello hello hello hello hello</p>\n";

    #[tokio::test(flavor = "current_thread")]
    async fn each_coding_round_trips_with_rfc_headers() {
        assert!(TEXT.len() as u64 >= MIN_COMPRESS_SIZE);
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let r = apply(&facts(Some(coding)), response("text/html", TEXT));
            let h = r.headers().clone();
            assert_eq!(h[header::CONTENT_ENCODING], coding.token());
            assert!(!h.contains_key(header::CONTENT_LENGTH));
            assert!(!h.contains_key(header::ACCEPT_RANGES));
            assert_eq!(
                h[header::ETAG],
                format!("W/\"abc-{}\"", coding.token()).as_str()
            );
            assert_eq!(h[header::VARY], "Accept-Encoding");
            let encoded = body_bytes(r).await;
            assert!(encoded.len() < TEXT.len());
            assert_eq!(decode(coding, &encoded), TEXT);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn jitter_pads_gzip_and_zstd_randomly_and_decoders_ignore_it() {
        for coding in [Coding::Gzip, Coding::Zstd] {
            let mut sizes = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let f = RequestFacts {
                    coding: Some(coding),
                    stored: Some(coding),
                    head: false,
                    guarded: false,
                    guard_responses: false,
                    jitter: 32,
                };
                let encoded = body_bytes(apply(&f, response("text/html", TEXT))).await;
                assert_eq!(decode(coding, &encoded), TEXT, "{coding:?} still decodes");
                sizes.insert(encoded.len());
            }
            let unpadded =
                body_bytes(apply(&facts(Some(coding)), response("text/html", TEXT))).await;
            assert!(
                sizes.len() > 3,
                "{coding:?}: padding varies per response: {sizes:?}"
            );
            let smallest = *sizes.iter().next().unwrap();
            let largest = *sizes.iter().last().unwrap();
            // gzip: FCOMMENT bytes + NUL; zstd: an 8-byte skippable frame header + bytes.
            let overhead = if coding == Coding::Gzip { 1 } else { 8 };
            assert!(
                smallest > unpadded.len() && largest <= unpadded.len() + overhead + 32,
                "{coding:?}"
            );
        }
        let gz = body_bytes(apply(
            &RequestFacts {
                coding: Some(Coding::Gzip),
                stored: Some(Coding::Gzip),
                head: false,
                guarded: false,
                guard_responses: false,
                jitter: 32,
            },
            response("text/html", TEXT),
        ))
        .await;
        assert_eq!(gz[3] & 0x10, 0x10, "gzip FCOMMENT flag");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn identity_when_not_worth_it_or_not_allowed() {
        let small: &'static [u8] = b"tiny";
        let cases: Vec<(&str, Response<ResponseBody>, RequestFacts)> = vec![
            (
                "no acceptable coding",
                response("text/html", TEXT),
                facts(None),
            ),
            (
                "below 1 KiB",
                response("text/html", small),
                facts(Some(Coding::Gzip)),
            ),
            (
                "image",
                response("image/png", TEXT),
                facts(Some(Coding::Gzip)),
            ),
            (
                "guarded request",
                response("text/html", TEXT),
                RequestFacts {
                    coding: Some(Coding::Gzip),
                    stored: Some(Coding::Gzip),
                    head: false,
                    guarded: true,
                    guard_responses: false,
                    jitter: 0,
                },
            ),
            (
                "already encoded",
                {
                    let mut r = response("text/html", TEXT);
                    r.headers_mut()
                        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    r
                },
                facts(Some(Coding::Brotli)),
            ),
        ];
        for (why, r, f) in cases {
            let before_encoding = r.headers().get(header::CONTENT_ENCODING).cloned();
            let r = apply(&f, r);
            assert_eq!(
                r.headers().get(header::CONTENT_ENCODING).cloned(),
                before_encoding,
                "{why}"
            );
            assert_eq!(
                r.headers()[header::VARY],
                "Accept-Encoding",
                "{why}: Vary is always there"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn guard_refuses_per_user_responses() {
        let guarding = RequestFacts {
            guard_responses: true,
            ..facts(Some(Coding::Gzip))
        };
        // (response header, value): each marks the response as per-user.
        let per_user: &[(header::HeaderName, &str)] = &[
            (header::SET_COOKIE, "s=1"),
            (header::CACHE_CONTROL, "Private, max-age=0"),
            (header::CACHE_CONTROL, "no-store"),
            (header::VARY, "Cookie"),
            (header::VARY, "Accept, authorization"),
        ];
        for (name, value) in per_user {
            let mut r = response("text/html", TEXT);
            r.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            let guarded = apply(&guarding, r);
            assert!(
                !guarded.headers().contains_key(header::CONTENT_ENCODING),
                "{name}: {value} stays identity under the guard"
            );
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            assert_eq!(
                coding_for(&guarding, StatusCode::OK, &headers, Some(4096)),
                None,
                "{name}: {value}: cache hits and X-Sendfile decide alike"
            );
            let mut r = response("text/html", TEXT);
            r.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            assert_eq!(
                apply(&facts(Some(Coding::Gzip)), r).headers()[header::CONTENT_ENCODING],
                "gzip",
                "{name}: {value}: without the guard it does not matter"
            );
        }
        let mut r = response("text/html", TEXT);
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Accept, Origin"));
        assert_eq!(
            apply(&guarding, r).headers()[header::CONTENT_ENCODING],
            "gzip",
            "a Vary without credentials is not per-user"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn head_gets_the_get_headers_and_no_body() {
        let f = RequestFacts {
            coding: Some(Coding::Gzip),
            stored: Some(Coding::Gzip),
            head: true,
            guarded: false,
            guard_responses: false,
            jitter: 0,
        };
        let mut r = response("text/html", TEXT);
        // A HEAD body is empty; its Content-Length is the one GET would get.
        *r.body_mut() = full_body(Bytes::new());
        let r = apply(&f, r);
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
        assert!(!r.headers().contains_key(header::CONTENT_LENGTH));
    }

    /// bench/app.ru's `/page`: 128 table rows, 20158 bytes.
    fn bench_page() -> Vec<u8> {
        let words = [
            "lorem",
            "ipsum",
            "dolor",
            "sit",
            "amet",
            "consectetur",
            "adipiscing",
            "elit",
            "sed",
            "do",
            "eiusmod",
            "tempor",
        ];
        let mut page = String::from(
            "<!doctype html><html><head><title>page</title><link rel=\"stylesheet\" \
             href=\"/assets/app.css\"></head><body><table>\n",
        );
        for i in 0..128 {
            let mut row = words.to_vec();
            row.rotate_left(i % 12);
            page.push_str(&format!(
                "<tr><td class=\"n\">{i}</td><td>{}</td><td><a href=\"/items/{i}\">item {i}</a></td></tr>\n",
                row.join(" ")
            ));
        }
        page.push_str("</table></body></html>\n");
        assert_eq!(page.len(), 20158, "the page of bench/app.ru");
        page.into_bytes()
    }

    /// The window a brotli stream declares (RFC 7932 §9.1, WBITS).
    fn brotli_wbits(data: &[u8]) -> u32 {
        let bits = u32::from(data[0]) | (u32::from(data[1]) << 8);
        if bits & 1 == 0 {
            return 16;
        }
        match (bits >> 1) & 7 {
            0 => match (bits >> 4) & 7 {
                0 => 17,
                m => 8 + m,
            },
            n => 17 + n,
        }
    }

    /// The window a zstd frame declares (RFC 8878 §3.1.1.1): its content
    /// size when it is a single segment, else its window descriptor.
    fn zstd_window(data: &[u8]) -> u64 {
        assert_eq!(data[..4], 0xFD2F_B528u32.to_le_bytes());
        let descriptor = data[4];
        if descriptor & 0x20 != 0 {
            let size_len = [1, 2, 4, 8][usize::from(descriptor >> 6)];
            let dict_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
            let mut size = [0u8; 8];
            size[..size_len].copy_from_slice(&data[5 + dict_len..5 + dict_len + size_len]);
            let size = u64::from_le_bytes(size);
            return if size_len == 2 { size + 256 } else { size };
        }
        let exponent = u64::from(data[5] >> 3);
        let mantissa = u64::from(data[5] & 7);
        let base = 1u64 << (10 + exponent);
        base + base / 8 * mantissa
    }

    /// What the encoders produce when not sized to the body: brotli 5 with
    /// a 4 MiB window, zstd with no size, gzip 6.
    fn unsized_stream(coding: Coding, data: &[u8]) -> Vec<u8> {
        match coding {
            Coding::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(data).unwrap();
                e.flush().unwrap();
                e.finish().unwrap()
            }
            Coding::Brotli => {
                let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
                e.write_all(data).unwrap();
                e.flush().unwrap();
                e.into_inner()
            }
            Coding::Zstd => {
                let mut e =
                    zstd::stream::write::Encoder::new(Vec::new(), ZSTD_STREAM_LEVEL).unwrap();
                e.write_all(data).unwrap();
                e.flush().unwrap();
                e.finish().unwrap()
            }
        }
    }

    fn within_one_percent(now: usize, before: usize) -> bool {
        now.abs_diff(before) * 100 <= before
    }

    #[test]
    fn brotli_window_fits_the_body() {
        assert_eq!(brotli_window(Some(0)), 17);
        assert_eq!(brotli_window(Some(1024)), 17);
        assert_eq!(brotli_window(Some(20_158)), 17);
        assert_eq!(brotli_window(Some((1 << 17) - 16)), 17);
        assert_eq!(brotli_window(Some((1 << 17) - 15)), 18);
        assert_eq!(brotli_window(Some(100_890)), 17);
        assert_eq!(brotli_window(Some(300_000)), 19);
        assert_eq!(brotli_window(Some((1 << 22) - 16)), 22);
        assert_eq!(brotli_window(Some(1 << 30)), 22);
        assert_eq!(brotli_window(Some(u64::MAX)), 22);
        assert_eq!(brotli_window(None), 19);
    }

    /// `page` as an HTML response of its announced length, in one frame.
    fn whole(page: &Bytes) -> Response<ResponseBody> {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(header::CONTENT_LENGTH, page.len())
            .body(full_body(page.clone()))
            .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_bench_page_streams_in_a_small_window_to_the_same_size() {
        let page = Bytes::from(bench_page());
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let encoded = body_bytes(apply(&facts(Some(coding)), whole(&page))).await;
            assert_eq!(decode(coding, &encoded), page, "{coding:?} round trip");
            let before = unsized_stream(coding, &page);
            assert!(
                within_one_percent(encoded.len(), before.len()),
                "{coding:?}: {} bytes, {} before",
                encoded.len(),
                before.len()
            );
            match coding {
                Coding::Brotli => {
                    assert_eq!(brotli_wbits(&before), 22);
                    assert_eq!(brotli_wbits(&encoded), 17, "128 KiB, not 4 MiB");
                }
                Coding::Zstd => {
                    assert_eq!(zstd_window(&before), 2 << 20);
                    assert!(
                        zstd_window(&encoded) <= 32 << 10,
                        "{}",
                        zstd_window(&encoded)
                    );
                }
                Coding::Gzip => {}
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_length_is_a_hint_a_longer_or_unknown_body_still_encodes() {
        let page = Bytes::from(bench_page());
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            // Announced 2 KiB, 20 KB sent (the header is what sizes the
            // encoder; hyper would catch the mismatch, the encoder must not).
            for announced in [Some(2048), Some(1 << 20), None] {
                let mut r = Response::builder().header(header::CONTENT_TYPE, "text/html");
                if let Some(n) = announced {
                    r = r.header(header::CONTENT_LENGTH, n);
                }
                let body =
                    Frames(page.chunks(4096).map(Bytes::copy_from_slice).collect()).boxed_unsync();
                let encoded = body_bytes(apply(&facts(Some(coding)), r.body(body).unwrap())).await;
                assert_eq!(
                    decode(coding, &encoded),
                    page,
                    "{coding:?}, announced {announced:?}"
                );
                if coding == Coding::Brotli {
                    assert_eq!(
                        brotli_wbits(&encoded),
                        brotli_window(announced),
                        "{announced:?}"
                    );
                }
            }
        }
    }

    /// Every data frame of a compressed response, in order.
    async fn frames_of(r: Response<ResponseBody>) -> Vec<Bytes> {
        let mut body = r.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        frames
    }

    fn streamed(frames: impl IntoIterator<Item = Bytes>) -> Response<ResponseBody> {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/html")
            .body(Frames(frames.into_iter().collect()).boxed_unsync())
            .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_ready_together_go_out_as_one_frame() {
        let page = Bytes::from(bench_page());
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let r = streamed(page.chunks(4096).map(Bytes::copy_from_slice));
            let frames = frames_of(apply(&facts(Some(coding)), r)).await;
            assert_eq!(frames.len(), 1, "{coding:?}: one flush, at the end");
            assert_eq!(decode(coding, &frames[0]), page, "{coding:?}");
        }
        // The same page in one frame of its announced length (a body read
        // whole before it goes on) is one frame too, not one and an end.
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let frames = frames_of(apply(&facts(Some(coding)), whole(&page))).await;
            assert_eq!(frames.len(), 1, "{coding:?}");
            assert_eq!(decode(coding, &frames[0]), page, "{coding:?}");
        }
    }

    /// Output is not held back without bound while a long body keeps
    /// coming: past [`MAX_HELD`] it goes out, unflushed; and a poll
    /// compresses at most [`MAX_TAKEN`] of input, however well it packs.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_ready_body_is_not_held_whole() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let r = streamed(noise.chunks(16 * 1024).map(Bytes::copy_from_slice));
            let frames = frames_of(apply(&facts(Some(coding)), r)).await;
            // gzip and zstd give out as they go; brotli keeps up to its
            // window (512 KiB with no length) to itself first.
            let largest = frames.iter().map(Bytes::len).max().unwrap();
            let bound = match coding {
                Coding::Brotli => 512 * 1024,
                _ => MAX_HELD + 128 * 1024,
            };
            assert!(largest <= bound, "{coding:?}: {largest} of {}", noise.len());
            assert!(frames.len() >= 2, "{coding:?}");
            assert_eq!(decode(coding, &frames.concat()), noise, "{coding:?}");
        }
        let zeros = vec![0u8; 4 << 20];
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let r = streamed(zeros.chunks(16 * 1024).map(Bytes::copy_from_slice));
            let frames = frames_of(apply(&facts(Some(coding)), r)).await;
            assert!(
                frames.len() >= 16, // a frame per 256 KiB of input
                "{coding:?}: {} frames",
                frames.len()
            );
            assert_eq!(decode(coding, &frames.concat()), zeros, "{coding:?}");
        }
    }

    /// What a streaming decoder makes of `data`, the start of a stream.
    fn decode_start(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut read = |reader: &mut dyn Read| loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        };
        match coding {
            Coding::Gzip => read(&mut flate2::read::GzDecoder::new(data)),
            Coding::Brotli => read(&mut brotli::Decompressor::new(data, 4096)),
            Coding::Zstd => read(&mut zstd::stream::read::Decoder::new(data).unwrap()),
        }
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_pause_in_the_body_sends_what_came_before_it() {
        use crate::http::test_support::ChannelBody;
        let page = Bytes::from(bench_page());
        let (first, second) = (page.slice(..12_000), page.slice(12_000..));
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let r = Response::builder()
                .header(header::CONTENT_TYPE, "text/html")
                .body(ChannelBody(rx).boxed_unsync())
                .unwrap();
            let mut body = apply(&facts(Some(coding)), r).into_body();
            // Two frames, then the app pauses.
            tx.send(Ok(Frame::data(first.slice(..5000)))).await.unwrap();
            tx.send(Ok(Frame::data(first.slice(5000..)))).await.unwrap();
            let out = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("what came goes out while the app pauses")
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap();
            assert_eq!(decode_start(coding, &out), first, "{coding:?}");
            tx.send(Ok(Frame::data(second.clone()))).await.unwrap();
            drop(tx);
            let mut all = out.to_vec();
            while let Some(frame) = body.frame().await {
                all.extend_from_slice(&frame.unwrap().into_data().unwrap());
            }
            assert_eq!(decode(coding, &all), page, "{coding:?}");
        }
    }

    /// A body of data frames with no size hint (a stream).
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[test]
    fn stored_encoders_map_their_large_blocks() {
        use brotli::{Allocator, SliceWrapper, SliceWrapperMut};
        let mut stream = mapped::Alloc::STREAM;
        let pooled: mapped::Block<u32> = stream.alloc_cell(1 << 18);
        assert!(pooled.is_mapped());
        assert!(pooled.slice().iter().all(|v| *v == 0));
        let below: mapped::Block<u32> = stream.alloc_cell(1 << 14);
        assert!(!below.is_mapped(), "64 KiB: from malloc");
        let mut alloc = mapped::Alloc::MAPPED;
        let mut big: mapped::Block<u32> = alloc.alloc_cell(1 << 18);
        assert!(big.is_mapped(), "1 MiB is a mapping of its own");
        assert!(big.slice().iter().all(|v| *v == 0));
        big.slice_mut()[(1 << 18) - 1] = 7;
        assert_eq!(big.slice().len(), 1 << 18);
        alloc.free_cell(big);
        let small: mapped::Block<u32> = alloc.alloc_cell(100);
        assert!(!small.is_mapped());
        assert_eq!(small.slice(), &[0; 100][..]);
        let empty: mapped::Block<u64> = alloc.alloc_cell(0);
        assert!(empty.slice().is_empty());
        // Non-zero defaults are written, as brotli's own allocator does.
        #[derive(Clone, Copy, PartialEq, Debug)]
        struct Cost(f32);
        impl Default for Cost {
            fn default() -> Cost {
                Cost(f32::INFINITY)
            }
        }
        let costs: mapped::Block<Cost> = alloc.alloc_cell(1 << 16);
        assert!(costs.is_mapped());
        assert!(costs.slice().iter().all(|c| *c == Cost::default()));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_stream_pool_reuses_mappings_and_unmaps_them_when_idle() {
        use mapped::pool::{IdlePool, Mapping, IDLE};
        fn unmap((address, bytes): Mapping) {
            // SAFETY: a mapping made by `mapped::map`.
            unsafe { libc::munmap(address as *mut libc::c_void, bytes) };
        }
        let pool: &'static IdlePool<Mapping> = Box::leak(Box::new(IdlePool::new(unmap)));
        let bytes = 1 << 20;
        let block = mapped::map(bytes).unwrap();
        pool.put_mapping(block, bytes);
        assert_eq!(pool.bytes(), bytes);
        assert_eq!(pool.take_mapping(bytes / 2), None, "only the same size");
        assert_eq!(
            pool.take_mapping(bytes),
            Some(block),
            "the same mapping again"
        );
        assert_eq!(pool.bytes(), 0);
        pool.put_mapping(block, bytes);
        // Still in use within IDLE: kept.
        tokio::time::sleep(IDLE / 2).await;
        assert_eq!(pool.take_mapping(bytes), Some(block));
        pool.put_mapping(block, bytes);
        // Unmapped a second after that last use, not at the sweep's next
        // whole period (a second later still).
        tokio::time::sleep(IDLE + std::time::Duration::from_millis(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.bytes(), 0, "unmapped after a second unused");
        assert_eq!(pool.take_mapping(bytes), None);
        // Without a runtime nothing could sweep: unmapped at once.
        std::thread::spawn(move || pool.put_mapping(mapped::map(bytes).unwrap(), bytes))
            .join()
            .unwrap();
        assert_eq!(pool.bytes(), 0);
    }

    /// A finished stream's zstd context goes back to the pool and the next
    /// stream reuses it; each frame decodes on its own to its body, also
    /// after a stream dropped mid-frame; the pool is freed after a second
    /// without a stream, and at once without a runtime to sweep it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn zstd_streams_reuse_pooled_contexts_and_each_frame_stands_alone() {
        use mapped::contexts::{self, Contexts};
        use mapped::pool::IDLE;
        use mapped::ZstdStream;
        let pool: &'static Contexts = Box::leak(Box::new(Contexts::new(contexts::free)));
        let page = bench_page();
        let other: Vec<u8> = page.iter().rev().copied().collect();
        let encode = |stream: &mut ZstdStream, body: &[u8]| {
            let (a, b) = body.split_at(body.len() / 3);
            let mut out = stream.compress(a, false).unwrap();
            out.extend(stream.compress(b, false).unwrap());
            out.extend(stream.compress(&[], true).unwrap());
            out
        };

        let mut first = ZstdStream::from_pool(pool, 3, Some(page.len() as u32)).unwrap();
        let context = first.context;
        assert_eq!(decode(Coding::Zstd, &encode(&mut first, &page)), page);
        drop(first);
        assert_eq!(pool.len(), 1);

        // Cut off mid-frame: its context comes back all the same...
        let mut cut = ZstdStream::from_pool(pool, 3, Some(page.len() as u32)).unwrap();
        assert_eq!(cut.context, context, "the pooled context reused");
        cut.compress(&page[..5000], false).unwrap();
        drop(cut);
        // ...and the next stream, of another (unknown) size, starts afresh.
        let mut next = ZstdStream::from_pool(pool, 3, None).unwrap();
        assert_eq!(next.context, context);
        assert_eq!(decode(Coding::Zstd, &encode(&mut next, &other)), other);
        drop(next);
        assert_eq!(pool.len(), 1);
        // One whose workspace grew past 4 MiB (level 5, no size) is freed.
        let mut big = ZstdStream::from_pool(pool, 5, None).unwrap();
        assert_eq!(decode(Coding::Zstd, &encode(&mut big, &page)), page);
        drop(big);
        assert_eq!(pool.len(), 0);
        drop(ZstdStream::from_pool(pool, 3, None).unwrap());

        tokio::time::sleep(IDLE / 2).await;
        assert_eq!(pool.len(), 1, "kept while in use");
        tokio::time::sleep(IDLE * 3).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.len(), 0, "freed after a second unused");
        std::thread::spawn(move || drop(ZstdStream::from_pool(pool, 3, None).unwrap()))
            .join()
            .unwrap();
        assert_eq!(pool.len(), 0, "freed at once without a runtime");
    }

    /// Per-response gzip: a finished stream's deflate state goes back to
    /// the pool and the next stream reuses it; each stream decodes on its
    /// own to its body, also after one dropped mid-stream, across flushes
    /// and with a header comment; the pool keeps at most 4 states and is
    /// freed after a second without a stream, and at once without a
    /// runtime. Stored variants (level 9) never join it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn gzip_streams_reuse_pooled_states_and_each_stream_stands_alone() {
        use mapped::gzip_states::{self, States};
        use mapped::pool::IDLE;
        use mapped::{GzipStream, GZIP_STREAM_LEVEL};
        let pool: &'static States = Box::leak(Box::new(States::new(gzip_states::free)));
        let stream = || GzipStream::from_pool(Some(pool), GZIP_STREAM_LEVEL, None).unwrap();
        let page = bench_page();
        let other: Vec<u8> = page.iter().rev().copied().collect();
        let encode = |stream: &mut GzipStream, body: &[u8]| {
            let (a, b) = body.split_at(body.len() / 3);
            let mut out = stream.compress(a, false).unwrap();
            // Each flush leaves a whole prefix a client can inflate.
            let mut prefix = Vec::new();
            let _ = flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut prefix);
            assert_eq!(prefix, a, "the first part decodes once flushed");
            out.extend(stream.compress(&[], false).unwrap());
            out.extend(stream.compress(b, false).unwrap());
            out.extend(stream.compress(&[], true).unwrap());
            out
        };

        let mut first = stream();
        let state = first.state();
        assert_eq!(decode(Coding::Gzip, &encode(&mut first, &page)), page);
        drop(first);
        assert_eq!(pool.len(), 1);

        // Cut off mid-stream: its state comes back all the same...
        let mut cut = stream();
        assert_eq!(cut.state(), state, "the pooled state reused");
        cut.compress(&page[..5000], false).unwrap();
        drop(cut);
        // ...and the next stream starts afresh, with its own header.
        let mut next =
            GzipStream::from_pool(Some(pool), GZIP_STREAM_LEVEL, Some(b"Padding")).unwrap();
        assert_eq!(next.state(), state);
        let encoded = encode(&mut next, &other);
        assert_eq!(&encoded[..4], [0x1f, 0x8b, 8, 0x10], "FCOMMENT");
        assert_eq!(decode(Coding::Gzip, &encoded), other);
        drop(next);
        // The same bytes as a fresh state gives.
        let mut again = stream();
        let mut fresh = GzipStream::from_pool(None, GZIP_STREAM_LEVEL, None).unwrap();
        assert_eq!(
            again.compress(&page, true).unwrap(),
            fresh.compress(&page, true).unwrap()
        );
        drop(again);
        assert_eq!(pool.len(), 1);
        let five: Vec<GzipStream> = (0..5).map(|_| stream()).collect();
        drop(five);
        assert_eq!(pool.len(), 4, "at most 4 kept");

        tokio::time::sleep(IDLE / 2).await;
        assert_eq!(pool.len(), 4, "kept while in use");
        tokio::time::sleep(IDLE * 3).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.len(), 0, "freed after a second unused");
        std::thread::spawn(move || drop(stream())).join().unwrap();
        assert_eq!(pool.len(), 0, "freed at once without a runtime");
        // Level 9 (stored variants) is never pooled.
        assert!(!GzipStream::new(9, None).unwrap().is_pooled());
        assert!(GzipStream::new(GZIP_STREAM_LEVEL, None)
            .unwrap()
            .is_pooled());
    }

    /// A pool whose sweep was scheduled on a runtime that stopped before
    /// running it (`Thruster.stop`) is emptied then, and the next
    /// runtime's puts schedule a sweep again.
    #[test]
    fn a_sweep_dropped_with_its_runtime_leaves_the_pool_swept_again() {
        use mapped::pool::{IdlePool, IDLE};
        use std::sync::atomic::{AtomicUsize, Ordering};
        static FREED: AtomicUsize = AtomicUsize::new(0);
        let pool: &'static IdlePool<usize> = Box::leak(Box::new(IdlePool::new(|_| {
            FREED.fetch_add(1, Ordering::SeqCst);
        })));
        let runtime = crate::sys::test_support::paused_runtime;
        let first = runtime();
        first.block_on(async { pool.put(1, |_, _| true) });
        drop(first);
        assert_eq!(pool.len(), 0, "emptied with the runtime");
        assert_eq!(FREED.load(Ordering::SeqCst), 1);
        runtime().block_on(async {
            pool.put(2, |_, _| true);
            assert_eq!(pool.len(), 1);
            tokio::time::sleep(IDLE * 2).await;
            tokio::task::yield_now().await;
            assert_eq!(pool.len(), 0, "swept on the next runtime");
        });
        assert_eq!(FREED.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn stored_variants_are_sized_to_the_body_and_as_small_as_before() {
        let page = bench_page();
        for immutable in [true, false] {
            for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
                let encoded = compress_stored(&page, coding, immutable).unwrap();
                assert_eq!(decode(coding, &encoded), page, "{coding:?} round trip");
                // The parameters used before sizing.
                let before = match coding {
                    Coding::Gzip => continue,
                    Coding::Brotli => {
                        let q = if immutable { 11 } else { 9 };
                        let mut out = Vec::new();
                        let mut e = brotli::CompressorWriter::new(&mut out, 64 * 1024, q, 22);
                        e.write_all(&page).unwrap();
                        e.flush().unwrap();
                        drop(e);
                        assert_eq!(brotli_wbits(&encoded), 17);
                        out
                    }
                    Coding::Zstd => {
                        let level = if immutable { 19 } else { 12 };
                        let mut out = Vec::new();
                        zstd::stream::copy_encode(&page[..], &mut out, level).unwrap();
                        assert_eq!(zstd_window(&encoded), page.len() as u64, "single segment");
                        out
                    }
                };
                assert!(
                    within_one_percent(encoded.len(), before.len()),
                    "{coding:?} immutable {immutable}: {} bytes, {} before",
                    encoded.len(),
                    before.len()
                );
            }
        }
    }
}
