//! relay-bench: measures the whole devbroker path against baselines measured
//! in the same run on the same machine, with two kinds of client, and prints
//! the ratios against the goals.
//!
//! Paths, all starting at a fake board (the master of a pty pair):
//! - `pty`: a bare pty hop (the tool reads the slave): the floor.
//! - `socat`: socat relaying the board's pty to a new pty.
//! - `ser2net`: Debian's ser2net, RFC 2217 accepter on loopback TCP; the tool
//!   is a TCP client speaking Telnet.
//! - `devbroker`: broker → unix socket → devshim → guest pty.
//!
//! Clients, each on every path:
//! - `blocking`: one big blocking `write` of the whole transfer, and 64 KiB
//!   reads — a script's `write(data)` / `read(n)`. Its big writes hand a
//!   relay big batches, which hides what small ones cost.
//! - `eager`: a nonblocking descriptor in an event loop — whenever poll says
//!   readable, one read of up to 64 KiB; whenever it says writable, one
//!   write of up to 64 KiB. What asyncio tools and terminal programs do: a
//!   relay sees every small batch the kernel hands over.
//!
//! Figures: MB/s each way, one way at a time and both at once (the eager
//! client in its one loop, the blocking one with a writer thread); CPU
//! seconds per MiB and context switches per 32 MiB of the relay processes
//! (every thread), for each of those; echo
//! round trips of 1 B and 5000 B (p50, p99); per path, wakeups in 5 s idle
//! with a tool attached, and RSS. Each figure is the median of `BENCH_RUNS`
//! runs. Timings are printed against goals, never asserted.
//!
//! Knobs: `BENCH_MIB` (default 32), `BENCH_RUNS` (default 3), `BENCH_ONLY`
//! (paths to measure, comma-separated; any other value: devbroker only),
//! `BENCH_CLIENT` (`blocking` or `eager`: that client only), `BENCH_PAYLOAD`
//! (`random`, the default: all byte values, as a firmware image has them;
//! `no-iac`: never 0xFF, the byte RFC 2217 escapes; `ff`: only 0xFF, an
//! erased flash region), `BENCH_LOG` (the relays' log level).
//!
//! Run `cargo build --release -p devbroker -p devshim -p devbroker-tests`
//! first; this uses the release broker and the static devshim.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devbroker_tests::procstat::{self, median, percentile};
use devbroker_tests::{read_timeout, wait_for, DieWithParent, FakeBoard, Tool};
use wire::telnet::{Decoder, Event, Negotiator};

const MIB: usize = 1 << 20;
/// Read and write size of both clients.
const CHUNK: usize = 64 * 1024;
/// Round trips of one byte, and of [`BIG`] bytes.
const SMALL_TRIPS: usize = 3000;
const BIG: usize = 5000;
const BIG_TRIPS: usize = 1000;
/// Round trips before the measured ones, to settle the session.
const WARMUP_TRIPS: usize = 100;
/// Round trips stop after this long (ser2net takes milliseconds for one)
/// once at least [`MIN_TRIPS`] were measured.
const TRIPS_TIME: Duration = Duration::from_secs(10);
const MIN_TRIPS: usize = 100;
/// The longest any single transfer may stall before the bench gives up.
const STALL: Duration = Duration::from_secs(30);
/// Context switches are reported per this many bytes moved.
const SWITCH_UNIT_MIB: f64 = 32.0;
const PATHS: [&str; 4] = ["pty", "socat", "ser2net", "devbroker"];

/// How the tool uses its end of a path.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Client {
    Blocking,
    Eager,
}

impl Client {
    const ALL: [Client; 2] = [Client::Blocking, Client::Eager];

    fn name(self) -> &'static str {
        match self {
            Client::Blocking => "blocking",
            Client::Eager => "eager",
        }
    }
}

/// The Telnet side of a client of ser2net's RFC 2217 accepter.
struct Telnet {
    dec: Decoder,
    neg: Negotiator,
}

/// The tool's end of a path: a pty, or a TCP socket speaking Telnet.
struct ToolEnd {
    fd: OwnedFd,
    telnet: Option<Telnet>,
    /// Telnet answers owed to the server, written before more payload.
    answers: Vec<u8>,
    /// The read buffer, kept so a round trip costs no allocation.
    buf: Vec<u8>,
    /// Payload read, kept while `keep` is set (round trips check what came
    /// back; throughput only counts).
    kept: Vec<u8>,
    keep: bool,
    /// Reads and writes that moved bytes: how the relay batches, as the
    /// tool sees it.
    reads: u64,
    writes: u64,
}

