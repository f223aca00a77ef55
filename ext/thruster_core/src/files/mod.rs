//! Serving a representation we hold ourselves: a cached body or an
//! X-Sendfile file.
//!
//! Both paths need the same HTTP semantics, so they live here as pure
//! functions over `http` types: preconditions ([`conditional`]), Range and
//! multipart/byteranges ([`range`]), and, for files only, where a path may
//! point ([`jail`]), precompressed variants ([`siblings`]) and a content type
//! ([`mime`]). Only `jail` and `siblings` touch the filesystem.
//!
//! The order a caller applies them in (RFC 9110 §13.2.2):
//! 1. [`conditional::evaluate`] → 304 / 412, or proceed;
//! 2. [`range::select`] (GET + Range + If-Range) → 200, 206 or 416.

pub mod conditional;
pub mod jail;
pub mod range;
pub mod siblings;
