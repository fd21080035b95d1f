//! Line control on the plain guest path (tier 2): an unchanged tool opens
//! devshim's pty, under `devshim run`, and its DTR/RTS, break, modem-input
//! and framing calls act on the emulated FT232R (`umockdev::emulate_serial`)
//! that the broker opened through udev — each one already there when the
//! tool's call returns.
//!
//! Without the supervisor a pty answers `ENOTTY` to `TIOCM*` (pyserial
//! raises `OSError(25)`), ignores breaks and drops parity and data size:
//! every step here fails.

use std::process::Command;
use std::time::{Duration, Instant};

use devbroker_tests::stepped::Stepped;
use devbroker_tests::umockdev::{self, testdata, LineEvent, SerialLog, FT232R_BY_ID, FT232R_NODE};
use devbroker_tests::*;
use wire::rfc2217::parity;

const S: Duration = Duration::from_secs(1);

const CONFIG: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// pyserial's modem API on a path, step by step. Each step's line is
/// printed after the call returned.
const MODEM: &str = r#"
import serial, sys, termios
def step(*msg):
    print(*msg, flush=True)
    sys.stdin.readline()
s = serial.Serial(sys.argv[1], 115200, timeout=5)
step("open")
s.dtr = False
step("dtr", s.dtr)
s.rts = False
step("rts", s.rts)
s.dtr = True
step("dtr", s.dtr)
s.rts = True
step("rts", s.rts)
step("inputs", int(s.cts), int(s.dsr), int(s.ri), int(s.cd))
step("inputs", int(s.cts), int(s.dsr), int(s.ri), int(s.cd))
s.break_condition = True
step("break on")
s.break_condition = False
step("break off")
s.send_break(0.25)
step("send_break")
s.write(b"before 7E1\n")
s.parity = serial.PARITY_EVEN
step("parity", s.parity)
s.bytesize = serial.SEVENBITS
step("bytesize", s.bytesize)
c = termios.tcgetattr(s.fd)[2]
step("cflag", (c & termios.CSIZE) == termios.CS7, bool(c & termios.PARENB), bool(c & termios.PARODD))
s.baudrate = 460800
step("baudrate", s.baudrate)
s.write(b"7E1 at 460800\n")
s.flush()
step("wrote")
s.close()
step("closed")
"#;

/// `devshim run` for machine `machine` of `w`, logging its calls.
fn run_for(w: &World, machine: &str) -> Command {
    let mut c = devshim_run(&w.state_dir(machine));
    c.env("DEVSHIM_LOG", "debug");
    c
}

