//! How the static devshim is built: one recipe for the Debian package
//! (`broker/build.rs`) and for the suite (`tests/src/static_devshim.rs`),
//! which include this file, so the suite tests the binary that ships and
//! a CI run builds it once.
//!
//! A nested cargo with an explicit `--target` applies `+crt-static` to the
//! target artifacts only, not to build scripts and proc macros, and keeps its
//! own target directory (`target/devshim-static`) so it never waits on the
//! outer build's lock. Non-PIE static: `ldd` reports "not a dynamic
//! executable", and the binary runs on any x86_64 Linux userland, old glibc
//! or none.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the static, stripped devshim for `target` (a triple) in the
/// workspace at `root`; returns where the binary is.
pub fn build(root: &Path, target: &str) -> PathBuf {
    let dir = root.join("target/devshim-static");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "devshim",
            "--bin",
            "devshim",
            "--target",
            target,
            "--target-dir",
        ])
        .arg(&dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        // A test under umockdev asking for devshim: the build must not run
        // in the emulated world.
        "LD_PRELOAD",
        "UMOCKDEV_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env(
        format!(
            "CARGO_TARGET_{}_RUSTFLAGS",
            target.to_uppercase().replace('-', "_")
        ),
        "-C target-feature=+crt-static -C relocation-model=static -C strip=symbols",
    );
    let status = cmd.status().expect("run cargo for the static devshim");
    assert!(status.success(), "building the static devshim failed");
    dir.join(target).join("release/devshim")
}
