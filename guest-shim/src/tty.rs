//! One tty in the guest: its pty, its links, and a session with the broker
//! while a tool has the pty open.
//!
//! The session follows the tool: when a tool opens the pty, devshim connects
//! to the tty's socket (the broker opens the real port, raising DTR and RTS
//! like an open of the real device); when the last tool closes it, devshim
//! drains what the tool wrote, drops DTR/RTS if `HUPCL` is set, and leaves.
//! If the broker ends the session (unplug, refused), the pty is hung up —
//! the tool reads `EIO` — and a fresh pty takes over the links.
//!
//! If instead the broker itself went away (restarted, upgraded, killed), the
//! pty stays open: the tool's writes wait in it, and when the broker is back
//! a new session starts with the line settings the tool has set (read from
//! the pty, as at any session start), DTR and RTS raised as for an open.
//! [`crate::serve`] decides how long to wait (the broker grace) and stops
//! the actor when that runs out.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use inotify::{EventMask, WatchMask};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::buffer::{Elastic, CHUNK, DRAIN_AFTER, SMALL};
use wire::manifest::Entry;
use wire::rfc2217::{control, purge, Command, Direction};
use wire::telnet::{self, DataRun, Decoder, Event, Negotiator, IAC};
use wire::termios;

use crate::linecall::{self, LineReply, LineRequest};
use crate::linesock::{LineCall, Registry};
use crate::pty::{pkt, Pty};
use crate::publish;
use crate::watch::{Watch, Watcher};

/// Everything a tty actor needs to know.
#[derive(Debug, Clone)]
pub struct TtySpec {
    pub entry: Entry,
    pub socket: PathBuf,
    /// The machine's control socket, to ask whether the broker is alive.
    pub control: PathBuf,
    /// Whether devshim is connected to the broker.
    pub broker: tokio::sync::watch::Receiver<crate::serve::BrokerState>,
    pub link_root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Where the line socket finds this tty's pty.
    pub registry: Registry,
    /// devshim's inotify instance, for the pty's opens and closes.
    pub watcher: Watcher,
}

/// The line as a tool on the pty set it through `devshim run`'s supervisor:
/// what a pty can't keep. Lives as long as the pty, as a UART keeps its
/// settings between opens.
#[derive(Debug, Clone, Copy)]
struct LineState {
    dtr: bool,
    rts: bool,
    /// Data size and parity bits of `c_cflag` ([`linecall::FRAMING`]) as the
    /// tool set them, which the pty drops; `None` until it sets any.
    framing: Option<u32>,
}

/// What a session's two directions share for line calls: the calls waiting
/// for the broker's answer to their fence, and the modem inputs it reported.
#[derive(Default)]
struct Fences {
    waiting: Mutex<VecDeque<oneshot::Sender<()>>>,
    /// Set when a fence is added, so a `down` that stopped reading (the tool
    /// isn't reading the pty) reads on to find the answer.
    added: Notify,
    /// The latest NOTIFY-MODEMSTATE (RFC 2217 bits).
    modemstate: AtomicU8,
}

impl Fences {
    /// Appends a fence to `out`: an empty SIGNATURE, which the broker answers
    /// after everything before it has been applied to the port, in order.
    fn add(&self, out: &mut Vec<u8>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().push_back(tx);
        send(Command::Signature(Vec::new()), out);
        self.added.notify_one();
        rx
    }

    fn pending(&self) -> bool {
        !self.waiting.lock().unwrap().is_empty()
    }

    /// The broker answered the oldest fence.
    fn answered(&self) {
        if let Some(tx) = self.waiting.lock().unwrap().pop_front() {
            let _ = tx.send(());
        }
    }
}

/// While a line call waits for the broker, at most this much of what the
/// board sent is kept for a tool that can't read it meanwhile.
const STASH_WHILE_CALLING: usize = 4 * 1024 * 1024;

/// Counts the opens of a pty slave by tools, from inotify events (a watch
/// on devshim's one instance, [`crate::watch`]).
struct OpenWatch {
    watch: Watch,
    count: i64,
}

impl OpenWatch {
    fn new(watcher: &Watcher, path: &Path) -> io::Result<OpenWatch> {
        let watch = watcher.watch(
            path,
            WatchMask::OPEN | WatchMask::CLOSE_WRITE | WatchMask::CLOSE_NOWRITE,
        )?;
        Ok(OpenWatch { watch, count: 0 })
    }

