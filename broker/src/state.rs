//! Shared broker state: each tty's adapter, holder and byte counters.
//!
//! One mutex guards it; it is taken for short, non-async moments only (a
//! session starting or ending, a status read). The relay's hot path touches
//! just the atomic counters.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use wire::control::{
    BoardInfo, BoardStatus, Granted, GrantedTty, Holder, Reply, Status, TtyStatus,
};

use crate::lease::{Client, ClientKey, Leases, Refusal, Want};
use crate::limits;

use crate::adapter::Adapter;
use crate::config::Config;
use crate::plan::TtyKey;

/// Byte counters of one tty, shared with its session.
#[derive(Debug, Default)]
pub struct Counters {
    pub to_board: AtomicU64,
    pub from_board: AtomicU64,
}

#[derive(Debug)]
struct Session {
    id: u64,
    who: String,
    pid: Option<i32>,
    since: SystemTime,
    cancel: CancellationToken,
    /// Cancelled when the session ends, however it ends: a sequence run on
    /// its port stops then, so it never keeps the port from the next one.
    ended: CancellationToken,
    /// A duplicate of the open port, for sequences run while the session
    /// holds it; `None` while the adapter is away.
    fd: Option<Arc<OwnedFd>>,
}

/// Asks a drain task for its port.
type DrainTx = mpsc::Sender<tokio::sync::oneshot::Sender<tokio_serial::SerialStream>>;

/// Which adapter a tty has, as sessions see it: `gen` counts the changes,
/// so a session whose port failed can tell the adapter it had from one that
/// came back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Link {
    pub gen: u64,
    pub adapter: Option<Adapter>,
}

#[derive(Debug)]
struct TtyState {
    /// The task keeping the port open between sessions (console mode
    /// `always`), by generation.
    drain: Option<(u64, DrainTx)>,
    session: Option<Session>,
    counters: Arc<Counters>,
    /// The tty's adapter; sessions watch it to learn when it goes and
    /// comes back.
    link: tokio::sync::watch::Sender<Link>,
    /// The board's re-enumeration grace.
    grace: std::time::Duration,
    /// The adapter went and the grace has not run out.
    away: bool,
}

impl TtyState {
    fn new(grace: std::time::Duration) -> TtyState {
        TtyState {
            drain: None,
            session: None,
            counters: Arc::default(),
            link: tokio::sync::watch::Sender::new(Link::default()),
            grace,
            away: false,
        }
    }

    /// The adapter the tty has now.
    fn adapter(&self) -> Option<Adapter> {
        self.link.borrow().adapter.clone()
    }

    /// The by-id name a client sees: the adapter's, else the one the config
    /// matches on.
    fn by_id(&self, tty: &crate::config::Tty) -> Option<String> {
        self.link
            .borrow()
            .adapter
            .as_ref()
            .and_then(|a| a.by_id.clone())
            .or_else(|| tty.matcher.by_id.clone())
    }
}

#[derive(Debug, Default)]
struct Inner {
    config: Config,
    ttys: BTreeMap<TtyKey, TtyState>,
    next_session: u64,
    leases: Leases,
    /// Control connections, to tell a waiter its lease was granted.
    conns: BTreeMap<u64, (ClientKey, mpsc::UnboundedSender<Reply>)>,
    /// Open control connections per client, for the limit.
    conn_counts: BTreeMap<ClientKey, usize>,
    next_conn: u64,
    /// Each board's console capture.
    captures: BTreeMap<String, Arc<crate::capture::Capture>>,
    /// Where each leased board's console starts for its holder: the lease
    /// and the capture's stream position when it was granted.
    log_from: BTreeMap<String, (u64, u64)>,
    next_drain: u64,
    /// Sequences running, to stop those whose lease ended.
    sequences: BTreeMap<u64, RunningSequence>,
    next_sequence: u64,
}

/// A sequence being run, as the state knows it.
#[derive(Debug)]
struct RunningSequence {
    client: ClientKey,
    board: String,
    /// The lease it runs under; `None` on a board dedicated to the machine
    /// (or for the admin).
    lease: Option<u64>,
    stop: CancellationToken,
}

