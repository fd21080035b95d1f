//! Where built guest images are kept between runs, how they are named, and
//! the lock that makes parallel test processes build each one once.
//!
//! Images live outside the checkout (the suite's cache directory, as the
//! container tier's trees do), so `cargo clean` and other checkouts reuse
//! them. Each is named by a hash of everything that went into it: a changed
//! input builds a new one, an unchanged one is never rebuilt.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// The directory for this crate's images: `hw-tests/` in the suite's cache
/// (`$DEVBROKER_TEST_CACHE`, default `/var/cache/devbroker-tests`), or in the
/// temporary directory when that can't be created (not root).
pub fn dir() -> Result<PathBuf> {
    let preferred = devbroker_tests::container::cache_dir().join("hw-tests");
    if fs::create_dir_all(&preferred).is_ok() {
        return Ok(preferred);
    }
    let fallback =
        std::env::temp_dir().join(format!("devbroker-hw-tests-{}", nix::unistd::geteuid()));
    fs::create_dir_all(&fallback).with_context(|| {
        format!(
            "can't create {} or {}: set DEVBROKER_TEST_CACHE to a writable directory",
            preferred.display(),
            fallback.display()
        )
    })?;
    Ok(fallback)
}

/// An exclusive `flock` on `path`, held until dropped.
pub struct Lock {
    _flock: Flock<fs::File>,
}

/// Takes the lock at `path` (created if missing), waiting for other holders.
pub fn lock(path: &Path) -> Result<Lock> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    let flock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(Lock { _flock: flock })
}

/// A 64-bit hash for cache keys: stable across Rust versions (unlike
/// `DefaultHasher`) and quick over the large binaries under test, as it takes
/// eight bytes a step. Not for anything an adversary chooses.
#[derive(Debug, Clone)]
pub struct Hasher(u64);

impl Default for Hasher {
    fn default() -> Hasher {
        Hasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }

    /// Adds `bytes`, length included, so concatenations differ.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(last));
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// Adds a file's content, read in pieces.
    pub fn file(&mut self, path: &Path) -> Result<()> {
        let mut f = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let len = f.metadata()?.len();
        self.word(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = read_full(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            self.bytes(&buf[..n]);
        }
        Ok(())
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Fills `buf` unless the file ends first; returns the bytes read.
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Marks `path` as just used, so [`prune`] keeps it.
pub fn touch(path: &Path) {
    if let Ok(f) = fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Keeps the `keep` most recently used files of `dir` whose names start with
/// `prefix`, and removes the others: every rebuild of the binaries under test
/// makes a new image, and old ones would pile up. A QEMU still booting from a
/// removed one is unaffected (it has the file open).
pub fn prune(dir: &Path, prefix: &str, keep: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut found: Vec<(SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in found.into_iter().skip(keep) {
        let _ = fs::remove_file(path);
    }
}

/// Makes `path` with `write`, through a temporary file in the same directory
/// renamed into place, so a reader never sees a half-written image, even
/// after a crash.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    write(tmp.as_file_mut()).with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_every_byte_and_the_length() {
        let h = |b: &[u8]| {
            let mut h = Hasher::new();
            h.bytes(b);
            h.finish()
        };
        assert_ne!(h(b"abcdefgh1"), h(b"abcdefgh2"));
        assert_ne!(h(b"a"), h(b"a\0"));
        assert_eq!(h(b"same"), h(b"same"));
    }
}
