//! What `machine setup` changed, kept on the host so `machine remove` can
//! take back exactly that and nothing else.
//!
//! Each entry names a path, what was there before (nothing, or a backup
//! copy), a fingerprint of what setup left, and for files edited line by
//! line (passwd, the `.nspawn` file) the edits, so they can be undone even if
//! the admin changed the file since.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    Symlink,
    Dir,
}

/// A line-level edit, undone by its inverse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Edit {
    AppendLine {
        line: String,
    },
    IniSet {
        section: String,
        key: String,
        value: String,
    },
    IniAdd {
        section: String,
        key: String,
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: PathBuf,
    pub kind: Kind,
    /// A copy of what was there before, or `None` when setup created it.
    pub backup: Option<PathBuf>,
    /// Fingerprint of what setup left there.
    pub after: u64,
    #[serde(default)]
    pub edits: Vec<Edit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    pub version: u32,
    pub machine: String,
    pub entries: Vec<Entry>,
}

impl Record {
    pub fn path(state_dir: &Path, machine: &str) -> PathBuf {
        state_dir.join("machines").join(format!("{machine}.json"))
    }

    pub fn backup_dir(state_dir: &Path, machine: &str) -> PathBuf {
        state_dir.join("machines").join(format!("{machine}.backup"))
    }

    pub fn load(state_dir: &Path, machine: &str) -> std::io::Result<Option<Record>> {
        match std::fs::read(Self::path(state_dir, machine)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn find(&self, path: &Path) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

/// FNV-1a: a fingerprint that stays the same across builds.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The fingerprint of what is at `path` now, if anything.
pub fn current(path: &Path, kind: &Kind) -> Option<u64> {
    match kind {
        Kind::File => std::fs::read(path).ok().map(|b| fingerprint(&b)),
        Kind::Symlink => std::fs::read_link(path)
            .ok()
            .map(|t| fingerprint(t.as_os_str().as_encoded_bytes())),
        Kind::Dir => path.is_dir().then_some(0),
    }
}