#[test]
fn pyserial_modem_api_on_the_pty_under_devshim_run() {
    let tb = umockdev::testbed!();
    let t0 = Instant::now();
    tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
        .unwrap();
    let by_id = format!("/dev/serial/by-id/{FT232R_BY_ID}");
    let line = tb.emulate_serial(FT232R_NODE, &[&by_id]);
    // The board drives CTS and DSR.
    line.set_inputs(libc::TIOCM_CTS | libc::TIOCM_DSR);
    let w = World::new(CONFIG);
    let _broker = w.broker_udev();
    let _shim = w.shim("ci1");
    let link = w.guest_link("ci1", FT232R_BY_ID);
    wait_for(5 * S, "the guest link", || exists(&link));
    w.endpoint_port("ci1", &link);

    let log = w.path("pyserial.log");
    let mut py = Stepped::start(
        run_for(&w, "ci1")
            .args(["/usr/bin/python3", "-c", MODEM])
            .arg(&link),
        &log,
    );
    let why = |line: &SerialLog| {
        format!(
            "the emulated line:\n{line:?}\ntool:\n{}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            w.logs()
        )
    };
    // Each call has reached the adapter by the time it returned: no waiting here.
    let step = |py: &mut Stepped, want: &str, line: &SerialLog, ok: &dyn Fn(&SerialLog) -> bool| {
        py.go();
        let got = py.line();
        assert_eq!(got.as_deref(), Some(want), "{}", why(line));
        assert!(ok(line), "after {want:?}: {}", why(line));
    };

    assert_eq!(py.line().as_deref(), Some("open"), "{}", why(&line));
    wait_for(5 * S, "the session to open the adapter", || {
        line.opens() == [by_id.clone()]
    });
    assert!(line.dtr() && line.rts(), "{}", why(&line));

    step(&mut py, "dtr False", &line, &|l| !l.dtr() && l.rts());
    // The broker's status shows the port's lines.
    let tty = &w.status()["boards"][0]["ttys"][0];
    assert_eq!(
        (tty["dtr"].as_bool(), tty["rts"].as_bool()),
        (Some(false), Some(true)),
        "{tty}"
    );
    step(&mut py, "rts False", &line, &|l| !l.dtr() && !l.rts());
    step(&mut py, "dtr True", &line, &|l| l.dtr() && !l.rts());
    step(&mut py, "rts True", &line, &|l| l.dtr() && l.rts());
    let modem: Vec<_> = line
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            LineEvent::Modem(bits) => Some(bits & (libc::TIOCM_DTR | libc::TIOCM_RTS)),
            _ => None,
        })
        .collect();
    let (d, r) = (libc::TIOCM_DTR, libc::TIOCM_RTS);
    assert!(
        modem.ends_with(&[r, 0, d, d | r]),
        "modem changes {modem:?}: {}",
        why(&line)
    );

    // The inputs as the board drives them, read fresh from the port.
    step(&mut py, "inputs 1 1 0 0", &line, &|_| true);
    line.set_inputs(libc::TIOCM_RI | libc::TIOCM_CD);
    step(&mut py, "inputs 0 0 1 1", &line, &|_| true);

    // Break on and off, then pyserial's timed break (tcsendbreak: 100 ms).
    step(&mut py, "break on", &line, &|l| {
        l.breaks()
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>()
            == [LineEvent::BreakOn]
    });
    step(&mut py, "break off", &line, &|l| l.breaks().len() == 2);
    step(&mut py, "send_break", &line, &|l| l.breaks().len() == 4);
    let b = line.breaks();
    assert_eq!(
        b.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        [
            LineEvent::BreakOn,
            LineEvent::BreakOff,
            LineEvent::BreakOn,
            LineEvent::BreakOff
        ],
        "{}",
        why(&line)
    );
    let held = b[3].0 - b[2].0;
    assert!(
        held >= Duration::from_millis(90) && held < 5 * S,
        "the break lasted {held:?}: {}",
        why(&line)
    );

    // Framing: on the adapter when the call returns, after the bytes before it.
    let board = tb.dev_fd(FT232R_NODE).expect("the adapter's pty");
    use std::os::fd::AsRawFd;
    step(&mut py, "parity E", &line, &|l| {
        l.termios().map(|t| t.settings().parity) == Some(parity::EVEN)
    });
    let got = read_exact_timeout(board.as_raw_fd(), 11, 5 * S).unwrap();
    assert_eq!(got, b"before 7E1\n");
    step(&mut py, "bytesize 7", &line, &|l| {
        l.termios().map(|t| t.settings().data_size) == Some(7)
    });
    // tcgetattr answers what the tool set, as a UART would.
    step(&mut py, "cflag True True False", &line, &|_| true);
    step(&mut py, "baudrate 460800", &line, &|l| {
        l.termios().map(|t| t.settings().baud) == Some(460800)
    });
    let set = line.termios().unwrap().settings();
    assert_eq!(
        (set.baud, set.data_size, set.parity),
        (460800, 7, parity::EVEN),
        "{}",
        why(&line)
    );
    step(&mut py, "wrote", &line, &|_| true);
    let got = read_exact_timeout(board.as_raw_fd(), 14, 5 * S).unwrap();
    assert_eq!(got, b"7E1 at 460800\n");
    step(&mut py, "closed", &line, &|_| true);
    py.go();
    assert!(py.wait().success(), "{}", why(&line));
    assert!(line.failures().is_empty(), "{}", why(&line));

    // The broker logged each control it applied.
    let broker_log = std::fs::read_to_string(w.path("broker.log")).unwrap();
    for want in [
        "SET-CONTROL DTR off applied",
        "SET-CONTROL RTS off applied",
        "SET-CONTROL break on applied",
        "SetParity(3)",
        "SetDataSize(7)",
    ] {
        assert!(
            broker_log.contains(want),
            "no {want:?} in the broker's log: {}",
            why(&line)
        );
    }
    println!("pyserial modem API under devshim run: {:?}", t0.elapsed());
}
