//! Control sockets: versioned JSON lines (see `wire::control`).
//!
//! - `RUN/broker.sock` (the admin's, mode 0600): status of every board.
//! - `RUN/machines/<m>/control.sock`: a machine's jobs list, lease and
//!   release the boards that machine may use. devshim also keeps a connection
//!   open here: when it closes, the broker is gone.
//! - `RUN/host/control.sock`: the same for host users, by their groups.
//!
//! Every request gets one reply; a grant that comes later (the board was
//! busy) arrives as its own line. Bad requests get an `error` reply and the
//! connection stays usable. A lease lives as long as the connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use wire::control::{parse_request, reply_line, Reply, Request, StepTiming, MAX_LINE, VERSION};

use crate::lease::{Client, Want};
use crate::peer::Peer;
use crate::state::{LeaseOutcome, SequencePort, Shared};

/// Which boards a control connection may see and take.
#[derive(Debug, Clone)]
pub enum Scope {
    Admin,
    Machine(String),
    Host,
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Ends a connection's leases however the connection ends.
struct Registration {
    shared: Shared,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.disconnect(self.conn);
    }
}

/// One connection's state.
struct Conn {
    scope: Scope,
    client: Option<Client>,
    conn: u64,
    greeted: bool,
    /// A queued lease request and when it gives up.
    waiting: Option<Option<Instant>>,
    /// A console being followed.
    follow: Option<(String, tokio::sync::broadcast::Receiver<std::sync::Arc<[u8]>>)>,
}

async fn connection(sock: UnixStream, scope: Scope, shared: Shared, shutdown: CancellationToken) {
    let client = match &scope {
        Scope::Admin => None,
        Scope::Machine(m) => Some(Client::Machine(m.clone())),
        Scope::Host => match Peer::of(&sock) {
            Ok(p) => {
                let name = p
                    .user_name(std::path::Path::new("/etc"))
                    .unwrap_or_else(|| p.uid.to_string());
                Some(Client::HostUser {
                    uid: p.uid,
                    name,
                    groups: p.groups,
                })
            }
            Err(_) => return,
        },
    };
    let (conn, mut grants) = shared.connect();
    let _reg = Registration {
        shared: shared.clone(),
        conn,
    };
    let mut c = Conn {
        scope,
        client,
        conn,
        greeted: false,
        waiting: None,
        follow: None,
    };
    let (mut rd, mut wr) = sock.into_split();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut skipping = false;
    loop {
        let deadline = c.waiting.flatten();
        let mut out: Vec<Reply> = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            g = grants.recv() => match g {
                Some(reply) => {
                    if let Reply::Granted(g) = &reply {
                        info!("lease: {} granted to {}", g.board, c.client.as_ref().map(Client::describe).unwrap_or_default());
                    }
                    c.waiting = None;
                    out.push(reply);
                }
                None => return,
            },
            chunk = follow_next(&mut c.follow), if c.follow.is_some() => match chunk {
                Some((board, data)) => out.push(Reply::Log { board, text: String::from_utf8_lossy(&data).into_owned() }),
                None => c.follow = None,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                shared.give_up(c.conn);
                c.waiting = None;
                out.push(Reply::Error { message: "no board became free in time (wait_ms passed)".into() });
            }
            r = rd.read(&mut chunk) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(pos) = memchr::memchr(b'\n', &buf) {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if skipping {
                        skipping = false;
                        continue;
                    }
                    out.push(match handle(&line[..line.len() - 1], &mut c, &shared) {
                        Handled::Now(r) => r,
                        Handled::Run { board, tty, steps } => run_sequence(&shared, board, tty, steps).await,
                    });
                }
                if buf.len() > MAX_LINE {
                    buf.clear();
                    if !skipping {
                        skipping = true;
                        out.push(Reply::Error { message: format!("request line is over the {MAX_LINE}-byte limit") });
                    }
                }
            }
        }
        for reply in out {
            if wr.write_all(&reply_line(&reply)).await.is_err() {
                return;
            }
        }
    }
}

