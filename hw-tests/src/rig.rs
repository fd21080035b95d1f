//! A tier 4 scenario's world: a QEMU guest whose kernel drives an emulated
//! FT232 (`ftdi_sio`), udevd naming it in `/dev/serial/by-id`, the broker
//! running on the udev source and devshim publishing the board's pty, as in
//! a container, under `/guest/dev`. The adapter's far end is a fake board (a
//! host pty): what the guest sends arrives on its master, its termios show
//! the baud the guest chose.
//!
//! [`scenario`] boots it, runs the test's body and, when anything fails,
//! says which scenario and appends the guest's console, the broker's and
//! devshim's logs, the kernel log and QEMU's trace.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use devbroker_tests::FakeBoard;

use crate::cache;
use crate::initramfs::{self, Payload};
use crate::prereq::{self, Host};
use crate::qmp::Qmp;
use crate::shell::{Output, Shell};
use crate::trace::{self, ModemCtrl};
use crate::vm::{self, Vm};

/// The board in the guest's config.
pub const BOARD: &str = "qemu1";
pub const TTY: &str = "console";
/// The machine devshim serves, as a container would be.
pub const MACHINE: &str = "vm";
/// The emulated adapter's USB serial number.
pub const SERIAL: &str = "A1B2C3";
/// The config's rate: a session starts at it, so the fake board seeing it
/// means the broker has opened the port for a session. QEMU opens its end
/// at 115200, so it can't be mistaken for that.
pub const RATE: u32 = 57600;
/// The broker's run directory and the machine's directory in it.
pub const RUN_DIR: &str = "/run/devbroker";
pub const MACHINE_DIR: &str = "/run/devbroker/machines/vm";
/// Where devshim makes its links: the container's `/dev`.
pub const LINK_ROOT: &str = "/guest/dev";

/// How long the guest gets to answer on its shell after QEMU starts.
const BOOT_LIMIT: Duration = Duration::from_secs(90);
/// How long one guest script may take unless a test says otherwise.
const SCRIPT_LIMIT: Duration = Duration::from_secs(60);

/// The by-id name udev gives QEMU's FT232 with USB serial number `serial`.
pub fn by_id(serial: &str) -> String {
    format!("usb-QEMU_QEMU_USB_SERIAL_{serial}-if00-port0")
}

/// devshim's link for the board in the guest: where a job opens it.
pub fn guest_link() -> String {
    format!("{LINK_ROOT}/serial/by-id/{}", by_id(SERIAL))
}

/// The broker's socket for the board in the machine directory.
pub fn socket() -> String {
    format!("{MACHINE_DIR}/{BOARD}.{TTY}.sock")
}

/// The guest's `devbroker.toml`.
pub fn config() -> String {
    format!(
        r#"[[board]]
name = "{BOARD}"
machines = ["{MACHINE}"]

[[board.tty]]
name = "{TTY}"
rate = {RATE}
match = {{ by-id = "{}", usb = "0403:6001" }}

[[machine]]
name = "{MACHINE}"
"#,
        by_id(SERIAL)
    )
}

/// Whether the adapter is plugged in when the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    AtBoot,
    /// Not plugged: the scenario plugs it over QMP.
    Later,
}

/// The booted world a scenario's body works in.
pub struct Rig {
    pub scenario: String,
    /// The far end of the adapter's line.
    pub board: FakeBoard,
    pub vm: Vm,
    pub shell: Shell,
    pub qmp: Qmp,
    _board_dir: tempfile::TempDir,
}

/// The kernel and initramfs to boot, made once per test process.
struct Images {
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
}

fn images(host: &Host) -> Result<&'static Images, String> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let t0 = Instant::now();
            let made = (|| -> Result<Images> {
                let dir = cache::dir()?;
                let payload = Payload {
                    devbroker: devbroker_tests::bin("devbroker"),
                    devshim: devbroker_tests::devshim(),
                    udev_rules: PathBuf::from(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../udev-rules/60-devbroker.rules"
                    )),
                };
                Ok(Images {
                    qemu: host.qemu.clone(),
                    kernel: host.kernel.bootable(&dir)?,
                    initramfs: initramfs::build(host, &payload, &dir)?,
                })
            })()
            .map_err(|e| format!("{e:#}"));
            println!("guest images ready in {:.1} s", t0.elapsed().as_secs_f64());
            made
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs one scenario: skips (or, under CI, fails) when the host lacks what
/// tier 4 needs, boots the guest with the broker and devshim running, and
/// runs `body`. Any failure names the scenario and carries the guest's logs.
pub fn scenario(name: &str, adapter: Adapter, body: impl FnOnce(&mut Rig) -> Result<()>) {
    let host = match prereq::find() {
        Ok(h) => h,
        Err(reason) => return prereq::skip(&reason),
    };
    let images =
        images(&host).unwrap_or_else(|e| panic!("scenario {name:?}: can't make the guest: {e}"));
    let t0 = Instant::now();
    let mut rig =
        Rig::start(name, images, adapter).unwrap_or_else(|e| panic!("scenario {name:?}: {e:#}"));
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
        let ready = rig.boot(adapter)?;
        let setup = t0.elapsed();
        let t1 = Instant::now();
        body(&mut rig)?;
        println!(
            "scenario {name:?}: guest shell after {:.1} s, broker and devshim up after {:.1} s, scenario {:.1} s",
            ready.as_secs_f64(),
            setup.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        Ok(())
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("scenario {name:?} failed: {e:#}\n{}", rig.diagnostics()),
        Err(panic) => {
            eprintln!(
                "scenario {name:?} failed (the panic above)\n{}",
                rig.diagnostics()
            );
            resume_unwind(panic)
        }
    }
}

