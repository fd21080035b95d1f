//! farm-bench: a farm on one host, measured against the goals.
//!
//! Three scenarios, each with the release broker on the by-id source and
//! fake boards (pty pairs published in a by-id directory):
//!
//! 1. **Dedicated**: 256 boards, 8 dedicated to each of 32 machines, one
//!    `devshim serve` per machine (its own machine directory, link root and
//!    state directory). Time to ready and to the guest links, guest links up,
//!    broker descriptors and RSS idle, with a session on every board (each
//!    guest link opened as a tool) and after they close, hotplug latency,
//!    idle wakeups of the broker and all devshims.
//! 2. **1,000 sessions**: 1,000 boards and a raw RFC 2217 session on each
//!    tty socket at once; each session carries a byte each way.
//! 3. **Shared by type**: 16 boards of 4 types, every machine allowed on
//!    all; every board held, then 256 lease requests by type (8 per machine)
//!    on the machines' control sockets, then released one at a time: the
//!    grants must follow the order of the requests, and the broker's CPU
//!    during the churn is printed.
//!
//! Everything runs under the default limits a farm gets: the kernel's
//! `fs.inotify.max_user_instances` (read and printed, never changed), and
//! systemd's default descriptor limit for services (soft 1024, hard
//! 524288) given to the broker and every devshim. The devshims run as root,
//! as in containers without `-U`: they all share root's inotify budget.
//! The bench itself (the boards and tools) raises its own descriptor limit;
//! it is the farm's hardware and jobs, not a part under test.
//!
//! Timings are printed against goals, never asserted. Knobs: `BENCH_LOG`
//! (the broker's and devshims' log level, default `warn`), `BENCH_KEEP=1`
//! (keep the directory with the logs).
//!
//! Run `cargo build --release -p devbroker -p devshim -p devbroker-tests`
//! first; this uses the release broker and the static devshim.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devbroker_tests::procstat::{self, percentile};
use devbroker_tests::{DieWithParent, FakeBoard, Proc, Tool};
use serde_json::{json, Value};

const MACHINES: usize = 32;
const PER_MACHINE: usize = 8;
const BOARDS: usize = MACHINES * PER_MACHINE;
const MANY_SESSIONS: usize = 1000;
const SHARED_BOARDS: usize = 16;
const TYPES: usize = 4;
const LEASES_PER_MACHINE: usize = 8;
/// systemd's `DefaultLimitNOFILE=1024:524288`, what a service gets unless
/// its unit says otherwise. The hard limit can only be lowered without
/// `CAP_SYS_RESOURCE`: see [`nofile_limits`].
const NOFILE: (u64, u64) = (1024, 524_288);
/// The kernel's default `fs.inotify.max_user_instances`.
const DEFAULT_INOTIFY_INSTANCES: u64 = 128;
/// Boards unplugged and plugged again, and how many times each.
const HOTPLUG_BOARDS: usize = 10;
const HOTPLUG_CYCLES: usize = 5;
/// How long a count of links may stay the same before the bench takes it
/// as final.
const SETTLE: Duration = Duration::from_secs(5);
/// Idle windows for wakeups.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// A hotplug change not seen within this long counts as missing.
const HOTPLUG_LIMIT: Duration = Duration::from_secs(3);
/// Written by each board and each tool to prove a session carries bytes.
const PING: &[u8] = b"farm-bench ping\n";

fn by_id_name(i: usize) -> String {
    format!("usb-Farm_Bench_F{i:04}-if00-port0")
}

fn board_name(i: usize) -> String {
    format!("b{i:04}")
}

fn machine_name(m: usize) -> String {
    format!("m{m:02}")
}

/// A config of `boards` boards with one tty each, the board `i` allowed on
/// the machines `machines(i)` and compatible with `types(i)`.
fn config(
    boards: usize,
    machines: impl Fn(usize) -> Vec<String>,
    types: impl Fn(usize) -> Vec<String>,
) -> String {
    let mut s = String::new();
    for i in 0..boards {
        s += &format!(
            "[[board]]\nname = \"{}\"\ncompatible = {:?}\nmachines = {:?}\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{}\" }}\n\n",
            board_name(i),
            types(i),
            machines(i),
            by_id_name(i)
        );
    }
    s
}

/// The log level for the broker and the devshims.
fn log_level() -> String {
    std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// The descriptor limits the broker and devshims get: systemd's default
/// soft limit, and its hard limit where this process could take it (see
/// [`raise_own_nofile`]; without `CAP_SYS_RESOURCE` no hard limit can be
/// raised, and children get this process's own).
fn nofile_limits() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let hard = hard.min(NOFILE.1);
    (NOFILE.0.min(hard), hard)
}

