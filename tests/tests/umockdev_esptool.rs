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

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::container::{self, Machine};
use devbroker_tests::esptool;
use devbroker_tests::umockdev::{self, testdata, FT232R_BY_ID, FT232R_NODE};
use devbroker_tests::*;

const MAC: &str = "24:0a:c4:12:34:56";
const S: Duration = Duration::from_secs(1);

/// The board, for `machine` only.
fn config(machine: &str) -> String {
    format!(
        r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["{machine}"]

[[board.tty]]
name = "console"
match = {{ usb = "0403:6001", serial = "A1B2C3" }}

[[machine]]
name = "{machine}"
"#
    )
}

/// An emulated ESP32 behind the emulated FT232R, served to a machine.
struct Rig {
    w: World,
    venv: PathBuf,
    /// The guest link of a devshim serve on the host (machine ci1).
    link: PathBuf,
    log: PathBuf,
    _shim: Option<Proc>,
    broker: Option<Proc>,
    _chip: Proc,
    _tb: umockdev::UMockdev,
}

impl Rig {
    /// The esptool 5 venv; `None` (test skipped) when esptool can't be
    /// installed here.
    fn venv() -> Option<PathBuf> {
        match esptool::venv(esptool::V5) {
            Ok(v) => Some(v),
            Err(e) => {
                skip(&format!(
                    "esptool {} can't be installed here: {e}",
                    esptool::V5
                ));
                None
            }
        }
    }

    /// The board for machine ci1 with a devshim serve on the host, or (with
    /// `machine`) for that machine, whose devshim runs in its container.
    fn new(tb: umockdev::UMockdev, machine: Option<&str>) -> Option<Rig> {
        let venv = Rig::venv()?;
        tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
            .unwrap();
        let line = tb.emulate_serial(FT232R_NODE, &[&format!("/dev/serial/by-id/{FT232R_BY_ID}")]);
        let (edges_r, edges_w) = nix::unistd::pipe().unwrap();
        line.tell_edges(edges_w);
        let w = World::new(&config(machine.unwrap_or("ci1")));
        let log = w.path("chip.log");
        let board = tb.dev_fd(FT232R_NODE).expect("the adapter's pty");
        use std::os::fd::AsRawFd;
        let chip = esptool::responder(
            board.as_raw_fd(),
            Some(edges_r.as_raw_fd()),
            MAC,
            &log,
            &w.path("chip-stderr.log"),
        );
        drop(edges_r);
        // A container's machine is set up before the broker starts.
        let broker = machine.is_none().then(|| w.broker_udev());
        let link = w.guest_link("ci1", FT232R_BY_ID);
        let shim = machine.is_none().then(|| {
            let shim = w.shim("ci1");
            wait_for(5 * S, "the guest link", || exists(&link));
            w.endpoint_port("ci1", &link);
            shim
        });
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_for(10 * S, "the chip to start", || said().contains("ready"));
        Some(Rig {
            w,
            venv,
            link,
            log,
            _shim: shim,
            broker,
            _chip: chip,
            _tb: tb,
        })
    }

    /// What the chip saw, boots and requests, minus register traffic.
    fn chip_said(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                !["read_reg", "write_reg", "mem_", "edge"]
                    .iter()
                    .any(|p| l.starts_with(p))
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
        // The chip boots its firmware once EN has been up for its RC delay,
        // after esptool's hard reset returned.
        wait_for(
            10 * S,
            &format!("the chip to boot after esptool's hard reset\n{report}"),
            || {
                self.chip_said()
                    .last()
                    .is_some_and(|l| l.starts_with("boot"))
            },
        );
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
        // In the ROM loader it answered esptool's sync first (requests
        // before were ignored: it ran its firmware or sat in reset).
        let rom = said.iter().rposition(|l| l == "boot download").unwrap();
        let first = said[rom + 1..].iter().find(|l| !l.starts_with("ignored"));
        assert_eq!(first.map(String::as_str), Some("sync"), "{report}");
        stdout
    }
}

#[test]
fn esptool5_read_mac_and_write_flash_under_devshim_run() {
    let tb = umockdev::testbed!();
    let t0 = Instant::now();
    let Some(rig) = Rig::new(tb, None) else {
        return;
    };
    let link = rig.link.display().to_string();
    let devshim_run = || devshim_run(&rig.w.state_dir("ci1"));

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
    let Some(rig) = Rig::new(tb, None) else {
        return;
    };
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
}

