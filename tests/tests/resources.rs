//! Bounded resources, with the real broker and static devshim: a board that
//! floods a tool that stopped reading is back-pressured (memory stays put and
//! nothing is lost or reordered), and 1000 sessions or 1000 unplug/replug
//! cycles leave both processes with the descriptors they started with and
//! about the memory. A tool that closes during a flood leaves nothing behind
//! for the next one.
//!
//! The board is dedicated to one machine, so no lease is needed. The tests
//! take turns (one lock): each measures time and memory, and two at once on
//! a 2-core machine would measure each other.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devbroker_tests::*;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";

const CONFIG: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0" }
"#;

const S: Duration = Duration::from_secs(1);
const KIB: i64 = 1024;
const MIB: i64 = 1024 * KIB;

/// How much either process may grow while a board floods a tool that does
/// not read: the relay holds at most one 64 KiB chunk per direction and
/// side, so anything near this means data piles up in memory.
const FLOOD_RSS_CAP: i64 = 8 * MIB;
/// How much either process may grow over 1000 sessions or 1000 replugs:
/// allocator noise, nothing per cycle (2 KiB per cycle would be 2 MiB).
const CYCLES_RSS_CAP: i64 = 2 * MIB;
const CYCLES: usize = 1000;

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resident memory of a process, in bytes (`VmRSS`).
fn rss(pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: i64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * KIB
}

/// The descriptors a process has open, by number and what they are.
fn fds(pid: i32) -> Vec<(i32, String)> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut out: Vec<(i32, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let what = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            Some((n, what))
        })
        .collect();
    out.sort();
    out
}

/// What the descriptors are, without their numbers or inode numbers
/// (`socket:[123]` → `socket`): two lists are equal when the same kinds are
/// open as often.
fn fd_kinds(fds: &[(i32, String)]) -> Vec<String> {
    let mut k: Vec<String> = fds
        .iter()
        .map(|(_, w)| match w.find(":[") {
            Some(i) => w[..i].to_string(),
            None if w.starts_with("/dev/pts/") => "/dev/pts/N".to_string(),
            None => w.clone(),
        })
        .collect();
    k.sort();
    k
}

/// Polls every millisecond (the harness's `wait_for` sleeps 5 ms, which
/// would make 1000 cycles of two waits take 10 s of sleeping alone).
fn wait_fast(limit: Duration, what: &str, w: &World, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}\n{}",
            tail(&w.logs(), 6000)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The last `n` bytes of a log, for failure messages.
fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Board plugged in, broker and devshim for ci1 running, the guest link up.
fn attached(w: &World) -> (FakeBoard, Proc, Proc, PathBuf) {
    let board = w.plug(FTDI);
    let broker = w.broker();
    let shim = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    (board, broker, shim, link)
}

/// One byte from the tool to the board: proves the session is up (the
/// broker opened the port, devshim relays).
fn tool_to_board(tool: &Tool, board: &FakeBoard, byte: u8, w: &World) {
    tool.write_all(&[byte]).unwrap();
    let got = read_exact_timeout(board.master_fd(), 1, 5 * S)
        .unwrap_or_else(|e| panic!("board: {e}\n{}", tail(&w.logs(), 6000)));
    assert_eq!(got, [byte]);
}

/// A line each way through an open tool.
fn ping(tool: &Tool, board: &FakeBoard, w: &World) {
    tool.write_all(b"ping\n").unwrap();
    let got = read_exact_timeout(board.master_fd(), 5, 5 * S)
        .unwrap_or_else(|e| panic!("board: {e}\n{}", tail(&w.logs(), 6000)));
    assert_eq!(got, b"ping\n");
    write_all_fd(board.master_fd(), b"pong\n").unwrap();
    let got = read_exact_timeout(tool.fd.as_raw_fd(), 5, 5 * S)
        .unwrap_or_else(|e| panic!("tool: {e}\n{}", tail(&w.logs(), 6000)));
    assert_eq!(got, b"pong\n");
}

fn set_nonblocking(fd: i32, on: bool) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags & !OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags)).unwrap();
}

/// Memory and descriptors of both processes at one moment.
#[derive(Debug, Clone)]
struct Snapshot {
    broker_rss: i64,
    shim_rss: i64,
    broker_fds: Vec<(i32, String)>,
    shim_fds: Vec<(i32, String)>,
}

fn snapshot(broker: &Proc, shim: &Proc) -> Snapshot {
    Snapshot {
        broker_rss: rss(broker.pid()),
        shim_rss: rss(shim.pid()),
        broker_fds: fds(broker.pid()),
        shim_fds: fds(shim.pid()),
    }
}

