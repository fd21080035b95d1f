//! Other processes: fields of `/proc/<pid>/status`, and pidfds, which hold
//! on to one process while several reads of `/proc` are made about it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The value of field `name` (`"Uid"`, `"Tgid"`) in the text of a
/// `/proc/<pid>/status`, without the whitespace around it.
pub fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// A pidfd for process `pid` (a thread-group leader).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such pid"))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// The pidfd of the process that thread `tid` belongs to, and that
/// process's id: `pidfd_open` takes only a thread-group leader (without
/// `PIDFD_THREAD`, Linux 6.9; another thread is refused with `EINVAL`, or
/// `ENOENT` by newer kernels), and a tool may call from any thread (Go
/// does).
pub fn pidfd_of_thread(tid: u32) -> io::Result<(OwnedFd, u32)> {
    match pidfd_open(tid) {
        Ok(fd) => Ok((fd, tid)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
            let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
            let tgid = status_field(&status, "Tgid")
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| io::Error::other("no Tgid"))?;
            Ok((pidfd_open(tgid)?, tgid))
        }
        Err(e) => Err(e),
    }
}

/// Whether the process of `pidfd` has exited (its pidfd is readable then).
/// While it has not, its pid names it and no other process.
pub fn exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    Ok(poll(&mut fds, PollTimeout::ZERO)? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_a_status() {
        let status = "Name:\tcat\nUmask:\t0022\nTgid:\t4242\nPid:\t4243\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t5\t5\t5\n";
        assert_eq!(status_field(status, "Tgid"), Some("4242"));
        assert_eq!(status_field(status, "Uid"), Some("1000\t1001\t1002\t1003"));
        assert_eq!(status_field(status, "Ui"), None);
        assert_eq!(status_field(status, "Seccomp"), None);
    }

    #[test]
    fn a_pidfd_tells_when_its_process_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (fd, pid) = pidfd_of_thread(child.id()).unwrap();
        assert_eq!(pid, child.id());
        assert!(!exited(fd.as_fd()).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(exited(fd.as_fd()).unwrap());
    }

    #[test]
    fn a_thread_leads_to_its_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let (fd, pid) = pidfd_of_thread(tid).unwrap();
        assert_eq!(pid, std::process::id());
        assert!(!exited(fd.as_fd()).unwrap());
        drop(done_tx);
        t.join().unwrap();
    }
}
