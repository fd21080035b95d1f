//! line-bench: what line control through `devshim run` costs a tool, and
//! when each change reaches the port.
//!
//! Under umockdev (it re-executes itself with the preload), an emulated
//! FT232R whose ioctl handler stamps every DTR/RTS change with
//! `CLOCK_MONOTONIC`, the real broker on it through udev, and devshim. A tool
//! (this binary in `tool` mode, under `devshim run`, on devshim's pty)
//! toggles DTR with `TIOCMBIS`/`TIOCMBIC`, stamping each call's start and
//! return. It prints:
//!
//! - when each edge was at the adapter relative to the return of the call
//!   that made it (negative: before the call returned, as a synchronous
//!   call must; the goal is p99 ≤ 1 ms late);
//! - each call's duration through `devshim run`, the same call made directly
//!   on the emulated adapter, and the difference (goal: p50 ≤ 200 µs);
//! - an unrelated syscall-heavy loop with and without `devshim run` (goal:
//!   within noise), and the same for a loop of `isatty` (`TCGETS`, which the
//!   supervisor does see) on a regular file.
//!
//! Run `cargo build --release --workspace` first. `BENCH_EDGES=N` (500).

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use devbroker_tests::procstat::{self, percentile};
use devbroker_tests::umockdev::{self, testdata};
use devbroker_tests::*;

const BY_ID: &str = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";
const NODE: &str = "/dev/ttyUSB0";
const CONFIG: &str = "[[board]]\nname = \"bench\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = { usb = \"0403:6001\", serial = \"A1B2C3\" }\n";

fn now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// `tool PATH N`: N DTR toggles, 2 ms apart; prints "start return" (ns) per call.
fn tool(path: &str, n: usize) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect(path);
    let fd = f.as_raw_fd();
    let bit: libc::c_int = libc::TIOCM_DTR;
    let mut out = String::new();
    for i in 0..n {
        let req = if i % 2 == 0 {
            libc::TIOCMBIC
        } else {
            libc::TIOCMBIS
        };
        let t0 = now_ns();
        // SAFETY: TIOCMBIS/TIOCMBIC read one int.
        let r = unsafe { libc::ioctl(fd, req, &bit) };
        let t1 = now_ns();
        assert_eq!(r, 0, "ioctl: {}", std::io::Error::last_os_error());
        out += &format!("{t0} {t1}\n");
        std::thread::sleep(Duration::from_millis(2));
    }
    print!("{out}");
}

/// Installs a seccomp filter that allows everything: what every process of
/// a systemd-nspawn container (or a unit with `SystemCallFilter=`) already
/// runs under, so its system calls already take the kernel's seccomp path.
fn allow_all_filter() {
    let prog = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl and seccomp with valid arguments.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog),
            0
        );
    }
}

/// `spin KIND N [filtered]`: N unrelated system calls; prints the ns they took.
fn spin(kind: &str, n: usize, filtered: bool) {
    if filtered {
        allow_all_filter();
    }
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    let fd = f.as_raw_fd();
    let t0 = now_ns();
    for _ in 0..n {
        match kind {
            // SAFETY: plain system calls on our own descriptor.
            "getppid" => unsafe {
                libc::getppid();
            },
            "pread" => unsafe {
                let mut b = [0u8; 64];
                libc::pread(fd, b.as_mut_ptr().cast(), 64, 0);
            },
            "isatty" => unsafe {
                libc::isatty(fd);
            },
            _ => panic!("unknown spin {kind}"),
        }
    }
    println!("{}", now_ns() - t0);
}

/// Runs this binary in tool mode (under `devshim run` when `state` is
/// given); the (start, return) of each call.
fn run_tool(
    path: &std::path::Path,
    n: usize,
    state: Option<&std::path::Path>,
    preload: bool,
) -> Vec<(i64, i64)> {
    let me = std::env::current_exe().unwrap();
    let mut c = match state {
        Some(s) => {
            let mut c = devshim_run(s);
            c.arg(&me);
            c
        }
        None => Command::new(&me),
    };
    c.arg("tool").arg(path).arg(n.to_string());
    if let Ok(v) = std::env::var("BENCH_TOOL_LOG") {
        c.env("DEVSHIM_LOG", v);
    }
    if !preload {
        c.env_remove("LD_PRELOAD");
    }
    let out = c.stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "tool failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace().map(|x| x.parse::<i64>().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        })
        .collect()
}

