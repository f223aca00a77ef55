//! The stored form of a cache entry, shared by the disk tier and (later) a
//! Redis tier: self-describing (magic, version, the full key) and checked
//! (a CRC over the metadata, one per body chunk), so a torn, truncated,
//! misplaced or corrupted entry is rejected instead of served.
//!
//! ```text
//! envelope  "THRC" | version u16 | flags u16 | meta_len u32 | meta_crc u32     16 bytes
//! meta      meta_len bytes (layout below, version 1)
//! body      ceil(body_len / CHUNK_LEN) chunks, each:
//!           len u32 | crc u32 | len bytes          every chunk but the last is CHUNK_LEN
//! ```
//!
//! All integers are little-endian. `meta_crc` is CRC-32 over the envelope's
//! first 12 bytes and the metadata, so it also guards the version and the
//! length fields. A chunk's CRC covers the key's chunk seed, the chunk's
//! index and its bytes: a chunk moved to another position, or spliced in
//! from another entry, does not verify.
//!
//! The 16-byte envelope is the same for every format version: a reader can
//! tell a *valid entry of another version* (old and new releases share the
//! directory during a deploy; it must be left alone) from a damaged one (to
//! be removed). Only the metadata layout and the body framing may change
//! with the version.
//!
//! Metadata, version 1:
//!
//! ```text
//! key_len u32 | key (UTF-8)
//! status u16 | flags u8 (1 immutable, 2 release, 4 file; others must be 0)
//! stored_at_unix_ms u64 | initial_age_secs u64 | lifetime_secs u64
//! stale_if_error_secs u64 | body_len u64
//! [release_len u32 | release (UTF-8)]                       if flag 2
//! [path_len u32 | path | file_len u64 | modified_unix_ns u64]  if flag 4
//! header_count u32, then per header: name_len u16 | name | value_len u32 | value
//! ```
//!
//! Why CRC-32 and not a cryptographic hash: the threat is damage (torn
//! writes, bad sectors, a crash between write and rename, another program's
//! file), not an adversary — whoever can write the cache directory can write
//! any entry anyway. CRC-32 detects every error burst up to 32 bits and any
//! other damage with probability 1 - 2^-32, and runs at memory speed
//! (`flate2::Crc`, which is zlib-rs' SIMD CRC-32 here; `crc32fast` is not in
//! the tree with the zlib-rs backend, and this is the same IEEE CRC-32).

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

pub const MAGIC: [u8; 4] = *b"THRC";
/// The format this build writes and reads.
pub const VERSION: u16 = 1;
/// The envelope in front of the metadata.
pub const HEADER_LEN: usize = 16;
/// Metadata is read into memory whole: bounded so a damaged length field
/// can never make a reader allocate much.
pub const MAX_META_LEN: usize = 1 << 20;
pub const MAX_KEY_LEN: usize = 64 * 1024;
/// `HeaderMap` panics past 32768 entries; no real response has this many.
pub const MAX_HEADERS: usize = 4096;
/// Body chunk size: a streamed read verifies one chunk before sending it,
/// so this is also the memory a reader holds per chunk in flight.
pub const CHUNK_LEN: usize = 256 * 1024;
pub const CHUNK_HEADER_LEN: usize = 8;
/// Bounds all offset arithmetic far from overflow (1 TiB).
pub const MAX_BODY_LEN: u64 = 1 << 40;

