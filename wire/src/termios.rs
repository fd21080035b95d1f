//! Linux `termios2` ↔ RFC 2217 line settings, and the few tty ioctls both
//! ends need.
//!
//! `termios2` (`TCGETS2`/`TCSETS2`) carries any baud rate as a number, so
//! non-standard rates such as 250000 or 921600 pass unchanged. The broker
//! applies settings to the real port with these; devshim reads what a tool set
//! on its pty (on the master side, which returns the slave's settings).
//!
//! Every tty ioctl of the project is here, each behind a safe function on a
//! borrowed descriptor: the rest of the code holds no `unsafe` for them.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use crate::rfc2217::{control, parity, stopsize, LineSettings};

/// A termios with every field zero, to be filled in.
pub fn zeroed() -> libc::termios2 {
    // SAFETY: termios2 is plain integers and arrays of them; all zeroes is a
    // valid value of each.
    unsafe { std::mem::zeroed() }
}

/// Turns an ioctl's return value into a result.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads the terminal's settings.
pub fn get(fd: impl AsFd) -> io::Result<libc::termios2> {
    let mut t = zeroed();
    // SAFETY: TCGETS2 writes one termios2 into the pointer we pass; the
    // descriptor is borrowed, so open, for the call.
    check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TCGETS2 as _, &mut t) })?;
    Ok(t)
}

/// When a change takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Now,
    /// After everything written so far has been sent (`TCSETSW2`): a baud
    /// change must not garble bytes still in the transmit queue.
    AfterDrain,
}

/// Applies settings. With [`When::AfterDrain`] this blocks until the output
/// queue is empty: call it off the async threads.
pub fn set(fd: impl AsFd, t: &libc::termios2, when: When) -> io::Result<()> {
    let req = match when {
        When::Now => libc::TCSETS2,
        When::AfterDrain => libc::TCSETSW2,
    };
    // SAFETY: TCSETS2/TCSETSW2 read one termios2 from the pointer.
    check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req as _, t) })
}

/// The two termios structs a tool's `TCGETS*`/`TCSETS*` carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The kernel's `struct termios` (`TCGETS`/`TCSETS`; not glibc's).
    Termios,
    /// `struct termios2` (`TCGETS2`/`TCSETS2`).
    Termios2,
}

impl Layout {
    /// The struct's size in bytes.
    pub const fn size(self) -> usize {
        match self {
            // c_iflag, c_oflag, c_cflag, c_lflag, c_line, c_cc[19].
            Layout::Termios => 4 * 4 + 1 + 19,
            Layout::Termios2 => std::mem::size_of::<libc::termios2>(),
        }
    }

    /// The layout a termios read (`TCGETS`, `TCGETS2`) fills; `None` for
    /// any other request.
    pub fn of_get(req: u32) -> Option<Layout> {
        match libc::c_ulong::from(req) {
            libc::TCGETS => Some(Layout::Termios),
            libc::TCGETS2 => Some(Layout::Termios2),
            _ => None,
        }
    }

    fn get_request(self) -> libc::c_ulong {
        match self {
            Layout::Termios => libc::TCGETS,
            Layout::Termios2 => libc::TCGETS2,
        }
    }

    fn set_request(self) -> libc::c_ulong {
        match self {
            Layout::Termios => libc::TCSETS,
            Layout::Termios2 => libc::TCSETS2,
        }
    }
}

/// Reads the terminal's settings as the struct of `layout`, in its bytes
/// (as a tool's `TCGETS`/`TCGETS2` gets them).
pub fn get_bytes(fd: impl AsFd, layout: Layout) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; layout.size()];
    // SAFETY: TCGETS/TCGETS2 write one struct of `layout.size()` bytes, the
    // buffer's size; the descriptor is borrowed, so open, for the call.
    check(unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            layout.get_request() as _,
            b.as_mut_ptr(),
        )
    })?;
    Ok(b)
}

/// Applies settings given as the bytes of a struct of `layout`, at once
/// (`TCSETS`/`TCSETS2`); fails with `EINVAL` if `bytes` is not that long.
pub fn set_bytes(fd: impl AsFd, layout: Layout, bytes: &[u8]) -> io::Result<()> {
    let Some(b) = bytes.get(..layout.size()) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: TCSETS/TCSETS2 read one struct of `layout.size()` bytes, which
    // `b` has.
    check(unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            layout.set_request() as _,
            b.as_ptr(),
        )
    })
}

