//! The status of the boards as the state has them, for the control plane.
//! The admin sees everything; a machine or host user sees only the boards
//! it may use, and of their leases and queues only what concerns itself.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use wire::control::{BoardStatus, Holder, Since, Status, TtyStatus, STATUS_VERSION};

use super::Shared;
use crate::lease::Client;

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Shared {
    /// The status as `viewer` may see it (`None`: the admin).
    pub fn status(&self, viewer: Option<&Client>) -> Status {
        let inner = self.inner.lock().unwrap();
        let mine = |c: &Client| viewer.is_none_or(|v| v.key() == c.key());
        let name = |c: &Client| {
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
                    TtyStatus {
                        name: t.name.clone(),
                        present: adapter.is_some(),
                        by_id: st.by_id(t),
                        device: adapter.map(|a| a.device.display().to_string()),
                        holder: st.session.as_ref().map(|s| Holder {
                            who: s.who.clone(),
                            pid: s.pid,
                            since: rfc3339(s.since),
                        }),
                        bytes_to_board: st.counters.to_board.load(Ordering::Relaxed),
                        bytes_from_board: st.counters.from_board.load(Ordering::Relaxed),
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
