//! Board → client: what the port reads, escaped for telnet where a chunk
//! has an `0xFF`, and the replies the command side queues, in one stream.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};
use wire::buffer::{Elastic, CHUNK, DRAIN_AFTER};
use wire::telnet;

use super::{End, Relay};
use crate::state::Attachment;

/// The client-bound half of a session, kept across the ports a session is
/// relayed to.
pub(super) struct ToClient {
    pub(super) sock: OwnedWriteHalf,
    /// Replies to the client's commands, from [`super::to_board`].
    replies: mpsc::Receiver<Vec<u8>>,
    /// FLOWCONTROL-SUSPEND: stop reading the port.
    suspended: watch::Receiver<bool>,
    /// Reads from the port.
    buf: Elastic,
    /// A chunk with its `0xFF`s doubled.
    esc: Vec<u8>,
}

impl ToClient {
    pub(super) fn new(
        sock: OwnedWriteHalf,
        replies: mpsc::Receiver<Vec<u8>>,
        suspended: watch::Receiver<bool>,
    ) -> ToClient {
        ToClient {
            sock,
            replies,
            suspended,
            buf: Elastic::new(),
            esc: Vec::new(),
        }
    }

    /// Relays until the port fails, the adapter is replaced, the client's
    /// socket fails or the relay stops. It stops only between whole socket
    /// writes, so the stream to the client stays intact for the next port.
    pub(super) async fn run(
        &mut self,
        mut port: impl AsyncRead + Unpin,
        relay: &Relay<'_>,
        attachment: &mut watch::Receiver<Attachment>,
        opened: &str,
    ) -> Option<End> {
        let ToClient {
            sock,
            replies,
            suspended,
            buf,
            esc,
        } = self;
        let fd = relay.fd;
        let counters = &relay.guard.counters;
        let capture = relay.guard.capture.as_ref();
        // Futures that live for the whole relay: made once, not per read,
        // so the latency path registers no waiters.
        let stopped = relay.stop.cancelled();
        // The adapter was removed (or replaced) while its port still works:
        // a port the kernel did not hang up is stale all the same.
        let removed = async {
            loop {
                if attachment.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if attachment
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
        let aborted = relay.guard.cancel.cancelled();
        tokio::pin!(stopped, removed, aborted);
        loop {
            let is_suspended = *suspended.borrow();
            tokio::select! {
                biased;
                _ = &mut stopped => return None,
                _ = &mut removed => return Some(End::AdapterGone("the adapter was removed".into())),
                msg = replies.recv() => match msg {
                    Some(m) => tokio::select! {
                        r = sock.write_all(&m) => if let Err(e) = r { return Some(End::Error(e)) },
                        _ = &mut aborted => return None,
                    },
                    None => return Some(End::ClientLeft),
                },
                _ = suspended.changed() => {}
                r = async {
                    let slot = buf.slice();
                    let first = slot.len().min(CHUNK / 4);
                    port.read(&mut slot[..first]).await
                }, if !is_suspended => {
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
                        buf.grow();
                        n += drain_ready(fd, &mut buf.slice()[n..]);
                    }
                    counters.from_board.fetch_add(n as u64, Ordering::Relaxed);
                    let chunk = &buf.slice()[..n];
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
                        w = sock.write_all(out) => if let Err(e) = w {
                            return Some(End::Error(e));
                        },
                        _ = &mut aborted => return None,
                    }
                    buf.filled(n);
                    buf.fit(esc);
                }
            }
        }
    }
}

/// Reads what the port has ready now, without waiting, into `buf`. Through
/// libc, as the port's other reads go (an emulated adapter sees them).
fn drain_ready(fd: BorrowedFd<'_>, buf: &mut [u8]) -> usize {
    let mut got = 0;
    // A tty read returns at most 4 KiB; stop when less room is left.
    while buf.len() - got >= 4096 {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(n) if n > 0 => got += n,
            // Empty (EAGAIN on the non-blocking port), hung up or failed:
            // the next async read reports what matters.
            _ => break,
        }
    }
    got
}