const FLAG_IMMUTABLE: u8 = 1;
const FLAG_RELEASE: u8 = 2;
const FLAG_FILE: u8 = 4;
/// key_len + status + flags + five u64 + header_count.
const FIXED_META_LEN: usize = 4 + 2 + 1 + 5 * 8 + 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry truncated: {needed} bytes needed, {got} present")]
    Truncated { needed: u64, got: u64 },
    #[error("not a cache entry (bad magic)")]
    Magic,
    #[error("metadata length {0} over the {MAX_META_LEN}-byte limit")]
    MetaLen(u64),
    #[error("metadata checksum mismatch")]
    MetaChecksum,
    /// A checked envelope of another format version: another release's
    /// valid entry, not damage.
    #[error("entry format version {0}; this build reads version {VERSION}")]
    Version(u16),
    #[error("malformed metadata: {0}")]
    Malformed(&'static str),
    #[error("the stored key is not the requested key")]
    KeyMismatch,
    #[error("{0} bytes after the end of the entry")]
    Trailing(u64),
    #[error("chunk {index}: length {got}, expected {expected}")]
    ChunkLen { index: u64, got: u64, expected: u64 },
    #[error("chunk {index}: checksum mismatch")]
    ChunkChecksum { index: u64 },
    #[error("body is {actual} bytes but the metadata says {declared}")]
    BodyLen { declared: u64, actual: u64 },
    #[error("cannot encode: {0}")]
    TooLarge(&'static str),
}

impl EntryError {
    /// A well-formed entry written by another format version: a miss, but
    /// not damage, so it must not be removed.
    pub fn is_other_version(&self) -> bool {
        matches!(self, EntryError::Version(_))
    }
}

/// The file an X-Sendfile response pointed to, as it was when stored. Such
/// entries are references, re-checked on a hit (host-local: a shared tier
/// must not take them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub path: PathBuf,
    pub len: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub modified_unix_ns: u64,
}

/// Everything about a stored response except its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// The full cache key text. Readers compare it with the key they asked
    /// for: file names and Redis keys are hashes of it, and a hash alone is
    /// never taken as identity.
    pub key: String,
    pub status: StatusCode,
    /// Upstream headers as the memory tier keeps them (hop-by-hop, `Age`
    /// and `X-Cache` already gone). Repeated names and non-UTF-8 values
    /// survive.
    pub headers: HeaderMap,
    /// Wall-clock time the response was received. Not a process-local
    /// `Instant`: `Age` must stay right after a restart or on another host.
    pub stored_at_unix_ms: u64,
    /// The response's age when received (RFC 9111 §4.2.3).
    pub initial_age_secs: u64,
    /// Freshness lifetime (RFC 9111 §4.2.1).
    pub lifetime_secs: u64,
    /// How long past its lifetime it may stand in for an error (RFC 5861).
    pub stale_if_error_secs: u64,
    /// `Cache-Control: immutable`: kept across releases (fingerprinted
    /// assets are the same bytes in every release).
    pub immutable: bool,
    /// `CACHE_RELEASE` at store time; an entry from another release is only
    /// served when immutable.
    pub release: Option<String>,
    /// For an X-Sendfile response: the file it refers to (the body is then
    /// usually empty).
    pub file: Option<StoredFile>,
    /// Exact body length. Set by the writer when the entry is committed.
    pub body_len: u64,
}

impl EntryMeta {
    /// RFC 9111 §4.2.3 current age at `now_unix_ms`.
    pub fn age_secs(&self, now_unix_ms: u64) -> u64 {
        let resident = now_unix_ms.saturating_sub(self.stored_at_unix_ms) / 1000;
        self.initial_age_secs.saturating_add(resident)
    }

    /// Wall-clock time (Unix ms) the entry stops being fresh.
    pub fn fresh_until_unix_ms(&self) -> u64 {
        self.until(self.lifetime_secs)
    }

    /// Wall-clock time (Unix ms) after which no rule lets it be served,
    /// not even on an error: it is dead weight.
    pub fn usable_until_unix_ms(&self) -> u64 {
        self.until(self.lifetime_secs.saturating_add(self.stale_if_error_secs))
    }

    fn until(&self, secs: u64) -> u64 {
        let left = secs.saturating_sub(self.initial_age_secs);
        self.stored_at_unix_ms
            .saturating_add(left.saturating_mul(1000))
    }

    /// Number of body chunks.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.body_len)
    }
}

