//! Content-Type by file extension, for X-Sendfile responses that arrive
//! without one.
//!
//! A short table of what web applications actually serve, rather than the
//! `mime_guess` crate: its thousand-entry table would add two crates for
//! types no Rails app sends, and it still answers the obsolete
//! `application/javascript` for `.js`.

use std::path::Path;

/// For anything we do not know: the type that makes browsers download
/// rather than guess (RFC 9110 §8.3 lets a recipient treat it as opaque data).
pub const DEFAULT: &str = "application/octet-stream";

/// Lower-case extension → type. Textual types carry `charset=utf-8` because
/// that is what asset pipelines write and browsers would otherwise guess.
const TYPES: &[(&str, &str)] = &[
    ("avif", "image/avif"),
    ("css", "text/css; charset=utf-8"),
    ("csv", "text/csv; charset=utf-8"),
    ("gif", "image/gif"),
    ("gz", "application/gzip"),
    ("htm", "text/html; charset=utf-8"),
    ("html", "text/html; charset=utf-8"),
    ("ico", "image/x-icon"),
    ("jpeg", "image/jpeg"),
    ("jpg", "image/jpeg"),
    // RFC 9239: text/javascript is the one registered type for JavaScript.
    ("js", "text/javascript; charset=utf-8"),
    ("json", "application/json"),
    ("map", "application/json"),
    ("md", "text/markdown; charset=utf-8"),
    ("mjs", "text/javascript; charset=utf-8"),
    ("mp3", "audio/mpeg"),
    ("mp4", "video/mp4"),
    ("otf", "font/otf"),
    ("pdf", "application/pdf"),
    ("png", "image/png"),
    ("svg", "image/svg+xml"),
    ("ttf", "font/ttf"),
    ("txt", "text/plain; charset=utf-8"),
    ("wasm", "application/wasm"),
    ("webm", "video/webm"),
    ("webp", "image/webp"),
    ("woff", "font/woff"),
    ("woff2", "font/woff2"),
    // RFC 7303 prefers application/xml: text/xml's charset default misleads.
    ("xml", "application/xml"),
    ("zip", "application/zip"),
];

/// The Content-Type for a file, from its last extension, case-insensitively.
///
/// For a precompressed sibling pass the original's path: `app.js.gz` served
/// with `Content-Encoding: gzip` is still JavaScript.
pub fn content_type_for(path: &Path) -> &'static str {
    path.extension()
        .and_then(|ext| ext.to_str())
        .and_then(|ext| {
            TYPES
                .iter()
                .find(|(known, _)| known.eq_ignore_ascii_case(ext))
        })
        .map_or(DEFAULT, |&(_, ty)| ty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// RFC 9110 §8.3 Content-Type for each extension we know, and the fallback.
    #[test]
    fn types_by_extension() {
        let cases = [
            ("index.html", "text/html; charset=utf-8"),
            ("INDEX.HTM", "text/html; charset=utf-8"),
            ("app.css", "text/css; charset=utf-8"),
            ("app-3f2a.js", "text/javascript; charset=utf-8"),
            ("module.mjs", "text/javascript; charset=utf-8"),
            ("app.js.map", "application/json"),
            ("data.json", "application/json"),
            ("logo.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.JPG", "image/jpeg"),
            ("a.jpeg", "image/jpeg"),
            ("a.gif", "image/gif"),
            ("a.webp", "image/webp"),
            ("a.avif", "image/avif"),
            ("favicon.ico", "image/x-icon"),
            ("robots.txt", "text/plain; charset=utf-8"),
            ("sitemap.xml", "application/xml"),
            ("invoice.pdf", "application/pdf"),
            ("f.woff", "font/woff"),
            ("f.woff2", "font/woff2"),
            ("f.ttf", "font/ttf"),
            ("f.otf", "font/otf"),
            ("m.wasm", "application/wasm"),
            ("v.mp4", "video/mp4"),
            ("v.webm", "video/webm"),
            ("s.mp3", "audio/mpeg"),
            ("export.zip", "application/zip"),
            ("app.js.gz", "application/gzip"),
            ("report.csv", "text/csv; charset=utf-8"),
            ("README.md", "text/markdown; charset=utf-8"),
            ("/srv/app/public/a.b/c.css", "text/css; charset=utf-8"),
            ("Makefile", DEFAULT),
            (".htaccess", DEFAULT),
            ("archive.tar.xz", DEFAULT),
            ("trailing.", DEFAULT),
        ];
        for (path, want) in cases {
            assert_eq!(content_type_for(Path::new(path)), want, "{path}");
        }
        for (_, ty) in TYPES {
            HeaderValue::from_static(ty); // panics on an invalid value
        }
    }
}
