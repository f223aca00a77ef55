//! X-Sendfile path handling: `jail::resolve` with arbitrary path bytes
//! against a fixed root holding files, a directory, a FIFO and symlinks that
//! point inside and outside; `config::parse_roots` over arbitrary lists.
//!
//! Invariants: no panic, never a hang (a FIFO is never opened); an accepted
//! path is canonical, lies under the root component by component, is a
//! regular file, and the open handle is that file.
#![no_main]

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use thruster_core::config::parse_roots;
use thruster_core::files::jail::resolve;

struct Fixture {
    /// Canonical; the only allowed root.
    root: PathBuf,
    /// A sibling directory sharing the root's name as a prefix.
    outside: PathBuf,
}

/// Made once per process under the temp dir:
///
/// ```text
/// <tmp>/thruster-fuzz-jail-<pid>/root/{a.txt, b.css, sub/c.js, sub/.hidden,
///     fifo, link-in -> a.txt, link-sub -> sub, link-out -> ../root2/secret,
///     link-out-dir -> ../root2, link-abs -> /etc/hostname, loop -> loop}
/// <tmp>/thruster-fuzz-jail-<pid>/root2/secret
/// ```
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        remove_stale_fixtures();
        let base = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let root = base.join("root");
        let outside = base.join("root2");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("a.txt"), "a").unwrap();
        fs::write(root.join("b.css"), "body{}").unwrap();
        fs::write(root.join("sub/c.js"), "c()").unwrap();
        fs::write(root.join("sub/.hidden"), "").unwrap();
        fs::write(outside.join("secret"), "secret").unwrap();
        let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        symlink("a.txt", root.join("link-in")).unwrap();
        symlink("sub", root.join("link-sub")).unwrap();
        symlink("../root2/secret", root.join("link-out")).unwrap();
        symlink("../root2", root.join("link-out-dir")).unwrap();
        symlink("/etc/hostname", root.join("link-abs")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        Fixture {
            root: fs::canonicalize(&root).unwrap(),
            outside: fs::canonicalize(&outside).unwrap(),
        }
    })
}

const PREFIX: &str = "thruster-fuzz-jail-";

/// Fixtures of earlier runs whose process is gone.
fn remove_stale_fixtures() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn check(path: &Path) {
    let f = fixture();
    let roots = [f.root.clone()];
    let Ok(resolved) = resolve(path, &roots) else {
        return;
    };
    let canonical = fs::canonicalize(path).expect("an accepted path exists");
    assert_eq!(resolved.path, canonical, "{path:?}");
    assert!(
        resolved.path.starts_with(&f.root),
        "{path:?} escaped to {:?}",
        resolved.path
    );
    assert!(!resolved.path.starts_with(&f.outside));
    let meta = fs::symlink_metadata(&resolved.path).unwrap();
    assert!(meta.is_file(), "{path:?} is not a regular file");
    let open = resolved.file.metadata().unwrap();
    assert!(open.is_file());
    assert_eq!((open.dev(), open.ino()), (meta.dev(), meta.ino()));
    assert_eq!(resolved.len, meta.len());
}

// Input: `raw:<path>` (as given: absolute, or relative to the working
// directory), `root:<path>` (joined to the root, as an app joining a user's
// file name would), `outside:<path>` (joined to the outside sibling, to
// climb back in) or `roots:<X_SENDFILE_ROOTS value>`. Anything else is a
// raw path.
fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (mode, rest) = match data.iter().position(|&b| b == b':') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let path = OsStr::from_bytes(rest);
    match mode {
        b"root" => check(&f.root.join(path)),
        b"outside" => check(&f.outside.join(path)),
        b"roots" => {
            if let Ok(Ok(roots)) = std::str::from_utf8(rest).map(parse_roots) {
                assert!(!roots.is_empty());
                for r in &roots {
                    assert!(r.is_absolute() && r.is_dir());
                    assert_eq!(&fs::canonicalize(r).unwrap(), r);
                }
                let mut deduped = roots.clone();
                deduped.sort();
                deduped.dedup();
                assert_eq!(deduped.len(), roots.len());
            }
        }
        b"raw" => check(Path::new(path)),
        _ => check(Path::new(OsStr::from_bytes(data))),
    }
});
