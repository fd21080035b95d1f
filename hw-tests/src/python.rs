//! A python3 with pyserial for the guest, so a tier-4 job can run an
//! unchanged pyserial script: the host's interpreter, and exactly the
//! modules (and their cached bytecode) that starting it and `import serial`
//! load, as the host's python3 reports them. A few dozen files rather than
//! the 22 MB standard library.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The interpreter the guest runs as `/usr/bin/python3`.
pub const PYTHON: &str = "/usr/bin/python3";

/// What the host's python3 loads for a pyserial script: every module file
/// and its bytecode, then the interpreter's own path last.
const LIST: &str = r#"
import importlib.util, os, sys
import serial, serial.serialposix, termios, fcntl, select, struct, time
files = set()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if not f:
        continue
    files.add(f)
    if f.endswith(".py"):
        files.add(importlib.util.cache_from_source(f))
for f in sorted(files):
    if os.path.exists(f):
        print(f)
print(os.path.realpath(sys.executable))
"#;

/// The files, as host paths: `(modules, interpreter)`. An error says what
/// to install.
pub fn files() -> Result<(Vec<PathBuf>, PathBuf)> {
    let out = Command::new(PYTHON)
        .args(["-c", LIST])
        .env_remove("PYTHONPATH")
        .env_remove("LD_PRELOAD")
        .output()
        .with_context(|| format!("running {PYTHON}"))?;
    if !out.status.success() {
        bail!(
            "{PYTHON} can't import serial ({}): apt-get install python3-serial",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut lines: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    let exe = lines.pop().context("no interpreter path")?;
    Ok((lines, exe))
}
