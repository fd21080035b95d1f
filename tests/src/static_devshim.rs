//! The static devshim that ships into containers, built for the suite when
//! a test first asks for it — not by a build script, so `cargo check`,
//! clippy and editors never start a second build.
//!
//! A nested cargo with an explicit `--target` applies `+crt-static` to the
//! target artifacts only, not to build scripts and proc macros, and keeps its
//! own target directory so it never waits on the outer build's lock. Cargo
//! finds it up to date in a moment after the first time.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// The host's target triple (`x86_64-unknown-linux-gnu`): devbroker runs
/// on glibc Linux. (Not asked of rustc: a test under umockdev's preload may
/// be the one asking, and rustup's proxy does not run there.)
fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds (once per process) and returns the static devshim.
pub fn path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(build).clone()
}

fn build() -> PathBuf {
    let root = workspace();
    let target = host_triple();
    let out_root = std::env::var("DEVBROKER_STATIC_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/devshim-static"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "devshim",
            "--bin",
            "devshim",
            "--target",
            &target,
            "--target-dir",
        ])
        .arg(&out_root);
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
    let flags_var = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        target.to_uppercase().replace('-', "_")
    );
    // Non-PIE static: `ldd` then reports "not a dynamic executable", and the
    // binary runs on any x86_64 Linux userland, old glibc or none.
    cmd.env(
        flags_var,
        "-C target-feature=+crt-static -C relocation-model=static -C strip=debuginfo",
    );
    let status = cmd.status().expect("run cargo for the static devshim");
    assert!(status.success(), "building the static devshim failed");
    out_root.join(&target).join("release/devshim")
}
