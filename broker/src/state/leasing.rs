//! Leases and the control connections that hold them, and what each client
//! may see: the queue itself is [`crate::lease`]'s plain data; this keeps it
//! with the rest of the state, tells waiters of their grants, and decides
//! which boards, consoles and holders a client learns of.

use tokio::sync::mpsc;
use wire::control::{BoardInfo, Granted, GrantedTty, Reply};

use super::{inner_present, Inner, Shared};
use crate::lease::{Tenant, TenantKey, Want};
use crate::limits;
use crate::refusal::Refusal;
use wire::control::ErrorCode;

/// How long a session outlives the lease it came with.
pub const LEASE_END_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What a lease request got.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    Granted(Granted),
    Waiting(Reply),
}

/// How a client holds a board it acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// The admin, or a machine the board is dedicated to.
    Always,
    /// Under this lease.
    Lease(u64),
}

/// A console being followed: chunks from `rx` at or past `from`, for as
/// long as [`Shared::may_follow`] says.
#[derive(Debug)]
pub struct ConsoleFollow {
    pub board: String,
    pub rx: tokio::sync::broadcast::Receiver<crate::capture::Chunk>,
    pub from: u64,
    lease: Option<u64>,
}

impl Shared {
    /// Registers a control connection of `client`; replies for it (a grant
    /// while it waits) arrive on the returned channel. Refused past the
    /// client's connection limit.
    pub fn connect(
        &self,
        client: TenantKey,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Reply>), Refusal> {
        let mut inner = self.inner.lock().unwrap();
        let n = inner.conn_counts.get(&client).copied().unwrap_or(0);
        if client != TenantKey::Admin && n >= limits::CONTROL_CONNECTIONS {
            return Err(Refusal::new(
                ErrorCode::Limit,
                format!("too many control connections ({n}, the limit); close some and try again"),
            ));
        }
        *inner.conn_counts.entry(client.clone()).or_default() += 1;
        inner.next_conn += 1;
        let id = inner.next_conn;
        let (tx, rx) = mpsc::unbounded_channel();
        inner.conns.insert(id, (client, tx));
        Ok((id, rx))
    }

