//! The seccomp supervisor of `devshim run` (and `devshim lease`,
//! `sai-device`): makes an unchanged tool's DTR/RTS, break and framing calls
//! on a devshim pty act on the real port.
//!
//! The command's process installs, just before `exec`, a seccomp filter
//! ([`crate::bpf`]) that sends `ioctl`s with line-control requests to a
//! listener, and passes the listener to devshim over a socketpair. devshim
//! then answers each such call while the tool waits in it:
//!
//! - on anything but one of `devshim serve`'s ptys, the kernel goes on with
//!   it (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`): the same result as without us;
//! - on a devshim pty (the tool's descriptor, fetched with `pidfd_getfd` —
//!   a duplicate of the same open file, so no new open disturbs serve's open
//!   counting), the request goes to serve's line socket
//!   ([`crate::linesock`]) with that descriptor as proof, and the tool's
//!   call returns when the broker has applied it to the port: the tool's
//!   own sleeps between edges keep their meaning.
//!
//! `TCSETS*` are applied to the pty here (so the pty, its baud and the
//! packet-mode path see them as before) and their data size and parity,
//! which the pty drops, go to serve; `TCGETS*` answer the pty's settings
//! with those put back, as a UART would report them.
//!
//! Where it can't work — kernels before 5.6 (user notification 5.0,
//! `FLAG_CONTINUE` 5.5, `pidfd_getfd` 5.6), seccomp or pidfds denied, a
//! command already under a supervisor (`EBUSY`: the outer one serves it) —
//! the command runs unsupervised, as before (`TIOCM*` → `ENOTTY`), after
//! one line saying why (none when nested). Under the filter the command
//! runs with `no_new_privs`: setuid binaries don't gain privileges.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::debug;

use crate::bpf;
use crate::linecall::{self, Call, LineReply, LineRequest, Target};
use crate::{linesock, procfs};

/// `DEVSHIM_SUPERVISE=off` runs commands unsupervised.
pub const ENV_SWITCH: &str = "DEVSHIM_SUPERVISE";

/// Whether `DEVSHIM_SUPERVISE` turns supervision off.
fn switched_off() -> bool {
    std::env::var(ENV_SWITCH).is_ok_and(|v| v == "off" || v == "0")
}

/// Why supervision can't be had here, if it can't; `None` when it can.
pub fn unavailable() -> Option<String> {
    if switched_off() {
        return Some(format!("{ENV_SWITCH}=off"));
    }
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return Some("this architecture is not supported".into());
    }
    let mut sizes = libc::seccomp_notif_sizes {
        seccomp_notif: 0,
        seccomp_notif_resp: 0,
        seccomp_data: 0,
    };
    // SAFETY: SECCOMP_GET_NOTIF_SIZES writes one seccomp_notif_sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Some(match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EINVAL) => {
                format!(
                    "this kernel has no seccomp user notification (Linux 5.0 or later needed): {e}"
                )
            }
            _ => format!("seccomp is denied here: {e}"),
        });
    }
    // SECCOMP_USER_NOTIF_FLAG_CONTINUE came in 5.5: an older kernel would
    // refuse our "go on" answers and leave the tool blocked.
    if let Some((major, minor)) = kernel_version() {
        if (major, minor) < (5, 5) {
            return Some(format!(
                "Linux {major}.{minor} can't let a call go on from a supervisor (5.5 or later needed)"
            ));
        }
    }
    None
}

