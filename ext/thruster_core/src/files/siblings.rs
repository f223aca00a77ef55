//! Precompressed variants of a file: `app.js.br`, `app.js.zst`, `app.js.gz`
//! next to `app.js`, as asset pipelines write them.

use std::ffi::OsString;
use std::path::PathBuf;

use super::jail::{resolve, ResolvedFile};

/// A precompressed variant chosen for a response.
#[derive(Debug)]
pub struct Sibling {
    /// The Content-Encoding to send: `br`, `zstd` or `gzip`.
    pub coding: &'static str,
    pub file: ResolvedFile,
}

/// The suffix each content-coding's files carry, and the token we send back.
/// `x-gzip` is gzip's old alias (RFC 9110 §8.4.1.3).
fn suffix(token: &str) -> Option<(&'static str, &'static str)> {
    const KNOWN: [(&str, &str, &str); 4] = [
        ("br", ".br", "br"),
        ("zstd", ".zst", "zstd"),
        ("gzip", ".gz", "gzip"),
        ("x-gzip", ".gz", "gzip"),
    ];
    KNOWN
        .iter()
        .find(|(t, _, _)| t.eq_ignore_ascii_case(token))
        .map(|&(_, suffix, coding)| (suffix, coding))
}

/// The first precompressed sibling of `original` the client accepts.
///
/// `accepted` lists content-codings in the client's order of preference
/// (already negotiated from Accept-Encoding, `identity` and `q=0` removed);
/// unknown tokens are skipped. A sibling is used only if it passes the same
/// jail as the original ([`resolve`] with `roots`: a `.gz` symlink must not
/// lead out of the roots), is a regular file, and is not older than the
/// original — an older one was left behind by a previous build and would
/// serve stale content.
///
/// Siblings are looked for next to the canonical path, so for a symlinked
/// file they sit beside its target. The response keeps the original's
/// Content-Type and must carry `Vary: Accept-Encoding`.
pub fn precompressed_sibling(
    original: &ResolvedFile,
    accepted: &[&str],
    roots: &[PathBuf],
) -> Option<Sibling> {
    accepted.iter().find_map(|token| {
        let (suffix, coding) = suffix(token.trim())?;
        let mut path = OsString::from(original.path.as_os_str());
        path.push(suffix);
        let file = resolve(PathBuf::from(path), roots).ok()?;
        (file.modified >= original.modified).then_some(Sibling { coding, file })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_support::TempDir;
    use std::fs::File;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    /// The coding and the sibling's file name we expect, if any.
    type Choice<'a> = Option<(&'a str, &'a str)>;

    /// RFC 9110 §12.5.3 Accept-Encoding preference and §8.4 Content-Encoding tokens.
    #[test]
    fn picks_the_preferred_fresh_sibling() {
        let t = TempDir::new("siblings");
        let root = t.0.join("public");
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let touch = |rel: &str, body: &[u8], mtime: SystemTime| {
            let p = t.file(rel, body);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            p
        };
        let newer = base + Duration::from_secs(10);
        let older = base - Duration::from_secs(10);

        touch("public/app.js", b"original", base);
        touch("public/app.js.br", b"br", newer);
        touch("public/app.js.gz", b"gz", base); // same mtime: fresh enough
        touch("public/app.js.zst", b"zst", older); // stale
        touch("public/only-gz.css", b"css", base);
        touch("public/only-gz.css.gz", b"gz", newer);
        touch("public/dir.txt", b"txt", base);
        std::fs::create_dir(root.join("dir.txt.gz")).unwrap();
        touch("public/escape.txt", b"txt", base);
        touch("secret", b"secret", newer);
        symlink(t.0.join("secret"), root.join("escape.txt.gz")).unwrap();

        let roots = vec![root.clone()];
        let resolved = |name: &str| resolve(root.join(name), &roots).unwrap();
        #[rustfmt::skip]
        let cases: &[(&str, &str, &[&str], Choice)] = &[
            ("first preference wins", "app.js", &["br", "gzip"], Some(("br", "app.js.br"))),
            ("client order, not ours", "app.js", &["gzip", "br"], Some(("gzip", "app.js.gz"))),
            ("stale sibling skipped", "app.js", &["zstd", "gzip"], Some(("gzip", "app.js.gz"))),
            ("only a stale sibling", "app.js", &["zstd"], None),
            ("missing sibling skipped", "only-gz.css", &["br", "zstd", "gzip"], Some(("gzip", "only-gz.css.gz"))),
            ("tokens are case-insensitive, x-gzip is gzip", "only-gz.css", &["X-GZIP"], Some(("gzip", "only-gz.css.gz"))),
            ("unknown codings ignored", "app.js", &["deflate", "identity", "compress"], None),
            ("nothing accepted", "app.js", &[], None),
            ("directory sibling refused", "dir.txt", &["gzip"], None),
            ("sibling symlink leaving the roots refused", "escape.txt", &["gzip"], None),
        ];
        for (name, file, accepted, want) in cases {
            let got = precompressed_sibling(&resolved(file), accepted, &roots)
                .map(|s| (s.coding, s.file.path));
            let want = want.map(|(coding, rel)| (coding, root.join(rel)));
            assert_eq!(got, want, "{name}");
        }
    }
}
