//! One client's session on one tty: RFC 2217 over a unix socket on one side,
//! the real port on the other.
//!
//! Both directions run in one task, each in its own file:
//! [`to_board`] handles the client's data and commands strictly in arrival
//! order, [`to_client`] relays what the board prints and the replies;
//! [`command`] applies a command to the port.
//!
//! A board with a re-enumeration grace may lose its port mid-session: the
//! session keeps the client, waits for the adapter to come back, opens the
//! new port with the client's line settings and carries on.

mod command;
mod to_board;
mod to_client;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::rfc2217::{Command, Direction};
use wire::telnet::Negotiator;

use crate::line::Line;
use crate::port;
use crate::state::{Attachment, SessionGuard};
use to_board::ToBoard;
use to_client::ToClient;

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    ClientLeft,
    AdapterGone(String),
    Cancelled,
    Error(io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::ClientLeft => write!(f, "the client left"),
            End::AdapterGone(why) => write!(f, "the adapter went away ({why})"),
            End::Cancelled => write!(
                f,
                "ended by the broker (lease over, board gone past its grace, or shutdown)"
            ),
            End::Error(e) => write!(f, "the client's socket failed: {e}"),
        }
    }
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
/// client must not notice.
struct Client {
    to_client: ToClient,
    to_board: ToBoard,
}

/// What both directions of one relay (one client, one port) share.
struct Relay<'a> {
    /// The port's own descriptor, for controls beside the async stream
    /// that carries its data (not a duplicate: an emulated adapter answers
    /// ioctls only on the descriptor it was opened as).
    fd: BorrowedFd<'a>,
    guard: &'a SessionGuard,
    label: &'a str,
    /// Either direction ending stops the other.
    stop: CancellationToken,
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
    let (replies_tx, replies_rx) = mpsc::channel::<Vec<u8>>(64);
    let (suspend_tx, suspend_rx) = watch::channel(false);
    let mut neg = Negotiator::server();
    let mut hello = neg.opening();
    let mut client = Client {
        to_client: ToClient::new(sock_w, replies_rx, suspend_rx),
        to_board: ToBoard::new(sock_r, neg, replies_tx, suspend_tx),
    };
    if let Some(ms) = port::modem_state(port::fd(&port)) {
        Command::NotifyModemState(ms).encode(Direction::ServerToClient, &mut hello);
    }
    let mut attachment = guard.attachment.clone();
    let mut seen = attachment.borrow_and_update().gen;
    let mut opened = guard.adapter.id.clone();
    // The session ends itself when cancelled (between whole frames, and
    // never while a port control it started still runs on the port), so the
    // port is closed only once nothing uses its descriptor any more.
    let end = async {
        tokio::select! {
            r = client.to_client.sock.write_all(&hello) => if let Err(e) = r {
                return (End::Error(e), Some(port));
            },
            _ = guard.cancel.cancelled() => return (End::Cancelled, Some(port)),
        }
        loop {
            let end = relay(
                &mut port,
                &mut client,
                &guard,
                &label,
                &mut attachment,
                &opened,
            )
            .await;
            let End::AdapterGone(why) = end else {
                return (end, Some(port));
            };
            if guard.grace.is_zero() {
                return (End::AdapterGone(why), None);
            }
            drop(port);
            let grace = humantime::format_duration(guard.grace);
            info!(tty = %label, "the port failed ({why}); waiting up to {grace} for the adapter to come back");
            let back = tokio::select! {
                r = reopen(&mut attachment, &mut seen, &guard, &client.to_board.commands().line, &label) => r,
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
    info!(tty = %label, "session ended: {end}");
    let suppressed = client.to_board.commands().warnings.suppressed();
    if suppressed > 0 {
        warn!(tty = %label, "{suppressed} more bad commands from the client were not logged");
    }
    if let (End::ClientLeft, Some(port)) = (&end, port) {
        guard.return_port(port);
    }
    drop(guard);
    drop(client);
    crate::memory::release_soon();
    end
}

/// Waits for the adapter to come back (a newer [`Attachment`](crate::state::Attachment)
/// with an adapter), opens it and applies the client's line settings.
/// `None` when the grace runs out first. The broker cancels the session
/// when its own grace timer (started by the remove event) runs out; this
/// deadline, started by the port failing, only guards against a port that
/// failed without its adapter ever being removed.
async fn reopen(
    attachment: &mut watch::Receiver<crate::state::Attachment>,
    seen: &mut u64,
    guard: &SessionGuard,
    line: &Line,
    label: &str,
) -> Option<(SerialStream, String)> {
    let deadline = tokio::time::Instant::now() + guard.grace + std::time::Duration::from_secs(1);
    loop {
        let adapter = {
            let l = attachment.borrow_and_update();
            (l.gen > *seen).then(|| l.adapter.clone()).flatten()
        };
        if let Some(a) = adapter {
            *seen = attachment.borrow().gen;
            // The node may exist a moment before udev gives it its group.
            loop {
                match port::open(&a.device, guard.rate) {
                    Ok(p) => {
                        if let Err(e) = line.apply(port::fd(&p)) {
                            warn!(tty = %label, "can't apply the line settings again on {}: {e}", a.device.display());
                        }
                        info!(tty = %label, device = %a.device.display(), "the adapter is back; session resumed with the client's line settings");
                        return Some((p, a.id));
                    }
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        debug!(tty = %label, "can't open {} yet: {e}", a.device.display());
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        if attachment.has_changed().unwrap_or(false) {
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
            r = attachment.changed() => if r.is_err() { return None },
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Relays between the client and one port until either ends. Each side
/// stops only between whole frames, so after an adapter failure the stream
/// to the client is intact and the client's unhandled bytes wait in
/// `client` for the next port. The state holds the port (for sequences and
/// `status`) only while this runs: it lets go before the port is closed or
/// handed back.
async fn relay(
    port: &mut SerialStream,
    client: &mut Client,
    guard: &SessionGuard,
    label: &str,
    attachment: &mut watch::Receiver<Attachment>,
    opened: &str,
) -> End {
    guard.set_fd(Some(port::fd(port)));
    // SAFETY: `port` is borrowed for the whole relay, which `fd` does not
    // outlive (a control on the blocking pool is waited for: `JobGuard`);
    // the stream's halves below only read and write through it.
    let fd = unsafe { BorrowedFd::borrow_raw(port.as_raw_fd()) };
    let relay = Relay {
        fd,
        guard,
        label,
        stop: guard.cancel.child_token(),
    };
    let (port_r, port_w) = tokio::io::split(port);
    let Client {
        to_client,
        to_board,
    } = client;
    let (a, b) = tokio::join!(
        async {
            let e = to_client.run(port_r, &relay, attachment, opened).await;
            relay.stop.cancel();
            e
        },
        async {
            let e = to_board.run(port_w, &relay).await;
            relay.stop.cancel();
            e
        }
    );
    guard.set_fd(None);
    // The client leaving outranks the port failing: nobody to resume for.
    match (a, b) {
        (Some(e @ (End::ClientLeft | End::Error(_))), _)
        | (_, Some(e @ (End::ClientLeft | End::Error(_)))) => e,
        (Some(e), _) | (_, Some(e)) => e,
        (None, None) => End::Cancelled,
    }
}
