//! A program's state directory as one checkpoint part, and back.
//!
//! The archive is a flat list of entries, each
//! `kind u8 | mode u32 | path_len u32 | path | data_len u64 | data`
//! (little-endian), behind the magic `LZDIR1\0\0`: kind 0 a directory,
//! 1 a regular file (data is its content), 2 a symlink (data is its
//! target). Paths are relative, `/`-separated, without `.` or `..`
//! components. The store frames and CRC-checks the part; reading still
//! checks every length and path, so a damaged archive is refused with what
//! is wrong, and nothing is written where the program would see it: a
//! restore builds the directory next to the target and swaps it in.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

const MAGIC: &[u8; 8] = b"LZDIR1\0\0";

/// Reads `dir` (which must exist) into an archive.
pub fn archive(dir: &Path) -> io::Result<Vec<u8>> {
    let mut out = MAGIC.to_vec();
    walk(dir, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<u8>) -> io::Result<()> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = rel.join(e.file_name());
        let meta = fs::symlink_metadata(root.join(&path))?;
        let name = path
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", path.display())))?;
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            push(out, 0, mode, name, &[]);
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let data = fs::read(root.join(&path))?;
            push(out, 1, mode, name, &data);
        } else if ft.is_symlink() {
            let target = fs::read_link(root.join(&path))?;
            let t = target
                .to_str()
                .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", target.display())))?;
            push(out, 2, 0, name, t.as_bytes());
        }
        // Sockets, fifos and devices are not state: skipped.
    }
    Ok(())
}

fn push(out: &mut Vec<u8>, kind: u8, mode: u32, path: &str, data: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&mode.to_le_bytes());
    out.extend_from_slice(&(path.len() as u32).to_le_bytes());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
}

/// One archive entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// 0 directory, 1 file, 2 symlink.
    pub kind: u8,
    /// Permission bits.
    pub mode: u32,
    /// Relative path.
    pub path: &'a str,
    /// Content or link target.
    pub data: &'a [u8],
}

/// Reads and checks every entry of an archive.
pub fn entries(bytes: &[u8]) -> Result<Vec<Entry<'_>>, String> {
    let mut rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a state directory archive (bad magic)")?;
    let mut out = Vec::new();
    fn take<'b>(rest: &mut &'b [u8], n: usize, what: &str) -> Result<&'b [u8], String> {
        if rest.len() < n {
            return Err(format!("archive cut short in {what}"));
        }
        let (a, b) = rest.split_at(n);
        *rest = b;
        Ok(a)
    }
    while !rest.is_empty() {
        let i = out.len();
        let kind = take(&mut rest, 1, "an entry kind")?[0];
        let mode = u32::from_le_bytes(take(&mut rest, 4, "a mode")?.try_into().expect("4"));
        let plen = u32::from_le_bytes(take(&mut rest, 4, "a path length")?.try_into().expect("4"));
        let path = std::str::from_utf8(take(&mut rest, plen as usize, "a path")?)
            .map_err(|_| format!("entry {i}: path is not UTF-8"))?;
        let dlen = u64::from_le_bytes(take(&mut rest, 8, "a data length")?.try_into().expect("8"));
        let dlen = usize::try_from(dlen).map_err(|_| format!("entry {i}: data too long"))?;
        let data = take(&mut rest, dlen, "data")?;
        if kind > 2 {
            return Err(format!("entry {i} ({path:?}): unknown kind {kind}"));
        }
        let p = Path::new(path);
        if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("entry {i}: {path:?} is not a plain relative path"));
        }
        out.push(Entry {
            kind,
            mode,
            path,
            data,
        });
    }
    Ok(out)
}

/// Replaces `dir` with the archive's content. The new directory is built
/// beside it and renamed into place, so a failure leaves `dir` as it was.
pub fn restore(dir: &Path, bytes: &[u8]) -> Result<(), String> {
    let list = entries(bytes)?;
    let parent = dir.parent().ok_or("the state directory has no parent")?;
    let name = dir
        .file_name()
        .ok_or("the state directory has no name")?
        .to_string_lossy()
        .to_string();
    fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let staging = parent.join(format!(".{name}.lazarus-restore"));
    let old = parent.join(format!(".{name}.lazarus-old"));
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_dir_all(&old);
    let io = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
    fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
    use std::os::unix::fs::PermissionsExt as _;
    for e in &list {
        let target: PathBuf = staging.join(e.path);
        match e.kind {
            0 => fs::create_dir_all(&target).map_err(|er| io(&target, er))?,
            1 => {
                fs::write(&target, e.data).map_err(|er| io(&target, er))?;
            }
            _ => {
                let t = std::str::from_utf8(e.data).map_err(|_| "a symlink target is not UTF-8")?;
                std::os::unix::fs::symlink(t, &target).map_err(|er| io(&target, er))?;
            }
        }
    }
    // Modes last, deepest first, so read-only directories still fill.
    for e in list.iter().rev().filter(|e| e.kind != 2) {
        let target = staging.join(e.path);
        fs::set_permissions(&target, fs::Permissions::from_mode(e.mode))
            .map_err(|er| io(&target, er))?;
    }
    if dir.exists() {
        fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    fs::rename(&staging, dir).map_err(|e| io(dir, e))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_round_trip_keeps_files_modes_and_links() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        fs::create_dir_all(src.join("sub/deeper")).expect("mkdir");
        fs::write(src.join("a.txt"), b"alpha").expect("write");
        fs::write(src.join("sub/deeper/b.bin"), vec![7u8; 100_000]).expect("write");
        std::os::unix::fs::symlink("a.txt", src.join("link")).expect("symlink");
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(src.join("a.txt"), fs::Permissions::from_mode(0o600)).expect("chmod");
        let bytes = archive(&src).expect("archive");

        let dst = t.path().join("dst");
        fs::create_dir_all(&dst).expect("mkdir");
        fs::write(dst.join("stale"), b"gone after restore").expect("write");
        restore(&dst, &bytes).expect("restore");
        assert_eq!(fs::read(dst.join("a.txt")).expect("read"), b"alpha");
        assert_eq!(
            fs::read(dst.join("sub/deeper/b.bin")).expect("read").len(),
            100_000
        );
        assert_eq!(
            fs::read_link(dst.join("link")).expect("link"),
            Path::new("a.txt")
        );
        assert!(!dst.join("stale").exists());
        let mode = fs::metadata(dst.join("a.txt"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // Same content, same bytes: unchanged directories are detected.
        assert_eq!(archive(&dst).expect("again"), bytes);
    }

    #[test]
    fn test_damaged_archives_are_refused_and_leave_the_directory_alone() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("state");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("keep"), b"x").expect("write");
        let good = archive(&dir).expect("archive");

        let mut escape = MAGIC.to_vec();
        push(&mut escape, 1, 0o644, "../evil", b"x");
        let mut absolute = MAGIC.to_vec();
        push(&mut absolute, 1, 0o644, "/etc/evil", b"x");
        let mut kind = MAGIC.to_vec();
        push(&mut kind, 9, 0o644, "x", b"");
        for (bytes, want) in [
            (b"nonsense".to_vec(), "bad magic"),
            (good[..good.len() - 1].to_vec(), "cut short"),
            (escape, "not a plain relative path"),
            (absolute, "not a plain relative path"),
            (kind, "unknown kind"),
        ] {
            let err = restore(&dir, &bytes).expect_err(want);
            assert!(err.contains(want), "{err}");
            assert_eq!(fs::read(dir.join("keep")).expect("untouched"), b"x");
        }
        assert!(!t.path().join("evil").exists());
    }
}
