//! The shared libraries a binary needs, as the host's `ldd` resolves them, so
//! dynamic binaries (the broker, udevadm) run in the guest as they do here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Absolute paths of the libraries and the dynamic loader `bin` needs; empty
/// for a static binary.
pub fn needed(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context(
        "running ldd (from libc-bin) to list the libraries of the binaries for the guest",
    )?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {text}", bin.display());
    }
    parse(&text).with_context(|| format!("ldd {}", bin.display()))
}

/// The paths in `ldd` output: `name => /path (0x...)` and `/path (0x...)`
/// lines; the vDSO has no file and is skipped.
pub fn parse(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in ldd.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!(
                        "{} is not found: install the package that has it",
                        name.trim()
                    );
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libudev.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse("\tlibfoo.so.1 => not found\n").is_err());
    }
}
