//! Builds devshim as the static binary that ships into containers, so the
//! suite tests exactly that artifact (and `ldd` can check it is static).
//!
//! A nested cargo with an explicit `--target` applies `+crt-static` to the
//! target artifacts only, not to build scripts and proc macros, and keeps its
//! own target directory so it never waits on the outer build's lock.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for dir in [
        "guest-shim/src",
        "wire/src",
        "guest-shim/Cargo.toml",
        "wire/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target = std::env::var("TARGET").unwrap();
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
    let bin = out_root.join(&target).join("release/devshim");
    println!("cargo:rustc-env=DEVSHIM_STATIC={}", bin.display());
}
