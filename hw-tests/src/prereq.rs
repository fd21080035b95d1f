//! What tier 4 needs on the host, found once, and what a test does when
//! something is missing: on a developer's machine it says why and skips; in
//! CI (`CI=true`) it fails, because a tier that quietly skips there tests
//! nothing while looking green.

use std::path::{Path, PathBuf};

use devbroker_tests::container::find_program;

use crate::kernel::{self, Kernel};

/// The Debian packages tier 4 uses on the host.
pub const PACKAGES: &str = "qemu-system-x86 linux-image-amd64 busybox-static udev kmod";

/// The udev rules the guest's udevd runs (with the project's own rules file):
/// device nodes and their modes, `/dev/serial/by-id` links, driver loading.
pub const UDEV_RULES: &[&str] = &[
    "50-udev-default.rules",
    "60-serial.rules",
    "80-drivers.rules",
];

/// Says why a test can't run here, with what to install: the suite's
/// [`devbroker_tests::skip`] (fails under CI).
pub fn skip(reason: &str) {
    devbroker_tests::skip(&format!("{reason} (apt-get install -y {PACKAGES})"));
}

/// The host's tools and files the guest is made of.
#[derive(Debug, Clone)]
pub struct Host {
    pub qemu: PathBuf,
    pub kernel: Kernel,
    pub busybox: PathBuf,
    pub udevadm: PathBuf,
    pub depmod: PathBuf,
    /// [`UDEV_RULES`], as found in the udev rules directory.
    pub rules: Vec<PathBuf>,
    /// `strip`, to make the debug build of the broker smaller for the guest.
    pub strip: Option<PathBuf>,
}

/// Finds everything tier 4 needs, or lists what is missing and how to get it.
pub fn find() -> Result<Host, String> {
    let mut missing = Vec::new();
    let mut need = |name: &str, package: &str| {
        let p = find_program(name);
        if p.is_none() {
            missing.push(format!("{name} (package {package})"));
        }
        p
    };
    let qemu = need("qemu-system-x86_64", "qemu-system-x86");
    let busybox = need("busybox", "busybox-static");
    let udevadm = need("udevadm", "udev");
    let depmod = need("depmod", "kmod");
    let kernel = kernel::find()
        .map_err(|e| missing.push(format!("{e} (package linux-image-amd64)")))
        .ok()
        .filter(|k| {
            let readable = std::fs::File::open(&k.image).is_ok();
            if !readable {
                missing.push(format!(
                    "read access to {} (run as root)",
                    k.image.display()
                ));
            }
            readable
        });
    let rule_dirs = [
        Path::new("/usr/lib/udev/rules.d"),
        Path::new("/lib/udev/rules.d"),
    ];
    let rules: Vec<PathBuf> = UDEV_RULES
        .iter()
        .filter_map(|r| {
            let found = rule_dirs.iter().map(|d| d.join(r)).find(|p| p.exists());
            if found.is_none() {
                missing.push(format!("udev rules {r} (package udev)"));
            }
            found
        })
        .collect();
    match (qemu, kernel, busybox, udevadm, depmod) {
        (Some(qemu), Some(kernel), Some(busybox), Some(udevadm), Some(depmod))
            if missing.is_empty() =>
        {
            Ok(Host {
                qemu,
                kernel,
                busybox,
                udevadm,
                depmod,
                rules,
                strip: find_program("strip"),
            })
        }
        _ => Err(format!(
            "emulated USB tests need {}: apt-get install -y {PACKAGES}",
            missing.join(", ")
        )),
    }
}