    /// Waits for the next open or close; returns the count of opens after it.
    async fn next(&mut self) -> io::Result<i64> {
        match self.watch.next().await {
            Some(mask) => {
                if mask.contains(EventMask::OPEN) {
                    self.count += 1;
                } else if mask.intersects(EventMask::CLOSE_WRITE | EventMask::CLOSE_NOWRITE) {
                    self.count = (self.count - 1).max(0);
                }
                Ok(self.count)
            }
            None => Err(io::Error::other("the pty's inotify watch ended")),
        }
    }

    async fn wait_open(&mut self) -> io::Result<()> {
        while self.count == 0 {
            self.next().await?;
        }
        Ok(())
    }
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The last tool closed the pty; the pty stays.
    ToolClosed,
    /// devshim is stopping this tty.
    Cancelled,
    /// The broker side ended or refused; the pty must be hung up.
    Hangup(String),
    /// The broker's socket closed or failed: the session ended, or the
    /// broker went away; [`broker_left`] tells which.
    BrokerClosed(String),
}

/// Runs a tty until `cancel`, then removes its links.
pub async fn run(spec: TtySpec, cancel: CancellationToken) {
    let short = spec.entry.short_name();
    let link_paths = publish::paths(&spec.link_root, spec.entry.by_id.as_deref(), &short);
    let owner = Some((spec.uid, spec.gid));
    loop {
        let pty = match Pty::open(spec.entry.rate, spec.uid, spec.gid) {
            Ok(p) => p,
            Err(e) => {
                warn!(tty = %short, "can't make a pty: {e}");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut opens = match OpenWatch::new(&spec.watcher, &pty.path) {
            Ok(w) => w,
            Err(e) => {
                warn!(tty = %short, "can't watch {}: {e}", pty.path.display());
                return;
            }
        };
        // Line calls for this pty (through `devshim run`'s supervisor).
        let (line_tx, mut line_rx) = mpsc::channel::<LineCall>(8);
        let pty_id = pty.id().ok();
        if let Some(id) = pty_id {
            spec.registry.insert(id, line_tx);
        }
        let mut line = LineState {
            dtr: false,
            rts: false,
            framing: None,
        };
        for l in &link_paths {
            if let Err(e) = publish::publish(l, &pty.path, owner) {
                warn!(tty = %short, "can't link {}: {e}", l.display());
            }
        }
        info!(tty = %short, pty = %pty.path.display(), "published {}", link_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
        let end = loop {
            tokio::select! {
                _ = cancel.cancelled() => break SessionEnd::Cancelled,
                r = opens.wait_open() => if let Err(e) = r { break SessionEnd::Hangup(format!("inotify: {e}")) },
            }
            match session(&spec, &pty, &mut opens, &mut line_rx, &mut line, &cancel).await {
                SessionEnd::ToolClosed => debug!(tty = %short, "tool closed the pty"),
                SessionEnd::BrokerClosed(why) => {
                    if !broker_left(&spec).await {
                        break SessionEnd::Hangup(why);
                    }
                    info!(tty = %short, "the broker went away ({why}); keeping {} open until it is back", pty.path.display());
                    tokio::select! {
                        _ = cancel.cancelled() => break SessionEnd::Cancelled,
                        r = broker_back(&spec, &pty, &mut opens) => if let Err(e) = r { break SessionEnd::Hangup(format!("inotify: {e}")) },
                    }
                    info!(tty = %short, "the broker is back; resuming");
                }
                other => break other,
            }
        };
        match end {
            SessionEnd::Cancelled => {
                if let Some(id) = pty_id {
                    spec.registry.remove(id);
                }
                for l in &link_paths {
                    publish::withdraw(l, &pty.path);
                }
                info!(tty = %short, "removed");
                return;
            }
            SessionEnd::Hangup(why) => {
                info!(tty = %short, "hanging up {}: {why}", pty.path.display());
            }
            SessionEnd::ToolClosed | SessionEnd::BrokerClosed(_) => unreachable!(),
        }
        // Dropping the pty hangs up the tool; the next loop renames fresh
        // links over the old ones. Line calls on it now fail with EIO.
        if let Some(id) = pty_id {
            spec.registry.remove(id);
        }
        drop(opens);
        drop(pty);
    }
}

/// After the broker's socket closed: did the broker go away (rather than end
/// this session)? It did if devshim's control connection is down, or if the
/// control socket doesn't answer a hello at once — a broker that is alive
/// answers in a millisecond, one that was killed refuses the connection.
async fn broker_left(spec: &TtySpec) -> bool {
    if !spec.broker.borrow().up {
        return true;
    }
    let probe = crate::serve::connect_control(&spec.control);
    !matches!(
        tokio::time::timeout(Duration::from_millis(500), probe).await,
        Ok(Ok(_))
    )
}

/// Waits until devshim is connected to a broker again and this tty's socket
/// exists (the broker may take a moment to find the adapter, or a lease to
/// be restored), following the tool's opens and closes meanwhile: when the
/// last tool closes, what the board sent that it left unread is dropped, as
/// at any close, not served to the next tool.
async fn broker_back(spec: &TtySpec, pty: &Pty, opens: &mut OpenWatch) -> io::Result<()> {
    let mut broker = spec.broker.clone();
    let left = broker.borrow_and_update().epoch;
    loop {
        let b = *broker.borrow_and_update();
        if b.up && b.epoch > left && spec.socket.exists() {
            return Ok(());
        }
        tokio::select! {
            r = broker.changed() => if r.is_err() { return Err(io::Error::other("devshim is stopping")) },
            r = opens.next() => if r? == 0 {
                if let Err(e) = pty.discard_input() {
                    debug!("can't discard the pty's input: {e}");
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(50)), if b.up => {}
        }
    }
}

/// Whether a socket's pending error is `ECONNRESET` (reading `SO_ERROR`
/// clears it).
fn reset_pending(sock: &std::os::fd::OwnedFd) -> bool {
    nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::SocketError)
        .is_ok_and(|e| e == libc::ECONNRESET)
}

fn send(cmd: Command, out: &mut Vec<u8>) {
    cmd.encode(Direction::ClientToServer, out);
}

async fn session(
    spec: &TtySpec,
    pty: &Pty,
    opens: &mut OpenWatch,
    calls: &mut mpsc::Receiver<LineCall>,
    line: &mut LineState,
    cancel: &CancellationToken,
) -> SessionEnd {
    let sock = match UnixStream::connect(&spec.socket).await {
        Ok(s) => s,
        Err(e) => {
            return SessionEnd::Hangup(format!("can't connect to {}: {e}", spec.socket.display()))
        }
    };
    let (mut rd, mut wr) = sock.into_split();
    let mut neg = Negotiator::client();
    let mut hello = neg.opening();
    let mut last = match pty.termios() {
        Ok(t) => linecall::with_framing(termios::to_settings(&t), line.framing),
        Err(e) => return SessionEnd::Hangup(format!("can't read the pty's settings: {e}")),
    };
    for c in last.commands() {
        send(c, &mut hello);
    }
    // A tool opening a real port raises DTR and RTS.
    send(Command::SetControl(control::DTR_ON), &mut hello);
    send(Command::SetControl(control::RTS_ON), &mut hello);
    (line.dtr, line.rts) = (true, true);
    // Name the tool to the broker (a scan of /proc, off the async threads)
    // in the opening, not later: a name arriving on its own could be all a
    // broker killed at that moment left unread, and the reset it causes
    // would hang the tool up as if its own bytes were lost.
    let path = pty.path.clone();
    if let Ok(Some(tool)) = tokio::task::spawn_blocking(move || crate::tool::find(&path)).await {
        send(Command::Signature(tool.to_bytes()), &mut hello);
    }
    if let Err(e) = wr.write_all(&hello).await {
        return SessionEnd::BrokerClosed(format!("broker socket: {e}"));
    }
    let (ans_tx, mut ans_rx) = mpsc::channel::<Vec<u8>>(16);
    let closing = AtomicBool::new(false);
    // The kernel resets a unix socket (`ECONNRESET`) whose peer went away
    // with bytes it had not read: a broker killed before reading what the
    // tool wrote. Seen on a read, or (after a failed write) in `SO_ERROR`.
    let lost = AtomicBool::new(false);
    // The socket once more, to read its pending error beside the halves.
    let wr_fd = {
        use std::os::fd::AsFd;
        match wr.as_ref().as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return SessionEnd::Hangup(format!("can't use the broker's socket: {e}")),
        }
    };
    let fences = Fences::default();

    let up = async {
        // A pty hands out at most 4 KiB a read; `out` gathers them.
        let mut buf = vec![0u8; SMALL + 1];
        let mut out = Vec::new();
        loop {
            out.clear();
            tokio::select! {
                biased;
                a = ans_rx.recv() => match a {
                    Some(a) => out.extend_from_slice(&a),
                    None => return Ok(SessionEnd::Hangup("session ended".into())),
                },
                r = opens.next() => {
                    if r? > 0 {
                        continue;
                    }
                    // The last tool closed: send what it wrote, then hang up the line.
                    while let Some(n) = pty.try_read_packet(&mut buf)? {
                        if n > 1 && buf[0] == pkt::DATA {
                            telnet::escape_into(&buf[1..n], &mut out);
                        }
                    }
                    if pty.termios().map(|t| t.c_cflag & libc::HUPCL != 0).unwrap_or(true) {
                        send(Command::SetControl(control::DTR_OFF), &mut out);
                        send(Command::SetControl(control::RTS_OFF), &mut out);
                    }
                    wr.write_all(&out).await?;
                    wr.shutdown().await?;
                    closing.store(true, Ordering::Relaxed);
                    return Ok::<SessionEnd, io::Error>(SessionEnd::ToolClosed);
                }
                c = calls.recv() => {
                    let Some(c) = c else { continue };
                    match line_call(c.req, pty, &mut buf, &mut out, &mut last, line, &fences, &mut wr).await {
                        Ok(reply) => { let _ = c.reply.send(reply); }
                        Err(e) => {
                            let _ = c.reply.send(LineReply { errno: libc::EIO, why: Some(e.to_string()), ..LineReply::default() });
                            return Ok(SessionEnd::BrokerClosed(format!("broker socket: {e}")));
                        }
                    }
                }
                r = pty.read_packet(&mut buf) => {
                    let n = r?;
                    if n == 0 {
                        continue;
                    }
                    let status = buf[0];
                    if status != pkt::DATA {
                        handle_status(status, pty, &mut buf, &mut out, &mut last, line.framing)?;
                    } else {
                        telnet::escape_into(&buf[1..n], &mut out);
                        // A pty hands out at most 4 KiB a read: gather what is
                        // already there so one socket write carries it. A status
                        // byte among it is handled in order.
                        while n > DRAIN_AFTER && out.len() < CHUNK {
                            match pty.try_read_packet(&mut buf)? {
                                Some(m) if m > 1 && buf[0] == pkt::DATA => telnet::escape_into(&buf[1..m], &mut out),
                                Some(m) if m >= 1 && buf[0] != pkt::DATA => {
                                    handle_status(buf[0], pty, &mut buf, &mut out, &mut last, line.framing)?;
                                    break;
                                }
                                _ => break,
                            }
                        }
                    }
                }
            }
            if !out.is_empty() {
                if let Err(e) = wr.write_all(&out).await {
                    if reset_pending(&wr_fd) {
                        lost.store(true, Ordering::Relaxed);
                    }
                    return Ok(SessionEnd::BrokerClosed(format!("broker socket: {e}")));
                }
            }
        }
    };

    let down = async {
        let mut buf = Elastic::new();
        let mut last = 0;
        let mut dec = Decoder::new();
        // Where data cut by escaped 0xFFs is joined for one write.
        let mut gather: Vec<u8> = Vec::new();
        let mut accepted = false;
        // What the tool has not taken yet. Normally the pty's own queue is
        // the only buffer (a tool that doesn't read stops the broker), but
        // while a line call waits for the broker's answer, the answer must
        // be read past what the board sent meanwhile: the tool can't read
        // it, it is blocked in the call.
        let mut stash: Vec<u8> = Vec::new();
        loop {
            // What was read last is handled: the buffer may resize, and
            // the join buffer with it.
            buf.filled(std::mem::take(&mut last));
            buf.fit(&mut gather);
            let readable = if fences.pending() {
                stash.len() < STASH_WHILE_CALLING
            } else {
                stash.is_empty()
            };
            let n = tokio::select! {
                biased;
                r = pty.write_some(&stash), if !stash.is_empty() => {
                    stash.drain(..r?);
                    continue;
                }
                _ = fences.added.notified(), if !readable => continue,
                r = rd.read(buf.slice()), if readable => match r {
                    Ok(n) => n,
                    Err(e) => {
                        if e.kind() == io::ErrorKind::ConnectionReset {
                            lost.store(true, Ordering::Relaxed);
                        }
                        return Ok(SessionEnd::BrokerClosed(format!("broker socket: {e}")));
                    }
                },
            };
            last = n;
            let buf = &buf.slice()[..n];
            if n == 0 {
                return Ok::<SessionEnd, io::Error>(SessionEnd::BrokerClosed(
                    "the broker ended the session".into(),
                ));
            }
            if !accepted {
                if buf[0] != IAC {
                    // A refusal is a line of text, then close.
                    let mut text = buf[..n].to_vec();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        (&mut rd).take(4096).read_to_end(&mut text),
                    )
                    .await;
                    return Ok(SessionEnd::Hangup(
                        String::from_utf8_lossy(&text).trim().to_string(),
                    ));
                }
                accepted = true;
            }
            let mut pos = 0;
            while pos < n {
                // The data up to the next command, in one write however
                // many escaped 0xFF cut it.
                let mut run = DataRun::new(&mut gather);
                let (used, ev) = dec.feed_run(&buf[pos..n], &mut run);
                pos += used;
                let d = run.bytes();
                if !d.is_empty() && !closing.load(Ordering::Relaxed) {
                    if stash.is_empty() && !fences.pending() {
                        pty.write_all(d).await?
                    } else {
                        let w = if stash.is_empty() {
                            pty.try_write(d)?
                        } else {
                            0
                        };
                        stash.extend_from_slice(&d[w..]);
                    }
                }
                match ev {
                    Some(Event::Negotiate(v, o)) => {
                        if let Some((rv, ro)) = neg.answer(v, o) {
                            let mut a = Vec::new();
                            telnet::negotiate(rv, ro, &mut a);
                            let _ = ans_tx.send(a).await;
                        }
                    }
                    Some(Event::Subnegotiation(telnet::OPT_COM_PORT, payload)) => {
                        match Command::decode(&payload) {
                            Ok((Direction::ServerToClient, Command::Signature(_))) => {
                                fences.answered()
                            }
                            Ok((Direction::ServerToClient, Command::NotifyModemState(m))) => {
                                fences.modemstate.store(m, Ordering::Relaxed)
                            }
                            _ => {}
                        }
                    }
                    Some(Event::Malformed(why)) => warn!("broker sent a malformed command: {why}"),
                    _ => {}
                }
            }
        }
    };

    tokio::pin!(up);
    tokio::pin!(down);
    let end = tokio::select! {
        r = &mut up => r.unwrap_or_else(|e| SessionEnd::Hangup(e.to_string())),
        r = &mut down => r.unwrap_or_else(|e| SessionEnd::Hangup(e.to_string())),
        _ = cancel.cancelled() => SessionEnd::Cancelled,
    };
    // Bytes the tool wrote that the broker never read went with it: the
    // tool must not go on as if they reached the board, so it is hung up
    // (it reads EIO) instead of kept for the broker's return.
    let end = match end {
        SessionEnd::BrokerClosed(why) if lost.load(Ordering::Relaxed) || reset_pending(&wr_fd) => {
            SessionEnd::Hangup(format!(
                "{why}; the broker went away before reading what the tool wrote last, so the tool is told"
            ))
        }
        other => other,
    };
    if let SessionEnd::ToolClosed = end {
        // Let the broker close the port before another session may start.
        // What the board sent for the tool that left is not for the next
        // one: drop it, again and again while `down` still writes (a pty
        // nobody reads would block it until the timeout), and once more after.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            if let Err(e) = pty.discard_input() {
                debug!("can't discard the pty's input: {e}");
            }
            let step = (tokio::time::Instant::now() + Duration::from_millis(20)).min(deadline);
            if tokio::time::timeout_at(step, &mut down).await.is_ok() || step >= deadline {
                break;
            }
        }
        if let Err(e) = pty.discard_input() {
            debug!("can't discard the pty's input: {e}");
        }
    }
    end
}