/// The running kernel's `(major, minor)`.
fn kernel_version() -> Option<(u32, u32)> {
    let u = rustix::system::uname();
    let r = u.release().to_str().ok()?;
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(pidfd, targetfd, flags) returns a new descriptor
    // (close-on-exec) or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The child's end of the handshake: what it sends before `exec`.
struct ChildEnd {
    sock: RawFd,
    prog: Vec<libc::sock_filter>,
}

/// A command made ready for supervision: call [`Prepared::started`] once it
/// was spawned.
pub struct Prepared {
    parent: OwnedFd,
    /// The child's end: open here until the spawn (it is close-on-exec, so
    /// the command never sees it).
    child: OwnedFd,
    state_dir: PathBuf,
}

/// Arranges for `cmd` to install the filter and hand over its listener just
/// before `exec`. `None` (and a warning on stderr) where supervision can't
/// be had: `cmd` is left as it was.
pub fn prepare(cmd: &mut tokio::process::Command, state_dir: &Path) -> Option<Prepared> {
    if let Some(why) = unavailable() {
        if !switched_off() {
            eprintln!(
                "devshim: running without line control ({why}): DTR/RTS, break and parity on devshim ptys fail with ENOTTY; use the RFC 2217 endpoint or `devshim ctl` instead"
            );
        }
        return None;
    }
    let (parent, child) = match nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("devshim: running without line control (socketpair: {e})");
            return None;
        }
    };
    let end = ChildEnd {
        sock: child.as_raw_fd(),
        prog: bpf::program(linecall::REQUESTS),
    };
    // SAFETY: `install` makes only async-signal-safe system calls and
    // allocates nothing (the program was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            install(&end);
            Ok(())
        });
    }
    Some(Prepared {
        parent,
        child,
        state_dir: state_dir.to_path_buf(),
    })
}

/// In the child, between fork and exec: no_new_privs, the filter with a
/// listener, and the listener (or the errno of the failure) to the parent.
/// A failure is not fatal: the command then runs unsupervised.
fn install(end: &ChildEnd) {
    let fprog = libc::sock_fprog {
        len: end.prog.len() as u16,
        filter: end.prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl and seccomp with valid arguments; the program outlives the call.
    let (listener, errno) = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            (-1, *libc::__errno_location())
        } else {
            let r = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &fprog as *const libc::sock_fprog,
            );
            if r < 0 {
                (-1, *libc::__errno_location())
            } else {
                (r as RawFd, 0)
            }
        }
    };
    let payload = errno.to_ne_bytes();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    #[repr(C, align(8))]
    struct Cmsg([u8; 64]);
    let mut space = Cmsg([0; 64]);
    // SAFETY: a msghdr on the stack pointing at the buffers above; the
    // CMSG_* helpers only compute offsets within `space`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if listener >= 0 {
            msg.msg_control = space.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::copy_nonoverlapping(listener.to_ne_bytes().as_ptr(), libc::CMSG_DATA(c), 4);
        }
        libc::sendmsg(end.sock, &msg, libc::MSG_NOSIGNAL);
        if listener >= 0 {
            libc::close(listener);
        }
    }
}

impl Prepared {
    /// After the spawn: takes the listener from the child and starts
    /// serving it on a thread of its own. `None` when the child could not
    /// install the filter (a warning says why, unless it was nested).
    pub fn started(self) -> Option<std::thread::JoinHandle<()>> {
        let Prepared {
            parent,
            child,
            state_dir,
        } = self;
        drop(child);
        let mut buf = [0u8; 4];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            parent.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        );
        let mut listener = None;
        let mut errno = None;
        if let Ok(msg) = msg {
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                        for f in fds {
                            // SAFETY: just received: ours to own.
                            let f = unsafe { OwnedFd::from_raw_fd(f) };
                            listener.get_or_insert(f);
                        }
                    }
                }
            }
            if msg.bytes == 4 {
                errno = Some(i32::from_ne_bytes(buf));
            }
        }
        match (listener, errno) {
            (Some(l), _) => {
                drop(parent);
                Some(std::thread::spawn(move || {
                    Supervisor::new(l, state_dir).run()
                }))
            }
            (None, Some(libc::EBUSY)) => {
                debug!("already supervised: the outer supervisor serves this command");
                None
            }
            (None, e) => {
                let why = e
                    .map(|e| io::Error::from_raw_os_error(e).to_string())
                    .unwrap_or_else(|| "no answer from the child".into());
                eprintln!(
                    "devshim: running without line control (installing the seccomp filter: {why})"
                );
                None
            }
        }
    }
}

/// What to tell the kernel about one notified call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Let the kernel run it as it would have.
    Continue,
    /// Return this value.
    Value(i64),
    /// Fail with this errno.
    Errno(i32),
}

/// Where `devshim serve` publishes its ptys: `ports.json`, re-read when it
/// changes.
struct Ports {
    dir: PathBuf,
    stamp: Option<(SystemTime, u64, u64)>,
    /// Each tty's guest path and its devshim's line socket.
    entries: Vec<(PathBuf, PathBuf)>,
}

