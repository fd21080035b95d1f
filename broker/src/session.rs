//! One client's session on one tty: RFC 2217 over a unix socket on one side,
//! the real port on the other.
//!
//! Both directions run in one task. Socket → port handles data and commands
//! strictly in arrival order, so bytes a tool wrote before a baud change are
//! written — and drained at the old rate — before the change is applied.
//! Port → socket escapes `0xFF` only when a chunk has one.
//!
//! A board with a re-enumeration grace may lose its port mid-session: the
//! session keeps the client, waits for the adapter to come back, opens the
//! new port with the client's line settings and carries on.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_serial::SerialStream;
use tracing::{debug, info, warn};
use wire::rfc2217::{control, Command, Direction};
use wire::telnet::{self, Decoder, Event, Negotiator, OPT_COM_PORT};
use wire::termios::{self, When};

use crate::line::Line;
use crate::port;
use crate::state::SessionGuard;

use wire::buffer::{Elastic, CHUNK, DRAIN_AFTER};

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    ClientLeft,
    AdapterGone(String),
    Cancelled,
    Error(io::Error),
}

/// Sends a refusal the way RFC 2217 servers do (ser2net too): a line of
/// text, then close. A client that sees no `IAC` first knows it was refused.
pub async fn refuse(mut sock: UnixStream, why: &str) {
    let _ = sock
        .write_all(format!("devbroker: {why}\r\n").as_bytes())
        .await;
    let _ = sock.shutdown().await;
}

/// The client's side of a session, kept across the ports it is relayed to:
/// a board that re-enumerates within its grace gets a new port, and the
/// client must not notice. Whatever was read from the client and not yet
/// handled stays here, so no byte and no command is lost at the switch.
struct Client {
    sock_r: OwnedReadHalf,
    sock_w: OwnedWriteHalf,
    dec: Decoder,
    neg: Negotiator,
    /// Read from the client; `buf[pos..len]` is not handled yet.
    buf: Elastic,
    pos: usize,
    len: usize,
    /// Data the old port refused, for the new one.
    retry: Option<Vec<u8>>,
    /// Replies to the client, from the command side to the data side.
    ctl_tx: mpsc::Sender<Vec<u8>>,
    ctl_rx: mpsc::Receiver<Vec<u8>>,
    /// FLOWCONTROL-SUSPEND: stop reading the port.
    suspend_tx: watch::Sender<bool>,
    suspend_rx: watch::Receiver<bool>,
    /// What the client asked of the line.
    line: Line,
    /// Buffer for reads from the port.
    port_buf: Elastic,
    esc: Vec<u8>,
    /// Warnings the client's bad commands may cause in the log.
    warnings: crate::throttle::Throttle,
}

