//! avrdude on the plain guest path (tier 2): `avrdude -c arduino` resets
//! the board with a DTR pulse of its own, then talks STK500 to the
//! bootloader. Here an emulated Arduino Uno (`tests/optiboot_responder.py`:
//! optiboot behind the Uno's DTR auto-reset capacitor, fed with the
//! emulated FT232R's DTR changes) is already running its sketch — a console
//! holds the pty, so avrdude's open raises nothing — and answers only after
//! avrdude's own pulse reaches the adapter through `devshim run`.
//!
//! Without the supervisor avrdude's DTR calls fail (`ENOTTY`), the board
//! never resets and avrdude is not in sync.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::container;
use devbroker_tests::umockdev::{self, testdata, FT232R_BY_ID, FT232R_NODE};
use devbroker_tests::*;

const S: Duration = Duration::from_secs(1);

const CONFIG: &str = r#"
[[board]]
name = "uno1"
machines = ["ci1"]

[[board.tty]]
name = "console"
rate = 115200
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// An Intel HEX image of `data` at address 0.
fn ihex(data: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in data.chunks(16).enumerate() {
        let addr = (i * 16) as u16;
        let mut rec = vec![chunk.len() as u8, (addr >> 8) as u8, addr as u8, 0];
        rec.extend_from_slice(chunk);
        let sum = rec.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        rec.push(sum.wrapping_neg());
        out += ":";
        for b in rec {
            out += &format!("{b:02X}");
        }
        out += "\n";
    }
    out + ":00000001FF\n"
}

#[test]
fn avrdude_arduino_resets_the_board_by_dtr_under_devshim_run() {
    let tb = umockdev::testbed!();
    if container::find_program("avrdude").is_none() {
        skip("avrdude is not installed (apt-get install avrdude)");
        return;
    }
    tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
        .unwrap();
    let line = tb.emulate_serial(FT232R_NODE, &[&format!("/dev/serial/by-id/{FT232R_BY_ID}")]);
    let (edges_r, edges_w) = nix::unistd::pipe().unwrap();
    line.tell_edges(edges_w);
    let w = World::new(CONFIG);
    let log = w.path("uno.log");
    let board = tb.dev_fd(FT232R_NODE).expect("the adapter's pty");
    let _uno = {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (b, e) = (board.as_raw_fd(), edges_r.as_raw_fd());
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/optiboot_responder.py"
        ))
        .arg(&log)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.path("uno-stderr.log")).unwrap())
        .die_with_parent();
        // SAFETY: fcntl and dup2 are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let (b2, e2) = (
                    libc::fcntl(b, libc::F_DUPFD_CLOEXEC, 10),
                    libc::fcntl(e, libc::F_DUPFD_CLOEXEC, 10),
                );
                if b2 < 0 || e2 < 0 || libc::dup2(b2, 3) < 0 || libc::dup2(e2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Proc {
            child: cmd.spawn().unwrap(),
            name: "optiboot".into(),
        }
    };
    drop(edges_r);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(10 * S, "the Uno to start", || said().contains("ready"));
    let _broker = w.broker_udev();
    let _shim = w.shim("ci1");
    let link = w.guest_link("ci1", FT232R_BY_ID);
    wait_for(5 * S, "the guest link", || exists(&link));
    w.endpoint_port("ci1", &link);

    // A console holds the port: the session's open reset the board, whose
    // bootloader then gave way to the sketch.
    let _console = Tool::open(&link).unwrap();
    // The sketch starts after optiboot's watchdog (3 s) of silence.
    wait_for(20 * S, "the open's reset, then the sketch", || {
        said()
            .lines()
            .collect::<Vec<_>>()
            .ends_with(&["reset", "sketch"])
    });
    let before = said().lines().count();

    let image: Vec<u8> = random_bytes(256, 7);
    let hex = w.path("sketch.hex");
    std::fs::write(&hex, ihex(&image)).unwrap();
    let t0 = Instant::now();
    let out = devshim_run(&w.state_dir("ci1"))
        .args([
            "avrdude", "-c", "arduino", "-p", "m328p", "-b", "115200", "-P",
        ])
        .arg(&link)
        .arg("-D")
        .arg(format!("-Uflash:w:{}:i", hex.display()))
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .die_with_parent()
        .output()
        .unwrap();
    let uno: Vec<String> = said().lines().skip(before).map(str::to_owned).collect();
    let report = format!(
        "avrdude: {}\n{}\nthe Uno after the sketch started:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        uno.join("\n"),
        w.logs()
    );
    assert!(out.status.success(), "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0x1e950f"), "{report}");
    assert!(stderr.contains("256 bytes of flash verified"), "{report}");
    // avrdude's own pulse reset the board, and it talked to the bootloader.
    assert_eq!(uno.first().map(String::as_str), Some("reset"), "{report}");
    assert_eq!(uno.get(1).map(String::as_str), Some("sync"), "{report}");
    assert!(uno.iter().any(|l| l == "prog_page 0x0000 128"), "{report}");
    assert!(uno.iter().any(|l| l == "read_page 0x0080 128"), "{report}");
    println!("avrdude -c arduino under devshim run: {:?}", t0.elapsed());
}
