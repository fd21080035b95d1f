//! Which tool opened a pty: devshim names it to the broker, so `status` and
//! a refusal name the tool (say `esptool.py, pid 1234`) rather than devshim.
//!
//! A pty's opens are seen by inotify, which does not say who opened it; the
//! tool is found the way `fuser` finds it, as a process with a descriptor
//! on the pty's slave. Several may share it (a shell and its child); the
//! newest one is the tool the session is for.

use std::fs;
use std::path::Path;

use wire::rfc2217::ToolSignature;

/// The newest process other than devshim with `pty` (`/dev/pts/N`) open.
/// Reads `/proc`: call it off the async threads.
pub fn find(pty: &Path) -> Option<ToolSignature> {
    let me = std::process::id() as i32;
    let mut found: Option<(u64, i32)> = None;
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || !has_open(pid, pty) {
            continue;
        }
        let started = start_time(pid).unwrap_or(0);
        if found.is_none_or(|(t, p)| (started, pid) > (t, p)) {
            found = Some((started, pid));
        }
    }
    let (_, pid) = found?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(ToolSignature {
        pid,
        comm: comm.trim_end().to_string(),
    })
}

/// Whether process `pid` has a descriptor on `path`.
fn has_open(pid: i32, path: &Path) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == path))
}

/// When process `pid` started, in clock ticks since boot (`stat` field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from its end.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_with_the_file_open() {
        // This test process holds a pty slave open: from its own point of
        // view it is skipped, so a child holding it is what is found.
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = nix::unistd::ttyname(&pty.slave).unwrap();
        assert_eq!(find(&path), None, "devshim itself is never the tool");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(std::fs::File::open(&path).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let got = loop {
            if let Some(t) = find(&path) {
                break Some(t);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        let got = got.expect("the child holding the pty");
        assert_eq!((got.pid, got.comm.as_str()), (child.id() as i32, "sleep"));
    }
}
