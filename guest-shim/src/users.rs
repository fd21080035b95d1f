//! The job user, read straight from `/etc/passwd` (the parsing is
//! [`wire::accounts`]).
//!
//! devshim is a static binary that must run in old distributions, so it
//! can't use NSS; plain files are what containers have anyway.

use std::path::Path;

pub use wire::accounts::{find_user, group_gid, user_name, User};

/// Reads `ROOT/etc/passwd` and finds `want` (a name or a uid).
pub fn lookup(root: &Path, want: &str) -> Result<User, String> {
    let path = root.join("etc/passwd");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("can't read {}: {e}", path.display()))?;
    find_user(&text, want).ok_or_else(|| {
        format!(
            "user {want:?} is not in {}; create it or pass --user",
            path.display()
        )
    })
}