/// Wall-clock now in Unix milliseconds (0 before 1970: a broken clock must
/// not panic).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// SHA-256 of a cache key: names the entry's file (and would name a Redis
/// key), and seeds its chunk checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        KeyHash(out)
    }

    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        s
    }

    pub fn parse_hex(s: &str) -> Option<KeyHash> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (lower_hex_digit(pair[0])? << 4) | lower_hex_digit(pair[1])?;
        }
        Some(KeyHash(out))
    }

    pub fn chunk_seed(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

/// Only lower-case digits: our names are canonical, anything else is not
/// ours.
fn lower_hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

pub fn chunk_count(body_len: u64) -> u64 {
    body_len.div_ceil(CHUNK_LEN as u64)
}

/// The data length of chunk `index` of a `body_len` body (0 past the end).
pub fn chunk_len(body_len: u64, index: u64) -> u64 {
    let start = index.saturating_mul(CHUNK_LEN as u64);
    body_len.saturating_sub(start).min(CHUNK_LEN as u64)
}

/// Where chunk `index` starts, counted from the start of the body.
pub fn chunk_offset(index: u64) -> u64 {
    index.saturating_mul((CHUNK_LEN + CHUNK_HEADER_LEN) as u64)
}

/// Bytes the body takes once framed in chunks.
pub fn framed_body_len(body_len: u64) -> u64 {
    body_len.saturating_add(chunk_count(body_len).saturating_mul(CHUNK_HEADER_LEN as u64))
}

fn chunk_crc(seed: u64, index: u64, data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    let mut prefix = [0u8; 16];
    prefix[..8].copy_from_slice(&seed.to_le_bytes());
    prefix[8..].copy_from_slice(&index.to_le_bytes());
    crc.update(&prefix);
    crc.update(data);
    crc.sum()
}

/// The 8 bytes written in front of chunk `index`.
pub fn chunk_header(seed: u64, index: u64, data: &[u8]) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    // Chunks are at most CHUNK_LEN, far below u32::MAX.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..].copy_from_slice(&chunk_crc(seed, index, data).to_le_bytes());
    out
}

/// Checks one framed chunk (`header` then data) of a `body_len` body.
/// Returns the data.
pub fn verify_chunk(
    seed: u64,
    index: u64,
    body_len: u64,
    framed: &[u8],
) -> Result<&[u8], EntryError> {
    let expected = chunk_len(body_len, index);
    let got = (framed.len() as u64).saturating_sub(CHUNK_HEADER_LEN as u64);
    let (Some(header), Some(data)) = (
        framed.get(..CHUNK_HEADER_LEN),
        framed.get(CHUNK_HEADER_LEN..),
    ) else {
        return Err(EntryError::ChunkLen {
            index,
            got,
            expected,
        });
    };
    let declared = u64::from(read_u32(header, 0));
    if declared != expected || got != expected {
        return Err(EntryError::ChunkLen {
            index,
            got: declared.min(got),
            expected,
        });
    }
    if read_u32(header, 4) != chunk_crc(seed, index, data) {
        return Err(EntryError::ChunkChecksum { index });
    }
    Ok(data)
}

/// `buf[at..at+4]` as u32; callers check the length first.
fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

/// The envelope's fields, readable from the first `HEADER_LEN` bytes, so a
/// reader knows how much more to read before the checksum can be verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub version: u16,
    pub flags: u16,
    pub meta_len: u32,
    pub meta_crc: u32,
}

impl Envelope {
    /// Envelope plus metadata: where the body starts.
    pub fn head_len(&self) -> usize {
        HEADER_LEN + self.meta_len as usize
    }
}

/// Reads the envelope. Checks the magic and the metadata length bound,
/// nothing else (the checksum needs the metadata).
pub fn parse_envelope(buf: &[u8]) -> Result<Envelope, EntryError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        // A prefix of something else is not "truncated": say what it is.
        if !MAGIC.starts_with(buf.get(..buf.len().min(4)).unwrap_or_default()) {
            return Err(EntryError::Magic);
        }
        return Err(EntryError::Truncated {
            needed: HEADER_LEN as u64,
            got: buf.len() as u64,
        });
    };
    if header[..4] != MAGIC {
        return Err(EntryError::Magic);
    }
    let meta_len = read_u32(header, 8);
    if meta_len as usize > MAX_META_LEN {
        return Err(EntryError::MetaLen(u64::from(meta_len)));
    }
    Ok(Envelope {
        version: u16::from_le_bytes([header[4], header[5]]),
        flags: u16::from_le_bytes([header[6], header[7]]),
        meta_len,
        meta_crc: read_u32(header, 12),
    })
}

