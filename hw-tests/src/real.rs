//! Tier 5: the broker and devshim on the host against a real adapter.
//!
//! Opt-in: `DEVBROKER_HW_BY_ID` names the adapter by its link in
//! `/dev/serial/by-id`. Without a board wired to answer, what can honestly
//! be checked is what reaches the adapter's driver: the port opens, a baud
//! rate a tool sets on devshim's pty is the port's (`TCGETS2` on the device),
//! and DTR/RTS set through `devshim ctl` are the driver's (`TIOCMGET`). Bytes
//! both ways need TX wired to RX; `DEVBROKER_HW_LOOPBACK=1` says they are.
//!
//! The device is looked at through a second descriptor opened while the
//! broker holds the port: root (`CAP_SYS_ADMIN`) may open a port the broker
//! opened with `TIOCEXCL`, and a port opened twice is not hung up until both
//! are closed, so that descriptor is closed before the session ends.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use devbroker_tests::{Proc, Tool, World};

use crate::wait_value;

/// Names the adapter to test: its link's name in `/dev/serial/by-id`.
pub const BY_ID_VAR: &str = "DEVBROKER_HW_BY_ID";
/// Set to `1` when the adapter's TX is wired to its RX.
pub const LOOPBACK_VAR: &str = "DEVBROKER_HW_LOOPBACK";
/// Where udev makes the adapter's link.
pub const BY_ID_DIR: &str = "/dev/serial/by-id";

pub const BOARD: &str = "hw";
pub const TTY: &str = "console";
pub const MACHINE: &str = "hw";
/// The config's rate, which a session starts at.
pub const RATE: u32 = 115200;

/// The adapter named by [`BY_ID_VAR`], or `None` after printing how to name one.
pub fn adapter() -> Option<String> {
    match std::env::var(BY_ID_VAR) {
        Ok(name) if !name.is_empty() => Some(name),
        _ => {
            println!(
                "skipped: set {BY_ID_VAR}=usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0 (a name in {BY_ID_DIR}) \
                 to run this against a real adapter"
            );
            None
        }
    }
}

/// True when [`LOOPBACK_VAR`] says TX and RX are wired together.
pub fn looped() -> bool {
    std::env::var(LOOPBACK_VAR).is_ok_and(|v| v == "1")
}

/// One adapter, one broker: the tests of a process take turns with it.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The config for `by_id`: one board, one tty, one machine.
pub fn config(by_id: &str) -> String {
    format!(
        r#"[[board]]
name = "{BOARD}"
machines = ["{MACHINE}"]

[[board.tty]]
name = "{TTY}"
rate = {RATE}
match = {{ by-id = "{by_id}" }}

[[machine]]
name = "{MACHINE}"
"#
    )
}

/// The host broker on the real adapter, and devshim publishing it.
pub struct RealRig {
    pub world: World,
    pub by_id: String,
    _broker: Proc,
    _shim: Proc,
}

impl RealRig {
    /// Starts both and waits for devshim's link.
    pub fn start(by_id: &str) -> Result<RealRig> {
        let device = Path::new(BY_ID_DIR).join(by_id);
        if !device.exists() {
            bail!(
                "{BY_ID_VAR}={by_id}, but {} does not exist: plug the adapter in, or pick a name from `ls {BY_ID_DIR}`",
                device.display()
            );
        }
        let mut world = World::new(&config(by_id));
        // The broker as the host runs it: on the udev source when udevd
        // runs, else on the host's by-id directory (not the world's).
        let broker = if Path::new("/run/udev/control").exists() {
            world.broker_udev()
        } else {
            world.by_id = BY_ID_DIR.into();
            world.broker()
        };
        let shim = world.shim(MACHINE);
        let link = world.guest_link(MACHINE, by_id);
        if let Err(e) = wait_value(
            Duration::from_secs(10),
            &format!("devshim's link {} exists", link.display()),
            true,
            || Ok(link.exists()),
        ) {
            bail!("{e:#}\n{}", world.logs());
        }
        Ok(RealRig {
            world,
            by_id: by_id.into(),
            _broker: broker,
            _shim: shim,
        })
    }

    /// The adapter's device, through udev's link.
    pub fn device(&self) -> PathBuf {
        Path::new(BY_ID_DIR).join(&self.by_id)
    }

    /// devshim's pty for the adapter: where a job opens it.
    pub fn link(&self) -> PathBuf {
        self.world.guest_link(MACHINE, &self.by_id)
    }

    /// Opens devshim's pty as a tool does and waits until the session holds
    /// the port (the broker has opened it).
    pub fn open_session(&self) -> Result<Tool> {
        let tool = Tool::open(&self.link()).context("opening devshim's pty")?;
        wait_value(
            Duration::from_secs(10),
            "a session holds the adapter",
            true,
            || Ok(self.world.status()["boards"][0]["ttys"][0]["holder"].is_object()),
        )?;
        Ok(tool)
    }

    /// `devshim ctl BOARD STEPS...` on the machine's control socket; returns what it printed.
    pub fn ctl(&self, steps: &str) -> Result<String> {
        let out = Command::new(devbroker_tests::devshim())
            .args(["ctl", BOARD])
            .args(steps.split_whitespace())
            .arg("--dir")
            .arg(self.world.run.join("machines").join(MACHINE))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("devshim ctl {BOARD} {steps} failed: {text}");
        }
        Ok(text)
    }
}

/// The adapter's device opened beside the broker, to look at its settings
/// and modem lines. Open it only while a session holds the port, and drop
/// it before the session ends (see the module's doc).
pub struct Port {
    fd: OwnedFd,
}

impl Port {
    pub fn open(path: &Path) -> Result<Port> {
        let fd = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_NOCTTY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        );
        match fd {
            // SAFETY: a fresh descriptor from open, owned from here on.
            Ok(fd) => Ok(Port { fd: unsafe { OwnedFd::from_raw_fd(fd) } }),
            Err(nix::errno::Errno::EBUSY) => bail!(
                "{} is busy: the broker opened it exclusively (TIOCEXCL); run the tier 5 tests as root to look at it beside the broker",
                path.display()
            ),
            Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
        }
    }

    /// The port's baud rate.
    pub fn baud(&self) -> Result<u32> {
        Ok(wire::termios::get(&self.fd)?.c_ospeed)
    }

    /// (DTR, RTS) as the driver has them.
    pub fn modem_lines(&self) -> Result<(bool, bool)> {
        let mut bits: libc::c_int = 0;
        // SAFETY: TIOCMGET writes one int.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCMGET, &mut bits) } < 0 {
            return Err(std::io::Error::last_os_error()).context("TIOCMGET on the adapter");
        }
        Ok((bits & libc::TIOCM_DTR != 0, bits & libc::TIOCM_RTS != 0))
    }
}