impl ToolEnd {
    fn new(fd: OwnedFd, telnet: Option<Telnet>) -> ToolEnd {
        ToolEnd {
            fd,
            telnet,
            answers: Vec::new(),
            buf: vec![0; CHUNK],
            kept: Vec::new(),
            keep: false,
            reads: 0,
            writes: 0,
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Puts the descriptor in the mode `client` uses.
    fn set_mode(&self, client: Client) {
        let fd = self.raw();
        // SAFETY: fcntl on a descriptor this end owns.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            let fl = match client {
                Client::Blocking => fl & !libc::O_NONBLOCK,
                Client::Eager => fl | libc::O_NONBLOCK,
            };
            assert_eq!(libc::fcntl(fd, libc::F_SETFL, fl), 0, "fcntl");
        }
    }

    /// Counts the payload in bytes read from the descriptor; Telnet commands
    /// are dropped and negotiations answered (queued in `answers`).
    fn payload(&mut self, n: usize) -> usize {
        let raw = &self.buf[..n];
        let Some(t) = &mut self.telnet else {
            if self.keep {
                self.kept.extend_from_slice(raw);
            }
            return n;
        };
        let (mut count, mut pos) = (0, 0);
        while pos < raw.len() {
            let (used, ev) = t.dec.feed(&raw[pos..]);
            pos += used;
            match ev {
                Some(Event::Data(d)) => {
                    count += d.len();
                    if self.keep {
                        self.kept.extend_from_slice(d);
                    }
                }
                Some(Event::Negotiate(v, o)) => {
                    if let Some((rv, ro)) = t.neg.answer(v, o) {
                        wire::telnet::negotiate(rv, ro, &mut self.answers);
                    }
                }
                _ => {}
            }
        }
        count
    }

    /// Writes `out` and reads until `want` payload bytes came back, as
    /// `client` does.
    fn transfer(&mut self, client: Client, out: &[u8], want: usize) {
        let out = on_wire(self.telnet.is_some(), out);
        match client {
            Client::Blocking => self.blocking(&out, want),
            Client::Eager => self.eager(&out, want),
        }
    }

    /// One blocking write of everything, then reads of up to 64 KiB.
    fn blocking(&mut self, out: &[u8], want: usize) {
        self.flush_answers();
        if !out.is_empty() {
            devbroker_tests::write_all_fd(self.raw(), out).unwrap();
            self.writes += 1;
        }
        let mut got = 0;
        while got < want {
            let n = read_timeout(self.raw(), &mut self.buf, STALL)
                .unwrap()
                .unwrap_or_else(|| panic!("the tool's read stalled at {got} of {want} bytes"));
            assert!(n > 0, "the path closed the tool's end");
            self.reads += 1;
            got += self.payload(n);
            self.flush_answers();
        }
    }

    fn flush_answers(&mut self) {
        if !self.answers.is_empty() {
            devbroker_tests::write_all_fd(self.raw(), &self.answers).unwrap();
            self.answers.clear();
        }
    }

    /// The event loop: one read of up to 64 KiB per readable, one write of
    /// up to 64 KiB per writable, until `out` is written and `want` payload
    /// bytes were read.
    fn eager(&mut self, out: &[u8], want: usize) {
        let (mut sent, mut got) = (0, 0);
        while sent < out.len() || got < want || !self.answers.is_empty() {
            let writing = sent < out.len() || !self.answers.is_empty();
            let revents = poll_one(
                self.raw(),
                libc::POLLIN | if writing { libc::POLLOUT } else { 0 },
            )
            .unwrap_or_else(|| {
                panic!(
                    "the tool stalled: {sent} of {} bytes out, {got} of {want} in",
                    out.len()
                )
            });
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                match sys_read(self.raw(), &mut self.buf) {
                    Ok(0) => panic!("the path closed the tool's end"),
                    Ok(n) => {
                        self.reads += 1;
                        got += self.payload(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("the tool's read: {e}"),
                }
            }
            if revents & libc::POLLOUT != 0 {
                if !self.answers.is_empty() {
                    if let Some(k) = sys_write_nonblocking(self.raw(), &self.answers) {
                        self.answers.drain(..k);
                    }
                } else if let Some(k) =
                    sys_write_nonblocking(self.raw(), &out[sent..(sent + CHUNK).min(out.len())])
                {
                    self.writes += 1;
                    sent += k;
                }
            }
        }
    }
}

/// Polls one descriptor for `events` up to [`STALL`]; the events that
/// came, `None` on timeout.
fn poll_one(fd: RawFd, events: libc::c_short) -> Option<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, STALL.as_millis() as i32) };
        match r {
            0 => return None,
            r if r > 0 => return Some(pfd.revents),
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => panic!("poll: {}", io::Error::last_os_error()),
        }
    }
}

