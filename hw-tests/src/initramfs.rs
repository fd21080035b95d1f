//! The guest's whole userland, as an initramfs made from the host's files:
//! busybox, udevd with the distribution's serial rules and the project's,
//! the USB serial modules, the binaries under test with their libraries, and
//! python3 with pyserial (see [`crate::python`]) for unchanged tools.
//!
//! It is cached (see [`crate::cache`]) under a hash of every input, built
//! once under a lock while parallel tests wait for it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache;
use crate::cpio::Archive;
use crate::libs;
use crate::modules::{self, ModuleSet};
use crate::prereq::Host;

/// Bumped when the layout changes in a way the inputs' hashes can't see.
const FORMAT: &str = "hw-initramfs-1";

/// PID 1.
pub const INIT: &str = include_str!("init.sh");

/// Where the binaries under test go in the guest (on its PATH).
pub const GUEST_BIN: &str = "usr/local/bin";

/// Accounts for udev's `GROUP=` and devshim's `--user`: the groups the rules
/// name must exist, or udevd ignores them.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\ndialout:x:20:\ndevbroker:x:990:\n";

/// The binaries under test.
#[derive(Debug, Clone)]
pub struct Payload {
    pub devbroker: PathBuf,
    /// The static devshim that ships into containers.
    pub devshim: PathBuf,
    /// The project's udev rules file, installed as an admin would.
    pub udev_rules: PathBuf,
}

/// One file of the image and where it comes from.
struct Input {
    /// Path in the guest, without the leading `/`.
    at: String,
    from: PathBuf,
    how: How,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    /// A program, a library or the dynamic loader (executable: the kernel
    /// won't load an interpreter without the bit).
    Program,
    /// A program without its debug info: the debug build of the broker is
    /// mostly that.
    StrippedProgram,
    /// Rules and index files.
    Data,
    /// A kernel module, decompressed.
    Module,
}

impl How {
    fn mode(self) -> u32 {
        match self {
            How::Program | How::StrippedProgram => 0o755,
            How::Data | How::Module => 0o644,
        }
    }
}

/// The initramfs for `payload` on `host`'s kernel: its path in `cache_dir`,
/// built if no image of the same inputs is there yet.
pub fn build(host: &Host, payload: &Payload, cache_dir: &Path) -> Result<PathBuf> {
    let kver = &host.kernel.version;
    let mods = modules::resolve(&host.kernel.modules, modules::USB_SERIAL)?;
    let inputs = inputs(host, payload, &mods)?;
    let texts = texts(&mods);

    let mut h = cache::Hasher::new();
    h.str(FORMAT);
    h.str(kver);
    for tool in [Some(&host.depmod), host.strip.as_ref()]
        .into_iter()
        .flatten()
    {
        h.file(tool)?;
    }
    for i in &inputs {
        h.str(&i.at);
        h.file(&i.from)?;
    }
    for (at, text) in &texts {
        h.str(at);
        h.str(text);
    }
    let path = cache_dir.join(format!("initramfs-{kver}-{:016x}.cpio", h.finish()));
    if path.exists() {
        cache::touch(&path);
        return Ok(path);
    }
    let _lock = cache::lock(&cache_dir.join("initramfs.lock"))?;
    if path.exists() {
        return Ok(path);
    }
    let archive = assemble(host, &inputs, &texts)?;
    cache::write_atomically(&path, |f| archive.write(&mut std::io::BufWriter::new(f)))?;
    cache::prune(cache_dir, "initramfs-", 3);
    Ok(path)
}