/// The modem lines (`TIOCM_*` bits) as the tty has them now. A device
/// without modem lines (a pty) fails with `ENOTTY`.
pub fn modem_lines(fd: impl AsFd) -> io::Result<libc::c_int> {
    let mut bits: libc::c_int = 0;
    // SAFETY: TIOCMGET writes one int.
    check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCMGET, &mut bits) })?;
    Ok(bits)
}

/// Raises (`on`) or drops the modem lines in `bits` (`TIOCM_DTR`,
/// `TIOCM_RTS`), leaving the others as they are.
pub fn set_modem_lines(fd: impl AsFd, bits: libc::c_int, on: bool) -> io::Result<()> {
    let req = if on { libc::TIOCMBIS } else { libc::TIOCMBIC };
    // SAFETY: TIOCMBIS/TIOCMBIC read one int.
    check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req, &bits) })
}

/// Starts (`on`) or stops sending a break.
pub fn set_break(fd: impl AsFd, on: bool) -> io::Result<()> {
    let req = if on { libc::TIOCSBRK } else { libc::TIOCCBRK };
    // SAFETY: TIOCSBRK/TIOCCBRK take no argument.
    check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req, 0) })
}

/// Discards queued data: `TCIFLUSH` (received, not read), `TCOFLUSH`
/// (written, not sent) or `TCIOFLUSH` (both).
pub fn flush(fd: impl AsFd, queue: libc::c_int) -> io::Result<()> {
    // SAFETY: tcflush takes the descriptor and a queue selector only.
    check(unsafe { libc::tcflush(fd.as_fd().as_raw_fd(), queue) })
}

/// The settings of a termios, in RFC 2217 values.
pub fn to_settings(t: &libc::termios2) -> LineSettings {
    let data_size = match t.c_cflag & libc::CSIZE {
        libc::CS5 => 5,
        libc::CS6 => 6,
        libc::CS7 => 7,
        _ => 8,
    };
    let par = if t.c_cflag & libc::PARENB == 0 {
        parity::NONE
    } else if t.c_cflag & libc::CMSPAR != 0 {
        if t.c_cflag & libc::PARODD != 0 {
            parity::MARK
        } else {
            parity::SPACE
        }
    } else if t.c_cflag & libc::PARODD != 0 {
        parity::ODD
    } else {
        parity::EVEN
    };
    let flow = if t.c_cflag & libc::CRTSCTS != 0 {
        control::FLOW_HARDWARE
    } else if t.c_iflag & (libc::IXON | libc::IXOFF) != 0 {
        control::FLOW_XONXOFF
    } else {
        control::FLOW_NONE
    };
    LineSettings {
        baud: t.c_ospeed,
        data_size,
        parity: par,
        stop_size: if t.c_cflag & libc::CSTOPB != 0 {
            stopsize::TWO
        } else {
            stopsize::ONE
        },
        flow,
    }
}

/// Sets the baud rate as a number (`BOTHER`), both directions.
pub fn set_baud(t: &mut libc::termios2, baud: u32) {
    t.c_cflag &= !(libc::CBAUD | (libc::CBAUD << libc::IBSHIFT));
    t.c_cflag |= libc::BOTHER | (libc::BOTHER << libc::IBSHIFT);
    t.c_ispeed = baud;
    t.c_ospeed = baud;
}

/// Sets the data size; `None` for a value RFC 2217 does not allow.
pub fn set_data_size(t: &mut libc::termios2, bits: u8) -> Option<()> {
    let cs = match bits {
        5 => libc::CS5,
        6 => libc::CS6,
        7 => libc::CS7,
        8 => libc::CS8,
        _ => return None,
    };
    t.c_cflag = (t.c_cflag & !libc::CSIZE) | cs;
    Some(())
}

pub fn set_parity(t: &mut libc::termios2, p: u8) -> Option<()> {
    let bits = match p {
        parity::NONE => 0,
        parity::ODD => libc::PARENB | libc::PARODD,
        parity::EVEN => libc::PARENB,
        parity::MARK => libc::PARENB | libc::PARODD | libc::CMSPAR,
        parity::SPACE => libc::PARENB | libc::CMSPAR,
        _ => return None,
    };
    t.c_cflag = (t.c_cflag & !(libc::PARENB | libc::PARODD | libc::CMSPAR)) | bits;
    if bits != 0 {
        t.c_iflag |= libc::INPCK;
    } else {
        t.c_iflag &= !libc::INPCK;
    }
    Some(())
}

