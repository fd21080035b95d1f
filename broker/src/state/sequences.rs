//! Sequences being run: where (a session's port or the device), for whom,
//! and what stops them.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::leasing::Hold;
use super::{SessionGuard, Shared};
use crate::lease::{Tenant, TenantKey};
use crate::limits;
use crate::plan::TtyKey;
use crate::refusal::Refusal;
use wire::control::ErrorCode;

/// A sequence being run, as the state knows it.
#[derive(Debug)]
pub(super) struct RunningSequence {
    pub(super) client: TenantKey,
    pub(super) board: String,
    /// The lease it runs under; `None` on a board dedicated to the machine
    /// (or for the admin).
    pub(super) lease: Option<u64>,
    pub(super) stop: CancellationToken,
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

impl Shared {
    /// Lets `client` (`None`: the admin) run a sequence on a board's tty:
    /// on the port of the session that has it open, else on the device,
    /// which the sequence opens and holds as a session would. One sequence
    /// at a time per client; it is stopped when its lease ends.
    pub fn begin_sequence(
        &self,
        client: Option<&Tenant>,
        board: &str,
        tty: Option<&str>,
        pid: Option<i32>,
        parent: &CancellationToken,
    ) -> Result<SequenceRun, Refusal> {
        let mut inner = self.inner.lock().unwrap();
        let hold = Self::access(&inner, client, board)?;
        let key_of = client.map_or(TenantKey::Admin, Tenant::key);
        let running = inner
            .sequences
            .values()
            .filter(|s| s.client == key_of)
            .count();
        if running >= limits::SEQUENCES {
            return Err(Refusal::new(
                ErrorCode::Limit,
                format!(
                    "{} already runs a sequence; one at a time",
                    client.map_or("the admin".to_string(), Tenant::describe)
                ),
            ));
        }
        let b = inner.board(board)?;
        let t = match tty {
            Some(t) => b.ttys.iter().find(|x| x.name == t).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::BadRequest,
                    format!("board {board} has no tty {t}"),
                )
            })?,
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
            .ok_or_else(|| Refusal::new(ErrorCode::Absent, format!("{key} is not plugged in")))?;
        let stop = parent.child_token();
        let port = match &st.session {
            Some(s) => {
                let fd = s.fd.clone().ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::Absent,
                        format!("{key} is re-enumerating; try again in a few seconds"),
                    )
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
                    client.map_or("the admin".to_string(), Tenant::describe)
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
            return Err(Refusal::new(
                ErrorCode::NotHeld,
                format!("the lease on {board} ended"),
            ));
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
    pub fn sequence_text(&self, board: &str, name: &str) -> Result<String, Refusal> {
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
                Refusal::new(
                    ErrorCode::BadRequest,
                    format!(
                        "board {board} has no sequence {name:?}; it has {}",
                        names.join(", ")
                    ),
                )
            })
    }
}
