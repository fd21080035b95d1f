//! Client → board: the client's bytes and commands, strictly in arrival
//! order, so bytes a tool wrote before a baud change are written — and
//! drained at the old rate — before the change is applied.

use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};
use wire::buffer::Elastic;
use wire::rfc2217::{Command, Direction};
use wire::telnet::{self, DataRun, Decoder, Event, Negotiator, OPT_COM_PORT};

use super::command;
use super::{End, Relay};
use crate::line::Line;
use crate::throttle::Throttle;

/// The board-bound half of a session, kept across the ports a session is
/// relayed to: whatever was read from the client and not yet handled stays
/// here, so no byte and no command is lost when the port changes.
pub(super) struct ToBoard {
    input: Input,
    /// Data the old port refused, for the new one.
    retry: Option<Vec<u8>>,
    /// The command decoded after `retry`'s data: handled once it is written.
    pending: Option<Event<'static>>,
    commands: Commands,
    /// Where data cut by escaped 0xFFs is joined for one write.
    gather: Vec<u8>,
}

/// What was read from the client and how far it is handled.
struct Input {
    sock: OwnedReadHalf,
    dec: Decoder,
    /// `buf[pos..len]` is not handled yet.
    buf: Elastic,
    pos: usize,
    len: usize,
}

/// What handles the client's telnet and RFC 2217 commands.
pub(super) struct Commands {
    neg: Negotiator,
    /// Replies to the client, through [`super::to_client`].
    replies: mpsc::Sender<Vec<u8>>,
    /// FLOWCONTROL-SUSPEND and -RESUME, for [`super::to_client`].
    suspend: watch::Sender<bool>,
    /// What the client asked of the line, for a port that comes back.
    pub(super) line: Line,
    /// Warnings the client's bad commands may cause in the log.
    pub(super) warnings: Throttle,
}

impl ToBoard {
    pub(super) fn new(
        sock: OwnedReadHalf,
        neg: Negotiator,
        replies: mpsc::Sender<Vec<u8>>,
        suspend: watch::Sender<bool>,
    ) -> ToBoard {
        ToBoard {
            input: Input {
                sock,
                dec: Decoder::new(),
                buf: Elastic::new(),
                pos: 0,
                len: 0,
            },
            retry: None,
            pending: None,
            gather: Vec::new(),
            commands: Commands {
                neg,
                replies,
                suspend,
                line: Line::default(),
                warnings: Throttle::per_connection(crate::limits::WARNINGS_PER_CONNECTION),
            },
        }
    }

    pub(super) fn commands(&self) -> &Commands {
        &self.commands
    }