/// Handles a packet-mode status byte: flushes become PURGE-DATA; a settings
/// change is sent after the data the tool wrote before it.
fn handle_status(
    status: u8,
    pty: &Pty,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    last: &mut wire::rfc2217::LineSettings,
    framing: Option<u32>,
) -> io::Result<()> {
    if status & pkt::FLUSHREAD != 0 {
        send(Command::PurgeData(purge::RECEIVE), out);
    }
    if status & pkt::FLUSHWRITE != 0 {
        send(Command::PurgeData(purge::TRANSMIT), out);
    }
    if status & pkt::IOCTL != 0 {
        // The status byte overtakes data written before the change: send
        // that data first, so it goes out at the old rate. Flushes among it
        // are handled in order; further changes are the one sent below.
        move_written(
            pty,
            buf,
            out,
            last,
            framing,
            pkt::FLUSHREAD | pkt::FLUSHWRITE,
        )?;
        pty.ensure_extproc()?;
        settings_changed(pty, out, last, framing)?;
    }
    Ok(())
}

/// Sends what changed between `last` and the pty's settings now (with the
/// tool's data size and parity, which the pty dropped).
fn settings_changed(
    pty: &Pty,
    out: &mut Vec<u8>,
    last: &mut wire::rfc2217::LineSettings,
    framing: Option<u32>,
) -> io::Result<()> {
    let now = linecall::with_framing(termios::to_settings(&pty.termios()?), framing);
    for c in last.changes_to(&now) {
        debug!("tool changed the line: {c:?}");
        send(c, out);
    }
    *last = now;
    Ok(())
}

