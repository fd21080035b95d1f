//! Faults with a tool attached, under umockdev (tier 2): the broker finds
//! the FT232R through real libudev (its udev source), opens it by its by-id
//! link through `umockdev::emulate_serial` (which records the settings each
//! client sets), and devshim presents it to a tool as a pty.
//!
//! - The adapter re-enumerates within the board's `reenumerate-grace` and
//!   comes back on another node (`ttyUSB1`): the tool's pty stays, what it
//!   wrote meanwhile reaches the new node, at the tool's rate.
//! - It stays away past the grace: the tool reads `EIO`, not before.
//! - The broker is SIGKILLed and started again: the tool's pty stays, what
//!   it wrote meanwhile reaches the adapter, at the tool's rate.
//! - The broker stays away past devshim's `--broker-grace`: the tool reads
//!   `EIO`, and the broker's return brings the link back.
//!
//! umockdev keeps a removed node's pty, so an unplug here also hangs the
//! node up (`UMockdev::hang_up`), as the kernel does before it sends the
//! `remove` uevents.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devbroker_tests::umockdev::{self, testdata, LineEvent, SerialLog, UMockdev, FT232R_BY_ID};
use devbroker_tests::*;
use wire::rfc2217::parity;

const USB: &str = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2";
const S: Duration = Duration::from_secs(1);
/// The rate the tool sets; sessions start at the config's 115200.
const TOOL_RATE: u32 = 460800;

/// The FT232R as a board that re-enumerates when it resets.
const GRACE_CONFIG: &str = r#"
[[board]]
name = "s3"
machines = ["ci1"]
reenumerate-grace = "2s"

[[board.tty]]
name = "console"
rate = 115200
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// The FT232R as a plain board (no re-enumeration grace).
const CONFIG: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1"]

[[board.tty]]
name = "console"
rate = 115200
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// The FT232R of the test data, its tty numbered `ttyUSB<n>` (umockdev
/// can't make a removed node again, so a replug takes the next number).
fn ft232_description(n: u32) -> String {
    testdata("ftdi-ft232r.umockdev")
        .replace("ttyUSB0", &format!("ttyUSB{n}"))
        .replace("E: MINOR=0\n", &format!("E: MINOR={n}\n"))
        .replace("188:0", &format!("188:{n}"))
}

fn node(n: u32) -> String {
    format!("/dev/ttyUSB{n}")
}

fn tty_syspath(n: u32) -> String {
    format!("{USB}/1-2:1.0/ttyUSB{n}/tty/ttyUSB{n}")
}

fn by_id_path() -> String {
    format!("/dev/serial/by-id/{FT232R_BY_ID}")
}

/// The adapter's line for every node it may come back on, and its by-id
/// link (umockdev takes one handler per path, so one log serves them all).
fn emulate(tb: &UMockdev) -> SerialLog {
    tb.emulate_serial(&node(0), &[&node(1), &by_id_path()])
}

/// Unplugs the adapter on `ttyUSB<n>` as the kernel does: its tty hangs up,
/// then the `remove` uevents, then the devices go.
fn unplug(tb: &UMockdev, n: u32) {
    assert!(tb.hang_up(&node(n)), "{} has no pty", node(n));
    tb.unplug(&tty_syspath(n), USB);
}

/// The settings clients set on the adapter since its `nth` open (from 1).
fn sets_since_open(line: &SerialLog, nth: usize) -> Vec<wire::rfc2217::LineSettings> {
    line.events()
        .into_iter()
        .filter(|(_, e)| matches!(e, LineEvent::Opened(_) | LineEvent::Set(_)))
        .scan(0usize, |opens, (_, e)| {
            Some(match e {
                LineEvent::Opened(_) => {
                    *opens += 1;
                    None
                }
                LineEvent::Set(t) if *opens == nth => Some(t.settings()),
                _ => None,
            })
        })
        .flatten()
        .collect()
}

/// The rate a client set last since the adapter's `nth` open.
fn rate_since_open(line: &SerialLog, nth: usize) -> Option<u32> {
    sets_since_open(line, nth).last().map(|s| s.baud)
}

/// Reads what a blocked read of the tool left of a line (`left` bytes).
fn read_rest(tool: &Tool, left: usize) {
    if left > 0 {
        read_exact_timeout(tool.fd.as_raw_fd(), left, 5 * S).unwrap();
    }
}

/// The rate of the backing pty (what the broker set on the node).
fn pty_rate(board: &OwnedFd) -> u32 {
    wire::termios::get(board).unwrap().c_ospeed
}