    /// Relays until the client leaves, the port fails or the relay stops.
    /// It stops only between decoded events; data the port refused is kept
    /// for the next port.
    pub(super) async fn run(
        &mut self,
        mut port: impl AsyncWrite + Unpin,
        relay: &Relay<'_>,
    ) -> Option<End> {
        let ToBoard {
            input,
            retry,
            pending,
            commands,
            gather,
        } = self;
        let counters = &relay.guard.counters;
        let stopped = relay.stop.cancelled();
        tokio::pin!(stopped);
        if let Some(d) = retry.take() {
            tokio::select! {
                r = port.write_all(&d) => if let Err(e) = r {
                    *retry = Some(d);
                    return Some(End::AdapterGone(e.to_string()));
                },
                _ = &mut stopped => { *retry = Some(d); return None }
            }
            counters
                .to_board
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        if let Some(ev) = pending.take() {
            commands.handle(ev, relay, &mut stopped).await;
        }
        let Input {
            sock,
            dec,
            buf,
            pos,
            len,
        } = input;
        loop {
            if *pos >= *len {
                // Everything read before is handled: the buffer may resize.
                buf.filled(*len);
                let r = tokio::select! {
                    biased;
                    _ = &mut stopped => return None,
                    r = sock.read(buf.slice()) => r,
                };
                match r {
                    Ok(0) => return Some(End::ClientLeft),
                    Ok(n) => (*pos, *len) = (0, n),
                    Err(e) => return Some(End::Error(e)),
                }
            }
            while *pos < *len {
                if relay.stop.is_cancelled() {
                    return None;
                }
                // The data up to the next command, in one write however
                // many escaped 0xFF cut it.
                let bytes = &buf.slice()[..*len];
                let mut run = DataRun::new(gather);
                let (used, ev) = dec.feed_run(&bytes[*pos..], &mut run);
                *pos += used;
                let d = run.bytes();
                if !d.is_empty() {
                    // Cut short, the data and the command after it wait
                    // for the next port, in this order.
                    tokio::select! {
                        r = port.write_all(d) => if let Err(e) = r {
                            *retry = Some(d.to_vec());
                            *pending = ev.and_then(Event::detached);
                            return Some(End::AdapterGone(e.to_string()));
                        },
                        _ = &mut stopped => {
                            *retry = Some(d.to_vec());
                            *pending = ev.and_then(Event::detached);
                            return None
                        }
                    }
                    counters
                        .to_board
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if let Some(ev) = ev {
                    commands.handle(ev, relay, &mut stopped).await;
                }
            }
            buf.fit(gather);
        }
    }
}

impl Commands {
    /// Handles one telnet event other than data: answers negotiation, and
    /// applies a COM-PORT-OPTION command to the end even when the relay
    /// stops (a drain it waits on is cut short by purging what waits to go
    /// out), so the port stays open until it is done.
    async fn handle(
        &mut self,
        ev: Event<'_>,
        relay: &Relay<'_>,
        stopped: &mut (impl std::future::Future<Output = ()> + Unpin),
    ) {
        let label = relay.label;
        match ev {
            Event::Data(_) => unreachable!("data is written by the relay"),
            Event::Negotiate(v, o) => {
                if let Some((rv, ro)) = self.neg.answer(v, o) {
                    let mut out = Vec::new();
                    telnet::negotiate(rv, ro, &mut out);
                    tokio::select! {
                        biased;
                        _ = self.replies.send(out) => {}
                        _ = &mut *stopped => {}
                    }
                }
            }
            Event::Subnegotiation(OPT_COM_PORT, payload) => match Command::decode(&payload) {
                Ok((Direction::ClientToServer, cmd)) => {
                    if let Command::Signature(s) = &cmd {
                        if let Some(tool) = wire::rfc2217::ToolSignature::parse(s) {
                            debug!(tty = %label, "the tool is {} (pid {} in the client's namespace)", tool.comm, tool.pid);
                            relay.guard.set_tool(tool);
                            return;
                        }
                    }
                    self.line.note(&cmd);
                    let applying =
                        command::apply(relay.fd, cmd, label, &self.suspend, &mut self.warnings);
                    tokio::pin!(applying);
                    let reply = tokio::select! {
                        r = &mut applying => r,
                        _ = &mut *stopped => {
                            let _ = crate::port::purge(relay.fd, wire::rfc2217::purge::TRANSMIT);
                            applying.await
                        }
                    };
                    if let Some(reply) = reply {
                        tokio::select! {
                            biased;
                            _ = self.replies.send(reply.to_bytes(Direction::ServerToClient)) => {}
                            _ = &mut *stopped => {}
                        }
                    }
                }
                Ok((Direction::ServerToClient, cmd)) => {
                    debug!(tty = %label, "ignoring server-side command from client: {cmd:?}")
                }
                Err(e) => {
                    if self.warnings.allow().is_some() {
                        warn!(tty = %label, "{e}")
                    }
                }
            },
            Event::Subnegotiation(opt, _) => {
                debug!(tty = %label, "ignoring subnegotiation of option {opt}")
            }
            Event::Command(_) => {}
            Event::Malformed(why) => {
                if self.warnings.allow().is_some() {
                    warn!(tty = %label, "client sent a malformed command: {why}")
                }
            }
        }
    }
}
