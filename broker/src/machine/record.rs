//! What `machine setup` changed, kept on the host so `machine remove` can
//! take back exactly that and nothing else.
//!
//! Each entry names a path, what was there before (nothing, or a backup
//! copy), a fingerprint of what setup left, and for files edited line by
//! line (passwd, the `.nspawn` file) the edits, so they can be undone even if
//! the admin changed the file since, and the owner, group and mode of what
//! was there, so remove puts those back too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use super::tree::Meta;

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
    /// Takes out a line an earlier devbroker added (undone by putting it
    /// back): `Bind=` became `BindReadOnly=`.
    IniDrop {
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
    /// Owner, group and mode of what was there before setup; `None` when
    /// setup created the path (and in records from before they were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Meta>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    pub version: u32,
    pub machine: String,
    /// The container's tree: entries below it are resolved inside it
    /// (records from before it was kept: see [`Record::tree_root`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<PathBuf>,
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

    /// The container's tree: as recorded, or, for a record that predates
    /// that, worked out from the paths setup writes only in a tree.
    pub fn tree_root(&self) -> Option<PathBuf> {
        if self.tree.is_some() {
            return self.tree.clone();
        }
        const IN_TREE: [&str; 5] = [
            "etc/hostname",
            "etc/systemd/network/50-host0.network",
            "etc/systemd/system/devshim.service",
            "usr/local/bin/devshim",
            "etc/passwd",
        ];
        self.entries.iter().find_map(|e| {
            IN_TREE.iter().find_map(|rel| {
                let n = Path::new(rel).components().count();
                e.path.ends_with(rel).then(|| {
                    let mut p = e.path.clone();
                    for _ in 0..n {
                        p.pop();
                    }
                    p
                })
            })
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_metadata_still_load() {
        let old = r#"{"version": 1, "machine": "ci", "entries": [
            {"path": "/m/ci/etc/systemd/network", "kind": "dir", "backup": null, "after": 0},
            {"path": "/m/ci/etc/passwd", "kind": "file", "backup": "/s/0", "after": 7,
             "edits": [{"op": "append-line", "line": "sai:x:883:883::/home/sai:/bin/bash"}]}
        ]}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!(r.entries[1].before, None);
        assert_eq!(r.tree_root(), Some(PathBuf::from("/m/ci")));
        let new = Record {
            tree: Some("/t".into()),
            ..r.clone()
        };
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }
}