impl Inner {
    /// A board of the config, or an error naming it.
    fn board(&self, name: &str) -> Result<&crate::config::Board, String> {
        self.config
            .boards
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| format!("board {name} is not in the config"))
    }

    /// A configured tty's state.
    fn tty(&self, board: &str, tty: &str) -> &TtyState {
        &self.ttys[&TtyKey {
            board: board.to_string(),
            tty: tty.to_string(),
        }]
    }
}

impl Inner {
    /// Whether every tty of a board has its adapter.
    fn board_present(&self, board: &str) -> bool {
        inner_present(&self.config, &self.ttys, board)
    }

    /// Notes where a new lease's console starts.
    fn lease_began(&mut self, board: &str) {
        let Some(l) = self.leases.holder(board) else {
            return;
        };
        let id = l.id;
        if let Some(c) = self.captures.get(board) {
            let at = c.total();
            self.log_from.insert(board.to_string(), (id, at));
        }
    }

    /// Stops sequences whose lease is over.
    fn leases_changed(&mut self) {
        let leases = &self.leases;
        self.sequences.retain(|_, s| {
            let Some(id) = s.lease else { return true };
            if leases.holder(&s.board).is_some_and(|l| l.id == id) {
                return true;
            }
            s.stop.cancel();
            false
        });
    }
}

/// The broker's shared state.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    inner: Arc<Mutex<Inner>>,
    /// Woken when leases change, so the server loop re-plans the sockets.
    pub changed: Arc<Notify>,
}

/// How long a session outlives the lease it came with.
pub const LEASE_END_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What a lease request got.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    Granted(Granted),
    Waiting(Reply),
}

/// A session's hold on a tty. Dropping it frees the tty.
#[derive(Debug)]
pub struct SessionGuard {
    shared: Shared,
    key: TtyKey,
    id: u64,
    /// Cancelled when the adapter goes away or the broker stops.
    pub cancel: CancellationToken,
    pub counters: Arc<Counters>,
    pub adapter: Adapter,
    /// The rate the config gives the tty; the port opens at it.
    pub rate: u32,
    /// Set when this tty is its board's console: what it reads is recorded.
    pub capture: Option<Arc<crate::capture::Capture>>,
    /// How long the session waits for its adapter to come back when the
    /// port fails (zero: it ends at once).
    pub grace: std::time::Duration,
    /// The tty's adapter as it changes; see [`Link`].
    pub link: tokio::sync::watch::Receiver<Link>,
}

impl SessionGuard {
    /// The port a drain task holds open for this tty, if any: taken over
    /// without closing it (no DTR/RTS toggle, no lost bytes).
    pub async fn take_drained(&self) -> Option<tokio_serial::SerialStream> {
        let tx = {
            let inner = self.shared.inner.lock().unwrap();
            inner
                .ttys
                .get(&self.key)?
                .drain
                .as_ref()
                .map(|(_, tx)| tx.clone())?
        };
        let (give, take) = tokio::sync::oneshot::channel();
        tx.send(give).await.ok()?;
        tokio::time::timeout(std::time::Duration::from_secs(1), take)
            .await
            .ok()?
            .ok()
    }

    /// Hands the port back to a drain task when the console is captured
    /// always; otherwise it is closed.
    pub fn return_port(&self, port: tokio_serial::SerialStream) {
        if let Some(c) = &self.capture {
            if c.config.mode == crate::capture::Mode::Always && !self.cancel.is_cancelled() {
                self.shared.start_drain(self.key.clone(), port, c.clone());
            }
        }
    }