fn sys_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a valid buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One nonblocking write; `None` when the kernel took nothing (`EAGAIN`).
fn sys_write_nonblocking(fd: RawFd, data: &[u8]) -> Option<usize> {
    // SAFETY: writing from a valid buffer.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n >= 0 {
        return Some(n as usize);
    }
    let e = io::Error::last_os_error();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "the tool's write: {e}");
    None
}

/// One path under test.
struct Rig {
    name: &'static str,
    board_fd: RawFd,
    tool: ToolEnd,
    /// Relay processes whose CPU, switches and memory count.
    pids: Vec<i32>,
    _keep: Vec<Box<dyn std::any::Any>>,
    children: Vec<Child>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One direction of a throughput measurement.
#[derive(Default, Clone, Copy)]
struct Leg {
    mbs: f64,
    /// Bytes per read (to the tool) or per write (to the board) of the
    /// tool's.
    bytes_per_call: f64,
    cpu_s_per_mib: Option<f64>,
    switches_per_unit: Option<f64>,
}

/// What one client measured on one path.
#[derive(Default, Clone, Copy)]
struct Figures {
    to_tool: Leg,
    to_board: Leg,
    /// Both ways at once.
    both: Leg,
    /// (p50, p99) in µs.
    rtt_small: (f64, f64),
    rtt_big: (f64, f64),
}

/// A path's relays at rest with a tool attached.
#[derive(Default, Clone, Copy)]
struct Idle {
    wakeups: f64,
    rss_kib: f64,
}

/// What the bytes moved are (`BENCH_PAYLOAD`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Uniform random bytes, 0xFF one in 256: a firmware image or
    /// compressed data. The default.
    Random,
    /// Random bytes without 0xFF: nothing for RFC 2217 (Telnet) to escape.
    NoIac,
    /// Every byte 0xFF: an erased flash region in an image.
    Ff,
}

impl Payload {
    fn from_env() -> Payload {
        match std::env::var("BENCH_PAYLOAD").as_deref() {
            Err(_) | Ok("random") => Payload::Random,
            Ok("no-iac") => Payload::NoIac,
            Ok("ff") => Payload::Ff,
            Ok(other) => panic!("BENCH_PAYLOAD: random, no-iac or ff, not {other:?}"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Payload::Random => "random bytes (0xFF one in 256)",
            Payload::NoIac => "random bytes without 0xFF",
            Payload::Ff => "every byte 0xFF",
        }
    }
}

/// `n` bytes of the payload `BENCH_PAYLOAD` asks for.
fn payload(n: usize, seed: u64) -> Vec<u8> {
    static KIND: std::sync::OnceLock<Payload> = std::sync::OnceLock::new();
    match KIND.get_or_init(Payload::from_env) {
        Payload::Random => devbroker_tests::random_bytes(n, seed),
        Payload::NoIac => devbroker_tests::random_bytes(n, seed)
            .into_iter()
            .map(|b| if b == 0xFF { 0xFE } else { b })
            .collect(),
        Payload::Ff => vec![0xFF; n],
    }
}

/// What goes on the wire for `data`: as is, or Telnet-escaped (0xFF
/// doubled) for a Telnet client.
fn on_wire(telnet: bool, data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if telnet && wire::telnet::needs_escape(data) {
        let mut out = Vec::with_capacity(data.len() + data.len() / 128);
        wire::telnet::escape_into(data, &mut out);
        out.into()
    } else {
        data.into()
    }
}

/// Which way a throughput measurement moves data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    ToTool,
    ToBoard,
    /// Both at once, as a flashing tool or a terminal does: the eager
    /// client in its one loop, the blocking one with a writer thread.
    Both,
}

/// Moves `n` bytes between board and tool (each way, for [`Way::Both`]);
/// MB/s (each way), and what the relays spent on it per MiB moved.
fn throughput(rig: &mut Rig, client: Client, n: usize, way: Way) -> Leg {
    let board = rig.board_fd;
    let (cpu0, sw0) = (
        procstat::cpu_seconds(&rig.pids),
        procstat::switches_of(&rig.pids),
    );
    let calls0 = rig.tool.reads + rig.tool.writes;
    let t0 = Instant::now();
    let board_side = board_threads(board, n, way);
    let (out, want) = match way {
        Way::ToTool => (Vec::new(), n),
        Way::ToBoard => (payload(n, 8), 0),
        Way::Both => (payload(n, 9), n),
    };
    if way == Way::Both && client == Client::Blocking {
        let out = on_wire(rig.tool.telnet.is_some(), &out).into_owned();
        let fd = rig.tool.fd.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            devbroker_tests::write_all_fd(fd.as_raw_fd(), &out).unwrap()
        });
        rig.tool.transfer(client, &[], want);
        writer.join().unwrap();
        rig.tool.writes += 1;
    } else {
        rig.tool.transfer(client, &out, want);
    }
    for t in board_side {
        t.join().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = procstat::cpu_seconds(&rig.pids) - cpu0;
    let switches = procstat::switches_of(&rig.pids).saturating_sub(sw0);
    let moved = if way == Way::Both { 2 * n } else { n };
    let mib = moved as f64 / MIB as f64;
    let relays = !rig.pids.is_empty();
    let calls = rig.tool.reads + rig.tool.writes - calls0;
    Leg {
        mbs: n as f64 / secs / 1e6,
        bytes_per_call: moved as f64 / calls.max(1) as f64,
        cpu_s_per_mib: relays.then_some(cpu / mib),
        switches_per_unit: relays.then_some(switches as f64 / mib * SWITCH_UNIT_MIB),
    }
}

