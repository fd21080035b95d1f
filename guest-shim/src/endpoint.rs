//! A tty's RFC 2217 endpoint on `127.0.0.1`: what a pty can't carry (DTR,
//! RTS, break, parity, data size) reaches the real port through it.
//!
//! Each TCP client gets its own connection to the tty's broker socket, and
//! bytes are relayed unchanged both ways: the broker is the RFC 2217 server.
//! It allows one session per tty, so a client while a tool has the pty open
//! (or the other way round) gets the broker's refusal — a line of text naming
//! the holder — and is closed. Nothing runs while no client is connected.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Buffer size each way.
const CHUNK: usize = 64 * 1024;

/// Binds a listener on `127.0.0.1` at a port the kernel picks.
pub fn bind() -> io::Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    l.set_nonblocking(true)?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// Serves `listener` until `cancel`; then closes it and every connection.
pub async fn run(
    listener: std::net::TcpListener,
    socket: PathBuf,
    label: String,
    cancel: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(tty = %label, "RFC 2217 endpoint: {e}");
            return;
        }
    };
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    debug!(tty = %label, %peer, "RFC 2217 client");
                    conns.spawn(relay(tcp, socket.clone(), label.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: the client is gone, go on.
                    warn!(tty = %label, "RFC 2217 endpoint: accept: {e}");
                }
            },
        }
    }
    // Abort the relays, closing their sockets, and wait until they are gone.
    conns.shutdown().await;
    info!(tty = %label, "RFC 2217 endpoint closed");
}

/// Relays one TCP client to a fresh connection to the broker socket.
async fn relay(mut tcp: TcpStream, socket: PathBuf, label: String) {
    let _ = tcp.set_nodelay(true);
    let mut unix = match UnixStream::connect(&socket).await {
        Ok(u) => u,
        Err(e) => {
            // Same form as the broker's refusals: a line of text, then close.
            let _ = tcp
                .write_all(
                    format!(
                        "devshim: can't reach {label} at {}: {e}\r\n",
                        socket.display()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tcp.shutdown().await;
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut unix, CHUNK, CHUNK).await {
        Ok((up, down)) => {
            debug!(tty = %label, "RFC 2217 client left: {up} bytes to the broker, {down} back")
        }
        Err(e) => debug!(tty = %label, "RFC 2217 client ended: {e}"),
    }
}