struct Fixture {
    tb: UMockdev,
    w: World,
    line: SerialLog,
    board: String,
    link: PathBuf,
    sock: PathBuf,
}

impl Fixture {
    /// A testbed without adapters, the broker on its udev source and devshim
    /// for `ci1`. The adapters come after them: a process started while a
    /// node exists inherits the board's side of its pty and would keep it
    /// from hanging up.
    fn new(tb: UMockdev, config: &str, board: &str, shim_args: &[&str]) -> (Fixture, Proc, Proc) {
        let line = emulate(&tb);
        let w = World::new(config);
        let broker = w.broker_udev();
        let shim = w.shim_with("ci1", shim_args);
        let link = w.guest_link("ci1", FT232R_BY_ID);
        let sock = w.run.join(format!("machines/ci1/{board}.console.sock"));
        (
            Fixture {
                tb,
                w,
                line,
                board: board.to_string(),
                link,
                sock,
            },
            broker,
            shim,
        )
    }

    /// Plugs the adapter in on `ttyUSB<n>`; returns the board's side.
    fn plug(&self, n: u32) -> OwnedFd {
        self.tb.add_from_string(&ft232_description(n)).unwrap();
        self.tb.dev_fd(&node(n)).expect("the adapter's pty")
    }

    fn why(&self) -> String {
        format!("the emulated line:\n{:?}\n{}", self.line, self.w.logs())
    }

