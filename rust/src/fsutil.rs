//! Filesystem operations the Python side needs and the standard library lacks.

use std::path::Path;

use crate::error::{Error, Result};

/// Renames `src` to `dst` only if `dst` does not exist, atomically: of two processes renaming
/// onto the same `dst`, exactly one succeeds and the other gets `AlreadyExists`. On Linux this is
/// `renameat2(RENAME_NOREPLACE)`; where the kernel or filesystem lacks it (EINVAL, ENOSYS), and
/// on other systems, a directory `src` falls back to an existence check followed by `rename`,
/// which rename(2) itself refuses onto a non-empty directory.
pub fn rename_noreplace(src: &Path, dst: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let cstr = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| Error::Config(format!("{}: path contains a NUL byte", p.display())))
        };
        let (s, d) = (cstr(src)?, cstr(dst)?);
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                s.as_ptr(),
                libc::AT_FDCWD,
                d.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {}
            _ => return Err(Error::io(dst, e)),
        }
    }
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(Error::io(
            dst,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    std::fs::rename(src, dst).map_err(|e| Error::io(dst, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_refuses_an_existing_destination() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("f"), b"x").unwrap();
        std::fs::create_dir(&b).unwrap(); // empty: plain rename(2) would replace it
        match rename_noreplace(&a, &b) {
            Err(Error::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists)
            }
            other => panic!("{other:?}"),
        }
        assert!(a.join("f").is_file());
        rename_noreplace(&a, &c).unwrap();
        assert!(c.join("f").is_file() && !a.exists());
    }
}
