//! Test harness: real broker and devshim processes, fake boards (pty pairs)
//! behind a by-id directory, and tools that open the guest links.
//!
//! Everything runs in a temporary directory per test, so tests run in
//! parallel and leave nothing behind.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod control;

pub use devbroker::fakeboard::FakeBoard;
pub mod container;
pub mod esptool;
pub mod procstat;
pub mod static_devshim;
pub mod stepped;
pub mod umockdev;

/// A binary of this workspace, next to the running test's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run the suite with `cargo test --workspace`",
        p.display()
    );
    p
}

/// The static devshim that ships into containers (built on first use).
pub fn devshim() -> PathBuf {
    static_devshim::path()
}

/// `devshim run --state-dir STATE --`, for the command to follow: a job
/// whose line calls on devshim's ptys reach the port.
pub fn devshim_run(state: &Path) -> Command {
    let mut c = Command::new(devshim());
    c.arg("run").arg("--state-dir").arg(state).arg("--");
    c
}

/// True under CI (`CI=true`), where every test must run.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says why a test can't run here and lets it return: prints
/// `skipped: REASON` — or, under CI, fails, since CI installs and starts
/// everything the suite needs (`.ci/run`) and a skip there would hide a test
/// that never ran.
pub fn skip(reason: &str) {
    assert!(
        !under_ci(),
        "{reason}\nCI=true: this test must run here, not skip (see .ci/run for what the suite needs)"
    );
    println!("skipped: {reason}");
}

/// Polls `cond` every 5 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Like [`wait_for`] but returns how long it took.
pub fn time_until(limit: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    wait_for(limit, what, cond);
    t0.elapsed()
}

/// Children that die with the test process, even when it is killed.
pub trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            self.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        }
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{} did not stop on SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a host by-id directory, a run directory, a config.
pub struct World {
    pub tmp: tempfile::TempDir,
    pub by_id: PathBuf,
    pub run: PathBuf,
    pub config: PathBuf,
}

impl World {
    pub fn new(config: &str) -> World {
        let mut tmp = tempfile::Builder::new()
            .prefix("devbroker-test-")
            .tempdir()
            .unwrap();
        // DEVBROKER_KEEP_TEST_DIRS=1 keeps each world (logs included) to read after a failure.
        if std::env::var_os("DEVBROKER_KEEP_TEST_DIRS").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("keeping {}", tmp.path().display());
        }
        let by_id = tmp.path().join("host-dev/serial/by-id");
        let run = tmp.path().join("run");
        let cfg = tmp.path().join("devbroker.toml");
        fs::write(&cfg, config).unwrap();
        World {
            tmp,
            by_id,
            run,
            config: cfg,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Starts the broker on the by-id source (the world's by-id directory)
    /// and waits until its admin socket answers.
    pub fn broker(&self) -> Proc {
        let by_id = self.by_id.to_str().expect("UTF-8 temp path");
        self.broker_with(&["--by-id-dir", by_id])
    }

    /// Starts the broker with the udev source (`--source udev`) and waits
    /// until its admin socket answers. Under umockdev the broker inherits
    /// the preload and the testbed, and so follows the emulated devices.
    pub fn broker_udev(&self) -> Proc {
        self.broker_with(&["--source", "udev"])
    }

    /// Starts `devbroker run` on the world's config and run directory with
    /// `source` flags, logging to `broker.log`.
    fn broker_with(&self, source: &[&str]) -> Proc {
        self.broker_env(source, &[])
    }

    /// [`World::broker`] with more environment (an NSS module preloaded,
    /// say).
    pub fn broker_env(&self, source: &[&str], env: &[(&str, &str)]) -> Proc {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("broker.log"))
            .unwrap();
        let child = Command::new(bin("devbroker"))
            .args(["run", "--config"])
            .arg(&self.config)
            .args(source)
            .arg("--run-dir")
            .arg(&self.run)
            .env("DEVBROKER_LOG", "debug")
            .envs(env.iter().copied())
            .die_with_parent()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Proc {
            child,
            name: "devbroker".into(),
        };
        let sock = self.run.join("broker.sock");
        wait_for(Duration::from_secs(10), "the broker's admin socket", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        p
    }

    /// Starts devshim for `machine`, publishing under `guest/<machine>/dev`.
    pub fn shim(&self, machine: &str) -> Proc {
        self.shim_with(machine, &[])
    }

    /// [`World::shim`] with extra `devshim serve` flags.
    pub fn shim_with(&self, machine: &str, extra: &[&str]) -> Proc {
        self.shim_for(machine, &nix::unistd::getuid().to_string(), extra)
    }

    /// [`World::shim_with`] serving job user `user` (a name or uid in the
    /// host's `/etc/passwd`) instead of the test's own.
    pub fn shim_for(&self, machine: &str, user: &str, extra: &[&str]) -> Proc {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("shim-{machine}.log")))
            .unwrap();
        let child = Command::new(devshim())
            .args(["serve", "--dir"])
            .arg(self.run.join("machines").join(machine))
            .arg("--link-root")
            .arg(self.guest(machine))
            .args(["--user", user])
            .arg("--state-dir")
            .arg(self.state_dir(machine))
            .args(extra)
            .env("DEVSHIM_LOG", "debug")
            .die_with_parent()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc {
            child,
            name: format!("devshim {machine}"),
        }
    }

