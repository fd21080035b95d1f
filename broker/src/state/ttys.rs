//! Each tty's adapter and session: who holds the port, the adapter as
//! sessions follow it through a re-enumeration, the byte counters.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{rate_of, Shared};
use crate::adapter::Adapter;
use crate::plan::TtyKey;
use crate::refusal::Refusal;
use wire::control::ErrorCode;

/// Byte counters of one tty, shared with its session.
#[derive(Debug, Default)]
pub struct Counters {
    pub to_board: AtomicU64,
    pub from_board: AtomicU64,
    /// Sessions started.
    pub sessions: AtomicU64,
    /// Times the adapter came back within the re-enumeration grace.
    pub reenumerations: AtomicU64,
    /// Connections refused (busy, absent, not allowed, not leased).
    pub refusals: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) who: String,
    /// The client's pid (a machine's devshim, or a host tool).
    pub(super) pid: Option<i32>,
    /// The tool that has the port open, as devshim named it: its command
    /// name and host pid.
    pub(super) tool: Option<(String, Option<i32>)>,
    pub(super) since: SystemTime,
    pub(super) cancel: CancellationToken,
    /// Cancelled when the session ends, however it ends: a sequence run on
    /// its port stops then, so it never keeps the port from the next one.
    pub(super) ended: CancellationToken,
    /// A duplicate of the open port, for sequences run while the session
    /// holds it (they may outlive the session's own descriptor); `None`
    /// while the adapter is away.
    pub(super) fd: Option<Arc<OwnedFd>>,
    /// The session's own descriptor of the port, to read its modem lines
    /// for `status` on the descriptor the port was opened as (an emulated
    /// adapter answers ioctls on that one). The session clears it, under
    /// the state's lock, before it closes the port, and `status` reads it
    /// under the lock: it names that open port for as long as it is set.
    pub(super) port: Option<std::os::fd::RawFd>,
}

impl Session {
    /// The pid `status` names: the tool's when known, else the client's.
    pub(super) fn holder_pid(&self) -> Option<i32> {
        self.tool.as_ref().and_then(|t| t.1).or(self.pid)
    }
}

/// Asks a drain task for its port.
pub(super) type DrainTx = mpsc::Sender<crate::drain::Handover>;

/// Which adapter a tty has, as sessions see it: `gen` counts the changes,
/// so a session whose port failed can tell the adapter it had from one that
/// came back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attachment {
    pub gen: u64,
    pub adapter: Option<Adapter>,
}

#[derive(Debug)]
pub(super) struct TtyState {
    /// The task keeping the port open between sessions (console mode
    /// `always`), by generation.
    pub(super) drain: Option<(u64, DrainTx)>,
    pub(super) session: Option<Session>,
    pub(super) counters: Arc<Counters>,
    /// The tty's adapter; sessions watch it to learn when it goes and
    /// comes back.
    pub(super) attachment: tokio::sync::watch::Sender<Attachment>,
    /// The board's re-enumeration grace.
    pub(super) grace: std::time::Duration,
    /// The adapter went and the grace has not run out.
    pub(super) away: bool,
}

impl TtyState {
    pub(super) fn new(grace: std::time::Duration) -> TtyState {
        TtyState {
            drain: None,
            session: None,
            counters: Arc::default(),
            attachment: tokio::sync::watch::Sender::new(Attachment::default()),
            grace,
            away: false,
        }
    }

    /// The adapter the tty has now.
    pub(super) fn adapter(&self) -> Option<Adapter> {
        self.attachment.borrow().adapter.clone()
    }

    /// The by-id name a client sees: the adapter's, else the one the config
    /// matches on.
    pub(super) fn by_id(&self, tty: &crate::config::Tty) -> Option<String> {
        self.attachment
            .borrow()
            .adapter
            .as_ref()
            .and_then(|a| a.by_id.clone())
            .or_else(|| tty.matcher.by_id.clone())
    }
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
    /// The tty's adapter as it changes; see [`Attachment`].
    pub attachment: tokio::sync::watch::Receiver<Attachment>,
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

