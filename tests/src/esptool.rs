//! esptool for the tests: a pinned version from PyPI in a venv made once
//! per machine, and the ESP32 ROM-loader responder
//! (`tests/esp_rom_responder.py`) on the board side of a port.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{container, DieWithParent, Proc};

/// The esptool the RFC 2217 endpoint test runs.
pub const V4: &str = "4.8.1";
/// The esptool 5 the plain-path tests run (the newest 5.x on PyPI when
/// they were written).
pub const V5: &str = "5.6.0";

/// Runs `cmd`; on failure, says why with the last lines of its output.
fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "{what} failed ({}): {}",
        out.status,
        tail.join(" | ")
    ))
}

/// True when `venv`'s python imports esptool at `version`.
fn venv_works(venv: &Path, version: &str) -> bool {
    Command::new(venv.join("bin/python"))
        .args([
            "-c",
            &format!("import esptool, sys; sys.exit(esptool.__version__ != {version:?})"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A venv with esptool `version`, made once per machine under the
/// test cache (`$DEVBROKER_TEST_CACHE` or /var/cache/devbroker-tests, else
/// the temp dir when that is not writable), under a file lock, built in a
/// temp dir and renamed into place. Run it as `VENV/bin/python -m esptool`:
/// the venv's scripts name the temp dir in their `#!` line, its python finds
/// the venv by its own location.
pub fn venv(version: &str) -> Result<PathBuf, String> {
    let mut cache = container::cache_dir();
    if std::fs::create_dir_all(&cache).is_err()
        || nix::unistd::access(&cache, nix::unistd::AccessFlags::W_OK).is_err()
    {
        cache = std::env::temp_dir().join("devbroker-tests");
        std::fs::create_dir_all(&cache)
            .map_err(|e| format!("creating {}: {e}", cache.display()))?;
    }
    let venv = cache.join(format!("esptool-venv-{version}"));
    if venv_works(&venv, version) {
        return Ok(venv);
    }
    let _lock = container::FileLock::exclusive(&cache.join(format!("esptool-venv-{version}.lock")))
        .map_err(|e| format!("{e:#}"))?;
    if venv_works(&venv, version) {
        return Ok(venv);
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".esptool-venv-{version}-"))
        .tempdir_in(&cache)
        .map_err(|e| format!("temp dir in {}: {e}", cache.display()))?;
    let build = tmp.path().join("venv");
    run(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&build),
        "/usr/bin/python3 -m venv (apt-get install python3-venv)",
    )?;
    run(
        Command::new(build.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--retries",
                "1",
                "--timeout",
                "15",
                &format!("esptool=={version}"),
            ])
            .env("PIP_NO_INPUT", "1"),
        &format!("pip install esptool=={version}"),
    )?;
    if !venv_works(&build, version) {
        return Err(format!(
            "esptool {version} does not import in {}",
            build.display()
        ));
    }
    // A broken leftover (the check above failed) makes way for the new one.
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::rename(&build, &venv).map_err(|e| format!("renaming into {}: {e}", venv.display()))?;
    if !venv_works(&venv, version) {
        return Err(format!(
            "esptool does not import from {} after the rename",
            venv.display()
        ));
    }
    Ok(venv)
}

/// Starts the responder: `board` (the board side of the port) becomes its
/// fd 3, and `edges`, if given (the read end of a pipe of DTR/RTS changes),
/// its fd 4, which puts the chip behind its reset circuit. It logs requests
/// to `log`, its stderr to `stderr`.
pub fn responder(board: RawFd, edges: Option<RawFd>, mac: &str, log: &Path, stderr: &Path) -> Proc {
    use std::os::unix::process::CommandExt;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("esp_rom_responder.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(&script).arg(log).arg(mac);
    if edges.is_some() {
        cmd.arg("4");
    }
    cmd.env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .die_with_parent();
    // SAFETY: dup/dup2/fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first, so a source numbered 3 or 4 is not
            // overwritten before it is placed.
            let b = libc::fcntl(board, libc::F_DUPFD_CLOEXEC, 10);
            let e = edges.map(|e| libc::fcntl(e, libc::F_DUPFD_CLOEXEC, 10));
            if b < 0 || e.is_some_and(|e| e < 0) {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(b, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(e) = e {
                if libc::dup2(e, 4) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Proc {
        child: cmd.spawn().unwrap(),
        name: "esp_rom_responder".into(),
    }
}