impl Ports {
    fn refresh(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let file = crate::ports::path(&self.dir);
        let stamp = std::fs::metadata(&file).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.ino(),
                m.size(),
            )
        });
        if stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        self.entries = crate::ports::read(&self.dir)
            .map(|p| {
                p.ttys
                    .into_iter()
                    .filter_map(|e| Some((e.link, e.line?)))
                    .collect()
            })
            .unwrap_or_default();
    }

    /// The line socket of the devshim whose pty `id` is.
    fn line_socket(&mut self, id: linesock::PtyId) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        self.refresh();
        self.entries.iter().find_map(|(link, line)| {
            let m = std::fs::metadata(link).ok()?;
            ((m.dev(), m.ino()) == id).then(|| line.clone())
        })
    }
}

struct Supervisor {
    listener: OwnedFd,
    ports: Ports,
    clients: HashMap<PathBuf, linesock::Client>,
    /// Line sockets already warned about.
    warned: std::collections::HashSet<PathBuf>,
    /// Whether `pidfd_getfd` works here (until it is refused once).
    pidfd_getfd: bool,
}

/// pty slave majors (`UNIX98_PTY_SLAVE_MAJOR` and the ones after it).
fn is_pty_slave(rdev: u64) -> bool {
    (136..=143).contains(&libc::major(rdev))
}

impl Supervisor {
    fn new(listener: OwnedFd, state_dir: PathBuf) -> Supervisor {
        Supervisor {
            listener,
            ports: Ports {
                dir: state_dir,
                stamp: None,
                entries: Vec::new(),
            },
            clients: HashMap::new(),
            warned: Default::default(),
            pidfd_getfd: true,
        }
    }