    /// Records the tool devshim says has the port open (a client SIGNATURE):
    /// its pid in the client's namespace is looked up on the host, off the
    /// relay (a scan of `/proc`).
    pub fn set_tool(&self, tool: wire::rfc2217::ToolSignature) {
        let client = {
            let inner = self.shared.inner.lock().unwrap();
            inner
                .ttys
                .get(&self.key)
                .and_then(|t| t.session.as_ref())
                .filter(|s| s.id == self.id)
                .and_then(|s| s.pid)
        };
        let (shared, key, id) = (self.shared.clone(), self.key.clone(), self.id);
        tokio::spawn(async move {
            let host = match client {
                Some(c) => tokio::task::spawn_blocking(move || crate::peer::host_pid(c, tool.pid))
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            let mut inner = shared.inner.lock().unwrap();
            if let Some(s) = inner
                .ttys
                .get_mut(&key)
                .and_then(|t| t.session.as_mut())
                .filter(|s| s.id == id)
            {
                s.tool = Some((tool.comm, host));
            }
        });
    }

    /// Records the session's open port, so sequences can run on it (the
    /// state keeps a duplicate: it stays valid whatever the session does
    /// with its own) and `status` can read its modem lines; `None` while the
    /// adapter is away and before the session closes the port.
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
                s.port = port.map(|p| std::os::fd::AsRawFd::as_raw_fd(&p));
            }
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.shared.activity.notify_one();
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
    /// Keeps a port open and records what the board sends until a session
    /// takes the port over or the adapter goes (see [`crate::drain`]).
    pub fn start_drain(
        &self,
        key: TtyKey,
        port: tokio_serial::SerialStream,
        capture: Arc<crate::capture::Capture>,
    ) {
        let (tx, rx) = mpsc::channel(1);
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
            crate::drain::run(port, capture, rx).await;
            shared.end_drain(&key, gen);
        });
    }

    /// A drain ended (it gave its port to a session, or the port failed).
    pub(crate) fn end_drain(&self, key: &TtyKey, gen: u64) {
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
    /// [`Attachment`]) and waits for the adapter while the tty is `away`, and is
    /// cancelled only once the tty leaves `away` without an adapter.
    pub fn set_present(&self, present: &BTreeMap<TtyKey, Adapter>, away: &BTreeSet<TtyKey>) {
        let mut inner = self.inner.lock().unwrap();
        for (key, t) in inner.ttys.iter_mut() {
            let now = present.get(key).cloned();
            let keep = !t.grace.is_zero() && (now.is_some() || away.contains(key));
            let was_away = t.away;
            t.away = now.is_none() && away.contains(key);
            if was_away && now.is_some() {
                t.counters.reenumerations.fetch_add(1, Ordering::Relaxed);
            }
            let had = t.adapter();
            if now != had {
                if !keep {
                    if let Some(s) = &t.session {
                        s.cancel.cancel();
                    }
                }
                t.attachment.send_modify(|l| {
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
        self.activity.notify_one();
    }

    /// Takes the tty for a new session, or says who has it.
    /// Counts a connection to a tty's socket that was refused.
    pub fn refused(&self, key: &TtyKey) {
        if let Some(t) = self.inner.lock().unwrap().ttys.get(key) {
            t.counters.refusals.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn acquire(
        &self,
        key: &TtyKey,
        who: String,
        pid: Option<i32>,
        parent: &CancellationToken,
    ) -> Result<SessionGuard, Refusal> {
        let mut inner = self.inner.lock().unwrap();
        inner.next_session += 1;
        let id = inner.next_session;
        let t = inner.ttys.get_mut(key).ok_or_else(|| {
            Refusal::new(
                ErrorCode::NotAvailable,
                format!("{key} is not in the config"),
            )
        })?;
        let adapter = t.adapter().ok_or_else(|| {
            Refusal::new(
                ErrorCode::Absent,
                if t.away {
                    format!("{key} is re-enumerating (its adapter went away moments ago); try again in a few seconds")
                } else {
                    format!("{key} is not plugged in")
                },
            )
        })?;
        if let Some(s) = &t.session {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!(
                    "{key} is in use by {}{} since {}; try again when it is released",
                    s.who,
                    wire::control::tool_and_pid(
                        s.tool.as_ref().map(|t| t.0.as_str()),
                        s.holder_pid()
                    ),
                    humantime::format_rfc3339_seconds(s.since)
                ),
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
        let attachment = t.attachment.subscribe();
        t.session = Some(Session {
            id,
            who,
            pid,
            since: SystemTime::now(),
            cancel: cancel.clone(),
            ended: CancellationToken::new(),
            fd: None,
            port: None,
            tool: None,
        });
        self.activity.notify_one();
        t.counters.sessions.fetch_add(1, Ordering::Relaxed);
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
            attachment,
        })
    }
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
            .message
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
        assert_eq!(refusal.code, ErrorCode::Conflict);
        assert!(
            refusal
                .message
                .contains("in use by machine m (pid 7) since"),
            "{refusal}"
        );
        assert_eq!(
            shared.status(None).boards[0].ttys[0]
                .holder
                .as_ref()
                .unwrap()
                .who,
            "machine m"
        );
        shared.set_present(&BTreeMap::new(), &BTreeSet::new());
        assert!(g.cancel.is_cancelled(), "unplug cancels the session");
        drop(g);
        assert!(shared.status(None).boards[0].ttys[0].holder.is_none());
    }
}