pub fn set_stop_size(t: &mut libc::termios2, s: u8) -> Option<()> {
    match s {
        stopsize::ONE => t.c_cflag &= !libc::CSTOPB,
        // 1.5 stop bits exist only with 5 data bits, where CSTOPB means 1.5.
        stopsize::TWO | stopsize::ONE_AND_HALF => t.c_cflag |= libc::CSTOPB,
        _ => return None,
    }
    Some(())
}

pub fn set_flow(t: &mut libc::termios2, f: u8) -> Option<()> {
    t.c_cflag &= !libc::CRTSCTS;
    t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY);
    match f {
        control::FLOW_NONE => {}
        control::FLOW_XONXOFF => t.c_iflag |= libc::IXON | libc::IXOFF,
        control::FLOW_HARDWARE => t.c_cflag |= libc::CRTSCTS,
        _ => return None,
    }
    Some(())
}

/// Makes a termios raw (as `cfmakeraw`), keeping its rate.
pub fn make_raw(t: &mut libc::termios2) {
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_oflag &= !libc::OPOST;
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB);
    t.c_cflag |= libc::CS8 | libc::CREAD | libc::CLOCAL;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termios_structs_by_request() {
        assert_eq!(Layout::Termios.size(), 36);
        assert_eq!(Layout::Termios2.size(), 44);
        assert_eq!(Layout::of_get(libc::TCGETS as u32), Some(Layout::Termios));
        assert_eq!(Layout::of_get(libc::TCGETS2 as u32), Some(Layout::Termios2));
        for req in [libc::TCSETS, libc::TCSETS2, libc::TIOCSTI, libc::TIOCMGET] {
            assert_eq!(Layout::of_get(req as u32), None, "{req:#x}");
        }
        assert_eq!(Layout::of_get(u32::MAX), None);
    }

    #[test]
    fn settings_as_bytes_on_a_pty() {
        let master = openpt();
        let t = get(&master).unwrap();
        let b2 = get_bytes(&master, Layout::Termios2).unwrap();
        let b1 = get_bytes(&master, Layout::Termios).unwrap();
        assert_eq!(b2.len(), 44);
        assert_eq!(b1.len(), 36);
        let cflag = |b: &[u8]| u32::from_ne_bytes(b[8..12].try_into().unwrap());
        assert_eq!(cflag(&b2), t.c_cflag);
        assert_eq!(cflag(&b1), t.c_cflag);
        // Too short a struct is refused, not read past.
        assert_eq!(
            set_bytes(&master, Layout::Termios2, &b2[..40])
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        let mut raw = t;
        make_raw(&mut raw);
        set(&master, &raw, When::Now).unwrap();
        set_bytes(&master, Layout::Termios2, &b2).unwrap();
        assert_eq!(get(&master).unwrap().c_lflag, t.c_lflag);
        set(&master, &raw, When::Now).unwrap();
        set_bytes(&master, Layout::Termios, &b1).unwrap();
        assert_eq!(get(&master).unwrap().c_lflag, t.c_lflag);
    }

    /// A pty master (its termios are the slave's).
    fn openpt() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt returns a new descriptor or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn settings_roundtrip() {
        let mut t = zeroed();
        make_raw(&mut t);
        set_baud(&mut t, 250_000);
        set_data_size(&mut t, 7).unwrap();
        set_parity(&mut t, parity::EVEN).unwrap();
        set_stop_size(&mut t, stopsize::TWO).unwrap();
        set_flow(&mut t, control::FLOW_HARDWARE).unwrap();
        let s = to_settings(&t);
        assert_eq!(
            s,
            LineSettings {
                baud: 250_000,
                data_size: 7,
                parity: parity::EVEN,
                stop_size: stopsize::TWO,
                flow: control::FLOW_HARDWARE
            }
        );
        for p in [parity::NONE, parity::ODD, parity::MARK, parity::SPACE] {
            set_parity(&mut t, p).unwrap();
            assert_eq!(to_settings(&t).parity, p);
        }
        assert!(set_data_size(&mut t, 9).is_none());
        assert!(set_parity(&mut t, 0).is_none());
    }
}