/// Gives a child systemd's default descriptor limit instead of whatever
/// this shell had.
fn default_nofile(cmd: &mut Command) -> &mut Command {
    let (soft, hard) = nofile_limits();
    // SAFETY: setrlimit between fork and exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Raises this process's own descriptor limit: the bench holds every
/// board's pty pair and every tool. Tries systemd's hard limit first, so
/// the children can be given it.
fn raise_own_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = hard.max(NOFILE.1);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The real uid of a process.
fn uid_of(pid: &str) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Inotify descriptors held by processes of `uid`, or by the processes
/// `only` when given: about the instances counted against the uid's
/// budget (a descriptor inherited by a child would count twice).
fn inotify_instances(uid: u32, only: Option<&[i32]>) -> usize {
    let pids: Vec<String> = match only {
        Some(p) => p.iter().map(|p| p.to_string()).collect(),
        None => fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    pids.iter()
        .filter(|p| uid_of(p) == Some(uid))
        .map(|p| {
            fs::read_dir(format!("/proc/{p}/fd"))
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| {
                            fs::read_link(e.path())
                                .is_ok_and(|l| l.as_os_str() == "anon_inode:inotify")
                        })
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

/// The soft and hard descriptor limits a process runs with.
fn nofile_of(pid: i32) -> (String, String) {
    let s = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = s
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f.get(3).unwrap_or(&"?").to_string(),
        f.get(4).unwrap_or(&"?").to_string(),
    )
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Listens where `NOTIFY_SOCKET` points, as systemd does, and keeps reading
/// so the broker's status updates never fill the socket: notes when
/// `READY=1` came.
struct Notify {
    path: PathBuf,
    ready: Arc<Mutex<Option<Instant>>>,
}

impl Notify {
    fn listen(path: PathBuf) -> Notify {
        let sock = UnixDatagram::bind(&path).unwrap();
        let ready = Arc::new(Mutex::new(None));
        let r2 = ready.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.lines().any(|l| l == "READY=1") {
                    r2.lock().unwrap().get_or_insert_with(Instant::now);
                }
            }
        });
        Notify { path, ready }
    }

    /// Waits for `READY=1`; when it came.
    fn wait_ready(&self, limit: Duration) -> Instant {
        let t0 = Instant::now();
        loop {
            if let Some(t) = *self.ready.lock().unwrap() {
                return t;
            }
            assert!(
                t0.elapsed() < limit,
                "the broker sent no READY=1 in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One scenario's world: boards, the broker, the devshims, in a temporary
/// directory.
struct Farm {
    tmp: tempfile::TempDir,
    by_id: PathBuf,
    run: PathBuf,
    boards: Vec<Option<FakeBoard>>,
    broker: Option<Proc>,
    shims: Vec<Proc>,
    notify: Notify,
}

impl Farm {
    /// Plugs `boards` fake boards and writes the config.
    fn new(name: &str, boards: usize, config: &str) -> Farm {
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!("farm-bench-{name}-"))
            .tempdir()
            .unwrap();
        if std::env::var_os("BENCH_KEEP").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("keeping {}", tmp.path().display());
        }
        let by_id = tmp.path().join("by-id");
        let boards = (0..boards)
            .map(|i| Some(FakeBoard::plug(&by_id, &by_id_name(i)).unwrap()))
            .collect();
        fs::write(tmp.path().join("devbroker.toml"), config).unwrap();
        let notify = Notify::listen(tmp.path().join("notify.sock"));
        Farm {
            run: tmp.path().join("run"),
            by_id,
            tmp,
            boards,
            broker: None,
            shims: Vec::new(),
            notify,
        }
    }

    fn log(&self, name: &str) -> fs::File {
        fs::File::create(self.tmp.path().join(format!("{name}.log"))).unwrap()
    }

    /// Starts the release broker under the default descriptor limit, with
    /// a notify socket; returns when it started.
    fn start_broker(&mut self, release: &Path) -> Instant {
        let mut cmd = Command::new(release.join("devbroker"));
        cmd.args(["run", "--config"])
            .arg(self.tmp.path().join("devbroker.toml"))
            .arg("--by-id-dir")
            .arg(&self.by_id)
            .arg("--run-dir")
            .arg(&self.run)
            .env("DEVBROKER_LOG", log_level())
            .env("NOTIFY_SOCKET", &self.notify.path)
            .stdout(Stdio::null())
            .stderr(self.log("broker"))
            .die_with_parent();
        default_nofile(&mut cmd);
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .expect("target/release/devbroker: build it first (see the doc comment)");
        self.broker = Some(Proc {
            child,
            name: "devbroker".into(),
        });
        t0
    }

    fn broker_pid(&self) -> i32 {
        self.broker.as_ref().expect("the broker runs").pid()
    }

    fn machine_dir(&self, m: usize) -> PathBuf {
        self.run.join("machines").join(machine_name(m))
    }

    fn guest(&self, m: usize) -> PathBuf {
        self.tmp.path().join("guest").join(machine_name(m))
    }

    /// Where machine `m`'s devshim links board `i`.
    fn guest_link(&self, m: usize, i: usize) -> PathBuf {
        self.guest(m).join("dev/serial/by-id").join(by_id_name(i))
    }

    /// The broker's socket for board `i`'s tty in machine `m`.
    fn socket(&self, m: usize, i: usize) -> PathBuf {
        self.machine_dir(m)
            .join(format!("{}.console.sock", board_name(i)))
    }

    /// Starts `devshim serve` for every machine, as root, under the default
    /// descriptor limit.
    fn start_shims(&mut self, machines: usize) {
        let shim = devbroker_tests::devshim();
        for m in 0..machines {
            let guest = self.guest(m);
            let mut cmd = Command::new(&shim);
            cmd.args(["serve", "--dir"])
                .arg(self.machine_dir(m))
                .arg("--link-root")
                .arg(guest.join("dev"))
                .args(["--user", "0", "--state-dir"])
                .arg(guest.join("run/devshim"))
                .env("DEVSHIM_LOG", log_level())
                .stdout(Stdio::null())
                .stderr(self.log(&format!("devshim-{}", machine_name(m))))
                .die_with_parent();
            default_nofile(&mut cmd);
            self.shims.push(Proc {
                child: cmd.spawn().unwrap(),
                name: format!("devshim {}", machine_name(m)),
            });
        }
    }

    /// The broker and every devshim.
    fn relay_pids(&self) -> Vec<i32> {
        let mut p = vec![self.broker_pid()];
        p.extend(self.shims.iter().map(|s| s.pid()));
        p
    }

    fn status(&self) -> wire::control::Status {
        devbroker::status::fetch(&self.run.join("broker.sock")).expect("the broker's status")
    }

    /// Ttys with a session, as the broker reports them.
    fn sessions(&self) -> usize {
        self.status()
            .boards
            .iter()
            .flat_map(|b| &b.ttys)
            .filter(|t| t.holder.is_some())
            .count()
    }

    /// The devshims that are no longer running, each with the last line of
    /// its log (why it stopped).
    fn exited_shims(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (m, shim) in self.shims.iter_mut().enumerate() {
            if shim.child.try_wait().ok().flatten().is_some() {
                let log = self
                    .tmp
                    .path()
                    .join(format!("devshim-{}.log", machine_name(m)));
                let text = fs::read_to_string(log).unwrap_or_default();
                out.push(text.lines().last().unwrap_or("").to_owned());
            }
        }
        out
    }

    /// Lines in the logs that contain `what`.
    fn log_lines(&self, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.tmp.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                out.extend(text.lines().filter(|l| l.contains(what)).map(String::from));
            }
        }
        out
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        // devshims first, so none of them reacts to the broker leaving.
        self.shims.clear();
        self.broker = None;
    }
}

/// Waits until `count()` is `want`, or has not changed for [`SETTLE`];
/// returns the last count and when it last changed.
fn settle(want: usize, limit: Duration, mut count: impl FnMut() -> usize) -> (usize, Instant) {
    let t0 = Instant::now();
    let mut last = (count(), t0);
    loop {
        if last.0 == want || last.1.elapsed() > SETTLE || t0.elapsed() > limit {
            return last;
        }
        std::thread::sleep(Duration::from_millis(2));
        let n = count();
        if n != last.0 {
            last = (n, Instant::now());
        }
    }
}

/// Polls `cond` every 200 µs up to `limit`: when it held, or `None`. Fine
/// enough for latencies in milliseconds; a watch of our own would take an
/// inotify instance from the budget under test.
fn when(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Instant> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Some(Instant::now());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Context switches of `pids` over [`IDLE_WINDOW`] with nothing happening.
fn idle_wakeups(pids: &[i32]) -> u64 {
    std::thread::sleep(Duration::from_millis(500));
    let w0 = procstat::switches_of(pids);
    std::thread::sleep(IDLE_WINDOW);
    procstat::switches_of(pids).saturating_sub(w0)
}

/// Reads from `fd` until `want` shows up in what came (after the RFC 2217
/// negotiation on a raw socket, say), up to `limit`.
fn read_until(fd: i32, want: &[u8], limit: Duration) -> bool {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = limit.checked_sub(t0.elapsed()) {
        match devbroker_tests::read_timeout(fd, &mut buf, left) {
            Ok(Some(0)) | Err(_) => return false,
            Ok(Some(n)) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(want.len()).any(|w| w == want) {
                    return true;
                }
            }
            Ok(None) => return false,
        }
    }
    false
}

/// Whether a session carries bytes both ways: the board's ping reaches the
/// tool's end `fd`, and the tool's reaches the board.
fn session_works(board: &FakeBoard, fd: i32) -> bool {
    devbroker_tests::write_all_fd(board.master_fd(), PING).is_ok()
        && read_until(fd, PING, Duration::from_secs(5))
        && devbroker_tests::write_all_fd(fd, PING).is_ok()
        && read_until(board.master_fd(), PING, Duration::from_secs(5))
}

/// A tool's end of a session: a guest link opened as a tool, or a raw
/// connection to the broker's tty socket.
enum SessionEnd {
    Tool(Tool),
    Raw(UnixStream),
}

impl SessionEnd {
    fn fd(&self) -> i32 {
        match self {
            SessionEnd::Tool(t) => t.fd.as_raw_fd(),
            SessionEnd::Raw(s) => s.as_raw_fd(),
        }
    }
}

/// One row of the goals table.
struct Row {
    what: String,
    value: String,
    goal: String,
    /// `None`: a figure printed for information, with no goal.
    ok: Option<bool>,
}

fn row(what: &str, value: String, goal: &str, ok: Option<bool>) -> Row {
    Row {
        what: what.into(),
        value,
        goal: goal.into(),
        ok,
    }
}

fn print_rows(title: &str, rows: &[Row]) {
    println!();
    println!("{title}");
    println!("  {:<52} {:>18}   {:<40}", "figure", "measured", "goal");
    for r in rows {
        let verdict = match r.ok {
            Some(true) => "ok",
            Some(false) => "MISS",
            None => "",
        };
        println!(
            "  {:<52} {:>18}   {:<40} {verdict}",
            r.what, r.value, r.goal
        );
    }
}

/// Scenario 1: 256 dedicated boards, 32 devshims.
fn dedicated(release: &Path) -> Vec<Row> {
    eprintln!("dedicated: {BOARDS} boards, {MACHINES} machines, {MACHINES} devshims");
    let cfg = config(
        BOARDS,
        |i| vec![machine_name(i / PER_MACHINE)],
        |_| vec!["farm".into()],
    );
    let mut farm = Farm::new("dedicated", BOARDS, &cfg);
    let mut rows = bring_up(&mut farm, release);
    let pids = farm.relay_pids();
    let wake_start = idle_wakeups(&pids);
    rows.extend(sessions_and_memory(&farm));
    rows.extend(hotplug(&mut farm));
    let wake_end = idle_wakeups(&pids);
    rows.push(row(
        "idle wakeups in 5 s, broker + 32 devshims, at start",
        wake_start.to_string(),
        "0",
        Some(wake_start == 0),
    ));
    rows.push(row(
        "  the same after sessions and hotplug",
        wake_end.to_string(),
        "0",
        Some(wake_end == 0),
    ));
    rows
}

/// Starts the broker, then (once it is ready) the devshims, and waits for
/// the guest links: how many came up, how fast, what stopped the others,
/// and the descriptor limit the broker runs with.
fn bring_up(farm: &mut Farm, release: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    let root_instances = inotify_instances(0, None);

    let t0 = farm.start_broker(release);
    let ready = farm.notify.wait_ready(Duration::from_secs(30)) - t0;
    // Containers start after the broker is ready (the drop-in orders them).
    farm.start_shims(MACHINES);
    let link_count = |farm: &Farm| {
        (0..BOARDS)
            .filter(|&i| devbroker_tests::exists(&farm.guest_link(i / PER_MACHINE, i)))
            .count()
    };
    let (links, last) = settle(BOARDS, Duration::from_secs(60), || link_count(farm));
    let links_time = last - t0;
    let shim_pids: Vec<i32> = farm.shims.iter().map(|s| s.pid()).collect();
    let shim_instances = inotify_instances(0, Some(&shim_pids));
    let unwatched = farm.log_lines("can't watch").len();
    let exited = farm.exited_shims();
    eprintln!(
        "  {links} of {BOARDS} guest links; devshims hold {shim_instances} inotify instances"
    );
    let (soft, hard) = nofile_of(farm.broker_pid());
    rows.push(row(
        "guest links up",
        format!("{links} of {BOARDS}"),
        "256 of 256, no sysctl changed",
        Some(links == BOARDS),
    ));
    rows.push(row(
        "  inotify instances: root's before / devshims'",
        format!("{root_instances} / {shim_instances}"),
        &format!("(budget {} per uid)", inotify_limit()),
        None,
    ));
    rows.push(row(
        "  devshims that exited at start",
        format!("{} of {MACHINES}", exited.len()),
        "0",
        Some(exited.is_empty()),
    ));
    if let Some(why) = exited.first() {
        eprintln!("  a devshim that exited said: {why}");
    }
    rows.push(row(
        "  ttys given up (\"can't watch\" in devshims' logs)",
        unwatched.to_string(),
        "0",
        Some(unwatched == 0),
    ));
    rows.push(row(
        "time to ready (READY=1)",
        format!("{:.2} s", ready.as_secs_f64()),
        "keep: 0.54 s (ok up to +25%)",
        Some(ready.as_secs_f64() <= 0.54 * 1.25),
    ));
    rows.push(row(
        "time to the guest links (from the broker's start)",
        format!("{:.2} s", links_time.as_secs_f64()),
        "keep: 0.92 s (ok up to +25%), all up",
        Some(links == BOARDS && links_time.as_secs_f64() <= 0.92 * 1.25),
    ));
    rows.push(row(
        "broker descriptor limit (soft / hard)",
        format!("{soft} / {hard}"),
        &format!(
            "started with {} / {}: soft raised",
            nofile_limits().0,
            nofile_limits().1
        ),
        Some(soft == hard),
    ));

    rows
}

/// A session on every board at once: whether each carries bytes, and the
/// broker's descriptors and memory idle, with them, and after they close.
fn sessions_and_memory(farm: &Farm) -> Vec<Row> {
    let mut rows = Vec::new();
    let fds_idle = procstat::fd_count(farm.broker_pid());
    let rss_idle = procstat::rss_kib(farm.broker_pid());
    let (ends, raw) = open_sessions(farm);
    let (sessions, _) = settle(BOARDS, Duration::from_secs(30), || farm.sessions());
    let working = ends
        .iter()
        .enumerate()
        .filter(|(i, e)| session_works(farm.boards[*i].as_ref().unwrap(), e.fd()))
        .count();
    let fds_busy = procstat::fd_count(farm.broker_pid());
    let rss_busy = procstat::rss_kib(farm.broker_pid());
    drop(ends);
    let (left, _) = settle(0, Duration::from_secs(30), || farm.sessions());
    std::thread::sleep(Duration::from_secs(2));
    let fds_after = procstat::fd_count(farm.broker_pid());
    let rss_after = procstat::rss_kib(farm.broker_pid());
    rows.push(row(
        "sessions at once (guest links opened as tools)",
        format!("{sessions} of {BOARDS}"),
        &format!("{BOARDS} ({raw} raw: guest link missing)"),
        Some(sessions == BOARDS),
    ));
    rows.push(row(
        "  sessions carrying a byte each way",
        format!("{working} of {BOARDS}"),
        &format!("{BOARDS}"),
        Some(working == BOARDS),
    ));
    rows.push(row(
        "broker descriptors idle / 256 sessions / after",
        format!("{fds_idle} / {fds_busy} / {fds_after}"),
        "(was 333 / 845)",
        None,
    ));
    rows.push(row(
        "broker RSS idle",
        format!("{:.1} MiB", mib(rss_idle)),
        "(was 10.5 MB)",
        None,
    ));
    rows.push(row(
        "broker RSS with 256 sessions",
        format!("{:.1} MiB", mib(rss_busy)),
        "<= 32 MiB",
        Some(mib(rss_busy) <= 32.0),
    ));
    rows.push(row(
        "  per session",
        format!(
            "{:.0} KiB",
            (rss_busy.saturating_sub(rss_idle)) as f64 / BOARDS as f64
        ),
        "(was ~135 KiB)",
        None,
    ));
    rows.push(row(
        "broker RSS after the sessions closed",
        format!(
            "{:.1} MiB ({:+.0}%)",
            mib(rss_after),
            (rss_after as f64 / rss_idle as f64 - 1.0) * 100.0
        ),
        "within 25% of idle",
        Some(rss_after as f64 <= rss_idle as f64 * 1.25 && left == 0),
    ));

    rows
}

/// Opens a session on every board: its guest link as a tool where devshim
/// published one, else a raw connection to the broker's socket (so the
/// broker carries all its sessions even when links are missing). Returns
/// the ends, in board order, and how many are raw.
fn open_sessions(farm: &Farm) -> (Vec<SessionEnd>, usize) {
    let mut raw = 0;
    let ends =
        (0..BOARDS)
            .map(|i| {
                let m = i / PER_MACHINE;
                match Tool::open(&farm.guest_link(m, i)) {
                    Ok(t) => SessionEnd::Tool(t),
                    Err(_) => {
                        raw += 1;
                        SessionEnd::Raw(UnixStream::connect(farm.socket(m, i)).unwrap_or_else(
                            |e| panic!("connect {}: {e}", farm.socket(m, i).display()),
                        ))
                    }
                }
            })
            .collect();
    (ends, raw)
}

/// Latencies in ms of one kind of hotplug change.
#[derive(Default)]
struct Latencies {
    socket: Vec<f64>,
    link: Vec<f64>,
    /// Changes the guest link never showed.
    link_missing: usize,
}

/// Unplugs and replugs a few boards, one at a time: how long from the by-id
/// link's change to the broker's socket (and devshim's guest link)
/// disappearing and appearing.
fn hotplug(farm: &mut Farm) -> Vec<Row> {
    eprintln!("  hotplug: {HOTPLUG_BOARDS} boards x {HOTPLUG_CYCLES}");
    let (mut add, mut remove) = (Latencies::default(), Latencies::default());
    let step = BOARDS / HOTPLUG_BOARDS;
    for _ in 0..HOTPLUG_CYCLES {
        for i in (0..HOTPLUG_BOARDS).map(|k| k * step + k % PER_MACHINE) {
            let m = i / PER_MACHINE;
            let (sock, link) = (farm.socket(m, i), farm.guest_link(m, i));
            let had_link = devbroker_tests::exists(&link);
            let t0 = Instant::now();
            farm.boards[i].take().unwrap().unplug();
            record(&mut remove, t0, &sock, &link, had_link, false);
            let t0 = Instant::now();
            farm.boards[i] = Some(FakeBoard::plug(&farm.by_id, &by_id_name(i)).unwrap());
            record(&mut add, t0, &sock, &link, had_link, true);
        }
    }
    let n = HOTPLUG_BOARDS * HOTPLUG_CYCLES;
    let mut rows = Vec::new();
    for (what, l) in [("add", &mut add), ("remove", &mut remove)] {
        let p99 = percentile(&mut l.socket, 99);
        rows.push(row(
            &format!("hotplug {what}: broker socket p50 / p99 ({n} changes)"),
            format!("{:.1} / {:.1} ms", percentile(&mut l.socket, 50), p99),
            "p99 <= 50 ms",
            Some(l.socket.len() == n && p99 <= 50.0),
        ));
        rows.push(row(
            &format!("  guest link p50 / p99 ({} seen)", l.link.len()),
            format!(
                "{:.1} / {:.1} ms",
                percentile(&mut l.link, 50),
                percentile(&mut l.link, 99)
            ),
            &format!("({} never seen)", l.link_missing),
            None,
        ));
    }
    rows
}

/// Times one change (the socket and, if devshim had published the board,
/// the guest link, each appearing when `present`, else disappearing).
fn record(l: &mut Latencies, t0: Instant, sock: &Path, link: &Path, had_link: bool, present: bool) {
    if let Some(t) = when(HOTPLUG_LIMIT, || sock.exists() == present) {
        l.socket.push((t - t0).as_secs_f64() * 1e3);
    }
    if had_link {
        match when(HOTPLUG_LIMIT, || devbroker_tests::exists(link) == present) {
            Some(t) => l.link.push((t - t0).as_secs_f64() * 1e3),
            None => l.link_missing += 1,
        }
    }
}

/// Scenario 2: a raw session on each of 1,000 boards at once.
fn many_sessions(release: &Path) -> Vec<Row> {
    eprintln!("many sessions: {MANY_SESSIONS} boards, raw sessions");
    let cfg = config(
        MANY_SESSIONS,
        |i| vec![machine_name(i % MACHINES)],
        |_| vec!["farm".into()],
    );
    let mut farm = Farm::new("sessions", MANY_SESSIONS, &cfg);
    farm.start_broker(release);
    farm.notify.wait_ready(Duration::from_secs(60));
    let fds_idle = procstat::fd_count(farm.broker_pid());
    let rss_idle = procstat::rss_kib(farm.broker_pid());
    let mut refused = 0;
    let ends: Vec<Option<UnixStream>> = (0..MANY_SESSIONS)
        .map(|i| {
            let s = UnixStream::connect(farm.socket(i % MACHINES, i)).ok();
            refused += usize::from(s.is_none());
            s
        })
        .collect();
    let (sessions, _) = settle(MANY_SESSIONS, Duration::from_secs(60), || farm.sessions());
    let working = ends
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            e.as_ref()
                .is_some_and(|s| session_works(farm.boards[*i].as_ref().unwrap(), s.as_raw_fd()))
        })
        .count();
    let fds = procstat::fd_count(farm.broker_pid());
    let rss = procstat::rss_kib(farm.broker_pid());
    let emfile = farm.log_lines("Too many open files").len();
    drop(ends);
    vec![
        row(
            "1,000 raw sessions: sessions / carrying bytes",
            format!("{sessions} / {working}"),
            "1000 / 1000",
            Some(sessions == MANY_SESSIONS && working == MANY_SESSIONS),
        ),
        row(
            "  connections refused / EMFILE lines in the log",
            format!("{refused} / {emfile}"),
            "0 / 0",
            Some(refused == 0 && emfile == 0),
        ),
        row(
            "  broker descriptors idle / with 1,000 sessions",
            format!("{fds_idle} / {fds}"),
            "",
            None,
        ),
        row(
            "  broker RSS idle / with 1,000 sessions",
            format!("{:.1} / {:.1} MiB", mib(rss_idle), mib(rss)),
            "",
            None,
        ),
    ]
}