impl Rig {
    /// Starts QEMU and connects to it; the guest boots meanwhile.
    fn start(name: &str, images: &Images, adapter: Adapter) -> Result<Rig> {
        let board_dir = tempfile::Builder::new()
            .prefix("devbroker-hw-board-")
            .tempdir()?;
        let board =
            FakeBoard::plug(board_dir.path(), "line").context("making the fake board's pty")?;
        let usb_serials = match adapter {
            Adapter::AtBoot => vec![vm::UsbSerial {
                line: board.slave_path.clone(),
                serial: SERIAL.into(),
            }],
            Adapter::Later => Vec::new(),
        };
        let mut vm = Vm::boot(&vm::Spec {
            qemu: images.qemu.clone(),
            kernel: images.kernel.clone(),
            initramfs: images.initramfs.clone(),
            usb_serials,
        })?;
        let connected =
            Shell::connect(&vm.shell_socket(), Duration::from_secs(10)).and_then(|shell| {
                Ok((
                    shell,
                    Qmp::connect(&vm.qmp_socket(), Duration::from_secs(10))?,
                ))
            });
        let (shell, qmp) = match connected {
            Ok(c) => c,
            Err(e) => {
                let exited = vm.exited();
                bail!(
                    "can't reach QEMU ({e:#}); QEMU exit status {exited:?}, its messages:\n{}",
                    vm.qemu_log()
                )
            }
        };
        Ok(Rig {
            scenario: name.into(),
            board,
            vm,
            shell,
            qmp,
            _board_dir: board_dir,
        })
    }

    /// Waits for the guest's shell, then starts the broker and devshim (and,
    /// with the adapter plugged, waits for its links). Returns how long the
    /// shell took to answer.
    fn boot(&mut self, adapter: Adapter) -> Result<Duration> {
        let Rig { shell, vm, .. } = self;
        let ready = shell.wait_ready(BOOT_LIMIT, || vm.exited().is_none())?;
        self.sh(&format!(
            r#"mkdir -p /etc/devbroker
cat > /etc/devbroker/devbroker.toml <<'EOF'
{config}EOF
NO_COLOR=1 DEVBROKER_LOG=debug devbroker run --config /etc/devbroker/devbroker.toml --source udev --run-dir {RUN_DIR} >/tmp/devbroker.log 2>&1 &
wait_path {MACHINE_DIR}/control.sock 30000 || exit 1
NO_COLOR=1 DEVSHIM_LOG=debug devshim serve --dir {MACHINE_DIR} --link-root {LINK_ROOT} --user root --state-dir /run/devshim >/tmp/devshim.log 2>&1 &
"#,
            config = config()
        ))
        .context("starting the broker and devshim in the guest")?;
        if adapter == Adapter::AtBoot {
            self.sh(&format!(
                "wait_path /dev/serial/by-id/{} 30000 && wait_path {} && wait_path {}",
                by_id(SERIAL),
                socket(),
                guest_link()
            ))
            .context(
                "waiting for the adapter's by-id link, the broker's socket and devshim's link",
            )?;
        }
        Ok(ready)
    }

    /// Runs a guest script that must succeed; returns its output.
    pub fn sh(&mut self, script: &str) -> Result<String> {
        let out = self.sh_status(script, SCRIPT_LIMIT)?;
        if out.status != 0 {
            bail!(
                "guest script failed with status {}:\n{script}\n--- its output:\n{}",
                out.status,
                out.text
            );
        }
        Ok(out.text)
    }

    /// Runs a guest script; returns its output and status.
    pub fn sh_status(&mut self, script: &str, limit: Duration) -> Result<Output> {
        self.shell.run(script, limit)
    }

    /// Waits until the fake board's line is at `baud` (QEMU applies the
    /// guest's setting to its host tty); returns how long it took.
    pub fn wait_baud(&self, baud: u32, limit: Duration, what: &str) -> Result<Duration> {
        crate::wait_value(limit, &format!("{what}: the board's baud"), baud, || {
            Ok(self.board.baud())
        })
    }

    /// The SET_MODEM_CTRL requests the emulated FT232 has received so far.
    pub fn modem_ctrl(&self) -> Vec<ModemCtrl> {
        trace::modem_ctrl(&self.vm.trace())
    }

    /// Everything that helps to understand a failure.
    pub fn diagnostics(&mut self) -> String {
        let guest = match self.shell.run(
            &format!(
                "for f in /tmp/devbroker.log /tmp/devshim.log; do echo \"--- $f\"; tail -n 60 $f; done\n\
                 echo '--- dmesg'; dmesg | tail -n 40\n\
                 echo '--- links and sockets'; ls -l /dev/serial/by-id {MACHINE_DIR} {LINK_ROOT}/serial/by-id 2>&1"
            ),
            Duration::from_secs(15),
        ) {
            Ok(out) => out.text,
            Err(e) => format!("(the guest's shell did not answer: {e:#})"),
        };
        let trace = self.vm.trace();
        let trace_tail: Vec<&str> = trace.lines().rev().take(40).collect();
        let trace_tail: Vec<&str> = trace_tail.into_iter().rev().collect();
        format!(
            "==== scenario {:?}: guest console (ttyS0)\n{}\n==== QEMU messages\n{}\n\
             ==== guest: broker and devshim logs, kernel log\n{}\n\
             ==== QEMU usb_serial trace (last 40 lines)\n{}\n==== QMP events\n{:?}\n==== fake board at {} baud",
            self.scenario,
            tail(&self.vm.console(), 64 * 1024),
            self.vm.qemu_log(),
            guest,
            trace_tail.join("\n"),
            self.qmp.events,
            self.board.baud()
        )
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut at = s.len().saturating_sub(max);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}