    /// Records the session's open port, so sequences can run on it; `None`
    /// while the adapter is away. The state keeps a duplicate: it stays
    /// valid whatever the session does with its own.
    pub fn set_fd(&self, port: Option<std::os::fd::BorrowedFd<'_>>) {
        let fd = match port.map(|p| p.try_clone_to_owned()).transpose() {
            Ok(fd) => fd.map(Arc::new),
            Err(e) => {
                tracing::warn!("{}: can't keep the port for sequences: {e}", self.key);
                None
            }
        };
        let mut inner = self.shared.inner.lock().unwrap();
        if let Some(s) = inner
            .ttys
            .get_mut(&self.key)
            .and_then(|t| t.session.as_mut())
        {
            if s.id == self.id {
                s.fd = fd;
            }
        }
    }
}

/// Where a sequence runs: the open port of a session (a duplicate), or the
/// device it opens itself, holding the tty as a session would meanwhile.
#[derive(Debug)]
pub enum SequencePort {
    Shared(Arc<OwnedFd>),
    Open {
        device: std::path::PathBuf,
        rate: u32,
        /// The tty, taken for the sequence: nobody else opens the port
        /// while it runs, and `status` names who runs it.
        guard: Box<SessionGuard>,
    },
}

/// A sequence allowed to run: where, and what stops it. Dropping it frees
/// the client's sequence slot.
#[derive(Debug)]
pub struct SequenceRun {
    pub key: TtyKey,
    pub port: SequencePort,
    /// Cancelled when the sequence must stop: its lease ended, the session
    /// whose port it uses ended, the adapter went, or the broker stops. The
    /// caller also cancels it when its connection closes.
    pub stop: CancellationToken,
    shared: Shared,
    id: u64,
}

impl Drop for SequenceRun {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.inner.lock().unwrap().sequences.remove(&self.id);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut inner = self.shared.inner.lock().unwrap();
        if let Some(t) = inner.ttys.get_mut(&self.key) {
            if t.session.as_ref().is_some_and(|s| s.id == self.id) {
                if let Some(s) = t.session.take() {
                    s.ended.cancel();
                }
            }
        }
    }
}