    /// Waits for the adapter's `nth` open (from 1), by its by-id link.
    fn wait_open(&self, nth: usize) {
        let t0 = Instant::now();
        while self.line.opens().len() < nth {
            assert!(
                t0.elapsed() < 5 * S,
                "no open #{nth} of the adapter: {}",
                self.why()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(self.line.opens(), vec![by_id_path(); nth], "{}", self.why());
    }

    /// Reads `want` from the board's side.
    fn expect(&self, board: &OwnedFd, want: &[u8], what: &str) {
        let got = read_exact_timeout(board.as_raw_fd(), want.len(), 5 * S)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.why()));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "{what}"
        );
    }

    /// Bytes both ways between the tool and the board.
    fn ping(&self, tool: &Tool, board: &OwnedFd, tag: &str) {
        let to_board = format!("{tag} to board\n");
        tool.write_all(to_board.as_bytes()).unwrap();
        self.expect(board, to_board.as_bytes(), &format!("{tag}: tool to board"));
        let to_tool = format!("{tag} to tool\n");
        write_all_fd(board.as_raw_fd(), to_tool.as_bytes()).unwrap();
        let got = read_exact_timeout(tool.fd.as_raw_fd(), to_tool.len(), 5 * S)
            .unwrap_or_else(|e| panic!("{tag}: board to tool: {e}\n{}", self.why()));
        assert_eq!(got, to_tool.as_bytes(), "{tag}: board to tool");
    }

    /// Opens the guest link as a tool, sets its rate, and waits until the
    /// adapter (its `nth` open) is at that rate.
    fn attach_at(&self, nth: usize, baud: u32) -> Tool {
        wait_for(5 * S, "the guest link", || exists(&self.link));
        let tool = Tool::open(&self.link).unwrap();
        self.wait_open(nth);
        tool.set_baud(baud);
        let t0 = Instant::now();
        while rate_since_open(&self.line, nth) != Some(baud) {
            assert!(
                t0.elapsed() < 5 * S,
                "the adapter at {baud}: {}",
                self.why()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        tool
    }

    /// Waits until the broker has seen the adapter go.
    fn wait_away(&self) {
        wait_for(2 * S, "the broker to see the adapter go", || {
            !self.w.present(&self.board)
        });
    }

    fn holder(&self) -> serde_json::Value {
        self.w.status()["boards"][0]["ttys"][0]["holder"]["who"].clone()
    }
}

#[test]
fn reenumerated_within_the_grace_the_tool_keeps_its_pty_rate_and_bytes() {
    let tb = umockdev::testbed!();
    let (f, _broker, _shim) = Fixture::new(tb, GRACE_CONFIG, "s3", &[]);
    let t0 = Instant::now();
    let board0 = f.plug(0);
    let tool = f.attach_at(1, TOOL_RATE);
    let pty = std::fs::read_link(&f.link).unwrap();
    assert_eq!(pty_rate(&board0), TOOL_RATE, "{}", f.why());
    f.ping(&tool, &board0, "before");
    assert_eq!(f.holder(), "machine ci1");
    println!(
        "umockdev faults: attached at {TOOL_RATE} after {:?}",
        t0.elapsed()
    );

    // The board resets: its adapter goes (ttyUSB0 hangs up, remove uevents)
    // and comes back as the same identity on ttyUSB1.
    let reader = tool.blocked_read();
    drop(board0);
    let gone = Instant::now();
    unplug(&f.tb, 0);
    f.wait_away();
    // Written while the adapter is away: it waits for the new node.
    tool.write_all(b"written while away\n").unwrap_or_else(|e| {
        panic!(
            "the tool's pty hung up while the adapter was away: {e}\n{}",
            f.why()
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        exists(&f.link),
        "the guest link stays while the adapter is away"
    );
    assert!(
        exists(&f.sock),
        "the broker's socket stays while the adapter is away"
    );
    assert!(
        !reader.is_finished(),
        "the tool's read ended while the adapter was away"
    );
    assert_eq!(f.holder(), "machine ci1", "the session is kept");
    let board1 = f.plug(1);
    let back = Instant::now();
    println!(
        "umockdev faults: replugged as ttyUSB1 {:?} after the unplug",
        gone.elapsed()
    );

    // The session resumed on ttyUSB1: opened by the same by-id link, the
    // tool's rate set again, and the bytes written meanwhile delivered.
    f.wait_open(2);
    f.expect(
        &board1,
        b"written while away\n",
        "bytes written while away, on ttyUSB1",
    );
    println!(
        "umockdev faults: resumed {:?} after the replug",
        back.elapsed()
    );
    let sets = sets_since_open(&f.line, 2);
    let last = sets
        .last()
        .unwrap_or_else(|| panic!("no settings on ttyUSB1: {}", f.why()));
    assert_eq!(
        (last.baud, last.data_size, last.parity),
        (TOOL_RATE, 8, parity::NONE),
        "the tool's line settings on the new node: {}",
        f.why()
    );
    assert_eq!(pty_rate(&board1), TOOL_RATE, "ttyUSB1's pty: {}", f.why());
    assert_eq!(
        std::fs::read_link(&f.link).unwrap(),
        pty,
        "the same guest pty"
    );
    assert_eq!(f.holder(), "machine ci1");

    // The tool's read, blocked since before the unplug, gets the new node's
    // bytes, not EIO; and bytes go on flowing both ways.
    write_all_fd(board1.as_raw_fd(), b"after\n").unwrap();
    let n = join_within(reader, 5 * S)
        .unwrap_or_else(|e| panic!("the tool's blocked read: {e} (must get data)\n{}", f.why()));
    assert!(n > 0, "the tool's blocked read got end of file");
    read_rest(&tool, b"after\n".len().saturating_sub(n));
    f.ping(&tool, &board1, "after");
    assert!(
        f.w.logs().contains("session resumed"),
        "the broker resumed the session (not a new one): {}",
        f.why()
    );
    assert!(f.line.failures().is_empty(), "{}", f.why());
    println!("umockdev faults: whole test {:?}", t0.elapsed());
}

#[test]
fn removed_without_a_hangup_the_session_still_moves_to_the_new_node() {
    // The remove uevent alone: the old node's pty stays up. The session must
    // not stay on it.
    let tb = umockdev::testbed!();
    let (f, _broker, _shim) = Fixture::new(tb, GRACE_CONFIG, "s3", &[]);
    let board0 = f.plug(0);
    let tool = f.attach_at(1, TOOL_RATE);
    f.ping(&tool, &board0, "before");
    f.tb.unplug(&tty_syspath(0), USB);
    f.wait_away();
    tool.write_all(b"written while away\n").unwrap();
    let board1 = f.plug(1);
    f.wait_open(2);
    f.expect(
        &board1,
        b"written while away\n",
        "bytes written while away, on ttyUSB1",
    );
    assert_eq!(pty_rate(&board1), TOOL_RATE, "ttyUSB1's pty: {}", f.why());
    f.ping(&tool, &board1, "after");
    drop(board0);
}

#[test]
fn away_past_the_grace_the_tool_reads_eio_and_the_tty_goes() {
    let tb = umockdev::testbed!();
    let (f, _broker, _shim) = Fixture::new(tb, GRACE_CONFIG, "s3", &[]);
    let board0 = f.plug(0);
    let tool = f.attach_at(1, TOOL_RATE);
    f.ping(&tool, &board0, "before");

    let reader = tool.blocked_read();
    drop(board0);
    let gone = Instant::now();
    unplug(&f.tb, 0);
    // Within the grace (2 s): everything stays.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !reader.is_finished(),
        "the tool's read ended within the grace"
    );
    assert!(exists(&f.link), "the guest link stays within the grace");
    assert!(
        exists(&f.sock),
        "the broker's socket stays within the grace"
    );
    let err = join_within(reader, 5 * S).expect_err("EIO once the grace runs out");
    let after = gone.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        after >= Duration::from_millis(1950),
        "EIO before the grace ran out: {after:?}"
    );
    println!("umockdev faults: EIO {after:?} after the unplug (grace 2 s)");
    wait_for(2 * S, "the broker's socket to go", || !exists(&f.sock));
    wait_for(2 * S, "the guest link to go", || !exists(&f.link));
    assert!(f.holder().is_null(), "{}", f.w.status());
    assert_eq!(
        f.w.status()["boards"][0]["ttys"][0]["present"],
        false,
        "{}",
        f.w.status()
    );

    // Plugged in again later: a new tty and a new session, as after any
    // unplug.
    let board1 = f.plug(1);
    let tool = f.attach_at(2, 115200);
    f.ping(&tool, &board1, "replugged");
    assert!(f.line.failures().is_empty(), "{}", f.why());
}

#[test]
fn broker_sigkilled_and_restarted_the_tool_keeps_its_pty_rate_and_bytes() {
    let tb = umockdev::testbed!();
    let (f, mut broker, _shim) = Fixture::new(tb, CONFIG, "esp1", &[]);
    let board = f.plug(0);
    let tool = f.attach_at(1, TOOL_RATE);
    let pty = std::fs::read_link(&f.link).unwrap();
    f.ping(&tool, &board, "before");

    let reader = tool.blocked_read();
    broker.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        exists(&f.link),
        "the guest link stays while the broker is away"
    );
    tool.write_all(b"written while the broker was away\n")
        .unwrap_or_else(|e| {
            panic!(
                "the tool's pty hung up while the broker was away: {e}\n{}",
                f.why()
            )
        });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !reader.is_finished(),
        "the tool's read ended while the broker was away"
    );

    // The new broker finds the adapter at start (udev enumeration), devshim
    // reconnects and the session starts again with the tool's settings.
    let _broker = f.w.broker_udev();
    let restarted = Instant::now();
    f.wait_open(2);
    f.expect(
        &board,
        b"written while the broker was away\n",
        "bytes written while the broker was away",
    );
    println!(
        "umockdev faults: resumed {:?} after the restart ({:?} after the kill)",
        restarted.elapsed(),
        killed.elapsed()
    );
    let t0 = Instant::now();
    while rate_since_open(&f.line, 2) != Some(TOOL_RATE) {
        assert!(
            t0.elapsed() < 2 * S,
            "the tool's rate applied again: {}",
            f.why()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let last = *sets_since_open(&f.line, 2).last().unwrap();
    assert_eq!(
        (last.data_size, last.parity),
        (8, parity::NONE),
        "{}",
        f.why()
    );
    assert_eq!(
        pty_rate(&board),
        TOOL_RATE,
        "the adapter's pty: {}",
        f.why()
    );
    assert_eq!(
        std::fs::read_link(&f.link).unwrap(),
        pty,
        "the same guest pty"
    );
    assert_eq!(f.holder(), "machine ci1");

    write_all_fd(board.as_raw_fd(), b"back\n").unwrap();
    let n = join_within(reader, 5 * S)
        .unwrap_or_else(|e| panic!("the tool's blocked read: {e} (must get data)\n{}", f.why()));
    assert!(n > 0, "the tool's blocked read got end of file");
    read_rest(&tool, b"back\n".len().saturating_sub(n));
    f.ping(&tool, &board, "after");
    assert!(f.line.failures().is_empty(), "{}", f.why());
}

#[test]
fn broker_away_past_the_broker_grace_hangs_up_then_comes_back() {
    let tb = umockdev::testbed!();
    let (f, mut broker, _shim) = Fixture::new(tb, CONFIG, "esp1", &["--broker-grace", "1s"]);
    let board = f.plug(0);
    let tool = f.attach_at(1, TOOL_RATE);
    f.ping(&tool, &board, "before");

    let after = tool.eio_after(4 * S, "EIO once the broker grace runs out", || {
        broker.kill9()
    });
    assert!(
        after >= Duration::from_millis(950),
        "EIO before the broker grace ran out: {after:?}"
    );
    println!("umockdev faults: EIO {after:?} after the broker died (grace 1 s)");
    wait_for(2 * S, "the guest link to go", || !exists(&f.link));

    let _broker = f.w.broker_udev();
    let back = time_until(5 * S, "the guest link to return", || exists(&f.link));
    println!("umockdev faults: link back {back:?} after the restart");
    let tool = f.attach_at(2, 115200);
    f.ping(&tool, &board, "after");
    assert!(f.line.failures().is_empty(), "{}", f.why());
}