/// The same jobs as the job user of a booted container (tier 3 on tier 2):
/// the broker on the host under umockdev, devshim as the container's
/// service, esptool 5 (the host's venv, bound read-only) under `devshim
/// run` and under `sai-device` — inside nspawn's own seccomp filter, and
/// with `-U` in the other test.
fn esptool5_in_a_booted_container(tb: umockdev::UMockdev, private_users: bool) {
    let name = format!(
        "dbe{}{}",
        u8::from(private_users),
        std::process::id() % 10000
    );
    let Some(rig) = Rig::new(tb, Some(&name)) else {
        return;
    };
    let mut rig = rig;
    let m = Machine::setup(&rig.w, &name);
    rig.broker = Some(rig.w.broker_udev());
    let job_dir = rig.w.path("job");
    std::fs::create_dir_all(&job_dir).unwrap();
    let data = random_bytes(8 * 1024, 8);
    std::fs::write(job_dir.join("app.bin"), &data).unwrap();
    // The admin's own binds, next to the one setup made (a --bind on the
    // command line would override the file's).
    let mut nspawn = std::fs::OpenOptions::new()
        .append(true)
        .open(&m.nspawn_file)
        .unwrap();
    use std::io::Write;
    write!(
        nspawn,
        "\n[Files]\nBindReadOnly={}:/opt/esptool5\nBindReadOnly={}:/srv/job\n",
        rig.venv.display(),
        job_dir.display()
    )
    .unwrap();
    let c = m.boot(private_users, &[]);
    let link = format!("/dev/serial/by-id/{FT232R_BY_ID}");
    let t0 = Instant::now();
    while !c.exec(&["test", "-e", &link]).unwrap().status.success() {
        assert!(
            t0.elapsed() < 10 * S,
            "no {link} inside:\n{}\n{}\n{}",
            c.log(),
            {
                let o = c.exec(&["sh", "-c", "exec 2>&1; journalctl -u devshim --no-pager; ls -la /run/devbroker /dev/serial/by-id; findmnt /run/devbroker; cat /proc/37/status | grep -i seccomp"]).unwrap();
                String::from_utf8_lossy(&o.stdout).into_owned()
            },
            rig.w.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ln = c
        .exec(&["ln", "-sf", "devshim", "/usr/local/bin/sai-device"])
        .unwrap();
    assert!(ln.status.success());
    let esptool = "/opt/esptool5/bin/python -m esptool";

    // devshim run, as a shell that took no lease would.
    let since = rig.chip_said().len();
    let out = c
        .exec_as(
            "sai",
            &[
                "devshim",
                "run",
                "--",
                "sh",
                "-c",
                &format!("{esptool} -p {link} read-mac"),
            ],
        )
        .unwrap();
    let stdout = rig.check(&out, since);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("MAC:") && l.trim_end().ends_with(MAC)),
        "{}\n{}",
        rig.report(Some(&out)),
        c.log()
    );

    // The Sai job of the README, esptool in place of idf.py.
    let since = rig.chip_said().len();
    let job = format!("{esptool} -p \"$ESPPORT\" write-flash 0x10000 /srv/job/app.bin");
    let out = c
        .exec_as(
            "sai",
            &["sai-device", "esp32", "ESPPORT=0", "sh", "-c", &job],
        )
        .unwrap();
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
    drop(c);
}

/// Whether containers can be booted here and esptool had; the tree and
/// the venv are made (once, cached) before the child under umockdev runs.
fn container_prerequisites() -> bool {
    if let Some(why) = container::skip_reason() {
        skip(&why);
        return false;
    }
    container::base_tree().expect("the container tree");
    Rig::venv().is_some()
}

#[test]
fn esptool5_in_a_booted_container_job() {
    if !container_prerequisites() {
        return;
    }
    let tb = umockdev::testbed!();
    esptool5_in_a_booted_container(tb, false);
}

#[test]
fn esptool5_in_a_booted_container_with_private_users() {
    if !container_prerequisites() {
        return;
    }
    let tb = umockdev::testbed!();
    esptool5_in_a_booted_container(tb, true);
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