/// Asserts both processes are back to `start`'s descriptors (polling a
/// little: a session or an actor may still be winding down) and within
/// `cap` of its memory. Returns the end snapshot.
fn assert_back_to(start: &Snapshot, broker: &Proc, shim: &Proc, cap: i64, what: &str) -> Snapshot {
    let t0 = Instant::now();
    let mut now = snapshot(broker, shim);
    while (fd_kinds(&now.broker_fds) != fd_kinds(&start.broker_fds)
        || fd_kinds(&now.shim_fds) != fd_kinds(&start.shim_fds))
        && t0.elapsed() < 5 * S
    {
        std::thread::sleep(Duration::from_millis(20));
        now = snapshot(broker, shim);
    }
    println!(
        "{what}: broker fds {} -> {}, RSS {} -> {} KiB ({:+} KiB); devshim fds {} -> {}, RSS {} -> {} KiB ({:+} KiB)",
        start.broker_fds.len(),
        now.broker_fds.len(),
        start.broker_rss / KIB,
        now.broker_rss / KIB,
        (now.broker_rss - start.broker_rss) / KIB,
        start.shim_fds.len(),
        now.shim_fds.len(),
        start.shim_rss / KIB,
        now.shim_rss / KIB,
        (now.shim_rss - start.shim_rss) / KIB,
    );
    assert_eq!(
        fd_kinds(&now.broker_fds),
        fd_kinds(&start.broker_fds),
        "{what}: the broker's descriptors changed\nstart {:#?}\nnow {:#?}",
        start.broker_fds,
        now.broker_fds
    );
    assert_eq!(
        fd_kinds(&now.shim_fds),
        fd_kinds(&start.shim_fds),
        "{what}: devshim's descriptors changed\nstart {:#?}\nnow {:#?}",
        start.shim_fds,
        now.shim_fds
    );
    assert!(
        now.broker_rss - start.broker_rss <= cap,
        "{what}: the broker grew by {} KiB (cap {} KiB)",
        (now.broker_rss - start.broker_rss) / KIB,
        cap / KIB
    );
    assert!(
        now.shim_rss - start.shim_rss <= cap,
        "{what}: devshim grew by {} KiB (cap {} KiB)",
        (now.shim_rss - start.shim_rss) / KIB,
        cap / KIB
    );
    now
}

