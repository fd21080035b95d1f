//! A `newc` cpio archive, the format the kernel unpacks as an initramfs.
//!
//! Written here rather than by the `cpio` tool so the archive is built from
//! memory (files renamed, stripped or decompressed on the way in) and comes
//! out the same for the same inputs: entries are sorted, times and inode
//! numbers are fixed.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// What a path in the archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    /// A character device node (`/dev/console` must exist before init runs).
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// An archive being assembled. Paths are relative (`bin/busybox`); missing
/// parent directories are added when it is written.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/')
            .trim_end_matches('/')
            .to_string()
    }

    pub fn dir(&mut self, path: &str) {
        self.entries.insert(Archive::key(path), Entry::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.entries
            .insert(Archive::key(path), Entry::File { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entries
            .insert(Archive::key(path), Entry::Symlink(target.to_string()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entries
            .insert(Archive::key(path), Entry::CharDev { major, minor });
    }

    /// Every entry with its parents first: the kernel creates each path as it
    /// reads it, so a directory must come before what is in it.
    fn complete(&self) -> BTreeMap<String, Entry> {
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut p = path.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                all.entry(parent.to_string()).or_insert(Entry::Dir);
                p = parent;
            }
        }
        all
    }

    /// Writes the archive, trailer included.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut offset = 0usize;
        // BTreeMap order puts "a" before "a/b": parents come first.
        for (ino, (path, entry)) in (1u32..).zip(self.complete()) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match &entry {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | (mode & 0o7777), data, (0, 0)),
                Entry::Symlink(target) => (0o120777, target.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, &[], (*major, *minor)),
            };
            let nlink = if entry == Entry::Dir { 2 } else { 1 };
            offset += write_header(out, ino, mode, nlink, data.len(), rdev, &path)?;
            out.write_all(data)?;
            offset += data.len();
            offset += pad(out, offset)?;
        }
        offset += write_header(out, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        pad(out, offset)?;
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write(&mut v).expect("writing to a Vec");
        v
    }
}

/// Writes one `newc` header and the name; returns the bytes written.
fn write_header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<usize> {
    let size = u32::try_from(size).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
    })?;
    // c_ino c_mode c_uid c_gid c_nlink c_mtime c_filesize c_devmajor
    // c_devminor c_rdevmajor c_rdevminor c_namesize c_check
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() + 1,
        0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let written = header.len() + name.len() + 1;
    Ok(written + pad(out, written)?)
}

/// Pads to the next multiple of 4; returns the padding written.
fn pad(out: &mut impl Write, offset: usize) -> io::Result<usize> {
    let n = (4 - offset % 4) % 4;
    out.write_all(&[0u8; 3][..n])?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_fields_are_aligned() {
        let mut a = Archive::new();
        a.file("/bin/busybox", b"12345".to_vec(), 0o755);
        a.symlink("lib/systemd/systemd-udevd", "/bin/udevadm");
        a.char_dev("dev/console", 5, 1);
        let bytes = a.to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        let names: Vec<usize> = [
            "bin\0",
            "bin/busybox\0",
            "dev\0",
            "dev/console\0",
            "lib\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|n| text.find(n).unwrap_or_else(|| panic!("{n:?} missing")))
        .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "order: {names:?}");
        // Every header starts on a 4-byte boundary.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
        // The device node carries its numbers in rdevmajor/rdevminor.
        let at = text.find("dev/console\0").unwrap() - 110;
        assert_eq!(&text[at + 78..at + 94], "0000000500000001");
    }
}