    /// A machine's devshim state directory (its RFC 2217 endpoints).
    pub fn state_dir(&self, machine: &str) -> PathBuf {
        self.path(&format!("guest/{machine}/run/devshim"))
    }

    /// A machine's guest `/dev`.
    pub fn guest(&self, machine: &str) -> PathBuf {
        self.path(&format!("guest/{machine}/dev"))
    }

    /// The guest by-id link of `name` in `machine`.
    pub fn guest_link(&self, machine: &str, name: &str) -> PathBuf {
        self.guest(machine).join("serial/by-id").join(name)
    }

    pub fn plug(&self, name: &str) -> FakeBoard {
        FakeBoard::plug(&self.by_id, name).unwrap()
    }

    /// `devbroker status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(bin("devbroker"))
            .args(["status", "--json", "--run-dir"])
            .arg(&self.run)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The first tty of `board` in [`World::status`].
    pub fn first_tty(&self, board: &str) -> serde_json::Value {
        let st = self.status();
        let b = st["boards"]
            .as_array()
            .and_then(|bs| bs.iter().find(|b| b["name"] == board))
            .unwrap_or_else(|| panic!("no board {board} in the status: {st}"));
        b["ttys"][0].clone()
    }

    /// Who holds the first tty of `board` (`machine ci1`, ...), if anyone.
    pub fn holder(&self, board: &str) -> Option<String> {
        self.first_tty(board)["holder"]["who"]
            .as_str()
            .map(str::to_owned)
    }

    /// Whether the broker has an adapter for the first tty of `board` now
    /// (not while it is away within a re-enumeration grace).
    pub fn present(&self, board: &str) -> bool {
        self.first_tty(board)["present"] == true
    }