/// A control connection speaking JSON lines, read only when poll says so.
struct Control {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl Control {
    /// Connects to a machine's control socket and says hello.
    fn connect(path: &Path) -> Control {
        let sock =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = Control {
            sock,
            buf: Vec::new(),
        };
        c.send(json!({"request": "hello", "version": 1, "client": "farm-bench"}));
        let hello = c.reply();
        assert_eq!(hello["reply"], "hello", "{hello}");
        c
    }

    fn send(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.sock.write_all(&line).unwrap();
    }

    /// A complete line already read, if any.
    fn take_line(&mut self) -> Option<Value> {
        let nl = self.buf.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=nl).collect();
        Some(serde_json::from_slice(&line).expect("a JSON reply line"))
    }

    /// One read (the socket is readable, or this blocks up to the timeout).
    fn read_some(&mut self) {
        let mut b = [0u8; 4096];
        let n = self.sock.read(&mut b).expect("a control reply");
        assert!(n > 0, "the broker closed a control connection");
        self.buf.extend_from_slice(&b[..n]);
    }

    /// The next reply, blocking.
    fn reply(&mut self) -> Value {
        loop {
            if let Some(v) = self.take_line() {
                return v;
            }
            self.read_some();
        }
    }
}

/// Scenario 3: 32 machines sharing 16 boards by type.
fn shared(release: &Path) -> Vec<Row> {
    let requests = MACHINES * LEASES_PER_MACHINE;
    eprintln!("shared: {SHARED_BOARDS} boards of {TYPES} types, {requests} lease requests");
    let all: Vec<String> = (0..MACHINES).map(machine_name).collect();
    let cfg = config(
        SHARED_BOARDS,
        |_| all.clone(),
        |i| vec![format!("t{}", i % TYPES)],
    );
    let mut farm = Farm::new("shared", SHARED_BOARDS, &cfg);
    farm.start_broker(release);
    farm.notify.wait_ready(Duration::from_secs(30));
    let control = |m: usize| farm.machine_dir(m).join("control.sock");

    // Every board held, so that every request waits.
    let mut held: VecDeque<(Control, String)> = (0..SHARED_BOARDS)
        .map(|i| {
            let mut c = Control::connect(&control(i % MACHINES));
            c.send(json!({"request": "lease", "board": board_name(i)}));
            let r = c.reply();
            assert_eq!(r["reply"], "granted", "{r}");
            (c, board_name(i))
        })
        .collect();

    let cpu0 = procstat::cpu_seconds(&[farm.broker_pid()]);
    let t0 = Instant::now();
    // Request r comes from machine r % 32 for type (r / 32) % 4: each
    // machine asks for each type twice, the machines taking turns.
    let mut waiting: Vec<Option<Control>> = Vec::new();
    let mut queues: Vec<VecDeque<usize>> = vec![VecDeque::new(); TYPES];
    for r in 0..requests {
        let kind = (r / MACHINES) % TYPES;
        let mut c = Control::connect(&control(r % MACHINES));
        c.send(json!({"request": "lease", "type": format!("t{kind}")}));
        let reply = c.reply();
        assert_eq!(reply["reply"], "waiting", "request {r}: {reply}");
        queues[kind].push_back(r);
        waiting.push(Some(c));
    }
    let filing = t0.elapsed();
    let cpu_filing = procstat::cpu_seconds(&[farm.broker_pid()]) - cpu0;

    let churn = churn(&mut held, &mut waiting, &mut queues);
    let cpu_all = procstat::cpu_seconds(&[farm.broker_pid()]) - cpu0;
    let mut lat = churn.latencies_ms;
    vec![
        row(
            "leases: requests waiting at once",
            format!("{requests}"),
            &format!("{requests}"),
            Some(true),
        ),
        row(
            "  grants / in request order per type",
            format!("{} / {}", churn.grants, churn.in_order),
            &format!("{requests} / {requests}"),
            Some(churn.grants == requests && churn.in_order == requests),
        ),
        row(
            "  release -> next grant p50 / p99",
            format!(
                "{:.2} / {:.2} ms",
                percentile(&mut lat, 50),
                percentile(&mut lat, 99)
            ),
            "",
            None,
        ),
        row(
            "  broker CPU: filing 256 waits / the whole churn",
            format!("{cpu_filing:.3} / {cpu_all:.3} s"),
            &format!("(filing took {:.2} s)", filing.as_secs_f64()),
            None,
        ),
    ]
}

