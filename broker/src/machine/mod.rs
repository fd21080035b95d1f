//! Container set-up: `devbroker machine setup|check|remove`.
//!
//! Pure pieces — names ([`name`]), `.nspawn` editing ([`ini`]), accounts
//! ([`accounts`]), legacy findings ([`check`]) — are unit-tested; [`setup`]
//! plans, compares, writes and records.

pub mod accounts;
pub mod check;
pub mod command;
pub mod ini;
pub mod name;
pub mod network;
pub mod record;
pub mod setup;
pub mod tree;

use std::path::{Path, PathBuf};

/// Names of the machines this host can see: trees or links in
/// `machines_dir`, `.nspawn` files in the nspawn directories, and the
/// config's.
pub fn known_machines(
    machines_dir: &Path,
    nspawn_dirs: &[PathBuf],
    config: &[String],
) -> Vec<String> {
    let mut out: Vec<String> = config.to_vec();
    if let Ok(rd) = std::fs::read_dir(machines_dir) {
        out.extend(
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| !n.starts_with('.') && !n.ends_with(".raw")),
        );
    }
    for d in nspawn_dirs {
        if let Ok(rd) = std::fs::read_dir(d) {
            out.extend(rd.flatten().filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".nspawn"))
                    .map(str::to_owned)
            }));
        }
    }
    out.sort();
    out.dedup();
    out
}