    /// The ttys `devshim list --json` shows for `machine`, with their RFC
    /// 2217 ports; `None` while devshim has written no state file.
    pub fn endpoints(&self, machine: &str) -> Option<Vec<serde_json::Value>> {
        let state = self.state_dir(machine);
        if !state.join("ports.json").exists() {
            return None;
        }
        let out = Command::new(devshim())
            .args(["list", "--json", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "devshim list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "devshim list --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(v["version"], 1, "{v}");
        let ttys = v["ttys"].as_array().cloned();
        Some(ttys.unwrap_or_else(|| panic!("devshim list --json: no ttys: {v}")))
    }

    /// Waits for devshim's RFC 2217 endpoint of the tty published at `link`
    /// in `machine`; returns its port.
    pub fn endpoint_port(&self, machine: &str, link: &Path) -> u16 {
        let mut port = 0;
        wait_for(
            Duration::from_secs(5),
            &format!("{} in devshim list", link.display()),
            || {
                port = self
                    .endpoints(machine)
                    .unwrap_or_default()
                    .iter()
                    .find(|e| e["link"] == link.display().to_string())
                    .and_then(|e| e["port"].as_u64())
                    .unwrap_or(0) as u16;
                port != 0
            },
        );
        port
    }

    /// The logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for e in fs::read_dir(self.tmp.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                s += &format!(
                    "==== {}\n{}",
                    e.path().display(),
                    fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        s
    }
}

/// True when `p` exists as a link (dangling or not).
pub fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

/// A tool with a tty open, like picocom: raw, blocking.
pub struct Tool {
    pub fd: OwnedFd,
}

impl Tool {
    /// Opens `path` read-write, raw, and returns the tool.
    pub fn open(path: &Path) -> io::Result<Tool> {
        let fd = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: fresh descriptor from open.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut t = wire::termios::get(&fd)?;
        wire::termios::make_raw(&mut t);
        wire::termios::set(&fd, &t, wire::termios::When::Now)?;
        Ok(Tool { fd })
    }

    pub fn file(&self) -> fs::File {
        fs::File::from(self.fd.try_clone().unwrap())
    }

    /// Reads with a timeout; `Ok(None)` on timeout.
    pub fn read_timeout(&self, buf: &mut [u8], limit: Duration) -> io::Result<Option<usize>> {
        read_timeout(self.fd.as_raw_fd(), buf, limit)
    }

    pub fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.file().write_all(data)
    }

    /// Sets the tool's baud rate, after what it wrote has drained (as
    /// `tcsetattr(TCSADRAIN)`).
    pub fn set_baud(&self, baud: u32) {
        let mut t = wire::termios::get(&self.fd).unwrap();
        wire::termios::set_baud(&mut t, baud);
        wire::termios::set(&self.fd, &t, wire::termios::When::AfterDrain).unwrap();
    }
}

/// poll + read on any fd, `Ok(None)` on timeout.
pub fn read_timeout(fd: i32, buf: &mut [u8], limit: Duration) -> io::Result<Option<usize>> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    // SAFETY: reading into a valid buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(n as usize))
}

/// Reads exactly `n` bytes from `fd` (blocking) within `limit`.
pub fn read_exact_timeout(fd: i32, n: usize, limit: Duration) -> io::Result<Vec<u8>> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 65536];
    while out.len() < n {
        let left = limit.checked_sub(t0.elapsed()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("got {} of {n} bytes", out.len()),
            )
        })?;
        let want = (n - out.len()).min(buf.len());
        match read_timeout(fd, &mut buf[..want], left)? {
            Some(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {n} bytes", out.len()),
                ))
            }
            Some(k) => out.extend_from_slice(&buf[..k]),
            None => {}
        }
    }
    Ok(out)
}

/// Writes all of `data` to a raw fd.
pub fn write_all_fd(fd: i32, data: &[u8]) -> io::Result<()> {
    // SAFETY: borrowing the fd for the call; ManuallyDrop keeps it open.
    let mut f = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(fd) });
    f.write_all(data)
}

