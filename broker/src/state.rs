//! Shared broker state: each tty's adapter, holder and byte counters.
//!
//! One mutex guards it; it is taken for short, non-async moments only (a
//! session starting or ending, a status read). The relay's hot path touches
//! just the atomic counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use wire::control::{BoardStatus, Holder, Status, TtyStatus};

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
}

#[derive(Debug, Default)]
struct TtyState {
    adapter: Option<Adapter>,
    session: Option<Session>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Inner {
    config: Config,
    ttys: BTreeMap<TtyKey, TtyState>,
    next_session: u64,
}

/// The broker's shared state.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    inner: Arc<Mutex<Inner>>,
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
                    TtyState::default(),
                );
            }
        }
        inner.config = config;
        Shared {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// Records which adapter each tty has now; sessions of a tty whose
    /// adapter went away or changed are cancelled.
    pub fn set_present(&self, present: &BTreeMap<TtyKey, Adapter>) {
        let mut inner = self.inner.lock().unwrap();
        for (key, t) in inner.ttys.iter_mut() {
            let now = present.get(key).cloned();
            if now != t.adapter {
                if let Some(s) = &t.session {
                    s.cancel.cancel();
                }
                t.adapter = now;
            }
        }
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
        let adapter = t
            .adapter
            .clone()
            .ok_or_else(|| format!("{key} is not plugged in"))?;
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
        let t = inner.ttys.get_mut(key).expect("checked above");
        t.session = Some(Session {
            id,
            who,
            pid,
            since: SystemTime::now(),
            cancel: cancel.clone(),
        });
        Ok(SessionGuard {
            shared: self.clone(),
            key: key.clone(),
            id,
            cancel,
            counters: t.counters.clone(),
            adapter,
            rate,
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
                    let st = &inner.ttys[&TtyKey {
                        board: b.name.clone(),
                        tty: t.name.clone(),
                    }];
                    TtyStatus {
                        name: t.name.clone(),
                        present: st.adapter.is_some(),
                        by_id: st
                            .adapter
                            .as_ref()
                            .and_then(|a| a.by_id.clone())
                            .or_else(|| t.matcher.by_id.clone()),
                        device: st.adapter.as_ref().map(|a| a.device.display().to_string()),
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
        shared.set_present(&[(key.clone(), a)].into());
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
        shared.set_present(&BTreeMap::new());
        assert!(g.cancel.is_cancelled(), "unplug cancels the session");
        drop(g);
        assert!(shared.status(|_| true).boards[0].ttys[0].holder.is_none());
    }
}