/// Runs a session until the client leaves, the adapter goes (for longer
/// than the board's re-enumeration grace) or it is cancelled.
pub async fn run(sock: UnixStream, guard: SessionGuard, label: String) -> End {
    let rate = guard.rate;
    // A console captured `always` is already open: take it over as it is.
    let drained = guard.take_drained().await;
    let mut port = match drained.map_or_else(|| port::open(&guard.adapter.device, rate), Ok) {
        Ok(p) => p,
        Err(e) => {
            let why = format!(
                "can't open {} for {label}: {e}",
                guard.adapter.device.display()
            );
            warn!("{why}");
            refuse(sock, &why).await;
            return End::Error(e);
        }
    };
    info!(tty = %label, device = %guard.adapter.device.display(), "session started");
    let (sock_r, sock_w) = sock.into_split();
    let (ctl_tx, ctl_rx) = mpsc::channel::<Vec<u8>>(64);
    let (suspend_tx, suspend_rx) = watch::channel(false);
    let mut client = Client {
        sock_r,
        sock_w,
        dec: Decoder::new(),
        neg: Negotiator::server(),
        buf: Elastic::new(),
        pos: 0,
        len: 0,
        retry: None,
        ctl_tx,
        ctl_rx,
        suspend_tx,
        suspend_rx,
        line: Line::default(),
        port_buf: Elastic::new(),
        esc: Vec::new(),
        warnings: crate::throttle::Throttle::per_connection(crate::limits::WARNINGS_PER_CONNECTION),
    };
    let mut hello = client.neg.opening();
    if let Some(ms) = port::modem_state(port.as_raw_fd()) {
        Command::NotifyModemState(ms).encode(Direction::ServerToClient, &mut hello);
    }
    let mut link = guard.link.clone();
    let mut seen = link.borrow_and_update().gen;
    let mut opened = guard.adapter.id.clone();
    // The session ends itself when cancelled (between whole frames, and
    // never while a port control it started still runs on the port), so the
    // port is closed only once nothing uses its descriptor any more.
    let end = async {
        tokio::select! {
            r = client.sock_w.write_all(&hello) => if let Err(e) = r {
                return (End::Error(e), Some(port));
            },
            _ = guard.cancel.cancelled() => return (End::Cancelled, Some(port)),
        }
        loop {
            guard.set_fd(Some(port::fd(&port)));
            let end = relay(&mut port, &mut client, &guard, &label, &mut link, &opened).await;
            let End::AdapterGone(why) = end else {
                return (end, Some(port));
            };
            if guard.grace.is_zero() {
                guard.set_fd(None);
                return (End::AdapterGone(why), None);
            }
            guard.set_fd(None);
            drop(port);
            let grace = humantime::format_duration(guard.grace);
            info!(tty = %label, "the port failed ({why}); waiting up to {grace} for the adapter to come back");
            let back = tokio::select! {
                r = reopen(&mut link, &mut seen, &guard, &client.line, &label) => r,
                _ = guard.cancel.cancelled() => return (End::Cancelled, None),
            };
            match back {
                Some((p, id)) => (port, opened) = (p, id),
                None => {
                    return (
                        End::AdapterGone(format!(
                            "{why}; the adapter did not come back within {grace}"
                        )),
                        None,
                    )
                }
            }
        }
    };
    let (end, port) = end.await;
    // The state lets go of the port before it is closed or handed back.
    guard.set_fd(None);
    info!(tty = %label, "session ended: {end:?}");
    if client.warnings.suppressed() > 0 {
        warn!(tty = %label, "{} more bad commands from the client were not logged", client.warnings.suppressed());
    }
    if let (End::ClientLeft, Some(port)) = (&end, port) {
        guard.return_port(port);
    }
    drop(guard);
    drop(client);
    crate::memory::release_soon();
    end
}