    /// Serves notifications until the listener fails (every process under
    /// the filter is gone, or this process exits).
    fn run(mut self) {
        // Linux 6.6+: the tool's wake-up hands its CPU to this thread
        // directly (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP), which saves a
        // cross-CPU wake-up on each call. Older kernels say EINVAL: fine.
        let sync_wake_up: u64 = 1;
        // SAFETY: NOTIF_SET_FLAGS takes the flags by value.
        unsafe {
            libc::ioctl(
                self.listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                sync_wake_up,
            )
        };
        loop {
            // SAFETY: a zeroed seccomp_notif is what NOTIF_RECV wants (it
            // refuses a dirty one); it writes one back.
            let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
            let r = unsafe {
                libc::ioctl(
                    self.listener.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_RECV,
                    &mut n as *mut libc::seccomp_notif,
                )
            };
            if r < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    // The caller was killed before we took it; a signal here.
                    Some(libc::ENOENT | libc::EINTR) => continue,
                    _ => return,
                }
            }
            let answer = self.handle(&n);
            let mut resp = libc::seccomp_notif_resp {
                id: n.id,
                val: 0,
                error: 0,
                flags: 0,
            };
            match answer {
                Answer::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
                Answer::Value(v) => resp.val = v,
                Answer::Errno(e) => resp.error = -e,
            }
            // SAFETY: NOTIF_SEND reads one seccomp_notif_resp. ENOENT: the
            // caller is gone or was interrupted; nothing to do.
            unsafe {
                libc::ioctl(
                    self.listener.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_SEND,
                    &mut resp as *mut libc::seccomp_notif_resp,
                )
            };
        }
    }

    /// Whether the call `id` still waits (its caller was not killed or
    /// interrupted, so what we read from it is its).
    fn still_waiting(&self, id: u64) -> bool {
        let mut id = id;
        // SAFETY: NOTIF_ID_VALID reads one u64.
        unsafe {
            libc::ioctl(
                self.listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &mut id as *mut u64,
            ) == 0
        }
    }

    /// The tool's descriptor `fd`, for the pty `id`, as a duplicate of its
    /// open file (`pidfd_getfd`, Linux 5.6), which leaves serve's open
    /// counting alone. Where that is denied (systemd-nspawn's own seccomp
    /// filter refuses `pidfd_getfd` with `EPERM`) or missing, the process
    /// and descriptor number, for serve to check through `/proc` — never a
    /// new open of the pty, which serve would count as a tool coming and
    /// going.
    fn target_fd(&mut self, tid: u32, fd: RawFd, id: linesock::PtyId) -> Result<OwnedFd, Target> {
        let target = Target { pid: tid, fd };
        if !self.pidfd_getfd {
            return Err(target);
        }
        match procfs::pidfd_of_thread(tid).and_then(|(p, _)| pidfd_getfd(p.as_fd(), fd)) {
            // The descriptor may have been replaced meanwhile.
            Ok(d) if linesock::id_of(d.as_fd()).ok() == Some(id) => Ok(d),
            Ok(_) => Err(target),
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
                    debug!("pidfd_getfd: {e}; naming the process to serve instead");
                    self.pidfd_getfd = false;
                }
                Err(target)
            }
        }
    }

    fn handle(&mut self, n: &libc::seccomp_notif) -> Answer {
        let req = n.data.args[1] as u32;
        let Some(call) = linecall::classify(req, n.data.args[2]) else {
            return Answer::Continue;
        };
        let fd = n.data.args[0] as RawFd;
        // What the descriptor is open on, without opening anything.
        let Ok(st) = nix::sys::stat::stat(format!("/proc/{}/fd/{fd}", n.pid).as_str()) else {
            return Answer::Continue;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFCHR || !is_pty_slave(st.st_rdev) {
            return Answer::Continue;
        }
        let id = (st.st_dev, st.st_ino);
        let Some(sock) = self.ports.line_socket(id) else {
            return Answer::Continue;
        };
        let pty = self.target_fd(n.pid, fd, id);
        let t0 = std::time::Instant::now();
        let answer = self.carry(
            call,
            n.pid,
            n.id,
            pty.as_ref().map(|d| d.as_fd()).map_err(|t| *t),
            &sock,
        );
        debug!(
            "ioctl {req:#x} on a devshim pty: {answer:?} in {:?}",
            t0.elapsed()
        );
        answer
    }

    /// Carries one call on a devshim pty to serve.
    ///
    /// The call is checked to still wait (its caller was not killed or
    /// interrupted) right before the port is acted on and right before
    /// anything is written back to the caller; one that no longer waits
    /// gets nothing. The caller's memory is opened before the first check,
    /// so it is the caller's that is read and written, whoever has the pid
    /// later ([`Mem`]).
    fn carry(
        &mut self,
        call: Call,
        tid: u32,
        id: u64,
        pty: Result<BorrowedFd<'_>, Target>,
        sock: &Path,
    ) -> Answer {
        let ask = |me: &mut Self, req: LineRequest| -> Option<LineReply> {
            let client = me
                .clients
                .entry(sock.to_path_buf())
                .or_insert_with(|| linesock::Client::new(sock.to_path_buf()));
            match client.call(pty, &req) {
                Ok(r) => Some(r),
                Err(e) => {
                    if me.warned.insert(sock.to_path_buf()) {
                        eprintln!(
                            "devshim: can't reach devshim serve at {}: {e}; line control on its ptys fails",
                            sock.display()
                        );
                    }
                    None
                }
            }
        };
        let done = |r: Option<LineReply>| match r {
            Some(r) if r.errno == 0 => Answer::Value(0),
            Some(r) => Answer::Errno(r.errno),
            None => Answer::Errno(libc::EIO),
        };
        match call {
            Call::GetModem { out } => {
                let Ok(mem) = Mem::open(tid) else {
                    return Answer::Errno(libc::EFAULT);
                };
                if !self.still_waiting(id) {
                    return Answer::Continue;
                }
                let Some(r) = ask(self, LineRequest::GetModem) else {
                    return Answer::Errno(libc::EIO);
                };
                if r.errno != 0 {
                    return Answer::Errno(r.errno);
                }
                if !self.still_waiting(id) {
                    return Answer::Continue;
                }
                match mem.write(out, &r.modem.to_ne_bytes()) {
                    Ok(()) => Answer::Value(0),
                    Err(_) => Answer::Errno(libc::EFAULT),
                }
            }
            Call::SetModem { op, from } => {
                let Ok(b) = Mem::open(tid).and_then(|m| m.read(from, 4)) else {
                    return Answer::Errno(libc::EFAULT);
                };
                if !self.still_waiting(id) {
                    return Answer::Continue;
                }
                let bits = i32::from_ne_bytes(b[..4].try_into().unwrap());
                done(ask(self, LineRequest::Modem { op, bits }))
            }
            Call::Break(_) | Call::TimedBreak(_) | Call::Drain if !self.still_waiting(id) => {
                Answer::Continue
            }
            Call::Break(on) => done(ask(self, LineRequest::Break { on })),
            Call::TimedBreak(ms) => done(ask(self, LineRequest::TimedBreak { ms })),
            Call::Drain => match ask(self, LineRequest::Drain) {
                None => Answer::Continue,
                r => done(r),
            },
            Call::SetTermios { req, from, len } => {
                let Ok(termios) = Mem::open(tid).and_then(|m| m.read(from, len)) else {
                    return Answer::Errno(libc::EFAULT);
                };
                if !self.still_waiting(id) {
                    return Answer::Continue;
                }
                // Serve applies it to the pty as the tool would have (rate,
                // flags, flush), keeps the data size and parity the pty
                // drops, and answers when the port has them. Without serve
                // the kernel applies what the pty can take.
                match ask(self, LineRequest::SetTermios { req, termios }) {
                    Some(r) if r.errno != 0 => Answer::Errno(r.errno),
                    Some(_) => Answer::Value(0),
                    None => Answer::Continue,
                }
            }
            Call::GetTermios { req, out, len } => {
                let Ok(mem) = Mem::open(tid) else {
                    return Answer::Errno(libc::EFAULT);
                };
                if !self.still_waiting(id) {
                    return Answer::Continue;
                }
                let Some(r) = ask(self, LineRequest::GetTermios { req }) else {
                    return Answer::Continue;
                };
                if r.errno != 0 {
                    return Answer::Errno(r.errno);
                }
                if !self.still_waiting(id) {
                    return Answer::Continue;
                }
                match r.termios.filter(|t| t.len() == len) {
                    Some(t) => match mem.write(out, &t) {
                        Ok(()) => Answer::Value(0),
                        Err(_) => Answer::Errno(libc::EFAULT),
                    },
                    None => Answer::Continue,
                }
            }
        }
    }
}

