//! The real serial port: opening it and the line controls RFC 2217 asks for.
//!
//! Data goes through tokio-serial's async stream; controls are ioctls on the
//! same descriptor. Controls a device can't do (a pty has no DTR) fail with
//! `ENOTTY`; the session reports the state as it is and goes on.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use tokio_serial::{SerialPortBuilderExt, SerialStream};
use wire::rfc2217::{control, purge};
use wire::termios::{self, When};

/// The descriptor of an open port, borrowed for as long as the port lives
/// (tokio-serial's stream gives only the raw number).
pub fn fd(port: &SerialStream) -> BorrowedFd<'_> {
    // SAFETY: the stream owns the descriptor and keeps it open while it is
    // borrowed; the lifetime ties the borrow to the stream.
    unsafe { BorrowedFd::borrow_raw(port.as_raw_fd()) }
}

/// Opens a port exclusively (`TIOCEXCL` and `flock`), raw, at `rate`.
pub fn open(path: &Path, rate: u32) -> io::Result<SerialStream> {
    let path_str = path
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "device path is not UTF-8"))?;
    let port = tokio_serial::new(path_str, rate)
        .exclusive(true)
        .preserve_dtr_on_open()
        .open_native_async()
        .map_err(|e| match e.kind {
            tokio_serial::ErrorKind::Io(kind) => io::Error::new(kind, e.description),
            tokio_serial::ErrorKind::NoDevice => {
                io::Error::new(io::ErrorKind::NotFound, e.description)
            }
            _ => io::Error::other(e.description),
        })?;
    let fd = fd(&port);
    let mut t = termios::get(fd)?;
    termios::make_raw(&mut t);
    // Real ports drop DTR and RTS on the last close, as a tool expects.
    t.c_cflag |= libc::HUPCL;
    termios::set_baud(&mut t, rate);
    termios::set(fd, &t, When::Now)?;
    // A real port drops what arrives while it is closed; make a fake one agree.
    purge(fd, purge::RECEIVE)?;
    Ok(port)
}

/// Applies one SET-CONTROL value and returns the value to report back.
pub fn set_control(fd: BorrowedFd<'_>, value: u8) -> io::Result<u8> {
    let modem = |bit: libc::c_int, on: bool| termios::set_modem_lines(fd, bit, on);
    let modem_bits = || termios::modem_lines(fd);
    let flow = |value: u8| -> io::Result<u8> {
        let mut t = termios::get(fd)?;
        if value != control::FLOW_REQUEST {
            termios::set_flow(&mut t, value).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "unknown flow control")
            })?;
            termios::set(fd, &t, When::Now)?;
            t = termios::get(fd)?;
        }
        Ok(termios::to_settings(&t).flow)
    };
    match value {
        control::FLOW_REQUEST
        | control::FLOW_NONE
        | control::FLOW_XONXOFF
        | control::FLOW_HARDWARE => flow(value),
        control::BREAK_ON | control::BREAK_OFF => {
            termios::set_break(fd, value == control::BREAK_ON)?;
            Ok(value)
        }
        control::DTR_ON | control::DTR_OFF => {
            modem(libc::TIOCM_DTR, value == control::DTR_ON)?;
            Ok(value)
        }
        control::RTS_ON | control::RTS_OFF => {
            modem(libc::TIOCM_RTS, value == control::RTS_ON)?;
            Ok(value)
        }
        control::DTR_REQUEST => Ok(if modem_bits()? & libc::TIOCM_DTR != 0 {
            control::DTR_ON
        } else {
            control::DTR_OFF
        }),
        control::RTS_REQUEST => Ok(if modem_bits()? & libc::TIOCM_RTS != 0 {
            control::RTS_ON
        } else {
            control::RTS_OFF
        }),
        // Break state isn't readable back; inbound flow follows outbound on Linux.
        control::BREAK_REQUEST => Ok(control::BREAK_OFF),
        control::INBOUND_FLOW_REQUEST
        | control::INBOUND_FLOW_NONE
        | control::INBOUND_FLOW_XONXOFF
        | control::INBOUND_FLOW_HARDWARE => Ok(control::INBOUND_FLOW_NONE),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("SET-CONTROL value {value} is not supported"),
        )),
    }
}

/// A SET-CONTROL value's name, for logs.
pub fn control_name(value: u8) -> &'static str {
    match value {
        control::FLOW_REQUEST => "flow?",
        control::FLOW_NONE => "flow none",
        control::FLOW_XONXOFF => "flow XON/XOFF",
        control::FLOW_HARDWARE => "flow RTS/CTS",
        control::BREAK_REQUEST => "break?",
        control::BREAK_ON => "break on",
        control::BREAK_OFF => "break off",
        control::DTR_REQUEST => "DTR?",
        control::DTR_ON => "DTR on",
        control::DTR_OFF => "DTR off",
        control::RTS_REQUEST => "RTS?",
        control::RTS_ON => "RTS on",
        control::RTS_OFF => "RTS off",
        _ => "other",
    }
}

/// DTR and RTS as the port has them now, if it has modem lines.
pub fn modem_outputs(fd: BorrowedFd<'_>) -> Option<(bool, bool)> {
    let bits = termios::modem_lines(fd).ok()?;
    Some((bits & libc::TIOCM_DTR != 0, bits & libc::TIOCM_RTS != 0))
}

/// Modem-state bits in RFC 2217 form, if the device has modem lines.
pub fn modem_state(fd: BorrowedFd<'_>) -> Option<u8> {
    use wire::rfc2217::modemstate as ms;
    let bits = termios::modem_lines(fd).ok()?;
    let mut s = 0;
    for (tiocm, bit) in [
        (libc::TIOCM_CD, ms::CD),
        (libc::TIOCM_RI, ms::RI),
        (libc::TIOCM_DSR, ms::DSR),
        (libc::TIOCM_CTS, ms::CTS),
    ] {
        if bits & tiocm != 0 {
            s |= bit;
        }
    }
    Some(s)
}

/// Discards queued data as PURGE-DATA asks.
pub fn purge(fd: BorrowedFd<'_>, which: u8) -> io::Result<()> {
    let q = match which {
        purge::RECEIVE => libc::TCIFLUSH,
        purge::TRANSMIT => libc::TCOFLUSH,
        purge::BOTH => libc::TCIOFLUSH,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("PURGE-DATA value {which} is not 1, 2 or 3"),
            ))
        }
    };
    termios::flush(fd, q)
}