/// The next chunk of a followed console; `None` when it can't go on.
async fn follow_next(f: &mut Option<(String, tokio::sync::broadcast::Receiver<std::sync::Arc<[u8]>>)>) -> Option<(String, std::sync::Arc<[u8]>)> {
    let (board, rx) = f.as_mut()?;
    loop {
        match rx.recv().await {
            Ok(d) => return Some((board.clone(), d)),
            // A slow follower skips ahead rather than holding memory.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// What a request asks for: a reply now, or a sequence to run first.
enum Handled {
    Now(Reply),
    Run { board: String, tty: Option<String>, steps: String },
}

/// One request → its reply (or the sequence it asks for).
fn handle(line: &[u8], c: &mut Conn, shared: &Shared) -> Handled {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(message) => return Handled::Now(Reply::Error { message }),
    };
    if let Request::Run { board, tty, sequence, steps } = req {
        if !c.greeted {
            return Handled::Now(Reply::Error { message: "send hello first".into() });
        }
        let may = match &c.client {
            None => Ok(()),
            Some(Client::Machine(m)) if shared.machine_has(m, &board) => Ok(()),
            Some(Client::Machine(m)) => Err(format!("machine {m} does not hold board {board}: lease it first")),
            Some(Client::HostUser { uid, .. }) => shared.host_lease(*uid, &board),
        };
        let steps = may.and_then(|()| match (sequence, steps) {
            (Some(name), None) => shared.sequence_text(&board, &name),
            (None, Some(text)) => Ok(text),
            _ => Err("give exactly one of \"sequence\" and \"steps\"".into()),
        });
        return match steps {
            Ok(steps) => Handled::Run { board, tty, steps },
            Err(message) => Handled::Now(Reply::Error { message }),
        };
    }
    Handled::Now(handle_now(req, c, shared))
}

/// Runs a sequence on the host, on the session's port if one is open.
async fn run_sequence(shared: &Shared, board: String, tty: Option<String>, text: String) -> Reply {
    let steps = match crate::sequence::parse(&text) {
        Ok(s) => s,
        Err(message) => return Reply::Error { message },
    };
    let (key, port) = match shared.sequence_port(&board, tty.as_deref()) {
        Ok(p) => p,
        Err(message) => return Reply::Error { message },
    };
    let ran = tokio::task::spawn_blocking(move || -> Result<Vec<crate::sequence::Timing>, String> {
        use std::os::fd::AsRawFd;
        match port {
            SequencePort::Shared(fd) => crate::sequence::run(fd.as_raw_fd(), &steps, true).map_err(|e| format!("{key}: {e}")),
            SequencePort::Open { device, rate } => {
                let p = crate::port::open(&device, rate).map_err(|e| format!("can't open {} for {key}: {e}", device.display()))?;
                crate::sequence::run(p.as_raw_fd(), &steps, true).map_err(|e| format!("{key}: {e}"))
            }
        }
    })
    .await;
    match ran {
        Ok(Ok(t)) => Reply::Ran {
            board,
            steps: t
                .into_iter()
                .map(|t| StepTiming { step: t.step, nominal_us: t.nominal.as_micros() as u64, late_us: t.late_us })
                .collect(),
        },
        Ok(Err(message)) => Reply::Error { message },
        Err(e) => Reply::Error { message: format!("the sequence failed: {e}") },
    }
}

/// A request answered at once.
fn handle_now(req: Request, c: &mut Conn, shared: &Shared) -> Reply {
    let err = |m: &str| Reply::Error { message: m.to_string() };
    match req {
        Request::Hello { version, .. } if version != VERSION => Reply::Error {
            message: format!(
                "protocol version {version} is not supported; this broker speaks {VERSION}"
            ),
        },
        Request::Hello { .. } => {
            c.greeted = true;
            Reply::Hello {
                version: VERSION,
                server: format!("devbroker {}", env!("CARGO_PKG_VERSION")),
            }
        }
        _ if !c.greeted => {
            err("send hello first: {\"request\":\"hello\",\"version\":1,\"client\":\"NAME\"}")
        }
        Request::Status {} => Reply::Status(match &c.scope {
            Scope::Admin => shared.status(|_| true),
            Scope::Machine(m) => shared.status(|b| b.machines.iter().any(|x| x == m)),
            Scope::Host => shared.status(|b| !b.host_groups.is_empty()),
        }),
        Request::List {} => Reply::Boards {
            boards: shared.list(c.client.as_ref()),
        },
        Request::Lease {
            board,
            kind,
            wait_ms,
        } => {
            let Some(client) = c.client.clone() else {
                return err("leases are taken on a machine's control socket or the host's (RUN/host/control.sock)");
            };
            if c.waiting.is_some() {
                return err(
                    "this connection is already waiting for a board; one request at a time",
                );
            }
            let want = match (board, kind) {
                (Some(b), None) => Want::Board(b),
                (None, Some(t)) => Want::Type(t),
                _ => return err("give exactly one of \"board\" and \"type\""),
            };
            match shared.lease(c.conn, client.clone(), want) {
                Ok(LeaseOutcome::Granted(g)) => {
                    info!("lease: {} granted to {}", g.board, client.describe());
                    Reply::Granted(g)
                }
                Ok(LeaseOutcome::Waiting(r)) => {
                    c.waiting = Some(wait_ms.map(|ms| Instant::now() + Duration::from_millis(ms)));
                    r
                }
                Err(message) => Reply::Error { message },
            }
        }
        Request::Release { board } => match shared.release(c.conn, &board) {
            Ok(()) => Reply::Released { board },
            Err(message) => Reply::Error { message },
        },
        Request::Run { .. } => unreachable!("handled before"),
        Request::Log { board, follow } => {
            let may = match &c.client {
                None => Ok(()),
                Some(Client::Machine(m)) if shared.machine_has(m, &board) => Ok(()),
                Some(Client::Machine(m)) => Err(format!("machine {m} does not hold board {board}")),
                Some(Client::HostUser { uid, .. }) => shared.host_lease(*uid, &board),
            };
            match may.and_then(|()| shared.capture(&board).ok_or_else(|| format!("board {board} is not in the config"))) {
                Ok(cap) => {
                    let (ring, rx) = cap.snapshot();
                    if follow {
                        c.follow = Some((board.clone(), rx));
                    }
                    Reply::Log { board, text: String::from_utf8_lossy(&ring).into_owned() }
                }
                Err(message) => Reply::Error { message },
            }
        }
    }
}