/// A notified caller's memory, through `/proc/<tid>/mem`. The file keeps
/// the address space it was opened on: opened before the call is checked
/// to still wait, it reaches the caller's memory and no other process's,
/// even if the pid is taken over later (reads and writes then fail).
struct Mem(std::fs::File);

impl Mem {
    fn open(tid: u32) -> io::Result<Mem> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{tid}/mem"))
            .map(Mem)
    }

    fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; len];
        self.0.read_exact_at(&mut b, addr)?;
        Ok(b)
    }

    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_all_at(data, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_memory_is_read_and_written() {
        let tid = nix::unistd::gettid().as_raw() as u32;
        let mem = Mem::open(tid).unwrap();
        let mut target = std::hint::black_box([0u8; 8]);
        let addr = target.as_mut_ptr() as u64;
        mem.write(addr, &0x1122_3344_5566_7788u64.to_ne_bytes())
            .unwrap();
        // SAFETY: reading our own initialized array.
        let now = unsafe { std::ptr::read_volatile(&target) };
        assert_eq!(u64::from_ne_bytes(now), 0x1122_3344_5566_7788);
        assert_eq!(mem.read(addr, 8).unwrap(), now);
        // Nothing is mapped at 0.
        assert!(mem.read(0, 4).is_err());
        assert!(mem.write(0, &[1]).is_err());
    }

    #[test]
    fn a_caller_that_is_gone_is_not_reached() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mem = Mem::open(pid).unwrap();
        // An address mapped in the child: the top of its stack.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let stack = maps.lines().find(|l| l.ends_with("[stack]")).unwrap();
        let end = stack.split([' ', '-']).nth(1).unwrap();
        let addr = u64::from_str_radix(end, 16).unwrap() - 8;
        assert_eq!(mem.read(addr, 8).unwrap().len(), 8);
        child.kill().unwrap();
        child.wait().unwrap();
        // Whoever has the pid now, the file is the old process's memory.
        assert!(mem.read(addr, 8).is_err());
        assert!(mem.write(addr, &[0; 8]).is_err());
    }
}
