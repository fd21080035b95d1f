//! The names a guest pty is published under: `ROOT/serial/by-id/<by-id>` and
//! `ROOT/devbroker/<board>.<tty>`.
//!
//! A link is made under a temporary name and renamed into place, so a tool
//! reopening the path never sees it missing while a pty is replaced; it is
//! removed only if it still points at our pty, so a newer pty's link is never
//! taken down by an older one's cleanup.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// Points `link` at `target` atomically, making parent directories (0755).
pub fn publish(link: &Path, target: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let dir = link
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "link has no directory"))?;
    fs::create_dir_all(dir)?;
    let name = link
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "link has no name"))?;
    let tmp = dir.join(format!(".{}.devshim-tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp)?;
    if let Some((uid, gid)) = owner {
        let _ = nix::unistd::fchownat(
            None,
            &tmp,
            Some(uid.into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
    }
    fs::rename(&tmp, link)
}

/// Removes `link` if it still points at `target`.
pub fn withdraw(link: &Path, target: &Path) {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        let _ = fs::remove_file(link);
    }
}

/// The two links of a tty under `root`.
pub fn paths(root: &Path, by_id: Option<&str>, short_name: &str) -> Vec<PathBuf> {
    let mut v = vec![root.join("devbroker").join(short_name)];
    if let Some(b) = by_id {
        v.insert(0, root.join("serial/by-id").join(b));
    }
    v
}

/// The path a tty is known by in the guest: its by-id link, else
/// `devbroker/<board>.<tty>`.
pub fn guest_path(root: &Path, by_id: Option<&str>, short_name: &str) -> PathBuf {
    paths(root, by_id, short_name).swap_remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_replace_and_withdraw() {
        let d = tempfile_dir();
        let link = d.join("serial/by-id/usb-x");
        publish(&link, Path::new("/dev/pts/1"), None).unwrap();
        publish(&link, Path::new("/dev/pts/2"), None).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("/dev/pts/2"));
        withdraw(&link, Path::new("/dev/pts/1"));
        assert!(
            link.symlink_metadata().is_ok(),
            "an old pty's cleanup keeps the new link"
        );
        withdraw(&link, Path::new("/dev/pts/2"));
        assert!(link.symlink_metadata().is_err());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn guest_path_is_the_first_link() {
        let root = Path::new("/dev");
        assert_eq!(
            guest_path(root, Some("usb-x"), "b.t"),
            Path::new("/dev/serial/by-id/usb-x")
        );
        assert_eq!(
            guest_path(root, None, "b.t"),
            Path::new("/dev/devbroker/b.t")
        );
        assert_eq!(
            paths(root, Some("usb-x"), "b.t")[0],
            guest_path(root, Some("usb-x"), "b.t")
        );
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("devshim-links-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