#[test]
fn a_flood_into_a_tool_that_does_not_read_is_back_pressured() {
    let _turn = turn();
    let w = World::new(CONFIG);
    let (board, broker, shim, link) = attached(&w);
    let tool = Tool::open(&link).unwrap();
    wait_for(5 * S, "the session", || w.holder("esp1").is_some());
    let mfd = board.master_fd();
    let tfd = tool.fd.as_raw_fd();

    // Warm up: 4 MiB through with the tool reading, so the buffers a busy
    // relay uses exist before the baseline.
    let warm = random_bytes(4 << 20, 7);
    std::thread::scope(|sc| {
        let wr = sc.spawn(|| write_all_fd(mfd, &warm).unwrap());
        let got = read_exact_timeout(tfd, warm.len(), 30 * S)
            .unwrap_or_else(|e| panic!("warm-up: {e}\n{}", w.logs()));
        wr.join().unwrap();
        assert!(got == warm, "warm-up bytes differ");
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = snapshot(&broker, &shim);

    // Flood: the board writes as fast as the pty takes it, for 5 s, while
    // the tool reads nothing.
    const FLOOD: Duration = Duration::from_secs(5);
    let pattern = random_bytes(64 << 20, 8);
    set_nonblocking(mfd, true);
    let t0 = Instant::now();
    let mut accepted = 0usize;
    let mut last_accepted_at = Duration::ZERO;
    let mut refused = 0u64;
    let mut max_broker = start.broker_rss;
    let mut max_shim = start.shim_rss;
    let mut accepted_at_half = None;
    let mut next_sample = Duration::ZERO;
    while t0.elapsed() < FLOOD {
        assert!(
            accepted + 65536 <= pattern.len(),
            "the board wrote {} MiB into a tool that reads nothing: no back-pressure",
            accepted >> 20
        );
        // SAFETY: writing from a valid buffer to the board's master.
        let n = unsafe {
            libc::write(
                mfd,
                pattern[accepted..].as_ptr().cast(),
                65536.min(pattern.len() - accepted),
            )
        };
        if n > 0 {
            accepted += n as usize;
            last_accepted_at = t0.elapsed();
        } else {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "board write: {err}");
            refused += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
        if t0.elapsed() >= next_sample {
            max_broker = max_broker.max(rss(broker.pid()));
            max_shim = max_shim.max(rss(shim.pid()));
            next_sample = t0.elapsed() + Duration::from_millis(50);
        }
        if accepted_at_half.is_none() && t0.elapsed() >= FLOOD / 2 {
            accepted_at_half = Some(accepted);
        }
    }
    max_broker = max_broker.max(rss(broker.pid()));
    max_shim = max_shim.max(rss(shim.pid()));
    let st = w.status();
    let relayed = st["boards"][0]["ttys"][0]["bytes_from_board"]
        .as_u64()
        .unwrap()
        - warm.len() as u64;
    println!(
        "flood: board writes accepted {accepted} bytes ({} KiB), the last at {last_accepted_at:?} of {FLOOD:?}; {refused} writes refused (EAGAIN) after; broker read {relayed} bytes from the port",
        accepted / 1024
    );
    println!(
        "flood: broker RSS {} -> max {} KiB ({:+} KiB), devshim RSS {} -> max {} KiB ({:+} KiB); cap {:+} KiB",
        start.broker_rss / KIB,
        max_broker / KIB,
        (max_broker - start.broker_rss) / KIB,
        start.shim_rss / KIB,
        max_shim / KIB,
        (max_shim - start.shim_rss) / KIB,
        FLOOD_RSS_CAP / KIB
    );
    assert!(
        max_broker - start.broker_rss <= FLOOD_RSS_CAP,
        "the broker grew by {} KiB during the flood",
        (max_broker - start.broker_rss) / KIB
    );
    assert!(
        max_shim - start.shim_rss <= FLOOD_RSS_CAP,
        "devshim grew by {} KiB during the flood",
        (max_shim - start.shim_rss) / KIB
    );
    // Back-pressure: the board's writes stopped being accepted, and did so
    // in the first half; what is in flight fits in kernel and relay buffers.
    assert_eq!(
        accepted_at_half,
        Some(accepted),
        "the board's writes were still accepted in the second half of the flood"
    );
    assert!(refused > 0, "no write was ever refused");
    assert!(
        accepted < 16 << 20,
        "{accepted} bytes in flight: more than kernel and relay buffers hold"
    );

    // The tool reads again: everything the board wrote, in order.
    set_nonblocking(mfd, false);
    let got = read_exact_timeout(tfd, accepted, 30 * S)
        .unwrap_or_else(|e| panic!("reading the flood: {e}\n{}", tail(&w.logs(), 6000)));
    if let Some(i) = got.iter().zip(&pattern).position(|(a, b)| a != b) {
        panic!("the tool's stream differs from the board's at byte {i} of {accepted}");
    }
    let mut more = [0u8; 4096];
    assert_eq!(
        tool.read_timeout(&mut more, Duration::from_millis(300))
            .unwrap(),
        None,
        "the tool read more than the board wrote"
    );
    // And the line still works both ways.
    ping(&tool, &board, &w);
    drop(tool);
    let end = snapshot(&broker, &shim);
    println!(
        "flood: after reading, broker RSS {} KiB, devshim RSS {} KiB",
        end.broker_rss / KIB,
        end.shim_rss / KIB
    );
}

#[test]
fn a_thousand_sessions_leak_nothing() {
    let _turn = turn();
    let w = World::new(CONFIG);
    let (board, broker, shim, link) = attached(&w);
    let cycle = |i: usize| {
        let tool = Tool::open(&link)
            .unwrap_or_else(|e| panic!("open {i}: {e}\n{}", tail(&w.logs(), 6000)));
        tool_to_board(&tool, &board, (i % 251) as u8, &w);
        drop(tool);
    };
    for i in 0..20 {
        cycle(i);
    }
    wait_for(5 * S, "the warm-up's last session to end", || {
        w.holder("esp1").is_none()
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = snapshot(&broker, &shim);

    let t0 = Instant::now();
    for i in 0..CYCLES {
        cycle(i);
    }
    let took = t0.elapsed();
    wait_for(5 * S, "the last session to end", || {
        w.holder("esp1").is_none()
    });
    println!(
        "sessions: {CYCLES} open/relay/close cycles in {took:?} ({:?} each)",
        took / CYCLES as u32
    );
    let st = w.status();
    assert_eq!(
        st["boards"][0]["ttys"][0]["bytes_to_board"].as_u64(),
        Some(20 + CYCLES as u64),
        "every cycle's byte reached the board through its own session"
    );
    // Each open was its own session: the broker opened the port 1020 times.
    let log = std::fs::read_to_string(w.path("broker.log")).unwrap();
    assert_eq!(
        log.matches("session started").count(),
        20 + CYCLES,
        "sessions started"
    );
    assert_eq!(
        log.matches("session ended: the client left").count(),
        20 + CYCLES
    );
    assert_back_to(&start, &broker, &shim, CYCLES_RSS_CAP, "sessions");
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
}

#[test]
fn a_thousand_replugs_leak_nothing() {
    let _turn = turn();
    let w = World::new(CONFIG);
    let (board, broker, shim, link) = attached(&w);
    let sock = w.run.join("machines/ci1/esp1.console.sock");
    let replug = |board: FakeBoard, link: &Path| -> FakeBoard {
        board.unplug();
        wait_fast(5 * S, "the guest link to go", &w, || {
            !exists(link) && !sock.exists()
        });
        let board = w.plug(FTDI);
        wait_fast(5 * S, "the guest link to return", &w, || exists(link));
        board
    };
    let mut board = board;
    for _ in 0..10 {
        board = replug(board, &link);
    }
    // A withdrawn socket keeps serving queued clients for the grace after a
    // lease or an adapter goes: let the warm-up's settle first.
    std::thread::sleep(devbroker::state::LEASE_END_GRACE + Duration::from_millis(300));
    let start = snapshot(&broker, &shim);

    let t0 = Instant::now();
    for _ in 0..CYCLES {
        board = replug(board, &link);
    }
    let took = t0.elapsed();
    println!(
        "replugs: {CYCLES} unplug/replug cycles in {took:?} ({:?} each)",
        took / CYCLES as u32
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_back_to(&start, &broker, &shim, CYCLES_RSS_CAP, "replugs");
    // The link is back after the last replug, and works.
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
}

/// A tool that stops reading during a flood and closes: what the board sent
/// for it is not for the next tool (a real port drops its input queue on the
/// last close), and the next session starts at once.
///
/// devshim discards the pty's input when the last tool closes; without that
/// the next tool first reads ~20 KiB the board sent to the previous one, and
/// a next tool that writes before it reads waits 3 s for its session.
#[test]
fn a_flood_cut_short_leaves_nothing_for_the_next_tool() {
    let _turn = turn();
    let w = World::new(CONFIG);
    let (board, broker, shim, link) = attached(&w);
    let mfd = board.master_fd();
    let tool = Tool::open(&link).unwrap();
    tool_to_board(&tool, &board, b'a', &w);
    drop(tool);
    wait_for(5 * S, "the first session to end", || {
        w.holder("esp1").is_none()
    });
    std::thread::sleep(Duration::from_millis(100));
    let start = snapshot(&broker, &shim);
    let tool = Tool::open(&link).unwrap();
    tool_to_board(&tool, &board, b'a', &w);

    // Fill every buffer between the board and the tool, then close the tool.
    set_nonblocking(mfd, true);
    let chunk = vec![b'X'; 65536];
    let t0 = Instant::now();
    let mut accepted = 0usize;
    let mut last = Instant::now();
    while t0.elapsed() < 5 * S && last.elapsed() < Duration::from_millis(300) {
        // SAFETY: writing from a valid buffer to the board's master.
        let n = unsafe { libc::write(mfd, chunk.as_ptr().cast(), chunk.len()) };
        if n > 0 {
            accepted += n as usize;
            last = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    set_nonblocking(mfd, false);
    println!("cut short: {accepted} bytes in flight when the tool closed");
    drop(tool);
    wait_for(5 * S, "the session to end", || w.holder("esp1").is_none());
    std::thread::sleep(Duration::from_millis(100));

    // The next tool writes first, as a flasher's sync does: its session must
    // start without waiting for anyone to read the old data.
    let tool = Tool::open(&link).unwrap();
    let t1 = Instant::now();
    tool_to_board(&tool, &board, b'b', &w);
    let took = t1.elapsed();
    write_all_fd(mfd, b"fresh\n").unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Some(n) = tool
        .read_timeout(&mut buf, Duration::from_millis(300))
        .unwrap()
    {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let stale = got.iter().filter(|&&b| b == b'X').count();
    println!(
        "cut short: the next session relayed after {took:?}; the next tool read {stale} stale bytes, then {:?}",
        String::from_utf8_lossy(&got[stale.min(got.len())..])
    );
    assert!(took < S, "the next session took {took:?} to start");
    assert_eq!(
        stale, 0,
        "the next tool read {stale} bytes the board sent to the previous one"
    );
    assert_eq!(got, b"fresh\n");
    drop(tool);
    wait_for(5 * S, "the session to end", || w.holder("esp1").is_none());
    assert_back_to(&start, &broker, &shim, FLOOD_RSS_CAP, "cut short");
}