impl Shared {
    pub fn new(config: Config) -> Shared {
        let mut inner = Inner::default();
        for b in &config.boards {
            for t in &b.ttys {
                inner.ttys.insert(
                    TtyKey {
                        board: b.name.clone(),
                        tty: t.name.clone(),
                    },
                    TtyState::new(b.reenumerate_grace),
                );
            }
        }
        for b in &config.boards {
            inner.captures.insert(
                b.name.clone(),
                Arc::new(crate::capture::Capture::new(b.console.clone())),
            );
        }
        inner.config = config;
        Shared {
            inner: Arc::new(Mutex::new(inner)),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Registers a control connection of `client`; replies for it (a grant
    /// while it waits) arrive on the returned channel. Refused past the
    /// client's connection limit.
    pub fn connect(
        &self,
        client: ClientKey,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Reply>), String> {
        let mut inner = self.inner.lock().unwrap();
        let n = inner.conn_counts.get(&client).copied().unwrap_or(0);
        if client != ClientKey::Admin && n >= limits::CONTROL_CONNECTIONS {
            return Err(format!(
                "too many control connections ({n}, the limit); close some and try again"
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
    }

    fn granted(inner: &Inner, board: &str, client: &Client) -> Granted {
        let b = inner
            .config
            .boards
            .iter()
            .find(|b| b.name == board)
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
                        Client::Machine(_) => sock,
                        Client::HostUser { .. } => format!("host/{sock}"),
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
    fn grant(inner: &mut Inner, boards: &[String]) {
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
    pub fn lease(&self, conn: u64, client: Client, want: Want) -> Result<LeaseOutcome, Refusal> {
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
    pub fn release(&self, conn: u64, board: &str) -> Result<(), String> {
        let mut inner = self.inner.lock().unwrap();
        inner.leases.release(conn, board)?;
        Self::grant(&mut inner, &[board.to_string()]);
        drop(inner);
        self.changed.notify_one();
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
        let Some(b) = inner.config.boards.iter().find(|b| b.name == board) else {
            return false;
        };
        b.dedicated_machine() == Some(machine) || inner.leases.machine_holds(machine, board)
    }

    /// Ok when a host uid holds the lease on a board; else who does.
    pub fn host_lease(&self, uid: u32, board: &str) -> Result<(), String> {
        let inner = self.inner.lock().unwrap();
        if inner.leases.host_uid_holds(uid, board) {
            return Ok(());
        }
        Err(match inner.leases.holder(board) {
            Some(l) => format!(
                "{board} is leased to {} since {}; wait for it with `devshim lease --board {board} -- COMMAND`",
                l.client.describe(),
                humantime::format_rfc3339_seconds(l.since)
            ),
            None => format!("{board} is not leased to you: take it with `devshim lease --board {board} -- COMMAND`"),
        })
    }

    /// The boards a client may use (every board for the admin: `None`).
    /// A client sees who holds a board and how many wait for it only as far
    /// as it concerns itself: another client's lease reads "another client",
    /// and `waiting` counts its own requests.
    pub fn list(&self, client: Option<&Client>) -> Vec<BoardInfo> {
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
    fn access(inner: &Inner, client: Option<&Client>, board: &str) -> Result<Hold, String> {
        let Some(c) = client else {
            return inner.board(board).map(|_| Hold::Always);
        };
        if !crate::lease::allowed(&inner.config, board, c) {
            return Err(crate::lease::not_available(
                &Want::Board(board.to_string()),
                c,
            ));
        }
        let b = inner.board(board)?;
        if let Client::Machine(m) = c {
            if b.dedicated_machine() == Some(m.as_str()) {
                return Ok(Hold::Always);
            }
        }
        match inner.leases.holder(board) {
            Some(l) if l.client.key() == c.key() => Ok(Hold::Lease(l.id)),
            _ => Err(format!(
                "{} does not hold board {board}: lease it first (`devshim lease --board {board} -- COMMAND`)",
                c.describe()
            )),
        }
    }

    /// Ok when `client` may act on `board` now; else why not (see
    /// [`Shared::log`] and [`Shared::begin_sequence`], which check it again).
    pub fn may_act(&self, client: Option<&Client>, board: &str) -> Result<(), String> {
        Self::access(&self.inner.lock().unwrap(), client, board).map(|_| ())
    }

    /// What a board's console printed that `client` may read — everything
    /// for the admin and on a dedicated board, else only what came since
    /// its lease began — and a receiver for what comes next. Chunks from the
    /// receiver must be checked with [`Shared::may_follow`].
    pub fn log(
        &self,
        client: Option<&Client>,
        board: &str,
    ) -> Result<(Vec<u8>, ConsoleFollow), String> {
        let inner = self.inner.lock().unwrap();
        let hold = Self::access(&inner, client, board)?;
        let cap = inner
            .captures
            .get(board)
            .cloned()
            .ok_or_else(|| format!("board {board} is not in the config"))?;
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

    /// Lets `client` (`None`: the admin) run a sequence on a board's tty:
    /// on the port of the session that has it open, else on the device,
    /// which the sequence opens and holds as a session would. One sequence
    /// at a time per client; it is stopped when its lease ends.
    pub fn begin_sequence(
        &self,
        client: Option<&Client>,
        board: &str,
        tty: Option<&str>,
        pid: Option<i32>,
        parent: &CancellationToken,
    ) -> Result<SequenceRun, String> {
        let mut inner = self.inner.lock().unwrap();
        let hold = Self::access(&inner, client, board)?;
        let key_of = client.map_or(ClientKey::Admin, Client::key);
        let running = inner
            .sequences
            .values()
            .filter(|s| s.client == key_of)
            .count();
        if running >= limits::SEQUENCES {
            return Err(format!(
                "{} already runs a sequence; one at a time",
                client.map_or("the admin".to_string(), Client::describe)
            ));
        }
        let b = inner.board(board)?;
        let t = match tty {
            Some(t) => b
                .ttys
                .iter()
                .find(|x| x.name == t)
                .ok_or_else(|| format!("board {board} has no tty {t}"))?,
            None => &b.ttys[0],
        };
        let key = TtyKey {
            board: board.to_string(),
            tty: t.name.clone(),
        };
        let rate = t.rate;
        let st = &inner.ttys[&key];
        let adapter = st
            .adapter()
            .ok_or_else(|| format!("{key} is not plugged in"))?;
        let stop = parent.child_token();
        let port = match &st.session {
            Some(s) => {
                let fd = s.fd.clone().ok_or_else(|| {
                    format!("{key} is re-enumerating; try again in a few seconds")
                })?;
                let (ended, cancel, stop2) = (s.ended.clone(), s.cancel.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = ended.cancelled() => stop2.cancel(),
                        _ = cancel.cancelled() => stop2.cancel(),
                        _ = stop2.cancelled() => {}
                    }
                });
                SequencePort::Shared(fd)
            }
            None => {
                drop(inner);
                let who = format!(
                    "a sequence of {}",
                    client.map_or("the admin".to_string(), Client::describe)
                );
                let guard = self.acquire(&key, who, pid, parent)?;
                let (cancel, stop2) = (guard.cancel.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => stop2.cancel(),
                        _ = stop2.cancelled() => {}
                    }
                });
                inner = self.inner.lock().unwrap();
                SequencePort::Open {
                    device: adapter.device,
                    rate,
                    guard: Box::new(guard),
                }
            }
        };
        // The lease may have ended while the lock was let go.
        let hold2 = Self::access(&inner, client, board)?;
        if hold2 != hold {
            return Err(format!("the lease on {board} ended"));
        }
        inner.next_sequence += 1;
        let id = inner.next_sequence;
        inner.sequences.insert(
            id,
            RunningSequence {
                client: key_of,
                board: board.to_string(),
                lease: match hold {
                    Hold::Always => None,
                    Hold::Lease(l) => Some(l),
                },
                stop: stop.clone(),
            },
        );
        Ok(SequenceRun {
            key,
            port,
            stop,
            shared: self.clone(),
            id,
        })
    }

    /// The step text of a board's sequence: its own, else a built-in.
    pub fn sequence_text(&self, board: &str, name: &str) -> Result<String, String> {
        let inner = self.inner.lock().unwrap();
        let b = inner.board(board)?;
        if let Some(t) = b.sequences.get(name) {
            return Ok(t.clone());
        }
        crate::sequence::BUILTINS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.to_string())
            .ok_or_else(|| {
                let mut names: Vec<&str> = b.sequences.keys().map(String::as_str).collect();
                names.extend(crate::sequence::BUILTINS.iter().map(|(n, _)| *n));
                format!(
                    "board {board} has no sequence {name:?}; it has {}",
                    names.join(", ")
                )
            })
    }

    /// Console ttys captured `always` that are present with neither a session
    /// nor a drain: the server opens them and calls [`Shared::start_drain`].
    pub fn drains_needed(
        &self,
    ) -> Vec<(
        TtyKey,
        std::path::PathBuf,
        u32,
        Arc<crate::capture::Capture>,
    )> {
        let inner = self.inner.lock().unwrap();
        let mut out = Vec::new();
        for b in &inner.config.boards {
            if b.console.mode != crate::capture::Mode::Always {
                continue;
            }
            let key = TtyKey {
                board: b.name.clone(),
                tty: b.console.tty.clone(),
            };
            let Some(st) = inner.ttys.get(&key) else {
                continue;
            };
            if let (Some(a), None, None) = (st.adapter(), &st.session, &st.drain) {
                out.push((
                    key.clone(),
                    a.device.clone(),
                    rate_of(&inner.config, &key),
                    inner.captures[&b.name].clone(),
                ));
            }
        }
        out
    }

    /// Keeps a port open and records what the board sends until a session
    /// takes the port over or the adapter goes.
    pub fn start_drain(
        &self,
        key: TtyKey,
        mut port: tokio_serial::SerialStream,
        capture: Arc<crate::capture::Capture>,
    ) {
        use tokio::io::AsyncReadExt;
        let (tx, mut rx) =
            mpsc::channel::<tokio::sync::oneshot::Sender<tokio_serial::SerialStream>>(1);
        let gen = {
            let mut inner = self.inner.lock().unwrap();
            inner.next_drain += 1;
            let gen = inner.next_drain;
            match inner.ttys.get_mut(&key) {
                Some(t) => t.drain = Some((gen, tx)),
                None => return,
            }
            gen
        };
        let shared = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::select! {
                    give = rx.recv() => {
                        if let Some(give) = give {
                            shared.end_drain(&key, gen);
                            let _ = give.send(port);
                        }
                        break;
                    }
                    r = port.read(&mut buf) => match r {
                        Ok(n) if n > 0 => capture.record(&buf[..n]),
                        _ => break,
                    },
                }
            }
            shared.end_drain(&key, gen);
        });
    }

    fn end_drain(&self, key: &TtyKey, gen: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(t) = inner.ttys.get_mut(key) {
            if t.drain.as_ref().is_some_and(|(g, _)| *g == gen) {
                t.drain = None;
            }
        }
    }

    /// Records which adapter each tty has now. A session of a tty whose
    /// adapter went away or changed is cancelled, unless the board has a
    /// re-enumeration grace: then the session is told (through its
    /// [`Link`]) and waits for the adapter while the tty is `away`, and is
    /// cancelled only once the tty leaves `away` without an adapter.
    pub fn set_present(&self, present: &BTreeMap<TtyKey, Adapter>, away: &BTreeSet<TtyKey>) {
        let mut inner = self.inner.lock().unwrap();
        for (key, t) in inner.ttys.iter_mut() {
            let now = present.get(key).cloned();
            let keep = !t.grace.is_zero() && (now.is_some() || away.contains(key));
            t.away = now.is_none() && away.contains(key);
            let had = t.adapter();
            if now != had {
                if !keep {
                    if let Some(s) = &t.session {
                        s.cancel.cancel();
                    }
                }
                t.link.send_modify(|l| {
                    l.gen += 1;
                    l.adapter = now;
                });
            } else if !keep && had.is_none() {
                // The grace ran out with no adapter back.
                if let Some(s) = &t.session {
                    s.cancel.cancel();
                }
            }
        }
        // A board that came back may be what someone waits for.
        let wanted = inner.leases.wanted_boards();
        Self::grant(&mut inner, &wanted);
    }

    /// Takes the tty for a new session, or says who has it.
    pub fn acquire(
        &self,
        key: &TtyKey,
        who: String,
        pid: Option<i32>,
        parent: &CancellationToken,
    ) -> Result<SessionGuard, String> {
        let mut inner = self.inner.lock().unwrap();
        inner.next_session += 1;
        let id = inner.next_session;
        let t = inner
            .ttys
            .get_mut(key)
            .ok_or_else(|| format!("{key} is not in the config"))?;
        let adapter = t.adapter().ok_or_else(|| {
            if t.away {
                format!("{key} is re-enumerating (its adapter went away moments ago); try again in a few seconds")
            } else {
                format!("{key} is not plugged in")
            }
        })?;
        if let Some(s) = &t.session {
            return Err(format!(
                "{key} is in use by {}{} since {}; try again when it is released",
                s.who,
                s.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                humantime::format_rfc3339_seconds(s.since)
            ));
        }
        let cancel = parent.child_token();
        let rate = rate_of(&inner.config, key);
        let capture = inner
            .config
            .boards
            .iter()
            .find(|b| b.name == key.board && b.console.tty == key.tty)
            .map(|b| inner.captures[&b.name].clone());
        let t = inner.ttys.get_mut(key).expect("checked above");
        let link = t.link.subscribe();
        t.session = Some(Session {
            id,
            who,
            pid,
            since: SystemTime::now(),
            cancel: cancel.clone(),
            ended: CancellationToken::new(),
            fd: None,
        });
        Ok(SessionGuard {
            shared: self.clone(),
            key: key.clone(),
            id,
            cancel,
            counters: t.counters.clone(),
            adapter,
            rate,
            capture,
            grace: t.grace,
            link,
        })
    }

    /// The config the broker runs with.
    pub fn config(&self) -> Config {
        self.inner.lock().unwrap().config.clone()
    }

    /// Status of the boards `visible` lets through.
    pub fn status(&self, visible: impl Fn(&crate::config::Board) -> bool) -> Status {
        let inner = self.inner.lock().unwrap();
        let mut boards = Vec::new();
        for b in inner.config.boards.iter().filter(|b| visible(b)) {
            let ttys = b
                .ttys
                .iter()
                .map(|t| {
                    let st = inner.tty(&b.name, &t.name);
                    let adapter = st.adapter();
                    TtyStatus {
                        name: t.name.clone(),
                        present: adapter.is_some(),
                        by_id: st.by_id(t),
                        device: adapter.map(|a| a.device.display().to_string()),
                        holder: st.session.as_ref().map(|s| Holder {
                            who: s.who.clone(),
                            pid: s.pid,
                            since: humantime::format_rfc3339_seconds(s.since).to_string(),
                        }),
                        bytes_to_board: st.counters.to_board.load(Ordering::Relaxed),
                        bytes_from_board: st.counters.from_board.load(Ordering::Relaxed),
                    }
                })
                .collect();
            boards.push(BoardStatus {
                name: b.name.clone(),
                compatible: b.compatible.clone(),
                machines: b.machines.clone(),
                host_groups: b.host_groups.clone(),
                ttys,
            });
        }
        Status { boards }
    }
}

/// Whether every tty of `board` has its adapter (for the lease queue, which
/// can't borrow all of [`Inner`]).
fn inner_present(config: &Config, ttys: &BTreeMap<TtyKey, TtyState>, board: &str) -> bool {
    config
        .boards
        .iter()
        .find(|b| b.name == board)
        .is_some_and(|b| {
            b.ttys.iter().all(|t| {
                ttys.get(&TtyKey {
                    board: b.name.clone(),
                    tty: t.name.clone(),
                })
                .is_some_and(|st| st.link.borrow().adapter.is_some())
            })
        })
}

/// How a client holds a board it acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
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

fn rate_of(config: &Config, key: &TtyKey) -> u32 {
    config
        .boards
        .iter()
        .find(|b| b.name == key.board)
        .and_then(|b| b.ttys.iter().find(|t| t.name == key.tty))
        .map_or(crate::config::DEFAULT_RATE, |t| t.rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_per_tty_and_release_on_drop() {
        let config = crate::config::parse(
            std::path::Path::new("t"),
            "[[board]]\nname = \"b\"\nmachines = [\"m\"]\n[[board.tty]]\nname = \"t\"\nmatch = { by-id = \"x\" }\n",
        )
        .unwrap();
        let shared = Shared::new(config);
        let key = TtyKey {
            board: "b".into(),
            tty: "t".into(),
        };
        let root = CancellationToken::new();
        assert!(shared
            .acquire(&key, "machine m".into(), None, &root)
            .unwrap_err()
            .contains("not plugged in"));
        let a = Adapter {
            id: "x".into(),
            device: "/dev/x".into(),
            by_id: Some("x".into()),
            serial: None,
            path: None,
            usb: None,
        };
        shared.set_present(&[(key.clone(), a)].into(), &BTreeSet::new());
        let g = shared
            .acquire(&key, "machine m".into(), Some(7), &root)
            .unwrap();
        let refusal = shared
            .acquire(&key, "machine n".into(), None, &root)
            .unwrap_err();
        assert!(
            refusal.contains("in use by machine m (pid 7) since"),
            "{refusal}"
        );
        assert_eq!(
            shared.status(|_| true).boards[0].ttys[0]
                .holder
                .as_ref()
                .unwrap()
                .who,
            "machine m"
        );
        shared.set_present(&BTreeMap::new(), &BTreeSet::new());
        assert!(g.cancel.is_cancelled(), "unplug cancels the session");
        drop(g);
        assert!(shared.status(|_| true).boards[0].ttys[0].holder.is_none());
    }
}
