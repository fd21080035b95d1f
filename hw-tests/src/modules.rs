//! Kernel modules for the guest: the USB serial stack and what it depends
//! on, found through the host's `modules.dep`, decompressed so busybox's
//! `modprobe` and udev's `kmod` builtin can load them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The modules the guest needs for a QEMU `usb-serial` device behind
/// `qemu-xhci`, in load order.
pub const USB_SERIAL: &[&str] = &[
    "usb-common",
    "usbcore",
    "xhci-hcd",
    "xhci-pci",
    "usbserial",
    "ftdi_sio",
];

/// Extensions of compressed modules and the tool that decompresses each.
const COMPRESSED: &[(&str, &str)] = &[(".xz", "xz"), (".zst", "zstd"), (".gz", "gzip")];

/// The modules to put in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSet {
    /// (path under `/lib/modules/<version>/` without a compression suffix,
    /// the host file).
    pub files: Vec<(String, PathBuf)>,
    /// Names to `modprobe`, in order; modules built into the kernel are left out.
    pub load: Vec<String>,
}

/// `usb-common.ko.xz` → `usb_common`: the name modprobe and modules.dep agree on.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Finds `wanted` and their dependencies in `dir` (`/lib/modules/<version>`).
pub fn resolve(dir: &Path, wanted: &[&str]) -> Result<ModuleSet> {
    let dep_path = dir.join("modules.dep");
    let deps = fs::read_to_string(&dep_path).with_context(|| {
        format!(
            "reading {}: is the kernel's modules package installed?",
            dep_path.display()
        )
    })?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    resolve_from(dir, &deps, &builtin, wanted)
}

fn resolve_from(dir: &Path, deps: &str, builtin: &str, wanted: &[&str]) -> Result<ModuleSet> {
    let mut by_name: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in deps.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let needs = rest.split_whitespace().map(str::to_string).collect();
        by_name.insert(name_of(file), (file.to_string(), needs));
    }
    let builtin: BTreeSet<String> = builtin.lines().map(name_of).collect();
    let mut files = BTreeSet::new();
    let mut load = Vec::new();
    for want in wanted {
        let name = name_of(want);
        if builtin.contains(&name) {
            continue;
        }
        let Some((file, needs)) = by_name.get(&name) else {
            bail!(
                "kernel module {want} is neither in {}/modules.dep nor built in: this kernel can't run the emulated adapter",
                dir.display()
            );
        };
        files.insert(file.clone());
        files.extend(needs.iter().cloned());
        load.push(name);
    }
    let files = files
        .into_iter()
        .map(|f| (strip_compression(&f).to_string(), dir.join(&f)))
        .collect();
    Ok(ModuleSet { files, load })
}

fn strip_compression(path: &str) -> &str {
    COMPRESSED
        .iter()
        .find_map(|(ext, _)| path.strip_suffix(ext))
        .unwrap_or(path)
}

/// A module's content, decompressed if its file is compressed.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let Some((_, tool)) = COMPRESSED.iter().find(|(ext, _)| name.ends_with(ext)) else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| {
            format!(
                "running {tool} to decompress {}: install it",
                path.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/usb/common/usb-common.ko.xz:\n\
        kernel/drivers/usb/core/usbcore.ko.xz: kernel/drivers/usb/common/usb-common.ko.xz\n\
        kernel/drivers/usb/serial/usbserial.ko.xz: kernel/drivers/usb/core/usbcore.ko.xz kernel/drivers/usb/common/usb-common.ko.xz\n\
        kernel/drivers/usb/serial/ftdi_sio.ko.xz: kernel/drivers/usb/serial/usbserial.ko.xz kernel/drivers/usb/core/usbcore.ko.xz kernel/drivers/usb/common/usb-common.ko.xz\n";

    #[test]
    fn dependencies_come_along_and_builtins_are_skipped() {
        let set = resolve_from(
            Path::new("/m"),
            DEP,
            "kernel/drivers/usb/host/xhci-hcd.ko\n",
            &["ftdi_sio", "xhci-hcd"],
        )
        .unwrap();
        assert_eq!(set.load, vec!["ftdi_sio"]);
        let names: Vec<&str> = set.files.iter().map(|(p, _)| p.as_str()).collect();
        assert!(
            names.contains(&"kernel/drivers/usb/common/usb-common.ko"),
            "{names:?}"
        );
        assert_eq!(names.len(), 4);
        assert_eq!(
            set.files[0].1,
            PathBuf::from("/m/kernel/drivers/usb/common/usb-common.ko.xz")
        );
        assert!(resolve_from(Path::new("/m"), DEP, "", &["cp210x"]).is_err());
    }
}