/// Waits for the adapter to come back (a newer [`Link`](crate::state::Link)
/// with an adapter), opens it and applies the client's line settings.
/// `None` when the grace runs out first. The broker cancels the session
/// when its own grace timer (started by the remove event) runs out; this
/// deadline, started by the port failing, only guards against a port that
/// failed without its adapter ever being removed.
async fn reopen(
    link: &mut watch::Receiver<crate::state::Link>,
    seen: &mut u64,
    guard: &SessionGuard,
    line: &Line,
    label: &str,
) -> Option<(SerialStream, String)> {
    let deadline = tokio::time::Instant::now() + guard.grace + std::time::Duration::from_secs(1);
    loop {
        let adapter = {
            let l = link.borrow_and_update();
            (l.gen > *seen).then(|| l.adapter.clone()).flatten()
        };
        if let Some(a) = adapter {
            *seen = link.borrow().gen;
            // The node may exist a moment before udev gives it its group.
            loop {
                match port::open(&a.device, guard.rate) {
                    Ok(p) => {
                        if let Err(e) = line.apply(p.as_raw_fd()) {
                            warn!(tty = %label, "can't apply the line settings again on {}: {e}", a.device.display());
                        }
                        info!(tty = %label, device = %a.device.display(), "the adapter is back; session resumed with the client's line settings");
                        return Some((p, a.id));
                    }
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        debug!(tty = %label, "can't open {} yet: {e}", a.device.display());
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        if link.has_changed().unwrap_or(false) {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(tty = %label, "can't open {} after it came back: {e}", a.device.display());
                        return None;
                    }
                }
            }
            continue;
        }
        tokio::select! {
            r = link.changed() => if r.is_err() { return None },
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Relays between the client and one port until either ends. Each side
/// stops only between whole frames (the data side between decoded events,
/// the port side between socket writes), so after an adapter failure the
/// stream to the client is intact and the client's unhandled bytes wait in
/// `client` for the next port.
async fn relay(
    port: &mut SerialStream,
    client: &mut Client,
    guard: &SessionGuard,
    label: &str,
    link: &mut watch::Receiver<crate::state::Link>,
    opened: &str,
) -> End {
    let fd = port.as_raw_fd();
    let (mut port_r, mut port_w) = tokio::io::split(port);
    let counters = &guard.counters;
    let capture = guard.capture.as_ref();
    let stop = guard.cancel.child_token();
    let Client {
        sock_r,
        sock_w,
        dec,
        neg,
        buf,
        pos,
        len,
        retry,
        ctl_tx,
        ctl_rx,
        suspend_tx,
        suspend_rx,
        line,
        port_buf,
        esc,
        warnings,
    } = client;

    let up = async {
        // Futures that live for the whole relay: made once, not per read,
        // so the latency path registers no waiters.
        let stopped = stop.cancelled();
        // The adapter was removed (or replaced) while its port still works:
        // a port the kernel did not hang up is stale all the same.
        let removed = async {
            loop {
                if link.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if link
                    .borrow_and_update()
                    .adapter
                    .as_ref()
                    .is_none_or(|a| a.id != opened)
                {
                    return;
                }
            }
        };
        // Cancelled (unplugged past the grace, lease ended, shutdown): a
        // client that doesn't read can't hold the session in a write.
        let aborted = guard.cancel.cancelled();
        tokio::pin!(stopped, removed, aborted);
        loop {
            let suspended = *suspend_rx.borrow();
            tokio::select! {
                biased;
                _ = &mut stopped => return None,
                _ = &mut removed => return Some(End::AdapterGone("the adapter was removed".into())),
                msg = ctl_rx.recv() => match msg {
                    Some(m) => tokio::select! {
                        r = sock_w.write_all(&m) => if let Err(e) = r { return Some(End::Error(e)) },
                        _ = &mut aborted => return None,
                    },
                    None => return Some(End::ClientLeft),
                },
                _ = suspend_rx.changed() => {}
                r = async {
                    let slot = port_buf.slice();
                    let first = slot.len().min(CHUNK / 4);
                    port_r.read(&mut slot[..first]).await
                }, if !suspended => {
                    let mut n = match r {
                        Ok(0) => return Some(End::AdapterGone("end of file".into())),
                        Ok(n) => n,
                        Err(e) => return Some(End::AdapterGone(e.to_string())),
                    };
                    // A tty hands out at most 4 KiB a read: when a read comes
                    // back big, gather what else is there so one socket write
                    // carries it. A short read means the queue was empty: don't
                    // spend a syscall on the latency path.
                    if n >= DRAIN_AFTER {
                        port_buf.grow();
                        n += drain_ready(fd, &mut port_buf.slice()[n..]);
                    }
                    counters.from_board.fetch_add(n as u64, Ordering::Relaxed);
                    let chunk = &port_buf.slice()[..n];
                    if let Some(c) = capture {
                        c.record(chunk);
                    }
                    let out: &[u8] = if telnet::needs_escape(chunk) {
                        esc.clear();
                        telnet::escape_into(chunk, esc);
                        esc
                    } else {
                        chunk
                    };
                    tokio::select! {
                        biased;
                        w = sock_w.write_all(out) => if let Err(e) = w {
                            return Some(End::Error(e));
                        },
                        _ = &mut aborted => return None,
                    }
                    port_buf.filled(n);
                    if port_buf.len() < CHUNK && esc.capacity() > CHUNK {
                        *esc = Vec::new();
                    }
                }
            }
        }
    };

    let down = async {
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        if let Some(d) = retry.take() {
            tokio::select! {
                r = port_w.write_all(&d) => if let Err(e) = r {
                    *retry = Some(d);
                    return Some(End::AdapterGone(e.to_string()));
                },
                _ = &mut stopped => { *retry = Some(d); return None }
            }
            counters
                .to_board
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        loop {
            if *pos >= *len {
                // Everything read before is handled: the buffer may resize.
                buf.filled(*len);
                let r = tokio::select! {
                    biased;
                    _ = &mut stopped => return None,
                    r = sock_r.read(buf.slice()) => r,
                };
                match r {
                    Ok(0) => return Some(End::ClientLeft),
                    Ok(n) => (*pos, *len) = (0, n),
                    Err(e) => return Some(End::Error(e)),
                }
            }
            while *pos < *len {
                if stop.is_cancelled() {
                    return None;
                }
                let (used, ev) = dec.feed(&buf.slice()[*pos..*len]);
                *pos += used;
                match ev {
                    None => {}
                    Some(Event::Data(d)) => {
                        tokio::select! {
                            r = port_w.write_all(d) => if let Err(e) = r {
                                *retry = Some(d.to_vec());
                                return Some(End::AdapterGone(e.to_string()));
                            },
                            _ = &mut stopped => { *retry = Some(d.to_vec()); return None }
                        }
                        counters
                            .to_board
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Some(Event::Negotiate(v, o)) => {
                        if let Some((rv, ro)) = neg.answer(v, o) {
                            let mut out = Vec::new();
                            telnet::negotiate(rv, ro, &mut out);
                            tokio::select! {
                                _ = ctl_tx.send(out) => {}
                                _ = &mut stopped => {}
                            }
                        }
                    }
                    Some(Event::Subnegotiation(OPT_COM_PORT, payload)) => {
                        match Command::decode(&payload) {
                            Ok((Direction::ClientToServer, cmd)) => {
                                line.note(&cmd);
                                // Applied to the end even when stopping: the
                                // port stays open until it is done (a drain
                                // cut short by purging what waits to go out).
                                let applying = apply(fd, cmd, label, suspend_tx, warnings);
                                tokio::pin!(applying);
                                let reply = tokio::select! {
                                    r = &mut applying => r,
                                    _ = &mut stopped => {
                                        let _ = port::purge(fd, wire::rfc2217::purge::TRANSMIT);
                                        applying.await
                                    }
                                };
                                if let Some(reply) = reply {
                                    tokio::select! {
                                        _ = ctl_tx.send(reply.to_bytes(Direction::ServerToClient)) => {}
                                        _ = &mut stopped => {}
                                    }
                                }
                            }
                            Ok((Direction::ServerToClient, cmd)) => {
                                debug!(tty = %label, "ignoring server-side command from client: {cmd:?}")
                            }
                            Err(e) => {
                                if warnings.allow().is_some() {
                                    warn!(tty = %label, "{e}")
                                }
                            }
                        }
                    }
                    Some(Event::Subnegotiation(opt, _)) => {
                        debug!(tty = %label, "ignoring subnegotiation of option {opt}")
                    }
                    Some(Event::Command(_)) => {}
                    Some(Event::Malformed(why)) if warnings.allow().is_some() => {
                        warn!(tty = %label, "client sent a malformed command: {why}")
                    }
                    Some(Event::Malformed(_)) => {}
                }
            }
        }
    };

    let (a, b) = tokio::join!(
        async {
            let e = up.await;
            stop.cancel();
            e
        },
        async {
            let e = down.await;
            stop.cancel();
            e
        }
    );
    // The client leaving outranks the port failing: nobody to resume for.
    match (a, b) {
        (Some(e @ (End::ClientLeft | End::Error(_))), _)
        | (_, Some(e @ (End::ClientLeft | End::Error(_)))) => e,
        (Some(e), _) | (_, Some(e)) => e,
        (None, None) => End::Cancelled,
    }
}

/// Reads what the port has ready now, without waiting, into `buf`.
/// The session owns the descriptor for as long as this may be called.
fn drain_ready(fd: i32, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while buf.len() - got >= 4096 {
        // SAFETY: reading into the unused tail of a valid buffer; a
        // non-blocking descriptor returns EAGAIN when nothing is left.
        let r = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    got
}

/// How a SET-BAUDRATE, SET-DATASIZE, SET-PARITY or SET-STOPSIZE changes the
/// port's settings, and which field of them its reply reports.
type SettingChange = (
    Box<dyn FnOnce(&mut libc::termios2) -> Option<()> + Send>,
    fn(&wire::rfc2217::LineSettings) -> Command,
);

/// The settings change of a command, if it is one. A value of 0 asks for
/// the current value and changes nothing.
fn setting_change(cmd: &Command) -> Option<SettingChange> {
    Some(match *cmd {
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
    })
}

/// Applies a client's command to the port and returns the reply: the value
/// now in force. A settings change waits for what was written before it to
/// go out at the old rate, so it runs off the async threads; the relay
/// awaits it to the end, even when it stops, so the port (and so `fd`) is
/// never closed under it.
async fn apply(
    fd: std::os::fd::RawFd,
    cmd: Command,
    label: &str,
    suspend: &tokio::sync::watch::Sender<bool>,
    warnings: &mut crate::throttle::Throttle,
) -> Option<Command> {
    if let Some((change, report)) = setting_change(&cmd) {
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
