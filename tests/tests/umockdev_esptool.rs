//! esptool 5 on the plain guest path (tier 2): an unchanged `esptool -p
//! LINK read-mac` / `write-flash`, with its default `--before`/`--after`,
//! flashes an emulated ESP32 behind the emulated FT232R — under `devshim run`
//! and under `sai-device`.
//!
//! The chip (`tests/esp_rom_responder.py` with its reset circuit) sits
//! behind the classic two-transistor EN/IO0 circuit and sees the adapter's
//! DTR/RTS changes as the umockdev handler records them: it enters its ROM
//! loader only after esptool's own reset reaches the adapter, and otherwise
//! runs its firmware and ignores esptool. Without the supervisor esptool
//! warns "Chip was NOT reset" and fails to connect.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::esptool;
use devbroker_tests::umockdev::{self, testdata};
use devbroker_tests::*;

const BY_ID: &str = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";
const NODE: &str = "/dev/ttyUSB0";
const MAC: &str = "24:0a:c4:12:34:56";
const S: Duration = Duration::from_secs(1);

const CONFIG: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// An emulated ESP32 behind the emulated FT232R, served to machine ci1.
struct Rig {
    w: World,
    venv: PathBuf,
    link: PathBuf,
    log: PathBuf,
    _tb: umockdev::UMockdev,
    _broker: Proc,
    _shim: Proc,
    _chip: Proc,
}

impl Rig {
    /// `None` (test skipped) when esptool can't be installed here.
    fn new(tb: umockdev::UMockdev) -> Option<Rig> {
        let venv = match esptool::venv(esptool::V5) {
            Ok(v) => v,
            Err(e) if std::env::var_os("CI").is_some() => panic!("esptool {}: {e}", esptool::V5),
            Err(e) => {
                println!("skipped: esptool can't be installed here: {e}");
                return None;
            }
        };
        tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
            .unwrap();
        let line = tb.emulate_serial(NODE, &[&format!("/dev/serial/by-id/{BY_ID}")]);
        let (edges_r, edges_w) = nix::unistd::pipe().unwrap();
        line.tell_edges(edges_w);
        let w = World::new(CONFIG);
        let log = w.path("chip.log");
        let board = tb.dev_fd(NODE).expect("the adapter's pty");
        use std::os::fd::AsRawFd;
        let chip = esptool::responder(
            board.as_raw_fd(),
            Some(edges_r.as_raw_fd()),
            MAC,
            &log,
            &w.path("chip-stderr.log"),
        );
        drop(edges_r);
        let broker = w.broker_udev();
        let shim = w.shim("ci1");
        let link = w.guest_link("ci1", BY_ID);
        wait_for(5 * S, "the guest link", || exists(&link));
        w.endpoint_port("ci1", &link);
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_for(10 * S, "the chip to start", || said().contains("ready"));
        Some(Rig {
            w,
            venv,
            link,
            log,
            _tb: tb,
            _broker: broker,
            _shim: shim,
            _chip: chip,
        })
    }

