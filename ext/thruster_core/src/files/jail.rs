//! Where an X-Sendfile path may point.
//!
//! The path comes from the application's response, so a bug there (a user
//! supplied file name joined to a directory, say) must not turn into reading
//! `/etc/shadow`. A path is served only if, with every symlink and `..`
//! resolved, it names a regular file under one of the allowed roots.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
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
    pub file: File,
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
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&canonical)
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
/// first (roots from [`parse_roots`] and [`default_roots`] are canonical),
/// and canonicalized only if that fails. The fast path cannot wrongly accept:
/// a canonical path contains no `..` and passes through no symlink, so it can
/// only start with a root that names the same directory.
fn is_under(canonical: &Path, root: &Path) -> bool {
    canonical.starts_with(root)
        || fs::canonicalize(root).is_ok_and(|root| canonical.starts_with(root))
}

/// Where X-Sendfile may read when `X_SENDFILE_ROOTS` is not set: the working
/// directory (the application) and the temporary directory (where Rack and
/// Rails put generated downloads), both `std::env::temp_dir()` and `/tmp` as
/// they differ when `TMPDIR` is set. Canonical, without duplicates; a
/// directory that does not exist is left out.
pub fn default_roots() -> Vec<PathBuf> {
    let candidates = [
        std::env::current_dir().ok(),
        Some(std::env::temp_dir()),
        Some(PathBuf::from("/tmp")),
    ];
    let mut roots = Vec::new();
    for dir in candidates.into_iter().flatten() {
        if let Ok(dir) = fs::canonicalize(dir) {
            if !roots.contains(&dir) {
                roots.push(dir);
            }
        }
    }
    roots
}

/// Parses an `X_SENDFILE_ROOTS` value: directories separated by commas, each
/// trimmed, empty items dropped — the same list syntax as every other list
/// setting (`config::parse_list`). A relative directory is relative to the
/// working directory at parse time.
///
/// Every directory must exist: a typo here would otherwise only show up as
/// every X-Sendfile response being refused. The error is a message naming
/// the entry. An empty list is an error too; a caller that wants "serve
/// nothing from disk" should say so with `X_SENDFILE_ENABLED=false`.
pub fn parse_roots(value: &str) -> Result<Vec<PathBuf>, String> {
    let mut roots = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let dir = fs::canonicalize(entry).map_err(|e| format!("{entry}: {e}"))?;
        if !dir.is_dir() {
            return Err(format!("{entry}: not a directory"));
        }
        if !roots.contains(&dir) {
            roots.push(dir);
        }
    }
    if roots.is_empty() {
        return Err("no directory given".to_string());
    }
    Ok(roots)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the temp dir, removed on drop. Canonical, so
    /// expectations can compare paths directly.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "thruster-files-{tag}-{}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let dir = std::env::temp_dir().join(name);
            fs::create_dir(&dir).unwrap();
            TempDir(fs::canonicalize(dir).unwrap())
        }

        pub(crate) fn file(&self, rel: &str, contents: &[u8]) -> PathBuf {
            let p = self.0.join(rel);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(&p, contents).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

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
        io::Read::read_to_string(&mut &ok.file, &mut read).unwrap();
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

    #[test]
    fn roots() {
        let t = TempDir::new("roots");
        let a = t.0.join("a");
        let b = t.0.join("b");
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let file = t.file("f", b"");
        let (sa, sb) = (a.display().to_string(), b.display().to_string());

        assert_eq!(
            parse_roots(&format!("{sa},{sb}")),
            Ok(vec![a.clone(), b.clone()])
        );
        assert_eq!(
            parse_roots(&format!(" {sa} , ,{sb}/, {sa}/.")),
            Ok(vec![a.clone(), b.clone()])
        );
        assert_eq!(parse_roots(&format!("{sb}/../a")), Ok(vec![a.clone()]));
        assert!(parse_roots("").is_err());
        assert!(parse_roots(" , ").is_err());
        let missing = parse_roots(&format!("{sa},{sa}/nope")).unwrap_err();
        assert!(missing.starts_with(&format!("{sa}/nope: ")), "{missing}");
        assert_eq!(
            parse_roots(&file.display().to_string()),
            Err(format!("{}: not a directory", file.display()))
        );

        let defaults = default_roots();
        let cwd = fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
        assert_eq!(defaults[0], cwd);
        assert!(defaults.contains(&fs::canonicalize(std::env::temp_dir()).unwrap()));
        assert!(defaults.contains(&fs::canonicalize("/tmp").unwrap()));
        let mut unique = defaults.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), defaults.len());
    }
}
