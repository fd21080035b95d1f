//! The static devshim that ships into containers, built for the suite when
//! a test first asks for it — not by a build script, so `cargo check`,
//! clippy and editors never start a second build — by the recipe the
//! package uses (the same binary, in the same place: after `cargo deb`,
//! cargo finds it up to date at once).

use std::path::PathBuf;
use std::sync::OnceLock;

#[path = "../../guest-shim/static_build.rs"]
mod static_build;

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
    static_build::build(&workspace(), &host_triple())
}
