//! The guest pty: raw, in packet mode with `EXTPROC`, so a tool's settings
//! changes and flushes reach devshim as status bytes.
//!
//! devshim keeps one slave descriptor open for the pty's whole life: the
//! master then never reports `EIO`/`POLLHUP` while no tool has it open, and
//! a tool's open and close show up as inotify events on `/dev/pts/N`.
//! Dropping a [`Pty`] closes the master, which hangs up a tool that still
//! has the slave open: it reads `EIO`, as after an unplug.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Gid, Mode, OFlags, Uid};
use rustix::io::Errno;
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use tokio::io::unix::AsyncFd;
use wire::termios::{self, Layout, When};

/// Packet-mode status bits (`<linux/tty.h>`), first byte of each master read.
pub mod pkt {
    pub const DATA: u8 = 0;
    pub const FLUSHREAD: u8 = 0x01;
    pub const FLUSHWRITE: u8 = 0x02;
    pub const IOCTL: u8 = 0x40;
}

/// A pty whose master devshim holds.
pub struct Pty {
    master: AsyncFd<OwnedFd>,
    slave: OwnedFd,
    /// `/dev/pts/N`.
    pub path: PathBuf,
}

impl Pty {
    /// Opens a new pty: raw at `rate`, `HUPCL` (as a real port), `EXTPROC`
    /// and packet mode, the slave owned by `uid:gid` with mode 0660.
    pub fn open(rate: u32, uid: u32, gid: u32) -> io::Result<Pty> {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let path = PathBuf::from(OsString::from_vec(
            ptsname(&master, Vec::new())?.into_bytes(),
        ));
        let slave = rustix::fs::open(
            &path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut t = termios::get(&master)?;
        termios::make_raw(&mut t);
        termios::set_baud(&mut t, rate);
        t.c_cflag |= libc::HUPCL;
        t.c_lflag |= libc::EXTPROC;
        termios::set(&master, &t, When::Now)?;
        packet_mode(master.as_fd(), true)?;
        rustix::fs::fcntl_setfl(&master, OFlags::NONBLOCK | OFlags::RDWR)?;
        // Owner and mode set on the descriptor, not by path.
        let euid = rustix::process::geteuid().as_raw();
        if euid == 0 || euid != uid {
            rustix::fs::fchown(&slave, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
        }
        rustix::fs::fchmod(&slave, Mode::from_bits_truncate(0o660))?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and
        // the same for the AsyncFd's whole life.
        let master = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
        let pty = Pty {
            master,
            slave,
            path,
        };
        pty.drain_status();
        Ok(pty)
    }

    /// The master's descriptor.
    pub fn master(&self) -> BorrowedFd<'_> {
        self.master.get_ref().as_fd()
    }

    /// Drops status bytes our own setup caused.
    fn drain_status(&self) {
        let mut b = [0u8; 512];
        while let Ok(n) = rustix::io::read(self.master(), &mut b) {
            if n == 0 {
                break;
            }
        }
    }

    /// Drops what waits for a tool to read (the slave's input queue), as a
    /// real port does on its last close. Packet mode is off meanwhile, so
    /// the flush is not reported back as a tool's `tcflush`.
    pub fn discard_input(&self) -> io::Result<()> {
        packet_mode(self.master(), false)?;
        let flushed = termios::flush(&self.slave, libc::TCIFLUSH);
        packet_mode(self.master(), true)?;
        flushed
    }

    /// The tool's settings, read through the master.
    pub fn termios(&self) -> io::Result<libc::termios2> {
        termios::get(self.master())
    }

    /// Puts `EXTPROC` back if a tool cleared it; without it baud changes stop
    /// being reported.
    pub fn ensure_extproc(&self) -> io::Result<()> {
        let mut t = self.termios()?;
        if t.c_lflag & libc::EXTPROC == 0 {
            t.c_lflag |= libc::EXTPROC;
            termios::set(self.master(), &t, When::Now)?;
        }
        Ok(())
    }

    /// Reads one packet: a status byte, then data if the status is
    /// [`pkt::DATA`]. Waits until one is there.
    pub async fn read_packet(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(io::Error::from))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one packet if one is ready now.
    pub fn try_read_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match rustix::io::read(self.master(), buf) {
            Ok(n) => Ok(Some(n)),
            Err(Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The identity of the pty's slave (`/dev/pts/N`): what a tool's
    /// descriptor of it `fstat`s to.
    pub fn id(&self) -> io::Result<crate::linesock::PtyId> {
        crate::linesock::id_of(self.slave.as_fd())
    }

    /// The tty's settings as a tool's `TCGETS`/`TCGETS2` (`layout`) reads
    /// them, through devshim's own slave descriptor.
    pub fn slave_termios(&self, layout: Layout) -> io::Result<Vec<u8>> {
        termios::get_bytes(&self.slave, layout)
    }

    /// Applies a tool's settings struct (`layout`, at once: `TCSETS`/
    /// `TCSETS2`) on devshim's own slave descriptor: termios belong to the
    /// tty, so the tool sees the same as if it had made the call (the change
    /// is reported on the master as a packet-mode status byte, as the tool's
    /// would be).
    pub fn set_slave_termios(&self, layout: Layout, bytes: &[u8]) -> io::Result<()> {
        termios::set_bytes(&self.slave, layout, bytes)
    }

    /// Discards the tool's unread input as its `tcflush(TCIFLUSH)` would
    /// (reported on the master, so the port's receive buffer is purged too).
    pub fn flush_input_as_tool(&self) -> io::Result<()> {
        termios::flush(&self.slave, libc::TCIFLUSH)
    }

    /// Writes what fits of `data` now, without waiting: how much was written.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match nix::unistd::write(self.master.get_ref(), data) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until some of `data` can be written, writes it and returns how much.
    pub async fn write_some(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` to the tool, waiting while its input queue is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Turns packet mode on or off on a pty master.
fn packet_mode(master: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let on = libc::c_int::from(on);
    // SAFETY: TIOCPKT reads one int; the descriptor is borrowed, so open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCPKT, &on) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mode bits for a path, for tests and checks.
pub fn mode_of(path: &Path) -> io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.mode() & 0o7777)
}