    /// What the chip saw, boots and requests, minus register traffic.
    fn chip_said(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                !l.starts_with("read_reg") && !l.starts_with("write_reg") && !l.starts_with("mem_")
            })
            .map(str::to_owned)
            .collect()
    }

    /// `esptool ARGS` as a job runs it: no options beyond the port, no
    /// configuration of the checkout or user.
    fn esptool(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.venv.join("bin/python"));
        c.args(["-m", "esptool"]).args(args);
        c
    }

    /// Runs `cmd` (an esptool, under whatever wraps it) within 90 s.
    fn run(&self, cmd: &mut Command) -> Output {
        cmd.current_dir(self.w.tmp.path())
            .env("HOME", self.w.tmp.path())
            .env("PYTHONUNBUFFERED", "1")
            .env("NO_COLOR", "1")
            .env_remove("LD_PRELOAD");
        for v in ["BEFORE", "AFTER", "BAUD", "PORT", "CHIP", "CFGFILE"] {
            cmd.env_remove(format!("ESPTOOL_{v}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .die_with_parent()
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
        rx.recv_timeout(90 * S).unwrap_or_else(|_| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("esptool ran over 90 s\n{}", self.report(None))
        })
    }

    fn report(&self, out: Option<&Output>) -> String {
        let (o, e) = out
            .map(|o| {
                (
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
            .unwrap_or_default();
        format!(
            "esptool stdout:\n{o}\nesptool stderr:\n{e}\nthe chip:\n{}\n{}",
            self.chip_said().join("\n"),
            self.w.logs()
        )
    }

    /// Checks esptool's run: it succeeded, the chip entered its ROM loader
    /// through the reset (never "NOT reset"), and went back to its firmware
    /// with the hard reset after.
    fn check(&self, out: &Output, since: usize) -> String {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report = self.report(Some(out));
        assert!(
            out.status.success(),
            "esptool failed: {}\n{report}",
            out.status
        );
        assert!(!report.contains("NOT reset"), "{report}");
        let said = self.chip_said()[since..].to_vec();
        let boots: Vec<&str> = said
            .iter()
            .filter(|l| l.starts_with("boot") || *l == "reset")
            .map(String::as_str)
            .collect();
        // esptool's reset: EN low, then up with IO0 low; its hard reset
        // after: EN low, then up with IO0 high.
        assert!(
            boots.ends_with(&["reset", "boot download", "reset", "boot firmware"]),
            "boots {boots:?}\n{report}"
        );
        let rom = said.iter().position(|l| l == "boot download").unwrap();
        assert_eq!(
            said.get(rom + 1).map(String::as_str),
            Some("sync"),
            "{report}"
        );
        stdout
    }
}

#[test]
fn esptool5_read_mac_and_write_flash_under_devshim_run() {
    let tb = umockdev::testbed!();
    let t0 = Instant::now();
    let Some(rig) = Rig::new(tb) else { return };
    let link = rig.link.display().to_string();
    let devshim_run = || {
        let mut c = Command::new(devshim());
        c.arg("run")
            .arg("--state-dir")
            .arg(rig.w.state_dir("ci1"))
            .arg("--");
        c
    };

    // read-mac, as a job runs it.
    let since = rig.chip_said().len();
    let esp = rig.esptool(&["-p", &link, "read-mac"]);
    let out = rig.run(devshim_run().arg(esp.get_program()).args(esp.get_args()));
    let stdout = rig.check(&out, since);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("MAC:") && l.trim_end().ends_with(MAC)),
        "{}",
        rig.report(Some(&out))
    );
    println!(
        "esptool {} read-mac under devshim run: {:?}",
        esptool::V5,
        t0.elapsed()
    );

    // write-flash of a small image, verified by the chip's MD5.
    let image = rig.w.path("app.bin");
    let data = random_bytes(12 * 1024, 5);
    std::fs::write(&image, &data).unwrap();
    let since = rig.chip_said().len();
    let esp = rig.esptool(&[
        "-p",
        &link,
        "write-flash",
        "0x10000",
        image.to_str().unwrap(),
    ]);
    let t1 = Instant::now();
    let out = rig.run(devshim_run().arg(esp.get_program()).args(esp.get_args()));
    let stdout = rig.check(&out, since);
    let report = rig.report(Some(&out));
    assert!(stdout.contains("Hash of data verified"), "{report}");
    let md5 = format!("{:x}", md5(&data));
    assert!(
        rig.chip_said()
            .iter()
            .any(|l| l == &format!("flash_md5 0x10000 {} {md5}", data.len())),
        "{report}"
    );
    println!("esptool write-flash under devshim run: {:?}", t1.elapsed());
}

#[test]
fn esptool5_write_flash_under_sai_device() {
    let tb = umockdev::testbed!();
    let Some(rig) = Rig::new(tb) else { return };
    let sai = rig.w.path("bin/sai-device");
    std::fs::create_dir_all(sai.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(devshim(), &sai).unwrap();
    let image = rig.w.path("app.bin");
    let data = random_bytes(8 * 1024, 6);
    std::fs::write(&image, &data).unwrap();

    // The Sai job as the README writes it, esptool in place of idf.py.
    let since = rig.chip_said().len();
    let esptool = format!(
        "{} -m esptool -p \"$ESPPORT\" write-flash 0x10000 {}",
        rig.venv.join("bin/python").display(),
        image.display()
    );
    let out = rig.run(
        Command::new(&sai)
            .args(["esp32", "ESPPORT=0", "sh", "-c", &esptool])
            .env("DEVBROKER_DIR", rig.w.run.join("machines/ci1"))
            .env("DEVBROKER_LINK_ROOT", rig.w.guest("ci1"))
            .env("DEVBROKER_STATE_DIR", rig.w.state_dir("ci1")),
    );
    let stdout = rig.check(&out, since);
    assert!(
        stdout.contains("Hash of data verified"),
        "{}",
        rig.report(Some(&out))
    );
    let md5 = format!("{:x}", md5(&data));
    assert!(
        rig.chip_said()
            .iter()
            .any(|l| l == &format!("flash_md5 0x10000 {} {md5}", data.len())),
        "{}",
        rig.report(Some(&out))
    );
    let _ = Path::new("");
}

/// MD5 by `md5sum`, to check the chip's flash without a crate for it.
fn md5(data: &[u8]) -> Md5 {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    Md5(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string())
}

struct Md5(String);

impl std::fmt::LowerHex for Md5 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
