//! Precompressed variants of a file: `app.js.br`, `app.js.zst`, `app.js.gz`
//! next to `app.js`, as asset pipelines write them.

use std::ffi::OsString;
use std::path::PathBuf;

use super::jail::{resolve, ResolvedFile};
use crate::http::coding::Coding;

/// A precompressed variant chosen for a response.
#[derive(Debug)]
pub struct Sibling {
    /// The Content-Encoding to send.
    pub coding: Coding,
    pub file: ResolvedFile,
}

/// The first precompressed sibling of `original` the client accepts.
///
/// `accepted` lists the codings the client accepts, in the order to try
/// them (already negotiated from Accept-Encoding). A sibling is used only if it passes the same
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
    accepted: &[Coding],
    roots: &[PathBuf],
) -> Option<Sibling> {
    accepted.iter().find_map(|&coding| {
        let mut path = OsString::from(original.path.as_os_str());
        path.push(coding.suffix());
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
    type Choice<'a> = Option<(Coding, &'a str)>;

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
        use Coding::{Brotli, Gzip, Zstd};
        #[rustfmt::skip]
        let cases: &[(&str, &str, &[Coding], Choice)] = &[
            ("first preference wins", "app.js", &[Brotli, Gzip], Some((Brotli, "app.js.br"))),
            ("client order, not ours", "app.js", &[Gzip, Brotli], Some((Gzip, "app.js.gz"))),
            ("stale sibling skipped", "app.js", &[Zstd, Gzip], Some((Gzip, "app.js.gz"))),
            ("only a stale sibling", "app.js", &[Zstd], None),
            ("missing sibling skipped", "only-gz.css", &[Brotli, Zstd, Gzip], Some((Gzip, "only-gz.css.gz"))),
            ("nothing accepted", "app.js", &[], None),
            ("directory sibling refused", "dir.txt", &[Gzip], None),
            ("sibling symlink leaving the roots refused", "escape.txt", &[Gzip], None),
        ];
        for (name, file, accepted, want) in cases {
            let got = precompressed_sibling(&resolved(file), accepted, &roots)
                .map(|s| (s.coding, s.file.path));
            let want = want.map(|(coding, rel)| (coding, root.join(rel)));
            assert_eq!(got, want, "{name}");
        }
    }
}
