//! The stored cache entry codec (`entry::decode_meta`, `entry::decode_whole`)
//! used by the disk tier and the Redis tier.
//!
//! Invariants: no input makes decoding panic; whatever decodes is canonical
//! (encoding it again gives the same bytes); an entry built from the input
//! round-trips exactly; and that entry changed in any way (bytes flipped,
//! inserted, removed, or cut off) is rejected or decodes to exactly the
//! original.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use thruster_core::pipeline::cache::entry::{
    decode_meta, decode_whole, encode_meta, encode_whole, EntryMeta, StoredFile, CHUNK_LEN,
};

fn u64_at(spec: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in spec.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_le_bytes(b)
}

/// An entry described by `spec`: fixed fields from its first 40 bytes,
/// then NUL-separated pieces: key, release, file path, header names and
/// values in turn.
fn build(spec: &[u8]) -> (EntryMeta, Vec<u8>) {
    let flags = spec.get(1).copied().unwrap_or(0);
    let status = StatusCode::from_u16(100 + u16::from(spec.first().copied().unwrap_or(100)) * 3)
        .expect("100..=865 are valid status codes");
    let small = u64_at(spec, 2) & 0xffff;
    // Now and then a body of up to three chunks.
    let body_len = if flags & 8 != 0 {
        small * 12 % (3 * CHUNK_LEN as u64 + 7)
    } else {
        small % 4096
    };
    let mut pieces = spec.get(40..).unwrap_or_default().split(|&b| b == 0);
    let key = String::from_utf8_lossy(pieces.next().unwrap_or_default()).into_owned();
    let release = pieces
        .next()
        .map(|r| String::from_utf8_lossy(r).into_owned());
    let path = pieces.next().map(|p| PathBuf::from(OsStr::from_bytes(p)));
    let mut headers = HeaderMap::new();
    while let (Some(name), Some(value)) = (pieces.next(), pieces.next()) {
        let name: Vec<u8> = name
            .iter()
            .map(|b| b"abcdefghijklmnopqrstuvwxyz0123456789-"[usize::from(*b) % 37])
            .collect();
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let meta = EntryMeta {
        key,
        status,
        headers,
        stored_at_unix_ms: u64_at(spec, 8),
        initial_age_secs: u64_at(spec, 16),
        lifetime_secs: u64_at(spec, 24),
        stale_if_error_secs: u64_at(spec, 32),
        immutable: flags & 1 != 0,
        release: release.filter(|_| flags & 2 != 0),
        file: path.filter(|_| flags & 4 != 0).map(|path| StoredFile {
            path,
            len: small,
            modified_unix_ns: u64_at(spec, 9),
        }),
        body_len,
    };
    let body = (0..body_len)
        .map(|i| {
            spec.get(i as usize % spec.len().max(1))
                .copied()
                .unwrap_or(0)
                ^ (i >> 8) as u8
        })
        .collect();
    (meta, body)
}

/// Applies up to 8 edits, 5 bytes each: kind, then a position.
fn mutate(good: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut out = good.to_vec();
    for edit in edits.chunks_exact(5).take(8) {
        let pos = u32::from_le_bytes([edit[1], edit[2], edit[3], edit[4]]) as usize;
        match edit[0] % 4 {
            0 if !out.is_empty() => {
                let at = pos % out.len();
                out[at] ^= (edit[0] >> 2) | 1;
            }
            1 => out.truncate(pos % (out.len() + 1)),
            2 => out.insert(pos % (out.len() + 1), edit[0]),
            3 if !out.is_empty() => {
                out.remove(pos % out.len());
            }
            _ => {}
        }
    }
    out
}

// Input: arbitrary bytes are first decoded as they are; then the first
// byte n says how many of the next bytes describe an entry (see `build`),
// and the rest are edits applied to its encoding (see `mutate`).
fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes: no panic; anything accepted is canonical.
    if let Ok(meta) = decode_meta(data) {
        let head = encode_meta(&meta).expect("a decoded meta encodes");
        assert_eq!(
            data.get(..head.len()),
            Some(&head[..]),
            "meta not canonical"
        );
        let whole = Bytes::copy_from_slice(data);
        if let Ok((meta, body)) = decode_whole(&whole, &meta.key) {
            assert_eq!(encode_whole(&meta, &body).expect("encodes"), data);
        }
    }
    let _ = decode_whole(&Bytes::copy_from_slice(data), "");

    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (spec, edits) = rest.split_at(usize::from(n).min(rest.len()));
    let (meta, body) = build(spec);
    let good = encode_whole(&meta, &body).expect("a built entry encodes");
    let (m, b) = decode_whole(&Bytes::from(good.clone()), &meta.key).expect("round trip");
    assert_eq!(m, meta);
    assert_eq!(b, body);
    if meta.key != "other" {
        assert!(decode_whole(&Bytes::from(good.clone()), "other").is_err());
    }

    let bad = mutate(&good, edits);
    if bad != good {
        if let Ok((m, b)) = decode_whole(&Bytes::from(bad), &meta.key) {
            assert_eq!(m, meta, "a changed entry decoded to other metadata");
            assert_eq!(b, body, "a changed entry decoded to another body");
        }
    }
    let head = encode_meta(&meta).expect("encodes");
    let bad_head = mutate(&head, edits);
    if bad_head != head {
        if let Ok(m) = decode_meta(&bad_head) {
            assert_eq!(m, meta, "a changed head decoded to other metadata");
        }
    }
});