/// Every host file that goes in, with the libraries of each binary.
fn inputs(host: &Host, payload: &Payload, mods: &ModuleSet) -> Result<Vec<Input>> {
    let mut by_path: BTreeMap<String, Input> = BTreeMap::new();
    let mut add = |at: String, from: &Path, how: How| {
        by_path.insert(
            at.clone(),
            Input {
                at,
                from: from.to_path_buf(),
                how,
            },
        );
    };
    let (py_modules, python) = crate::python::files()?;
    let binaries = [
        ("usr/bin/python3".to_string(), &python, How::Program),
        ("bin/busybox".to_string(), &host.busybox, How::Program),
        ("bin/udevadm".to_string(), &host.udevadm, How::Program),
        (
            format!("{GUEST_BIN}/devbroker"),
            &payload.devbroker,
            How::StrippedProgram,
        ),
        (
            format!("{GUEST_BIN}/devshim"),
            &payload.devshim,
            How::Program,
        ),
    ];
    for (at, from, how) in binaries {
        if !from.exists() {
            bail!(
                "{} is missing: build the workspace first (cargo build --workspace)",
                from.display()
            );
        }
        for lib in libs::needed(from)? {
            let at = lib.to_string_lossy().trim_start_matches('/').to_string();
            add(at, &lib, How::Program);
        }
        add(at, from, how);
    }
    for m in &py_modules {
        let at = m.to_string_lossy().trim_start_matches('/').to_string();
        if m.extension().is_some_and(|e| e == "so") {
            for lib in libs::needed(m)? {
                add(
                    lib.to_string_lossy().trim_start_matches('/').to_string(),
                    &lib,
                    How::Program,
                );
            }
            add(at, m, How::Program);
        } else {
            add(at, m, How::Data);
        }
    }
    for rule in &host.rules {
        let name = rule
            .file_name()
            .context("rules file name")?
            .to_string_lossy();
        add(format!("usr/lib/udev/rules.d/{name}"), rule, How::Data);
    }
    let name = payload
        .udev_rules
        .file_name()
        .context("rules file name")?
        .to_string_lossy();
    add(
        format!("etc/udev/rules.d/{name}"),
        &payload.udev_rules,
        How::Data,
    );
    let kdir = format!("lib/modules/{}", host.kernel.version);
    for (rel, from) in &mods.files {
        add(format!("{kdir}/{rel}"), from, How::Module);
    }
    // What depmod reads besides the modules themselves.
    for index in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let from = host.kernel.modules.join(index);
        if from.exists() {
            add(format!("{kdir}/{index}"), &from, How::Data);
        }
    }
    Ok(by_path.into_values().collect())
}

/// Files made here rather than copied.
fn texts(mods: &ModuleSet) -> Vec<(String, String)> {
    vec![
        ("init".into(), INIT.into()),
        ("etc/passwd".into(), PASSWD.into()),
        ("etc/group".into(), GROUP.into()),
        (
            "etc/hw-tests/modules".into(),
            mods.load.iter().map(|m| format!("{m}\n")).collect(),
        ),
    ]
}

fn assemble(host: &Host, inputs: &[Input], texts: &[(String, String)]) -> Result<Archive> {
    let mut a = Archive::new();
    for dir in ["proc", "sys", "dev", "run", "tmp", "root"] {
        a.dir(dir);
    }
    // The kernel opens it for init's stdio before init can mount devtmpfs.
    a.char_dev("dev/console", 5, 1);
    // udevadm is udevd when called by that name.
    a.symlink("lib/systemd/systemd-udevd", "/bin/udevadm");
    let staging = tempfile::tempdir().context("creating a staging directory for depmod")?;
    for i in inputs {
        let data = match i.how {
            How::Program | How::Data => {
                fs::read(&i.from).with_context(|| format!("reading {}", i.from.display()))?
            }
            How::StrippedProgram => strip(host, &i.from)?,
            How::Module => modules::read(&i.from)?,
        };
        if i.at.starts_with("lib/modules/") {
            let staged = staging.path().join(&i.at);
            fs::create_dir_all(staged.parent().expect("under lib/modules"))?;
            fs::write(&staged, &data)?;
        }
        a.file(&i.at, data, i.how.mode());
    }
    for (at, text) in texts {
        let mode = if at == "init" { 0o755 } else { 0o644 };
        a.file(at, text.clone().into_bytes(), mode);
    }
    for (at, data) in depmod(host, staging.path())? {
        a.file(&at, data, 0o644);
    }
    Ok(a)
}

/// The debug build without its debug info (a fifth of the size), or as it is
/// when there is no `strip`.
fn strip(host: &Host, bin: &Path) -> Result<Vec<u8>> {
    let Some(strip) = &host.strip else {
        return fs::read(bin).with_context(|| format!("reading {}", bin.display()));
    };
    let out = tempfile::NamedTempFile::new()?;
    let status = Command::new(strip)
        .arg("--strip-debug")
        .arg("-o")
        .arg(out.path())
        .arg(bin)
        .status()
        .with_context(|| format!("running {}", strip.display()))?;
    if !status.success() {
        bail!("{} --strip-debug {} failed", strip.display(), bin.display());
    }
    Ok(fs::read(out.path())?)
}

/// Runs `depmod -b` on the staged modules; returns the index files it made
/// (`modules.dep`, `modules.alias.bin`, ...), as paths in the guest.
fn depmod(host: &Host, staging: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let kver = &host.kernel.version;
    let out = Command::new(&host.depmod)
        .arg("-b")
        .arg(staging)
        .arg(kver)
        .output()
        .with_context(|| format!("running {}", host.depmod.display()))?;
    if !out.status.success() {
        bail!(
            "depmod -b {} {kver} failed: {}",
            staging.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = staging.join("lib/modules").join(kver);
    let mut made = Vec::new();
    for e in fs::read_dir(&dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("modules.") && e.path().is_file() {
            made.push((format!("lib/modules/{kver}/{name}"), fs::read(e.path())?));
        }
    }
    Ok(made)
}
