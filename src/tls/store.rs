//! Crash-safe files for keys and certificates: write to a temporary file, fsync, rename over the old one,
//! fsync the folder. A crash at any moment leaves the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode for private keys and account credentials.
pub const SECRET: u32 = 0o600;
/// Mode for certificates and metadata.
pub const PUBLIC: u32 = 0o644;

pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_checked(path, contents, mode, |_| Ok(()))
}

/// `write_atomic` with a step between the durable temp file and the rename, where tests crash it.
fn write_atomic_checked(
    path: &Path,
    contents: &[u8],
    mode: u32,
    before_rename: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` only applies on creation: a leftover temp file keeps its old bits otherwise.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        before_rename(&tmp)?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and parents) readable only by us: it holds private keys.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_with_the_requested_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/key.pem");
        write_atomic(&path, b"old", SECRET).expect("write");
        write_atomic(&path, b"new", SECRET).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn an_interrupted_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        write_atomic(&path, b"complete old certificate", PUBLIC).expect("write");
        // The process dies after the new contents are durable in the temp file, before the rename:
        // the target still holds the old file, and the temp file is left behind as after a crash.
        let crashed = std::panic::catch_unwind(|| {
            write_atomic_checked(&path, b"complete new certificate", PUBLIC, |tmp| {
                assert_eq!(fs::read(tmp).expect("temp"), b"complete new certificate");
                panic!("crash before the rename");
            })
        });
        assert!(crashed.is_err());
        assert_eq!(fs::read(&path).expect("read"), b"complete old certificate");
        let tmp = dir
            .path()
            .join(format!(".cert.pem.tmp.{}", std::process::id()));
        assert!(tmp.exists(), "the crash left its temp file");
        // A failure that is reported (disk full, say) also leaves the old file, and cleans up.
        let failed = write_atomic_checked(&path, b"other", PUBLIC, |_| {
            Err(io::Error::other("no space left"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).expect("read"), b"complete old certificate");
        // The next successful write replaces the stale temp file and the target.
        write_atomic(&path, b"complete new certificate", PUBLIC).expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"complete new certificate");
        assert!(!tmp.exists());
    }
}
