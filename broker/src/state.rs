//! Shared broker state: each tty's adapter, holder and byte counters.
//!
//! One mutex guards it; it is taken for short, non-async moments only (a
//! session starting or ending, a status read). The relay's hot path touches
//! just the atomic counters.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use wire::control::{
    BoardInfo, BoardStatus, Granted, GrantedTty, Holder, Reply, Status, TtyStatus,
};

use crate::lease::{Client, Leases, Want};

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
    /// The open port, for sequences run while the session holds it.
    fd: Option<std::os::fd::RawFd>,
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
    conns: BTreeMap<u64, mpsc::UnboundedSender<Reply>>,
    next_conn: u64,
    /// Each board's console capture.
    captures: BTreeMap<String, Arc<crate::capture::Capture>>,
    next_drain: u64,
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
    /// while the adapter is away.
    pub fn set_fd(&self, fd: Option<std::os::fd::RawFd>) {
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

/// Where a sequence can run: a duplicate of an open session's port (it stays
/// valid if the session ends meanwhile), or the device to open for it.
#[derive(Debug)]
pub enum SequencePort {
    Shared(std::os::fd::OwnedFd),
    Open {
        device: std::path::PathBuf,
        rate: u32,
    },
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut inner = self.shared.inner.lock().unwrap();
        if let Some(t) = inner.ttys.get_mut(&self.key) {
            if t.session.as_ref().is_some_and(|s| s.id == self.id) {
                t.session = None;
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

    /// Registers a control connection; replies for it (a grant while it
    /// waits) arrive on the returned channel.
    pub fn connect(&self) -> (u64, mpsc::UnboundedReceiver<Reply>) {
        let mut inner = self.inner.lock().unwrap();
        inner.next_conn += 1;
        let id = inner.next_conn;
        let (tx, rx) = mpsc::unbounded_channel();
        inner.conns.insert(id, tx);
        (id, rx)
    }

    /// A control connection closed: its leases end, the next waiters get
    /// the boards.
    pub fn disconnect(&self, conn: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.conns.remove(&conn);
        inner.leases.drop_connection(conn);
        Self::grant(&mut inner);
        drop(inner);
        self.changed.notify_one();
    }

    fn present_boards(inner: &Inner) -> Vec<String> {
        inner
            .config
            .boards
            .iter()
            .filter(|b| {
                b.ttys
                    .iter()
                    .all(|t| inner.tty(&b.name, &t.name).link.borrow().adapter.is_some())
            })
            .map(|b| b.name.clone())
            .collect()
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

    /// Hands free boards to waiters and tells them.
    fn grant(inner: &mut Inner) {
        let present = Self::present_boards(inner);
        let config = inner.config.clone();
        let grants =
            inner
                .leases
                .grant_waiting(&config, &|b| present.iter().any(|p| p == b), &group_gid);
        for g in grants {
            let client = inner
                .leases
                .holder(&g.board)
                .map(|l| l.client.clone())
                .expect("just granted");
            let reply = Reply::Granted(Self::granted(inner, &g.board, &client));
            if let Some(tx) = inner.conns.get(&g.conn) {
                let _ = tx.send(reply);
            }
        }
    }

    /// Asks for a lease for `conn`.
    pub fn lease(&self, conn: u64, client: Client, want: Want) -> Result<LeaseOutcome, String> {
        let mut inner = self.inner.lock().unwrap();
        let present = Self::present_boards(&inner);
        let config = inner.config.clone();
        let got = inner.leases.request(
            &config,
            conn,
            client.clone(),
            want,
            &|b| present.iter().any(|p| p == b),
            &group_gid,
        )?;
        if let Some(board) = got {
            let g = Self::granted(&inner, &board, &client);
            drop(inner);
            self.changed.notify_one();
            return Ok(LeaseOutcome::Granted(g));
        }
        let pos = inner
            .leases
            .position(&config, conn, &group_gid)
            .expect("just queued");
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
        Self::grant(&mut inner);
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// Withdraws `conn` from the queue (its wait timed out).
    pub fn give_up(&self, conn: u64) {
        self.inner.lock().unwrap().leases.drop_connection(conn);
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
    pub fn list(&self, client: Option<&Client>) -> Vec<BoardInfo> {
        let inner = self.inner.lock().unwrap();
        let present = Self::present_boards(&inner);
        inner
            .config
            .boards
            .iter()
            .filter(|b| {
                client.is_none_or(|c| crate::lease::allowed(&inner.config, &b.name, c, group_gid))
            })
            .map(|b| BoardInfo {
                name: b.name.clone(),
                compatible: b.compatible.clone(),
                present: present.contains(&b.name),
                leased_by: inner.leases.holder(&b.name).map(|l| l.client.describe()),
                waiting: inner.leases.waiting_for(&inner.config, &b.name),
                dedicated: b.dedicated_machine().is_some(),
                ttys: b.ttys.iter().map(|t| t.name.clone()).collect(),
            })
            .collect()
    }

    /// A tty's port for a sequence, with its steps resolved: the board's own
    /// sequence of that name, else a built-in.
    pub fn sequence_port(
        &self,
        board: &str,
        tty: Option<&str>,
    ) -> Result<(TtyKey, SequencePort), String> {
        let inner = self.inner.lock().unwrap();
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
        let st = &inner.ttys[&key];
        let adapter = st
            .adapter()
            .ok_or_else(|| format!("{key} is not plugged in"))?;
        if let Some(fd) = st.session.as_ref().and_then(|s| s.fd) {
            // SAFETY: the session keeps `fd` open while we hold the lock.
            let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|e| format!("{key}: {e}"))?;
            return Ok((key, SequencePort::Shared(dup)));
        }
        Ok((
            key,
            SequencePort::Open {
                device: adapter.device,
                rate: t.rate,
            },
        ))
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

    /// A board's console capture.
    pub fn capture(&self, board: &str) -> Option<Arc<crate::capture::Capture>> {
        self.inner.lock().unwrap().captures.get(board).cloned()
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
        Self::grant(&mut inner);
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
                    let lines = st
                        .session
                        .as_ref()
                        .and_then(|s| s.fd)
                        .and_then(crate::port::modem_outputs);
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
                        dtr: lines.map(|l| l.0),
                        rts: lines.map(|l| l.1),
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

/// A host group's gid, from `/etc/group`.
pub fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    devshim::users::group_gid(&text, name)
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
