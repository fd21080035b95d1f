//! Line control from a flashing tool to the adapter, under umockdev (tier 2):
//! pyserial on devshim's `rfc2217://` endpoint drives DTR, RTS, break,
//! parity, data size and baud, and each one must reach the emulated
//! FT232R's line (`umockdev::emulate_serial` keeps its modem bits, breaks
//! and settings) through devshim, the broker's socket and the broker, which
//! found the adapter through udev and opened it by its by-id link.
//!
//! A pty (tier 1) can't show any of these; here a control the broker drops
//! or answers without applying fails the test.

use std::time::{Duration, Instant};

use devbroker_tests::stepped::Stepped as Py;
use devbroker_tests::umockdev::{self, testdata, LineEvent, SerialLog, FT232R_BY_ID, FT232R_NODE};
use devbroker_tests::*;
use wire::rfc2217::parity;

const S: Duration = Duration::from_secs(1);

/// The FT232R of the test data, named by USB id and serial number as
/// `devbroker boards --suggest` would.
const CONFIG: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// A flashing tool's session: each setter waits for the server's answer
/// and raises unless the answer is the value asked for.
const FLASHER: &str = r#"
import serial, sys
def step(*msg):
    print(*msg, flush=True)
    sys.stdin.readline()
s = serial.serial_for_url(sys.argv[1], baudrate=115200, timeout=5)
step("open")
s.dtr = False
step("dtr", s.dtr)
s.rts = False
step("rts", s.rts)
s.dtr = True
step("dtr", s.dtr)
s.rts = True
step("rts", s.rts)
s.send_break(0.25)
step("break")
s.parity = serial.PARITY_EVEN
step("parity", s.parity)
s.bytesize = serial.SEVENBITS
step("bytesize", s.bytesize)
s.baudrate = 460800
step("baudrate", s.baudrate)
s.write(b"7E1 at 460800\n")
s.flush()
step("wrote")
s.close()
step("closed")
"#;

#[test]
fn pyserial_line_controls_reach_the_adapter() {
    let tb = umockdev::testbed!();
    let t0 = Instant::now();
    tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
        .unwrap();
    let by_id = format!("/dev/serial/by-id/{FT232R_BY_ID}");
    let line = tb.emulate_serial(FT232R_NODE, &[&by_id]);
    let w = World::new(CONFIG);
    let _broker = w.broker_udev();
    let _shim = w.shim("ci1");
    let port = w.endpoint_port("ci1", &w.guest_link("ci1", FT232R_BY_ID));
    let url = format!("rfc2217://127.0.0.1:{port}");
    println!(
        "umockdev line control: endpoint up after {:?}",
        t0.elapsed()
    );

    let log = w.path("pyserial.log");
    let mut py = Py::python(FLASHER, &[&url], &log);
    let why = |line: &SerialLog| {
        format!(
            "the emulated line:\n{line:?}\npyserial:\n{}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            w.logs()
        )
    };
    let expect = |py: &mut Py, want: &str, line: &SerialLog| {
        let got = py.line();
        assert_eq!(got.as_deref(), Some(want), "{}", why(line));
    };
    // Waits up to a second for the line to show `ok`.
    let settle = |what: &str, line: &SerialLog, ok: &dyn Fn(&SerialLog) -> bool| {
        let t = Instant::now();
        while !ok(line) {
            assert!(t.elapsed() < S, "{what}: {}", why(line));
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    // The broker opened the adapter once, by its by-id link, and DTR and
    // RTS went up as the kernel raises them on open.
    expect(&mut py, "open", &line);
    settle("opened, DTR and RTS up", &line, &|l| {
        l.opens() == [by_id.clone()] && l.dtr() && l.rts()
    });
    let holder = w.holder("esp1");
    assert!(
        holder
            .as_deref()
            .is_some_and(|h| h.starts_with("machine ci1")),
        "{holder:?}"
    );

    // DTR and RTS, each way: the modem bits follow each setter.
    for (name, on, dtr, rts) in [
        ("dtr", false, false, true),
        ("rts", false, false, false),
        ("dtr", true, true, false),
        ("rts", true, true, true),
    ] {
        py.go();
        let label = if on { "True" } else { "False" };
        expect(&mut py, &format!("{name} {label}"), &line);
        settle(&format!("{name} {label}"), &line, &|l| {
            l.dtr() == dtr && l.rts() == rts
        });
    }
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

    // A 0.25 s break: on, then off about 0.25 s later.
    py.go();
    expect(&mut py, "break", &line);
    settle("break on and off", &line, &|l| l.breaks().len() >= 2);
    let breaks = line.breaks();
    assert_eq!(
        breaks.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        [LineEvent::BreakOn, LineEvent::BreakOff],
        "{}",
        why(&line)
    );
    let held = breaks[1].0 - breaks[0].0;
    assert!(
        held >= Duration::from_millis(200) && held < 2 * S,
        "the break lasted {held:?}: {}",
        why(&line)
    );

    // Parity, data size and baud: pyserial accepts each answer only when the
    // broker reports the value asked for, and the adapter has it.
    py.go();
    expect(&mut py, "parity E", &line);
    settle("even parity", &line, &|l| {
        l.termios().map(|t| t.settings().parity) == Some(parity::EVEN)
    });
    py.go();
    expect(&mut py, "bytesize 7", &line);
    settle("7 data bits", &line, &|l| {
        l.termios().map(|t| t.settings().data_size) == Some(7)
    });
    py.go();
    expect(&mut py, "baudrate 460800", &line);
    settle("460800 baud", &line, &|l| {
        l.termios().map(|t| t.settings().baud) == Some(460800)
    });
    let set = line.termios().unwrap().settings();
    assert_eq!(
        (set.baud, set.data_size, set.parity),
        (460800, 7, parity::EVEN),
        "{}",
        why(&line)
    );
    // HUPCL stays set: the kernel drops DTR and RTS when the broker closes.
    let cflag = line.termios().unwrap().cflag;
    assert_ne!(cflag & libc::HUPCL, 0, "{}", why(&line));
    // The backing pty has the rate too (it forces 8 bits, no parity).
    let board = tb.dev_fd(FT232R_NODE).expect("the adapter's pty");
    use std::os::fd::AsRawFd;
    let pty = wire::termios::get(&board).unwrap();
    assert_eq!(pty.c_ospeed, 460800);

    // Data still flows, at the new settings.
    py.go();
    expect(&mut py, "wrote", &line);
    let got = read_exact_timeout(board.as_raw_fd(), 14, 5 * S)
        .unwrap_or_else(|e| panic!("the adapter: {e}: {}", why(&line)));
    assert_eq!(got, b"7E1 at 460800\n");

    py.go();
    expect(&mut py, "closed", &line);
    wait_for(5 * S, "the broker to release esp1.console", || {
        w.holder("esp1").is_none()
    });
    let failures = line.failures();
    assert!(failures.is_empty(), "{}", why(&line));
    println!("umockdev line control: whole test {:?}", t0.elapsed());
}
