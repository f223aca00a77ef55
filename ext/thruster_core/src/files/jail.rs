//! Where an X-Sendfile path may point.
//!
//! The path comes from the application's response, so a bug there (a user
//! supplied file name joined to a directory, say) must not turn into reading
//! `/etc/shadow`. A path is served only if, with every symlink and `..`
//! resolved, it names a regular file under one of the allowed roots.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A file that passed [`resolve`], already open.
///
/// Opened here, not by the caller, so what was checked is what gets read:
/// size and mtime come from the open handle, and the open refuses a final
/// symlink swapped in after the check.
#[derive(Debug)]
pub struct ResolvedFile {
    /// Canonical: absolute, no symlinks, no `.` or `..`.
    pub path: PathBuf,
    pub len: u64,
    pub modified: SystemTime,
    /// Read-only. Opened with `O_NONBLOCK`, which changes nothing for a
    /// regular file but kept a FIFO swapped in at the last moment from
    /// blocking the open.
    pub file: crate::sys::OwnedFile,
}

/// Why an X-Sendfile path was not served. The Display is the log line.
#[derive(Debug, thiserror::Error)]
pub enum FileRefusal {
    #[error("X-Sendfile path {}: no such file", .path.display())]
    NotFound { path: PathBuf },
    #[error(
        "X-Sendfile path {} resolves to {}, outside the allowed roots ({}); add its directory to X_SENDFILE_ROOTS to serve it",
        .path.display(),
        .resolved.display(),
        join(.roots)
    )]
    OutsideRoots {
        path: PathBuf,
        resolved: PathBuf,
        roots: Vec<PathBuf>,
    },
    #[error("X-Sendfile path {} is not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("X-Sendfile path {}: permission denied", .path.display())]
    PermissionDenied { path: PathBuf },
    #[error("X-Sendfile path {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn join(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "none".to_string();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FileRefusal {
    fn from_io(path: &Path, err: io::Error) -> FileRefusal {
        let path = path.to_path_buf();
        match err.kind() {
            // ENOTDIR: a component of the path is a file ("a.txt/b").
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
                FileRefusal::NotFound { path }
            }
            io::ErrorKind::PermissionDenied => FileRefusal::PermissionDenied { path },
            _ => FileRefusal::Io { path, source: err },
        }
    }
}

