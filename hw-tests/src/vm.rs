//! One QEMU guest: the host's kernel and the test initramfs on an emulated
//! PC with an xHCI controller, FT232 adapters whose lines are host ptys, the
//! kernel console in a file, the test's shell and QMP on unix sockets, and
//! the `usb_serial_*` trace in a file.
//!
//! KVM is not used: it is often missing or unusable in CI virtual machines,
//! and TCG with one thread per vCPU boots this guest in seconds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{Context, Result};
use devbroker_tests::DieWithParent;

/// An FT232 plugged in at boot.
#[derive(Debug, Clone)]
pub struct UsbSerial {
    /// The host tty QEMU relays the adapter's line to.
    pub line: PathBuf,
    /// Its USB serial number (the by-id name's last part before `-if00`).
    pub serial: String,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct Spec {
    pub qemu: PathBuf,
    /// Passed to `-kernel`.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub usb_serials: Vec<UsbSerial>,
}

/// A running guest, killed when dropped.
pub struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

/// Guest memory: the initramfs (~40 MiB) is unpacked into RAM.
const MEMORY_MIB: u32 = 512;

impl Vm {
    pub fn boot(spec: &Spec) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix("devbroker-hw-vm-")
            .tempdir()
            .context("creating the guest's directory")?;
        let p = |name: &str| dir.path().join(name);
        let mut cmd = Command::new(&spec.qemu);
        cmd.args([
            "-accel",
            "tcg,thread=multi",
            "-smp",
            "1",
            "-m",
            &MEMORY_MIB.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&spec.kernel)
        .arg("-initrd")
        .arg(&spec.initramfs)
        // panic=-1 with -no-reboot: a guest whose init dies ends QEMU at once.
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1 quiet"])
        .arg("-chardev")
        .arg(format!(
            "file,id=console,path={}",
            p("console.log").display()
        ))
        .args(["-serial", "chardev:console"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=shell,path={},server=on,wait=off",
            p("shell.sock").display()
        ))
        .args(["-serial", "chardev:shell"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            p("qmp.sock").display()
        ))
        .args(["-trace", "usb_serial_*", "-D"])
        .arg(p("trace.log"))
        .args(["-device", "qemu-xhci,id=xhci"]);
        for (i, usb) in spec.usb_serials.iter().enumerate() {
            cmd.arg("-chardev")
                .arg(format!("serial,id=line{i},path={}", usb.line.display()))
                .arg("-device")
                .arg(format!(
                    "usb-serial,chardev=line{i},serial={},id=usb{i}",
                    usb.serial
                ));
        }
        let log = fs::File::create(p("qemu.log"))?;
        let child = cmd
            .die_with_parent()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", spec.qemu.display()))?;
        Ok(Vm { child, dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn shell_socket(&self) -> PathBuf {
        self.path("shell.sock")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.path("qmp.sock")
    }

    /// The kernel console: boot messages and what init says.
    pub fn console(&self) -> String {
        read_lossy(&self.path("console.log"))
    }

    /// QEMU's own messages (bad options, a missing file).
    pub fn qemu_log(&self) -> String {
        read_lossy(&self.path("qemu.log"))
    }

    /// The `usb_serial_*` trace so far (see [`crate::trace`]).
    pub fn trace(&self) -> String {
        read_lossy(&self.path("trace.log"))
    }

    /// QEMU's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