/// Envelope and metadata: the bytes in front of the body. `meta.body_len`
/// is written as given.
pub fn encode_meta(meta: &EntryMeta) -> Result<Vec<u8>, EntryError> {
    if meta.key.len() > MAX_KEY_LEN {
        return Err(EntryError::TooLarge("key"));
    }
    if meta.headers.len() > MAX_HEADERS {
        return Err(EntryError::TooLarge("header count"));
    }
    if meta.body_len > MAX_BODY_LEN {
        return Err(EntryError::TooLarge("body"));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + FIXED_META_LEN + meta.key.len() + 512);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // meta_len and crc, filled below

    put_bytes32(&mut out, meta.key.as_bytes())?;
    out.extend_from_slice(&meta.status.as_u16().to_le_bytes());
    let mut flags = 0u8;
    if meta.immutable {
        flags |= FLAG_IMMUTABLE;
    }
    if meta.release.is_some() {
        flags |= FLAG_RELEASE;
    }
    if meta.file.is_some() {
        flags |= FLAG_FILE;
    }
    out.push(flags);
    for n in [
        meta.stored_at_unix_ms,
        meta.initial_age_secs,
        meta.lifetime_secs,
        meta.stale_if_error_secs,
        meta.body_len,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    if let Some(release) = &meta.release {
        put_bytes32(&mut out, release.as_bytes())?;
    }
    if let Some(file) = &meta.file {
        use std::os::unix::ffi::OsStrExt;
        put_bytes32(&mut out, file.path.as_os_str().as_bytes())?;
        out.extend_from_slice(&file.len.to_le_bytes());
        out.extend_from_slice(&file.modified_unix_ns.to_le_bytes());
    }
    out.extend_from_slice(&(meta.headers.len() as u32).to_le_bytes());
    for (name, value) in &meta.headers {
        let name = name.as_str().as_bytes();
        let name_len =
            u16::try_from(name.len()).map_err(|_| EntryError::TooLarge("header name"))?;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name);
        put_bytes32(&mut out, value.as_bytes())?;
        if out.len() > HEADER_LEN + MAX_META_LEN {
            return Err(EntryError::TooLarge("metadata"));
        }
    }
    let meta_len = out.len() - HEADER_LEN;
    if meta_len > MAX_META_LEN {
        return Err(EntryError::TooLarge("metadata"));
    }
    out[8..12].copy_from_slice(&(meta_len as u32).to_le_bytes());
    let crc = meta_crc(&out[..12], &out[HEADER_LEN..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), EntryError> {
    if bytes.len() > MAX_META_LEN {
        return Err(EntryError::TooLarge("metadata field"));
    }
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn meta_crc(envelope12: &[u8], meta: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(envelope12);
    crc.update(meta);
    crc.sum()
}

/// Decodes the envelope and metadata at the start of `head` (bytes after
/// the metadata, such as the body, are ignored). Checks, in order: magic,
/// length bound, presence, checksum, version, then every field. Never
/// panics and never allocates more than `head` holds.
pub fn decode_meta(head: &[u8]) -> Result<EntryMeta, EntryError> {
    let envelope = parse_envelope(head)?;
    let head_len = envelope.head_len();
    let Some(meta) = head.get(HEADER_LEN..head_len) else {
        return Err(EntryError::Truncated {
            needed: head_len as u64,
            got: head.len() as u64,
        });
    };
    if meta_crc(&head[..12], meta) != envelope.meta_crc {
        return Err(EntryError::MetaChecksum);
    }
    if envelope.version != VERSION {
        return Err(EntryError::Version(envelope.version));
    }
    if envelope.flags != 0 {
        return Err(EntryError::Malformed("unknown envelope flags"));
    }
    decode_v1(meta)
}

/// A cursor that fails instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EntryError> {
        if n > self.buf.len() {
            return Err(EntryError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, EntryError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, EntryError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, EntryError> {
        Ok(read_u32(self.take(4, what)?, 0))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, EntryError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }

    fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], EntryError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
}

fn decode_v1(meta: &[u8]) -> Result<EntryMeta, EntryError> {
    let mut r = Reader { buf: meta };
    let key = r.bytes32("key")?;
    if key.len() > MAX_KEY_LEN {
        return Err(EntryError::Malformed("key too long"));
    }
    let key = std::str::from_utf8(key).map_err(|_| EntryError::Malformed("key not UTF-8"))?;
    let status =
        StatusCode::from_u16(r.u16("status")?).map_err(|_| EntryError::Malformed("status"))?;
    let flags = r.u8("flags")?;
    if flags & !(FLAG_IMMUTABLE | FLAG_RELEASE | FLAG_FILE) != 0 {
        return Err(EntryError::Malformed("unknown flags"));
    }
    let stored_at_unix_ms = r.u64("stored_at")?;
    let initial_age_secs = r.u64("initial_age")?;
    let lifetime_secs = r.u64("lifetime")?;
    let stale_if_error_secs = r.u64("stale_if_error")?;
    let body_len = r.u64("body_len")?;
    if body_len > MAX_BODY_LEN {
        return Err(EntryError::Malformed("body length"));
    }
    let release = if flags & FLAG_RELEASE != 0 {
        let release = r.bytes32("release")?;
        let release =
            std::str::from_utf8(release).map_err(|_| EntryError::Malformed("release not UTF-8"))?;
        Some(release.to_owned())
    } else {
        None
    };
    let file = if flags & FLAG_FILE != 0 {
        use std::os::unix::ffi::OsStrExt;
        let path = r.bytes32("file path")?;
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
        Some(StoredFile {
            path,
            len: r.u64("file length")?,
            modified_unix_ns: r.u64("file mtime")?,
        })
    } else {
        None
    };
    let count = r.u32("header count")? as usize;
    if count > MAX_HEADERS {
        return Err(EntryError::Malformed("header count"));
    }
    // Each header takes at least 7 bytes: a lying count cannot make us
    // reserve more than the metadata could hold.
    let capacity = count.min(r.buf.len() / 7);
    let mut headers = HeaderMap::try_with_capacity(capacity)
        .map_err(|_| EntryError::Malformed("header count"))?;
    let mut last: Option<HeaderName> = None;
    for _ in 0..count {
        let name_len = usize::from(r.u16("header name")?);
        let raw = r.take(name_len, "header name")?;
        let name = HeaderName::from_bytes(raw).map_err(|_| EntryError::Malformed("header name"))?;
        // from_bytes lower-cases; we only ever write canonical names, so
        // anything else was not written by us.
        if name.as_str().as_bytes() != raw {
            return Err(EntryError::Malformed("header name not canonical"));
        }
        // A HeaderMap yields a name's values together, so an encoding has
        // them together: one decoding, one encoding.
        if last.as_ref() != Some(&name) && headers.contains_key(&name) {
            return Err(EntryError::Malformed("header names not grouped"));
        }
        let value = HeaderValue::from_bytes(r.bytes32("header value")?)
            .map_err(|_| EntryError::Malformed("header value"))?;
        headers
            .try_append(name.clone(), value)
            .map_err(|_| EntryError::Malformed("header count"))?;
        last = Some(name);
    }
    if !r.buf.is_empty() {
        return Err(EntryError::Malformed("bytes after the last header"));
    }
    Ok(EntryMeta {
        key: key.to_owned(),
        status,
        headers,
        stored_at_unix_ms,
        initial_age_secs,
        lifetime_secs,
        stale_if_error_secs,
        immutable: flags & FLAG_IMMUTABLE != 0,
        release,
        file,
        body_len,
    })
}

/// One value holding the whole entry, for single-value stores (Redis).
/// `meta.body_len` must equal `body.len()`.
pub fn encode_whole(meta: &EntryMeta, body: &[u8]) -> Result<Vec<u8>, EntryError> {
    if meta.body_len != body.len() as u64 {
        return Err(EntryError::BodyLen {
            declared: meta.body_len,
            actual: body.len() as u64,
        });
    }
    let mut out = encode_meta(meta)?;
    let seed = KeyHash::of(&meta.key).chunk_seed();
    out.reserve(framed_body_len(meta.body_len) as usize);
    for (index, data) in body.chunks(CHUNK_LEN).enumerate() {
        out.extend_from_slice(&chunk_header(seed, index as u64, data));
        out.extend_from_slice(data);
    }
    Ok(out)
}

/// Decodes and verifies a whole entry made by [`encode_whole`]: magic,
/// version, metadata checksum, the key (must equal `expected_key`), the
/// exact total length and every chunk. A body in one chunk is a slice of
/// `bytes` (no copy).
pub fn decode_whole(bytes: &Bytes, expected_key: &str) -> Result<(EntryMeta, Bytes), EntryError> {
    let envelope = parse_envelope(bytes)?;
    let meta = decode_meta(bytes)?;
    if meta.key != expected_key {
        return Err(EntryError::KeyMismatch);
    }
    let head_len = envelope.head_len() as u64;
    let total = head_len + framed_body_len(meta.body_len);
    let len = bytes.len() as u64;
    if len < total {
        return Err(EntryError::Truncated {
            needed: total,
            got: len,
        });
    }
    if len > total {
        return Err(EntryError::Trailing(len - total));
    }
    let seed = KeyHash::of(&meta.key).chunk_seed();
    let count = meta.chunk_count();
    // The total length was checked, so every chunk is in range; `get`
    // keeps it that way should the arithmetic ever be wrong.
    let chunk_at = |index: u64| -> Result<(usize, &[u8]), EntryError> {
        let start = (head_len + chunk_offset(index)) as usize;
        let end = start + CHUNK_HEADER_LEN + chunk_len(meta.body_len, index) as usize;
        let framed = bytes.get(start..end).ok_or(EntryError::Truncated {
            needed: end as u64,
            got: len,
        })?;
        Ok((start, framed))
    };
    if count == 1 {
        let (start, framed) = chunk_at(0)?;
        let data = verify_chunk(seed, 0, meta.body_len, framed)?;
        let data_start = start + CHUNK_HEADER_LEN;
        return Ok((meta, bytes.slice(data_start..data_start + data.len())));
    }
    let mut body = BytesMut::with_capacity(meta.body_len as usize);
    for index in 0..count {
        let (_, framed) = chunk_at(index)?;
        body.extend_from_slice(verify_chunk(seed, index, meta.body_len, framed)?);
    }
    Ok((meta, body.freeze()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_meta(key: &str, body_len: u64) -> EntryMeta {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("set-thing", HeaderValue::from_static("one"));
        headers.append("set-thing", HeaderValue::from_static("two"));
        headers.append("x-raw", HeaderValue::from_bytes(b"caf\xe9 \xff").unwrap());
        EntryMeta {
            key: key.to_owned(),
            status: StatusCode::OK,
            headers,
            stored_at_unix_ms: 1_767_225_600_123,
            initial_age_secs: 5,
            lifetime_secs: 3600,
            stale_if_error_secs: 300,
            immutable: false,
            release: Some("abc123".into()),
            file: None,
            body_len,
        }
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn meta_round_trips_with_repeated_and_binary_headers() {
        let mut meta = sample_meta("https://example.com/a?b=c\0br", 12);
        meta.immutable = true;
        meta.file = Some(StoredFile {
            path: PathBuf::from(std::ffi::OsString::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/srv/f\xff"),
            )),
            len: 99,
            modified_unix_ns: 1_700_000_000_000_000_001,
        });
        let head = encode_meta(&meta).unwrap();
        let back = decode_meta(&head).unwrap();
        assert_eq!(back, meta);
        let values: Vec<_> = back.headers.get_all("set-thing").iter().collect();
        assert_eq!(values, ["one", "two"]);
        assert_eq!(back.headers["x-raw"].as_bytes(), b"caf\xe9 \xff");
        // Canonical: encoding the decoded meta gives the same bytes.
        assert_eq!(encode_meta(&back).unwrap(), head);
    }

    #[test]
    fn whole_round_trips_for_empty_small_and_multi_chunk_bodies() {
        for len in [
            0,
            1,
            100,
            CHUNK_LEN - 1,
            CHUNK_LEN,
            CHUNK_LEN + 1,
            3 * CHUNK_LEN + 17,
        ] {
            let body = body(len);
            let meta = sample_meta("k", len as u64);
            let bytes = Bytes::from(encode_whole(&meta, &body).unwrap());
            let head = encode_meta(&meta).unwrap().len() as u64;
            assert_eq!(bytes.len() as u64, head + framed_body_len(len as u64));
            let (m, b) = decode_whole(&bytes, "k").unwrap();
            assert_eq!(m, meta);
            assert_eq!(b, body, "len {len}");
            assert_eq!(decode_whole(&bytes, "k2"), Err(EntryError::KeyMismatch));
        }
    }

    #[test]
    fn encode_whole_refuses_a_wrong_body_length() {
        let meta = sample_meta("k", 3);
        assert_eq!(
            encode_whole(&meta, b"four"),
            Err(EntryError::BodyLen {
                declared: 3,
                actual: 4
            })
        );
    }

    #[test]
    fn every_single_byte_change_and_truncation_is_rejected() {
        let payload = body(300);
        let meta = sample_meta("key", 300);
        let good = encode_whole(&meta, &payload).unwrap();
        for i in 0..good.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= x;
                let res = decode_whole(&Bytes::from(bad), "key");
                assert!(res.is_err(), "byte {i} ^ {x:#x} accepted");
            }
        }
        for cut in 0..good.len() {
            assert!(decode_whole(&Bytes::copy_from_slice(&good[..cut]), "key").is_err());
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            decode_whole(&Bytes::from(longer), "key"),
            Err(EntryError::Trailing(1))
        );
    }

    #[test]
    fn swapped_chunks_do_not_verify() {
        let payload = vec![7u8; 2 * CHUNK_LEN];
        let meta = sample_meta("k", payload.len() as u64);
        let mut bytes = encode_whole(&meta, &payload).unwrap();
        // Identical data, so only the index in the checksum tells them apart.
        let head = encode_meta(&meta).unwrap().len();
        let step = CHUNK_LEN + CHUNK_HEADER_LEN;
        let first: Vec<u8> = bytes[head..head + CHUNK_HEADER_LEN].to_vec();
        let second: Vec<u8> = bytes[head + step..head + step + CHUNK_HEADER_LEN].to_vec();
        assert_ne!(first, second);
        bytes[head..head + CHUNK_HEADER_LEN].copy_from_slice(&second);
        bytes[head + step..head + step + CHUNK_HEADER_LEN].copy_from_slice(&first);
        assert_eq!(
            decode_whole(&Bytes::from(bytes), "k"),
            Err(EntryError::ChunkChecksum { index: 0 })
        );
        // The seed comes from the key: another key's chunk does not verify.
        let data = [1u8; 10];
        let framed = [
            &chunk_header(KeyHash::of("a").chunk_seed(), 0, &data)[..],
            &data,
        ]
        .concat();
        assert!(verify_chunk(KeyHash::of("a").chunk_seed(), 0, 10, &framed).is_ok());
        assert!(verify_chunk(KeyHash::of("b").chunk_seed(), 0, 10, &framed).is_err());
    }

    /// Re-signs a head as another version, as a future release would.
    pub(crate) fn as_version(head: &[u8], version: u16) -> Vec<u8> {
        let mut out = head.to_vec();
        out[4..6].copy_from_slice(&version.to_le_bytes());
        let crc = meta_crc(&out[..12], &out[HEADER_LEN..]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn another_version_is_told_apart_from_damage() {
        let head = encode_meta(&sample_meta("k", 0)).unwrap();
        let v2 = as_version(&head, 2);
        let err = decode_meta(&v2).unwrap_err();
        assert_eq!(err, EntryError::Version(2));
        assert!(err.is_other_version());
        let mut damaged = head.clone();
        damaged[4] ^= 3;
        assert_eq!(decode_meta(&damaged), Err(EntryError::MetaChecksum));
    }

    #[test]
    fn lying_lengths_fail_without_allocating() {
        let mut head = encode_meta(&sample_meta("k", 0)).unwrap();
        head[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_meta(&head),
            Err(EntryError::MetaLen(u64::from(u32::MAX)))
        );
        // A valid checksum over a metadata block whose inner lengths lie.
        let mut meta = vec![0xffu8; 64];
        meta[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut entry = Vec::new();
        entry.extend_from_slice(&MAGIC);
        entry.extend_from_slice(&VERSION.to_le_bytes());
        entry.extend_from_slice(&0u16.to_le_bytes());
        entry.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        let crc = meta_crc(&entry[..12], &meta);
        entry.extend_from_slice(&crc.to_le_bytes());
        entry.extend_from_slice(&meta);
        assert_eq!(decode_meta(&entry), Err(EntryError::Malformed("key")));
        assert_eq!(
            parse_envelope(b"TH"),
            Err(EntryError::Truncated { needed: 16, got: 2 })
        );
        assert_eq!(parse_envelope(b"xx"), Err(EntryError::Magic));
        assert_eq!(
            parse_envelope(b""),
            Err(EntryError::Truncated { needed: 16, got: 0 })
        );
    }

    #[test]
    fn upper_case_header_names_are_not_ours() {
        let mut meta = sample_meta("k", 0);
        meta.headers = HeaderMap::new();
        meta.headers.insert("x-a", HeaderValue::from_static("1"));
        let mut head = encode_meta(&meta).unwrap();
        let at = head.windows(3).position(|w| w == b"x-a").unwrap();
        head[at] = b'X';
        let crc = meta_crc(&head[..12], &head[HEADER_LEN..]);
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_meta(&head),
            Err(EntryError::Malformed("header name not canonical"))
        );
    }

    #[test]
    fn interleaved_header_names_are_not_ours() {
        let mut meta = sample_meta("k", 0);
        meta.headers = HeaderMap::new();
        meta.headers.append("x-a", HeaderValue::from_static("1"));
        meta.headers.append("x-a", HeaderValue::from_static("2"));
        meta.headers.append("x-b", HeaderValue::from_static("3"));
        let mut head = encode_meta(&meta).unwrap();
        // x-a 1, x-a 2, x-b 3 -> x-a 1, x-b 2, x-b 3 would be fine; make it
        // x-a 1, x-b 2, x-a 3 instead.
        let second = head
            .windows(3)
            .enumerate()
            .filter(|(_, w)| *w == b"x-a")
            .nth(1)
            .unwrap()
            .0;
        let third = head.windows(3).position(|w| w == b"x-b").unwrap();
        head[second + 2] = b'b';
        head[third + 2] = b'a';
        let crc = meta_crc(&head[..12], &head[HEADER_LEN..]);
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_meta(&head),
            Err(EntryError::Malformed("header names not grouped"))
        );
    }

    #[test]
    fn freshness_times_use_the_wall_clock_and_saturate() {
        let meta = sample_meta("k", 0);
        assert_eq!(
            meta.fresh_until_unix_ms(),
            meta.stored_at_unix_ms + 3595 * 1000
        );
        assert_eq!(
            meta.usable_until_unix_ms(),
            meta.stored_at_unix_ms + 3895 * 1000
        );
        assert_eq!(meta.age_secs(meta.stored_at_unix_ms + 10_999), 15);
        assert_eq!(meta.age_secs(0), 5);
        let mut huge = meta.clone();
        huge.lifetime_secs = u64::MAX;
        assert_eq!(huge.usable_until_unix_ms(), u64::MAX);
    }

    #[test]
    fn key_hash_hex_round_trips_and_rejects_non_canonical_names() {
        let h = KeyHash::of("abc");
        assert_eq!(
            h.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyHash::parse_hex(&h.hex()), Some(h));
        assert_eq!(KeyHash::parse_hex(&h.hex().to_uppercase()), None);
        assert_eq!(KeyHash::parse_hex("ab"), None);
    }
}
