//! The line a client asked for: rate, framing, flow control and modem lines,
//! kept by its session so they can be put back on a port that re-enumerated.
//!
//! A board that resets over native USB comes back as a new device with the
//! kernel's defaults. The tool that had set 460800 baud and dropped RTS must
//! not notice: the session notes every line command as the client sends it
//! (what was asked, not what the old port answered, since a command may
//! arrive while the port is already gone) and applies them all to the new
//! port before relaying resumes.

use std::io;
use std::os::fd::BorrowedFd;

use wire::rfc2217::{control, Command};
use wire::termios::{self, When};

use crate::port;

/// The settings a client has set so far; `None` where it set nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Line {
    pub baud: Option<u32>,
    pub data_size: Option<u8>,
    pub parity: Option<u8>,
    pub stop_size: Option<u8>,
    /// A SET-CONTROL flow value (`FLOW_NONE`, `FLOW_XONXOFF`, `FLOW_HARDWARE`).
    pub flow: Option<u8>,
    pub dtr: Option<bool>,
    pub rts: Option<bool>,
}

impl Line {
    /// Notes what a client command asks of the line. Queries (value 0) and
    /// commands that set nothing lasting (break, purge) change nothing.
    pub fn note(&mut self, cmd: &Command) {
        match *cmd {
            Command::SetBaudRate(b) if b != 0 => self.baud = Some(b),
            Command::SetDataSize(v) if v != 0 => self.data_size = Some(v),
            Command::SetParity(v) if v != 0 => self.parity = Some(v),
            Command::SetStopSize(v) if v != 0 => self.stop_size = Some(v),
            Command::SetControl(v) => match v {
                control::FLOW_NONE | control::FLOW_XONXOFF | control::FLOW_HARDWARE => {
                    self.flow = Some(v)
                }
                control::DTR_ON => self.dtr = Some(true),
                control::DTR_OFF => self.dtr = Some(false),
                control::RTS_ON => self.rts = Some(true),
                control::RTS_OFF => self.rts = Some(false),
                _ => {}
            },
            _ => {}
        }
    }

    /// Whether the client set anything at all.
    pub fn is_empty(&self) -> bool {
        *self == Line::default()
    }

    /// Applies the settings to an open port: framing first, then the modem
    /// lines, in the order a tool would have set them. A device without
    /// modem lines (`ENOTTY`) keeps its framing.
    pub fn apply(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut t = termios::get(fd)?;
        if let Some(b) = self.baud {
            termios::set_baud(&mut t, b);
        }
        let bad = |what: &str, v: u8| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} {v} is not valid"),
            )
        };
        if let Some(v) = self.data_size {
            termios::set_data_size(&mut t, v).ok_or_else(|| bad("data size", v))?;
        }
        if let Some(v) = self.parity {
            termios::set_parity(&mut t, v).ok_or_else(|| bad("parity", v))?;
        }
        if let Some(v) = self.stop_size {
            termios::set_stop_size(&mut t, v).ok_or_else(|| bad("stop size", v))?;
        }
        if let Some(v) = self.flow {
            termios::set_flow(&mut t, v).ok_or_else(|| bad("flow control", v))?;
        }
        termios::set(fd, &t, When::Now)?;
        let modem = [
            self.dtr.map(|on| {
                if on {
                    control::DTR_ON
                } else {
                    control::DTR_OFF
                }
            }),
            self.rts.map(|on| {
                if on {
                    control::RTS_ON
                } else {
                    control::RTS_OFF
                }
            }),
        ];
        for v in modem.into_iter().flatten() {
            match port::set_control(fd, v) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::rfc2217::parity;

    #[test]
    fn notes_settings_not_queries() {
        let mut l = Line::default();
        for c in [
            Command::SetBaudRate(0),
            Command::SetControl(control::DTR_REQUEST),
            Command::SetControl(control::BREAK_ON),
            Command::PurgeData(1),
        ] {
            l.note(&c);
        }
        assert!(l.is_empty(), "{l:?}");
        for c in [
            Command::SetBaudRate(460800),
            Command::SetParity(parity::EVEN),
            Command::SetControl(control::DTR_OFF),
            Command::SetControl(control::RTS_ON),
            Command::SetControl(control::FLOW_HARDWARE),
            Command::SetBaudRate(921600),
        ] {
            l.note(&c);
        }
        assert_eq!(
            l,
            Line {
                baud: Some(921600),
                parity: Some(parity::EVEN),
                flow: Some(control::FLOW_HARDWARE),
                dtr: Some(false),
                rts: Some(true),
                ..Line::default()
            }
        );
    }

    #[test]
    fn applies_to_a_port() {
        let (master, slave) = nix::pty::openpty(None, None)
            .map(|p| (p.master, p.slave))
            .unwrap();
        use std::os::fd::AsFd;
        let l = Line {
            baud: Some(460800),
            stop_size: Some(wire::rfc2217::stopsize::TWO),
            dtr: Some(false),
            ..Line::default()
        };
        // A pty has no modem lines (and forces 8N): the rest still lands.
        l.apply(slave.as_fd()).unwrap();
        let s = termios::to_settings(&termios::get(&slave).unwrap());
        assert_eq!(
            (s.baud, s.stop_size),
            (460800, wire::rfc2217::stopsize::TWO)
        );
        drop(master);
    }
}
