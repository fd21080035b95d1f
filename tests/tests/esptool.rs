//! esptool through devshim's RFC 2217 endpoint: a pinned esptool (from PyPI,
//! in a venv made once per machine) runs `read_mac` with `--baud 460800`
//! over `rfc2217://127.0.0.1:PORT?ign_set_control` against a small ESP32
//! ROM-loader responder (`tests/esp_rom_responder.py`) behind the fake
//! board: reset through DTR/RTS, sync, chip detection, eFuse reads, the stub
//! upload, the switch to 460800 (which must reach the board's termios) and
//! the flash ID all go through the broker and devshim.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devbroker_tests::esptool;
use devbroker_tests::*;

/// The esptool the test runs, pinned so the protocol it speaks is known.
const ESPTOOL_VERSION: &str = esptool::V4;
const FTDI: &str = "usb-FTDI_FT232R_USB_UART_E5P32A-if00-port0";
const MAC: &str = "24:0a:c4:12:34:56";
const S: Duration = Duration::from_secs(1);

/// A board only machine ci1 uses: its socket is there without a lease.
const DEDICATED: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_E5P32A-if00-port0" }
"#;

#[test]
fn esptool_read_mac_at_460800_through_the_endpoint() {
    let t0 = Instant::now();
    let venv = match esptool::venv(ESPTOOL_VERSION) {
        Ok(v) => v,
        Err(e) => {
            skip(&format!("esptool can't be installed here: {e}"));
            return;
        }
    };
    println!(
        "esptool {ESPTOOL_VERSION} venv {} ready in {:?}",
        venv.display(),
        t0.elapsed()
    );

    let w = World::new(DEDICATED);
    let board = w.plug(FTDI);
    let _broker = w.broker();
    let _shim = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    let port = w.endpoint_port("ci1", &link);

    let resp_log = w.path("responder.log");
    let _responder = esptool::responder(
        board.master_fd(),
        None,
        MAC,
        &resp_log,
        &w.path("responder-stderr.log"),
    );
    let said = || std::fs::read_to_string(&resp_log).unwrap_or_default();
    wait_for(10 * S, "the responder to start", || {
        said().contains("ready")
    });

    // The rates the board's termios goes through while esptool runs.
    let rates = Mutex::new(Vec::<u32>::new());
    let done = AtomicBool::new(false);
    let t1 = Instant::now();
    let (status, stdout, stderr) = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let r = board.baud();
                let mut v = rates.lock().unwrap();
                if v.last() != Some(&r) {
                    v.push(r);
                }
                drop(v);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let mut child = Command::new(venv.join("bin/python"))
            .args(["-m", "esptool", "--chip", "esp32", "--port"])
            .arg(format!("rfc2217://127.0.0.1:{port}?ign_set_control"))
            .args([
                "--baud",
                "460800",
                "--before",
                "default_reset",
                "--after",
                "hard_reset",
                "read_mac",
            ])
            // No esptool.cfg/setup.cfg of the checkout or the user's settings.
            .current_dir(w.tmp.path())
            .env("HOME", w.tmp.path())
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("ESPTOOL_BEFORE")
            .env_remove("ESPTOOL_AFTER")
            .env_remove("ESPTOOL_BAUD")
            .env_remove("ESPTOOL_PORT")
            .env_remove("ESPTOOL_CHIP")
            .env_remove("ESPTOOL_CFGFILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .die_with_parent()
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out_t = s.spawn(move || {
            let mut v = String::new();
            let _ = out.read_to_string(&mut v);
            v
        });
        let err_t = s.spawn(move || {
            let mut v = String::new();
            let _ = err.read_to_string(&mut v);
            v
        });
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if t1.elapsed() > 60 * S {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        done.store(true, Ordering::Relaxed);
        (status, out_t.join().unwrap(), err_t.join().unwrap())
    });
    let took = t1.elapsed();
    let rates = rates.into_inner().unwrap();
    let report = format!(
        "esptool stdout:\n{stdout}\nesptool stderr:\n{stderr}\nboard rates seen: {rates:?}\n{}",
        w.logs()
    );
    let status = status.unwrap_or_else(|| panic!("esptool ran over 60 s\n{report}"));
    assert!(status.success(), "esptool failed: {status}\n{report}");
    println!("esptool read_mac took {took:?}; board rates {rates:?}");

    // What esptool found: the responder's chip, its MAC (read from the ROM
    // and again from the stub), and the switch to 460800.
    assert!(
        stdout.contains("Chip is ESP32-D0WD (revision v1.0)"),
        "{report}"
    );
    assert!(stdout.contains("Crystal is 40MHz"), "{report}");
    assert_eq!(
        stdout.matches(&format!("MAC: {MAC}")).count(),
        2,
        "{report}"
    );
    assert!(stdout.contains("Stub running..."), "{report}");
    assert!(
        stdout.contains("Changing baud rate to 460800\nChanged."),
        "{report}"
    );
    assert!(stdout.contains("Hard resetting via RTS pin..."), "{report}");
    assert!(!stdout.contains("Chip was NOT reset"), "{report}");

    // What the board side saw: a sync, the stub, the stub's baud rate
    // command (new rate, old rate), then the flash ID at the new rate.
    let said = said();
    let events: Vec<&str> = said
        .lines()
        .filter(|l| {
            !l.starts_with("read_reg") && !l.starts_with("write_reg") && !l.starts_with("mem_")
        })
        .collect();
    assert_eq!(
        events,
        [
            "ready",
            "sync",
            "stub",
            "change_baudrate 460800 115200",
            "spi_command 0x9f",
            "spi_command 0x5a"
        ],
        "{report}"
    );
    // The rate esptool set over RFC 2217 reached the board's port, after
    // the session started at 115200.
    let at = |r: u32| rates.iter().position(|&x| x == r);
    assert!(
        matches!((at(115200), at(460800)), (Some(a), Some(b)) if a < b),
        "the board never went from 115200 to 460800: {rates:?}\n{report}"
    );
}