/// Resolves an X-Sendfile path and opens it if it is a regular file under one
/// of `roots`.
///
/// A relative `path` is relative to the process's working directory, which is
/// also the application's when Puma runs under us. Roots need not be
/// canonical; containment is checked component by component on canonical
/// paths, so `/srv/app2/x` is not under `/srv/app`.
pub fn resolve(path: impl AsRef<Path>, roots: &[PathBuf]) -> Result<ResolvedFile, FileRefusal> {
    let requested = path.as_ref();
    if requested.as_os_str().is_empty() {
        return Err(FileRefusal::NotFound {
            path: PathBuf::new(),
        });
    }
    let canonical = fs::canonicalize(requested).map_err(|e| FileRefusal::from_io(requested, e))?;
    if !roots.iter().any(|root| is_under(&canonical, root)) {
        return Err(FileRefusal::OutsideRoots {
            path: requested.to_path_buf(),
            resolved: canonical,
            roots: roots.to_vec(),
        });
    }
    // Checked before opening so a directory or FIFO is never opened at all.
    let meta = fs::metadata(&canonical).map_err(|e| FileRefusal::from_io(requested, e))?;
    if !meta.is_file() {
        return Err(FileRefusal::NotAFile {
            path: requested.to_path_buf(),
        });
    }
    let file = crate::sys::open_read(&canonical, libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .map_err(|e| FileRefusal::from_io(requested, e))?;
    let meta = file
        .metadata()
        .map_err(|e| FileRefusal::from_io(requested, e))?;
    if !meta.is_file() {
        return Err(FileRefusal::NotAFile {
            path: requested.to_path_buf(),
        });
    }
    let modified = meta
        .modified()
        .map_err(|e| FileRefusal::from_io(requested, e))?;
    Ok(ResolvedFile {
        path: canonical,
        len: meta.len(),
        modified,
        file,
    })
}

/// `canonical` must already be canonical. The root is compared as given
/// first (roots from `config::parse_roots` and `config::default_roots` are canonical),
/// and canonicalized only if that fails. The fast path cannot wrongly accept:
/// a canonical path contains no `..` and passes through no symlink, so it can
/// only start with a root that names the same directory.
fn is_under(canonical: &Path, root: &Path) -> bool {
    canonical.starts_with(root)
        || fs::canonicalize(root).is_ok_and(|root| canonical.starts_with(root))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::test_support::TempDir;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;

    /// What `resolve` answered, reduced to something a table can hold.
    #[derive(Debug, PartialEq)]
    enum Got {
        Ok(PathBuf, u64),
        NotFound,
        Outside,
        NotAFile,
        Denied,
        Io,
    }

    fn got(r: Result<ResolvedFile, FileRefusal>) -> Got {
        match r {
            Ok(f) => Got::Ok(f.path, f.len),
            Err(FileRefusal::NotFound { .. }) => Got::NotFound,
            Err(FileRefusal::OutsideRoots { .. }) => Got::Outside,
            Err(FileRefusal::NotAFile { .. }) => Got::NotAFile,
            Err(FileRefusal::PermissionDenied { .. }) => Got::Denied,
            Err(FileRefusal::Io { .. }) => Got::Io,
        }
    }

    #[test]
    fn resolve_confines_paths_to_roots() {
        let t = TempDir::new("jail");
        let app = t.0.join("app");
        let file = t.file("app/public/a.txt", b"hello");
        let nested = t.file("app/public/deep/b.txt", b"hi");
        let secret = t.file("app2/secret.txt", b"secret");
        let outside = t.file("elsewhere/c.txt", b"abc");
        symlink(&file, app.join("link-in")).unwrap();
        symlink(&outside, app.join("link-out")).unwrap();
        symlink(t.0.join("elsewhere"), app.join("dir-out")).unwrap();
        symlink(t.0.join("app/missing"), app.join("dangling")).unwrap();
        let fifo = app.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        symlink(&app, t.0.join("app-link")).unwrap();

        // The same file reached relative to the working directory: climb to
        // `/` with `..` and walk down again (no set_current_dir: tests share it).
        let cwd = std::env::current_dir().unwrap();
        let up = "../".repeat(cwd.components().count() - 1);
        let relative = format!("{up}{}", file.strip_prefix("/").unwrap().display());

        let roots = vec![app.clone()];
        let s = |p: &Path| p.display().to_string();
        let cases: Vec<(&str, String, Vec<PathBuf>, Got)> = vec![
            (
                "file under the root",
                s(&file),
                roots.clone(),
                Got::Ok(file.clone(), 5),
            ),
            (
                "nested file",
                s(&nested),
                roots.clone(),
                Got::Ok(nested.clone(), 2),
            ),
            (
                "relative to the cwd",
                relative,
                roots.clone(),
                Got::Ok(file.clone(), 5),
            ),
            (
                "`..` inside the root",
                format!("{}/public/deep/../a.txt", s(&app)),
                roots.clone(),
                Got::Ok(file.clone(), 5),
            ),
            (
                "symlink inside the root",
                s(&app.join("link-in")),
                roots.clone(),
                Got::Ok(file.clone(), 5),
            ),
            (
                "symlink leaving the root",
                s(&app.join("link-out")),
                roots.clone(),
                Got::Outside,
            ),
            (
                "symlinked directory leaving the root",
                s(&app.join("dir-out/c.txt")),
                roots.clone(),
                Got::Outside,
            ),
            (
                "`..` leaving the root",
                format!("{}/../elsewhere/c.txt", s(&app)),
                roots.clone(),
                Got::Outside,
            ),
            (
                "string prefix is not a parent",
                s(&secret),
                roots.clone(),
                Got::Outside,
            ),
            ("no roots at all", s(&file), vec![], Got::Outside),
            (
                "second root",
                s(&outside),
                vec![app.clone(), t.0.join("elsewhere")],
                Got::Ok(outside.clone(), 3),
            ),
            (
                "root given through a symlink",
                s(&file),
                vec![t.0.join("app-link")],
                Got::Ok(file.clone(), 5),
            ),
            (
                "root given with `..`",
                s(&file),
                vec![t.0.join("app/public/..")],
                Got::Ok(file.clone(), 5),
            ),
            (
                "relative root",
                s(&file),
                vec![PathBuf::from(format!(
                    "{up}{}",
                    app.strip_prefix("/").unwrap().display()
                ))],
                Got::Ok(file.clone(), 5),
            ),
            (
                "directory",
                s(&app.join("public")),
                roots.clone(),
                Got::NotAFile,
            ),
            ("the root itself", s(&app), roots.clone(), Got::NotAFile),
            ("FIFO", s(&fifo), roots.clone(), Got::NotAFile),
            (
                "missing",
                s(&app.join("public/nope.txt")),
                roots.clone(),
                Got::NotFound,
            ),
            (
                "dangling symlink",
                s(&app.join("dangling")),
                roots.clone(),
                Got::NotFound,
            ),
            (
                "file used as a directory",
                format!("{}/x", s(&file)),
                roots.clone(),
                Got::NotFound,
            ),
            ("empty path", String::new(), roots.clone(), Got::NotFound),
            (
                "NUL in the path",
                format!("{}\0", s(&file)),
                roots.clone(),
                Got::Io,
            ),
        ];
        for (name, path, roots, want) in cases {
            assert_eq!(got(resolve(&path, &roots)), want, "{name}: {path}");
        }

        let ok = resolve(&file, &roots).unwrap();
        assert_eq!(
            ok.modified,
            fs::metadata(&file).unwrap().modified().unwrap()
        );
        let mut read = String::new();
        io::Read::read_to_string(&mut &*ok.file, &mut read).unwrap();
        assert_eq!(read, "hello");
    }

    #[test]
    fn refusals_read_as_log_lines() {
        let p = PathBuf::from("/srv/x");
        let denied = FileRefusal::from_io(&p, io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            denied.to_string(),
            "X-Sendfile path /srv/x: permission denied"
        );
        let other = FileRefusal::from_io(&p, io::Error::other("disk on fire"));
        assert_eq!(other.to_string(), "X-Sendfile path /srv/x: disk on fire");
        let outside = FileRefusal::OutsideRoots {
            path: "../x".into(),
            resolved: "/srv/x".into(),
            roots: vec!["/app".into(), "/tmp".into()],
        };
        assert_eq!(
            outside.to_string(),
            "X-Sendfile path ../x resolves to /srv/x, outside the allowed roots (/app, /tmp); \
             add its directory to X_SENDFILE_ROOTS to serve it"
        );
        assert_eq!(
            FileRefusal::NotAFile { path: p.clone() }.to_string(),
            "X-Sendfile path /srv/x is not a regular file"
        );
        assert_eq!(
            FileRefusal::NotFound { path: p }.to_string(),
            "X-Sendfile path /srv/x: no such file"
        );
    }
}