/// Connects to a unix socket as another user (uid, gid, supplementary
/// groups) and returns what the broker sent first, up to 512 bytes. With
/// `lease`, the same process first takes that board's lease on the host's
/// control socket next to it (`RUN/host/control.sock`) and keeps it while
/// connecting; if the lease is refused, the refusal is returned.
pub fn first_bytes_as(
    socket: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    lease: Option<&str>,
) -> Vec<u8> {
    use std::os::unix::process::CommandExt;
    let groups = groups.to_vec();
    let script = r#"
import json, socket, sys
path, board = sys.argv[1], sys.argv[2]
if board:
    c = socket.socket(socket.AF_UNIX); c.settimeout(5)
    c.connect(path.rsplit('/', 1)[0] + '/control.sock')
    f = c.makefile('rwb')
    for req in ({"request": "hello", "version": 1, "client": "test"}, {"request": "lease", "board": board}):
        f.write(json.dumps(req).encode() + b'\n'); f.flush()
        reply = json.loads(f.readline())
    if reply["reply"] != "granted":
        sys.stdout.write(json.dumps(reply)); sys.exit(0)
    if path.endswith('/control.sock'):
        sys.stdout.write(json.dumps(reply)); sys.exit(0)
s = socket.socket(socket.AF_UNIX); s.settimeout(5)
s.connect(path)
sys.stdout.buffer.write(s.recv(512))
"#;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script])
        .arg(socket)
        .arg(lease.unwrap_or(""));
    let same = uid == nix::unistd::geteuid().as_raw();
    if !same {
        // SAFETY: setgroups/setgid/setuid between fork and exec, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let gs: Vec<libc::gid_t> = groups.clone();
                if libc::setgroups(gs.len(), gs.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Random bytes from a seeded generator (reproducible failures).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

impl Tool {
    /// Starts a blocking `read` in a thread, as a tool waiting for output
    /// does, and returns once the thread is blocked in it (or the read has
    /// already returned); the handle yields its result.
    pub fn blocked_read(&self) -> std::thread::JoinHandle<io::Result<usize>> {
        let fd = self.fd.try_clone().unwrap();
        let raw = fd.as_raw_fd();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            // SAFETY: no arguments.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let mut buf = [0u8; 256];
            // SAFETY: reading into a valid buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let tid = rx.recv().unwrap();
        // While a thread sleeps in a system call, the kernel shows its number
        // and arguments: `read` on this descriptor.
        let syscall = format!("/proc/self/task/{tid}/syscall");
        let blocked = format!("{} {raw:#x} ", libc::SYS_read);
        wait_for(Duration::from_secs(5), "the tool's read to block", || {
            h.is_finished() || fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with(&blocked))
        });
        h
    }

    /// Runs `cause` while a read of the tool is blocked, and expects that
    /// read to fail with `EIO` within `limit`; returns how long after
    /// `cause` began it failed.
    pub fn eio_after(&self, limit: Duration, what: &str, cause: impl FnOnce()) -> Duration {
        let reader = self.blocked_read();
        let t0 = Instant::now();
        cause();
        let err = join_within(reader, limit)
            .expect_err(&format!("the tool's read must fail with EIO: {what}"));
        let after = t0.elapsed();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{what}: {err}");
        after
    }
}

/// Waits for a thread's result up to `limit`.
pub fn join_within<T: Send + 'static>(h: std::thread::JoinHandle<T>, limit: Duration) -> T {
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(t0.elapsed() < limit, "still blocked after {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.join().unwrap()
}

/// Every path under `root` with its type, mode, owner and content (or link
/// target): two snapshots are equal when nothing under `root` changed.
pub fn snapshot(root: &Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let what = if m.file_type().is_symlink() {
            format!("link {}", fs::read_link(&p).unwrap().display())
        } else if m.is_dir() {
            for e in fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
            "dir".to_string()
        } else if m.is_file() {
            let bytes = fs::read(&p).unwrap();
            format!(
                "file {} bytes {:x}",
                bytes.len(),
                bytes
                    .iter()
                    .fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64)
                        .wrapping_mul(0x100000001b3))
            )
        } else {
            "other".to_string()
        };
        out.insert(
            rel,
            format!(
                "{what} mode {:o} owner {}:{}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ),
        );
    }
    out
}

/// Runs `devbroker ARGS`; returns (success, stdout + stderr).
pub fn devbroker_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("devbroker")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// [`devbroker_cli`] that must end within 30 s: a command opening a FIFO
/// planted in its way would block forever.
pub fn cli_within(args: &[&str]) -> (bool, String) {
    use std::io::{Read, Seek};
    let mut out = tempfile::tempfile().unwrap();
    let mut child = Command::new(bin("devbroker"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out.try_clone().unwrap())
        .die_with_parent()
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("devbroker {args:?} did not finish within 30 s (blocked on a FIFO?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    out.rewind().unwrap();
    out.read_to_string(&mut text).unwrap();
    (status.success(), text)
}