/// What releasing the boards one at a time gave.
struct Churn {
    grants: usize,
    /// Grants that went to the first request still waiting for that type.
    in_order: usize,
    latencies_ms: Vec<f64>,
}

/// Releases the longest-held board, waits for its grant to the next
/// request of its type, and so on until nobody waits or holds.
fn churn(
    held: &mut VecDeque<(Control, String)>,
    waiting: &mut [Option<Control>],
    queues: &mut [VecDeque<usize>],
) -> Churn {
    let mut out = Churn {
        grants: 0,
        in_order: 0,
        latencies_ms: Vec::new(),
    };
    while let Some((mut c, board)) = held.pop_front() {
        let kind: usize = board_type(&board);
        let t0 = Instant::now();
        c.send(json!({"request": "release", "board": board}));
        let r = c.reply();
        assert_eq!(r["reply"], "released", "{r}");
        drop(c);
        if queues[kind].is_empty() {
            continue;
        }
        let (r, granted) = next_grant(waiting);
        out.latencies_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        out.grants += 1;
        if queues[kind].front() == Some(&r) {
            out.in_order += 1;
        }
        queues[kind].retain(|&x| x != r);
        let c = waiting[r].take().unwrap();
        held.push_back((c, granted));
    }
    out
}

/// Board `bNNNN`'s type, as [`shared`]'s config gives it.
fn board_type(board: &str) -> usize {
    board[1..].parse::<usize>().unwrap() % TYPES
}