/// The board's side of a throughput measurement: a thread writing `n`
/// bytes to the tool, one reading `n` from it, or both.
fn board_threads(board: RawFd, n: usize, way: Way) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    if way != Way::ToBoard {
        let data = payload(n, 7);
        threads.push(std::thread::spawn(move || {
            devbroker_tests::write_all_fd(board, &data).unwrap()
        }));
    }
    if way != Way::ToTool {
        threads.push(std::thread::spawn(move || {
            let got = devbroker_tests::read_exact_timeout(board, n, Duration::from_secs(120));
            assert_eq!(got.unwrap().len(), n);
        }));
    }
    threads
}

/// A board that echoes what it gets until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(board: RawFd) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut b = vec![0u8; CHUNK];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(Some(n)) = read_timeout(board, &mut b, Duration::from_millis(100)) {
                    devbroker_tests::write_all_fd(board, &b[..n]).unwrap();
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `count` echo round trips of `size` bytes (fewer if they take more than
/// [`TRIPS_TIME`]): the tool writes, the board echoes, the tool reads them
/// all back and checks them — a byte left over from before would make every
/// trip look short. (p50, p99) in µs.
fn round_trips(rig: &mut Rig, client: Client, size: usize, count: usize) -> (f64, f64) {
    let _echo = Echo::start(rig.board_fd);
    let mut samples = Vec::with_capacity(count);
    rig.tool.keep = true;
    let t_start = Instant::now();
    for i in 0..count + WARMUP_TRIPS {
        let msg = payload(size, i as u64);
        rig.tool.kept.clear();
        let t0 = Instant::now();
        rig.tool.transfer(client, &msg, size);
        let took = t0.elapsed();
        assert!(
            rig.tool.kept == msg,
            "{}: round trip {i} of {size} B came back as {} other bytes",
            rig.name,
            rig.tool.kept.len()
        );
        if i >= WARMUP_TRIPS {
            samples.push(took.as_secs_f64() * 1e6);
            if t_start.elapsed() > TRIPS_TIME && samples.len() >= MIN_TRIPS {
                break;
            }
        }
    }
    rig.tool.keep = false;
    (percentile(&mut samples, 50), percentile(&mut samples, 99))
}

/// Everything one client measures on one path.
fn measure(rig: &mut Rig, client: Client, mib: usize) -> Figures {
    eprintln!("  {} / {}", rig.name, client.name());
    rig.tool.set_mode(client);
    // Warm up and settle the session.
    throughput(rig, client, MIB, Way::ToTool);
    throughput(rig, client, MIB, Way::ToBoard);
    Figures {
        to_tool: throughput(rig, client, mib * MIB, Way::ToTool),
        to_board: throughput(rig, client, mib * MIB, Way::ToBoard),
        both: throughput(rig, client, mib * MIB, Way::Both),
        rtt_small: round_trips(rig, client, 1, SMALL_TRIPS),
        rtt_big: round_trips(rig, client, BIG, BIG_TRIPS),
    }
}

/// Wakeups of the relays in 5 s with a tool attached and nothing moving,
/// and their RSS.
fn idle(rig: &Rig) -> Idle {
    std::thread::sleep(Duration::from_millis(200));
    let w0 = procstat::switches_of(&rig.pids);
    std::thread::sleep(Duration::from_secs(5));
    let w1 = procstat::switches_of(&rig.pids);
    Idle {
        wakeups: w1.saturating_sub(w0) as f64,
        rss_kib: rig.pids.iter().map(|&p| procstat::rss_kib(p)).sum::<u64>() as f64,
    }
}

fn bare_pty() -> Rig {
    let board = FakeBoard::plug(&tmpdir().join("bare"), "board").unwrap();
    let tool = Tool::open(&board.slave_path).unwrap();
    Rig {
        name: "pty",
        board_fd: board.master_fd(),
        tool: ToolEnd::new(tool.fd, None),
        pids: vec![],
        _keep: vec![Box::new(board)],
        children: vec![],
    }
}

fn socat() -> Rig {
    let dir = tmpdir().join("socat");
    let board = FakeBoard::plug(&dir, "board").unwrap();
    let link = dir.join("tool");
    let _ = fs::remove_file(&link);
    let child = Command::new("socat")
        .arg(format!("FILE:{},raw,echo=0", board.slave_path.display()))
        .arg(format!("PTY,link={},raw,echo=0", link.display()))
        .stderr(Stdio::null())
        .die_with_parent()
        .spawn()
        .expect("socat (apt-get install socat)");
    wait_for(Duration::from_secs(5), "socat's pty", || link.exists());
    let tool = Tool::open(&link).unwrap();
    Rig {
        name: "socat",
        board_fd: board.master_fd(),
        tool: ToolEnd::new(tool.fd, None),
        pids: vec![child.id() as i32],
        _keep: vec![Box::new(board)],
        children: vec![child],
    }
}

fn ser2net() -> Rig {
    let dir = tmpdir().join("ser2net");
    let board = FakeBoard::plug(&dir, "board").unwrap();
    let port = free_port();
    let child = Command::new("ser2net")
        .args(["-n", "-u", "-Y", "connection: &bench"])
        .arg("-Y")
        .arg(format!("  accepter: telnet(rfc2217),tcp,127.0.0.1,{port}"))
        .arg("-Y")
        .arg(format!(
            "  connector: serialdev,{},115200n81,local",
            board.slave_path.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .die_with_parent()
        .spawn()
        .expect("ser2net (apt-get install ser2net)");
    let mut sock = None;
    wait_for(Duration::from_secs(5), "ser2net's port", || {
        sock = TcpStream::connect(("127.0.0.1", port)).ok();
        sock.is_some()
    });
    let sock = sock.unwrap();
    sock.set_nodelay(true).unwrap();
    let mut neg = Negotiator::client();
    devbroker_tests::write_all_fd(sock.as_raw_fd(), &neg.opening()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    Rig {
        name: "ser2net",
        board_fd: board.master_fd(),
        tool: ToolEnd::new(
            OwnedFd::from(sock),
            Some(Telnet {
                dec: Decoder::new(),
                neg,
            }),
        ),
        pids: vec![child.id() as i32],
        _keep: vec![Box::new(board)],
        children: vec![child],
    }
}

fn devbroker(release: &Path) -> Rig {
    let dir = tmpdir().join("devbroker");
    let _ = fs::remove_dir_all(&dir);
    let by_id = dir.join("by-id");
    let name = "usb-Bench_Board_B1-if00-port0";
    let board = FakeBoard::plug(&by_id, name).unwrap();
    let cfg = dir.join("devbroker.toml");
    fs::write(&cfg, format!("[[board]]\nname = \"bench\"\nmachines = [\"m\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{name}\" }}\n")).unwrap();
    let run = dir.join("run");
    let log = std::env::var("BENCH_LOG").unwrap_or("warn".into());
    let broker = Command::new(release.join("devbroker"))
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--by-id-dir")
        .arg(&by_id)
        .arg("--run-dir")
        .arg(&run)
        .env("DEVBROKER_LOG", &log)
        .die_with_parent()
        .spawn()
        .expect("target/release/devbroker: build it first (see the doc comment)");
    let admin = run.join("broker.sock");
    wait_for(Duration::from_secs(10), "the broker's admin socket", || {
        std::os::unix::net::UnixStream::connect(&admin).is_ok()
    });
    let guest = dir.join("guest");
    let uid = nix::unistd::getuid().to_string();
    let shim = Command::new(devbroker_tests::devshim())
        .args(["serve", "--dir"])
        .arg(run.join("machines/m"))
        .arg("--link-root")
        .arg(&guest)
        .args(["--user", &uid])
        .env("DEVSHIM_LOG", &log)
        .die_with_parent()
        .spawn()
        .unwrap();
    let link = guest.join("serial/by-id").join(name);
    wait_for(Duration::from_secs(10), "the guest link", || link.exists());
    let tool = Tool::open(&link).unwrap();
    // The broker opens the port (dropping what the board sent before, as a
    // real port does) when the tool opens the pty: wait for that session.
    wait_for(Duration::from_secs(10), "the session", || {
        devbroker::status::fetch(&admin).is_ok_and(|s| s.boards[0].ttys[0].holder.is_some())
    });
    Rig {
        name: "devbroker",
        board_fd: board.master_fd(),
        tool: ToolEnd::new(tool.fd, None),
        pids: vec![broker.id() as i32, shim.id() as i32],
        _keep: vec![Box::new(board)],
        children: vec![broker, shim],
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The bench's directory: boards' links, the broker's run directory. A
/// static is never dropped, so `main` removes it at the end.
fn tmpdir() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("relay-bench-")
            .tempdir()
            .unwrap()
    })
    .path()
    .to_path_buf()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The paths `BENCH_ONLY` names (all four when unset; devbroker alone for
/// a value that names none, as `BENCH_ONLY=1`).
fn paths_to_run() -> Vec<&'static str> {
    let Ok(only) = std::env::var("BENCH_ONLY") else {
        return PATHS.to_vec();
    };
    let named: Vec<&str> = PATHS
        .iter()
        .copied()
        .filter(|p| only.split(',').any(|o| o.trim() == *p))
        .collect();
    if named.is_empty() {
        vec!["devbroker"]
    } else {
        named
    }
}

/// The clients `BENCH_CLIENT` names (`blocking` or `eager`; both when
/// unset), to look at one of them with strace or perf.
fn clients_to_run() -> Vec<Client> {
    let Ok(only) = std::env::var("BENCH_CLIENT") else {
        return Client::ALL.to_vec();
    };
    let named: Vec<Client> = Client::ALL
        .into_iter()
        .filter(|c| only.split(',').any(|o| o.trim() == c.name()))
        .collect();
    assert!(
        !named.is_empty(),
        "BENCH_CLIENT: blocking or eager, not {only:?}"
    );
    named
}

fn make_rig(path: &str, release: &Path) -> Rig {
    match path {
        "pty" => bare_pty(),
        "socat" => socat(),
        "ser2net" => ser2net(),
        _ => devbroker(release),
    }
}

/// Medians over runs of every figure.
fn median_figures(runs: &[Figures]) -> Figures {
    let med = |f: &dyn Fn(&Figures) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let med_opt = |f: &dyn Fn(&Figures) -> Option<f64>| {
        let mut v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let leg = |pick: &dyn Fn(&Figures) -> Leg| Leg {
        mbs: med(&|f| pick(f).mbs),
        bytes_per_call: med(&|f| pick(f).bytes_per_call),
        cpu_s_per_mib: med_opt(&|f| pick(f).cpu_s_per_mib),
        switches_per_unit: med_opt(&|f| pick(f).switches_per_unit),
    };
    Figures {
        to_tool: leg(&|f| f.to_tool),
        to_board: leg(&|f| f.to_board),
        both: leg(&|f| f.both),
        rtt_small: (med(&|f| f.rtt_small.0), med(&|f| f.rtt_small.1)),
        rtt_big: (med(&|f| f.rtt_big.0), med(&|f| f.rtt_big.1)),
    }
}

fn median_idle(runs: &[Idle]) -> Idle {
    Idle {
        wakeups: median(&mut runs.iter().map(|i| i.wakeups).collect::<Vec<_>>()),
        rss_kib: median(&mut runs.iter().map(|i| i.rss_kib).collect::<Vec<_>>()),
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

fn print_table(figs: &BTreeMap<(usize, Client), Figures>, paths: &[&str]) {
    println!(
        "{:<9} {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>15} {:>15}",
        "", "", "MB/s", "", "CPU s/MiB", "", "switches/32MiB", "", "RTT 1 B us", "RTT 5000 B us"
    );
    println!(
        "{:<9} {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>15} {:>15}",
        "client",
        "path",
        "to tool",
        "to board",
        "to tool",
        "to board",
        "to tool",
        "to board",
        "p50 / p99",
        "p50 / p99"
    );
    for client in Client::ALL {
        for (i, path) in paths.iter().enumerate() {
            let Some(f) = figs.get(&(i, client)) else {
                continue;
            };
            println!(
                "{:<9} {:<10} {:>8.1} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>15} {:>15}",
                client.name(),
                path,
                f.to_tool.mbs,
                f.to_board.mbs,
                opt(f.to_tool.cpu_s_per_mib, 4),
                opt(f.to_board.cpu_s_per_mib, 4),
                opt(f.to_tool.switches_per_unit, 0),
                opt(f.to_board.switches_per_unit, 0),
                format!("{:.0} / {:.0}", f.rtt_small.0, f.rtt_small.1),
                format!("{:.0} / {:.0}", f.rtt_big.0, f.rtt_big.1),
            );
        }
    }
}

/// Both ways at once: MB/s each way, and the relays' CPU and switches per
/// MiB moved (both directions counted).
fn print_both(figs: &BTreeMap<(usize, Client), Figures>, paths: &[&str]) {
    println!("both ways at once (the same MiB each way, at the same time):");
    println!(
        "  {:<9} {:<10} {:>12} {:>10} {:>15}",
        "client", "path", "MB/s each", "CPU s/MiB", "switches/32MiB"
    );
    for ((i, client), f) in figs {
        println!(
            "  {:<9} {:<10} {:>12.1} {:>10} {:>15}",
            client.name(),
            paths[*i],
            f.both.mbs,
            opt(f.both.cpu_s_per_mib, 4),
            opt(f.both.switches_per_unit, 0)
        );
    }
}

/// How big the pieces were that the tool got and gave: a relay that
/// forwards each small read at once makes an eager tool's reads small.
fn print_batches(figs: &BTreeMap<(usize, Client), Figures>, paths: &[&str]) {
    println!("the tool's bytes per read (to tool) and per write (to board):");
    for ((i, client), f) in figs {
        println!(
            "  {:<9} {:<10} {:>8.0} {:>8.0}",
            client.name(),
            paths[*i],
            f.to_tool.bytes_per_call,
            f.to_board.bytes_per_call
        );
    }
}

/// One goal, judged for each client: devbroker's figure against a baseline
/// path's, and ok/MISS.
struct Goal {
    what: &'static str,
    goal: &'static str,
    base: &'static str,
    value: fn(&Figures, &Figures) -> f64,
    ok: fn(f64) -> bool,
}

const GOALS: &[Goal] = &[
    Goal {
        what: "to tool MB/s / socat",
        goal: ">= 0.75",
        base: "socat",
        value: |d, s| d.to_tool.mbs / s.to_tool.mbs,
        ok: |v| v >= 0.75,
    },
    Goal {
        what: "to board MB/s / socat",
        goal: ">= 0.75",
        base: "socat",
        value: |d, s| d.to_board.mbs / s.to_board.mbs,
        ok: |v| v >= 0.75,
    },
    Goal {
        what: "both at once MB/s / socat",
        goal: ">= 0.75",
        base: "socat",
        value: |d, s| d.both.mbs / s.both.mbs,
        ok: |v| v >= 0.75,
    },
    Goal {
        what: "CPU/MiB to tool / socat",
        goal: "<= 2",
        base: "socat",
        value: |d, s| cpu(d.to_tool) / cpu(s.to_tool),
        ok: |v| v <= 2.0,
    },
    Goal {
        what: "CPU/MiB to board / socat",
        goal: "<= 2",
        base: "socat",
        value: |d, s| cpu(d.to_board) / cpu(s.to_board),
        ok: |v| v <= 2.0,
    },
    Goal {
        what: "CPU/MiB both at once / socat",
        goal: "<= 2",
        base: "socat",
        value: |d, s| cpu(d.both) / cpu(s.both),
        ok: |v| v <= 2.0,
    },
    Goal {
        what: "RTT p50 1 B / socat",
        goal: "<= 1.5",
        base: "socat",
        value: |d, s| d.rtt_small.0 / s.rtt_small.0,
        ok: |v| v <= 1.5,
    },
    Goal {
        what: "RTT p50 5000 B / socat",
        goal: "<= 1.5",
        base: "socat",
        value: |d, s| d.rtt_big.0 / s.rtt_big.0,
        ok: |v| v <= 1.5,
    },
    Goal {
        what: "to tool MB/s / ser2net",
        goal: ">= 2",
        base: "ser2net",
        value: |d, r| d.to_tool.mbs / r.to_tool.mbs,
        ok: |v| v >= 2.0,
    },
    Goal {
        what: "to board MB/s / ser2net",
        goal: ">= 2",
        base: "ser2net",
        value: |d, r| d.to_board.mbs / r.to_board.mbs,
        ok: |v| v >= 2.0,
    },
    Goal {
        what: "CPU/MiB both ways / ser2net",
        goal: "<= 1",
        base: "ser2net",
        value: |d, r| {
            (cpu(d.to_tool) + cpu(d.to_board)) / (cpu(r.to_tool) + cpu(r.to_board)).max(1e-9)
        },
        ok: |v| v <= 1.0,
    },
    Goal {
        what: "RTT p99 1 B (us)",
        goal: "< 500",
        base: "devbroker",
        value: |d, _| d.rtt_small.1,
        ok: |v| v < 500.0,
    },
];

fn cpu(l: Leg) -> f64 {
    l.cpu_s_per_mib.unwrap_or(f64::NAN)
}

/// Context switches have no goal of their own; their ratio says where CPU
/// and latency go.
fn print_switch_ratios(figs: &BTreeMap<(usize, Client), Figures>, d: usize, s: usize) {
    for client in Client::ALL {
        let (Some(df), Some(sf)) = (figs.get(&(d, client)), figs.get(&(s, client))) else {
            continue;
        };
        let ratio = |a: Leg, b: Leg| {
            a.switches_per_unit.unwrap_or(f64::NAN) / b.switches_per_unit.unwrap_or(f64::NAN)
        };
        println!(
            "  {:<9} switches per 32 MiB / socat: to tool {:.2}, to board {:.2}, both at once {:.2}",
            client.name(),
            ratio(df.to_tool, sf.to_tool),
            ratio(df.to_board, sf.to_board),
            ratio(df.both, sf.both)
        );
    }
}

fn print_goals(figs: &BTreeMap<(usize, Client), Figures>, idle: &BTreeMap<usize, Idle>) {
    let ix = |p: &str| PATHS.iter().position(|x| *x == p).unwrap();
    let (d, s) = (ix("devbroker"), ix("socat"));
    println!();
    println!("devbroker against the baselines and the goals:");
    println!(
        "  {:<28} {:>9}   {:>12} {:>12}",
        "figure", "goal", "blocking", "eager"
    );
    for g in GOALS {
        let mut cells = Vec::new();
        for client in Client::ALL {
            let get = |p| figs.get(&(p, client));
            let cell = match (get(d), get(ix(g.base))) {
                (Some(df), Some(bf)) => {
                    let v = (g.value)(df, bf);
                    format!("{v:.2} {}", if (g.ok)(v) { "ok" } else { "MISS" })
                }
                _ => "-".into(),
            };
            cells.push(cell);
        }
        println!(
            "  {:<28} {:>9}   {:>12} {:>12}",
            g.what, g.goal, cells[0], cells[1]
        );
    }
    if let Some(i) = idle.get(&d) {
        println!(
            "  {:<28} {:>9}   {:>12}",
            "idle wakeups in 5 s",
            "0",
            format!(
                "{:.0} {}",
                i.wakeups,
                if i.wakeups == 0.0 { "ok" } else { "MISS" }
            )
        );
    }
    print_switch_ratios(figs, d, s);
}

/// Medians over runs of what each path and client measured, and of each
/// path's idle figures.
type Results = (BTreeMap<(usize, Client), Figures>, BTreeMap<usize, Idle>);

/// Measures every path with every client, `runs` times.
fn run_all(release: &Path, mib: usize, runs: usize) -> Results {
    let paths = paths_to_run();
    let clients = clients_to_run();
    let mut figs: BTreeMap<(usize, Client), Vec<Figures>> = BTreeMap::new();
    let mut idles: BTreeMap<usize, Vec<Idle>> = BTreeMap::new();
    for run in 1..=runs {
        eprintln!("run {run} of {runs}");
        for path in &paths {
            let i = PATHS.iter().position(|p| p == path).unwrap();
            let mut rig = make_rig(path, release);
            // Alternate which client goes first, so neither always gets
            // the fresher session.
            let mut order = clients.clone();
            if run % 2 == 0 {
                order.reverse();
            }
            for client in order {
                let f = measure(&mut rig, client, mib);
                figs.entry((i, client)).or_default().push(f);
            }
            if !rig.pids.is_empty() {
                idles.entry(i).or_default().push(idle(&rig));
            }
        }
    }
    (
        figs.into_iter()
            .map(|(k, v)| (k, median_figures(&v)))
            .collect(),
        idles
            .into_iter()
            .map(|(k, v)| (k, median_idle(&v)))
            .collect(),
    )
}

fn main() {
    let mib = env_usize("BENCH_MIB", 32);
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let release = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let load0 = procstat::loadavg();
    let (figs, idle) = run_all(&release, mib, runs);

    println!(
        "relay-bench: {mib} MiB each way, {SMALL_TRIPS} 1-byte and {BIG_TRIPS} {BIG}-byte round trips (at most {}s each), 5 s idle; {}; median of {runs} run(s); {} cores; load average {load0:.2} before, {:.2} after",
        TRIPS_TIME.as_secs(),
        Payload::from_env().describe(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        procstat::loadavg()
    );
    println!(
        "CPU and switches: the relay processes, all threads; switches are voluntary + involuntary"
    );
    println!();
    print_table(&figs, &PATHS);
    println!();
    print_both(&figs, &PATHS);
    println!();
    print_batches(&figs, &PATHS);
    println!();
    println!(
        "{:<10} {:>20} {:>10}",
        "path", "idle wakeups in 5 s", "RSS KiB"
    );
    for (i, v) in &idle {
        println!("{:<10} {:>20.0} {:>10.0}", PATHS[*i], v.wakeups, v.rss_kib);
    }
    print_goals(&figs, &idle);
    let _ = fs::remove_dir_all(tmpdir());
}