/// Moves what the tool wrote so far (and the settings changes among it)
/// from the pty into `out`: a line call acts after the bytes before it.
fn drain_pty(
    pty: &Pty,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    last: &mut wire::rfc2217::LineSettings,
    framing: Option<u32>,
) -> io::Result<()> {
    move_written(pty, buf, out, last, framing, u8::MAX)
}

/// Moves what waits in the pty into `out`: data, and the status bytes
/// among it, handled with their `statuses` bits only (others are dropped).
fn move_written(
    pty: &Pty,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    last: &mut wire::rfc2217::LineSettings,
    framing: Option<u32>,
    statuses: u8,
) -> io::Result<()> {
    while let Some(n) = pty.try_read_packet(buf)? {
        if n > 1 && buf[0] == pkt::DATA {
            telnet::escape_into(&buf[1..n], out);
        } else if n >= 1 && buf[0] & statuses != 0 {
            handle_status(buf[0] & statuses, pty, buf, out, last, framing)?;
        }
    }
    Ok(())
}

/// Carries out one line call: the bytes the tool wrote before it, then the
/// RFC 2217 commands, then a fence; answers once the broker has applied
/// them all to the port. An error is the broker's socket failing.
#[allow(clippy::too_many_arguments)]
async fn line_call(
    req: LineRequest,
    pty: &Pty,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    last: &mut wire::rfc2217::LineSettings,
    line: &mut LineState,
    fences: &Fences,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
) -> io::Result<LineReply> {
    // Sends `out` with a fence and waits for the broker's answer to it.
    async fn applied(
        out: &mut Vec<u8>,
        fences: &Fences,
        wr: &mut tokio::net::unix::OwnedWriteHalf,
    ) -> io::Result<()> {
        let done = fences.add(out);
        wr.write_all(out).await?;
        out.clear();
        done.await
            .map_err(|_| io::Error::other("the session ended"))
    }
    out.clear();
    // Anyone may send requests (the line socket is 0666): those no tool's
    // call makes are refused before anything is done.
    if let LineRequest::TimedBreak { ms } = req {
        if ms > linecall::MAX_BREAK_MS {
            return Ok(invalid(format!(
                "a {ms} ms break (at most {} ms)",
                linecall::MAX_BREAK_MS
            )));
        }
    }
    if let LineRequest::GetTermios { req } = req {
        // Nothing for the port: the pty's settings, with the tool's framing.
        let Some(layout) = termios::Layout::of_get(req) else {
            return Ok(invalid(format!("{req:#x} is not a termios read")));
        };
        let mut t = match pty.slave_termios(layout) {
            Ok(t) => t,
            Err(e) => return Ok(errno_reply(&e)),
        };
        if let Some(c) = linecall::cflag_of(&t) {
            linecall::set_cflag(&mut t, linecall::patch_cflag(c, line.framing));
        }
        return Ok(LineReply {
            termios: Some(t),
            ..reply(line, fences)
        });
    }
    drain_pty(pty, buf, out, last, line.framing)?;
    let onoff = |on: bool| if on { "on" } else { "off" };
    match req {
        LineRequest::GetModem => {
            // The broker answers with the port's modem state now.
            send(Command::NotifyModemState(0), out);
            applied(out, fences, wr).await?;
        }
        LineRequest::Modem { op, bits } => {
            let ((dtr, rts), (named_dtr, named_rts)) =
                linecall::modem_change(op, bits, line.dtr, line.rts);
            let dtr_cmd = named_dtr.then_some(if dtr {
                control::DTR_ON
            } else {
                control::DTR_OFF
            });
            let rts_cmd = named_rts.then_some(if rts {
                control::RTS_ON
            } else {
                control::RTS_OFF
            });
            let order = if linecall::rts_first((line.dtr, line.rts), (dtr, rts)) {
                [rts_cmd, dtr_cmd]
            } else {
                [dtr_cmd, rts_cmd]
            };
            for c in order.into_iter().flatten() {
                send(Command::SetControl(c), out);
            }
            debug!("tool set DTR {} RTS {}", onoff(dtr), onoff(rts));
            (line.dtr, line.rts) = (dtr, rts);
            applied(out, fences, wr).await?;
        }
        LineRequest::Break { on } => {
            debug!("tool set break {}", onoff(on));
            send(
                Command::SetControl(if on {
                    control::BREAK_ON
                } else {
                    control::BREAK_OFF
                }),
                out,
            );
            applied(out, fences, wr).await?;
        }
        LineRequest::TimedBreak { ms } => {
            debug!("tool sent a {ms} ms break");
            send(Command::SetControl(control::BREAK_ON), out);
            applied(out, fences, wr).await?;
            tokio::time::sleep(Duration::from_millis(ms.into())).await;
            send(Command::SetControl(control::BREAK_OFF), out);
            applied(out, fences, wr).await?;
        }
        LineRequest::Drain => applied(out, fences, wr).await?,
        LineRequest::SetTermios { req, termios } => {
            // What the tool wrote is out of the pty: a drain has nothing
            // left to wait for.
            let Some((layout, flush)) =
                linecall::set_after_drain(req).filter(|(layout, _)| termios.len() >= layout.size())
            else {
                return Ok(errno_reply(&io::Error::from_raw_os_error(libc::EINVAL)));
            };
            if flush {
                pty.flush_input_as_tool()?;
            }
            if let Err(e) = pty.set_slave_termios(layout, &termios) {
                return Ok(errno_reply(&e));
            }
            line.framing = linecall::cflag_of(&termios).map(|c| c & linecall::FRAMING);
            pty.ensure_extproc()?;
            // The status bytes the change made, then whatever changed.
            drain_pty(pty, buf, out, last, line.framing)?;
            settings_changed(pty, out, last, line.framing)?;
            applied(out, fences, wr).await?;
        }
        LineRequest::GetTermios { .. } => unreachable!("answered above"),
    }
    Ok(reply(line, fences))
}

/// The reply to a call that went through: the modem bits now.
fn reply(line: &LineState, fences: &Fences) -> LineReply {
    let ms = fences.modemstate.load(Ordering::Relaxed);
    LineReply {
        errno: 0,
        modem: linecall::modem_bits(line.dtr, line.rts, ms),
        termios: None,
        why: None,
    }
}

/// The reply to a request no tool's call makes.
fn invalid(why: String) -> LineReply {
    LineReply {
        errno: libc::EINVAL,
        why: Some(why),
        ..LineReply::default()
    }
}

/// The reply to a call the pty refused, with the kernel's errno.
fn errno_reply(e: &io::Error) -> LineReply {
    LineReply {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
        why: Some(e.to_string()),
        ..LineReply::default()
    }
}
