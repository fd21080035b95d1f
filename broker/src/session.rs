//! One client's session on one tty: RFC 2217 over a unix socket on one side,
//! the real port on the other.
//!
//! Both directions run in one task. Socket → port handles data and commands
//! strictly in arrival order, so bytes a tool wrote before a baud change are
//! written — and drained at the old rate — before the change is applied.
//! Port → socket escapes `0xFF` only when a chunk has one.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use wire::rfc2217::{control, Command, Direction};
use wire::telnet::{self, Decoder, Event, Negotiator, OPT_COM_PORT};
use wire::termios::{self, When};

use crate::port;
use crate::state::SessionGuard;

/// Size of each read from the port and from the socket.
pub const CHUNK: usize = 64 * 1024;

/// A read at least this big suggests a stream: look for more before writing.
pub const DRAIN_AFTER: usize = 1024;

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

/// Runs a session until the client leaves, the adapter goes or it is cancelled.
pub async fn run(sock: UnixStream, guard: SessionGuard, label: String) -> End {
    let rate = guard.rate;
    // A console captured `always` is already open: take it over as it is.
    let drained = guard.take_drained().await;
    let port = match drained.map_or_else(|| port::open(&guard.adapter.device, rate), Ok) {
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
    let fd = port.as_raw_fd();
    guard.set_fd(fd);
    info!(tty = %label, device = %guard.adapter.device.display(), "session started");
    let (mut port_r, mut port_w) = tokio::io::split(port);
    let (mut sock_r, mut sock_w) = sock.into_split();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut neg = Negotiator::server();
    let mut hello = neg.opening();
    if let Some(ms) = port::modem_state(fd) {
        Command::NotifyModemState(ms).encode(Direction::ServerToClient, &mut hello);
    }
    let counters = guard.counters.clone();
    let capture = guard.capture.clone();
    let (suspend_tx, mut suspend_rx) = tokio::sync::watch::channel(false);

    let up = async {
        sock_w.write_all(&hello).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut esc = Vec::new();
        loop {
            let suspended = *suspend_rx.borrow();
            tokio::select! {
                biased;
                msg = ctl_rx.recv() => match msg {
                    Some(m) => sock_w.write_all(&m).await?,
                    None => return Ok(End::ClientLeft),
                },
                _ = suspend_rx.changed() => {}
                r = port_r.read(&mut buf[..CHUNK / 4]), if !suspended => {
                    let mut n = match r {
                        Ok(0) => return Ok(End::AdapterGone("end of file".into())),
                        Ok(n) => n,
                        Err(e) => return Ok(End::AdapterGone(e.to_string())),
                    };
                    // A tty hands out at most 4 KiB a read: when a read comes
                    // back big, gather what else is there so one socket write
                    // carries it. A short read means the queue was empty: don't
                    // spend a syscall on the latency path.
                    if n >= DRAIN_AFTER {
                        n += drain_ready(fd, &mut buf[n..]);
                    }
                    counters.from_board.fetch_add(n as u64, Ordering::Relaxed);
                    let chunk = &buf[..n];
                    if let Some(c) = &capture {
                        c.record(chunk);
                    }
                    if telnet::needs_escape(chunk) {
                        esc.clear();
                        telnet::escape_into(chunk, &mut esc);
                        sock_w.write_all(&esc).await?;
                    } else {
                        sock_w.write_all(chunk).await?;
                    }
                }
            }
        }
    };

    let down = async {
        let mut buf = vec![0u8; CHUNK];
        let mut dec = Decoder::new();
        loop {
            let n = sock_r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<End, io::Error>(End::ClientLeft);
            }
            let mut pos = 0;
            while pos < n {
                let (used, ev) = dec.feed(&buf[pos..n]);
                pos += used;
                match ev {
                    None => {}
                    Some(Event::Data(d)) => {
                        if let Err(e) = port_w.write_all(d).await {
                            return Ok(End::AdapterGone(e.to_string()));
                        }
                        counters
                            .to_board
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Some(Event::Negotiate(v, o)) => {
                        if let Some((rv, ro)) = neg.answer(v, o) {
                            let mut out = Vec::new();
                            telnet::negotiate(rv, ro, &mut out);
                            let _ = ctl_tx.send(out).await;
                        }
                    }
                    Some(Event::Subnegotiation(OPT_COM_PORT, payload)) => {
                        match Command::decode(&payload) {
                            Ok((Direction::ClientToServer, cmd)) => {
                                if let Err(e) = port_w.flush().await {
                                    return Ok(End::AdapterGone(e.to_string()));
                                }
                                if let Some(reply) = apply(fd, cmd, &label, &suspend_tx).await {
                                    let _ = ctl_tx
                                        .send(reply.to_bytes(Direction::ServerToClient))
                                        .await;
                                }
                            }
                            Ok((Direction::ServerToClient, cmd)) => {
                                debug!(tty = %label, "ignoring server-side command from client: {cmd:?}")
                            }
                            Err(e) => warn!(tty = %label, "{e}"),
                        }
                    }
                    Some(Event::Subnegotiation(opt, _)) => {
                        debug!(tty = %label, "ignoring subnegotiation of option {opt}")
                    }
                    Some(Event::Command(_)) => {}
                    Some(Event::Malformed(why)) => {
                        warn!(tty = %label, "client sent a malformed command: {why}")
                    }
                }
            }
        }
    };

    let end = tokio::select! {
        r = up => r.unwrap_or_else(End::Error),
        r = down => r.unwrap_or_else(End::Error),
        _ = guard.cancel.cancelled() => End::Cancelled,
    };
    info!(tty = %label, "session ended: {end:?}");
    if matches!(end, End::ClientLeft) {
        guard.return_port(port_r.unsplit(port_w));
    }
    drop(guard);
    end
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

/// Applies a client's command to the port and returns the reply: the value
/// now in force. Commands that could block (a drain before a baud change)
/// run off the async threads.
async fn apply(
    fd: i32,
    cmd: Command,
    label: &str,
    suspend: &tokio::sync::watch::Sender<bool>,
) -> Option<Command> {
    let blocking = |f: Box<dyn FnOnce() -> io::Result<Command> + Send>| {
        let label = label.to_string();
        async move {
            match tokio::task::spawn_blocking(f).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    warn!(tty = %label, "port control failed: {e}");
                    None
                }
                Err(_) => None,
            }
        }
    };
    // Reads the port's settings after an optional change, reporting one field.
    fn settings_cmd(
        fd: i32,
        change: impl FnOnce(&mut libc::termios2) -> Option<()>,
        when: When,
        report: fn(&wire::rfc2217::LineSettings) -> Command,
    ) -> io::Result<Command> {
        let mut t = termios::get(fd)?;
        if change(&mut t).is_some() {
            termios::set(fd, &t, when)?;
            t = termios::get(fd)?;
        }
        Ok(report(&termios::to_settings(&t)))
    }
    match cmd {
        Command::SetBaudRate(b) => {
            blocking(Box::new(move || {
                settings_cmd(
                    fd,
                    |t| (b != 0).then(|| termios::set_baud(t, b)),
                    When::AfterDrain,
                    |s| Command::SetBaudRate(s.baud),
                )
            }))
            .await
        }
        Command::SetDataSize(v) => {
            blocking(Box::new(move || {
                settings_cmd(
                    fd,
                    |t| termios::set_data_size(t, v),
                    When::AfterDrain,
                    |s| Command::SetDataSize(s.data_size),
                )
            }))
            .await
        }
        Command::SetParity(v) => {
            blocking(Box::new(move || {
                settings_cmd(
                    fd,
                    |t| termios::set_parity(t, v),
                    When::AfterDrain,
                    |s| Command::SetParity(s.parity),
                )
            }))
            .await
        }
        Command::SetStopSize(v) => {
            blocking(Box::new(move || {
                settings_cmd(
                    fd,
                    |t| termios::set_stop_size(t, v),
                    When::AfterDrain,
                    |s| Command::SetStopSize(s.stop_size),
                )
            }))
            .await
        }
        Command::SetControl(v) => match port::set_control(fd, v) {
            Ok(r) => Some(Command::SetControl(r)),
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
                warn!(tty = %label, "{e}");
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
        Command::NotifyLineState(_) | Command::NotifyModemState(_) => None,
    }
}
