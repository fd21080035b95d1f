//! relay-bench: measures the whole devbroker path against baselines measured
//! in the same run on the same machine, and prints the ratios.
//!
//! Paths, all starting at a fake board (the master of a pty pair):
//! - `pty`: a bare pty hop (the tool reads the slave): the floor.
//! - `socat`: socat relaying the board's pty to a new pty.
//! - `ser2net`: Debian's ser2net, RFC 2217 accepter on loopback TCP; the tool
//!   is a TCP client speaking Telnet.
//! - `devbroker`: broker → unix socket → devshim → guest pty.
//!
//! Run `cargo build --release --workspace` first; this uses the release
//! broker and the static devshim.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::{read_timeout, wait_for, DieWithParent, FakeBoard, Tool};
use wire::telnet::{Decoder, Event, Negotiator};

const MIB: usize = 1 << 20;

/// The tool's end of a path: a pty fd, or a Telnet TCP client.
enum ToolEnd {
    Fd(OwnedFd),
    Telnet {
        sock: TcpStream,
        dec: Decoder,
        neg: Negotiator,
    },
}

impl ToolEnd {
    fn write_all(&mut self, data: &[u8]) {
        match self {
            ToolEnd::Fd(fd) => devbroker_tests::write_all_fd(fd.as_raw_fd(), data).unwrap(),
            // Payload has no 0xFF (see `payload`), so it needs no escaping.
            ToolEnd::Telnet { sock, .. } => sock.write_all(data).unwrap(),
        }
    }

    /// Reads payload bytes (Telnet commands answered and dropped).
    fn read(&mut self, buf: &mut [u8]) -> usize {
        match self {
            ToolEnd::Fd(fd) => read_timeout(fd.as_raw_fd(), buf, Duration::from_secs(10))
                .unwrap()
                .expect("tool read timed out"),
            ToolEnd::Telnet { sock, dec, neg } => loop {
                let mut raw = vec![0u8; buf.len()];
                let n = sock.read(&mut raw).unwrap();
                assert!(n > 0, "ser2net closed");
                let mut out = 0;
                let mut pos = 0;
                let mut answers = Vec::new();
                while pos < n {
                    let (used, ev) = dec.feed(&raw[pos..n]);
                    pos += used;
                    match ev {
                        Some(Event::Data(d)) => {
                            buf[out..out + d.len()].copy_from_slice(d);
                            out += d.len();
                        }
                        Some(Event::Negotiate(v, o)) => {
                            if let Some((rv, ro)) = neg.answer(v, o) {
                                wire::telnet::negotiate(rv, ro, &mut answers);
                            }
                        }
                        _ => {}
                    }
                }
                if !answers.is_empty() {
                    sock.write_all(&answers).unwrap();
                }
                if out > 0 {
                    return out;
                }
            },
        }
    }
}

