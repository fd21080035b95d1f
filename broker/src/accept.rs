//! Accepting connections without spinning.
//!
//! Past the descriptor limit `accept` fails at once, again and again; a loop
//! that only retried would hold the broker's runtime thread and flood its
//! log. Every listener of the broker accepts through [`serve`], which logs a
//! failure at most once per 10 s and pauses 50 ms after each.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::throttle::{held_back, Throttle};

/// A listener [`serve`] accepts from.
pub trait Accept: Send + 'static {
    type Conn: Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_one(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept_one(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Accepts connections on `listener` until `cancel`, handing each to
/// `on_conn`; `what` names the listener in a failure's warning.
pub async fn serve<L: Accept>(
    listener: L,
    what: String,
    cancel: CancellationToken,
    mut on_conn: impl FnMut(L::Conn) + Send,
) {
    let mut failures = Throttle::per_window(1, Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept_one() => match r {
                Ok(conn) => on_conn(conn),
                Err(e) => {
                    if let Some(held) = failures.allow() {
                        tracing::warn!("accept on {what}: {e}{}", held_back(held));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
