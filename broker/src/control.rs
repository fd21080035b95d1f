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
use wire::control::{
    parse_request, reply_line, ErrorCode, Reply, Request, StepTiming, MAX_LINE, VERSION,
};

use crate::lease::{Tenant, TenantKey, Want};
use crate::peer::Peer;
use crate::refusal::Refusal;
use crate::state::{ConsoleFollow, LeaseOutcome, SequencePort, Shared};

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
    let what = match &scope {
        Scope::Admin => "the admin socket".to_string(),
        Scope::Host => "the host control socket".to_string(),
        Scope::Machine(m) => format!("machine {m}'s control socket"),
    };
    let cancel = shutdown.clone();
    crate::accept::serve(listener, what, cancel, move |sock| {
        tokio::spawn(connection(
            sock,
            scope.clone(),
            shared.clone(),
            shutdown.clone(),
        ));
    })
    .await
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
    client: Option<Tenant>,
    /// The peer's pid, for `status` while a sequence holds a tty.
    pid: Option<i32>,
    conn: u64,
    greeted: bool,
    /// A queued lease request and when it gives up.
    waiting: Option<Option<Instant>>,
    /// A console being followed.
    follow: Option<ConsoleFollow>,
    shutdown: CancellationToken,
}

/// Who a host peer is: its uid, name and the configured host groups it is
/// in, from the socket's credentials and NSS (off the async threads).
async fn host_client(sock: &UnixStream, shared: &Shared) -> std::io::Result<(Tenant, Option<i32>)> {
    let peer = Peer::of(sock)?;
    let groups = shared.host_groups();
    let pid = peer.pid;
    tokio::task::spawn_blocking(move || {
        let member = crate::peer::member_of(&peer, &groups);
        let name = crate::peer::user_name(peer.uid).unwrap_or_else(|| peer.uid.to_string());
        (
            Tenant::HostUser {
                uid: peer.uid,
                name,
                groups: member,
            },
            pid,
        )
    })
    .await
    .map_err(std::io::Error::other)
}

/// Checks an admin peer: root, or a member of the admin group (the
/// socket's mode lets them in; this says so again, by the credentials the
/// kernel recorded). Its pid, for `status`.
async fn admin(sock: &UnixStream) -> Result<Option<i32>, String> {
    let p = Peer::of(sock).map_err(|e| format!("can't read the peer's credentials: {e}"))?;
    if p.uid == 0 {
        return Ok(p.pid);
    }
    let groups = p.groups.clone();
    let member = tokio::task::spawn_blocking(move || {
        crate::peer::group_gid(crate::server::ADMIN_GROUP).is_some_and(|g| groups.contains(&g))
    })
    .await
    .unwrap_or(false);
    if member {
        Ok(p.pid)
    } else {
        Err(format!(
            "permission denied: the admin socket is for root and members of {}",
            crate::server::ADMIN_GROUP
        ))
    }
}

