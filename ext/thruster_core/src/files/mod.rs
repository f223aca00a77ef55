//! Serving a representation we hold ourselves: a cached body or an
//! X-Sendfile file.
//!
//! Both paths need the same HTTP semantics, so they live here as pure
//! functions over `http` types: preconditions ([`conditional`]), Range and
//! multipart/byteranges ([`range`]), and, for files only, where a path may
//! point ([`jail`]), precompressed variants ([`siblings`]) and a content type
//! ([`mime`]). Only `jail` and `siblings` touch the filesystem.
//!
//! The order a caller applies them in:
//! 1. for a file, [`jail::resolve`] (a refusal is logged and answered with an
//!    error), then [`siblings::precompressed_sibling`] and
//!    [`mime::content_type_for`]; validators from
//!    [`conditional::weak_etag_for`] and the file's mtime;
//! 2. [`conditional::evaluate`] → 304 / 412, or proceed (RFC 9110 §13.2.2);
//! 3. [`range::select`] (GET + Range + If-Range) → 200, 206 or 416, and
//!    [`range::Multipart`] to build a multi-range 206 body.
//!
//! Steps 2 and 3, and HEAD, are [`respond::respond`]: the one way cache hits
//! and X-Sendfile serve what they hold.

pub mod body;
pub mod conditional;
pub mod jail;
pub mod mime;
pub mod range;
pub mod respond;
pub mod siblings;

pub use conditional::{Precondition, Validators};
pub use jail::{FileRefusal, ResolvedFile};
pub use range::{ByteRange, RangeOutcome};
