//! The state file of devshim's RFC 2217 endpoints: `STATE_DIR/ports.json`
//! (`/run/devshim/ports.json` by default).
//!
//! `devshim serve` rewrites it on every change — write a temporary file, then
//! rename — and `devshim list` and `devshim lease` read it. Several devshims
//! may share one state directory (the test suite runs many on one host): each
//! owns the entries whose `link` is under its link root, and rewrites only
//! those, under an `flock` on the directory. Entries of devshims that are
//! gone (killed, so they could not withdraw them) are dropped on the way.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the state file in the state directory.
pub const FILE: &str = "ports.json";
/// The default state directory.
pub const DEFAULT_DIR: &str = crate::cli::DEFAULT_STATE_DIR;
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;

/// One tty served as RFC 2217 on `127.0.0.1:port`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortEntry {
    pub board: String,
    pub tty: String,
    /// The adapter's name in the host's `/dev/serial/by-id`, if it has one.
    pub by_id: Option<String>,
    /// The guest path of the tty's pty (its by-id link, else `devbroker/<board>.<tty>`).
    pub link: PathBuf,
    pub port: u16,
    /// The devshim serving it.
    pub pid: u32,
    /// That devshim's line socket, where `devshim run` carries a tool's
    /// DTR/RTS, break and framing calls ([`crate::linesock`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<PathBuf>,
}

impl PortEntry {
    /// `rfc2217://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        url(self.port)
    }
}

/// The URL of an endpoint on `port`.
pub fn url(port: u16) -> String {
    format!("rfc2217://127.0.0.1:{port}")
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub version: u32,
    pub ttys: Vec<PortEntry>,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            version: VERSION,
            ttys: Vec::new(),
        }
    }
}

impl Ports {
    pub fn parse(bytes: &[u8]) -> Result<Ports, String> {
        let p: Ports = serde_json::from_slice(bytes).map_err(|e| format!("unreadable: {e}"))?;
        if p.version != VERSION {
            return Err(format!(
                "version {} is not supported (this build reads {VERSION})",
                p.version
            ));
        }
        Ok(p)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("ports serialize");
        v.push(b'\n');
        v
    }

    /// The entry whose pty is published at `link`.
    pub fn by_link(&self, link: &Path) -> Option<&PortEntry> {
        self.ttys.iter().find(|e| e.link == link)
    }

    /// A table: `board.tty  guest path  rfc2217://127.0.0.1:PORT`.
    pub fn table(&self) -> String {
        let names: Vec<String> = self
            .ttys
            .iter()
            .map(|e| format!("{}.{}", e.board, e.tty))
            .collect();
        let links: Vec<String> = self
            .ttys
            .iter()
            .map(|e| e.link.display().to_string())
            .collect();
        let w0 = names.iter().map(String::len).max().unwrap_or(0);
        let w1 = links.iter().map(String::len).max().unwrap_or(0);
        let mut out = String::new();
        for ((n, l), e) in names.iter().zip(&links).zip(&self.ttys) {
            out += &format!("{n:w0$}  {l:w1$}  {}\n", e.url());
        }
        out
    }
}

/// The state file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads the state file in `dir`.
pub fn read(dir: &Path) -> io::Result<Ports> {
    let p = path(dir);
    let bytes = fs::read(&p)?;
    Ports::parse(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display())))
}

/// Takes an exclusive `flock` on a directory, held until the lock is dropped.
fn lock_dir(dir: &Path) -> io::Result<nix::fcntl::Flock<fs::File>> {
    let f = fs::File::open(dir)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

/// Makes the entries under `link_root` exactly `mine`, keeping other
/// devshims' entries whose link still exists, and writes the file atomically
/// (mode 0644, in a 0755 directory made if missing).
pub fn publish(dir: &Path, link_root: &Path, mine: &[PortEntry]) -> io::Result<()> {
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    let _lock = lock_dir(dir)?;
    let old = read(dir).unwrap_or_default();
    let mut ports = Ports {
        version: VERSION,
        ttys: merge(old.ttys, link_root, mine),
    };
    ports.ttys.sort();
    let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    let written = f
        .write_all(&ports.to_bytes())
        .and_then(|_| f.set_permissions(fs::Permissions::from_mode(0o644)));
    drop(f);
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, path(dir))) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The entries after a devshim serving `link_root` publishes `mine`.
fn merge(old: Vec<PortEntry>, link_root: &Path, mine: &[PortEntry]) -> Vec<PortEntry> {
    let mut out: Vec<PortEntry> = old
        .into_iter()
        .filter(|e| !e.link.starts_with(link_root) && alive(e.pid))
        .collect();
    out.extend_from_slice(mine);
    out
}

/// True while process `pid` exists (in this pid namespace).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only checks that the process exists.
    pid > 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(nix::errno::Errno::EPERM)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(board: &str, link: &Path, port: u16, pid: u32) -> PortEntry {
        PortEntry {
            board: board.into(),
            tty: "console".into(),
            by_id: Some("usb-x".into()),
            link: link.into(),
            port,
            pid,
            line: None,
        }
    }

    #[test]
    fn publish_keeps_other_devshims_and_drops_dead_ones() {
        let d = std::env::temp_dir().join(format!("devshim-ports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let state = d.join("state");
        let other_root = d.join("other/dev");
        let live = other_root.join("serial/by-id/usb-live");
        let mine_root = d.join("mine/dev");
        // A process that has exited: its pid is free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();

        publish(
            &state,
            &other_root,
            &[e("live", &live, 1000, std::process::id())],
        )
        .unwrap();
        publish(
            &state,
            &d.join("dead/dev"),
            &[e(
                "dead",
                &d.join("dead/dev/serial/by-id/usb-gone"),
                1001,
                dead_pid,
            )],
        )
        .unwrap();
        let a = e(
            "a",
            &mine_root.join("serial/by-id/usb-a"),
            2000,
            std::process::id(),
        );
        publish(&state, &mine_root, std::slice::from_ref(&a)).unwrap();
        let p = read(&state).unwrap();
        assert_eq!(p.ttys.len(), 2, "{p:?}");
        assert_eq!(p.by_link(&live).unwrap().port, 1000);
        assert_eq!(
            p.by_link(&a.link).unwrap().url(),
            "rfc2217://127.0.0.1:2000"
        );
        let mode = fs::metadata(path(&state)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);

        // Withdrawing mine leaves the other devshim's.
        publish(&state, &mine_root, &[]).unwrap();
        let p = read(&state).unwrap();
        assert_eq!(p.ttys.len(), 1);
        assert!(p.table().contains("live.console"), "{}", p.table());
        assert!(p.table().contains("rfc2217://127.0.0.1:1000"));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
        fs::remove_dir_all(d).unwrap();
    }
}