/// One path under test.
struct Rig {
    name: &'static str,
    board_fd: RawFd,
    tool: ToolEnd,
    /// Relay processes whose CPU, wakeups and memory count.
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

#[derive(Default, Clone, Copy)]
struct Figures {
    to_tool_mbs: f64,
    to_board_mbs: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    cpu_s_per_mib: Option<f64>,
    idle_wakeups: Option<u64>,
    rss_kib: Option<u64>,
}

fn payload(n: usize, seed: u64) -> Vec<u8> {
    devbroker_tests::random_bytes(n, seed)
        .into_iter()
        .map(|b| if b == 0xFF { 0xFE } else { b })
        .collect()
}

/// CPU seconds (user + system) of a process and its threads.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Context switches of every thread of a process: each is a wakeup.
fn wakeups(pid: i32) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let s = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for l in s.lines() {
                if let Some(v) = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

fn rss_kib(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cpu_of(pids: &[i32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// Moves `n` bytes from `w` to `r` through the rig; returns MB/s.
fn throughput(rig: &mut Rig, n: usize, to_tool: bool) -> f64 {
    eprintln!(
        "  {}: {} MiB to the {}",
        rig.name,
        n / MIB,
        if to_tool { "tool" } else { "board" }
    );
    let data = payload(n, if to_tool { 7 } else { 8 });
    let board = rig.board_fd;
    let t0 = Instant::now();
    if to_tool {
        let writer =
            std::thread::spawn(move || devbroker_tests::write_all_fd(board, &data).unwrap());
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while got < n {
            got += rig.tool.read(&mut buf);
        }
        writer.join().unwrap();
    } else {
        let reader = std::thread::spawn(move || {
            devbroker_tests::read_exact_timeout(board, n, Duration::from_secs(120))
                .unwrap()
                .len()
        });
        rig.tool.write_all(&data);
        assert_eq!(reader.join().unwrap(), n);
    }
    n as f64 / t0.elapsed().as_secs_f64() / 1e6
}

/// 1-byte echo round trips: the tool writes, the board echoes, the tool reads.
fn rtt(rig: &mut Rig, count: usize) -> (f64, f64) {
    let board = rig.board_fd;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(Some(n)) = read_timeout(board, &mut b, Duration::from_millis(100)) {
                devbroker_tests::write_all_fd(board, &b[..n]).unwrap();
            }
        }
    });
    eprintln!("  {}: {count} round trips", rig.name);
    let mut samples = Vec::with_capacity(count);
    let mut buf = [0u8; 64];
    for i in 0..count + 100 {
        let t0 = Instant::now();
        rig.tool.write_all(&[b'a' + (i % 26) as u8]);
        let mut got = 0;
        while got < 1 {
            got += rig.tool.read(&mut buf);
        }
        if i >= 100 {
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().unwrap();
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn measure(rig: &mut Rig, mib: usize) -> Figures {
    let mut f = Figures::default();
    // Warm up and settle the session.
    throughput(rig, MIB, true);
    throughput(rig, MIB, false);
    let cpu0 = cpu_of(&rig.pids);
    f.to_tool_mbs = throughput(rig, mib * MIB, true);
    f.to_board_mbs = throughput(rig, mib * MIB, false);
    let cpu = cpu_of(&rig.pids) - cpu0;
    if !rig.pids.is_empty() {
        f.cpu_s_per_mib = Some(cpu / (2 * mib) as f64);
    }
    let (p50, p99) = rtt(rig, 3000);
    f.rtt_p50_us = p50;
    f.rtt_p99_us = p99;
    if !rig.pids.is_empty() {
        std::thread::sleep(Duration::from_millis(200));
        let w0: u64 = rig.pids.iter().map(|&p| wakeups(p)).sum();
        std::thread::sleep(Duration::from_secs(5));
        let w1: u64 = rig.pids.iter().map(|&p| wakeups(p)).sum();
        f.idle_wakeups = Some(w1 - w0);
        f.rss_kib = Some(rig.pids.iter().map(|&p| rss_kib(p)).sum());
    }
    f
}

fn bare_pty() -> Rig {
    let board = FakeBoard::plug(&tmpdir().join("bare"), "board").unwrap();
    let tool = Tool::open(&board.slave_path).unwrap();
    Rig {
        name: "pty",
        board_fd: board.master_fd(),
        tool: ToolEnd::Fd(tool.fd),
        pids: vec![],
        _keep: vec![Box::new(board)],
        children: vec![],
    }
}

fn socat() -> Rig {
    let dir = tmpdir().join("socat");
    let board = FakeBoard::plug(&dir, "board").unwrap();
    let link = dir.join("tool");
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
        tool: ToolEnd::Fd(tool.fd),
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
    let mut s2 = sock.try_clone().unwrap();
    s2.write_all(&neg.opening()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    Rig {
        name: "ser2net",
        board_fd: board.master_fd(),
        tool: ToolEnd::Telnet {
            sock,
            dec: Decoder::new(),
            neg,
        },
        pids: vec![child.id() as i32],
        _keep: vec![Box::new(board)],
        children: vec![child],
    }
}

fn devbroker(release: &Path) -> Rig {
    let dir = tmpdir().join("devbroker");
    let by_id = dir.join("by-id");
    let name = "usb-Bench_Board_B1-if00-port0";
    let board = FakeBoard::plug(&by_id, name).unwrap();
    let cfg = dir.join("devbroker.toml");
    fs::write(&cfg, format!("[[board]]\nname = \"bench\"\nmachines = [\"m\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{name}\" }}\n")).unwrap();
    let run = dir.join("run");
    let broker = Command::new(release.join("devbroker"))
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--by-id-dir")
        .arg(&by_id)
        .arg("--run-dir")
        .arg(&run)
        .env(
            "DEVBROKER_LOG",
            std::env::var("BENCH_LOG").unwrap_or("warn".into()),
        )
        .die_with_parent()
        .spawn()
        .expect("target/release/devbroker: run `cargo build --release --workspace` first");
    let guest = dir.join("guest");
    let uid = nix::unistd::getuid().to_string();
    let shim = Command::new(devbroker_tests::devshim())
        .args(["serve", "--dir"])
        .arg(run.join("machines/m"))
        .arg("--link-root")
        .arg(&guest)
        .args(["--user", &uid])
        .env(
            "DEVSHIM_LOG",
            std::env::var("BENCH_LOG").unwrap_or("warn".into()),
        )
        .die_with_parent()
        .spawn()
        .unwrap();
    let link = guest.join("serial/by-id").join(name);
    wait_for(Duration::from_secs(10), "the guest link", || link.exists());
    let tool = Tool::open(&link).unwrap();
    // The broker opens the port (dropping what the board sent before, as a
    // real port does) when the tool opens the pty: wait for that session.
    let admin = run.join("broker.sock");
    wait_for(Duration::from_secs(10), "the session", || {
        devbroker::status::fetch(&admin).is_ok_and(|s| s.boards[0].ttys[0].holder.is_some())
    });
    Rig {
        name: "devbroker",
        board_fd: board.master_fd(),
        tool: ToolEnd::Fd(tool.fd),
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

fn main() {
    let mib: usize = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let release = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    println!(
        "relay-bench: {mib} MiB each way, 3000 1-byte round trips, 5 s idle; {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut rows: Vec<(&str, Figures)> = Vec::new();
    let only = std::env::var("BENCH_ONLY").ok();
    for make in [bare_pty as fn() -> Rig, socat, ser2net] {
        if only.is_some() {
            break;
        }
        let mut rig = make();
        let f = measure(&mut rig, mib);
        rows.push((rig.name, f));
    }
    let mut rig = devbroker(&release);
    let f = measure(&mut rig, mib);
    rows.push((rig.name, f));
    drop(rig);

    println!();
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>10} {:>12} {:>10} {:>9}",
        "path",
        "to tool MB/s",
        "to board MB/s",
        "RTT p50",
        "RTT p99",
        "CPU s/MiB",
        "idle wake",
        "RSS KiB"
    );
    for (name, f) in &rows {
        println!(
            "{:<10} {:>12.1} {:>13.1} {:>8.0}us {:>8.0}us {:>12} {:>10} {:>9}",
            name,
            f.to_tool_mbs,
            f.to_board_mbs,
            f.rtt_p50_us,
            f.rtt_p99_us,
            f.cpu_s_per_mib.map_or("-".into(), |c| format!("{c:.4}")),
            f.idle_wakeups.map_or("-".into(), |w| w.to_string()),
            f.rss_kib.map_or("-".into(), |r| r.to_string()),
        );
    }
    let get = |n: &str| rows.iter().find(|r| r.0 == n).map(|r| r.1);
    let (Some(d), Some(s), Some(r)) = (get("devbroker"), get("socat"), get("ser2net")) else {
        // BENCH_ONLY: no baselines to compare with.
        return;
    };
    println!();
    println!("devbroker against the baselines (goal in brackets):");
    let check = |ok: bool| if ok { "ok" } else { "MISSED" };
    let line = |what: &str, v: f64, goal: &str, ok: bool| {
        println!("  {what:<34} {v:>7.2}  [{goal}]  {}", check(ok))
    };
    line(
        "to tool / ser2net",
        d.to_tool_mbs / r.to_tool_mbs,
        ">= 2",
        d.to_tool_mbs >= 2.0 * r.to_tool_mbs,
    );
    line(
        "to board / ser2net",
        d.to_board_mbs / r.to_board_mbs,
        ">= 2",
        d.to_board_mbs >= 2.0 * r.to_board_mbs,
    );
    line(
        "to tool / socat",
        d.to_tool_mbs / s.to_tool_mbs,
        ">= 0.75",
        d.to_tool_mbs >= 0.75 * s.to_tool_mbs,
    );
    line(
        "to board / socat",
        d.to_board_mbs / s.to_board_mbs,
        ">= 0.75",
        d.to_board_mbs >= 0.75 * s.to_board_mbs,
    );
    line(
        "RTT p50 / socat",
        d.rtt_p50_us / s.rtt_p50_us,
        "<= 1.5",
        d.rtt_p50_us <= 1.5 * s.rtt_p50_us,
    );
    line("RTT p99 (us)", d.rtt_p99_us, "< 500", d.rtt_p99_us < 500.0);
    let (dc, rc) = (d.cpu_s_per_mib.unwrap(), r.cpu_s_per_mib.unwrap());
    line("CPU per MiB / ser2net", dc / rc.max(1e-9), "<= 1", dc <= rc);
    line(
        "idle wakeups in 5 s",
        d.idle_wakeups.unwrap() as f64,
        "0",
        d.idle_wakeups == Some(0),
    );
}
