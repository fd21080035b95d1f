//! The client's RFC 2217 commands, applied to the port, and the replies
//! that say what is now in force.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tracing::{debug, warn};
use wire::rfc2217::{control, Command, LineSettings};
use wire::termios::{self, When};

use crate::port;
use crate::throttle::Throttle;

/// A SET-BAUDRATE, SET-DATASIZE, SET-PARITY or SET-STOPSIZE: a change to
/// the port's settings whose reply reports one field of them.
#[derive(Debug, Clone, Copy)]
enum Setting {
    Baud(u32),
    DataSize(u8),
    Parity(u8),
    StopSize(u8),
}

impl Setting {
    fn of(cmd: &Command) -> Option<Setting> {
        Some(match *cmd {
            Command::SetBaudRate(b) => Setting::Baud(b),
            Command::SetDataSize(v) => Setting::DataSize(v),
            Command::SetParity(v) => Setting::Parity(v),
            Command::SetStopSize(v) => Setting::StopSize(v),
            _ => return None,
        })
    }

    /// Changes `t`; `None` when the value is not valid. A value of 0 asks
    /// for the current value and changes nothing.
    fn change(self, t: &mut libc::termios2) -> Option<()> {
        match self {
            Setting::Baud(0) => None,
            Setting::Baud(b) => {
                termios::set_baud(t, b);
                Some(())
            }
            Setting::DataSize(v) => termios::set_data_size(t, v),
            Setting::Parity(v) => termios::set_parity(t, v),
            Setting::StopSize(v) => termios::set_stop_size(t, v),
        }
    }

    /// The reply: the value now in force.
    fn report(self, s: &LineSettings) -> Command {
        match self {
            Setting::Baud(_) => Command::SetBaudRate(s.baud),
            Setting::DataSize(_) => Command::SetDataSize(s.data_size),
            Setting::Parity(_) => Command::SetParity(s.parity),
            Setting::StopSize(_) => Command::SetStopSize(s.stop_size),
        }
    }
}

/// Waits, if dropped before it is disarmed, for a blocking job on the
/// port's descriptor to end — cutting a drain short by purging what waits
/// to go out — so the port is never closed under the job, even when the
/// relay's future is dropped mid-change (a panic, the runtime ending).
struct JobGuard<'a> {
    fd: BorrowedFd<'a>,
    /// Disconnects when the job ends.
    ended: Option<std::sync::mpsc::Receiver<()>>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = port::purge(self.fd, wire::rfc2217::purge::TRANSMIT);
            let _ = ended.recv();
        }
    }
}

/// Applies a client's command to the port and returns the reply: the value
/// now in force. A settings change waits for what was written before it to
/// go out at the old rate, so it runs off the async threads; the relay
/// awaits it to the end, even when it stops, so the port (and so `fd`) is
/// never closed under it.
pub(super) async fn apply(
    fd: BorrowedFd<'_>,
    cmd: Command,
    label: &str,
    suspend: &tokio::sync::watch::Sender<bool>,
    warnings: &mut Throttle,
) -> Option<Command> {
    if let Some(setting) = Setting::of(&cmd) {
        let raw = fd.as_raw_fd();
        let (ends, ended) = std::sync::mpsc::channel::<()>();
        let job = tokio::task::spawn_blocking(move || -> io::Result<Command> {
            let _ends = ends;
            // SAFETY: `guard` below keeps the port open until this job ends.
            let fd = unsafe { BorrowedFd::borrow_raw(raw) };
            let mut t = termios::get(fd)?;
            if setting.change(&mut t).is_some() {
                termios::set(fd, &t, When::AfterDrain)?;
                t = termios::get(fd)?;
            }
            Ok(setting.report(&termios::to_settings(&t)))
        });
        let mut guard = JobGuard {
            fd,
            ended: Some(ended),
        };
        let applied = job.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        guard.ended = None;
        return match applied {
            Ok(c) => {
                debug!(tty = %label, "applied {cmd:?}: {c:?}");
                Some(c)
            }
            Err(e) => {
                if warnings.allow().is_some() {
                    warn!(tty = %label, "port control failed: {e}");
                }
                None
            }
        };
    }
    match cmd {
        Command::SetControl(v) => match port::set_control(fd, v) {
            Ok(r) => {
                debug!(tty = %label, "SET-CONTROL {} applied", port::control_name(v));
                Some(Command::SetControl(r))
            }
            Err(e) => {
                debug!(tty = %label, "SET-CONTROL {v}: {e}");
                // Report what the client asked: a device without modem lines
                // (a pty) has nothing to disagree with.
                let fallback = match v {
                    control::DTR_REQUEST => control::DTR_OFF,
                    control::RTS_REQUEST => control::RTS_OFF,
                    other => other,
                };
                Some(Command::SetControl(fallback))
            }
        },
        Command::PurgeData(v) => match port::purge(fd, v) {
            Ok(()) => Some(Command::PurgeData(v)),
            Err(e) => {
                if warnings.allow().is_some() {
                    warn!(tty = %label, "{e}");
                }
                None
            }
        },
        Command::FlowControlSuspend => {
            let _ = suspend.send(true);
            None
        }
        Command::FlowControlResume => {
            let _ = suspend.send(false);
            None
        }
        Command::SetLineStateMask(m) => Some(Command::SetLineStateMask(m)),
        Command::SetModemStateMask(m) => Some(Command::SetModemStateMask(m)),
        Command::Signature(s) if s.is_empty() => Some(Command::Signature(
            format!("devbroker {} {label}", env!("CARGO_PKG_VERSION")).into_bytes(),
        )),
        Command::Signature(s) => {
            debug!(tty = %label, "client signature: {}", String::from_utf8_lossy(&s));
            None
        }
        // A client asking for the modem state (pyserial polls this way):
        // read the port now.
        Command::NotifyModemState(_) => port::modem_state(fd).map(Command::NotifyModemState),
        Command::NotifyLineState(_) => None,
        // Settings changes are handled above.
        Command::SetBaudRate(_)
        | Command::SetDataSize(_)
        | Command::SetParity(_)
        | Command::SetStopSize(_) => None,
    }
}
