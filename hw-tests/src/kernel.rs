//! The guest's kernel: the host's distribution kernel with its modules, and
//! the image QEMU boots fastest.
//!
//! Under TCG the xz-compressed `vmlinuz` takes seconds to decompress itself
//! before it even starts. A kernel built with `CONFIG_PVH` can be booted as
//! the uncompressed ELF inside it, through its PVH entry point, so the
//! decompressed kernel is cached beside the initramfs and booted instead.

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cache;

/// A kernel image with its modules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// `uname -r` of that kernel, e.g. `6.1.0-26-amd64`.
    pub version: String,
    /// `/boot/vmlinuz-<version>`.
    pub image: PathBuf,
    /// `/lib/modules/<version>`.
    pub modules: PathBuf,
}

/// The newest `/boot/vmlinuz-*` whose modules are installed, or why there is none.
pub fn find() -> Result<Kernel, String> {
    find_in(Path::new("/boot"), Path::new("/lib/modules"))
}

fn find_in(boot: &Path, modules: &Path) -> Result<Kernel, String> {
    let mut found: Vec<Kernel> = fs::read_dir(boot)
        .map(|rd| rd.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            let dir = modules.join(&version);
            dir.join("modules.dep").exists().then(|| Kernel {
                image: e.path(),
                modules: dir,
                version,
            })
        })
        .collect();
    found.sort_by(|a, b| version_cmp(&a.version, &b.version));
    found.pop().ok_or_else(|| {
        format!(
            "no kernel to boot: no {}/vmlinuz-VERSION with {}/VERSION/modules.dep",
            boot.display(),
            modules.display()
        )
    })
}

/// Compares versions piece by piece, numbers as numbers: 6.1.0-10 > 6.1.0-9.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn pieces(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (pieces(a), pieces(b));
    for ((na, sa), (nb, sb)) in pa.iter().zip(pb.iter()) {
        let ord = if *na && *nb {
            sa.trim_start_matches('0')
                .len()
                .cmp(&sb.trim_start_matches('0').len())
                .then_with(|| sa.trim_start_matches('0').cmp(sb.trim_start_matches('0')))
        } else {
            sa.cmp(sb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

impl Kernel {
    /// True when the kernel's config says it has a PVH entry point.
    fn has_pvh(&self) -> bool {
        let config = self
            .image
            .with_file_name(format!("config-{}", self.version));
        fs::read_to_string(config).is_ok_and(|c| c.lines().any(|l| l == "CONFIG_PVH=y"))
    }

    /// What to pass to QEMU's `-kernel`: the cached uncompressed ELF when the
    /// kernel can boot that way (see the module's doc), else the image itself.
    pub fn bootable(&self, cache_dir: &Path) -> Result<PathBuf> {
        if !self.has_pvh() {
            return Ok(self.image.clone());
        }
        let mut h = cache::Hasher::new();
        h.file(&self.image)?;
        let path = cache_dir.join(format!("vmlinux-{}-{:016x}", self.version, h.finish()));
        if path.exists() {
            return Ok(path);
        }
        let _lock = cache::lock(&cache_dir.join("vmlinux.lock"))?;
        if path.exists() {
            return Ok(path);
        }
        let image =
            fs::read(&self.image).with_context(|| format!("reading {}", self.image.display()))?;
        let Some(elf) = decompress_embedded(&image) else {
            return Ok(self.image.clone());
        };
        cache::write_atomically(&path, |f| std::io::Write::write_all(f, &elf))?;
        cache::prune(cache_dir, "vmlinux-", 2);
        Ok(path)
    }
}

/// The ELF kernel inside a bzImage: the first compressed stream that a
/// decompressor turns into an ELF file (as the kernel's `extract-vmlinux`
/// does). `None` when no installed tool finds one.
fn decompress_embedded(image: &[u8]) -> Option<Vec<u8>> {
    const FORMATS: &[(&[u8], &str, &[&str])] = &[
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in FORMATS {
        let Some(at) = image.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .args(*args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take()?;
        let input = image[at..].to_vec();
        // Trailing data after the stream makes some tools complain; what
        // they wrote before that is the kernel, so the status is ignored.
        let feeder = std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut stdin, &input);
        });
        let out = child.wait_with_output().ok()?;
        let _ = feeder.join();
        if out.stdout.starts_with(b"\x7fELF") {
            return Some(out.stdout);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(
            version_cmp("6.1.0-10-amd64", "6.1.0-9-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            version_cmp("6.1.0-9-amd64", "6.10.0-1-amd64"),
            Ordering::Less
        );
        assert_eq!(version_cmp("6.1.0", "6.1.0"), Ordering::Equal);
    }

    #[test]
    fn picks_the_newest_kernel_with_modules() {
        let t = tempfile::tempdir().unwrap();
        let (boot, lib) = (t.path().join("boot"), t.path().join("modules"));
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64"] {
            fs::create_dir_all(&boot).unwrap();
            fs::write(boot.join(format!("vmlinuz-{v}")), "").unwrap();
        }
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            fs::create_dir_all(lib.join(v)).unwrap();
            fs::write(lib.join(v).join("modules.dep"), "").unwrap();
        }
        assert_eq!(find_in(&boot, &lib).unwrap().version, "6.1.0-10-amd64");
        assert!(find_in(&t.path().join("none"), &lib).is_err());
    }
}
