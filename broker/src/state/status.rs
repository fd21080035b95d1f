//! The status of the boards as the state has them, for the control plane.
//! The admin sees everything; a machine or host user sees only the boards
//! it may use, and of their leases and queues only what concerns itself.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use wire::control::{BoardStatus, Holder, Since, Status, TtyStatus, STATUS_VERSION};

use super::Shared;
use crate::lease::Tenant;

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Shared {
    /// The figures the metrics are made of.
    pub fn figures(&self) -> crate::metrics::Figures {
        use crate::metrics::{BoardFigures, Figures, TtyFigures};
        let inner = self.inner.lock().unwrap();
        let ttys = inner
            .ttys
            .iter()
            .map(|(k, t)| TtyFigures {
                board: k.board.clone(),
                tty: k.tty.clone(),
                to_board: t.counters.to_board.load(Ordering::Relaxed),
                from_board: t.counters.from_board.load(Ordering::Relaxed),
                sessions: t.counters.sessions.load(Ordering::Relaxed),
                refusals: t.counters.refusals.load(Ordering::Relaxed),
                reenumerations: t.counters.reenumerations.load(Ordering::Relaxed),
                present: t.adapter().is_some(),
                in_session: t.session.is_some(),
            })
            .collect();
        let boards = inner
            .config
            .boards
            .iter()
            .map(|b| {
                let (waits, waited) = inner.lease_waits.get(&b.name).copied().unwrap_or_default();
                BoardFigures {
                    board: b.name.clone(),
                    leased: inner.leases.holder(&b.name).is_some(),
                    waiting: inner.leases.waiting_for(&b.name),
                    waits,
                    wait_seconds: waited.as_secs_f64(),
                }
            })
            .collect();
        Figures { ttys, boards }
    }

    /// The status as `viewer` may see it (`None`: the admin).
    pub fn status(&self, viewer: Option<&Tenant>) -> Status {
        let inner = self.inner.lock().unwrap();
        let mine = |c: &Tenant| viewer.is_none_or(|v| v.key() == c.key());
        let name = |c: &Tenant| {
            if mine(c) {
                c.describe()
            } else {
                "another client".to_string()
            }
        };
        let mut boards = Vec::new();
        for b in &inner.config.boards {
            if viewer.is_some_and(|v| !crate::lease::allowed(&inner.config, &b.name, v)) {
                continue;
            }
            let ttys = b
                .ttys
                .iter()
                .map(|t| {
                    let st = inner.tty(&b.name, &t.name);
                    let adapter = st.adapter();
                    // DTR and RTS as the port has them, while a session has it open.
                    let lines = st.session.as_ref().and_then(|s| s.port).and_then(|raw| {
                        // SAFETY: see `Session::port`: set, it names the
                        // open port, and the lock is held.
                        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                        crate::port::modem_outputs(fd)
                    });
                    TtyStatus {
                        name: t.name.clone(),
                        present: adapter.is_some(),
                        by_id: st.by_id(t),
                        device: adapter.map(|a| a.device.display().to_string()),
                        holder: st.session.as_ref().map(|s| Holder {
                            who: s.who.clone(),
                            pid: s.holder_pid(),
                            tool: s.tool.as_ref().map(|t| t.0.clone()),
                            since: rfc3339(s.since),
                        }),
                        bytes_to_board: st.counters.to_board.load(Ordering::Relaxed),
                        bytes_from_board: st.counters.from_board.load(Ordering::Relaxed),
                        dtr: lines.map(|l| l.0),
                        rts: lines.map(|l| l.1),
                    }
                })
                .collect();
            let lease = inner.leases.holder(&b.name).map(|l| Since {
                who: name(&l.client),
                since: rfc3339(l.since),
            });
            let waiting = inner
                .leases
                .queued()
                .filter(|(c, _, boards)| boards.contains(&b.name) && mine(c))
                .map(|(c, since, _)| Since {
                    who: name(c),
                    since: rfc3339(since),
                })
                .collect();
            boards.push(BoardStatus {
                name: b.name.clone(),
                compatible: b.compatible.clone(),
                machines: b.machines.clone(),
                host_groups: b.host_groups.clone(),
                ttys,
                console: match b.console.mode {
                    crate::capture::Mode::Session => "session",
                    crate::capture::Mode::Always => "always",
                }
                .into(),
                lease,
                waiting,
            });
        }
        Status {
            version: STATUS_VERSION,
            boards,
        }
    }
}
