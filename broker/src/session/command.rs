//! The client's RFC 2217 commands, applied to the port, and the replies
//! that say what is now in force.

use std::io;
use std::os::fd::BorrowedFd;

use tracing::{debug, warn};
use wire::rfc2217::{control, Command, LineSettings};
use wire::termios::{self, When};

use crate::port;
use crate::throttle::Throttle;

/// A change to the port's settings; `None` when the value is not valid.
type Change = Box<dyn FnOnce(&mut libc::termios2) -> Option<()> + Send>;

/// How a SET-BAUDRATE, SET-DATASIZE, SET-PARITY or SET-STOPSIZE changes the
/// port's settings, and which field of them its reply reports.
struct SettingChange {
    change: Change,
    report: fn(&LineSettings) -> Command,
}

/// The settings change of a command, if it is one. A value of 0 asks for
/// the current value and changes nothing.
fn setting_change(cmd: &Command) -> Option<SettingChange> {
    let (change, report): (Change, fn(&LineSettings) -> Command) = match *cmd {
        Command::SetBaudRate(b) => (
            Box::new(move |t| (b != 0).then(|| termios::set_baud(t, b))),
            |s| Command::SetBaudRate(s.baud),
        ),
        Command::SetDataSize(v) => (Box::new(move |t| termios::set_data_size(t, v)), |s| {
            Command::SetDataSize(s.data_size)
        }),
        Command::SetParity(v) => (Box::new(move |t| termios::set_parity(t, v)), |s| {
            Command::SetParity(s.parity)
        }),
        Command::SetStopSize(v) => (Box::new(move |t| termios::set_stop_size(t, v)), |s| {
            Command::SetStopSize(s.stop_size)
        }),
        _ => return None,
    };
    Some(SettingChange { change, report })
}

/// Applies a client's command to the port and returns the reply: the value
/// now in force. A settings change waits for what was written before it to
/// go out at the old rate, so it runs off the async threads; the relay
/// awaits it to the end, even when it stops, so the port (and so `fd`) is
/// never closed under it.
pub(super) async fn apply(
    fd: BorrowedFd<'static>,
    cmd: Command,
    label: &str,
    suspend: &tokio::sync::watch::Sender<bool>,
    warnings: &mut Throttle,
) -> Option<Command> {
    if let Some(SettingChange { change, report }) = setting_change(&cmd) {
        let applied = tokio::task::spawn_blocking(move || -> io::Result<Command> {
            let mut t = termios::get(fd)?;
            if change(&mut t).is_some() {
                termios::set(fd, &t, When::AfterDrain)?;
                t = termios::get(fd)?;
            }
            Ok(report(&termios::to_settings(&t)))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
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
        Command::SetBaudRate(_)
        | Command::SetDataSize(_)
        | Command::SetParity(_)
        | Command::SetStopSize(_) => unreachable!("settings changes are handled above"),
    }
}