async fn connection(
    mut sock: UnixStream,
    scope: Scope,
    shared: Shared,
    shutdown: CancellationToken,
) {
    let (client, pid) = match &scope {
        Scope::Admin => match admin(&sock).await {
            Ok(pid) => (None, pid),
            Err(why) => {
                debug!("admin socket: {why}");
                let _ = sock
                    .write_all(&reply_line(&Reply::error(ErrorCode::NotAvailable, why)))
                    .await;
                return;
            }
        },
        Scope::Machine(m) => (Some(Tenant::Machine(m.clone())), None),
        Scope::Host => match host_client(&sock, &shared).await {
            Ok((c, pid)) => (Some(c), pid),
            Err(e) => {
                debug!("host control connection: can't read the peer's credentials: {e}");
                return;
            }
        },
    };
    let key = client.as_ref().map_or(TenantKey::Admin, Tenant::key);
    let (conn, mut grants) = match shared.connect(key) {
        Ok(c) => c,
        Err(refusal) => {
            let who = client.as_ref().map_or("the admin".into(), Tenant::describe);
            debug!("refused a control connection of {who}: {refusal}");
            let _ = sock.write_all(&reply_line(&refusal.into())).await;
            return;
        }
    };
    let _reg = Registration {
        shared: shared.clone(),
        conn,
    };
    let mut c = Conn {
        client,
        pid,
        conn,
        greeted: false,
        waiting: None,
        follow: None,
        shutdown: shutdown.clone(),
    };
    let (mut rd, mut wr) = sock.into_split();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1024];
    let mut skipping = false;
    // A sequence being run: replies wait for it, in order.
    let mut running: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>> =
        None;
    loop {
        let deadline = c.waiting.flatten();
        let mut out: Vec<Reply> = Vec::new();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            // A grant queued before the deadline fired wins over the timeout.
            g = grants.recv() => match g {
                Some(reply) => {
                    if let Reply::Granted(g) = &reply {
                        info!("lease: {} granted to {}", g.board, c.client.as_ref().map(Tenant::describe).unwrap_or_default());
                    }
                    c.waiting = None;
                    out.push(reply);
                }
                None => return,
            },
            r = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                out.push(r);
            }
            chunk = follow_next(&shared, &mut c.follow), if c.follow.is_some() => match chunk {
                Ok((board, data)) => out.push(Reply::Log { board, text: String::from_utf8_lossy(&data).into_owned() }),
                Err(why) => {
                    c.follow = None;
                    if let Some(why) = why {
                        out.push(Reply::error(ErrorCode::NotHeld, why));
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                // Only if still queued: a grant that beat the deadline is delivered instead.
                if shared.withdraw(c.conn) {
                    c.waiting = None;
                    out.push(Reply::error(ErrorCode::Timeout, "no board became free in time (wait_ms passed)"));
                } else {
                    c.waiting = Some(None);
                }
            }
            r = rd.read(&mut chunk) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        // Requests are taken one at a time, each after the reply of the one
        // before: a sequence being run holds the rest back.
        while running.is_none() {
            let Some(pos) = memchr::memchr(b'\n', &buf) else {
                break;
            };
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if skipping {
                skipping = false;
                continue;
            }
            match handle(&line[..line.len() - 1], &mut c, &shared) {
                Handled::Now(r) => out.push(r),
                Handled::Run(fut) => running = Some(fut),
            }
        }
        if buf.len() > MAX_LINE {
            buf.clear();
            if !skipping {
                skipping = true;
                out.push(Reply::error(
                    ErrorCode::BadRequest,
                    format!("request line is over the {MAX_LINE}-byte limit"),
                ));
            }
        }
        for reply in out {
            if wr.write_all(&reply_line(&reply)).await.is_err() {
                return;
            }
        }
    }
}

/// The next chunk of a followed console. `Err(Some(why))` ends the follow
/// with a message (the lease it came with ended), `Err(None)` quietly.
async fn follow_next(
    shared: &Shared,
    f: &mut Option<ConsoleFollow>,
) -> Result<(String, std::sync::Arc<[u8]>), Option<String>> {
    let f = f.as_mut().ok_or(None)?;
    loop {
        match f.rx.recv().await {
            Ok((at, d)) => {
                if !shared.may_follow(f) {
                    return Err(Some(format!(
                        "the lease on {} ended; its console is no longer yours to follow",
                        f.board
                    )));
                }
                if at + d.len() as u64 <= f.from {
                    continue;
                }
                let skip = f.from.saturating_sub(at) as usize;
                let d: std::sync::Arc<[u8]> = if skip > 0 { d[skip..].into() } else { d };
                return Ok((f.board.clone(), d));
            }
            // A slow follower skips ahead rather than holding memory.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return Err(None),
        }
    }
}

/// What a request asks for: a reply now, or a sequence whose reply comes
/// when it has run.
enum Handled {
    Now(Reply),
    Run(std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>),
}

/// One request → its reply (or the sequence it asks for).
fn handle(line: &[u8], c: &mut Conn, shared: &Shared) -> Handled {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return Handled::Now(Reply::error(ErrorCode::BadRequest, e.to_string())),
    };
    if !c.greeted && !matches!(req, Request::Hello { .. }) {
        return Handled::Now(Reply::error(
            ErrorCode::BadRequest,
            "send hello first: {\"request\":\"hello\",\"version\":1,\"client\":\"NAME\"}",
        ));
    }
    if let Request::Run {
        board,
        tty,
        sequence,
        steps,
    } = req
    {
        return match start_sequence(shared, c, board, tty, sequence, steps) {
            Ok(fut) => Handled::Run(fut),
            Err(refusal) => Handled::Now(refusal.into()),
        };
    }
    if let Request::Reload {} = req {
        if c.client.is_some() {
            return Handled::Now(Reply::error(
                ErrorCode::NotAvailable,
                "reloading the config is the admin's (RUN/broker.sock)",
            ));
        }
        let shared = shared.clone();
        return Handled::Run(Box::pin(async move {
            match shared.reload().await {
                Ok(r) => Reply::Reloaded {
                    added: r.added,
                    removed: r.removed,
                    changed: r.changed,
                },
                Err(why) => Reply::error(ErrorCode::BadRequest, why),
            }
        }));
    }
    Handled::Now(handle_now(req, c, shared))
}