/// ns per call of a spin loop, median of 5 alternating runs: bare, under an
/// allow-all seccomp filter (as in a container), and under `devshim run`.
fn spins(kind: &str, n: usize, state: &std::path::Path) -> [f64; 3] {
    let me = std::env::current_exe().unwrap();
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..5 {
        for (i, r) in runs.iter_mut().enumerate() {
            let mut c = if i == 2 {
                let mut c = devshim_run(state);
                c.arg(&me);
                c
            } else {
                Command::new(&me)
            };
            c.args(["spin", kind, &n.to_string()]);
            if i == 1 {
                c.arg("filtered");
            }
            let out = c.env_remove("LD_PRELOAD").output().unwrap();
            let ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            r.push(ns / n as f64);
        }
    }
    runs.map(|mut r| procstat::median(&mut r))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("tool") => return tool(&args[2], args[3].parse().unwrap()),
        Some("spin") => return spin(&args[2], args[3].parse().unwrap(), args.get(4).is_some()),
        _ => {}
    }
    if std::env::var(umockdev::CHILD_ENV).is_err() {
        let preload =
            umockdev::preload_path().unwrap_or_else(|e| panic!("line-bench needs umockdev: {e}"));
        let st = Command::new(std::env::current_exe().unwrap())
            .env(umockdev::CHILD_ENV, "line-bench")
            .env("LD_PRELOAD", preload)
            .status()
            .unwrap();
        std::process::exit(st.code().unwrap_or(1));
    }
    let n: usize = std::env::var("BENCH_EDGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let tb = umockdev::enter("line-bench").expect("the testbed");
    tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
        .unwrap();
    let by_id = format!("/dev/serial/by-id/{BY_ID}");
    let line = tb.emulate_serial(NODE, &[&by_id]);
    let (edges_r, edges_w) = nix::unistd::pipe().unwrap();
    line.tell_edges(edges_w);
    // Every DTR/RTS change at the adapter, as the handler stamped it.
    let edges = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, bool)>::new()));
    let sink = edges.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(std::fs::File::from(edges_r)).lines() {
            let Ok(l) = l else { return };
            let w: Vec<i64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            sink.lock().unwrap().push((w[0], w[1] != 0));
        }
    });
    let w = World::new(CONFIG);
    let _broker = w.broker_udev();
    let _shim = w.shim("ci1");
    let link = w.guest_link("ci1", BY_ID);
    wait_for(Duration::from_secs(5), "the guest link", || exists(&link));
    w.endpoint_port("ci1", &link);
    let state = w.state_dir("ci1");
    // Keep a session open, so each run's open raises nothing.
    let _holder = Tool::open(&link).unwrap();
    wait_for(Duration::from_secs(5), "the session", || {
        !line.opens().is_empty()
    });
    std::thread::sleep(Duration::from_millis(100));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("line-bench: {n} DTR changes by TIOCMBIS/TIOCMBIC, 2 ms apart; {cores} cores\n");

    let t_edges0 = now_ns();
    let calls = run_tool(&link, n, Some(&state), false);
    std::thread::sleep(Duration::from_millis(200));
    // The direct baseline: the same calls on the emulated adapter itself.
    let direct = run_tool(std::path::Path::new(NODE), n, None, true);
    let seen = edges.lock().unwrap().clone();
    let via: Vec<(i64, bool)> = seen
        .iter()
        .copied()
        .filter(|(t, _)| *t >= t_edges0)
        .take(n)
        .collect();
    let mut late: Vec<f64> = via
        .iter()
        .zip(&calls)
        .map(|((edge, _), (_, ret))| (edge - ret) as f64 / 1e3)
        .collect();
    let mut dur: Vec<f64> = calls.iter().map(|(a, b)| (b - a) as f64 / 1e3).collect();
    let mut ddur: Vec<f64> = direct.iter().map(|(a, b)| (b - a) as f64 / 1e3).collect();
    let (d50, d99) = (percentile(&mut dur, 50), percentile(&mut dur, 99));
    let (b50, b99) = (percentile(&mut ddur, 50), percentile(&mut ddur, 99));
    println!("edge at the adapter after the call returned ({} of {n} matched; negative: before it returned)", late.len());
    let (l50, l99, lmax) = if late.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN)
    } else {
        (
            percentile(&mut late, 50),
            percentile(&mut late, 99),
            percentile(&mut late, 100),
        )
    };
    println!("  p50 {l50:9.1} us   p99 {l99:9.1} us   max {lmax:9.1} us");
    println!("call duration as the tool sees it");
    println!("  devshim pty under devshim run   p50 {d50:8.1} us   p99 {d99:8.1} us");
    println!("  the emulated adapter, directly   p50 {b50:8.1} us   p99 {b99:8.1} us");
    println!(
        "  overhead                         p50 {:8.1} us   p99 {:8.1} us",
        d50 - b50,
        d99 - b99
    );
    println!("unrelated system calls, ns per call (median of 5 runs each)");
    println!(
        "  {:18} {:>8} {:>14} {:>16} {:>14}",
        "", "bare", "allow-all filter", "under devshim run", "run / filter"
    );
    let mut ratios = Vec::new();
    for (kind, count) in [
        ("getppid", 5_000_000),
        ("pread", 2_000_000),
        ("isatty", 200_000),
    ] {
        let [bare, filtered, sup] = spins(kind, count, &state);
        println!(
            "  {kind:8} x{count:<8} {bare:8.1} {filtered:14.1} {sup:16.1} {:14.3}",
            sup / filtered
        );
        ratios.push((kind, sup / filtered, sup / bare));
    }
    println!("\nagainst the goals:");
    let ok = |b: bool| if b { "ok" } else { "MISSED" };
    println!(
        "  edge p99 late (us)              {:8.1}  [<= 1000]  {}",
        l99.max(0.0),
        ok(l99 <= 1000.0)
    );
    println!(
        "  per-call overhead p50 (us)      {:8.1}  [<= 200]  {}",
        d50 - b50,
        ok(d50 - b50 <= 200.0)
    );
    for (kind, in_container, on_host) in &ratios {
        if *kind != "isatty" {
            println!(
                "  {kind} run / allow-all filter  {in_container:8.3}  [within noise, <= 1.05]  {}   (run / bare {on_host:.3})",
                ok(*in_container <= 1.05)
            );
        }
    }
}
