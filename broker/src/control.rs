//! Control sockets: versioned JSON lines (see `wire::control`).
//!
//! `RUN/broker.sock` (the admin's, mode 0600) sees every board;
//! `RUN/machines/<m>/control.sock` sees the boards that machine may use. devshim
//! also keeps a connection to its machine's control socket open: when it
//! closes, the broker is gone and devshim takes the ttys down.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use wire::control::{parse_request, reply_line, Reply, Request, MAX_LINE, VERSION};

use crate::state::Shared;

/// Which boards a control connection may see.
#[derive(Debug, Clone)]
pub enum Scope {
    Admin,
    Machine(String),
}

/// Accepts control connections until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    scope: Scope,
    shared: Shared,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((sock, _)) => {
                    tokio::spawn(connection(sock, scope.clone(), shared.clone(), shutdown.clone()));
                }
                Err(e) => {
                    debug!("control accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(sock: UnixStream, scope: Scope, shared: Shared, shutdown: CancellationToken) {
    let (r, mut w) = sock.into_split();
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    let mut greeted = false;
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = limited.read_until(b'\n', &mut line) => r,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
            // Skip the rest of the oversized line, then answer it.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                match (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut rest)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) if rest.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            Reply::Error {
                message: format!("request line is over the {MAX_LINE}-byte limit"),
            }
        } else {
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            handle(text, &scope, &shared, &mut greeted)
        };
        if w.write_all(&reply_line(&reply)).await.is_err() {
            return;
        }
    }
}

/// One request → one reply.
fn handle(line: &[u8], scope: &Scope, shared: &Shared, greeted: &mut bool) -> Reply {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(message) => return Reply::Error { message },
    };
    match req {
        Request::Hello { version, .. } if version != VERSION => Reply::Error {
            message: format!(
                "protocol version {version} is not supported; this broker speaks {VERSION}"
            ),
        },
        Request::Hello { .. } => {
            *greeted = true;
            Reply::Hello {
                version: VERSION,
                server: format!("devbroker {}", env!("CARGO_PKG_VERSION")),
            }
        }
        _ if !*greeted => Reply::Error {
            message: "send hello first: {\"request\":\"hello\",\"version\":1,\"client\":\"NAME\"}"
                .into(),
        },
        Request::Status {} => Reply::Status(match scope {
            Scope::Admin => shared.status(|_| true),
            Scope::Machine(m) => shared.status(|b| b.machines.iter().any(|x| x == m)),
        }),
    }
}