/// Checks a `run` request and starts its sequence on a thread of its own;
/// the future gives the reply. Dropping the future (the connection closed)
/// stops the sequence.
fn start_sequence(
    shared: &Shared,
    c: &Conn,
    board: String,
    tty: Option<String>,
    sequence: Option<String>,
    steps: Option<String>,
) -> Result<std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>, Refusal> {
    let text = match (sequence, steps) {
        (Some(name), None) => {
            // Only the board's holder learns which sequences it has.
            shared.may_act(c.client.as_ref(), &board)?;
            shared.sequence_text(&board, &name)?
        }
        (None, Some(text)) => text,
        _ => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "give exactly one of \"sequence\" and \"steps\"",
            ))
        }
    };
    let steps =
        crate::sequence::parse(&text).map_err(|e| Refusal::new(ErrorCode::BadRequest, e))?;
    let run = shared.begin_sequence(
        c.client.as_ref(),
        &board,
        tty.as_deref(),
        c.pid,
        &c.shutdown,
    )?;
    let stop = std::sync::Arc::new(crate::sequence::Stop::default());
    let (token, stop2) = (run.stop.clone(), stop.clone());
    tokio::spawn(async move {
        token.cancelled().await;
        stop2.stop();
    });
    let cancel_on_drop = run.stop.clone().drop_guard();
    let who = c
        .client
        .as_ref()
        .map_or("the admin".into(), Tenant::describe);
    Ok(Box::pin(async move {
        let _cancel_on_drop = cancel_on_drop;
        info!(board = %board, "{who} runs the sequence {text:?}");
        let ran = tokio::task::spawn_blocking(move || -> Result<Vec<crate::sequence::Timing>, String> {
            use std::os::fd::AsFd;
            let key = run.key.clone();
            let r = match &run.port {
                SequencePort::Shared(fd) => crate::sequence::run(fd.as_fd(), &steps, true, &stop),
                SequencePort::Open { device, rate, .. } => {
                    let p = crate::port::open(device, *rate).map_err(|e| format!("can't open {} for {key}: {e}", device.display()))?;
                    crate::sequence::run(crate::port::fd(&p), &steps, true, &stop)
                }
            };
            drop(run);
            r.map_err(|e| if e.kind() == std::io::ErrorKind::Interrupted {
                format!("{key}: the sequence was stopped (its lease or session ended, or the broker is stopping)")
            } else {
                format!("{key}: {e}")
            })
        })
        .await;
        match ran {
            Ok(Ok(t)) => Reply::Ran {
                board,
                steps: t
                    .into_iter()
                    .map(|t| StepTiming {
                        step: t.step,
                        nominal_us: t.nominal.as_micros() as u64,
                        late_us: t.late_us,
                    })
                    .collect(),
            },
            Ok(Err(message)) => Reply::error(ErrorCode::Failed, message),
            Err(e) => Reply::error(ErrorCode::Failed, format!("the sequence failed: {e}")),
        }
    }))
}

/// A request answered at once.
fn handle_now(req: Request, c: &mut Conn, shared: &Shared) -> Reply {
    let err = |m: &str| Reply::error(ErrorCode::BadRequest, m);
    match req {
        Request::Hello { version, .. } if version != VERSION => Reply::error(
            ErrorCode::Version,
            format!("protocol version {version} is not supported; this broker speaks {VERSION}"),
        ),
        Request::Hello { .. } => {
            c.greeted = true;
            Reply::Hello {
                version: VERSION,
                server: format!("devbroker {}", env!("CARGO_PKG_VERSION")),
            }
        }
        Request::Status {} => Reply::Status(shared.status(c.client.as_ref())),
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
                return Reply::error(
                    ErrorCode::Conflict,
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
                Err(refusal) => refusal.into(),
            }
        }
        Request::Release { board } => match shared.release(c.conn, &board) {
            Ok(()) => Reply::Released { board },
            Err(refusal) => refusal.into(),
        },
        Request::Run { .. } | Request::Reload {} => unreachable!("handled before"),
        Request::Log { board, follow } => match shared.log(c.client.as_ref(), &board) {
            Ok((ring, f)) => {
                if follow {
                    c.follow = Some(f);
                }
                Reply::Log {
                    board,
                    text: String::from_utf8_lossy(&ring).into_owned(),
                }
            }
            Err(refusal) => refusal.into(),
        },
    }
}