/// Waits for a `granted` reply on any waiting connection: which request
/// got which board.
fn next_grant(waiting: &mut [Option<Control>]) -> (usize, String) {
    loop {
        for (r, c) in waiting.iter_mut().enumerate() {
            let Some(c) = c else { continue };
            while let Some(v) = c.take_line() {
                if v["reply"] == "granted" {
                    return (r, v["board"].as_str().unwrap().to_owned());
                }
                assert_eq!(v["reply"], "waiting", "request {r}: {v}");
            }
        }
        let idx: Vec<usize> = (0..waiting.len())
            .filter(|&r| waiting[r].is_some())
            .collect();
        let mut pfds: Vec<libc::pollfd> = idx
            .iter()
            .map(|&r| libc::pollfd {
                fd: waiting[r].as_ref().unwrap().sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, 10_000) };
        assert!(n > 0, "no grant came within 10 s of a release");
        for (k, p) in pfds.iter().enumerate() {
            if p.revents != 0 {
                waiting[idx[k]].as_mut().unwrap().read_some();
            }
        }
    }
}

fn inotify_limit() -> u64 {
    read_u64("/proc/sys/fs/inotify/max_user_instances").unwrap_or(0)
}

fn main() {
    let release = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    raise_own_nofile();
    // Built before anything is timed.
    let _ = devbroker_tests::devshim();
    let load0 = procstat::loadavg();
    let limit = inotify_limit();
    println!(
        "farm-bench: {BOARDS} boards, {PER_MACHINE} dedicated to each of {MACHINES} machines; {MANY_SESSIONS} raw sessions; {SHARED_BOARDS} boards of {TYPES} types shared by {MACHINES} machines; {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let (soft, hard) = nofile_limits();
    println!(
        "limits: fs.inotify.max_user_instances = {limit}{} (not changed); broker and devshims started with descriptor limit {soft} / {hard} (systemd's default is {} / {}{}); all 32 devshims run as root, sharing root's inotify budget as containers without -U do",
        if limit == DEFAULT_INOTIFY_INSTANCES { " (the kernel's default)" } else { " (NOT the kernel's default 128)" },
        NOFILE.0,
        NOFILE.1,
        if hard < NOFILE.1 { ", the hard limit here is lower" } else { "" },
    );
    let mut rows = dedicated(&release);
    rows.extend(many_sessions(&release));
    rows.extend(shared(&release));
    print_rows(
        &format!(
            "against the goals (load average {load0:.2} before, {:.2} after):",
            procstat::loadavg()
        ),
        &rows,
    );
}
