//! Shared broker state: each tty's adapter, session and counters, the
//! leases, the console captures and the sequences running.
//!
//! One mutex guards it; it is taken for short, non-async moments only (a
//! session starting or ending, a lease granted, a status read), and never
//! around I/O or a name lookup. The relay's hot path touches just the
//! atomic counters. Each concern has its file: [`ttys`] (adapters and
//! sessions), [`leasing`] (leases, control connections, who may see what),
//! [`sequences`], [`status`]; the drain that keeps an `always` console open
//! is in [`crate::drain`].

mod leasing;
mod sequences;
mod status;
mod ttys;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};
use wire::control::Reply;

use crate::config::Config;
use crate::lease::{Leases, TenantKey};
use crate::plan::TtyKey;
use crate::refusal::Refusal;
use wire::control::ErrorCode;

pub use leasing::{ConsoleFollow, LeaseOutcome, LEASE_END_GRACE};
pub use sequences::{SequencePort, SequenceRun};
pub use ttys::{Attachment, Counters, SessionGuard};

use sequences::RunningSequence;
use ttys::TtyState;

#[derive(Debug, Default)]
struct Inner {
    config: Config,
    ttys: BTreeMap<TtyKey, TtyState>,
    next_session: u64,
    leases: Leases,
    /// Control connections, to tell a waiter its lease was granted.
    conns: BTreeMap<u64, (TenantKey, mpsc::UnboundedSender<Reply>)>,
    /// Open control connections per client, for the limit.
    conn_counts: BTreeMap<TenantKey, usize>,
    next_conn: u64,
    /// Each board's console capture.
    captures: BTreeMap<String, Arc<crate::capture::Capture>>,
    /// Where each leased board's console starts for its holder: the lease
    /// and the capture's stream position when it was granted.
    log_from: BTreeMap<String, (u64, u64)>,
    next_drain: u64,
    /// Lease waits per board: how many were granted after waiting, and the
    /// time they waited in all.
    lease_waits: BTreeMap<String, (u64, std::time::Duration)>,
    /// Sequences running, to stop those whose lease ended.
    sequences: BTreeMap<u64, RunningSequence>,
    next_sequence: u64,
}

impl Inner {
    /// A board of the config, or an error naming it.
    fn board(&self, name: &str) -> Result<&crate::config::Board, Refusal> {
        self.config.board(name).ok_or_else(|| {
            Refusal::new(
                ErrorCode::NotAvailable,
                format!("board {name} is not in the config"),
            )
        })
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
    /// Woken when sessions, leases or adapters change, for the status line
    /// systemd shows ([`crate::notify`]).
    pub activity: Arc<Notify>,
    /// Asks the server loop to reload the config (`devbroker reload`).
    reloader: Arc<Mutex<Option<mpsc::Sender<ReloadAsk>>>>,
}

/// A reload asked for over the admin socket, and where its outcome goes.
pub type ReloadAsk = tokio::sync::oneshot::Sender<Result<Reconfigured, String>>;

/// What a reload changed, by board name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconfigured {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Inner {
    /// Takes a board's ttys and capture in.
    fn add_board(&mut self, b: &crate::config::Board) {
        for t in &b.ttys {
            self.ttys.insert(
                TtyKey {
                    board: b.name.clone(),
                    tty: t.name.clone(),
                },
                TtyState::new(b.reenumerate_grace),
            );
        }
        self.captures.insert(
            b.name.clone(),
            Arc::new(crate::capture::Capture::new(b.console.clone())),
        );
    }

    /// Lets a board go: its sessions end, its ttys and capture are dropped.
    fn remove_board(&mut self, board: &str) {
        self.ttys.retain(|k, t| {
            if k.board != board {
                return true;
            }
            if let Some(s) = &t.session {
                s.cancel.cancel();
            }
            false
        });
        self.captures.remove(board);
        self.log_from.remove(board);
    }
}

impl Shared {
    pub fn new(config: Config) -> Shared {
        let mut inner = Inner::default();
        for b in &config.boards {
            inner.add_board(b);
        }
        inner.config = config;
        Shared {
            inner: Arc::new(Mutex::new(inner)),
            changed: Arc::new(Notify::new()),
            activity: Arc::new(Notify::new()),
            reloader: Arc::default(),
        }
    }

