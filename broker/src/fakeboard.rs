//! A simulated board: a pty pair whose slave is published as a by-id link.
//!
//! The board's side is the master; the broker opens the slave through the
//! link as it would open `/dev/ttyUSB0`. Settings the broker applies to the
//! slave read back through the master, so a test (or the demo) can see the
//! baud rate a tool chose. Used by `devbroker demo` and by the test suite.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::OFlag;
use rustix::fs::{Mode, OFlags};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use wire::termios;

/// One fake board, plugged in while it lives.
#[derive(Debug)]
pub struct FakeBoard {
    master: OwnedFd,
    /// Held so the pty stays up while no broker has it open.
    _slave: OwnedFd,
    /// The by-id link.
    pub link: PathBuf,
    /// `/dev/pts/N`.
    pub slave_path: PathBuf,
}

impl FakeBoard {
    /// Makes a pty and links its slave as `dir/name` (creating `dir`).
    pub fn plug(dir: &Path, name: &str) -> io::Result<FakeBoard> {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let slave_path = PathBuf::from(std::ffi::OsString::from_vec(
            ptsname(&master, Vec::new())?.into_bytes(),
        ));
        let slave = rustix::fs::open(
            &slave_path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut t = termios::get(&slave)?;
        termios::make_raw(&mut t);
        termios::set(&slave, &t, termios::When::Now)?;
        fs::create_dir_all(dir)?;
        let link = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        symlink(&slave_path, &tmp)?;
        fs::rename(&tmp, &link)?;
        Ok(FakeBoard {
            master,
            _slave: slave,
            link,
            slave_path,
        })
    }

    /// The board's side of the pty.
    pub fn master_fd(&self) -> RawFd {
        self.master.as_raw_fd()
    }

    /// The settings the broker last applied to the port.
    pub fn termios(&self) -> io::Result<libc::termios2> {
        termios::get(&self.master)
    }

    /// The baud rate the broker last set.
    pub fn baud(&self) -> u32 {
        self.termios().map(|t| t.c_ospeed).unwrap_or(0)
    }

    /// Removes the link, then closes the pty: what an unplug looks like.
    pub fn unplug(self) {
        let _ = fs::remove_file(&self.link);
        drop(self);
    }

    /// Runs the demo behaviour until `cancel`: echo what arrives and print a
    /// boot banner every `banner_every`.
    pub async fn run_echo(
        self,
        banner_every: Duration,
        cancel: CancellationToken,
    ) -> io::Result<()> {
        nix::fcntl::fcntl(
            self.master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        )?;
        // Its own reference to the master, closed before the board is
        // unplugged below.
        // SAFETY: the AsyncFd owns the duplicate, which stays open and the
        // same for as long as the AsyncFd lives.
        let afd =
            unsafe { AsyncFd::register(self.master.try_clone()?) }.map_err(|e| e.into_parts().1)?;
        let mut tick = tokio::time::interval(banner_every);
        let mut boots = 0u64;
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    boots += 1;
                    let banner = format!("\r\ndevbroker demo board: boot #{boots}, type something and it comes back\r\n");
                    // A board prints whether anyone listens; drop what doesn't fit.
                    let _ = nix::unistd::write(&self.master, banner.as_bytes());
                }
                r = afd.readable() => {
                    let mut guard = r?;
                    match rustix::io::read(afd.get_ref(), &mut buf) {
                        Ok(0) => guard.clear_ready(),
                        Ok(n) => { let _ = nix::unistd::write(&self.master, &buf[..n]); }
                        Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                        Err(rustix::io::Errno::IO) => {
                            guard.clear_ready();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        drop(afd);
        self.unplug();
        Ok(())
    }
}