    /// A control connection closed: its leases end, the next waiters get
    /// the boards.
    pub fn disconnect(&self, conn: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some((key, _)) = inner.conns.remove(&conn) {
            if let Some(n) = inner.conn_counts.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    inner.conn_counts.remove(&key);
                }
            }
        }
        let freed = inner.leases.drop_connection(conn);
        if freed.is_empty() {
            return;
        }
        Self::grant(&mut inner, &freed);
        drop(inner);
        self.changed.notify_one();
        self.activity.notify_one();
    }

    fn granted(inner: &Inner, board: &str, client: &Tenant) -> Granted {
        let b = inner
            .config
            .board(board)
            .expect("granted boards are configured");
        let ttys = b
            .ttys
            .iter()
            .map(|t| {
                let sock = wire::names::socket_name(&b.name, &t.name);
                GrantedTty {
                    tty: t.name.clone(),
                    by_id: inner.tty(&b.name, &t.name).by_id(t),
                    socket: match client {
                        Tenant::Machine(_) => sock,
                        Tenant::HostUser { .. } => format!("host/{sock}"),
                    },
                }
            })
            .collect();
        Granted {
            board: board.to_string(),
            ttys,
        }
    }

    /// Hands those of `boards` that are free and present to their first
    /// waiters, and tells them. Every path that may free a board or bring
    /// one back ends here.
    pub(super) fn grant(inner: &mut Inner, boards: &[String]) {
        let grants = {
            let Inner {
                leases,
                config,
                ttys,
                ..
            } = &mut *inner;
            let present = |b: &str| inner_present(config, ttys, b);
            leases.grant(boards.iter().map(String::as_str), &present)
        };
        for g in grants {
            inner.lease_began(&g.board);
            let w = inner.lease_waits.entry(g.board.clone()).or_default();
            w.0 += 1;
            w.1 += g.waited;
            let client = inner
                .leases
                .holder(&g.board)
                .map(|l| l.client.clone())
                .expect("just granted");
            let reply = Reply::Granted(Self::granted(inner, &g.board, &client));
            if let Some((_, tx)) = inner.conns.get(&g.conn) {
                let _ = tx.send(reply);
            }
        }
        inner.leases_changed();
    }

    /// Asks for a lease for `conn`.
    pub fn lease(&self, conn: u64, client: Tenant, want: Want) -> Result<LeaseOutcome, Refusal> {
        let mut inner = self.inner.lock().unwrap();
        let Inner {
            leases,
            config,
            ttys,
            ..
        } = &mut *inner;
        let present = |b: &str| inner_present(config, ttys, b);
        let got = leases.request(
            config,
            conn,
            client.clone(),
            want,
            &present,
            limits::WAITING_LEASES,
        )?;
        if let Some(board) = got {
            inner.lease_began(&board);
            let g = Self::granted(&inner, &board, &client);
            drop(inner);
            self.changed.notify_one();
            self.activity.notify_one();
            return Ok(LeaseOutcome::Granted(g));
        }
        let pos = inner.leases.position(conn).expect("just queued");
        Ok(LeaseOutcome::Waiting(Reply::Waiting {
            place: pos.place,
            holders: pos
                .holders
                .iter()
                .map(|(b, who, since)| {
                    format!(
                        "{b}: {who} since {}",
                        humantime::format_rfc3339_seconds(*since)
                    )
                })
                .collect(),
        }))
    }

    /// Gives back a leased board.
    pub fn release(&self, conn: u64, board: &str) -> Result<(), Refusal> {
        let mut inner = self.inner.lock().unwrap();
        inner.leases.release(conn, board)?;
        Self::grant(&mut inner, &[board.to_string()]);
        drop(inner);
        self.changed.notify_one();
        self.activity.notify_one();
        Ok(())
    }

    /// Withdraws `conn`'s waiting request (its wait timed out), keeping
    /// whatever it holds. False when there was none: it was granted
    /// meanwhile, and the grant is on its way to the connection.
    pub fn withdraw(&self, conn: u64) -> bool {
        self.inner.lock().unwrap().leases.withdraw(conn)
    }

    /// Whether a machine may have a board's sockets now: always for a board
    /// dedicated to it, else while it holds the lease.
    pub fn machine_has(&self, machine: &str, board: &str) -> bool {
        let inner = self.inner.lock().unwrap();
        let Some(b) = inner.config.board(board) else {
            return false;
        };
        b.dedicated_machine() == Some(machine) || inner.leases.machine_holds(machine, board)
    }

    /// Ok when a host uid holds the lease on a board; else who does.
    pub fn host_lease(&self, uid: u32, board: &str) -> Result<(), Refusal> {
        let inner = self.inner.lock().unwrap();
        if inner.leases.host_uid_holds(uid, board) {
            return Ok(());
        }
        Err(Refusal::new(ErrorCode::NotHeld, match inner.leases.holder(board) {
            Some(l) => format!(
                "{board} is leased to {} since {}; wait for it with `devshim lease --board {board} -- COMMAND`",
                l.client.describe(),
                humantime::format_rfc3339_seconds(l.since)
            ),
            None => format!("{board} is not leased to you: take it with `devshim lease --board {board} -- COMMAND`"),
        }))
    }

    /// The boards a client may use (every board for the admin: `None`).
    /// A client sees who holds a board and how many wait for it only as far
    /// as it concerns itself: another client's lease reads "another client",
    /// and `waiting` counts its own requests.
    pub fn list(&self, client: Option<&Tenant>) -> Vec<BoardInfo> {
        let inner = self.inner.lock().unwrap();
        inner
            .config
            .boards
            .iter()
            .filter(|b| client.is_none_or(|c| crate::lease::allowed(&inner.config, &b.name, c)))
            .map(|b| {
                let holder = inner.leases.holder(&b.name);
                let (leased_by, waiting) = match client {
                    None => (
                        holder.map(|l| l.client.describe()),
                        inner.leases.waiting_for(&b.name),
                    ),
                    Some(c) => (
                        holder.map(|l| {
                            if l.client.key() == c.key() {
                                l.client.describe()
                            } else {
                                "another client".to_string()
                            }
                        }),
                        inner.leases.waiting_for_by(&b.name, &c.key()),
                    ),
                };
                BoardInfo {
                    name: b.name.clone(),
                    compatible: b.compatible.clone(),
                    present: inner.board_present(&b.name),
                    leased_by,
                    waiting,
                    dedicated: b.dedicated_machine().is_some(),
                    ttys: b.ttys.iter().map(|t| t.name.clone()).collect(),
                }
            })
            .collect()
    }

    /// Whether `client` (`None`: the admin) may act on a board now — run a
    /// sequence, read its console — and under which lease: the admin
    /// always; a machine on a board dedicated to it or leased to it; a host
    /// user holding its lease. A board the client may not use at all gets
    /// the same answer as one that does not exist.
    pub(super) fn access(
        inner: &Inner,
        client: Option<&Tenant>,
        board: &str,
    ) -> Result<Hold, Refusal> {
        let Some(c) = client else {
            return inner.board(board).map(|_| Hold::Always);
        };
        if !crate::lease::allowed(&inner.config, board, c) {
            return Err(Refusal::new(
                ErrorCode::NotAvailable,
                crate::lease::not_available(&Want::Board(board.to_string()), c),
            ));
        }
        let b = inner.board(board)?;
        if let Tenant::Machine(m) = c {
            if b.dedicated_machine() == Some(m.as_str()) {
                return Ok(Hold::Always);
            }
        }
        match inner.leases.holder(board) {
            Some(l) if l.client.key() == c.key() => Ok(Hold::Lease(l.id)),
            _ => Err(Refusal::new(ErrorCode::NotHeld, format!(
                "{} does not hold board {board}: lease it first (`devshim lease --board {board} -- COMMAND`)",
                c.describe()
            ))),
        }
    }

    /// Ok when `client` may act on `board` now; else why not (see
    /// [`Shared::log`] and [`Shared::begin_sequence`], which check it again).
    pub fn may_act(&self, client: Option<&Tenant>, board: &str) -> Result<(), Refusal> {
        Self::access(&self.inner.lock().unwrap(), client, board).map(|_| ())
    }

    /// What a board's console printed that `client` may read — everything
    /// for the admin and on a dedicated board, else only what came since
    /// its lease began — and a receiver for what comes next. Chunks from the
    /// receiver must be checked with [`Shared::may_follow`].
    pub fn log(
        &self,
        client: Option<&Tenant>,
        board: &str,
    ) -> Result<(Vec<u8>, ConsoleFollow), Refusal> {
        let inner = self.inner.lock().unwrap();
        let hold = Self::access(&inner, client, board)?;
        let cap = inner.captures.get(board).cloned().ok_or_else(|| {
            Refusal::new(
                ErrorCode::NotAvailable,
                format!("board {board} is not in the config"),
            )
        })?;
        let from = match hold {
            Hold::Always => 0,
            Hold::Lease(id) => match inner.log_from.get(board) {
                Some((l, at)) if *l == id => *at,
                _ => cap.total(),
            },
        };
        let (ring, rx) = cap.snapshot_since(from);
        Ok((
            ring,
            ConsoleFollow {
                board: board.to_string(),
                rx,
                from,
                lease: match hold {
                    Hold::Always => None,
                    Hold::Lease(id) => Some(id),
                },
            },
        ))
    }

    /// Whether a follower may still read its board's console: its lease
    /// (if it came with one) still runs.
    pub fn may_follow(&self, f: &ConsoleFollow) -> bool {
        match f.lease {
            None => true,
            Some(id) => self
                .inner
                .lock()
                .unwrap()
                .leases
                .holder(&f.board)
                .is_some_and(|l| l.id == id),
        }
    }
}