    /// Where reloads asked over the admin socket go (the server loop).
    pub fn set_reloader(&self, tx: mpsc::Sender<ReloadAsk>) {
        *self.reloader.lock().unwrap() = Some(tx);
    }

    /// Reloads the config, as SIGHUP does; the outcome once it is done.
    pub async fn reload(&self) -> Result<Reconfigured, String> {
        let tx = self
            .reloader
            .lock()
            .unwrap()
            .clone()
            .ok_or("this broker can't reload")?;
        let (ask, outcome) = tokio::sync::oneshot::channel();
        tx.send(ask).await.map_err(|_| "the broker is stopping")?;
        outcome.await.map_err(|_| "the broker is stopping")?
    }

    /// Takes a new config (a reload). A board whose entry is the same keeps
    /// everything: its sessions go on moving bytes, its lease and capture
    /// stay. A removed board's sessions end and its lease goes; a changed
    /// board starts afresh (its sessions end; its lease stays if its holder
    /// may still use it). Waiting requests are filed anew under the boards
    /// the new config gives them.
    pub fn reconfigure(&self, config: Config) -> Reconfigured {
        let mut inner = self.inner.lock().unwrap();
        let old = std::mem::take(&mut inner.config.boards);
        let mut r = Reconfigured::default();
        for b in &old {
            match config.board(&b.name) {
                None => r.removed.push(b.name.clone()),
                Some(n) if n != b => r.changed.push(b.name.clone()),
                Some(_) => {}
            }
        }
        for n in &config.boards {
            if !old.iter().any(|b| b.name == n.name) {
                r.added.push(n.name.clone());
            }
        }
        for name in r.removed.iter().chain(&r.changed) {
            inner.remove_board(name);
        }
        for name in r.added.iter().chain(&r.changed) {
            let b = config.board(name).expect("named from the config").clone();
            inner.add_board(&b);
        }
        inner.config = config;
        let Inner { leases, config, .. } = &mut *inner;
        let lease_changes = leases.reconfigure(config);
        for (conn, why) in lease_changes.refused {
            if let Some((_, tx)) = inner.conns.get(&conn) {
                let _ = tx.send(wire::control::Reply::error(
                    wire::control::ErrorCode::NotAvailable,
                    format!("{why} under the config reloaded"),
                ));
            }
        }
        let wanted: Vec<String> = lease_changes
            .freed
            .into_iter()
            .chain(inner.leases.wanted_boards())
            .collect();
        Self::grant(&mut inner, &wanted);
        drop(inner);
        self.changed.notify_one();
        self.activity.notify_one();
        r
    }

    /// One line of what the broker serves, for `systemctl status`.
    pub fn summary(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let boards = inner.config.boards.len();
        let present = inner
            .config
            .boards
            .iter()
            .filter(|b| inner.board_present(&b.name))
            .count();
        let sessions = inner.ttys.values().filter(|t| t.session.is_some()).count();
        let leases = inner.leases.leases().count();
        let waiting = inner.leases.queued().count();
        format!("{present} of {boards} boards present, {sessions} sessions, {leases} leases, {waiting} waiting")
    }

    /// The host groups any board names, sorted and each once.
    pub fn host_groups(&self) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        let groups: BTreeSet<&String> = inner
            .config
            .boards
            .iter()
            .flat_map(|b| &b.host_groups)
            .collect();
        groups.into_iter().cloned().collect()
    }
}

/// Whether every tty of `board` has its adapter (for the lease queue, which
/// can't borrow all of [`Inner`]).
fn inner_present(config: &Config, ttys: &BTreeMap<TtyKey, TtyState>, board: &str) -> bool {
    config.board(board).is_some_and(|b| {
        b.ttys.iter().all(|t| {
            ttys.get(&TtyKey {
                board: b.name.clone(),
                tty: t.name.clone(),
            })
            .is_some_and(|st| st.attachment.borrow().adapter.is_some())
        })
    })
}

fn rate_of(config: &Config, key: &TtyKey) -> u32 {
    config
        .board(&key.board)
        .and_then(|b| b.ttys.iter().find(|t| t.name == key.tty))
        .map_or(crate::config::DEFAULT_RATE, |t| t.rate)
}
